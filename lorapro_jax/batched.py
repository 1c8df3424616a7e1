"""Batching the equations over every pair of a model.

`adjust` takes each pair in its storage layout with its batch axes flattened
(flax: A (N, n, r), B (N, r, m); paper: A (N, r, n), B (N, m, r)) and returns
Theorem 2.1's gradients in the same layout. Two paths compute the same map:

* **Raw (the default).** Per pair, four r×r products on the raw factors
  (AAᵀ, BᵀB, g_lora^A·Aᵀ, Bᵀ·g_lora^B), written in the leaf's layout so no tall
  array is transposed, concatenated or copied; then all r×r work of all pairs
  of one rank (eigendecompositions, Sylvester solves, `equations.coefficients`)
  as one batched computation; then two K = r products per output.
* **Normalised (the fallback).** Factors and gradients divided by their
  largest entries, scales carried analytically (`equations`), so that inputs
  anywhere in the dtype's range give finite results. It is taken, through
  `jax.lax.cond`, for a rank's pairs whenever the raw path cannot be trusted:
  a Gram trace below ``r·tiny/eps`` (B = 0 at LoRA's initialisation, or
  entries whose squares underflow) or above ``eps/tiny`` (whose inverse may
  underflow; Inf when the squares overflow), or a bound on the output products above a
  quarter of the dtype's range (overflow, a non-finite coefficient, or a NaN
  or Inf input, which the fallback propagates per slice). The bound needs the
  largest gradient entry: one reduction over each gradient.

Everything is traced once into the jitted update: no Python loop at run time
and no host synchronisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from lorapro_jax import equations as eq
from lorapro_jax import layout as lo

XChoice = Literal["sylvester", "zero", "symmetric"]
X_CHOICES = ("sylvester", "zero", "symmetric")

_vmap_normalise = jax.vmap(eq.normalise)
_vmap_rhs = jax.vmap(eq.sylvester_rhs)
_vmap_solve = jax.vmap(eq.solve_sylvester)
_vmap_sym = jax.vmap(eq.x_symmetric)
_vmap_adjust = jax.vmap(eq.adjusted_gradients)
_vmap_coefficients = jax.vmap(eq.coefficients, in_axes=(0,) * 7 + (None,))


def compute_dtype(*arrays):
  """float32, or float64 when an input is float64; never a narrower type."""
  return jnp.promote_types(jnp.float32, jnp.result_type(*arrays))


def _cat(xs):
  return xs[0] if len(xs) == 1 else jnp.concatenate(xs, 0)


def _split(x, sizes):
  if len(sizes) == 1:
    return [x]
  out, start = [], 0
  for k in sizes:
    out.append(x[start : start + k])
    start += k
  return out


@dataclasses.dataclass
class Group:
  members: list[int]  # indices of the pairs, in order
  sizes: list[int]  # batch size N of each member
  A: eq.Normalised = None
  B: eq.Normalised = None
  s: jax.Array = None
  eig_A: eq.DampedEig = None
  eig_B: eq.DampedEig = None
  G_A_inv: jax.Array = None
  G_B_inv: jax.Array = None


@dataclasses.dataclass
class Prepared:
  """Normalised factors and damped Gram eigendecompositions of every pair."""

  groups: list[Group]
  buckets: dict  # (r, dtype) -> list of group indices sharing one eigh call
  n_pairs: int

  def split(self, per_group: Sequence[jax.Array]) -> list[jax.Array]:
    """Per-group batched arrays back to one array per pair."""
    out = [None] * self.n_pairs
    for grp, x in zip(self.groups, per_group):
      for i, xi in zip(grp.members, _split(x, grp.sizes)):
        out[i] = xi
    return out

  def gather(self, per_pair: Sequence[jax.Array]) -> list[jax.Array]:
    """One array per pair to per-group batched arrays."""
    return [_cat([per_pair[i] for i in grp.members]) for grp in self.groups]


def prepare(
  As: Sequence[jax.Array], Bs: Sequence[jax.Array], scales: Sequence[jax.Array], damping
) -> Prepared:
  """Normalises A and B and decomposes their damped Gram matrices.

  Args:
    As: per pair, A in the paper's orientation, (N, r, n), in compute dtype.
    Bs: per pair, B (N, m, r), same dtype as its A.
    scales: per pair, the LoRA scaling s, shape (N,).
    damping: relative damping δ (see `lorapro_jax.equations`).
  """
  keys = {}
  for i, (A, B) in enumerate(zip(As, Bs)):
    key = (B.shape[1], A.shape[2], A.shape[1], jnp.dtype(A.dtype))
    keys.setdefault(key, []).append(i)
  groups = []
  for members in keys.values():
    grp = Group(members, [As[i].shape[0] for i in members])
    grp.A = _vmap_normalise(_cat([As[i] for i in members]))
    grp.B = _vmap_normalise(_cat([Bs[i] for i in members]))
    grp.s = _cat([scales[i] for i in members])
    groups.append(grp)

  buckets: dict = {}
  for gi, (key, _) in enumerate(zip(keys, groups)):
    buckets.setdefault(key[2:], []).append(gi)
  for gis in buckets.values():
    grams = [jax.vmap(eq.gram_B)(groups[g].B.hat) for g in gis]
    grams += [jax.vmap(eq.gram_A)(groups[g].A.hat) for g in gis]
    eig = eq.damped_eigh(jnp.concatenate(grams, 0), damping)
    inv = eq.inverse(eig)
    sizes = [groups[g].B.hat.shape[0] for g in gis] * 2
    parts = [_split(x, sizes) for x in (eig.w, eig.Q, inv)]
    k = len(gis)
    for j, g in enumerate(gis):
      grp = groups[g]
      grp.eig_B = eq.DampedEig(parts[0][j], parts[1][j])
      grp.eig_A = eq.DampedEig(parts[0][k + j], parts[1][k + j])
      grp.G_B_inv, grp.G_A_inv = parts[2][j], parts[2][k + j]
  return Prepared(groups, buckets, len(As))


def _unit(M: eq.Normalised) -> eq.Normalised:
  """M's normalised factor with scale 1: its scale is applied later."""
  return eq.Normalised(M.hat, jnp.ones_like(M.scale))


def _sylvester_Y(prep: Prepared, gA: Sequence[jax.Array]) -> list[jax.Array]:
  """β·Y = α·β²·X of Theorem 2.3 for every group, one batched solve per rank."""
  Ys = [None] * len(prep.groups)
  for gis in prep.buckets.values():
    grps = [prep.groups[g] for g in gis]
    C = _cat(
      [_vmap_rhs(gA[g], grp.A, _unit(grp.B), grp.G_B_inv, grp.s) for g, grp in zip(gis, grps)]
    )
    ratio = _cat([(grp.B.scale / grp.A.scale) ** 2 for grp in grps])
    eig_B = eq.DampedEig(*(_cat(x) for x in zip(*(grp.eig_B for grp in grps))))
    eig_A = eq.DampedEig(*(_cat(x) for x in zip(*(grp.eig_A for grp in grps))))
    Y = _vmap_solve(C, eig_B, eig_A, ratio)
    for g, y in zip(gis, _split(Y, [grp.s.shape[0] for grp in grps])):
      Ys[g] = y
  return Ys


def _max_abs(ga, gb):
  """max(|g_lora^A|, |g_lora^B|) of every slice, (N, 1, 1)."""
  m = lambda g: jnp.max(jnp.abs(g), axis=(1, 2), keepdims=True)
  return jnp.maximum(m(ga), m(gb))


def adjust_normalised(
  prep: Prepared, gA: Sequence[jax.Array], gB: Sequence[jax.Array], x_choice: XChoice
) -> tuple[list[jax.Array], list[jax.Array]]:
  """Theorem 2.1 on normalised factors, for every group (paper orientation;
  inputs and outputs batched per group).

  The map is linear in the gradients: each slice's pair is divided by its
  largest entry γ, and γ and the factors' scales α, β are applied last
  (`equations.adjusted_gradients`), so no finite input overflows midway and
  an output beyond the dtype's range saturates. A slice with a NaN or Inf
  gradient returns NaN in both of its outputs, which propagates like
  optax's own transformations.
  """
  gammas = [_max_abs(ga, gb) for ga, gb in zip(gA, gB)]
  finite = [jnp.isfinite(g) for g in gammas]
  gammas = [jnp.where(ok & (g > 0), g, jnp.ones_like(g)) for ok, g in zip(finite, gammas)]
  gA = [ga / g for ga, g in zip(gA, gammas)]
  gB = [gb / g for gb, g in zip(gB, gammas)]
  if x_choice == "sylvester":  # Y passed as β·Y
    Ys = _sylvester_Y(prep, gA)
    y_divs = [grp.B.scale for grp in prep.groups]
  elif x_choice == "symmetric":  # Y passed as α·Y
    Ys = [
      _vmap_sym(gb, _unit(grp.A), grp.B, grp.G_A_inv, grp.G_B_inv, grp.s)
      for gb, grp in zip(gB, prep.groups)
    ]
    y_divs = [grp.A.scale for grp in prep.groups]
  elif x_choice == "zero":
    Ys = [jnp.zeros_like(grp.G_A_inv) for grp in prep.groups]
    y_divs = [jnp.ones_like(grp.s) for grp in prep.groups]
  out = [
    _vmap_adjust(ga, gb, grp.A, grp.B, grp.G_A_inv, grp.G_B_inv, Y, grp.s, d, g[:, 0, 0])
    for ga, gb, Y, d, g, grp in zip(gA, gB, Ys, y_divs, gammas, prep.groups)
  ]
  nan = lambda x, ok: jnp.where(ok, x, jnp.nan)
  return (
    [nan(o[0], ok) for o, ok in zip(out, finite)],
    [nan(o[1], ok) for o, ok in zip(out, finite)],
  )


class LeafPair(NamedTuple):
  """One pair in its storage layout, batch axes flattened to N (see module doc)."""

  A: jax.Array
  B: jax.Array
  g_A: jax.Array  # g_lora^A, laid out like A
  g_B: jax.Array
  s: jax.Array  # (N,)
  layout: lo.Layout


def _normalised_path(pairs: Sequence[LeafPair], x_choice, damping):
  """`adjust_normalised` on leaf-layout pairs (the fallback of `adjust`)."""
  paper = lambda x, p: lo.to_paper(x, p.layout)
  prep = prepare(
    [paper(p.A, p) for p in pairs], [paper(p.B, p) for p in pairs], [p.s for p in pairs], damping
  )
  gA, gB = adjust_normalised(
    prep,
    prep.gather([paper(p.g_A, p) for p in pairs]),
    prep.gather([paper(p.g_B, p) for p in pairs]),
    x_choice,
  )
  return [(paper(a, p), paper(b, p)) for a, b, p in zip(prep.split(gA), prep.split(gB), pairs)]


def adjust(
  pairs: Sequence[LeafPair], x_choice: XChoice, damping
) -> list[tuple[jax.Array, jax.Array]]:
  """Theorem 2.1 for every pair: (g^A, g^B) per pair, laid out like (A, B).

  Pairs of one rank and dtype share one batched r×r computation and one
  raw-or-normalised decision (see the module docstring). A result beyond the
  dtype's range saturates; a slice with a NaN or Inf gradient returns NaN in
  both of its outputs.
  """
  if x_choice not in X_CHOICES:
    raise ValueError(f"x_choice must be one of {X_CHOICES}, got {x_choice!r}")
  # Jitted so that an eager call compiles one computation (with both branches
  # of the cond) instead of dispatching every op; inlined under an outer jit.
  return _adjust_jit([p[:5] for p in pairs], tuple(p.layout for p in pairs), x_choice, damping)


@partial(jax.jit, static_argnums=(1, 2))
def _adjust_jit(arrays, layouts, x_choice, damping):
  pairs = [LeafPair(*a, layout) for a, layout in zip(arrays, layouts)]
  buckets: dict = {}
  for i, p in enumerate(pairs):
    buckets.setdefault(
      (p.A.shape[-1] if p.layout == "flax" else p.A.shape[-2], jnp.dtype(p.A.dtype)), []
    ).append(i)
  out = [None] * len(pairs)
  for (r, dtype), members in buckets.items():
    ps = [pairs[i] for i in members]
    sizes = [p.s.shape[0] for p in ps]
    prods = [
      (
        lo.gram_A(p.layout, p.A, p.A),
        lo.gram_B(p.layout, p.B, p.B),
        lo.gram_A(p.layout, p.g_A, p.A),
        lo.gram_B(p.layout, p.B, p.g_B),
      )
      for p in ps
    ]
    G_A, G_B, C_A, C_B = (_cat(list(x)) for x in zip(*prods))
    s = _cat([p.s for p in ps])
    eig = eq.damped_eigh(jnp.concatenate([G_A, G_B], 0), damping)
    n = G_A.shape[0]
    eig_A = eq.DampedEig(eig.w[:n], eig.Q[:n])
    eig_B = eq.DampedEig(eig.w[n:], eig.Q[n:])
    coef = _vmap_coefficients(G_A, G_B, C_A, C_B, s, eig_A, eig_B, x_choice)
    # Below tiny/eps a Gram matrix may have lost its small entries to underflow,
    # and an exactly zero one may be an underflowed nonzero factor. Above eps/tiny
    # (or at Inf: an overflowed product) its inverse may underflow to zero.
    floor = r * jnp.finfo(dtype).tiny / jnp.finfo(dtype).eps
    ceiling = jnp.finfo(dtype).eps / jnp.finfo(dtype).tiny
    tr_A, tr_B = (jnp.trace(G, axis1=-2, axis2=-1) for G in (G_A, G_B))
    # A bound on every partial sum of the output products (|A|max <= ‖A‖_F):
    # below it no product overflows, so none can give Inf - Inf = NaN.
    amax = lambda x: jnp.max(jnp.abs(x), axis=(-2, -1))
    gamma_A = _cat([amax(p.g_A) for p in ps])
    gamma_B = _cat([amax(p.g_B) for p in ps])
    bound = r * jnp.maximum(
      amax(coef.M1) * gamma_A + amax(coef.M2) * jnp.sqrt(tr_A),
      amax(coef.M3) * gamma_B + amax(coef.M4) * jnp.sqrt(tr_B),
    )
    in_range = lambda tr: jnp.all((tr >= floor) & (tr <= ceiling))
    ok = (
      in_range(tr_A) & in_range(tr_B) & jnp.all(bound <= jnp.finfo(dtype).max / 4)
    )  # False for any NaN

    def raw_path():
      out = []
      for p, (M1, M2, M3, M4) in zip(ps, zip(*(_split(m, sizes) for m in coef))):
        out.append(
          (
            lo.left(p.layout, M1, p.g_A) + lo.left(p.layout, M2, p.A),
            lo.right(p.layout, p.g_B, M3) - lo.right(p.layout, p.B, M4),
          )
        )
      return out

    result = jax.lax.cond(ok, raw_path, lambda: _normalised_path(ps, x_choice, damping))
    for i, res in zip(members, result):
      out[i] = tuple(res)
  return out
