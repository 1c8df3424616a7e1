"""Per-layer-loop baselines: the same LoRA-Pro math, one pair at a time.

This is how the published PyTorch LoRA-Pro optimizer works: a Python loop over
the adapted layers, each pair adjusted by its own small kernels. Here every
pair is one jitted call (compiled once per shape, so the loop pays dispatch,
not compilation) built from the single-pair functions of
``lorapro_jax.equations``, so the batched engine and these baselines compute
the same quantities and differ only in how the work is issued.

* ``variant="factored"``: Theorem 2.1 as the batched engine's raw path computes
  it (``equations.coefficients`` on the products of ``lorapro_jax.layout``),
  O((m + n)·r²) per pair, without the engine's fallback checks (which only
  make the loop look better).
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

from lorapro_jax import equations as eq
from lorapro_jax import layout as lo
from lorapro_jax import pairs as pairs_lib


def adjust_one(a, b, ga, gb, s, *, damping, x_choice, projector):
  """One pair in the flax layout: a (n, r), b (r, m) and their gradients."""
  if projector:
    return _adjust_projector(a, b, ga, gb, s, damping=damping, x_choice=x_choice)
  A, B, gA, gB = (x[None] for x in (a, b, ga, gb))  # a batch of one, flax layout
  G_A, G_B = lo.gram_A("flax", A, A)[0], lo.gram_B("flax", B, B)[0]
  C_A, C_B = lo.gram_A("flax", gA, A)[0], lo.gram_B("flax", B, gB)[0]
  M1, M2, M3, M4 = (
    M[None]
    for M in eq.coefficients(
      G_A, G_B, C_A, C_B, s, eq.damped_eigh(G_A, damping), eq.damped_eigh(G_B, damping), x_choice
    )
  )
  g_A = lo.left("flax", M1, gA) + lo.left("flax", M2, A)
  g_B = lo.right("flax", gB, M3) - lo.right("flax", B, M4)
  return g_A[0], g_B[0]


def _adjust_projector(a, b, ga, gb, s, *, damping, x_choice):
  A, B, gA, gB = a.T, b.T, ga.T, gb.T  # the paper's A (r, n), B (m, r)
  An, Bn = eq.normalise(A), eq.normalise(B)
  eig_B = eq.damped_eigh(eq.gram_B(Bn.hat), damping)
  eig_A = eq.damped_eigh(eq.gram_A(An.hat), damping)
  GBi, GAi = eq.inverse(eig_B), eq.inverse(eig_A)
  if x_choice == "sylvester":
    C = eq.sylvester_rhs(gA, An, Bn, GBi, s)
    Y = eq.solve_sylvester(C, eig_B, eig_A, (Bn.scale / An.scale) ** 2)
  elif x_choice == "symmetric":
    Y = eq.x_symmetric(gB, An, Bn, GAi, GBi, s)
  else:
    Y = jnp.zeros_like(GAi)
  al, be = An.scale, Bn.scale
  m = B.shape[0]
  g_A = ((GBi @ (gA / be)) / s**2 + Y @ An.hat) / be
  P = jnp.eye(m, dtype=B.dtype) - Bn.hat @ GBi @ Bn.hat.T  # m×m, as published
  g_B = ((P @ (gB / al)) @ GAi / s**2 - Bn.hat @ Y) / al
  return g_A.T.astype(ga.dtype), g_B.T.astype(gb.dtype)


class LoopLoraPro:
  """``step()`` adjusts every pair of ``grads`` with one jitted call per pair."""

  def __init__(
    self, params, grads, scale, *, variant="factored", x_choice="sylvester", damping=1e-6
  ):
    self.found = pairs_lib.find_pairs(params)
    for f in self.found:
      if f.layout != "flax" or f.batch_shape:
        raise ValueError("the loop baseline takes unstacked flax-layout pairs")
    self.p_leaves = jax.tree.leaves(params)
    self.g_leaves, self.treedef = jax.tree.flatten(grads)
    self.scale = jnp.asarray(scale, jnp.float32)
    self.fn = jax.jit(
      functools.partial(
        adjust_one, damping=damping, x_choice=x_choice, projector=(variant == "projector")
      )
    )

  def step(self):
    out = list(self.g_leaves)
    p, g = self.p_leaves, self.g_leaves
    for f in self.found:
      out[f.a_index], out[f.b_index] = self.fn(
        p[f.a_index], p[f.b_index], g[f.a_index], g[f.b_index], self.scale
      )
    return jax.tree.unflatten(self.treedef, out)
