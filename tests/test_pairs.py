"""Finding LoRA pairs: name presets, multi-key specs, callables, per-layer scales,
Flax NNX state paths, multi-axis pairs and batch_axes, and the validation errors of
`find_pairs`."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorapro_jax as lpj
from lorapro_jax.pairs import flat_shape, stored_shape
from tests import reference as ref
from tests.helpers import TINY_DAMPING, assert_close, random_pair


def _flax_pair(rng, n, r, m):
  return rng.standard_normal((n, r)), rng.standard_normal((r, m))


def _ref_flax(a, b, ga, gb, s, x_choice="sylvester"):
  """Reference adjusted gradients of a flax-layout pair, in the flax layout."""
  oA, oB = ref.lorapro_gradients(ga.T, gb.T, a.T, b.T, s, x_choice)
  return oA.T, oB.T


def _update(tx, grads, params):
  grads = jax.tree.map(jnp.asarray, grads)
  params = jax.tree.map(jnp.asarray, params)
  return tx.update(grads, tx.init(params), params)[0]


def test_qwix_preset(x64, rng):
  a, b = _flax_pair(rng, 5, 2, 7)
  ga, gb = _flax_pair(rng, 5, 2, 7)
  params = {"dense": {"kernel": np.zeros((5, 7)), "kernel_lora_a": a, "kernel_lora_b": b}}
  grads = {"dense": {"kernel": np.ones((5, 7)), "kernel_lora_a": ga, "kernel_lora_b": gb}}
  u = _update(lpj.lorapro(1.5, damping=TINY_DAMPING, pairs=lpj.QWIX), grads, params)
  wa, wb = _ref_flax(a, b, ga, gb, 1.5)
  assert_close(u["dense"]["kernel_lora_a"], wa)
  assert_close(u["dense"]["kernel_lora_b"], wb)
  np.testing.assert_array_equal(u["dense"]["kernel"], 1.0)
  # The default spec (FLAX_NNX) does not match Qwix names: everything passes through.
  u0 = _update(lpj.lorapro(1.5), grads, params)
  chex.assert_trees_all_equal(u0, jax.tree.map(jnp.asarray, grads))


def test_peft_preset_paper_layout(x64, rng):
  m, n, r, s = 7, 5, 2, 2.0
  A, B, g = random_pair(rng, m, n, r)
  gA, gB = ref.lora_gradients(g, A, B, s)
  params = {"q_proj": {"lora_A": A, "lora_B": B, "base_layer": np.zeros((m, n))}}
  grads = {"q_proj": {"lora_A": gA, "lora_B": gB, "base_layer": np.ones((m, n))}}
  u = _update(lpj.lorapro(s, damping=TINY_DAMPING, pairs=lpj.PEFT), grads, params)
  wA, wB = ref.lorapro_gradients(gA, gB, A, B, s)
  chex.assert_shape(u["q_proj"]["lora_A"], (r, n))
  chex.assert_shape(u["q_proj"]["lora_B"], (m, r))
  assert_close(u["q_proj"]["lora_A"], wA)
  assert_close(u["q_proj"]["lora_B"], wB)


def test_multi_key_suffix_spec(x64, rng):
  m, n, r, s = 7, 5, 2, 2.0
  A, B, g = random_pair(rng, m, n, r)
  gA, gB = ref.lora_gradients(g, A, B, s)
  spec = lpj.LoRASpec("lora_A/weight", "lora_B/weight", "paper")
  params = {
    "enc": {
      "q": {"lora_A": {"weight": A}, "lora_B": {"weight": B}, "base": {"weight": np.zeros((m, n))}}
    }
  }
  grads = {
    "enc": {
      "q": {"lora_A": {"weight": gA}, "lora_B": {"weight": gB}, "base": {"weight": np.ones((m, n))}}
    }
  }
  found = lpj.find_pairs(params, spec)
  assert len(found) == 1
  f = found[0]
  assert f.path == ("enc", "q")
  assert f.a_path == ("enc", "q", "lora_A", "weight")
  assert (f.m, f.n, f.r, f.layout, f.batch_shape) == (m, n, r, "paper", ())
  u = _update(lpj.lorapro(s, damping=TINY_DAMPING, pairs=spec), grads, params)
  wA, wB = ref.lorapro_gradients(gA, gB, A, B, s)
  assert_close(u["enc"]["q"]["lora_A"]["weight"], wA)
  assert_close(u["enc"]["q"]["lora_B"]["weight"], wB)
  np.testing.assert_array_equal(u["enc"]["q"]["base"]["weight"], 1.0)
  # A lone multi-key leaf is reported with its full path.
  del params["enc"]["q"]["lora_B"]
  with pytest.raises(
    ValueError,
    match=r"enc/q/lora_A/weight \(2, 5\) has no partner "
    r"enc/q/lora_B/weight",
  ):
    lpj.find_pairs(params, spec)


def test_callable_pairs(x64, rng):
  """Any arrangement: a callable returning LoRAPair (or plain tuples)."""
  a, b = _flax_pair(rng, 5, 2, 7)
  ga, gb = _flax_pair(rng, 5, 2, 7)
  A2, B2, g2 = random_pair(rng, 5, 9, 3)
  gA2, gB2 = ref.lora_gradients(g2, A2, B2, 0.5)
  params = {"mlp": {"down": a, "up": b}, "attn": [{"left": B2, "right": A2}]}
  grads = {"mlp": {"down": ga, "up": gb}, "attn": [{"left": gB2, "right": gA2}]}

  def pairs(p):
    yield lpj.LoRAPair(("mlp", "down"), ("mlp", "up"))  # flax layout is the default
    yield (("attn", 0, "right"), ("attn", 0, "left"), "paper")  # a plain tuple

  scale = lambda path, rank: {("mlp",): 1.5, ("attn", 0): 0.5}[path]
  found = lpj.find_pairs(params, pairs)
  assert [(f.m, f.n, f.r, f.layout) for f in found] == [(7, 5, 2, "flax"), (5, 9, 3, "paper")]
  u = _update(lpj.lorapro(scale, damping=TINY_DAMPING, pairs=pairs), grads, params)
  wa, wb = _ref_flax(a, b, ga, gb, 1.5)
  assert_close(u["mlp"]["down"], wa)
  assert_close(u["mlp"]["up"], wb)
  wA2, wB2 = ref.lorapro_gradients(gA2, gB2, A2, B2, 0.5)
  assert_close(u["attn"][0]["right"], wA2)
  assert_close(u["attn"][0]["left"], wB2)


def test_callable_pairs_leaf_in_two_pairs_raises(rng):
  a, b = _flax_pair(rng, 5, 2, 7)
  params = {"l": {"a": a, "b": b, "c": b}}
  pairs = lambda p: [lpj.LoRAPair(("l", "a"), ("l", "b")), lpj.LoRAPair(("l", "a"), ("l", "c"))]
  with pytest.raises(ValueError, match=r"Leaf l/a belongs to two LoRA pairs"):
    lpj.find_pairs(params, pairs)


def test_per_layer_scale_callable_with_different_ranks(x64, rng):
  shapes = {"q": (5, 2, 7), "k": (9, 3, 5), "v": (6, 1, 12)}  # (n, r, m)
  params = {k: dict(zip(("lora_a", "lora_b"), _flax_pair(rng, *v))) for k, v in shapes.items()}
  grads = {k: dict(zip(("lora_a", "lora_b"), _flax_pair(rng, *v))) for k, v in shapes.items()}
  calls = []

  def scale(path, rank):
    calls.append((path, rank))
    return 8.0 / rank  # LoRA's alpha / r with alpha = 8

  u = _update(lpj.lorapro(scale, damping=TINY_DAMPING), grads, params)
  assert sorted(calls) == sorted([((k,), v[1]) for k, v in shapes.items()])
  for k, (_n, r, _m) in shapes.items():
    wa, wb = _ref_flax(
      params[k]["lora_a"], params[k]["lora_b"], grads[k]["lora_a"], grads[k]["lora_b"], 8.0 / r
    )
    assert_close(u[k]["lora_a"], wa)
    assert_close(u[k]["lora_b"], wb)


def test_scale_array_broadcasts_over_batch_axes(x64, rng):
  L, n, r, m = 4, 5, 2, 7
  a, b = rng.standard_normal((L, n, r)), rng.standard_normal((L, r, m))
  ga, gb = rng.standard_normal((L, n, r)), rng.standard_normal((L, r, m))
  s = np.array([0.5, 1.0, 4.0, 0.25])
  u = _update(
    lpj.lorapro(jnp.asarray(s), damping=TINY_DAMPING),
    {"l": {"lora_a": ga, "lora_b": gb}},
    {"l": {"lora_a": a, "lora_b": b}},
  )
  for i in range(L):
    wa, wb = _ref_flax(a[i], b[i], ga[i], gb[i], s[i])
    assert_close(u["l"]["lora_a"][i], wa)
    assert_close(u["l"]["lora_b"][i], wb)
  with pytest.raises(ValueError, match=r"scale for LoRA pair l has shape \(2,\).*\(4,\)"):
    _update(
      lpj.lorapro(jnp.ones(2)),
      {"l": {"lora_a": ga, "lora_b": gb}},
      {"l": {"lora_a": a, "lora_b": b}},
    )


def test_several_specs_in_one_tree(x64, rng):
  a1, b1 = _flax_pair(rng, 5, 2, 7)
  a2, b2 = _flax_pair(rng, 9, 3, 5)
  A3, B3, _ = random_pair(rng, 7, 5, 2)
  params = {
    "x": {"lora_a": a1, "lora_b": b1},
    "y": {"kernel_lora_a": a2, "kernel_lora_b": b2},
    "z": {"lora_A": A3, "lora_B": B3},
  }
  found = lpj.find_pairs(params, (lpj.FLAX_NNX, lpj.QWIX, lpj.PEFT))
  assert sorted((f.path, f.layout, f.m, f.n, f.r) for f in found) == [
    (("x",), "flax", 7, 5, 2),
    (("y",), "flax", 5, 9, 3),
    (("z",), "paper", 7, 5, 2),
  ]
  grads = jax.tree.map(lambda p: rng.standard_normal(p.shape), params)
  u = _update(
    lpj.lorapro(2.0, damping=TINY_DAMPING, pairs=(lpj.FLAX_NNX, lpj.QWIX, lpj.PEFT)), grads, params
  )
  wa, wb = _ref_flax(a2, b2, grads["y"]["kernel_lora_a"], grads["y"]["kernel_lora_b"], 2.0)
  assert_close(u["y"]["kernel_lora_a"], wa)
  assert_close(u["y"]["kernel_lora_b"], wb)
  wA, wB = ref.lorapro_gradients(grads["z"]["lora_A"], grads["z"]["lora_B"], A3, B3, 2.0)
  assert_close(u["z"]["lora_A"], wA)
  assert_close(u["z"]["lora_B"], wB)


def test_list_indices_and_lone_b_leaf():
  params = {
    "layers": [
      {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))},
      {"lora_b": jnp.ones((2, 3))},
    ]
  }
  with pytest.raises(ValueError, match=r"layers/1/lora_b \(2, 3\) has no partner layers/1/lora_a"):
    lpj.find_pairs(params)
  params["layers"][1]["lora_a"] = jnp.ones((4, 2))
  assert [f.path for f in lpj.find_pairs(params)] == [("layers", 0), ("layers", 1)]


def test_zero_sized_dimension_raises():
  params = {"l": {"lora_a": jnp.ones((4, 0)), "lora_b": jnp.ones((0, 3))}}
  with pytest.raises(ValueError, match=r"l/lora_a \(4, 0\).*zero-sized"):
    lpj.find_pairs(params)


def test_bad_pairs_argument_raises():
  with pytest.raises(TypeError, match="LoRASpec"):
    lpj.find_pairs({"w": jnp.ones(2)}, ["lora_a"])


def test_nnx_state_paths():
  """nnx.state (with Variables) and nnx.as_pure give the same pairs, paths
  without the Variable's trailing 'value'."""
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List(
        [nnx.LoRALinear(4, 3, lora_rank=2, rngs=rngs), nnx.LoRALinear(3, 5, lora_rank=1, rngs=rngs)]
      )
      self.wrapped = nnx.LoRA(4, 2, 6, base_module=nnx.Linear(4, 6, rngs=rngs), rngs=rngs)

  model = Model(nnx.Rngs(0))
  state = nnx.state(model, nnx.LoRAParam)
  want = [
    (("layers", 0, "lora"), 3, 4, 2),
    (("layers", 1, "lora"), 5, 3, 1),
    (("wrapped",), 6, 4, 2),
  ]
  for tree in (state, nnx.as_pure(state)):
    assert [(f.path, f.m, f.n, f.r) for f in lpj.find_pairs(tree)] == want
  # The whole model state also holds the frozen kernels and biases: still 3 pairs.
  assert len(lpj.find_pairs(nnx.state(model))) == 3


def test_equivalent_gradients_one_entry_per_pair_with_callable(x64, rng):
  """Two pairs under one parent (possible with a callable) must not collide in
  the diagnostic's output."""
  a1, b1 = _flax_pair(rng, 5, 2, 7)
  a2, b2 = _flax_pair(rng, 9, 3, 5)
  params = {"l": {"a1": a1, "b1": b1, "a2": a2, "b2": b2}}
  updates = jax.tree.map(lambda p: rng.standard_normal(p.shape), params)
  pairs = lambda p: [lpj.LoRAPair(("l", "a1"), ("l", "b1")), lpj.LoRAPair(("l", "a2"), ("l", "b2"))]
  out = lpj.equivalent_gradients(
    jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, updates), pairs=pairs
  )
  assert len(out) == 2, f"one entry per pair expected, got keys {list(out)}"
  # Documented keys, those of the optimizer state: the A leaf's path when two
  # pairs share a parent.
  assert set(out) == {"l/a1", "l/a2"}
  for k in ("1", "2"):
    a, b, ga, gb = (
      params["l"][x + k] if x in "ab" else updates["l"][x[1] + k] for x in ("a", "b", "ga", "gb")
    )
    assert_close(out["l/a" + k], ga @ b + a @ gb, rtol=1e-12)  # (s·B·g^A + s·g^B·A)ᵀ, s = 1


# ------------------------------------------------ multi-axis pairs and batch_axes (issue 12)

# (layout, A leaf shape, B leaf shape, (batch, in, out, r)): what Qwix creates for
# nnx.Einsum kernels, stacked layers, and their mirror images in the paper layout.
MULTI_AXIS = [
  ("flax", (16, 3), (3, 4, 8), ((), (16,), (4, 8), 3)),  # "bd,dhk->bhk", kernel (16, 4, 8)
  ("flax", (4, 8, 3), (3, 16), ((), (4, 8), (16,), 3)),  # "BTNH,NHD->BTD", kernel (4, 8, 16)
  ("flax", (2, 16, 3), (2, 3, 4, 8), ((2,), (16,), (4, 8), 3)),  # two stacked layers
  ("flax", (2, 5, 6, 3), (2, 5, 3, 7), ((2, 5), (6,), (7,), 3)),  # layers × experts
  ("flax", (6, 16, 3), (3, 24), ((), (6, 16), (24,), 3)),  # "lbd,ldh->lbh": Qwix shares b over l
  ("paper", (3, 4, 8), (16, 3), ((), (4, 8), (16,), 3)),
  ("paper", (2, 3, 16), (2, 4, 8, 3), ((2,), (16,), (4, 8), 3)),
]
_NAMES = {"flax": ("lora_a", "lora_b"), "paper": ("lora_A", "lora_B")}
_SPEC = {"flax": lpj.FLAX_NNX, "paper": lpj.PEFT}


def _one_pair(layout, a, b):
  return {"l": dict(zip(_NAMES[layout], (jnp.zeros(a), jnp.zeros(b))))}


def _to_paper_2d(f, a, b):
  """A pair's leaves (or gradients) as float64 (N, r, n) and (N, m, r), the paper layout."""
  a, b = (np.asarray(x, np.float64).reshape(flat_shape(f, k)) for x, k in ((a, "a"), (b, "b")))
  return (np.swapaxes(a, -1, -2), np.swapaxes(b, -1, -2)) if f.layout == "flax" else (a, b)


def _from_paper_2d(f, A, B):
  if f.layout == "flax":
    A, B = np.swapaxes(A, -1, -2), np.swapaxes(B, -1, -2)
  return A.reshape(stored_shape(f, "a")), B.reshape(stored_shape(f, "b"))


def test_multi_axis_readings():
  for layout, a, b, (batch, n_in, out, r) in MULTI_AXIS:
    (f,) = lpj.find_pairs(_one_pair(layout, a, b), _SPEC[layout])
    assert (f.batch_shape, f.in_shape, f.out_shape, f.r) == (batch, n_in, out, r), (a, b)
    assert (f.n, f.m) == (math.prod(n_in), math.prod(out))
    assert f.weight_shape == batch + (n_in + out if layout == "flax" else out + n_in)
    assert (stored_shape(f, "a"), stored_shape(f, "b")) == (a, b)
    assert lpj.pairs.readings(a, b, layout).keys() == {len(batch)}


@pytest.mark.parametrize(
  "layout, a, b",
  [("flax", (3, 16, 3), (3, 3, 24)), ("paper", (3, 3, 16), (3, 24, 3))],
)
def test_ambiguous_batch_axes_raise_and_batch_axes_decides(layout, a, b):
  """L = r = 3: one batch axis (in (16,), out (24,)) or none (in (3, 16), out
  (3, 24)) both fit the shapes; the error names both readings."""
  na, nb = _NAMES[layout]
  with pytest.raises(
    ValueError,
    match=rf"A=l/{na} \({a[0]}, {a[1]}, {a[2]}\), B=l/{nb} \({b[0]}, {b[1]}, {b[2]}\).*ambiguous.*"
    r"batch_axes=0: batch \(\), in \(3, 16\), out \(3, 24\), r 3; "
    r"batch_axes=1: batch \(3,\), in \(16,\), out \(24,\), r 3\. .*batch_axes=k",
  ):
    lpj.find_pairs(_one_pair(layout, a, b), _SPEC[layout])
  params = _one_pair(layout, a, b)
  with pytest.raises(ValueError, match="ambiguous"):  # the transformations raise the same
    lpj.lorapro(pairs=_SPEC[layout]).update(params, (), params)
  for k, want in ((1, ((3,), (16,), (24,))), (0, ((), (3, 16), (3, 24)))):
    (f,) = lpj.find_pairs(params, _SPEC[layout]._replace(batch_axes=k))
    assert (f.batch_shape, f.in_shape, f.out_shape) == want
  # Per pair: a callable of the parent path, or LoRAPair's field.
  tree = {"stack": params["l"], "single": _one_pair(layout, a[1:], b[1:])["l"]}
  spec = _SPEC[layout]._replace(batch_axes=lambda path: 1 if path == ("stack",) else None)
  got = {f.path: f.batch_shape for f in lpj.find_pairs(tree, spec)}
  assert got == {("single",): (), ("stack",): (3,)}
  pair = lpj.LoRAPair(("stack", na), ("stack", nb), layout, batch_axes=1)
  (f,) = lpj.find_pairs(tree, lambda p: [pair])
  assert f.batch_shape == (3,)


def test_bad_batch_axes_raise():
  cases = [
    ((5, 16, 3), (3, 4, 8), 1, r"\(5, 16, 3\).*leading \(batch\) axes differ with batch_axes=1"),
    ((2, 16, 3), (2, 3, 4, 8), 2, r"batch_axes=2 leaves no in- or out-feature axis"),
    ((3, 16, 3), (3, 4, 24), 1, r"ranks differ \(3 vs 4\) with batch_axes=1"),
    ((16, 3), (3, 8), -1, r"batch_axes must be a non-negative int or None, got -1"),
    ((16, 3), (3, 8), True, r"non-negative int or None, got True"),
  ]
  for a, b, k, match in cases:
    with pytest.raises(ValueError, match=match):
      lpj.find_pairs(_one_pair("flax", a, b), lpj.FLAX_NNX._replace(batch_axes=k))
  # Shapes that fit no number of batch axes name the rank and the candidates.
  with pytest.raises(
    ValueError, match=r"rank is 3 \(A's last axis\), but for k = 0…1 .* is \(2, 4\)"
  ):
    lpj.find_pairs(_one_pair("flax", (2, 16, 3), (2, 4, 8)))


def test_multi_axis_efficient_matches_reference(x64, rng):
  """Every MULTI_AXIS pair in one tree, adjusted as the 2-D pair of each slice."""
  params, grads = {}, {}
  for i, (layout, a, b, _) in enumerate(MULTI_AXIS):
    params[f"p{i}"] = dict(zip(_NAMES[layout], (rng.standard_normal(a), rng.standard_normal(b))))
    grads[f"p{i}"] = dict(zip(_NAMES[layout], (rng.standard_normal(a), rng.standard_normal(b))))
  specs = (lpj.FLAX_NNX, lpj.PEFT)
  tx = lpj.lorapro(1.5, damping=TINY_DAMPING, pairs=specs)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  found = lpj.find_pairs(params, specs)
  assert len(found) == len(MULTI_AXIS)
  for f in found:
    (key,) = f.path
    A, B = _to_paper_2d(f, *params[key].values())
    gA, gB = _to_paper_2d(f, *grads[key].values())
    want = [ref.lorapro_gradients(gA[i], gB[i], A[i], B[i], 1.5) for i in range(A.shape[0])]
    wa, wb = _from_paper_2d(f, *(np.stack(w) for w in zip(*want)))
    assert_close(u[key][_NAMES[f.layout][0]], wa)
    assert_close(u[key][_NAMES[f.layout][1]], wb)


@pytest.mark.parametrize(
  "layout, a, b", [MULTI_AXIS[0][:3], pytest.param(*MULTI_AXIS[6][:3], marks=pytest.mark.slow)]
)
def test_multi_axis_full_mode_matches_algorithm_3(x64, layout, a, b):
  """Full mode with weight decay on a multi-axis pair (one with batch axes):
  Algorithm 3 on every 2-D slice; the moments are laid out like the kernel."""
  s, lr, lam, steps = 2.0, 1e-2, 0.1, 3
  rng = np.random.default_rng(3)
  (f,) = lpj.find_pairs(_one_pair(layout, a, b), _SPEC[layout])
  A0, B0 = _to_paper_2d(f, rng.standard_normal(a), rng.standard_normal(b))
  N = A0.shape[0]
  gs = rng.standard_normal((steps, N, f.m, f.n))
  want = [
    ref.algorithm3(
      A0[i], B0[i], lambda t, A, B, i=i: gs[t - 1, i], [lr] * steps, s, weight_decay=lam
    )
    for i in range(N)
  ]
  tx = lpj.lorapro_adamw(
    lr, scale=s, mode="full", weight_decay=lam, damping=TINY_DAMPING, pairs=_SPEC[layout]
  )
  na, nb = _NAMES[layout]
  params = {"l": dict(zip((na, nb), map(jnp.asarray, _from_paper_2d(f, A0, B0))))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  mu = state[0].pair_moments["l"].mu
  assert mu.shape == f.weight_shape and mu.dtype == jnp.float64
  for t in range(steps):
    A, B = _to_paper_2d(f, params["l"][na], params["l"][nb])
    lora = [ref.lora_gradients(gs[t, i], A[i], B[i], s) for i in range(N)]
    gA, gB = _from_paper_2d(f, *(np.stack(x) for x in zip(*lora)))
    grads = {"l": {na: jnp.asarray(gA), nb: jnp.asarray(gB)}}
    if t == 0:  # the diagnostic: s·B·g^A + s·g^B·A = s²·(B Bᵀ g + g Aᵀ A), laid out like W
      (eq,) = lpj.equivalent_gradients(params, grads, s, pairs=_SPEC[layout]).values()
      assert eq.shape == f.weight_shape
      w = np.stack([ref.equivalent_gradient(*lora[i], A[i], B[i], s) for i in range(N)])
      w = np.swapaxes(w, -1, -2) if layout == "flax" else w
      assert_close(eq, w.reshape(f.weight_shape), rtol=1e-12)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert state[0].pair_moments["l"].mu.shape == f.weight_shape
  got = _to_paper_2d(f, params["l"][na], params["l"][nb])
  for i in range(N):
    assert_close(got[0][i], want[i][-1][0])
    assert_close(got[1][i], want[i][-1][1])
