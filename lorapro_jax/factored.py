"""Factored mode: Algorithm 3 at LoRA's memory, for the pairs of one group.

The first moment of a pair's equivalent gradient is kept in low rank,
M = s·B_prev·N_A + s·N_B·A_prev (the factors of the previous step and two
LoRA-sized arrays), and re-projected onto the current factors every step
(Theorem 2.1 with X = 0); the second moment is factored as Adafactor's, row
and column EMAs of G̃² + ε² (Shazeer & Stern, 2018).

**Raw path.** Apart from the row and column scalings, every array in the step
is a combination, with r×r coefficients, of the pair's tall arrays: on the in
side I = [A; g_A; N_A; A_prev] (kr×n), on the out side O = [B, g_B, B_prev,
N_B] (m×kr). The step therefore

1. reads each side once for its Gram matrix (I·Iᵀ, Oᵀ·O: `Grams`);
2. does Algorithm 3 on kr×kr matrices (`reproject_first_moment`,
   `equivalent_gradient`, `direction`, ...), with one `eigh` of AAᵀ and BᵀB
   for its three uses of Theorem 2.1;
3. reads each side again for the second moment's row (column) sums of squares
   and the D-weighted Gram matrix of the other side (`second_moment`);
4. writes each output (the update, the new first moment) in one pass.

Each stage is a pure function of small NamedTuples of coefficient matrices.
**Normalised path.** The raw path is taken when every r×r product stayed far
inside the dtype's range (`_Guard`); otherwise the group falls back, through
`jax.lax.cond`, to the same map computed stage by stage on normalised arrays
(`_normalised`), as `batched.adjust` does. Its only extra cost on ordinary
inputs is the r×r guard; the first two steps (B = 0 and zero moments, then
B_prev = 0) take the normalised path.
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


class FactoredMoments(NamedTuple):
  """Factored mode's state of one pair (`lorapro(mode="factored")`).

  The first moment is M = s·B_prev·N_A + s·N_B·A_prev; its second moment is
  factored as Adafactor's.

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

  # What each field is shaped like (`pairs.stored_shape`).
  roles = MappingProxyType(
    {"m_a": "a", "m_b": "b", "a_prev": "a", "b_prev": "b", "row": "out", "col": "in"}
  )


class FactoredSecondMoment(NamedTuple):
  """Factored mode's state of one pair without a first moment (b1 = 0).

  Attributes:
    row: EMA of the mean over the in features of G̃² + ε² (an m-vector).
    col: EMA of the mean over the out features of G̃² + ε² (an n-vector).
  """

  row: Array
  col: Array

  roles = MappingProxyType({"row": "out", "col": "in"})


_cat, _split, _col = batched.cat, batched.split, batched.col
_vmap_normalise = batched.normalise_slices


# ---------------------------------------------------------------------------
# The raw path: Algorithm 3 on the Gram matrices of the stacked sides.


class Sides(NamedTuple):
  """The tall arrays of a group, stacked per side, in the pair's layout.

  Attributes:
    I: [A; g_A; N_A; A_prev] (kr×n; flax (N, n, kr)); k = 2 without a first moment.
    O: [B, g_B, B_prev, N_B] (m×kr; flax (N, kr, m)).
  """

  I: Array
  O: Array


def stack_sides(pair: batched.LeafPair, m) -> Sides:
  ins, outs = [pair.A, pair.g_A], [pair.B, pair.g_B]
  if isinstance(m, FactoredMoments):
    ins += [m.m_a.astype(pair.A.dtype), m.a_prev.astype(pair.A.dtype)]
    outs += [m.b_prev.astype(pair.A.dtype), m.m_b.astype(pair.A.dtype)]
  flax = pair.layout == "flax"
  return Sides(
    jnp.concatenate(ins, axis=-1 if flax else -2), jnp.concatenate(outs, axis=-2 if flax else -1)
  )


class Grams(NamedTuple):
  """The products of the stacked sides that the step uses (N, ., .): the columns of
  IIᵀ of A and g_A, the rows of OᵀO of B and g_B, and each base array's squared
  Frobenius norm (N, k)."""

  inner: Array  # I·[A; g_A]ᵀ (kr×2r)
  outer: Array  # [B, g_B]ᵀ·O (2r×kr)
  inner_norms: Array
  outer_norms: Array


def grams(pair: batched.LeafPair, sides: Sides) -> Grams:
  layout = pair.layout
  flax = layout == "flax"
  AgA = jnp.concatenate([pair.A, pair.g_A], -1 if flax else -2)
  BgB = jnp.concatenate([pair.B, pair.g_B], -2 if flax else -1)
  per_base = lambda x: x.reshape(x.shape[0], -1, pair.rank).sum(-1)
  return Grams(
    lo.gram_A(layout, sides.I, AgA),
    lo.gram_B(layout, BgB, sides.O),
    per_base(jnp.sum(sides.I * sides.I, axis=-2 if flax else -1)),
    per_base(jnp.sum(sides.O * sides.O, axis=-1 if flax else -2)),
  )


class _Guard:
  """Whether the raw path's r×r algebra stayed far inside the dtype's range.

  Every product goes through `mm` or `scale`: a result whose entries reach
  2^±100 (or Inf, NaN), or the product of two nonzero operands whose sizes
  multiply to less than 2^-100 (XLA on CPU flushes subnormal partial sums to
  zero), makes `verdict` False. Between those bounds every partial sum is
  normal, so the raw path's rounding is float rounding. The sizes of all
  recorded matrices are taken in one segmented reduction at the end (`verdict`),
  not one small kernel each.
  """

  LIMIT = 100.0

  def __init__(self):
    self.ok = jnp.asarray(True)  # conditions checked directly
    self._arrays: list[Array] = []  # every matrix whose size is needed, (N, ...)
    self._index: dict[int, int] = {}
    self._results: list[int] = []  # matrices that must be inside 2^±LIMIT or zero
    self._products: list[tuple[int, int | Array]] = []  # operands: two matrices or a log2 scale

  def _id(self, x: Array) -> int:
    if id(x) not in self._index:
      self._index[id(x)] = len(self._arrays)
      self._arrays.append(x)
    return self._index[id(x)]

  def check(self, x: Array) -> Array:
    self._results.append(self._id(x))
    return x

  def mm(self, *xs: Array) -> Array:
    out = xs[0]
    for x in xs[1:]:
      operands = (self._id(out), self._id(x))
      out = out @ x
      self._products.append(operands)
      self.check(out)
    return out

  def scale(self, x: Array, c: Array) -> Array:
    """x·c for a per-slice scalar c (N,)."""
    c = jnp.asarray(c, x.dtype) * jnp.ones(x.shape[:1], x.dtype)
    self._products.append((self._id(x), jnp.log2(jnp.abs(c))))
    return self.check(x * c.reshape((-1,) + (1,) * (x.ndim - 1)))

  def verdict(self) -> Array:
    """Whether every recorded condition holds (False for NaN)."""
    if not self._arrays:
      return self.ok
    N = self._arrays[0].shape[0]
    flat = [jnp.abs(x).reshape(N, -1) for x in self._arrays]
    seg = jnp.concatenate([jnp.full(f.shape[1], i, jnp.int32) for i, f in enumerate(flat)])
    amax = jax.ops.segment_max(
      jnp.concatenate(flat, 1).T, seg, num_segments=len(flat), indices_are_sorted=True
    )
    sizes = jnp.log2(amax)  # (arrays, N); -inf for a zero matrix
    pairs = [(a, b) for a, b in self._products if isinstance(b, int)]
    scaled = [(a, b) for a, b in self._products if not isinstance(b, int)]
    totals = [sizes[jnp.asarray(self._results)]]
    if pairs:
      a, b = (jnp.asarray(x) for x in zip(*pairs))
      totals.append(sizes[a] + sizes[b])
    if scaled:
      a = jnp.asarray([x for x, _ in scaled])
      totals.append(sizes[a] + jnp.stack([jnp.broadcast_to(c, (N,)) for _, c in scaled]))
    total = jnp.concatenate(totals)
    lim = self.LIMIT
    return self.ok & jnp.all((total <= lim) & ((total >= -lim) | (total == -jnp.inf)))


def _blocks(G: Array, r: int, i: int, j: int) -> Array:
  return G[:, i * r : (i + 1) * r, j * r : (j + 1) * r]


def _unit(k: int, r: int, i: int, like: Array) -> Array:
  """E_i (N, kr, r): selects base array i of a side (N from ``like``)."""
  E = jnp.zeros((k * r, r), like.dtype).at[i * r : (i + 1) * r].set(jnp.eye(r, dtype=like.dtype))
  return jnp.broadcast_to(E, (like.shape[0], k * r, r))


def _T(x: Array) -> Array:
  return jnp.swapaxes(x, -1, -2)


class Theorem21(NamedTuple):
  """Theorem 2.1's coefficients of the current factors: one `eigh` of AAᵀ and BᵀB
  serves all three adjustments of the step."""

  eig_A: eq.DampedEig
  eig_B: eq.DampedEig
  s: Array


class Adjusted(NamedTuple):
  """Theorem 2.1's g^A = L·(basis of g_A) + Z·A and g^B = (basis of g_B)·R - B·(P + Z),
  as coefficient matrices on the stacked sides: L (N, r, kr), R (N, kr, r), and the
  terms on A and B."""

  L: Array
  R: Array
  on_A: Array  # Z
  on_B: Array  # P + Z


def adjust(
  g: _Guard, th: Theorem21, L_g: Array, R_g: Array, C_A: Array, C_B: Array, x_choice
) -> Adjusted:
  """Theorem 2.1 for the gradients g_A = L_g·(basis), g_B = (basis)·R_g, whose products
  with the factors are C_A = g_A·Aᵀ and C_B = Bᵀ·g_B (`equations.coefficients`)."""
  coef = jax.vmap(eq.coefficients, in_axes=(0, 0, 0, 0, 0, None))(
    g.check(C_A), g.check(C_B), th.eig_A, th.eig_B, th.s, x_choice
  )
  for c in coef:
    g.check(c)
  return Adjusted(g.mm(coef.M1, L_g), g.mm(R_g, coef.M3), coef.Z, g.check(coef.P + coef.Z))


def _merge(k: int, r: int, adj: Adjusted) -> tuple[Array, Array]:
  """An `Adjusted` on the unweighted sides as (L, R) on the whole stacks."""
  E = _unit(k, r, 0, adj.L)  # A is the in side's first array, B the out side's
  return adj.L + adj.on_A @ _T(E), adj.R - E @ adj.on_B


class FirstMoment(NamedTuple):
  """The new N_A' = L·I and N_B' = O·R."""

  L: Array
  R: Array


def gradient_and_moment(
  g: _Guard, th: Theorem21, G: Grams, k: int, r: int, b1
) -> tuple[FirstMoment, FirstMoment]:
  """Algorithm 3, lines 5-9: this step's Theorem 2.1 gradients with X = 0 (G_A, G_B,
  whose equivalent gradient G̃ = s·B·G_A + s·G_B·A is Eq. 55), and the new first
  moment b1·proj(M) + (1 - b1)·G̃, proj(M) the best approximation of the stored
  M by the current factors (Theorem 2.1 with M as the full gradient)."""
  Gi, Go = G.inner, G.outer
  E_g = _unit(k, r, 1, Gi)  # g_A = E_gᵀ·I, g_B = O·E_g
  C_A, C_B = _blocks(Gi, r, 1, 0), _blocks(Go, r, 0, 1)
  grad = adjust(g, th, _T(E_g), E_g, C_A, C_B, "zero")
  grad = FirstMoment(*_merge(k, r, grad))
  if k == 2:
    return grad, grad
  # s·Bᵀ·M = s²·(BᵀB_prev·N_A + BᵀN_B·A_prev); s·M·Aᵀ = s²·(B_prev·N_A·Aᵀ + N_B·A_prev·Aᵀ).
  s2 = th.s**2
  zero = jnp.zeros_like(Gi[:, :r, : 2 * r])
  L_h = jnp.concatenate([zero, _blocks(Go, r, 0, 2), _blocks(Go, r, 0, 3)], -1)
  L_h = g.scale(L_h, s2)
  R_h = jnp.concatenate([_T(zero), _blocks(Gi, r, 2, 0), _blocks(Gi, r, 3, 0)], -2)
  R_h = g.scale(R_h, s2)
  C_A = g.mm(L_h, Gi[:, :, :r])  # (s·Bᵀ·M)·Aᵀ
  C_B = g.mm(Go[:, :r, :], R_h)  # Bᵀ·(s·M·Aᵀ)
  proj = FirstMoment(*_merge(k, r, adjust(g, th, L_h, R_h, C_A, C_B, "zero")))
  mix = lambda p, q: g.check(g.scale(p, b1) + g.scale(q, 1 - b1))
  return grad, FirstMoment(mix(proj.L, grad.L), mix(proj.R, grad.R))


def low_rank(g: _Guard, k: int, r: int, s, first: FirstMoment) -> Array:
  """K (kr×kr) with s·B·L·I + s·O·R·A = O·K·I."""
  E = _unit(k, r, 0, first.L)
  return g.scale(g.check(E @ first.L + first.R @ _T(E)), s)


class SecondMoment(NamedTuple):
  row: Array  # (N, m)
  col: Array  # (N, n)


def second_moment_forms(g: _Guard, G: Grams, grad: FirstMoment, r: int, s) -> tuple[Array, Array]:
  """G̃ = s·B·G_A + s·G_B·A = Ũ·Ṽ with Ũ = [B, G_B] (m×2r) and Ṽ = s·[G_A; A] (2r×n):
  Σ_j G̃_ij² = ũ_i·S_row·ũ_iᵀ and Σ_i G̃_ij² = ṽ_jᵀ·S_col·ṽ_j (ṽ_j without s), with
  S_row = ṼṼᵀ and S_col = s²·ŨᵀŨ, from G_A = L·I and G_B = O·R (``grad``)."""
  # G_A and G_B are combinations of (A, g_A) and (B, g_B) alone (X = 0 in
  # `gradient_and_moment`), so the products of those pairs suffice.
  L, R = grad.L[..., : 2 * r], grad.R[:, : 2 * r]
  E = _unit(2, r, 0, L)
  V = jnp.concatenate([L, _T(E)], -2)  # [G_A; A] = V·[A; g_A]
  U = jnp.concatenate([E, R], -1)  # [B, G_B] = [B, g_B]·U
  S_row = g.scale(g.mm(V, G.inner[:, : 2 * r], _T(V)), s**2)
  S_col = g.scale(g.mm(_T(U), G.outer[..., : 2 * r], U), s**2)
  # ũ_i·S·ũ_iᵀ <= 2r·|S|·‖ũ_i‖² <= 2r·|S|·tr(ŨᵀŨ): far inside the range.
  tr_U = jnp.trace(S_col, axis1=-2, axis2=-1) / s**2
  tr_V = jnp.trace(S_row, axis1=-2, axis2=-1) / s**2
  g.scale(S_row, tr_U * 2 * r)
  g.scale(S_col, tr_V * 2 * r)
  return S_row, S_col


# Up to this many columns `_quadratic` is written as multiply-adds; above it, as a dot.
QUADRATIC_UNROLL_MAX = 32


def _tree_sum(xs: list[Array]) -> Array:
  """Σ xs as a balanced tree: the expression's depth grows as log(len(xs)) (XLA's
  recursive passes overflowed the stack on long chains)."""
  while len(xs) > 1:
    xs = [xs[i] + xs[i + 1] if i + 1 < len(xs) else xs[i] for i in range(0, len(xs), 2)]
  return xs[0]


def _quadratic(layout: lo.Layout, side: str, X: Array, S: Array) -> Array:
  """x·S·xᵀ for every row x of X (m×2r on the out side, n×2r on the in side, in the
  layout) and a symmetric S. Up to `QUADRATIC_UNROLL_MAX` columns it is written as
  elementwise multiply-adds, which XLA fuses into one pass (a dot followed by a
  reduction was 20× slower on CPU at r = 8)."""
  minor = (layout == "flax") == (side == "in")  # the 2r axis is the minor one
  k = S.shape[-1]
  if k > QUADRATIC_UNROLL_MAX:
    XS = jnp.einsum("kma,kab->kmb" if minor else "kam,kab->kbm", X, S)
    return jnp.sum(XS * X, axis=-1 if minor else -2)
  col = (lambda a: X[..., a]) if minor else (lambda a: X[:, a])
  rows = []
  for a in range(k):
    inner = [S[:, a, a, None] * col(a)] + [2 * S[:, a, b, None] * col(b) for b in range(a + 1, k)]
    rows.append(_tree_sum(inner) * col(a))
  return _tree_sum(rows)


def second_moment(
  pair: batched.LeafPair, grad_arrays: tuple[Array, Array], S_row, S_col, v: SecondMoment, h
) -> SecondMoment:
  """Adafactor's EMAs of the row and column means of G̃² + ε² (`second_moment_forms`);
  ``grad_arrays`` are G_A, G_B, laid out like A, B."""
  (G_A, G_B), A, B, layout = grad_arrays, pair.A, pair.B, pair.layout
  flax = layout == "flax"
  U = jnp.concatenate([B, G_B], 1 if flax else -1)
  V = jnp.concatenate([G_A, A], -1 if flax else 1)
  q_row, q_col = _quadratic(layout, "out", U, S_row), _quadratic(layout, "in", V, S_col)
  n, m = q_col.shape[-1], q_row.shape[-1]
  dt = q_row.dtype
  ema = lambda old, q, size: eq.saturate(
    h.b2 * old.astype(dt) + (1 - h.b2) * (jnp.maximum(q, 0) / size + h.eps**2)
  )
  return SecondMoment(ema(v.row, q_row, n), ema(v.col, q_col, m))


class Direction(NamedTuple):
  """D = c·diag(ρ̂)·M·diag(κ̂) (M̂ ⊘ √V̂ with the bias corrections), ρ̂, κ̂ ≤ 1,
  c = k·max ρ·max κ (kept as its three factors, (N,) each)."""

  rho: Array  # (N, m)
  kappa: Array  # (N, n)
  c: tuple[Array, Array, Array]


def direction_scales(v: SecondMoment, h: batched.Hyper) -> Direction:
  """V̂ = R·Cᵀ/mean(R): D = k·diag(R^-½)·M·diag(C^-½), k = √mean(R)·√(1-β2ᵗ)/(1-β1ᵗ)."""
  dt = v.row.dtype
  t = h.count.astype(dt)
  tiny = jnp.finfo(dt).tiny
  rho = jax.lax.rsqrt(jnp.maximum(v.row, tiny))
  kappa = jax.lax.rsqrt(jnp.maximum(v.col, tiny))
  rho_max, kappa_max = jnp.max(rho, axis=-1), jnp.max(kappa, axis=-1)
  k = jnp.sqrt(jnp.mean(v.row, axis=-1)) * jnp.sqrt(1 - h.b2**t) / (1 - h.b1**t)
  return Direction(rho / rho_max[:, None], kappa / kappa_max[:, None], (k, rho_max, kappa_max))


class Update(NamedTuple):
  """The update g^A = (L_k·I)∘κ̂ + L·I and g^B = (O·R_r)∘ρ̂ + O·R."""

  L_k: Array
  L: Array
  R_r: Array
  R: Array


class Weighted(NamedTuple):
  """I·diag(κ̂)·Aᵀ (kr×r) and Bᵀ·diag(ρ̂)·O (r×kr)."""

  inner: Array
  outer: Array


def weighted_grams(pair: batched.LeafPair, sides: Sides, d: Direction) -> Weighted:
  layout = pair.layout
  return Weighted(
    lo.gram_A(layout, sides.I, lo.scale_in(layout, pair.A, d.kappa)),
    lo.gram_B(layout, lo.scale_out(layout, pair.B, d.rho), sides.O),
  )


def project_direction(
  g: _Guard, th: Theorem21, W: Weighted, K_m: Array, c: Array, k: int, r: int, x_choice
) -> Update:
  """Eq. (56) of D = c·diag(ρ̂)·O·K_m·I·diag(κ̂), then Theorem 2.1 with the chosen X
  (Alg. 3, lines 14-18): s·Bᵀ·D = s·c·E_Bᵀ·(Oᵀρ̂O)·K_m·(I∘κ̂) and
  s·D·Aᵀ = s·c·(ρ̂∘O)·K_m·(Iκ̂Iᵀ)·E_A (W: `weighted_grams`; c: s·c per slice)."""
  W_in, W_out = g.check(W.inner), g.check(W.outer)
  L_d = g.scale(g.mm(W_out, K_m), c)  # on I∘κ̂
  R_d = g.scale(g.mm(K_m, W_in), c)  # on ρ̂∘O
  C_A = g.mm(L_d, W_in)
  C_B = g.mm(W_out, R_d)
  adj = adjust(g, th, L_d, R_d, C_A, C_B, x_choice)
  E = _unit(k, r, 0, L_d)
  return Update(adj.L, adj.on_A @ _T(E), adj.R, -(E @ adj.on_B))


def _in_combination(layout, I: Array, L: Array) -> Array:
  """L·I (r×n) in the layout, as a dot."""
  if layout == "flax":
    return jnp.einsum("knb,kab->kna", I, L)
  return jnp.einsum("kab,kbn->kan", L, I)


def _out_combination(layout, O: Array, R: Array) -> Array:
  """O·R (m×r) in the layout, as a dot."""
  return jnp.einsum("kbm,kba->kam" if layout == "flax" else "kmb,kba->kma", O, R)


def _output_bound(g: _Guard, norms: Array, C: Array) -> None:
  """|L·I| <= |L|·kr·√tr(IIᵀ) (or |O·R|): the output far inside the range."""
  g.scale(C, jnp.sqrt(jnp.sum(norms, -1)) * C.shape[-2] * C.shape[-1])


class GroupStep(NamedTuple):
  """One group's results: the update (laid out like A, B) and its new moments."""

  update: tuple[Array, Array]
  moments: FactoredMoments | FactoredSecondMoment


def _cat_grams(Gs):
  return type(Gs[0])(*(_cat(list(x)) for x in zip(*Gs)))


def _raw_plan(ps, ms, h: batched.Hyper, x_choice, damping, order: batched.EighOrder):
  """The raw path for the groups of one rank up to its output pass, the r×r algebra of
  all of them batched together, and whether it can be trusted."""
  r, sizes = ps[0].rank, [p.s.shape[0] for p in ps]
  k = 4 if isinstance(ms[0], FactoredMoments) else 2
  # The named scopes label each stage's ops in the compiled HLO, where the
  # benchmarks (benchmarks/hlo_traffic.py) attribute their cost.
  with jax.named_scope("lorapro/factored/grams"):
    sides = [stack_sides(p, m) for p, m in zip(ps, ms)]
    G = _cat_grams([grams(p, x) for p, x in zip(ps, sides)])
    s = _cat([p.s for p in ps])
  g = _Guard()
  # Every base array's squared norm in range: above it its Gram block may have
  # overflowed; below it entries' squares may have underflowed (a zero array,
  # B = 0 or a zero moment at the first step, takes the normalised path too).
  info = jnp.finfo(G.inner.dtype)
  floor, ceiling = k * r * info.tiny / info.eps, info.eps / info.tiny
  with jax.named_scope("lorapro/factored/guard"):
    for norms in (G.inner_norms, G.outer_norms):
      g.ok &= jnp.all((norms >= floor) & (norms <= ceiling))
  N = s.shape[0]
  with jax.named_scope("lorapro/factored/eigh"):
    eig = order.eigh(
      jnp.concatenate([_blocks(G.inner, r, 0, 0), _blocks(G.outer, r, 0, 0)]), damping
    )
    th = Theorem21(eq.DampedEig(eig.w[:N], eig.Q[:N]), eq.DampedEig(eig.w[N:], eig.Q[N:]), s)
  b1 = h.b1 if k == 4 else 0.0
  with jax.named_scope("lorapro/factored/gradient_and_moment"):
    grad, first = gradient_and_moment(g, th, G, k, r, b1)
  with jax.named_scope("lorapro/factored/second_moment"):
    S_row, S_col = second_moment_forms(g, G, grad, r, s)
  with jax.named_scope("lorapro/factored/guard"):
    _output_bound(g, G.inner_norms, grad.L)
    _output_bound(g, G.outer_norms, grad.R)
  vs, ds = [], []
  with jax.named_scope("lorapro/factored/second_moment"):
    per_group = zip(
      ps,
      ms,
      sides,
      _split(grad.L, sizes),
      _split(grad.R, sizes),
      _split(S_row, sizes),
      _split(S_col, sizes),
    )
    for p, m, x, L, R, S_r, S_c in per_group:
      arrays = (_in_combination(p.layout, x.I, L), _out_combination(p.layout, x.O, R))
      vs.append(second_moment(p, arrays, S_r, S_c, SecondMoment(m.row, m.col), h))
  with jax.named_scope("lorapro/factored/direction"):
    ds = [direction_scales(v, h._replace(b1=b1)) for v in vs]
    W = _cat_grams([weighted_grams(p, x, d) for p, x, d in zip(ps, sides, ds)])
    c = eq.scale_by(s, *(_cat([d.c[i] for d in ds]) for i in range(3)))
    up = project_direction(g, th, W, low_rank(g, k, r, s, first), c, k, r, x_choice)
    ups = [Update(*x) for x in zip(*(_split(u, sizes) for u in up))]
    firsts = [FirstMoment(*x) for x in zip(*(_split(u, sizes) for u in first))] if k == 4 else None
  bounded = [(up.L_k, G.inner_norms), (up.L, G.inner_norms)]
  bounded += [(up.R_r, G.outer_norms), (up.R, G.outer_norms)]
  if k == 4:
    bounded += [(first.L, G.inner_norms), (first.R, G.outer_norms)]
  with jax.named_scope("lorapro/factored/guard"):
    for C, norms in bounded:
      _output_bound(g, norms, C)
    verdict = g.verdict()
  return verdict, (sides, ds, ups, firsts, vs), up.L


def _outputs(
  pair: batched.LeafPair, sides: Sides, d: Direction, up: Update, first, v, m
) -> GroupStep:
  """The raw path's output pass: each side read once, each output written once."""
  I, O = sides
  layout, A, B = pair.layout, pair.A, pair.B
  g_A = lo.scale_in(layout, _in_combination(layout, I, up.L_k), d.kappa)
  g_A = eq.saturate(g_A + _in_combination(layout, I, up.L))
  g_B = lo.scale_out(layout, _out_combination(layout, O, up.R_r), d.rho)
  g_B = eq.saturate(g_B + _out_combination(layout, O, up.R))
  stored = lambda x, like: eq.saturating_cast(x, like.dtype)
  row, col = stored(v.row, m.row), stored(v.col, m.col)
  if first is None:
    return GroupStep((g_A, g_B), FactoredSecondMoment(row, col))
  new = FactoredMoments(
    m_a=stored(_in_combination(layout, I, first.L), m.m_a),
    m_b=stored(_out_combination(layout, O, first.R), m.m_b),
    a_prev=stored(A, m.a_prev),
    b_prev=stored(B, m.b_prev),
    row=row,
    col=col,
  )
  return GroupStep((g_A, g_B), new)


def step(
  pairs: list[batched.LeafPair], moments: list, h: batched.Hyper, x_choice, damping
) -> list[GroupStep]:
  """One factored-mode step for each group (pairs of one kind, stacked along N).

  The r×r algebra of all groups of one rank and dtype is batched together, under
  one `jax.lax.cond` between the raw and the normalised path.

  Args:
    pairs: each group's factors and LoRA gradients.
    moments: each group's state in compute shapes (`FactoredMoments` or
      `FactoredSecondMoment`).
    h: Adam's hyperparameters and the step number t ≥ 1.
    x_choice, damping: as in `lorapro_jax.lorapro`.

  Returns:
    Each group's update, to be used as its gradients, and its new moments
    (a_prev and b_prev: the current factors, which the first moment is relative to).
  """
  # Jitted so that an eager call compiles one computation per shape instead of
  # one per op (thousands of executables exhausted the process's memory maps).
  return _step_jit(tuple(pairs), tuple(moments), h, x_choice, damping, batched.recording())


@partial(jax.jit, static_argnums=(3, 5))
def _step_jit(pairs, moments, h: batched.Hyper, x_choice, damping, record) -> list[GroupStep]:
  del record  # a static argument: code traced to record paths is compiled apart
  buckets: dict = {}
  for i, p in enumerate(pairs):
    buckets.setdefault((p.rank, jnp.dtype(p.A.dtype)), []).append(i)
  order = batched.EighOrder()
  out: list = [None] * len(pairs)
  for members in buckets.values():
    ps, ms = [pairs[i] for i in members], [moments[i] for i in members]
    ok, (sides, ds, ups, firsts, vs), last = _raw_plan(ps, ms, h, x_choice, damping, order)
    batched.log_path(ok)

    def raw(ps=ps, ms=ms, sides=sides, ds=ds, ups=ups, firsts=firsts, vs=vs, last=last):
      with jax.named_scope("lorapro/factored/outputs"):
        results = [
          _outputs(p, x, d, u, None if firsts is None else firsts[j], v, m)
          for j, (p, m, x, d, u, v) in enumerate(zip(ps, ms, sides, ds, ups, vs))
        ]
        return results, batched.EighOrder.token(last)

    def normalised(ps=ps, ms=ms):
      with jax.named_scope("lorapro/factored/normalised"):
        inner = batched.EighOrder()  # one group after another inside the branch, too
        results = [_normalised(p, m, h, x_choice, damping, inner) for p, m in zip(ps, ms)]
        return results, batched.EighOrder.token(inner.zero)

    results, token = jax.lax.cond(ok, raw, normalised)
    order.wait_for(token)
    for i, res in zip(members, results):
      out[i] = res
  return out


# ---------------------------------------------------------------------------
# The normalised path: the same map, stage by stage on normalised arrays.


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


def _max_scale(*xs: eq.Normalised) -> Array:
  """The largest of the scales (N,), 1 where all are 0."""
  c = jnp.maximum(*[x.scale for x in xs]) if len(xs) > 1 else xs[0].scale
  return jnp.where(c > 0, c, jnp.ones_like(c))


def _relative(x: eq.Normalised, nu: Array) -> Array:
  return x.hat * _col(eq.divide(x.scale, nu))


def _moment_projection(
  pair: batched.LeafPair, m: FactoredMoments
) -> tuple[batched.LeafPair, Array]:
  """The stored M = s·B_prev·N_A + s·N_B·A_prev = s·ν·(B̂_prev·Ñ_A + Ñ_B·Â_prev) as
  the LoRA gradients of the pair of normalised factors (Â, B̂) with s = 1, and ν:
  Ñ_A = β_prev·N_A/ν and Ñ_B = α_prev·N_B/ν are at most 1 (X̂ = X/max|X| with
  scale α or β). Theorem 2.1 (X = 0) of that pair gives M's projection onto the
  current factors' span, P_B·M + (I - P_B)·M·P_A, as s·ν·(B̂·P_A + P_B·Â)."""
  dt = pair.A.dtype
  A, B = _vmap_normalise(pair.A), _vmap_normalise(pair.B)
  A_p, B_p = _vmap_normalise(m.a_prev.astype(dt)), _vmap_normalise(m.b_prev.astype(dt))
  n_A, n_B = _vmap_normalise(m.m_a.astype(dt)), _vmap_normalise(m.m_b.astype(dt))
  nu_A, nu_B = eq.scale_by(n_A.scale, B_p.scale), eq.scale_by(n_B.scale, A_p.scale)
  nu = jnp.maximum(nu_A, nu_B)
  nu = jnp.where(nu > 0, nu, jnp.ones_like(nu))
  L = LowRank(
    (B_p.hat, n_B.hat * _col(eq.divide(nu_B, nu))), (n_A.hat * _col(eq.divide(nu_A, nu)), A_p.hat)
  )
  g_A, g_B = lora_gradients(pair.layout, L, A.hat, B.hat)
  return pair.replace(A=A.hat, B=B.hat, g_A=g_A, g_B=g_B, s=jnp.ones_like(pair.s)), nu


def _normalised(
  pair: batched.LeafPair, m, h: batched.Hyper, x_choice, damping, order: batched.EighOrder
) -> GroupStep:
  """The factored step of one group on normalised arrays (see module doc).

  Arrays are relative to the normalised factors: G̃ = s·B̂·G_A + s·G_B·Â and the new
  first moment s·B̂·N_A + s·N_B·Â."""
  layout, s = pair.layout, pair.s
  first_moment = isinstance(m, FactoredMoments)
  b1 = h.b1 if first_moment else 0.0
  dt = pair.A.dtype
  A, B = _vmap_normalise(pair.A), _vmap_normalise(pair.B)
  n = pair.A.shape[-2] if layout == "flax" else pair.A.shape[-1]
  size_m = pair.B.shape[-1] if layout == "flax" else pair.B.shape[-2]
  proj = [_moment_projection(pair, m)] if first_moment else []
  adjusted = batched.adjust([pair] + [p for p, _ in proj], "zero", damping, order)
  G_A = eq.saturate(adjusted[0][0] * _col(B.scale))
  G_B = eq.saturate(adjusted[0][1] * _col(A.scale))
  if first_moment:  # b1·proj(M) + (1 - b1)·G̃
    (P_A, P_B), nu = adjusted[1], proj[0][1]
    N_A = eq.saturate(b1 * eq.scale_by(P_A, _col(nu)) + (1 - b1) * G_A)
    N_B = eq.saturate(b1 * eq.scale_by(P_B, _col(nu)) + (1 - b1) * G_B)
  else:
    N_A, N_B = G_A, G_B

  # The second moment from G̃ = s·c·L̂, L̂'s factors at most 1.
  h_A, h_B = _vmap_normalise(G_A), _vmap_normalise(G_B)
  c = _max_scale(h_A, h_B)
  L = LowRank((B.hat, _relative(h_B, c)), (_relative(h_A, c), A.hat))
  sq = lambda x, size: eq.scale_by(
    jnp.maximum(x, 0) / size, s[:, None], s[:, None], c[:, None], c[:, None]
  )
  ema = lambda v, x: eq.saturate(h.b2 * v.astype(dt) + (1 - h.b2) * (x + h.eps**2))
  row = ema(m.row, sq(row_sq(layout, L), n))
  col = ema(m.col, sq(col_sq(layout, L), size_m))

  # D = c_D·diag(ρ̂)·M·diag(κ̂) = s·c_D·ν·D̂; Eq. (56): s·Bᵀ·D = s·β·B̂ᵀ·D, s·D·Aᵀ = s·α·D·Âᵀ.
  d = direction_scales(SecondMoment(row, col), h._replace(b1=b1))
  n_A, n_B = _vmap_normalise(N_A), _vmap_normalise(N_B)
  nu_D = _max_scale(n_A, n_B)
  D = LowRank(
    (lo.scale_out(layout, B.hat, d.rho), lo.scale_out(layout, _relative(n_B, nu_D), d.rho)),
    (lo.scale_in(layout, _relative(n_A, nu_D), d.kappa), lo.scale_in(layout, A.hat, d.kappa)),
  )
  d_A, d_B = lora_gradients(layout, D, A.hat, B.hat)
  common = (_col(s), _col(s), *(_col(x) for x in d.c), _col(nu_D))
  g_A = eq.scale_by(d_A, _col(B.scale), *common)
  g_B = eq.scale_by(d_B, _col(A.scale), *common)
  (update,) = batched.adjust([pair.replace(g_A=g_A, g_B=g_B)], x_choice, damping, order)

  stored = lambda x, like: eq.saturating_cast(x, like.dtype)
  row, col = stored(row, m.row), stored(col, m.col)
  if not first_moment:
    return GroupStep(tuple(update), FactoredSecondMoment(row, col))
  # Stored relative to the raw factors, N_A/β and N_B/α, which it keeps.
  one = jnp.ones_like(_col(s))
  new = FactoredMoments(
    m_a=stored(eq.rescale(N_A, one, _col(B.scale)), m.m_a),
    m_b=stored(eq.rescale(N_B, one, _col(A.scale)), m.m_b),
    a_prev=stored(pair.A, m.a_prev),
    b_prev=stored(pair.B, m.b_prev),
    row=row,
    col=col,
  )
  return GroupStep(tuple(update), new)
