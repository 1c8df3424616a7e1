"""Per-layer-loop baselines: the same LoRA-Pro math, one pair at a time.

This is how the published PyTorch LoRA-Pro optimizer works: a Python loop over
the adapted layers, each pair adjusted by its own small kernels. Here every
pair is one jitted call (compiled once per shape, so the loop pays dispatch,
not compilation). The math is written out here with plain ``jnp`` (Theorem 2.1
with the Sylvester X of Theorem 2.3, the damped inverses of `lorapro_jax`), so
the baseline does not depend on the library's internals:

* ``variant="factored"``: Theorem 2.1 as r×r coefficients on the raw factors,
  O((m + n)·r²) per pair, like the batched engine's raw path, without its
  fallback checks (which only make the loop look better).
* ``variant="projector"``: like the published code, forms the m×m projector
  I - B(BᵀB)⁻¹Bᵀ and multiplies g_lora^B by it, O(m²·r) time and m² memory.

Only the gradient adjustment is timed (no Adam): the batched counterpart is
``lorapro(...)`` on its own, whose output is the same pytree of adjusted
gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _damped_eigh(G, damping):
  """G + δ·(tr G / r)·I = Q diag(w) Qᵀ (an all-zero G gets w = max: its inverse is 0)."""
  w, Q = jnp.linalg.eigh(G)
  w = jnp.maximum(w, 0)
  mean = jnp.mean(w)
  return jnp.where(mean > 0, w + damping * mean, jnp.finfo(w.dtype).max), Q


def _inverse(w, Q):
  return (Q / w[None, :]) @ Q.T


def adjust_one(a, b, ga, gb, s, *, damping, x_choice, projector):
  """One pair in the flax layout: a = Aᵀ (n, r), b = Bᵀ (r, m) and their gradients."""
  A, B, gA, gB = a.T, b.T, ga.T, gb.T  # the paper's A (r, n), B (m, r)
  G_A, G_B = A @ A.T, B.T @ B
  (w_A, Q_A), (w_B, Q_B) = _damped_eigh(G_A, damping), _damped_eigh(G_B, damping)
  G_A_inv, G_B_inv = _inverse(w_A, Q_A), _inverse(w_B, Q_B)
  M1, M3 = G_B_inv / s**2, G_A_inv / s**2
  if x_choice == "sylvester":  # Eq. (15): G_B X + X G_A = -M1 g_lora^A Aᵀ, diagonalised
    C = -(M1 @ (gA @ A.T))
    X = Q_B @ ((Q_B.T @ C @ Q_A) / (w_B[:, None] + w_A[None, :])) @ Q_A.T
  elif x_choice == "symmetric":
    X = -(M1 @ (B.T @ gB) @ G_A_inv) / 2
  else:
    X = jnp.zeros_like(G_A)
  g_A = M1 @ gA + X @ A  # Eq. (8)
  if projector:  # Eq. (10) as published: the m×m projector
    P = jnp.eye(B.shape[0], dtype=B.dtype) - B @ G_B_inv @ B.T
    g_B = P @ gB @ M3 - B @ X
  else:  # the projector multiplied out: r×r coefficients only
    g_B = gB @ M3 - B @ (M1 @ (B.T @ gB) @ G_A_inv + X)
  return g_A.T.astype(ga.dtype), g_B.T.astype(gb.dtype)


def _pair_paths(tree, prefix=()):
  """Paths of the dicts holding a ``lora_a``/``lora_b`` pair (the trees of `models`)."""
  if isinstance(tree, dict):
    if "lora_a" in tree and "lora_b" in tree:
      return [prefix]
    return [p for k in tree for p in _pair_paths(tree[k], prefix + (k,))]
  return []


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


class LoopLoraPro:
  """``step()`` adjusts every pair of ``grads`` with one jitted call per pair."""

  def __init__(
    self, params, grads, scale, *, variant="factored", x_choice="sylvester", damping=1e-6
  ):
    self.paths = _pair_paths(params)
    for path in self.paths:
      if jnp.ndim(_get(params, path)["lora_a"]) != 2:
        raise ValueError("the loop baseline takes unstacked flax-layout pairs")
    self.params, self.grads = params, grads
    self.scale = jnp.asarray(scale, jnp.float32)
    self.fn = jax.jit(
      functools.partial(
        adjust_one, damping=damping, x_choice=x_choice, projector=(variant == "projector")
      )
    )

  def step(self):
    out = []
    for path in self.paths:
      p, g = _get(self.params, path), _get(self.grads, path)
      out.append(self.fn(p["lora_a"], p["lora_b"], g["lora_a"], g["lora_b"], self.scale))
    return out
