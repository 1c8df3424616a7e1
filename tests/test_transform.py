"""The optax transformations: full mode (Alg. 3) and efficient mode (Alg. 2)
against the NumPy reference, state layout, batching and grouping, jit, optax
combinators, dtypes and error messages."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorapro_jax as lpj
from tests import reference as ref
from tests.helpers import (
  TINY_DAMPING,
  assert_close,
  pairs_arg,
  quadratic,
  quick_diagonal,
  train_pair,
)

X_CHOICES = ("sylvester", "zero", "symmetric")
LAYOUTS = ("flax", "paper")
# Where the efficient case runs the same test quickly, the full-mode case (its own compile,
# several seconds) is marked slow.
FULL_SLOW = pytest.param("full", marks=pytest.mark.slow)


def _train(tx, A0, B0, full_grad, steps, s, layout):
  """[(A_t, B_t)] and the final state (paper layout)."""
  out = train_pair(tx, A0, B0, full_grad, steps, s, layout)
  return [(A, B) for A, B, _ in out], out[-1][2]


# ------------------------------------------------------------ full mode (Alg. 3)


@pytest.mark.parametrize("layout, x_choice", quick_diagonal(LAYOUTS, X_CHOICES))
def test_full_mode_matches_algorithm_3(x64, layout, x_choice):
  m, n, r, s, lr, steps = 7, 5, 2, 2.0, 1e-2, 5
  rng = np.random.default_rng(1)
  A0, B0 = rng.standard_normal((r, n)), np.zeros((m, r))  # LoRA's initialisation
  fg = quadratic(2, m, n, s)
  want = ref.algorithm3(A0, B0, fg, [lr] * steps, s, x_choice=x_choice)
  tx = optax.chain(
    lpj.lorapro(
      s,
      mode="full",
      x_choice=x_choice,
      damping=TINY_DAMPING,
      moment_dtype=jnp.float64,
      pairs=pairs_arg(layout),
    ),
    optax.scale_by_learning_rate(lr),
  )
  got, state = _train(tx, A0, B0, fg, steps, s, layout)
  for (gA, gB), (wA, wB) in zip(got, want):
    assert_close(gA, wA)
    assert_close(gB, wB)
  assert int(state[0].count) == steps


def _moments64(mode):
  """float64 moments where the mode has moments (efficient mode rejects the option)."""
  return {"moment_dtype": jnp.float64} if mode != "efficient" else {}


def test_full_mode_state_layout_and_dtypes():
  """Pair moments: m×n, laid out like the adapted weight, keyed by the pair's
  path; the other leaves get optax.scale_by_adam's state, masked at pairs."""
  L, n, r, m = 3, 6, 2, 5
  params = {
    "flax": {"lora_a": jnp.zeros((L, n, r)), "lora_b": jnp.zeros((L, r, m))},
    "peft": {"lora_A": jnp.zeros((r, n)), "lora_B": jnp.zeros((m, r))},
    "other": jnp.zeros((4,)),
  }
  state = lpj.lorapro(mode="full", pairs=(lpj.FLAX_NNX, lpj.PEFT)).init(params)
  assert isinstance(state, lpj.ScaleByLoraProState)
  assert set(state.pair_moments) == {"flax", "peft"}
  for mom in state.pair_moments.values():
    assert isinstance(mom, lpj.FullMoments)
  for x in state.pair_moments["flax"]:
    chex.assert_shape(x, (L, n, m))  # (..., in, out) like a kernel
  for x in state.pair_moments["peft"]:
    chex.assert_shape(x, (m, n))  # (out, in) like a torch weight
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.pair_moments))
  adam = state.adam_state.inner_state
  assert isinstance(adam, optax.ScaleByAdamState)
  for mom in (adam.mu, adam.nu):
    assert isinstance(mom["flax"]["lora_a"], optax.MaskedNode)
    assert isinstance(mom["peft"]["lora_B"], optax.MaskedNode)
    chex.assert_shape(mom["other"], (4,))
  half = lpj.lorapro(mode="full", moment_dtype=jnp.bfloat16, pairs=(lpj.FLAX_NNX, lpj.PEFT)).init(
    params
  )
  nbytes = lambda st: sum(x.nbytes for x in jax.tree.leaves(st.pair_moments))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(half.pair_moments))
  assert half.adam_state.inner_state.mu["other"].dtype == jnp.bfloat16
  assert 2 * nbytes(half) == nbytes(state)


@pytest.mark.slow
def test_full_mode_bfloat16_moments_train(rng):
  """Float32 parameters with float32 or bfloat16 moments, four steps from B = 0, against
  Algorithm 3 in float64: the displacement of A and B (A - A0, B) within 1e-4 of its size
  with float32 moments, within 1e-2 (about 2.5 bfloat16 ulps) with bfloat16 ones."""
  m, n, r, s, lr, steps = 7, 5, 2, 2.0, 1e-2, 4
  A0 = rng.standard_normal((r, n)).astype(np.float32).astype(np.float64)
  B0 = np.zeros((m, r))
  fg = quadratic(3, m, n, s)
  wA, wB = ref.algorithm3(A0, B0, fg, [lr] * steps, s)[-1]
  for dt, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)):
    tx = optax.chain(lpj.lorapro(s, mode="full", moment_dtype=dt), optax.scale_by_learning_rate(lr))
    got, state = _train(tx, A0.astype(np.float32), B0.astype(np.float32), fg, steps, s, "flax")
    assert state[0].pair_moments["layer"].mu.dtype == dt
    gA, gB = got[-1]
    for x, w in ((gA - A0, wA - A0), (gB, wB)):
      assert_close(x, w, rtol=tol, atol=0, err_msg=str(dt))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lorapro_adamw_full_weight_decay_matches_eq_57_58(x64, layout):
  m, n, r, s, lam, steps = 7, 5, 2, 1.5, 0.3, 5
  sched = optax.linear_schedule(0.05, 0.01, steps)
  rng = np.random.default_rng(4)
  A0, B0 = rng.standard_normal((r, n)), np.zeros((m, r))
  fg = quadratic(5, m, n, s)
  # optax evaluates the schedule at the int32 count 0, 1, ... (in float32).
  lrs = [float(sched(jnp.asarray(t, jnp.int32))) for t in range(steps)]
  want = ref.algorithm3(A0, B0, fg, lrs, s, weight_decay=lam)
  tx = lpj.lorapro_adamw(
    sched,
    scale=s,
    mode="full",
    weight_decay=lam,
    damping=TINY_DAMPING,
    moment_dtype=jnp.float64,
    pairs=pairs_arg(layout),
  )
  got, _ = _train(tx, A0, B0, fg, steps, s, layout)
  for (gA, gB), (wA, wB) in zip(got, want):
    assert_close(gA, wA)
    assert_close(gB, wB)


def test_lorapro_adamw_full_decay_alone(x64):
  """With zero gradients the full-mode update is pure decay: A, B ← √(1-γλ)·(A, B),
  so s·B·A ← (1-γλ)·s·B·A; other leaves get AdamW's (1-γλ)."""
  rng = np.random.default_rng(6)
  lr, lam = 0.1, 0.5
  params = {
    "layer": {
      "lora_a": jnp.asarray(rng.standard_normal((5, 2))),
      "lora_b": jnp.asarray(rng.standard_normal((2, 7))),
    },
    "w": jnp.asarray(rng.standard_normal((3,))),
  }
  tx = lpj.lorapro_adamw(lr, mode="full", weight_decay=lam)
  zeros = jax.tree.map(jnp.zeros_like, params)
  u, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, u)
  c = np.sqrt(1 - lr * lam)
  assert_close(new["layer"]["lora_a"], c * params["layer"]["lora_a"], rtol=1e-12)
  assert_close(new["layer"]["lora_b"], c * params["layer"]["lora_b"], rtol=1e-12)
  assert_close(
    new["layer"]["lora_a"] @ new["layer"]["lora_b"],
    (1 - lr * lam) * params["layer"]["lora_a"] @ params["layer"]["lora_b"],
    rtol=1e-12,
  )
  assert_close(new["w"], (1 - lr * lam) * params["w"], rtol=1e-12)


def test_full_mode_non_pair_leaves_get_adam(x64):
  rng = np.random.default_rng(7)
  params = {
    "layer": {
      "lora_a": jnp.asarray(rng.standard_normal((5, 2))),
      "lora_b": jnp.asarray(rng.standard_normal((2, 7))),
    },
    "bias": jnp.asarray(rng.standard_normal((7,))),
    "head": jnp.asarray(rng.standard_normal((3, 3))),
  }
  tx = lpj.lorapro(mode="full", b1=0.8, b2=0.95, eps=1e-6, moment_dtype=jnp.float64)
  adam = optax.scale_by_adam(b1=0.8, b2=0.95, eps=1e-6)
  st, st_adam = tx.init(params), adam.init({"bias": params["bias"], "head": params["head"]})
  for _ in range(3):
    g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
    u, st = tx.update(g, st, params)
    ua, st_adam = adam.update({"bias": g["bias"], "head": g["head"]}, st_adam)
    assert_close(u["bias"], ua["bias"], rtol=1e-12)
    assert_close(u["head"], ua["head"], rtol=1e-12)


# ------------------------------------------------------ efficient mode (Alg. 2)


@pytest.mark.parametrize("layout, x_choice", quick_diagonal(LAYOUTS, X_CHOICES))
def test_efficient_mode_with_adamw_matches_algorithm_2(x64, layout, x_choice):
  m, n, r, s, lr, lam, steps = 7, 5, 2, 2.0, 1e-2, 0.1, 4
  rng = np.random.default_rng(8)
  A0, B0 = rng.standard_normal((r, n)), np.zeros((m, r))
  fg = quadratic(9, m, n, s)
  want = ref.algorithm2(A0, B0, fg, [lr] * steps, s, x_choice=x_choice, weight_decay=lam)
  tx = optax.chain(
    lpj.lorapro(s, x_choice=x_choice, damping=TINY_DAMPING, pairs=pairs_arg(layout)),
    optax.adamw(lr, weight_decay=lam),
  )
  got, _ = _train(tx, A0, B0, fg, steps, s, layout)
  for (gA, gB), (wA, wB) in zip(got, want):
    assert_close(gA, wA)
    assert_close(gB, wB)
  # lorapro_adamw(mode="efficient") is the same chain.
  tx2 = lpj.lorapro_adamw(
    lr, scale=s, weight_decay=lam, x_choice=x_choice, damping=TINY_DAMPING, pairs=pairs_arg(layout)
  )
  got2, _ = _train(tx2, A0, B0, fg, steps, s, layout)
  for (gA, gB), (wA, wB) in zip(got2, want):
    assert_close(gA, wA)
    assert_close(gB, wB)


def test_efficient_mode_is_stateless_and_passes_other_leaves_through(rng):
  params = {
    "layer": {
      "lora_a": jnp.asarray(rng.standard_normal((5, 2)), jnp.float32),
      "lora_b": jnp.asarray(rng.standard_normal((2, 7)), jnp.float32),
    },
    "bias": jnp.ones((7,)),
    "emb": jnp.ones((3, 3)),
  }
  g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  tx = lpj.lorapro(2.0)
  st = tx.init(params)
  assert jax.tree.leaves(st) == []
  u, _ = tx.update(g, st, params)
  np.testing.assert_array_equal(u["bias"], g["bias"])
  np.testing.assert_array_equal(u["emb"], g["emb"])
  assert not np.allclose(u["layer"]["lora_a"], g["layer"]["lora_a"])


# -------------------------------------------------- batch axes and grouping


def _ref_pair_update(mode, a, b, ga, gb, s, x_choice="sylvester", steps=1):
  """NumPy reference for one flax-layout pair (slice): the `lorapro` output after
  ``steps`` updates with the same gradients at fixed parameters."""
  A, B, gA, gB = a.T, b.T, ga.T, gb.T
  if mode == "efficient":
    oA, oB = ref.lorapro_gradients(gA, gB, A, B, s, x_choice)
    return oA.T, oB.T
  mom = vel = np.zeros((B.shape[0], A.shape[1]))
  for t in range(1, steps + 1):
    oA, oB, mom, vel = ref.algorithm3_step(gA, gB, A, B, s, mom, vel, t, x_choice)
  return oA.T, oB.T


@pytest.mark.parametrize("mode", ["efficient", "full"])
@pytest.mark.parametrize("batch", [(4,), (2, 2)])  # both flatten to N = 4: shared compiles
def test_stacked_leaves_equal_per_slice(x64, mode, batch):
  n, r, m, s = 5, 2, 7, 1.5
  rng = np.random.default_rng(10)
  a = rng.standard_normal(batch + (n, r))
  b = rng.standard_normal(batch + (r, m))
  b[(0,) * len(batch)] = 0.0  # one slice at LoRA's initialisation
  ga = rng.standard_normal(batch + (n, r))
  gb = rng.standard_normal(batch + (r, m))
  ga[(0,) * len(batch)] = 0.0  # g_lora^A = s·Bᵀg vanishes with B, as autodiff gives it
  # (2, 2) stacks of rank 2 also read as 1 or 0 batch axes: say which.
  spec = lpj.LoRASpec(batch_axes=len(batch))
  tx = lpj.lorapro(s, mode=mode, damping=TINY_DAMPING, pairs=spec, **_moments64(mode))
  params = {"l": {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}}
  grads = {"l": {"lora_a": jnp.asarray(ga), "lora_b": jnp.asarray(gb)}}
  st = tx.init(params)
  u, st = tx.update(grads, st, params)
  u, st = tx.update(grads, st, params)  # a second step exercises the moments
  for idx in np.ndindex(*batch):
    wa, wb = _ref_pair_update(mode, a[idx], b[idx], ga[idx], gb[idx], s, steps=2)
    assert_close(u["l"]["lora_a"][idx], wa)
    assert_close(u["l"]["lora_b"][idx], wb)


def _mixed_tree(rng, dtype=np.float64):
  """Pairs that exercise every grouping path: equal shapes (concatenated), equal
  rank with other shapes (one batched eigh), other ranks, stacked, paper layout."""

  def pair(n, r, m, batch=()):
    return {
      "lora_a": rng.standard_normal(batch + (n, r)).astype(dtype),
      "lora_b": rng.standard_normal(batch + (r, m)).astype(dtype),
    }

  return {
    "p1": pair(5, 2, 7),
    "p2": pair(5, 2, 7),  # same (m, n, r): same group as p1
    "p3": pair(9, 2, 4),  # same rank, other shape: same eigh bucket
    "p4": pair(5, 3, 7),  # other rank
    "p5": pair(5, 2, 7, (3,)),  # stacked, per-slice shape of p1: same group
    "peft": {
      "lora_A": rng.standard_normal((2, 7)).astype(dtype),  # paper layout of p1
      "lora_B": rng.standard_normal((7, 2)).astype(dtype),
    },
    "bias": rng.standard_normal((7,)).astype(dtype),
  }


@pytest.mark.parametrize(
  "mode,x_choice",
  [
    ("efficient", "sylvester"),
    pytest.param("efficient", "zero", marks=pytest.mark.slow),  # X: test_theorems
    pytest.param("efficient", "symmetric", marks=pytest.mark.slow),
    pytest.param("full", "sylvester", marks=pytest.mark.slow),  # about 10 s each
    pytest.param("full", "symmetric", marks=pytest.mark.slow),
  ],
)
def test_mixed_pairs_in_one_tree_equal_reference_per_pair(x64, mode, x_choice):
  rng = np.random.default_rng(11)
  params = _mixed_tree(rng)
  grads = jax.tree.map(lambda p: rng.standard_normal(p.shape), params)
  scale = lambda path, rank: 4.0 / rank
  tx = lpj.lorapro(
    scale,
    mode=mode,
    x_choice=x_choice,
    damping=TINY_DAMPING,
    pairs=(lpj.FLAX_NNX, lpj.PEFT),
    **_moments64(mode),
  )
  jp, jg = jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads)
  u, _ = tx.update(jg, tx.init(jp), jp)
  for key in ("p1", "p2", "p3", "p4", "p5"):
    a, b = params[key]["lora_a"], params[key]["lora_b"]
    ga, gb = grads[key]["lora_a"], grads[key]["lora_b"]
    s = 4.0 / a.shape[-1]
    for idx in np.ndindex(*a.shape[:-2]):
      wa, wb = _ref_pair_update(mode, a[idx], b[idx], ga[idx], gb[idx], s, x_choice)
      assert_close(u[key]["lora_a"][idx], wa)
      assert_close(u[key]["lora_b"][idx], wb)
  P, G = params["peft"], grads["peft"]
  wa, wb = _ref_pair_update(
    mode, P["lora_A"].T, P["lora_B"].T, G["lora_A"].T, G["lora_B"].T, 2.0, x_choice
  )
  assert_close(u["peft"]["lora_A"], wa.T)
  assert_close(u["peft"]["lora_B"], wb.T)
  if mode == "efficient":
    np.testing.assert_array_equal(u["bias"], grads["bias"])
  else:  # Adam's first step: g / (|g| + eps)
    assert_close(u["bias"], grads["bias"] / (np.abs(grads["bias"]) + 1e-8))


# ---------------------------------------------------------------------- jit


@pytest.mark.parametrize("mode", ["efficient", FULL_SLOW])
def test_jit_traces_once_and_needs_no_host_sync(mode, rng):
  tree = _mixed_tree(rng, np.float32)
  # Two pairs of one (m, n, r) in both layouts, concatenated into one group.
  params = jax.tree.map(jnp.asarray, {k: tree[k] for k in ("p1", "peft", "bias")})
  tx = lpj.lorapro_adamw(1e-2, scale=2.0, mode=mode, pairs=(lpj.FLAX_NNX, lpj.PEFT))
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)  # Python side effect: runs only when tracing
    u, state = tx.update(grads, state, params)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  for i in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    grads = jax.device_put(grads)
    if i == 0:
      params, state = step(params, state, grads)
    else:  # no device->host or host->device transfer once compiled
      with jax.transfer_guard("disallow"):
        params, state = step(params, state, grads)
  assert len(traces) == 1
  assert step._cache_size() == 1
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


# --------------------------------------------------------- optax combinators


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_multisteps_accumulates_then_applies_once(x64, mode, rng):
  params = {
    "l": {
      "lora_a": jnp.asarray(rng.standard_normal((5, 2))),
      "lora_b": jnp.asarray(rng.standard_normal((2, 7))),
    },
    "bias": jnp.asarray(rng.standard_normal((7,))),
  }
  g1 = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
  g2 = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
  make = lambda: lpj.lorapro_adamw(
    1e-2, scale=2.0, mode=mode, weight_decay=0.1, moment_dtype=jnp.float64, damping=TINY_DAMPING
  )
  ms = optax.MultiSteps(make(), every_k_schedule=2)
  update = jax.jit(ms.update)  # one compilation for both calls (lax.cond inside)
  st = ms.init(params)
  u1, st = update(g1, st, params)
  chex.assert_trees_all_equal(u1, jax.tree.map(jnp.zeros_like, params))
  u2, st = update(g2, st, params)
  inner = make()
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  want, _ = inner.update(mean, inner.init(params), params)
  chex.assert_trees_all_close(u2, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["efficient", FULL_SLOW])
def test_inject_hyperparams_learning_rate(mode, rng):
  params = {
    "l": {
      "lora_a": jnp.asarray(rng.standard_normal((5, 2)), jnp.float32),
      "lora_b": jnp.asarray(rng.standard_normal((2, 7)), jnp.float32),
    }
  }
  g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  tx = optax.inject_hyperparams(lpj.lorapro_adamw, static_args=("mode",))(
    learning_rate=1e-2, scale=2.0, mode=mode, weight_decay=0.0
  )
  st = tx.init(params)
  assert float(st.hyperparams["learning_rate"]) == pytest.approx(1e-2)
  update = jax.jit(tx.update)
  u, _ = update(g, st, params)
  st.hyperparams["learning_rate"] = jnp.asarray(2e-2)
  u2, _ = update(g, st, params)
  chex.assert_trees_all_close(u2, jax.tree.map(lambda x: 2 * x, u), rtol=1e-5, atol=1e-7)
  plain = lpj.lorapro_adamw(1e-2, scale=2.0, mode=mode, weight_decay=0.0)
  want, _ = plain.update(g, plain.init(params), params)
  chex.assert_trees_all_close(u, want, rtol=1e-4, atol=1e-6)


def _lora_and_rest(rng, dtype=jnp.float32):
  params = {
    "lin": {
      "lora_a": jnp.asarray(rng.standard_normal((5, 2)), dtype),
      "lora_b": jnp.asarray(rng.standard_normal((2, 7)), dtype),
    },
    "bias": jnp.ones((7,), dtype),
    "head": jnp.ones((3, 3), dtype),
  }
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), dtype), params)
  return params, grads


LORA_ONLY = {"lin": {"lora_a": True, "lora_b": True}, "bias": False, "head": False}


def test_masked_efficient_mode(rng):
  params, grads = _lora_and_rest(rng)
  tx = optax.masked(lpj.lorapro(2.0), LORA_ONLY)
  u, _ = tx.update(grads, tx.init(params), params)
  want = lpj.lorapro(2.0).update(grads["lin"], (), params["lin"])[0]
  chex.assert_trees_all_close(u["lin"], want)
  chex.assert_trees_all_equal(u["bias"], grads["bias"])
  chex.assert_trees_all_equal(u["head"], grads["head"])


def test_masked_full_mode(rng):
  """optax.masked puts MaskedNode placeholders in params, updates and state; the
  full mode must treat them like absent leaves."""
  params, grads = _lora_and_rest(rng)
  tx = optax.masked(lpj.lorapro(2.0, mode="full"), LORA_ONLY)
  st = tx.init(params)
  u, st = tx.update(grads, st, params)
  alone = lpj.lorapro(2.0, mode="full")
  want, _ = alone.update(grads["lin"], alone.init(params["lin"]), params["lin"])
  chex.assert_trees_all_close(u["lin"], want)
  chex.assert_trees_all_equal(u["bias"], grads["bias"])


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_mask_that_splits_a_pair_raises(mode, rng):
  params, grads = _lora_and_rest(rng)
  split = {"lin": {"lora_a": True, "lora_b": False}, "bias": False, "head": False}
  tx = optax.masked(lpj.lorapro(2.0, mode=mode), split)
  with pytest.raises(ValueError, match=r"lin/lora_a \(5, 2\) has no partner lin/lora_b"):
    st = tx.init(params)
    tx.update(grads, st, params)
  if mode == "full":  # the decay mask of Eq. (57)-(58) must not split a pair either
    with pytest.raises(ValueError, match=r"lin/lora_b \(2, 7\) has no partner lin/lora_a"):
      tx = lpj.lorapro_adamw(
        1e-2, mode=mode, mask={"lin": {"lora_a": False, "lora_b": True}, "bias": True, "head": True}
      )
      st = tx.init(params)
      tx.update(grads, st, params)


def test_lorapro_adamw_weight_decay_mask(x64, rng):
  """A mask that exempts non-LoRA leaves from decay (both modes)."""
  params, _ = _lora_and_rest(rng, jnp.float64)
  zeros = jax.tree.map(jnp.zeros_like, params)
  mask = {"lin": {"lora_a": True, "lora_b": True}, "bias": False, "head": False}
  for mode in ("efficient", "full"):
    tx = lpj.lorapro_adamw(0.1, mode=mode, weight_decay=0.5, mask=mask)
    u, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_array_equal(u["bias"], 0.0)
    np.testing.assert_array_equal(u["head"], 0.0)
    assert np.all(np.abs(np.asarray(u["lin"]["lora_a"])) > 0)


# ----------------------------------------------------------------- dtypes


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_bfloat16_params_and_grads(mode, rng):
  params, grads = _lora_and_rest(rng, jnp.float32)
  bf = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16), t)
  tx = lpj.lorapro_adamw(1e-2, scale=2.0, mode=mode)
  u16, _ = tx.update(bf(grads), tx.init(bf(params)), bf(params))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u16))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u16))
  u32, _ = tx.update(
    bf(grads),
    tx.init(params),
    jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params),
  )
  chex.assert_trees_all_close(
    jax.tree.map(lambda x: x.astype(jnp.float32), u16),
    jax.tree.map(lambda x: x.astype(jnp.float32), u32),
    rtol=0.05,
    atol=2e-3,
  )


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_float64_in_float64_out(x64, mode, rng):
  params, grads = _lora_and_rest(rng, jnp.float64)
  tx = lpj.lorapro_adamw(1e-2, scale=2.0, mode=mode)
  u, _ = tx.update(grads, tx.init(params), params)
  assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(u))


# ----------------------------------------------------------------- errors


def test_update_without_params_raises():
  params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}
  for mode in ("efficient", "full"):
    tx = lpj.lorapro(mode=mode)
    with pytest.raises(ValueError, match="needs the current parameters"):
      tx.update(params, tx.init(params))
  tx = lpj.lorapro_adamw(1e-2, mode="full")
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_lone_leaf_raises_with_path_and_shape(mode):
  params = {"enc": {"q": {"lora_a": jnp.ones((4, 2))}, "v": {"lora_b": jnp.ones((2, 3))}}}
  tx = lpj.lorapro(mode=mode)
  with pytest.raises(ValueError, match=r"enc/q/lora_a \(4, 2\) has no partner enc/q/lora_b"):
    tx.update(params, tx.init(params), params)


def test_mismatched_ranks_raise():
  params = {"l": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((3, 5))}}
  with pytest.raises(
    ValueError, match=r"A=l/lora_a \(4, 2\), B=l/lora_b \(3, 5\).*ranks differ \(2 vs 3\)"
  ):
    lpj.lorapro().update(params, (), params)
  peft = {"l": {"lora_A": jnp.ones((2, 4)), "lora_B": jnp.ones((5, 3))}}
  with pytest.raises(ValueError, match=r"l/lora_A \(2, 4\).*layout 'paper'.*ranks differ"):
    lpj.lorapro(pairs=lpj.PEFT).update(peft, (), peft)


def test_mismatched_batch_axes_raise():
  # (3, 4, 2) with (2, 2, 5) is a pair with in (3, 4) and out (2, 5); these fit no reading.
  params = {"l": {"lora_a": jnp.ones((3, 4, 2)), "lora_b": jnp.ones((5, 2, 5))}}
  with pytest.raises(ValueError, match=r"l/lora_a \(3, 4, 2\), B=l/lora_b \(5, 2, 5\).*batch"):
    lpj.lorapro().update(params, (), params)
  params = {"l": {"lora_a": jnp.ones((3, 4, 2)), "lora_b": jnp.ones((3, 5))}}
  with pytest.raises(ValueError, match=r"l/lora_a \(3, 4, 2\).*batch"):
    lpj.lorapro(mode="full").init(params)


def test_one_dimensional_leaf_raises():
  params = {"l": {"lora_a": jnp.ones((4,)), "lora_b": jnp.ones((2, 5))}}
  with pytest.raises(ValueError, match=r"l/lora_a \(4,\).*at least 2 dimensions"):
    lpj.lorapro().update(params, (), params)


def test_bad_options_raise():
  with pytest.raises(
    ValueError, match=r"mode must be one of \('efficient', 'full', 'factored'\), got 'fast'"
  ):
    lpj.lorapro(mode="fast")
  with pytest.raises(ValueError, match=r"x_choice must be one of .*got 'eig'"):
    lpj.lorapro(x_choice="eig")
  with pytest.raises(ValueError, match="mode"):
    lpj.lorapro_adamw(1e-3, mode="fast")
  with pytest.raises(ValueError, match="x_choice"):
    lpj.lorapro_adamw(1e-3, x_choice="eig")
  with pytest.raises(ValueError, match="damping must be positive"):
    lpj.lorapro(damping=0.0)
  with pytest.raises(ValueError, match="eps must be positive"):
    lpj.lorapro(mode="full", eps=0.0)


@pytest.mark.parametrize(
  "option", [{"b1": 0.9}, {"b2": 0.99}, {"eps": 1e-8}, {"moment_dtype": jnp.bfloat16}]
)
def test_efficient_mode_rejects_moment_options(option):
  """Efficient mode keeps no moments: an option it would ignore raises, naming it."""
  with pytest.raises(ValueError, match=f"keeps no moments, so {next(iter(option))} would"):
    lpj.lorapro(mode="efficient", **option)
  lpj.lorapro(mode="full", **option)  # where it is used, it is accepted


def test_lorapro_adamw_efficient_moment_dtype_is_adamw_mu_dtype():
  params = {"l": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}}
  state = lpj.lorapro_adamw(1e-3, moment_dtype=jnp.bfloat16).init(params)
  adam = state[1][0]
  assert isinstance(adam, optax.ScaleByAdamState)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(adam.mu))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(adam.nu))


@pytest.mark.parametrize("mode", ["efficient", FULL_SLOW])
def test_weight_decay_schedule(mode):
  """weight_decay may be a schedule, as in optax: a schedule that is constant
  gives exactly the updates of that constant."""
  rng = np.random.default_rng(3)
  params = {
    "l": {"lora_a": jnp.asarray(rng.standard_normal((4, 2))), "lora_b": jnp.ones((2, 3))},
    "bias": jnp.ones((3,)),
  }
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  const = lpj.lorapro_adamw(1e-2, mode=mode, weight_decay=0.3)
  sched = lpj.lorapro_adamw(1e-2, mode=mode, weight_decay=optax.constant_schedule(0.3))
  zero = lpj.lorapro_adamw(1e-2, mode=mode, weight_decay=optax.linear_schedule(0.3, 0.0, 1))
  run = lambda tx, k: _steps(tx, params, grads, k)
  jax.tree.map(np.testing.assert_array_equal, run(const, 2), run(sched, 2))
  # A schedule is read at each step: decayed to 0 after one step, the second
  # step of the linear schedule differs from the constant's.
  assert not np.allclose(run(zero, 2)["bias"], run(const, 2)["bias"])


def _steps(tx, params, grads, k):
  state = tx.init(params)
  for _ in range(k):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_pairs_callable_with_nonexistent_path_raises():
  params = {"l": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}
  bad = lambda p: [lpj.LoRAPair(("l", "a"), ("l", "nope"))]
  with pytest.raises(ValueError, match=r"returned l/nope, which is not a leaf"):
    lpj.lorapro(pairs=bad).update(params, (), params)


def test_updates_with_other_structure_raise():
  params = {"l": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}}
  updates = {"l": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((3, 2))}}
  with pytest.raises(ValueError, match=r"l/lora_b has shape \(3, 2\).*\(2, 3\)"):
    lpj.lorapro().update(updates, (), params)
