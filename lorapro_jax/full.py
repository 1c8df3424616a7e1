"""Full mode: Algorithm 3, Adam moments of each pair's m×n equivalent gradient.

Each function works on one `batched.LeafPair` (batch axes flattened to N) in
its storage layout; m×n arrays are laid out like the adapted weight,
``(N, n, m)`` for the flax layout and ``(N, m, n)`` for the paper's, as the
equivalent gradient is formed, so that none is transposed.

**Raw path.** The equivalent gradient is one K = 2r product written once,
Adam's moment update reads it with the moments and writes them and the
direction, and Eq. (56) reads the direction twice: the m×n traffic of dense
AdamW. It is taken when a bound from the factors' and Theorem 2.1 gradients'
largest entries (reductions over LoRA-sized arrays) says no product leaves the
dtype's range; otherwise the pair falls back, through `jax.lax.cond`, to the
same map on normalised factors and gradients, whose scales are applied last.
"""

from __future__ import annotations

from functools import partial
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lorapro_jax import batched
from lorapro_jax import equations as eq
from lorapro_jax import layout as lo

Array = jax.Array


class FullMoments(NamedTuple):
  """Algorithm 3's moments of one pair, laid out like the adapted weight.

  Attributes:
    mu: first moment of the m×n equivalent gradient.
    nu: second moment of the m×n equivalent gradient.
  """

  mu: Array
  nu: Array

  # What each field is shaped like (`pairs.stored_shape`).
  roles = MappingProxyType({"mu": "weight", "nu": "weight"})


_col, _amax, _vmap_normalise = batched.col, batched.amax, batched.normalise_slices


def equivalent_gradient(pair: batched.LeafPair, g_A: Array, g_B: Array) -> Array:
  """Eq. (55), g̃ = s·B·g^A + s·g^B·A, in the weight's layout, (N, ., .)."""
  return lo.outer(pair.layout, pair.B, g_A * _col(pair.s), g_B * _col(pair.s), pair.A)


def normalised_equivalent_gradient(pair: batched.LeafPair, g_A: Array, g_B: Array) -> Array:
  """`equivalent_gradient` for factors and gradients anywhere in the dtype's range:
  both terms computed at most 1 in size and their common scale applied last,
  saturating. g^A, g^B are finite (saturated) or NaN."""
  A, B = _vmap_normalise(pair.A), _vmap_normalise(pair.B)
  a, b = _vmap_normalise(g_A), _vmap_normalise(g_B)
  c_A = eq.saturate(pair.s * B.scale * a.scale)
  c_B = eq.saturate(pair.s * A.scale * b.scale)
  c = jnp.maximum(c_A, c_B)
  c = jnp.where(c > 0, c, jnp.ones_like(c))
  g = lo.outer(
    pair.layout, B.hat, a.hat * _col(eq.divide(c_A, c)), b.hat * _col(eq.divide(c_B, c)), A.hat
  )
  return eq.saturate(g * _col(c))


def update_moments(g: Array, m: FullMoments, h: batched.Hyper) -> tuple[Array, FullMoments]:
  """Adam on the equivalent gradient (Alg. 3, lines 9-13): the bias-corrected
  direction m̂/(√v̂ + ε) in compute dtype and the moments in their stored dtype.

  g is finite or NaN; the moments and the direction saturate instead of
  overflowing (g² beyond the range would make v Inf and the direction 0).
  """
  stored = m.mu.dtype
  dt = batched.compute_dtype(g, m.mu)
  g = g.astype(dt)
  mu = eq.saturate(h.b1 * m.mu.astype(dt) + (1 - h.b1) * g)
  nu = eq.saturate(h.b2 * m.nu.astype(dt) + (1 - h.b2) * g * g)
  t = h.count.astype(dt)
  direction = eq.saturate(mu / (1 - h.b1**t)) / (jnp.sqrt(nu) / jnp.sqrt(1 - h.b2**t) + h.eps)
  return direction, FullMoments(eq.saturating_cast(mu, stored), eq.saturating_cast(nu, stored))


def project(pair: batched.LeafPair, D: Array) -> batched.LeafPair:
  """Eq. (56): ``pair`` with its gradients replaced by s·Bᵀ·D and s·D·Aᵀ."""
  p_A, p_B = lo.project(pair.layout, D.astype(pair.A.dtype), pair.A, pair.B)
  return pair.replace(g_A=eq.saturate(p_A * _col(pair.s)), g_B=eq.saturate(p_B * _col(pair.s)))


def normalised_project(pair: batched.LeafPair, D: Array) -> batched.LeafPair:
  """`project` with normalised factors, their scales applied last (saturating)."""
  A, B = _vmap_normalise(pair.A), _vmap_normalise(pair.B)
  p_A, p_B = lo.project(pair.layout, D.astype(pair.A.dtype), A.hat, B.hat)
  s = _col(pair.s)
  return pair.replace(
    g_A=eq.saturate(s * p_A * _col(B.scale)), g_B=eq.saturate(s * p_B * _col(A.scale))
  )


# Raw products stay inside 2^±LIMIT: no partial sum is subnormal or overflows.
_LIMIT = 100.0
# A bound on Adam's direction for the projection's estimate: |m̂/(√v̂ + ε)| is
# O(1) (about (1 - β1)/√(1 - β2) at most for β1² < β2); 2^20 leaves room.
_DIRECTION = 20.0


def raw_trusted(pair: batched.LeafPair, g_A: Array, g_B: Array) -> Array:
  """Whether `equivalent_gradient` and `project` are exact in the compute dtype:
  every product's size, K·max|X|·max|Y| for s·B·g^A, s·g^B·A (K = r), s·Bᵀ·D
  (K = m) and s·D·Aᵀ (K = n), and of the factors s·g^A, s·g^B that
  `equivalent_gradient` forms first (K = 1), inside 2^±100, or an operand zero.
  NaN or Inf fails it. Reductions over LoRA-sized arrays only.

  (Without s·g^A and s·g^B: g^A ~ 1e38 and s = 8 overflowed s·g^A to Inf while
  s·B·g^A, with B ~ 4e-10, was inside the bound, and the update was NaN.)"""
  lg = jnp.log2
  s, a, b = lg(pair.s), lg(_amax(pair.A)), lg(_amax(pair.B))
  ga, gb = lg(_amax(g_A)), lg(_amax(g_B))
  r = pair.rank
  m = pair.B.shape[-1] if pair.layout == "flax" else pair.B.shape[-2]
  n = pair.A.shape[-2] if pair.layout == "flax" else pair.A.shape[-1]
  ok = jnp.asarray(True)
  terms = (
    (s + b + ga, r),
    (s + gb + a, r),
    (s + b + _DIRECTION, m),
    (s + a + _DIRECTION, n),
    (s + ga, 1),
    (s + gb, 1),
  )
  for size, k in terms:
    ok &= jnp.all((size == -jnp.inf) | ((size >= -_LIMIT) & (size + lg(float(k)) <= _LIMIT)))
  return ok


def step(
  pairs: list[batched.LeafPair], moments: list[FullMoments], h: batched.Hyper, x_choice, damping
) -> tuple[list[tuple[Array, Array]], list[FullMoments]]:
  """Algorithm 3 for every pair: the update (laid out like A, B) and the new moments.

  Theorem 2.1 with X = 0 (lines 5-7; X does not change the equivalent
  gradient), Adam on the equivalent gradient (lines 8-13), its projection
  (Eq. 56) adjusted by Theorem 2.1 with the chosen X (lines 14-18).
  """
  # Jitted so that an eager call compiles one computation per shape, not one per op.
  return _step_jit(tuple(pairs), tuple(moments), h, x_choice, damping, batched.recording())


@partial(jax.jit, static_argnums=(3, 5))
def _step_jit(pairs, moments, h: batched.Hyper, x_choice, damping, record):
  del record  # a static argument: code traced to record paths is compiled apart
  order = batched.EighOrder()
  # The named scopes label each stage's ops in the compiled HLO, where the
  # benchmarks (benchmarks/hlo_traffic.py) attribute their cost.
  with jax.named_scope("lorapro/full/adjust_zero"):
    zero_x = batched.adjust(pairs, "zero", damping, order)
  projected, new = [], []
  for p, (g_A, g_B), m in zip(pairs, zero_x, moments, strict=True):
    with jax.named_scope("lorapro/full/guard"):
      ok = raw_trusted(p, g_A, g_B)
    batched.log_path(ok)

    def raw(p=p, g_A=g_A, g_B=g_B, m=m):
      with jax.named_scope("lorapro/full/equivalent_gradient"):
        g = equivalent_gradient(p, g_A, g_B)
      with jax.named_scope("lorapro/full/moments"):
        D, m2 = update_moments(g, m, h)
      with jax.named_scope("lorapro/full/project"):
        return project(p, D), m2

    def normalised(p=p, g_A=g_A, g_B=g_B, m=m):
      with jax.named_scope("lorapro/full/normalised"):
        D, m2 = update_moments(normalised_equivalent_gradient(p, g_A, g_B), m, h)
        return normalised_project(p, D), m2

    q, m2 = jax.lax.cond(ok, raw, normalised)
    projected.append(q)
    new.append(m2)
  with jax.named_scope("lorapro/full/adjust"):
    return batched.adjust(projected, x_choice, damping, order), new
