"""Adam moments of a pair's equivalent gradient: full mode (Algorithm 3).

Each function works on one `batched.LeafPair` (batch axes flattened to N) in
its storage layout; m×n arrays are laid out like the adapted weight,
``(N, n, m)`` for the flax layout and ``(N, m, n)`` for the paper's, as the
equivalent gradient is formed, so that none is transposed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lorapro_jax import batched
from lorapro_jax import equations as eq
from lorapro_jax import layout as lo

Array = jax.Array

_vmap_normalise = jax.vmap(eq.normalise)


class ScaleByLoraProState(NamedTuple):
  """State of `lorapro_jax.lorapro` in full mode.

  Attributes:
    count: number of updates so far (int32), for the bias correction of the
      pair moments.
    pair_moments: per pair, keyed by `pairs.PairIndex.keys` (the pair's parent
      path, e.g. ``"layers/0/attn/query"``): its `FullMoments`.
    adam_state: ``optax.masked(optax.scale_by_adam(...))`` state of the leaves
      outside pairs; its moments hold ``optax.MaskedNode`` at pair leaves.
  """

  count: Array
  pair_moments: dict[str, Any]
  adam_state: optax.OptState


class FullMoments(NamedTuple):
  """Algorithm 3's moments of one pair, laid out like the adapted weight.

  Attributes:
    mu: first moment of the m×n equivalent gradient.
    nu: second moment of the m×n equivalent gradient.
  """

  mu: Array
  nu: Array


def _col(x: Array) -> Array:
  return x[:, None, None]


def equivalent_gradient(pair: batched.LeafPair, g_A: Array, g_B: Array) -> Array:
  """Eq. (55), g̃ = s·B·g^A + s·g^B·A, in the weight's layout, (N, ., .).

  Formed without overflowing midway: both terms are computed at most 1 in
  size and their common scale applied last, saturating. g^A, g^B are finite
  (saturated) or NaN.
  """
  A, B = _vmap_normalise(pair.A), _vmap_normalise(pair.B)
  a, b = _vmap_normalise(g_A), _vmap_normalise(g_B)
  c_A = eq.saturate(pair.s * B.scale * a.scale)
  c_B = eq.saturate(pair.s * A.scale * b.scale)
  c = jnp.maximum(c_A, c_B)
  c = jnp.where(c > 0, c, jnp.ones_like(c))
  g = lo.outer(pair.layout, B.hat, a.hat * _col(c_A / c), b.hat * _col(c_B / c), A.hat)
  return eq.saturate(g * _col(c))


def project(pair: batched.LeafPair, D: Array) -> batched.LeafPair:
  """Eq. (56): ``pair`` with its gradients replaced by s·Bᵀ·D and s·D·Aᵀ."""
  A, B = _vmap_normalise(pair.A), _vmap_normalise(pair.B)
  p_A, p_B = lo.project(pair.layout, D.astype(pair.A.dtype), A.hat, B.hat)
  s = _col(pair.s)
  return pair.replace(
    g_A=eq.saturate(s * p_A * _col(B.scale)), g_B=eq.saturate(s * p_B * _col(A.scale))
  )


def adam_direction(
  g: Array, mu: Array, nu: Array, count: Array, b1, b2, eps
) -> tuple[Array, Array, Array]:
  """Bias-corrected Adam direction m̂/(√v̂ + ε) (Alg. 3, lines 9-13), saturating.

  g is finite or NaN (an equivalent gradient); the moments and the direction
  saturate instead of overflowing (g² beyond the range would make v Inf and
  the direction 0). Returns the direction in compute dtype and the moments in
  their stored dtype.
  """
  stored = mu.dtype
  dt = batched.compute_dtype(g, mu)
  g = g.astype(dt)
  mu = eq.saturate(b1 * mu.astype(dt) + (1 - b1) * g)
  nu = eq.saturate(b2 * nu.astype(dt) + (1 - b2) * g * g)
  t = count.astype(dt)
  direction = eq.saturate(mu / (1 - b1**t)) / (jnp.sqrt(nu) / jnp.sqrt(1 - b2**t) + eps)
  return direction, eq.saturating_cast(mu, stored), eq.saturating_cast(nu, stored)


def full_step(
  pair: batched.LeafPair, zero_x: tuple[Array, Array], moments: FullMoments, count, b1, b2, eps
) -> tuple[batched.LeafPair, FullMoments]:
  """Algorithm 3, lines 8-15, for one pair.

  Args:
    pair: the pair and its LoRA gradients.
    zero_x: Theorem 2.1's (g^A, g^B) with X = 0 (lines 5-7), laid out like
      (A, B); X does not change the equivalent gradient.
    moments: the pair's moments, shaped (N, ., .) like the weight.
    count: the step number t ≥ 1.

  Returns:
    ``pair`` with its gradients replaced by the projected Adam direction
    (Eq. 56), to be adjusted by Theorem 2.1 (lines 16-18); the new moments.
  """
  g_tilde = equivalent_gradient(pair, *zero_x)
  d, mu, nu = adam_direction(g_tilde, moments.mu, moments.nu, count, b1, b2, eps)
  return project(pair, d), FullMoments(mu, nu)
