"""The LoRA-Pro equations, one pure function per equation.

Symbols follow Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly
Optimized?" (ICLR 2025): W = W0 + s·B·A with B (m×r) and A (r×n), the full
fine-tuning gradient g (m×n), the LoRA gradients g_lora^A = s·Bᵀg (r×n) and
g_lora^B = s·g·Aᵀ (m×r) (Eq. 5), and the free r×r matrix X of Theorem 2.1.
Every function works on one pair; `lorapro_jax.batched` vmaps them.

`coefficients` writes Theorem 2.1 as four r×r matrices that act on the raw
factors and gradients: the form `lorapro_jax.batched` uses by default. The
other functions are the scale-safe form it falls back to for inputs whose raw
products would overflow or underflow. Three numerical choices make them
differ slightly from the printed equations while computing the same
quantities:

* **Scale normalisation.** A = α·Â and B = β·B̂ with α = max|A|, β = max|B|.
  Gram matrices are formed from Â and B̂ (BᵀB = β²·Ĝ_B, AAᵀ = α²·Ĝ_A) and the
  factors α, β are carried analytically, so float32 entries anywhere from
  1e-30 to 1e30 neither overflow nor underflow. X is carried as
  Y = α·β·X, the quantity that multiplies Â and B̂.
* **Damping.** Each Gram matrix G (raw or normalised) is replaced by
  G + δ·(tr G / r)·I (Tikhonov damping relative to its mean eigenvalue; an
  all-zero matrix, as B = 0 at LoRA's initialisation, is inverted as zero,
  its pseudo-inverse).
  This bounds every inverse and changes a well-conditioned problem by a
  relative O(δ·cond).
* **One eigendecomposition per Gram matrix.** Ĝ = Q·diag(w)·Qᵀ gives the
  inverse and diagonalises the Sylvester equation (15), whose solution is then
  an elementwise division (Bartels-Stewart with symmetric factors).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Normalised(NamedTuple):
  """A matrix M = scale · M_hat with max|M_hat| = 1 (or M = 0 and scale = 1)."""

  hat: Array
  scale: Array


class DampedEig(NamedTuple):
  """Ĝ + δ·(tr Ĝ / r)·I = Q diag(w) Qᵀ, with every w > 0."""

  w: Array
  Q: Array


def normalise(M: Array) -> Normalised:
  """Splits M into max|M| and M / max|M| (scale 1 for zero or non-finite M)."""
  c = jnp.max(jnp.abs(M))
  c = jnp.where((c > 0) & jnp.isfinite(c), c, jnp.ones_like(c))
  return Normalised(M / c, c)


def gram_B(B_hat: Array) -> Array:
  """Ĝ_B = B̂ᵀB̂ (r×r); BᵀB = β²·Ĝ_B."""
  return B_hat.T @ B_hat


def gram_A(A_hat: Array) -> Array:
  """Ĝ_A = ÂÂᵀ (r×r); AAᵀ = α²·Ĝ_A."""
  return A_hat @ A_hat.T


def damped_eigh(G: Array, damping: Array | float) -> DampedEig:
  """Eigendecomposition of the damped Gram matrix (batched over leading axes).

  Eigenvalues are clipped at zero first: a PSD matrix's rounding error can
  make its smallest eigenvalues slightly negative.
  """
  w, Q = jnp.linalg.eigh(G)
  w = jnp.maximum(w, 0)
  mean = jnp.mean(w, axis=-1, keepdims=True)
  # An all-zero Gram matrix (B = 0 or A = 0) gets the largest finite
  # eigenvalues, so that its inverse is 0: the pseudo-inverse of zero.
  big = jnp.full_like(mean, jnp.finfo(w.dtype).max)
  return DampedEig(jnp.where(mean > 0, w + damping * mean, big), Q)


def inverse(eig: DampedEig) -> Array:
  """Ĝ⁻¹ = Q diag(1/w) Qᵀ."""
  return (eig.Q / eig.w[..., None, :]) @ jnp.swapaxes(eig.Q, -1, -2)


def sylvester_rhs(g_lora_A: Array, A: Normalised, B: Normalised, G_B_inv: Array, s: Array) -> Array:
  """Right-hand side of Eq. (15), -(1/s²)(BᵀB)⁻¹ g_lora^A Aᵀ, in Y units.

  Multiplying Eq. (15) by β/α turns it into
  (β/α)²·Ĝ_B·Y + Y·Ĝ_A = -(1/s²)·Ĝ_B⁻¹·(g_lora^A / β)·Âᵀ.
  """
  return -(G_B_inv @ ((g_lora_A / B.scale) @ A.hat.T)) / s**2


def solve_sylvester(
  C: Array, eig_B: DampedEig, eig_A: DampedEig, beta_over_alpha_sq: Array
) -> Array:
  """Theorem 2.3: solves (β/α)²·Ĝ_B·Y + Y·Ĝ_A = C for Y = α·β·X.

  With Ĝ_B = U diag(λ) Uᵀ and Ĝ_A = V diag(μ) Vᵀ the equation is diagonal:
  Ỹ_ij = (UᵀCV)_ij / ((β/α)²·λ_i + μ_j). Every λ, μ is positive after damping,
  so the denominator never vanishes; an overflowing (β/α)² correctly sends
  Y to zero.
  """
  U, V = eig_B.Q, eig_A.Q
  denom = beta_over_alpha_sq * eig_B.w[:, None] + eig_A.w[None, :]
  return U @ (((U.T @ C) @ V) / denom) @ V.T


def x_symmetric(
  g_lora_B: Array, A: Normalised, B: Normalised, G_A_inv: Array, G_B_inv: Array, s: Array
) -> Array:
  """Corrected Eq. (16), in Y units.

  The printed Eq. (16) is m×n, not r×r. The X that enforces g^B·A = B·g^A in
  the least-squares sense is X = -(1/(2s²))(BᵀB)⁻¹ Bᵀ g_lora^B (AAᵀ)⁻¹, i.e.
  Y = α·β·X = -(1/(2s²))·Ĝ_B⁻¹·B̂ᵀ·(g_lora^B / α)·Ĝ_A⁻¹.
  """
  return -(G_B_inv @ (B.hat.T @ (g_lora_B / A.scale)) @ G_A_inv) / (2 * s**2)


def saturate(x: Array) -> Array:
  """Clips to the finite range of x's dtype; NaN stays NaN."""
  big = jnp.finfo(x.dtype).max
  return jnp.clip(x, -big, big)


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


def adjusted_gradients(
  g_lora_A: Array,
  g_lora_B: Array,
  A: Normalised,
  B: Normalised,
  G_A_inv: Array,
  G_B_inv: Array,
  Y: Array,
  s: Array,
  y_div: Array | float = 1.0,
  gamma: Array | float = 1.0,
) -> tuple[Array, Array]:
  """Theorem 2.1, Eq. (8) and (10):

    g^A = (1/s²)(BᵀB)⁻¹ g_lora^A + X·A
    g^B = (1/s²)[I - B(BᵀB)⁻¹Bᵀ] g_lora^B (AAᵀ)⁻¹ - B·X

  written with B = β·B̂, A = α·Â, X = Y/(αβ), and without forming the m×m
  projector: every product costs O((m + n)·r²).

  The gradients may be passed divided by γ and Y by γ/y_div (as
  `lorapro_jax.batched.adjust` does, so that they are at most 1): each term is
  formed from these, then multiplied by γ and divided by α or β last, and
  saturated. A result beyond the dtype's range (e.g. g_lora^A / β² for a tiny
  β) becomes ±max, never Inf or NaN.
  """
  a, b = A.scale, B.scale
  scaled = lambda x, d1, d2: rescale(x, gamma, d1, d2)
  g_A = scaled((G_B_inv @ g_lora_A) / s**2, b, b) + scaled(Y @ A.hat, y_div, b)
  T = (g_lora_B @ G_A_inv) / s**2
  g_B = scaled(T - B.hat @ (G_B_inv @ (B.hat.T @ T)), a, a) - scaled(B.hat @ Y, y_div, a)
  return saturate(g_A), saturate(g_B)


class Coefficients(NamedTuple):
  """Theorem 2.1 as four r×r matrices acting on the raw factors:

    g^A = M1·g_lora^A + M2·A,    g^B = g_lora^B·M3 - B·M4,

  with M1 = (BᵀB)⁻¹/s², M2 = X, M3 = (AAᵀ)⁻¹/s² and
  M4 = (BᵀB)⁻¹(Bᵀg_lora^B)(AAᵀ)⁻¹/s² + X: Eq. (8) as printed, and Eq. (10)
  with its projector multiplied out, so the only products with a tall matrix
  are K = r products with these coefficients.
  """

  M1: Array
  M2: Array
  M3: Array
  M4: Array


def coefficients(
  G_A: Array,
  G_B: Array,
  C_A: Array,
  C_B: Array,
  s: Array,
  eig_A: DampedEig,
  eig_B: DampedEig,
  x_choice: str,
) -> Coefficients:
  """The `Coefficients` of one pair from its r×r products.

  Args:
    G_A, G_B: AAᵀ and BᵀB (raw, not normalised).
    C_A, C_B: g_lora^A·Aᵀ and Bᵀ·g_lora^B.
    s: the LoRA scaling.
    eig_A, eig_B: `damped_eigh` of G_A and G_B.
    x_choice: "sylvester" (Eq. 15, whose right-hand side is -M1·C_A),
      "symmetric" (corrected Eq. 16) or "zero".
  """
  G_A_inv, G_B_inv = inverse(eig_A), inverse(eig_B)
  M1, M3 = G_B_inv / s**2, G_A_inv / s**2
  P = M1 @ C_B @ G_A_inv  # (BᵀB)⁻¹ Bᵀg_lora^B (AAᵀ)⁻¹ / s²
  if x_choice == "sylvester":
    X = solve_sylvester(-(M1 @ C_A), eig_B, eig_A, 1.0)
  elif x_choice == "symmetric":
    X = -P / 2
  else:
    X = jnp.zeros_like(P)
  return Coefficients(M1, X, M3, P + X)
