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
  """State of `lorapro_jax.lorapro` in the modes with moments (full, factored).

  Attributes:
    pair_moments: per pair, keyed by `pairs.PairIndex.keys` (the pair's parent
      path, e.g. ``"layers/0/attn/query"``): its `FullMoments`,
      `FactoredMoments` or `FactoredSecondMoment`.
    adam_state: ``optax.masked(optax.scale_by_adam(...))`` state of the leaves
      outside pairs (its moments hold ``optax.MaskedNode`` at pair leaves); its
      step count is also the pair moments' (`count`).
  """

  pair_moments: dict[str, Any]
  adam_state: optax.OptState

  @property
  def count(self) -> Array:
    """Number of updates so far (int32), for every bias correction."""
    return self.adam_state.inner_state.count


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
  g = lo.outer(
    pair.layout, B.hat, a.hat * _col(eq.divide(c_A, c)), b.hat * _col(eq.divide(c_B, c)), A.hat
  )
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


class FactoredMoments(NamedTuple):
  """Factored mode's state of one pair (`lorapro(mode="factored")`).

  The first moment M of the m×n equivalent gradient is kept in low rank,
  M = s·B̂_prev·N_A + s·N_B·Â_prev, where X̂ = X / max|X| for the factors at
  the previous step; its second moment is factored as Adafactor's.

  Attributes:
    m_a: N_A, laid out like A.
    m_b: N_B, laid out like B.
    a_prev: A at the previous step.
    b_prev: B at the previous step.
    row: EMA of the mean over the in features of G̃² + ε² (an m-vector).
    col: EMA of the mean over the out features of G̃² + ε² (an n-vector).
  """

  m_a: Array
  m_b: Array
  a_prev: Array
  b_prev: Array
  row: Array
  col: Array


class FactoredSecondMoment(NamedTuple):
  """Factored mode's state of one pair without a first moment (b1 = 0).

  Attributes:
    row: EMA of the mean over the in features of G̃² + ε² (an m-vector).
    col: EMA of the mean over the out features of G̃² + ε² (an n-vector).
  """

  row: Array
  col: Array


class LowRank(NamedTuple):
  """Σ_k u_k·v_k (m×n) for m×r factors u_k and r×n factors v_k, in the
  pair's layout (flax: u_k (N, r, m), v_k (N, n, r)). Never formed."""

  u: tuple[Array, ...]
  v: tuple[Array, ...]


def _sum(xs):
  xs = list(xs)
  return sum(xs[1:], xs[0])


def _stacked(layout: lo.Layout, L: LowRank) -> tuple[Array, Array]:
  """U = [u_1, u_2, …] (m×kr) and V = [v_1; v_2; …] (kr×n), in the layout."""
  flax = layout == "flax"
  return jnp.concatenate(L.u, axis=1 if flax else 2), jnp.concatenate(L.v, axis=2 if flax else 1)


def row_sq(layout: lo.Layout, L: LowRank) -> Array:
  """Σ_j L_ij² (N, m) for L = U·V: diag(U·(V·Vᵀ)·Uᵀ) = rowsum(U ∘ (U·(V·Vᵀ)))."""
  U, V = _stacked(layout, L)
  K = lo.gram_A(layout, V, V)
  # A dot, not `layout.right`'s unrolled multiply-adds: K is 2r wide.
  UK = jnp.einsum("kab,kam->kbm" if layout == "flax" else "kab,kma->kmb", K, U)
  return lo.out_dot(layout, U, UK)


def col_sq(layout: lo.Layout, L: LowRank) -> Array:
  """Σ_i L_ij² (N, n) for L = U·V: diag(Vᵀ·(Uᵀ·U)·V) = colsum(V ∘ ((Uᵀ·U)·V))."""
  U, V = _stacked(layout, L)
  K = lo.gram_B(layout, U, U)
  KV = jnp.einsum("kab,knb->kna" if layout == "flax" else "kab,kbn->kan", K, V)
  return lo.in_dot(layout, V, KV)


def lora_gradients(layout: lo.Layout, L: LowRank, A: Array, B: Array) -> tuple[Array, Array]:
  """Eq. (5) without s, for the full gradient L: (Bᵀ·L, L·Aᵀ), laid out like (A, B)."""
  g_A = _sum(lo.left(layout, lo.gram_B(layout, B, u), v) for u, v in zip(*L))
  g_B = _sum(lo.right(layout, u, lo.gram_A(layout, v, A)) for u, v in zip(*L))
  return g_A, g_B


def _normalised(x: Array) -> eq.Normalised:
  return _vmap_normalise(x)


def _max_scale(*xs: eq.Normalised) -> Array:
  """The largest of the scales (N,), 1 where all are 0."""
  c = jnp.maximum(*[x.scale for x in xs]) if len(xs) > 1 else xs[0].scale
  return jnp.where(c > 0, c, jnp.ones_like(c))


def moment_projection(pair: batched.LeafPair, m: FactoredMoments) -> tuple[batched.LeafPair, Array]:
  """The stored first moment M as the LoRA gradients of a pair, ready for
  Theorem 2.1 with X = 0, which projects M onto the span of the current
  factors: P_B·M + (I - P_B)·M·P_A, the best approximation of M by
  s·B·N_A' + s·N_B'·A (Theorem 2.1 with M as the full gradient).

  Everything is formed from normalised factors (entries at most 1), with
  s = 1 and M divided by s·ν, ν the larger of max|N_A| and max|N_B|.

  Returns:
    The pair (Â, B̂, B̂ᵀ·M/(s·ν), M/(s·ν)·Âᵀ, s = 1), whose Theorem 2.1
    outputs times ν are N_A' and N_B' (relative to Â and B̂); and ν (N,).
  """
  dt = pair.A.dtype
  A, B = _normalised(pair.A), _normalised(pair.B)
  A_p, B_p = _normalised(m.a_prev.astype(dt)), _normalised(m.b_prev.astype(dt))
  n_A, n_B = _normalised(m.m_a.astype(dt)), _normalised(m.m_b.astype(dt))
  nu = _max_scale(n_A, n_B)
  L = LowRank(
    (B_p.hat, n_B.hat * _col(eq.divide(n_B.scale, nu))),
    (n_A.hat * _col(eq.divide(n_A.scale, nu)), A_p.hat),
  )
  g_A, g_B = lora_gradients(pair.layout, L, A.hat, B.hat)
  return pair.replace(A=A.hat, B=B.hat, g_A=g_A, g_B=g_B, s=jnp.ones_like(pair.s)), nu


def factored_step(
  pair: batched.LeafPair,
  zero_x: tuple[Array, Array],
  moments: FactoredMoments | FactoredSecondMoment,
  projected: tuple[Array, Array, Array] | None,
  count: Array,
  b1,
  b2,
  eps,
) -> tuple[batched.LeafPair, FactoredMoments | FactoredSecondMoment]:
  """One factored-mode step for one pair: Algorithm 3 with its m×n moments
  replaced by a low-rank first moment and a factored second moment.

  Args:
    pair: the pair and its LoRA gradients (N, ., .).
    zero_x: Theorem 2.1's (g^A, g^B) with X = 0; the equivalent gradient is
      G̃ = s·B·g^A + s·g^B·A (Eq. 55).
    moments: the pair's state in compute shapes (a_prev, b_prev unused here
      but by `moment_projection`).
    projected: for a first moment, Theorem 2.1 (X = 0) of `moment_projection`'s
      pair and its ν; None without a first moment.
    count: the step number t ≥ 1.

  Returns:
    ``pair`` with its gradients replaced by Eq. (56) of the direction
    D = M̂ ⊘ √V̂, to be adjusted by Theorem 2.1 with the chosen X; and the
    new moments (a_prev, b_prev left as given: the caller stores the factors).
  """
  layout, s = pair.layout, pair.s
  dt = pair.A.dtype
  A, B = _normalised(pair.A), _normalised(pair.B)
  n = pair.A.shape[-2] if layout == "flax" else pair.A.shape[-1]
  m = pair.B.shape[-1] if layout == "flax" else pair.B.shape[-2]
  # G̃ = s·B̂·G_A + s·G_B·Â: the factors of this step's equivalent gradient.
  G_A = eq.saturate(zero_x[0] * _col(B.scale))
  G_B = eq.saturate(zero_x[1] * _col(A.scale))

  # First moment: M ← β1·proj(M) + (1 - β1)·G̃, relative to the current Â, B̂.
  if projected is None:
    N_A, N_B = G_A, G_B
  else:
    P_A, P_B, nu = projected
    N_A = eq.saturate(b1 * eq.scale_by(P_A, _col(nu)) + (1 - b1) * G_A)
    N_B = eq.saturate(b1 * eq.scale_by(P_B, _col(nu)) + (1 - b1) * G_B)

  # Second moment, factored: EMAs of the row and column means of G̃² + ε²,
  # from G̃ = s·c·L̂ with L̂'s factors at most 1 (c the larger factor scale).
  h_A, h_B = _normalised(G_A), _normalised(G_B)
  c = _max_scale(h_A, h_B)
  L = LowRank(
    (B.hat, h_B.hat * _col(eq.divide(h_B.scale, c))),
    (h_A.hat * _col(eq.divide(h_A.scale, c)), A.hat),
  )
  sq = lambda x, size: eq.scale_by(
    jnp.maximum(x, 0) / size, s[:, None], s[:, None], c[:, None], c[:, None]
  )
  ema = lambda v, x: eq.saturate(b2 * v.astype(dt) + (1 - b2) * (x + eps**2))
  row = ema(moments.row, sq(row_sq(layout, L), n))
  col = ema(moments.col, sq(col_sq(layout, L), m))

  # D = M̂ ⊘ √V̂ with V̂ = R̂·Ĉᵀ / mean(R̂): D = k·diag(ρ)·M·diag(κ), ρ = R^-½,
  # κ = C^-½, k = √mean(R)·√(1 - β2ᵗ)/(1 - β1ᵗ) (the bias corrections).
  t = count.astype(dt)
  tiny = jnp.finfo(dt).tiny
  rho = jax.lax.rsqrt(jnp.maximum(row, tiny))
  kappa = jax.lax.rsqrt(jnp.maximum(col, tiny))
  rho_max, kappa_max = jnp.max(rho, axis=-1), jnp.max(kappa, axis=-1)
  rho, kappa = rho / rho_max[:, None], kappa / kappa_max[:, None]
  k = jnp.sqrt(jnp.mean(row, axis=-1)) * jnp.sqrt(1 - b2**t) / (1 - b1**t)
  n_A, n_B = _normalised(N_A), _normalised(N_B)
  nu_D = _max_scale(n_A, n_B)
  D = LowRank(
    (
      lo.scale_out(layout, B.hat, rho),
      lo.scale_out(layout, n_B.hat * _col(eq.divide(n_B.scale, nu_D)), rho),
    ),
    (
      lo.scale_in(layout, n_A.hat * _col(eq.divide(n_A.scale, nu_D)), kappa),
      lo.scale_in(layout, A.hat, kappa),
    ),
  )
  # D = s·k·ρmax·κmax·ν·D̂. Eq. (56): s·Bᵀ·D = s·β·B̂ᵀ·D, s·D·Aᵀ = s·α·D·Âᵀ.
  d_A, d_B = lora_gradients(layout, D, A.hat, B.hat)
  common = (_col(s), _col(s), _col(k), _col(rho_max), _col(kappa_max), _col(nu_D))
  g_A = eq.scale_by(d_A, _col(B.scale), *common)
  g_B = eq.scale_by(d_B, _col(A.scale), *common)

  stored = lambda x, like: eq.saturating_cast(x, like.dtype)
  row, col = stored(row, moments.row), stored(col, moments.col)
  if projected is None:
    new = FactoredSecondMoment(row, col)
  else:
    new = moments._replace(
      m_a=stored(N_A, moments.m_a), m_b=stored(N_B, moments.m_b), row=row, col=col
    )
  return pair.replace(g_A=g_A, g_B=g_B), new


# What each field of a pair's moments is shaped like (`pairs.stored_shape`).
ROLES: dict[type, tuple[str, ...]] = {
  FullMoments: ("weight", "weight"),
  FactoredMoments: ("a", "b", "a", "b", "out", "in"),
  FactoredSecondMoment: ("out", "in"),
}
