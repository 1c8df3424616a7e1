"""The LoRA-Pro equations for one pair, as pure functions on r×r matrices.

Symbols follow Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly
Optimized?" (ICLR 2025): W = W0 + s·B·A with B (m×r) and A (r×n), the full
fine-tuning gradient g (m×n), the LoRA gradients g_lora^A = s·Bᵀg (r×n) and
g_lora^B = s·g·Aᵀ (m×r) (Eq. 5), and the free r×r matrix X of Theorem 2.1.

Theorem 2.1 is written here as r×r coefficients that act on the factors and
gradients (`coefficients`); `lorapro_jax.batched` forms the r×r inputs and
applies the coefficients to the tall arrays. Every function takes
*normalised* inputs, A = α·Â, B = β·B̂ and gradients divided by γ, with the
scale ratio ρ = (β/α)² passed explicitly; the ordinary (raw) computation is
the case α = β = γ = 1. Three numerical choices make the functions differ
slightly from the printed equations while computing the same quantities:

* **Normalised units.** Gram matrices are Ĝ_B = B̂ᵀB̂ and Ĝ_A = ÂÂᵀ
  (BᵀB = β²·Ĝ_B, AAᵀ = α²·Ĝ_A), so float32 entries anywhere from 1e-30 to
  1e30 neither overflow nor underflow midway; `rescale` applies α, β, γ
  last, by exponent arithmetic.
* **Damping.** Each Gram matrix G is replaced by G + δ·(tr G / r)·I
  (Tikhonov damping relative to its mean eigenvalue). An all-zero matrix, as
  B = 0 at LoRA's initialisation, is inverted as zero, its pseudo-inverse.
  This bounds every inverse and changes a well-conditioned problem by a
  relative O(δ·cond).
* **One eigendecomposition per Gram matrix.** Ĝ = Q·diag(w)·Qᵀ gives the
  inverse and diagonalises the Sylvester equation (15), whose solution is
  then an elementwise division (Bartels-Stewart with symmetric factors).
"""

from __future__ import annotations

import typing
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
XChoice = Literal["sylvester", "zero", "symmetric"]
X_CHOICES: tuple[str, ...] = typing.get_args(XChoice)


class Normalised(NamedTuple):
  """A matrix M = scale · M_hat with max|M_hat| = 1 (or M = 0 and scale = 1)."""

  hat: Array
  scale: Array


class DampedEig(NamedTuple):
  """Ĝ + δ·(tr Ĝ / r)·I = Q diag(w) Qᵀ, with every w > 0."""

  w: Array
  Q: Array


def divide(x: Array, c: Array) -> Array:
  """x / c for positive c (a scale, broadcast against x), accurate for every finite c.

  Not written as ``x / c``: XLA on CPU divides by a broadcast scalar as a product
  with its reciprocal, and beyond c ≈ 1/tiny (8.5e37 in float32) 1/c is subnormal
  and flushed to zero, which made x / c exactly 0. Both are first scaled by an
  exact power of two that keeps c·q and 1/(c·q) normal.
  """
  info = jnp.finfo(c.dtype)
  big = 2.0 ** (info.maxexp // 2)
  q = jnp.where(c > big, 1 / big, 1).astype(c.dtype)
  return (x * q) / (c * q)


def normalise(M: Array) -> Normalised:
  """Splits M into max|M| and M / max|M| (scale 1 for zero or non-finite M)."""
  c = jnp.max(jnp.abs(M))
  c = jnp.where((c > 0) & jnp.isfinite(c), c, jnp.ones_like(c))
  return Normalised(divide(M, c), c)


def damped_eigh(G: Array, damping: Array | float) -> DampedEig:
  """Eigendecomposition of the damped Gram matrix (batched over leading axes).

  A non-finite G (an overflowed product) is decomposed as zero: `eigh` never
  sees NaN or Inf, and the caller discards that result. Eigenvalues are
  clipped at zero: rounding can make a PSD matrix's smallest ones negative.
  """
  finite = jnp.all(jnp.isfinite(G), axis=(-2, -1), keepdims=True)
  w, Q = jnp.linalg.eigh(jnp.where(finite, G, jnp.zeros_like(G)))
  w = jnp.maximum(w, 0)
  mean = jnp.mean(w, axis=-1, keepdims=True)
  # An all-zero Gram matrix (B = 0 or A = 0) gets the largest finite
  # eigenvalues, so that its inverse is 0: the pseudo-inverse of zero.
  big = jnp.full_like(mean, jnp.finfo(w.dtype).max)
  return DampedEig(jnp.where(mean > 0, w + damping * mean, big), Q)


def inverse(eig: DampedEig) -> Array:
  """Ĝ⁻¹ = Q diag(1/w) Qᵀ."""
  return (eig.Q / eig.w[..., None, :]) @ jnp.swapaxes(eig.Q, -1, -2)


def solve_sylvester(C: Array, eig_B: DampedEig, eig_A: DampedEig, ratio: Array | float) -> Array:
  """Theorem 2.3: solves ρ·Ĝ_B·Z + Z·Ĝ_A = C.

  With Ĝ_B = U diag(λ) Uᵀ and Ĝ_A = V diag(μ) Vᵀ the equation is diagonal:
  Z̃_ij = (UᵀCV)_ij / (ρ·λ_i + μ_j). Every λ, μ is positive after damping, so
  the denominator never vanishes; an overflowing ρ correctly sends Z to zero.
  """
  U, V = eig_B.Q, eig_A.Q
  denom = ratio * eig_B.w[:, None] + eig_A.w[None, :]
  return U @ (((U.T @ C) @ V) / denom) @ V.T


class Coefficients(NamedTuple):
  """Theorem 2.1 as r×r matrices acting on the (normalised) factors:

    g^A = M1·g_lora^A + X·A,    g^B = g_lora^B·M3 - B·P - B·X,

  with M1 = (BᵀB)⁻¹/s², M3 = (AAᵀ)⁻¹/s² and P = (BᵀB)⁻¹(Bᵀg_lora^B)(AAᵀ)⁻¹/s²:
  Eq. (8) as printed, and Eq. (10) with its projector I - B(BᵀB)⁻¹Bᵀ
  multiplied out, so that the only products with a tall matrix are K = r
  products with these coefficients.

  In normalised units (see `x_matrix` for Z): with γ the gradients' scale,
  g^A = γ/β²·M1·ĝ^A + γ/(β·d)·Z·Â and
  g^B = γ/α²·(ĝ^B·M3 - B̂·P) - γ/(α·d)·B̂·Z, where d is `x_unit`'s scale.
  """

  M1: Array
  M3: Array
  P: Array
  Z: Array


def x_matrix(
  x_choice: XChoice, M1: Array, P: Array, C_A: Array, eig_A: DampedEig, eig_B: DampedEig, ratio
) -> Array:
  """The free matrix X of Theorem 2.1, as Z = d·α·β·X/γ (see `x_unit` for d).

  * "sylvester" (Theorem 2.3): BᵀB·X + X·AAᵀ = -(1/s²)(BᵀB)⁻¹ g_lora^A Aᵀ
    (Eq. 15), which in normalised units reads ρ·Ĝ_B·Z + Z·Ĝ_A = -M1·Ĉ_A,
    with d = β.
  * "symmetric": the corrected Eq. (16). As printed it is m×n, not r×r; the X
    that enforces g^B·A = B·g^A in the least-squares sense is
    X = -(1/(2s²))(BᵀB)⁻¹ Bᵀ g_lora^B (AAᵀ)⁻¹ = -P/2, with d = α.
  * "zero": X = 0.
  """
  if x_choice == "sylvester":
    return solve_sylvester(-(M1 @ C_A), eig_B, eig_A, ratio)
  if x_choice == "symmetric":
    return -P / 2
  if x_choice == "zero":
    return jnp.zeros_like(P)
  raise ValueError(f"x_choice must be one of {X_CHOICES}, got {x_choice!r}")


def x_unit(x_choice: XChoice) -> Literal["A", "B"]:
  """Which factor's scale d is in Z = d·α·β·X/γ: the one that keeps Z free of
  α/β ratios (β for "sylvester", α otherwise)."""
  return "B" if x_choice == "sylvester" else "A"


def coefficients(
  C_A: Array,
  C_B: Array,
  eig_A: DampedEig,
  eig_B: DampedEig,
  s: Array,
  x_choice: XChoice,
  ratio: Array | float = 1.0,
) -> Coefficients:
  """The `Coefficients` of one pair from its r×r products.

  Args:
    C_A, C_B: Ĉ_A = ĝ^A·Âᵀ and Ĉ_B = B̂ᵀ·ĝ^B (raw: g_lora^A·Aᵀ, Bᵀ·g_lora^B).
    eig_A, eig_B: `damped_eigh` of Ĝ_A = ÂÂᵀ and Ĝ_B = B̂ᵀB̂.
    s: the LoRA scaling.
    x_choice: see `x_matrix`.
    ratio: ρ = (β/α)²; 1 on raw inputs.
  """
  G_A_inv, G_B_inv = inverse(eig_A), inverse(eig_B)
  M1, M3 = G_B_inv / s**2, G_A_inv / s**2
  P = M1 @ C_B @ G_A_inv
  return Coefficients(M1, M3, P, x_matrix(x_choice, M1, P, C_A, eig_A, eig_B, ratio))


def saturate(x: Array) -> Array:
  """Clips to the finite range of x's dtype; NaN stays NaN."""
  big = jnp.finfo(x.dtype).max
  return jnp.clip(x, -big, big)


def saturating_cast(x: Array, dtype) -> Array:
  """Casts to ``dtype``, clipping finite overflow to its largest finite value.

  NaN stays NaN, so non-finite gradients propagate as in optax.
  """
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).max < jnp.finfo(x.dtype).max:
    x = jnp.clip(x, -jnp.finfo(dtype).max, jnp.finfo(dtype).max)
  return x.astype(dtype)


def scale_by(x: Array, *factors: Array) -> Array:
  """x·f1·f2·… for non-negative scalars f_i, saturated; no product of the
  factors is formed (see `rescale`), so none overflows or underflows midway."""
  m, e = jnp.ones_like(x), jnp.zeros(jnp.shape(x), jnp.int32)
  for f in factors:
    f_m, f_e = jnp.frexp(f)
    m, e = m * f_m, e + f_e  # mantissas in [0.5, 1): m stays in (2**-len(factors), 1]
  return saturate(jnp.ldexp(x * m, e))


def rescale(x: Array, gamma: Array, *divisors: Array) -> Array:
  """x·γ / (d1·d2·…) for positive scalars γ, d_i, saturated.

  Not written as ``x * gamma / d1 / d2``: XLA rewrites (x/a)/b as x/(a·b),
  and a·b underflows (flushed to 0 on CPU, giving 0/0) or overflows for
  scales such as 1e-20 or 1e20. The binary exponents are summed as integers
  instead and applied last by `jnp.ldexp`.
  """
  m, e = jnp.frexp(gamma)
  for d in divisors:
    d_m, d_e = jnp.frexp(d)
    m, e = m / d_m, e - d_e  # mantissas in [0.5, 1): m stays in (0.5, 2**len(divisors))
  return saturate(jnp.ldexp(x * m, e))
