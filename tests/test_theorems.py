"""The paper's theorems, checked on `lorapro`'s output against NumPy (float64).

Theorem 2.1 (optimal equivalent gradient), Theorem 2.2 (descent), Theorem 2.3
(Sylvester X), the corrected Eq. (16), the B = 0 first step, and finiteness on
degenerate and extreme factors.
"""

from __future__ import annotations

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorapro_jax as lpj
from tests import reference as ref
from tests.helpers import assert_close, pair_tree, pairs_arg, random_pair, run_lorapro

X_CHOICES = ("sylvester", "zero", "symmetric")
LAYOUTS = ("flax", "paper")
# (m, n, r, s): tall, wide, square with rank close to min(m, n), rank 1. Few
# distinct shapes keep the suite fast: eager JAX compiles every op once per shape.
SHAPES = [(7, 5, 2, 1.7), (5, 9, 3, 0.5), (10, 10, 8, 1.0), (12, 6, 1, 4.0)]


def _problem(seed, m, n, r, s):
  rng = np.random.default_rng(seed)
  A, B, g = random_pair(rng, m, n, r)
  gA, gB = ref.lora_gradients(g, A, B, s)
  return A, B, g, gA, gB


# ----------------------------------------------------------------- Theorem 2.1


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("x_choice", X_CHOICES)
@pytest.mark.parametrize("m,n,r,s", SHAPES)
def test_theorem_2_1_equivalent_gradient_is_projection(x64, layout, x_choice, m, n, r, s):
  A, B, g, gA, gB = _problem(m * n + r, m, n, r, s)
  oA, oB = run_lorapro(A, B, gA, gB, s, layout, x_choice=x_choice)
  assert oA.dtype == np.float64 and oB.dtype == np.float64
  g_tilde = ref.equivalent_gradient(oA, oB, A, B, s)
  assert_close(g_tilde, ref.projected_gradient(g, A, B))
  # ... and (g^A, g^B) themselves are the reference's, for this X.
  rA, rB = ref.lorapro_gradients(gA, gB, A, B, s, x_choice)
  assert_close(oA, rA)
  assert_close(oB, rB)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m,n,r,s", [(7, 5, 2, 1.3), (5, 9, 3, 0.8)])
def test_theorem_2_1_matches_brute_force_least_squares(x64, layout, m, n, r, s):
  """min over all (g^A, g^B) of ‖s·B·g^A + s·g^B·A - g‖ by lstsq on the vec form."""
  A, B, g, gA, gB = _problem(1, m, n, r, s)
  oA, oB = run_lorapro(A, B, gA, gB, s, layout)
  g_tilde = ref.equivalent_gradient(oA, oB, A, B, s)
  best = ref.lstsq_equivalent_gradient(g, A, B, s)
  assert_close(g_tilde, best)
  # The projection formula is indeed the least-squares optimum.
  assert_close(ref.projected_gradient(g, A, B), best)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_theorem_2_1_perturbations_increase_distance(x64, layout):
  """Only the equivalent gradient enters, which X does not change (checked last), so
  one x_choice suffices."""
  m, n, r, s = 7, 5, 2, 1.5
  A, B, g, gA, gB = _problem(2, m, n, r, s)
  oA, oB = run_lorapro(A, B, gA, gB, s, layout)
  dist = lambda a, b: np.linalg.norm(ref.equivalent_gradient(a, b, A, B, s) - g)
  d0 = dist(oA, oB)
  # Plain LoRA gradients are strictly worse.
  assert dist(gA, gB) > d0
  rng = np.random.default_rng(3)
  for eps in (1e-3, 1e-1, 1.0):
    for _ in range(5):
      pA, pB = rng.standard_normal(oA.shape), rng.standard_normal(oB.shape)
      assert dist(oA + eps * pA, oB + eps * pB) >= d0 * (1 - 1e-12)
      assert dist(oA + eps * pA, oB) >= d0 * (1 - 1e-12)
      assert dist(oA, oB + eps * pB) >= d0 * (1 - 1e-12)
  # Perturbing along (X·A, -B·X) leaves the equivalent gradient unchanged:
  # that is the free r×r matrix X of Theorem 2.1.
  X = rng.standard_normal((r, r))
  assert_close(
    ref.equivalent_gradient(oA + X @ A, oB - B @ X, A, B, s),
    ref.equivalent_gradient(oA, oB, A, B, s),
  )


# ----------------------------------------------------------------- damping


# Compiled in both layouts on shapes the tests above compile anyway; op by op
# (jax.disable_jit) in the flax layout; r > min(m, n), where both Gram matrices are
# singular and only the damping makes the inverses exist, compiled in the flax layout.
_DAMPING_CASES = [
  (shape, layout, compiled)
  for shape in SHAPES[:2]
  for layout, compiled in (("flax", True), ("paper", True), ("flax", False))
] + [((4, 3, 5, 1.5), "flax", True)]


@pytest.mark.parametrize("x_choice", X_CHOICES)
@pytest.mark.parametrize("shape,layout,compiled", _DAMPING_CASES)
def test_damping_is_relative_to_the_mean_eigenvalue(x64, x_choice, shape, layout, compiled):
  """With a large δ = 0.1 the damped Gram matrices G + δ·(tr G / r)·I (both of them, in
  the inverses and in Eq. 15) are what the output depends on: the reference builds them
  explicitly (`reference.damped_lorapro_gradients`). Damping by δ·tr G, or only one of the
  two Gram matrices, changes the result by far more than the tolerance."""
  m, n, r, s = shape
  delta = 0.1
  A, B, _g, gA, gB = _problem(5 * m + n, m, n, r, s)
  with contextlib.nullcontext() if compiled else jax.disable_jit():
    oA, oB = run_lorapro(A, B, gA, gB, s, layout, damping=delta, x_choice=x_choice)
  rA, rB = ref.damped_lorapro_gradients(gA, gB, A, B, s, x_choice, delta)
  assert_close(oA, rA, rtol=1e-10)
  assert_close(oB, rB, rtol=1e-10)
  # δ·tr G (the damping of δ·r relative to the mean) is far outside the tolerance.
  wA, wB = ref.damped_lorapro_gradients(gA, gB, A, B, s, x_choice, delta * r)
  size = max(1.0, np.max(np.abs(rA)), np.max(np.abs(rB)))
  assert max(np.max(np.abs(oA - wA)), np.max(np.abs(oB - wB))) > 1e-4 * size


# ----------------------------------------------------------------- Theorem 2.2


def _eq13(gA, gB, A, B, s):
  """The bracket of Eq. (13) (dL = -γ·bracket)."""
  m = B.shape[0]
  BtB_inv, AAt_inv = np.linalg.inv(B.T @ B), np.linalg.inv(A @ A.T)
  P_B = B @ BtB_inv @ B.T
  t1 = np.sum(gA * (BtB_inv @ gA)) / s**2
  t2 = np.sum(gB * ((np.eye(m) - P_B) @ gB @ AAt_inv)) / s**2
  return t1, t2


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m,n,r,s", SHAPES[:3])
def test_theorem_2_2_descent_direction(x64, layout, m, n, r, s):
  """For consistent gradients the X terms cancel from <g_lora, (g^A, g^B)>
  (<g_lora^A, X·A> = <g_lora^B, B·X>) and g̃ does not depend on X, so one x_choice
  suffices (test_theorem_2_2_property draws all three)."""
  A, B, g, gA, gB = _problem(10 + r, m, n, r, s)
  oA, oB = run_lorapro(A, B, gA, gB, s, layout)
  inner = np.sum(gA * oA) + np.sum(gB * oB)
  t1, t2 = _eq13(gA, gB, A, B, s)
  assert t1 >= 0 and t2 >= 0
  assert inner >= 0
  assert_close(inner, t1 + t2, rtol=1e-8, atol=0)
  # dL/dγ = -<∇L, g'> also equals -<g, g̃> in weight space (Eq. 3 and 6).
  g_tilde = ref.equivalent_gradient(oA, oB, A, B, s)
  assert_close(inner, np.sum(g * g_tilde), rtol=1e-8, atol=0)


@settings(
  max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
  shape=st.sampled_from(SHAPES),
  s=st.floats(0.1, 10.0),
  seed=st.integers(0, 2**31 - 1),
  x_choice=st.sampled_from(X_CHOICES),
  layout=st.sampled_from(LAYOUTS),
)
def test_theorem_2_2_property(x64, shape, s, seed, x_choice, layout):
  m, n, r, _ = shape
  A, B, g, gA, gB = _problem(seed, m, n, r, s)
  oA, oB = run_lorapro(A, B, gA, gB, s, layout, x_choice=x_choice)
  inner = np.sum(gA * oA) + np.sum(gB * oB)
  t1, t2 = _eq13(gA, gB, A, B, s)
  assert inner >= -1e-10 * (abs(t1) + abs(t2) + 1)
  assert_close(inner, t1 + t2, rtol=1e-6, atol=1e-10)
  assert_close(ref.equivalent_gradient(oA, oB, A, B, s), ref.projected_gradient(g, A, B), rtol=1e-6)


# ----------------------------------------------------------------- Theorem 2.3


def _implied_x(oA, gA, A, B, s):
  """X with g^A = (1/s²)(BᵀB)⁻¹ g_lora^A + X·A, by least squares Aᵀ·Xᵀ = Rᵀ."""
  R = oA - np.linalg.inv(B.T @ B) @ gA / s**2
  Xt, *_ = np.linalg.lstsq(A.T, R.T, rcond=None)
  return Xt.T


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m,n,r,s", SHAPES)
def test_theorem_2_3_sylvester(x64, layout, m, n, r, s):
  A, B, _g, gA, gB = _problem(20 + m, m, n, r, s)
  oA, oB = run_lorapro(A, B, gA, gB, s, layout, x_choice="sylvester")
  X = _implied_x(oA, gA, A, B, s)
  # The output really has the form of Eq. (8) with this X (A has full row rank).
  assert_close(X @ A, oA - np.linalg.inv(B.T @ B) @ gA / s**2)
  # Eq. (15) residual.
  BtB, AAt = B.T @ B, A @ A.T
  C = -np.linalg.inv(BtB) @ gA @ A.T / s**2
  resid = BtB @ X + X @ AAt - C
  assert np.max(np.abs(resid)) <= 1e-8 * (np.max(np.abs(C)) + np.max(np.abs(BtB @ X)))
  # X agrees with the Kronecker-form solve and the brute-force minimiser of (14).
  assert_close(X, ref.x_sylvester(gA, A, B, s))
  assert_close(X, ref.lstsq_x_closest(gA, gB, A, B, s))
  # Stationarity of (14) in X: (g^A - g_lora^A)Aᵀ = Bᵀ(g^B - g_lora^B) (Eq. 54) ...
  assert_close((oA - gA) @ A.T, B.T @ (oB - gB))
  # ... and since g_lora^A·Aᵀ = s·Bᵀ·g·Aᵀ = Bᵀ·g_lora^B, also g^A·Aᵀ = Bᵀ·g^B.
  assert_close(gA @ A.T, B.T @ gB)
  assert_close(oA @ A.T, B.T @ oB)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m,n,r,s", SHAPES[:3])
def test_theorem_2_3_sylvester_is_closest(x64, layout, m, n, r, s):
  A, B, _g, gA, gB = _problem(30 + n, m, n, r, s)
  dist = {}
  for xc in X_CHOICES:
    oA, oB = run_lorapro(A, B, gA, gB, s, layout, x_choice=xc)
    dist[xc] = np.linalg.norm(oA - gA) ** 2 + np.linalg.norm(oB - gB) ** 2
  assert dist["sylvester"] < dist["zero"]
  assert dist["sylvester"] < dist["symmetric"]
  # And no other X does better.
  oA, oB = run_lorapro(A, B, gA, gB, s, layout, x_choice="sylvester")
  rng = np.random.default_rng(0)
  for _ in range(5):
    X = 1e-2 * rng.standard_normal((r, r))
    d = np.linalg.norm(oA + X @ A - gA) ** 2 + np.linalg.norm(oB - B @ X - gB) ** 2
    assert d > dist["sylvester"]


# ----------------------------------------------------------------- Eq. (16)


def test_printed_eq16_is_not_an_r_by_r_matrix():
  """Printed Eq. (16), X = -(1/2s)·B(BᵀB)⁻¹Bᵀ·g·A(AᵀA)⁻¹A, does not conform
  (g·A needs n = r); read with the evident Aᵀ(AAᵀ)⁻¹A it is m×n, not r×r."""
  m, n, r, s = 7, 5, 2, 1.5
  A, B, g, _gA, _gB = _problem(40, m, n, r, s)
  P_B = B @ np.linalg.inv(B.T @ B) @ B.T
  with pytest.raises(ValueError):
    _ = P_B @ g @ A  # (m×n)·(r×n): the printed product is undefined
  # AᵀA (n×n) has rank r < n: the printed inverse does not exist either.
  assert np.linalg.matrix_rank(A.T @ A) == r < n
  printed = ref.printed_eq16(g, A, B, s)
  assert printed.shape == (m, n) != (r, r)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m,n,r,s", SHAPES)
def test_symmetric_x_is_the_corrected_eq16(x64, layout, m, n, r, s):
  """The r×r X that balances g^B·A against B·g^A in least squares is
  -(1/(2s²))(BᵀB)⁻¹Bᵀ g_lora^B (AAᵀ)⁻¹, and B·X·A is the printed m×n Eq. (16)."""
  A, B, g, gA, gB = _problem(50 + r, m, n, r, s)
  oA, oB = run_lorapro(A, B, gA, gB, s, layout, x_choice="symmetric")
  X = _implied_x(oA, gA, A, B, s)
  assert X.shape == (r, r)
  assert_close(X, ref.x_symmetric(gB, A, B, s))
  assert_close(X, ref.lstsq_x_balanced(gA, gB, A, B, s))
  assert_close(B @ X @ A, ref.printed_eq16(g, A, B, s))
  # It minimises ‖g^B·A - B·g^A‖ among the three choices (and any perturbation).
  imbalance = lambda a, b: np.linalg.norm(b @ A - B @ a)
  best = imbalance(oA, oB)
  for xc in ("sylvester", "zero"):
    assert imbalance(*run_lorapro(A, B, gA, gB, s, layout, x_choice=xc)) >= best * (1 - 1e-10)
  rng = np.random.default_rng(1)
  for _ in range(5):
    Y = 1e-2 * rng.standard_normal((r, r))
    assert imbalance(oA + Y @ A, oB - B @ Y) > best


# ------------------------------------------------------------- B = 0 and edges


def _same_for_every_x_choice(run):
  """``run(x_choice)`` for every choice; at B = 0 every choice gives X = 0, so the
  outputs must be identical. Returns them."""
  oA, oB = run("zero")
  for x_choice in ("sylvester", "symmetric"):
    xA, xB = run(x_choice)
    np.testing.assert_array_equal(xA, oA, err_msg=x_choice)
    np.testing.assert_array_equal(xB, oB, err_msg=x_choice)
  return oA, oB


@pytest.mark.parametrize("layout", LAYOUTS)
def test_b_zero_first_step_float64(x64, layout):
  m, n, r, s = 7, 5, 2, 2.0
  A, _, g, _, _ = _problem(60, m, n, r, s)
  B = np.zeros((m, r))
  gA, gB = ref.lora_gradients(g, A, B, s)
  oA, oB = _same_for_every_x_choice(
    lambda x_choice: run_lorapro(A, B, gA, gB, s, layout, x_choice=x_choice)
  )
  np.testing.assert_array_equal(oA, 0)
  assert_close(oB, gB @ np.linalg.inv(A @ A.T) / s**2)
  # The equivalent gradient is then g·P_A, the theorem's projection with P_B = 0.
  assert_close(ref.equivalent_gradient(oA, oB, A, B, s), ref.projected_gradient(g, A, B))


@pytest.mark.parametrize("layout", ["flax", pytest.param("paper", marks=pytest.mark.slow)])
def test_b_zero_first_step_float32_default_damping(layout):
  m, n, r, s = 7, 5, 2, 2.0
  A, _, g, _, _ = _problem(61, m, n, r, s)
  B = np.zeros((m, r))
  gA, gB = ref.lora_gradients(g, A, B, s)
  args = [x.astype(np.float32) for x in (A, B, gA, gB)]
  oA, oB = _same_for_every_x_choice(
    lambda x_choice: run_lorapro(*args, s, layout, damping=lpj.DEFAULT_DAMPING, x_choice=x_choice)
  )
  assert oA.dtype == np.float32
  np.testing.assert_array_equal(oA, 0)
  want = gB @ np.linalg.inv(A @ A.T) / s**2
  assert_close(oB, want, rtol=1e-4, atol=0)


def _finite_cases(rng, m=7, n=5, r=2):
  A = rng.standard_normal((r, n))
  B = rng.standard_normal((m, r))
  A_def = A.copy()
  A_def[-1] = A_def[0]  # rank r - 1
  B_def = B.copy()
  B_def[:, 1] = 0.0  # rank r - 1
  return {
    "zero_A_and_B": (np.zeros_like(A), np.zeros_like(B)),
    "zero_A": (np.zeros_like(A), B),
    "rank_deficient_A": (A_def, B),
    "rank_deficient_B": (A, B_def),
    "rank_one_both": (np.outer(np.ones(r), A[0]), np.outer(B[:, 0], np.ones(r))),
    "tiny": (1e-20 * A, 1e-20 * B),
    "huge": (1e20 * A, 1e20 * B),
    "tiny_A_huge_B": (1e-20 * A, 1e20 * B),
    "huge_A_tiny_B": (1e20 * A, 1e-20 * B),
  }


@pytest.mark.parametrize("case", list(_finite_cases(np.random.default_rng(0))))
@pytest.mark.parametrize("x_choice", X_CHOICES)
def test_degenerate_and_extreme_factors_are_finite_float32(case, x_choice):
  rng = np.random.default_rng(70)
  A, B = _finite_cases(rng)[case]
  g = rng.standard_normal((B.shape[0], A.shape[1]))
  s = 2.0
  gA, gB = ref.lora_gradients(g, A, B, s)
  args = [x.astype(np.float32) for x in (A, B, gA, gB)]
  for layout in LAYOUTS:
    oA, oB = run_lorapro(*args, s, layout, damping=lpj.DEFAULT_DAMPING, x_choice=x_choice)
    assert oA.dtype == np.float32 and oB.dtype == np.float32
    assert np.all(np.isfinite(oA)) and np.all(np.isfinite(oB)), case


@pytest.mark.parametrize("case", list(_finite_cases(np.random.default_rng(0))))
def test_degenerate_and_extreme_factors_are_finite_full_mode_float32(case):
  """Full mode (Alg. 3), two steps, with the same degenerate and extreme factors."""
  rng = np.random.default_rng(71)
  A, B = _finite_cases(rng)[case]
  g = rng.standard_normal((B.shape[0], A.shape[1]))
  gA, gB = ref.lora_gradients(g, A, B, 2.0)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), pair_tree(A, B, "flax"))
  grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), pair_tree(gA, gB, "flax"))
  tx = lpj.lorapro(2.0, mode="full")
  state = tx.init(params)
  for _ in range(2):
    u, state = tx.update(grads, state, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((u, state))), case


@pytest.mark.parametrize("x_choice", X_CHOICES)
@pytest.mark.parametrize("scale_exp", [-20, 20])
def test_extreme_scales_still_solve_theorem_2_1_float32(scale_exp, x_choice):
  """Scale normalisation: A, B of magnitude 1e±20 in float32 give the same
  equivalent gradient (relative to its size) as O(1) factors would, and g^A, g^B
  (which depend on X) match the reference on the same float32 values."""
  m, n, r, s = 7, 5, 2, 1.0
  A, B, g, _, _ = _problem(80, m, n, r, s)
  c = 10.0**scale_exp
  A_c, B_c = c * A, c * B
  args = [x.astype(np.float32) for x in (A_c, B_c, *ref.lora_gradients(g, A_c, B_c, s))]
  oA, oB = run_lorapro(*args, s, "flax", damping=lpj.DEFAULT_DAMPING, x_choice=x_choice)
  assert np.all(np.isfinite(oA)) and np.all(np.isfinite(oB))
  g_tilde = ref.equivalent_gradient(oA.astype(np.float64), oB.astype(np.float64), A_c, B_c, s)
  want = ref.projected_gradient(g, A, B)
  assert_close(g_tilde, want, rtol=1e-3, atol=0)
  A32, B32, gA32, gB32 = args
  for got, want in zip((oA, oB), ref.lorapro_gradients(gA32, gB32, A32, B32, s, x_choice)):
    assert_close(got, want, rtol=1e-4, atol=0)


# ------------------------------------------------------------- diagnostics


@pytest.mark.parametrize("layout", LAYOUTS)
def test_equivalent_gradients_diagnostic(x64, layout):
  m, n, r, s = 7, 5, 2, 1.25
  rng = np.random.default_rng(90)
  A, B, _ = random_pair(rng, m, n, r)
  gA, gB = rng.standard_normal((r, n)), rng.standard_normal((m, r))  # arbitrary updates
  params = jax.tree.map(jnp.asarray, pair_tree(A, B, layout))
  updates = jax.tree.map(jnp.asarray, pair_tree(gA, gB, layout))
  out = lpj.equivalent_gradients(params, updates, scale=s, pairs=pairs_arg(layout))
  assert set(out) == {"layer"}
  want = s * B @ gA + s * gB @ A  # (m, n)
  want = want.T if layout == "flax" else want  # laid out like the adapted weight
  chex.assert_shape(out["layer"], want.shape)
  assert out["layer"].dtype == jnp.float64
  assert_close(out["layer"], want, rtol=1e-12)


def test_equivalent_gradients_diagnostic_stacked_and_scale_callable(x64):
  L, m, n, r = 3, 5, 4, 2
  rng = np.random.default_rng(91)
  a = rng.standard_normal((L, n, r))
  b = rng.standard_normal((L, r, m))
  ga = rng.standard_normal((L, n, r))
  gb = rng.standard_normal((L, r, m))
  params = {"blocks": {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}}
  updates = {"blocks": {"lora_a": jnp.asarray(ga), "lora_b": jnp.asarray(gb)}}
  scale = lambda path, rank: 3.0 / rank
  out = lpj.equivalent_gradients(params, updates, scale=scale)["blocks"]
  chex.assert_shape(out, (L, n, m))
  for i in range(L):
    want = 1.5 * (b[i].T @ ga[i].T + gb[i].T @ a[i].T)  # paper: s(B gA + gB A), m×n
    assert_close(out[i], want.T, rtol=1e-12)
