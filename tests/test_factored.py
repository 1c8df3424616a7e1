"""Factored mode (`lorapro(mode="factored")`) against the dense float64 reference.

The reference (`reference.factored`) runs the same algorithm with m×n arrays:
the first moment re-projected onto the current span, Adafactor's V̂ = R̂·Ĉᵀ/mean(R̂)
from dense row and column means of g̃². The library never forms an m×n array.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorapro_jax as lpj
from lorapro_jax import batched
from lorapro_jax import factored as factored_lib
from tests import reference as ref
from tests.helpers import (
  LAYOUTS,
  TINY_DAMPING,
  assert_close,
  get_pair,
  pair_tree,
  pairs_arg,
  quadratic,
  train_pair,
)

M, N, R, S, LR = 7, 5, 2, 2.0, 1e-2
# A factored update compiles for 5 to 20 s: those cases of the heavier tests are marked slow.
FACTORED_SLOW = pytest.param("factored", marks=pytest.mark.slow)


def _tx(layout, x_choice="sylvester", **kw):
  return optax.chain(
    lpj.lorapro(
      S,
      mode="factored",
      x_choice=x_choice,
      damping=TINY_DAMPING,
      moment_dtype=jnp.float64,
      pairs=pairs_arg(layout),
      **kw,
    ),
    optax.scale_by_learning_rate(LR),
  )


def _paper(x, layout):
  return np.asarray(x) if layout == "paper" else np.swapaxes(np.asarray(x), -1, -2)


def _stored_momentum(moments, layout):
  """M = s·B_prev·N_A + s·N_B·A_prev from the state (paper layout, float64)."""
  A_p, B_p = _paper(moments.a_prev, layout), _paper(moments.b_prev, layout)
  N_A, N_B = _paper(moments.m_a, layout), _paper(moments.m_b, layout)
  return S * B_p @ N_A + S * N_B @ A_p


# Each layout and each X once: the layout enters only the products with A and B, X only the
# r×r algebra, so the other two combinations run no other code (and compile for seconds).
@pytest.mark.parametrize(
  "layout, x_choice",
  [("flax", "sylvester"), ("paper", "symmetric")],
)
def test_matches_the_dense_reference_and_its_momentum(x64, layout, x_choice):
  """Five steps from LoRA's initialisation (B = 0): factors, the stored
  momentum re-expressed as an m×n matrix, and the factored second moment
  all equal the dense reference, which projects M onto the span each step."""
  rng = np.random.default_rng(1)
  A0, B0 = rng.standard_normal((R, N)), np.zeros((M, R))
  fg = quadratic(2, M, N, S)
  want = ref.factored(A0, B0, fg, [LR] * 5, S, x_choice=x_choice)
  got = train_pair(_tx(layout, x_choice), A0, B0, fg, 5, S, layout)
  for (gA, gB, state), (wA, wB, wM, wR, wC) in zip(got, want):
    assert_close(gA, wA, atol=0)
    assert_close(gB, wB, atol=0)
    moments = state[0].pair_moments["layer"]
    assert isinstance(moments, lpj.FactoredMoments)
    assert_close(_stored_momentum(moments, layout), wM, atol=0)
    assert_close(moments.row, wR, atol=0)
    assert_close(moments.col, wC, atol=0)


@pytest.mark.slow
def test_b1_zero_is_algorithm_3_with_adafactors_second_moment(x64):
  """β1 = 0 keeps no first moment (half the state): each step's direction is
  g̃ ⊘ √V̂ with Adafactor's V̂, then Eq. (56) and Theorem 2.1."""
  rng = np.random.default_rng(3)
  A0, B0 = rng.standard_normal((R, N)), 0.3 * rng.standard_normal((M, R))
  fg = quadratic(4, M, N, S)
  want = ref.factored(A0, B0, fg, [LR] * 4, S, b1=0.0)
  got = train_pair(_tx("flax", b1=0.0), A0, B0, fg, 4, S, "flax")
  for (gA, gB, state), (wA, wB, _, wR, wC) in zip(got, want):
    assert_close(gA, wA, atol=0)
    assert_close(gB, wB, atol=0)
    moments = state[0].pair_moments["layer"]
    assert isinstance(moments, lpj.FactoredSecondMoment)
    assert_close(moments.row, wR, atol=0)
    assert_close(moments.col, wC, atol=0)


@pytest.mark.slow
def test_outer_product_second_moment_gives_algorithm_3(x64):
  """Where g̃² is exactly an outer product (r = 1 and B = 0: g̃ = s·g^B·A is
  rank one), Adafactor's V̂ is exact, so the first step equals Algorithm 3's
  with its dense Adam moments (ε negligible in both)."""
  rng = np.random.default_rng(5)
  A0, B0 = rng.standard_normal((1, N)), np.zeros((M, 1))
  fg = quadratic(6, M, N, S)
  want = ref.algorithm3(A0, B0, fg, [LR], S, eps=1e-14)
  [(gA, gB, _)] = train_pair(_tx("paper", eps=1e-14), A0, B0, fg, 1, S, "paper")
  assert_close(gA, want[0][0], rtol=1e-9, atol=0)
  assert_close(gB, want[0][1], rtol=1e-9, atol=0)


def test_dense_reference_differs_from_algorithm_3_in_general(x64):
  """The checks above are not vacuous: with rank-2 g̃ the factored V̂ is not
  Adam's, and the trajectories differ."""
  rng = np.random.default_rng(1)
  A0, B0 = rng.standard_normal((R, N)), np.zeros((M, R))
  fg = quadratic(2, M, N, S)
  dense = ref.algorithm3(A0, B0, fg, [LR] * 3, S)[-1]
  factored = ref.factored(A0, B0, fg, [LR] * 3, S)[-1]
  assert np.max(np.abs(dense[1] - factored[1])) > 1e-3 * np.max(np.abs(dense[1]))


def test_row_and_column_sums_of_squares_from_factors(x64):
  rng = np.random.default_rng(7)
  us = [rng.standard_normal((M, R)) for _ in range(2)]
  vs = [rng.standard_normal((R, N)) for _ in range(2)]
  dense = sum(u @ v for u, v in zip(us, vs))
  for layout in LAYOUTS:
    flax = layout == "flax"
    L = factored_lib.LowRank(
      tuple(jnp.asarray((u.T if flax else u)[None]) for u in us),
      tuple(jnp.asarray((v.T if flax else v)[None]) for v in vs),
    )
    assert_close(factored_lib.row_sq(layout, L)[0], np.sum(dense**2, axis=1), rtol=1e-12, atol=0)
    assert_close(factored_lib.col_sq(layout, L)[0], np.sum(dense**2, axis=0), rtol=1e-12, atol=0)


def test_state_is_lora_sized():
  """State: A- and B-sized first-moment factors and previous factors, an m-
  and an n-vector: AdamW-on-LoRA's size plus (m + n); none m×n."""
  params = {"l": {"lora_a": jnp.zeros((3, 40, 4)), "lora_b": jnp.zeros((3, 4, 30))}}
  state = lpj.lorapro(mode="factored").init(params)
  moments = state.pair_moments["l"]
  shapes = {k: v.shape for k, v in moments._asdict().items()}
  assert shapes == {
    "m_a": (3, 40, 4),
    "m_b": (3, 4, 30),
    "a_prev": (3, 40, 4),
    "b_prev": (3, 4, 30),
    "row": (3, 30),
    "col": (3, 40),
  }
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree) if x.ndim)  # no counts
  adamw = optax.adamw(1e-3).init(params)
  assert nbytes(state.pair_moments) == nbytes(adamw) + 4 * 3 * (30 + 40)
  half = lpj.lorapro(mode="factored", b1=0.0).init(params)
  assert nbytes(half.pair_moments) == 4 * 3 * (30 + 40)


# Llama-2-7B shapes: attention (4096 → 4096) and MLP (4096 → 11008), r = 8.
LLAMA = {"q": (4096, 4096), "up": (4096, 11008), "down": (11008, 4096)}


def _llama_params(r=8):
  return {
    k: {
      "lora_a": jax.ShapeDtypeStruct((n, r), jnp.float32),
      "lora_b": jax.ShapeDtypeStruct((r, m), jnp.float32),
    }
    for k, (n, m) in LLAMA.items()
  }


def _largest_array(hlo: str) -> int:
  sizes = [
    int(np.prod([int(d) for d in dims.split("x") if d])) if dims else 1
    for dims in re.findall(r"tensor<((?:\d+x)*)(?:f|bf|i|ui)\d+>", hlo)
  ]
  return max(sizes)


@pytest.mark.parametrize("mode", ["factored", "full"])
def test_no_m_by_n_array_at_llama_shapes(mode):
  """The jitted update, lowered abstractly at Llama-2-7B shapes (nothing is
  allocated): no array in factored mode holds m·n elements, not even an
  intermediate; the largest is a side's stack of its four LoRA-sized arrays
  (e.g. [B, g_B, B_prev, N_B], 4·r·m). Full mode, which keeps m×n moments,
  shows that the check can fail."""
  params = _llama_params()
  tx = lpj.lorapro_adamw(1e-4, mode=mode, scale=2.0)
  state = jax.eval_shape(tx.init, params)
  hlo = jax.jit(tx.update).lower(params, state, params).as_text()
  smallest_weight = min(m * n for m, n in LLAMA.values())
  if mode == "factored":
    largest_lora = 8 * max(max(shape) for shape in LLAMA.values())
    assert _largest_array(hlo) <= 4 * largest_lora < smallest_weight // 32
  else:
    assert _largest_array(hlo) >= smallest_weight


@pytest.mark.slow
def test_bfloat16_params_and_state_follow_the_reference(rng):
  """bfloat16 parameters, gradients and moments: four steps stay within
  bfloat16 tolerance of the float64 reference run from the same values."""
  A0 = rng.standard_normal((R, N)).astype(jnp.bfloat16).astype(np.float64)
  B0 = np.zeros((M, R))
  fg = quadratic(8, M, N, S)
  want = ref.factored(A0, B0, fg, [LR] * 4, S)
  tx = optax.chain(
    lpj.lorapro(S, mode="factored", moment_dtype=jnp.bfloat16), optax.scale_by_learning_rate(LR)
  )
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), pair_tree(A0, B0, "flax"))
  state = tx.init(params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state[0].pair_moments))
  for t, (wA, wB, *_) in enumerate(want, start=1):
    A, B = get_pair(params, "flax")
    gA, gB = ref.lora_gradients(fg(t, A, B), A, B, S)
    grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), pair_tree(gA, gB, "flax"))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    got_A, got_B = get_pair(params, "flax")
    assert params["layer"]["lora_a"].dtype == jnp.bfloat16
    # The steps are lr-sized against O(1) factors: compare the moves, not A itself.
    assert_close(got_A - A0, wA - A0, rtol=0.05, atol=0)
    assert_close(got_B, wB, rtol=0.05, atol=0)


def _layers(rng, n_layers, dtype=np.float64):
  """``n_layers`` blocks of two kinds of pairs (q: 7×5, mlp: 9×5 with a batch axis),
  flax layout, and gradients."""
  f = lambda *s: rng.standard_normal(s).astype(dtype)
  params = {
    "layers": {
      str(i): {
        "q": {"lora_a": f(5, R), "lora_b": f(R, 7)},
        "mlp": {"lora_a": f(3, 5, R), "lora_b": f(3, R, 9)},
      }
      for i in range(n_layers)
    },
    "head": f(4),
  }
  return params, jax.tree.map(lambda p: f(*p.shape), params)


@pytest.mark.slow
def test_pairs_of_one_kind_are_processed_together_and_apart_alike(x64, rng):
  """Every layer's q (and mlp) pairs are concatenated for the factored step
  (`batched.stack_groups`): three steps of a 3-block tree equal each pair's steps in
  a tree of its own, so nothing is mixed up between the pairs of a group."""
  params, grads = _layers(rng, 3)
  tx = lpj.lorapro(S, mode="factored", damping=TINY_DAMPING)
  state, p = tx.init(params), params
  for t in range(3):
    g = jax.tree.map(lambda x, c=1 + t: x * c, grads)
    out, state = jax.jit(tx.update)(g, state, p)
    p = optax.apply_updates(p, jax.tree.map(lambda u: -LR * u, out))
  for i in range(3):
    for kind in ("q", "mlp"):
      alone = {kind: params["layers"][str(i)][kind]}
      grads_alone = {kind: grads["layers"][str(i)][kind]}
      s, q = tx.init(alone), alone
      for t in range(3):
        g = jax.tree.map(lambda x, c=1 + t: x * c, grads_alone)
        o, s = jax.jit(tx.update)(g, s, q)
        q = optax.apply_updates(q, jax.tree.map(lambda u: -LR * u, o))
      for leaf in ("lora_a", "lora_b"):
        assert_close(p["layers"][str(i)][kind][leaf], q[kind][leaf], rtol=1e-12, atol=0)
      for got, want in zip(state.pair_moments[f"layers/{i}/{kind}"], s.pair_moments[kind]):
        assert_close(got, want, rtol=1e-12, atol=0)


def test_compiled_program_does_not_grow_with_the_number_of_blocks(rng):
  """The factored update is traced once per kind of pair: 8 blocks lower to a program
  hardly larger than 2 blocks' (per pair only the concatenation and the slices back);
  traced per pair it was 4× as large, and compile time grew with it."""
  tx = lpj.lorapro(S, mode="factored")

  def size(n_layers):
    params, grads = _layers(rng, n_layers, np.float32)
    text = jax.jit(tx.update).lower(grads, tx.init(params), params).as_text()
    return len(re.findall(r"^\s*%\S+ = ", text, re.M))

  small, large = size(2), size(8)
  assert large < 1.5 * small, (small, large)


def _eighs_are_ordered(hlo: str) -> tuple[int, bool]:
  """(number of eigh custom calls, whether every two in one computation depend on each
  other) in compiled HLO text."""
  comps: dict = {}
  current = None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?(%[\w.\-]+) .*\{\s*$", line)
    if head:
      current = comps.setdefault(head.group(1), {})
      continue
    node = re.match(r"^\s*(?:ROOT )?(%[\w.\-]+) = .*?\((.*)$", line)
    if node and current is not None:
      current[node.group(1)] = (set(re.findall(r"%[\w.\-]+", node.group(2))), "ssyevd" in line)
  count, ordered = 0, True
  for graph in comps.values():
    eighs = [n for n, (_, is_eigh) in graph.items() if is_eigh]
    count += len(eighs)

    def ancestors(n, graph=graph):
      seen, todo = set(), [n]
      while todo:
        for d in graph[todo.pop()][0]:
          if d in graph and d not in seen:
            seen.add(d)
            todo.append(d)
      return seen

    anc = {e: ancestors(e) for e in eighs}
    for i, a in enumerate(eighs):
      for b in eighs[i + 1 :]:
        ordered &= a in anc[b] or b in anc[a]
  return count, ordered


@pytest.mark.parametrize(
  "mode", ["efficient", pytest.param("full", marks=pytest.mark.slow), FACTORED_SLOW]
)
def test_batched_eighs_of_one_step_run_one_after_another(mode):
  """No two batched eighs of one update may run at the same time: jaxlib's CPU eigh
  waits for chunks it queues on XLA's intra-op pool, and two at once deadlocked a
  2-thread pool (the factored train step at Llama-2-7B r = 32 hung on a 2-core CPU).
  Two ranks make two eighs per `adjust`; full and factored mode call it twice."""
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  params = {
    "a": {"lora_a": f(12, 4), "lora_b": f(4, 9)},
    "b": {"lora_a": f(12, 2), "lora_b": f(2, 9)},
  }
  tx = lpj.lorapro(S, mode=mode)
  hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
  count, ordered = _eighs_are_ordered(hlo)
  assert count >= 2 and ordered, count


@functools.cache
def _shared_update(mode, layout, in_record_paths):
  """``lorapro(S, mode=mode)`` for ``layout``'s pairs and its jitted update, one per
  argument: the tests below step float32 (N, R) and (R, M) pairs with it, and share its
  compilation (a factored step compiles for seconds). The update is traced at its first
  call, with the path log compiled in only inside `batched.record_paths`: ``in_record_paths``
  says where it is called, so that the two kinds of call never share a trace."""
  tx = lpj.lorapro(S, mode=mode, pairs=pairs_arg(layout))
  return tx, jax.jit(tx.update)


def _stepped_pair(rng, layout, steps, dtype=jnp.float32):
  """A factored-mode pair after ``steps`` ordinary steps: (LeafPair, moments, Hyper)."""
  A0, B0 = rng.standard_normal((R, N)), rng.standard_normal((M, R))
  fg = quadratic(5, M, N, S)
  tx, update = _shared_update("factored", layout, in_record_paths=False)
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), pair_tree(A0, B0, layout))
  state = tx.init(params)
  grads = None
  for t in range(steps + 1):
    A, B = get_pair(params, layout)
    g = fg(t, A, B)
    grads = jax.tree.map(
      lambda x: jnp.asarray(x, dtype), pair_tree(S * B.T @ g, S * g @ A.T, layout)
    )
    grads = {"layer": {k: grads["layer"][k] for k in params["layer"]}}
    if t < steps:
      u, state = update(grads, state, params)
      params = jax.tree.map(lambda p, x: p - 1e-2 * x, params, u)
  index = lpj.pairs.PairIndex.build(params, pairs_arg(layout))
  (pair,) = index.leaf_pairs(jax.tree.leaves(params), jax.tree.leaves(grads), S)
  moments = index.flatten_moments(state.pair_moments["layer"], 0)
  count = jnp.asarray(steps + 1, jnp.int32)
  return pair, moments, batched.Hyper(0.9, 0.999, 1e-8, count)


@pytest.mark.slow
@pytest.mark.parametrize(
  "layout, x_choice", [("flax", "sylvester"), ("paper", "symmetric"), ("flax", "zero")]
)
def test_raw_and_normalised_paths_agree(layout, x_choice):
  """The raw path (Gram matrices of the stacked sides) and the normalised one (stage by
  stage on normalised arrays) compute the same step, compiled, after three steps."""
  pair, m, h = _stepped_pair(np.random.default_rng(7), layout, 3)

  @jax.jit
  def both(pair, m, h):
    ok, (sides, ds, ups, firsts, vs), _ = factored_lib._raw_plan(
      [pair], [m], h, x_choice, TINY_DAMPING, batched.EighOrder()
    )
    raw = factored_lib._outputs(pair, sides[0], ds[0], ups[0], firsts[0], vs[0], m)
    normalised = factored_lib._normalised(pair, m, h, x_choice, TINY_DAMPING, batched.EighOrder())
    return ok, raw, normalised

  ok, raw, normalised = both(pair, m, h)
  assert bool(ok), "ordinary inputs must take the raw path"
  for got, want in zip(jax.tree.leaves(raw), jax.tree.leaves(normalised), strict=True):
    assert_close(got, want, rtol=2e-4, atol=0)


@pytest.mark.parametrize("mode", [FACTORED_SLOW, "full"])
def test_raw_path_after_the_first_step(mode):
  """Compiled: the first two factored steps (B = 0 and zero moments, then B_prev = 0) take
  the normalised path; every later step of ordinary training takes the raw one."""
  rng = np.random.default_rng(2)
  params = {"layer": {"lora_a": jnp.asarray(rng.standard_normal((N, R)), jnp.float32)}}
  params["layer"]["lora_b"] = jnp.zeros((R, M), jnp.float32)
  fg = quadratic(3, M, N, S)
  tx, update = _shared_update(mode, "flax", in_record_paths=True)
  state, logs = tx.init(params), []
  for t in range(4):
    A, B = get_pair(params, "flax")
    g = fg(t, A, B)
    grads = {"layer": {"lora_a": jnp.asarray((S * B.T @ g).T, jnp.float32)}}
    grads["layer"]["lora_b"] = jnp.asarray((S * g @ A.T).T, jnp.float32)
    with batched.record_paths() as log:
      u, state = update(grads, state, params)
      jax.block_until_ready(u)
    logs.append(list(log))
    params = jax.tree.map(lambda p, x: p - 1e-2 * x, params, u)
  if mode == "factored":
    assert logs[0][0] is False and logs[1][0] is False  # the group's own choice comes first
    assert all(log == [True] for log in logs[2:]), logs
  else:  # adjust (X = 0), the pair's moments, adjust (chosen X)
    assert all(log[1:] == [True, True] for log in logs[1:]), logs


@pytest.mark.slow
def test_extreme_factor_scales_take_the_normalised_path_and_stay_finite():
  """Factors at 1e-30 and 1e30 overflow or underflow the raw Gram products: the
  normalised path runs and every output and moment stays finite."""
  rng = np.random.default_rng(4)
  for a_scale, b_scale in ((1e-30, 1.0), (1e25, 1e-25), (1.0, 1e30)):
    params = {
      "layer": {
        "lora_a": jnp.asarray(a_scale * rng.standard_normal((N, R)), jnp.float32),
        "lora_b": jnp.asarray(b_scale * rng.standard_normal((R, M)), jnp.float32),
      }
    }
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    tx, update = _shared_update("factored", "flax", in_record_paths=True)
    state = tx.init(params)
    for _ in range(2):
      with batched.record_paths() as log:
        u, state = update(grads, state, params)
        jax.block_until_ready(u)
      assert log[0] is False, (a_scale, b_scale)
      for x in jax.tree.leaves((u, state)):
        assert np.all(np.isfinite(np.asarray(x, np.float64))), (a_scale, b_scale)
