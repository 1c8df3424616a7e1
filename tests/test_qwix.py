"""LoRA-Pro on models adapted by the real Qwix (`qwix.apply_lora_to_model`), as Tunix does.

Qwix gives an ``nnx.Linear`` kernel (in, out) the pair ``kernel_lora_a`` (in, r),
``kernel_lora_b`` (r, out), and an ``nnx.Einsum`` kernel its contracted axes in
``kernel_lora_a`` and its other axes in ``kernel_lora_b``: (D, r) and (r, N, H)
for "BTD,DNH->BTNH", (N, H, r) and (r, D) for "BTNH,NHD->BTD". Layers stacked
with ``nnx.vmap`` and run with ``nnx.scan`` carry a leading layer axis on both.

Every mode trains a few steps in float64; after each step every pair must equal
the same pair flattened to 2-D, (N, n, r) and (N, r, m) with its batch axes
merged into N, and updated by the same optimizer through the existing 2-D path,
within float64 rounding. The layer stack has as many layers as the rank, so its
batch axes are ambiguous and are given by ``batch_axes``. QLoRA (int8 base
kernels) trains the same way. The last test runs the example
examples/qwix_gemma/compare.py (--smoke, plain LoRA and LoRA-Pro full).

Cost: compilation. The models are built under ``nnx.eval_shape`` (Qwix traces
them to create its LoRA weights; nothing is compiled) and filled from NumPy; the
optimizer updates, of the model's pairs and of the flattened ones, are compiled
once per mode and shared by the plain and the QLoRA model (same LoRA shapes).
"""

from __future__ import annotations

import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorapro_jax as lpj
from lorapro_jax.pairs import flat_shape, normalise_path, path_str
from tests.helpers import assert_close

nnx = pytest.importorskip("flax.nnx")
qwix = pytest.importorskip("qwix")

D, HEADS, HEAD_DIM, IN = 16, 2, 4, 8
RANK, ALPHA = 3, 6.0
LAYERS = RANK  # stack/q: a (L, D, r), b (L, r, N, H) also read as in (L, D), out (r, N, H)
SCALE = ALPHA / RANK  # Qwix's LoRA scaling
STEPS = 3
MODES = typing.get_args(lpj.transform.Mode)
# The stack's pairs have one batch axis; the others are read from their shapes.
SPEC = lpj.QWIX._replace(batch_axes=lambda path: 1 if path[0] == "stack" else None)
# The flattened pairs: (N, n, r) and (N, r, m), one leading batch axis.
FLAT = lpj.FLAX_NNX._replace(batch_axes=1)
F64 = {"param_dtype": jnp.float64, "dtype": jnp.float64}


class Block(nnx.Module):
  """Attention-like projections: q with a heads axis, o with two in-axes."""

  def __init__(self, rngs):
    self.q = nnx.Einsum("BTD,DNH->BTNH", (D, HEADS, HEAD_DIM), rngs=rngs, **F64)
    self.o = nnx.Einsum("BTNH,NHD->BTD", (HEADS, HEAD_DIM, D), rngs=rngs, **F64)

  def __call__(self, x):
    return x + self.o(jnp.tanh(self.q(x)))


def _provider(module_path=".*", **kwargs):
  return qwix.LoraProvider(module_path=module_path, rank=RANK, alpha=ALPHA, **kwargs)


class Model(nnx.Module):
  """A Linear, then LAYERS Blocks stacked by nnx.vmap and run by nnx.scan.

  Qwix creates LoRA weights while the model runs, which nnx.scan cannot keep;
  the stacked blocks get theirs inside the nnx.vmap that creates them, and the
  whole-model rule skips them.
  """

  def __init__(self, rngs, **qwix_kwargs):
    self.inp = nnx.Linear(IN, D, rngs=rngs, **F64)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stack(rngs):
      x = jnp.zeros((1, 1, D), jnp.float64)
      return qwix.apply_lora_to_model(Block(rngs), _provider(**qwix_kwargs), x, rngs=rngs)

    self.stack = stack(rngs)

  def __call__(self, x):
    # Qwix leaves an (unstacked) nnx.Rngs attribute on every module: broadcast it.
    @nnx.scan(in_axes=(nnx.Carry, nnx.StateAxes({nnx.RngState: None, ...: 0})), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return body(self.inp(x), self.stack)


def _qwix_model(**qwix_kwargs):
  """The Qwix-adapted Model in float64, its arrays drawn by NumPy, with
  kernel_lora_b zero as Qwix initialises it."""

  def apply_qwix():
    model = Model(nnx.Rngs(0), **qwix_kwargs)
    x = jnp.zeros((1, 1, IN), jnp.float64)
    provider = _provider("^(?!stack).*", **qwix_kwargs)
    return qwix.apply_lora_to_model(model, provider, x, rngs=nnx.Rngs(1))

  graphdef, state = nnx.split(nnx.eval_shape(apply_qwix))
  rng = np.random.default_rng(0)

  def fill(path, x):
    name = normalise_path(path)[-1]
    if name == "kernel_lora_b":
      return jnp.zeros(x.shape, x.dtype)
    if jnp.issubdtype(x.dtype, jnp.integer):  # an int8 quantized kernel
      return jnp.asarray(rng.integers(-127, 128, x.shape), x.dtype)
    scale = 0.01 if name == "scale" else 0.5
    return jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _lora(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))


def _flat(tree, spec=SPEC) -> dict:
  """Every pair of ``tree`` flattened to 2-D slices: ``{"<path>": {"lora_a": (N,
  n, r), "lora_b": (N, r, m)}}`` (N from the batch axes, n and m the features)."""
  leaves = jax.tree.leaves(tree)
  return {
    path_str(f.path): {
      "lora_a": jnp.reshape(leaves[f.a_index], flat_shape(f, "a")),
      "lora_b": jnp.reshape(leaves[f.b_index], flat_shape(f, "b")),
    }
    for f in lpj.find_pairs(tree, spec)
  }


def _tx(mode, pairs):
  return lpj.lorapro_adamw(1e-2, scale=SCALE, mode=mode, weight_decay=0.1, pairs=pairs)


@functools.cache
def _optimizers(mode):
  """(tx, jitted update) for the model's pairs and for the flattened pairs."""
  return tuple((tx, jax.jit(tx.update)) for tx in (_tx(mode, SPEC), _tx(mode, FLAT)))


@nnx.jit
def _loss_and_grad(model, x, y):
  """The loss and its gradient with respect to the LoRA weights."""
  loss = lambda model: jnp.mean((model(x) - y) ** 2)
  return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)


def _set_lora(model, weights):
  state = nnx.state(model, nnx.LoRAParam)
  nnx.replace_by_pure_dict(state, weights)
  nnx.update(model, state)


def _train_against_flat(model, modes):
  """STEPS steps of ``model``'s LoRA weights in every mode; after each, its
  pairs equal the flattened pairs updated by the same optimizer. Returns the
  losses by mode."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, IN)))
  y = jnp.asarray(rng.standard_normal((2, 5, D)))
  init = _lora(model)
  out = {}
  for mode in modes:
    (tx, update), (ref_tx, ref_update) = _optimizers(mode)
    _set_lora(model, init)
    params = init
    state, ref_state = tx.init(params), ref_tx.init(_flat(params))
    losses = []
    for _ in range(STEPS):
      loss, grads = _loss_and_grad(model, x, y)
      grads = nnx.to_pure_dict(grads)
      updates, state = update(grads, state, params)
      flat_updates, ref_state = ref_update(_flat(grads), ref_state, _flat(params))
      want = optax.apply_updates(_flat(params), flat_updates)
      params = optax.apply_updates(params, updates)
      _set_lora(model, params)
      assert_close(_flat(params), want, rtol=1e-10, atol=0)
      losses.append(float(loss))
    assert np.all(np.isfinite(losses)), (mode, losses)
    out[mode] = losses
  return out


def test_issue_reproduction_einsum_pair():
  """Qwix on nnx.Einsum("bd,dhk->bhk", (16, 4, 8)): kernel_lora_a (16, 3),
  kernel_lora_b (3, 4, 8); this raised 'the leading (batch) axes differ'."""

  class M(nnx.Module):
    def __init__(self, rngs):
      self.ein = nnx.Einsum("bd,dhk->bhk", (16, 4, 8), rngs=rngs)

    def __call__(self, x):
      return self.ein(x)

  x = jnp.ones((2, 16))
  provider = _provider()
  model = nnx.eval_shape(
    lambda: qwix.apply_lora_to_model(M(nnx.Rngs(0)), provider, x, rngs=nnx.Rngs(1))
  )
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.full(x.shape, 0.1, x.dtype), state))
  lora = _lora(model)["ein"]
  assert (lora["kernel_lora_a"].shape, lora["kernel_lora_b"].shape) == ((16, 3), (3, 4, 8))
  tx = optax.chain(lpj.lorapro(2.0, pairs=lpj.QWIX), optax.adamw(1e-3))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

  @nnx.jit
  def train_step(model, optimizer, x):
    loss = lambda model: jnp.mean(model(x) ** 2)
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)

  train_step(model, optimizer, x)
  assert np.all(np.asarray(_lora(model)["ein"]["kernel_lora_b"]) < 0.1)


def test_qwix_pairs_and_ambiguous_stack():
  with jax.enable_x64(True):
    lora = _lora(_qwix_model())
  found = {f.path: (f.batch_shape, f.in_shape, f.out_shape) for f in lpj.find_pairs(lora, SPEC)}
  assert found == {
    ("inp",): ((), (IN,), (D,)),
    ("stack", "q"): ((LAYERS,), (D,), (HEADS, HEAD_DIM)),
    ("stack", "o"): ((LAYERS,), (HEADS, HEAD_DIM), (D,)),
  }
  # LAYERS == RANK: o's (3, 2, 4, 3) and (3, 3, 16) fit one batch axis or none.
  with pytest.raises(
    ValueError,
    match=r"stack/o/kernel_lora_a \(3, 2, 4, 3\), B=stack/o/kernel_lora_b \(3, 3, 16\).*"
    r"ambiguous.*batch_axes=0: batch \(\), in \(3, 2, 4\), out \(3, 16\), r 3; "
    r"batch_axes=1: batch \(3,\), in \(2, 4\), out \(16,\), r 3",
  ):
    lpj.find_pairs(lora, lpj.QWIX)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_train_every_mode_matches_flattened_pairs(mode):
  with jax.enable_x64(True):
    model = _qwix_model()
    if mode == "full":  # the m×n moments are laid out like the kernels
      state = jax.eval_shape(_tx(mode, SPEC).init, _lora(model))
      shapes = {k: v.mu.shape for k, v in state[0].pair_moments.items()}
      assert shapes == {
        "inp": (IN, D),
        "stack/q": (LAYERS, D, HEADS, HEAD_DIM),
        "stack/o": (LAYERS, HEADS, HEAD_DIM, D),
      }
    losses = _train_against_flat(model, [mode])[mode]
  assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_qlora_int8_base_weights():
  """Qwix LoRA over int8 base kernels (QLoRA), every mode: only the LoRA
  leaves are optimised, the quantized kernels are left as they were."""
  with jax.enable_x64(True):
    model = _qwix_model(weight_qtype="int8")
    base = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    assert base["stack"]["o"]["kernel"]["array"]["qvalue"].dtype == jnp.int8
    assert base["stack"]["o"]["kernel"]["array"]["qvalue"].shape == (LAYERS, HEADS, HEAD_DIM, D)
    losses = _train_against_flat(model, MODES)
  for mode, ls in losses.items():
    assert ls[-1] < ls[0], (mode, ls)


def test_equivalent_gradients_laid_out_like_the_kernels():
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    lora = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), _lora(_qwix_model()))
    grads = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), lora)
    got = lpj.equivalent_gradients(lora, grads, SCALE, pairs=SPEC)
    want = lpj.equivalent_gradients(_flat(lora), _flat(grads), SCALE, pairs=FLAT)
  assert got["stack/o"].shape == (LAYERS, HEADS, HEAD_DIM, D)
  # The flat tree's pair sits at one key named like the nested path: the same key.
  assert set(got) == set(want)
  for key, g in got.items():
    w = want[key]
    np.testing.assert_allclose(np.reshape(g, w.shape), w, rtol=1e-12)


@pytest.mark.slow
def test_example_smoke(capsys):
  """examples/qwix_gemma/compare.py --smoke: a tiny decoder, 3 steps of plain LoRA and
  LoRA-Pro full (the other modes differ only in the mode string, and train above)."""
  from examples.qwix_gemma import compare

  methods = ("LoRA", "LoRA-Pro full")
  compare.main(["--smoke", "--methods", ",".join(methods)])
  out = capsys.readouterr().out
  for name in methods:
    assert f"{name}: validation loss" in out, out
  assert "| step | LoRA | LoRA-Pro full |" in out and "| 3 |" in out, out
