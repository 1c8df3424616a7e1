"""The paper's products written for each storage layout of a pair.

The equations (`lorapro_jax.equations`) use the paper's orientation,
A (r×n) and B (m×r). Flax stores their transposes, ``lora_a`` = Aᵀ (n×r) and
``lora_b`` = Bᵀ (r×m), with the kernel (in, out) = (n, m). Transposing an
n×r leaf costs a strided pass over it (and XLA may repeat the transpose in
every consumer), so every product that touches a tall factor is written here
as an einsum on the stored arrays: only r×r matrices are ever in the paper's
orientation. All functions take arrays with one leading batch axis.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array
Layout = Literal["flax", "paper"]

# Subscripts of A, B and of the m×n weight (its moment) in each layout.
_A = {"flax": "nr", "paper": "rn"}
_B = {"flax": "rm", "paper": "mr"}
_W = {"flax": "nm", "paper": "mn"}


def _rename(sub: str, r: str) -> str:
  return sub.replace("r", r)


def gram_A(layout: Layout, X: Array, Y: Array) -> Array:
  """X·Yᵀ (r×r) for r×n factors, e.g. AAᵀ and g_lora^A·Aᵀ."""
  a = _A[layout]
  return jnp.einsum(f"k{a},k{_rename(a, 's')}->krs", X, Y)


def gram_B(layout: Layout, X: Array, Y: Array) -> Array:
  """Xᵀ·Y (r×r) for m×r factors, e.g. BᵀB and Bᵀ·g_lora^B."""
  b = _B[layout]
  return jnp.einsum(f"k{b},k{_rename(b, 's')}->krs", X, Y)


# At or below this rank the K = r products of `left` and `right` are written as r
# broadcast multiply-adds. Being elementwise, they fuse into their consumer (AdamW's
# moment updates, apply_updates), so the adjusted gradient is never written to
# memory; XLA does not fuse a dot there. Above it the dots are faster (Llama-2-7B
# shapes on CPU, chained with AdamW: faster unrolled at r = 8 and 16, slower at 32).
UNROLL_MAX_RANK = 16


def _sum(terms):
  terms = list(terms)
  return sum(terms[1:], terms[0])


def left(layout: Layout, M: Array, X: Array) -> Array:
  """M·X for an r×r M and an r×n factor X, in X's layout."""
  r = M.shape[-1]
  if r <= UNROLL_MAX_RANK:
    if layout == "flax":  # X (k, n, s): out[n, r] = Σ_s X[n, s]·M[r, s]
      return _sum(X[:, :, s, None] * M[:, None, :, s] for s in range(r))
    return _sum(M[:, :, s, None] * X[:, s, None, :] for s in range(r))
  a = _A[layout]
  return jnp.einsum(f"krs,k{_rename(a, 's')}->k{a}", M, X)


def right(layout: Layout, X: Array, M: Array) -> Array:
  """X·M for an m×r factor X and an r×r M, in X's layout."""
  r = M.shape[-1]
  if r <= UNROLL_MAX_RANK:
    if layout == "flax":  # X (k, s, m): out[r, m] = Σ_s M[s, r]·X[s, m]
      return _sum(M[:, s, :, None] * X[:, s, None, :] for s in range(r))
    return _sum(X[:, :, s, None] * M[:, None, s, :] for s in range(r))
  b = _B[layout]
  return jnp.einsum(f"k{_rename(b, 's')},ksr->k{b}", X, M)


def outer(layout: Layout, B: Array, g_A: Array, g_B: Array, A: Array) -> Array:
  """B·g_A + g_B·A (m×n; Eq. 55 without s), in the weight's layout ((n, m) for flax), as one
  matmul with inner dimension 2r so that the m×n result is written once."""
  if layout == "flax":  # (B·g_A + g_B·A)ᵀ = [g_Aᵀ, Aᵀ]·[Bᵀ; g_Bᵀ]
    return jnp.concatenate([g_A, A], -1) @ jnp.concatenate([B, g_B], -2)
  return jnp.concatenate([B, g_B], -1) @ jnp.concatenate([g_A, A], -2)


def project(layout: Layout, D: Array, A: Array, B: Array) -> tuple[Array, Array]:
  """(Bᵀ·D, D·Aᵀ) for an m×n D in the weight's layout: Eq. (56) without s."""
  a, b, w = _A[layout], _B[layout], _W[layout]
  return (jnp.einsum(f"k{w},k{b}->k{a}", D, B), jnp.einsum(f"k{w},k{a}->k{b}", D, A))


def scale_in(layout: Layout, X: Array, kappa: Array) -> Array:
  """X·diag(κ) for an r×n factor X and an n-vector κ (k, n)."""
  return X * (kappa[:, :, None] if layout == "flax" else kappa[:, None, :])


def scale_out(layout: Layout, X: Array, rho: Array) -> Array:
  """diag(ρ)·X for an m×r factor X and an m-vector ρ (k, m)."""
  return X * (rho[:, None, :] if layout == "flax" else rho[:, :, None])


def in_dot(layout: Layout, X: Array, Y: Array) -> Array:
  """Σ_a X[a, j]·Y[a, j] (k, n) for r×n factors: the columns' dot products."""
  return jnp.sum(X * Y, axis=-1 if layout == "flax" else -2)


def out_dot(layout: Layout, X: Array, Y: Array) -> Array:
  """Σ_a X[i, a]·Y[i, a] (k, m) for m×r factors: the rows' dot products."""
  return jnp.sum(X * Y, axis=-2 if layout == "flax" else -1)
