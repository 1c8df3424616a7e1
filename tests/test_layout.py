"""The layout products and the numerics guards, against NumPy in float64.

`layout.left`/`right` take two code paths: r broadcast multiply-adds at
r ≤ `UNROLL_MAX_RANK` and an einsum above it. Both are checked, in both
layouts, and end to end through `lorapro` at a rank above the threshold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorapro_jax import equations as eq
from lorapro_jax import layout as lo
from tests import reference as ref
from tests.helpers import assert_close, random_pair, run_lorapro

RANKS = (3, lo.UNROLL_MAX_RANK, lo.UNROLL_MAX_RANK + 4)


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("layout", ("flax", "paper"))
def test_left_and_right_products(x64, layout, r):
  rng = np.random.default_rng(r)
  n, m = 7, 9
  M = rng.standard_normal((2, r, r))
  A = rng.standard_normal((2, r, n))  # paper orientation
  B = rng.standard_normal((2, m, r))
  stored_A = A if layout == "paper" else np.swapaxes(A, -1, -2)
  stored_B = B if layout == "paper" else np.swapaxes(B, -1, -2)
  got_A = np.asarray(jax.jit(lo.left, static_argnums=0)(layout, M, stored_A))
  got_B = np.asarray(jax.jit(lo.right, static_argnums=0)(layout, stored_B, M))
  want_A, want_B = M @ A, B @ M
  if layout == "flax":
    want_A, want_B = np.swapaxes(want_A, -1, -2), np.swapaxes(want_B, -1, -2)
  np.testing.assert_allclose(got_A, want_A, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(got_B, want_B, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ("flax", "paper"))
def test_efficient_mode_above_the_unrolled_rank(x64, layout):
  """Theorem 2.1 through the einsum products (r = 20 > 16), against the reference."""
  rng = np.random.default_rng(0)
  r, s = lo.UNROLL_MAX_RANK + 4, 1.5
  A, B, g = random_pair(rng, 40, 30, r)
  gA, gB = ref.lora_gradients(g, A, B, s)
  got = run_lorapro(A, B, gA, gB, s, layout, x_choice="sylvester")
  want = ref.lorapro_gradients(gA, gB, A, B, s, "sylvester")
  for x, y in zip(got, want):
    assert_close(x, y, rtol=1e-7, atol=0)


def test_eigh_never_sees_a_non_finite_matrix():
  """A Gram matrix that overflowed (Inf) or carries a NaN is decomposed as zero:
  finite eigenvalues and vectors, so the raw result the caller discards is
  finite too (kfac-jax's safe_psd_eigh does the same)."""
  G = jnp.stack([jnp.eye(3), jnp.full((3, 3), jnp.inf), jnp.full((3, 3), jnp.nan)])
  eig = jax.jit(eq.damped_eigh)(G, 1e-6)
  assert bool(jnp.all(jnp.isfinite(eig.w))) and bool(jnp.all(jnp.isfinite(eig.Q)))
  np.testing.assert_allclose(eig.w[0], 1 + 1e-6, rtol=1e-6)
  assert bool(jnp.all(eq.inverse(eq.DampedEig(eig.w[1:], eig.Q[1:])) == 0))
