"""Theorem 2.1 for every pair of a model, with the r×r work batched per rank.

`adjust` takes each pair as a `LeafPair`: its storage layout with the batch
axes flattened (flax: A (N, n, r), B (N, r, m); paper: A (N, r, n),
B (N, m, r)). It returns Theorem 2.1's gradients in the same layout. Pairs of
one rank and dtype share one computation:

1. Four r×r products per pair, written in the leaf's layout so that no tall
   array is transposed, concatenated or copied: AAᵀ, BᵀB, g_lora^A·Aᵀ and
   Bᵀ·g_lora^B (`lorapro_jax.layout`).
2. All r×r work of all pairs as one batched computation: one `eigh` for
   every Gram matrix, the Sylvester solves, `equations.coefficients`.
3. Two K = r products per output.

Two paths compute the same map. The **raw** path runs the steps on the
stored arrays. The **normalised** path divides factors and gradients by
their largest entries first and applies the scales last
(`equations.rescale`), so that inputs anywhere in the dtype's range give
finite results. It is taken, through `jax.lax.cond`, for all pairs of the
rank whenever the raw path cannot be trusted: a Gram trace below
``r·tiny/eps`` (B = 0 at LoRA's initialisation, or entries whose squares
underflow) or above ``eps/tiny`` (whose inverse may underflow; Inf when the
squares overflow), a bound on the output products above a quarter of the
dtype's range (overflow, a non-finite coefficient, or a NaN or Inf input,
which the normalised path propagates per slice), or a nonzero intermediate
r×r product whose operands' sizes multiply to less than ``r·tiny/eps`` (it
would be subnormal, which XLA on CPU flushes to zero: e.g. a large B with
tiny gradients). The bounds need the largest gradient entry: one reduction
over each gradient.

Everything is traced into the jitted update: no Python loop at run time and
no host synchronisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lorapro_jax import equations as eq
from lorapro_jax import layout as lo
from lorapro_jax.equations import X_CHOICES, XChoice

Array = jax.Array

__all__ = [
  "X_CHOICES",
  "Hyper",
  "LeafPair",
  "XChoice",
  "adjust",
  "amax",
  "cat",
  "col",
  "compute_dtype",
  "normalise_slices",
  "record_paths",
  "split",
  "stack_groups",
]


def compute_dtype(*arrays) -> jnp.dtype:
  """float32, or float64 when an input is float64; never a narrower type."""
  return jnp.promote_types(jnp.float32, jnp.result_type(*arrays))


@partial(
  jax.tree_util.register_dataclass,
  data_fields=["A", "B", "g_A", "g_B", "s"],
  meta_fields=["layout"],
)
@dataclasses.dataclass(frozen=True)
class LeafPair:
  """One pair in its storage layout, batch axes flattened to N (module doc)."""

  A: Array
  B: Array
  g_A: Array  # g_lora^A, laid out like A
  g_B: Array
  s: Array  # (N,)
  layout: lo.Layout

  @property
  def rank(self) -> int:
    return self.A.shape[-1] if self.layout == "flax" else self.A.shape[-2]

  def replace(self, **changes) -> LeafPair:
    return dataclasses.replace(self, **changes)


class _Products(NamedTuple):
  """The r×r inputs of `equations.coefficients`, batched: (N, r, r) each."""

  G_A: Array  # AAᵀ
  G_B: Array  # BᵀB
  C_A: Array  # g_lora^A·Aᵀ
  C_B: Array  # Bᵀ·g_lora^B


def _products(layout: lo.Layout, A, B, g_A, g_B) -> _Products:
  return _Products(
    lo.gram_A(layout, A, A),
    lo.gram_B(layout, B, B),
    lo.gram_A(layout, g_A, A),
    lo.gram_B(layout, B, g_B),
  )


def cat(xs: Sequence[Array]) -> Array:
  """The arrays concatenated along their slice axis (the one array itself if alone)."""
  return xs[0] if len(xs) == 1 else jnp.concatenate(xs, 0)


def split(x: Array, sizes: Sequence[int]) -> list[Array]:
  """The inverse of `cat`: ``x`` cut along its slice axis into pieces of ``sizes``."""
  if len(sizes) == 1:
    return [x]
  starts = [sum(sizes[:i]) for i in range(len(sizes))]
  return [x[a : a + k] for a, k in zip(starts, sizes)]


def _eighs(prods: _Products, damping, order) -> tuple[eq.DampedEig, eq.DampedEig]:
  """Both Gram matrices of every slice in one batched `eigh`."""
  n = prods.G_A.shape[0]
  eig = order.eigh(jnp.concatenate([prods.G_A, prods.G_B], 0), damping)
  return eq.DampedEig(eig.w[:n], eig.Q[:n]), eq.DampedEig(eig.w[n:], eig.Q[n:])


def amax(x: Array) -> Array:
  """max|x| of every slice, (N,)."""
  return jnp.max(jnp.abs(x), axis=(-2, -1))


# `equations.normalise` of every slice.
normalise_slices = jax.vmap(eq.normalise)


def col(x: Array) -> Array:
  """A per-slice (N,) value broadcast against (N, ., .) arrays."""
  return x[:, None, None]


class Hyper(NamedTuple):
  """Adam's hyperparameters and the step number t ≥ 1 (for the bias corrections), as
  the modes with moments (`full`, `factored`) take them."""

  b1: Array | float
  b2: Array | float
  eps: Array | float
  count: Array


_vmap_coefficients = jax.vmap(eq.coefficients, in_axes=(0, 0, 0, 0, 0, None, 0))


def _coefficients(prods: _Products, s, x_choice, damping, ratio, order) -> eq.Coefficients:
  eig_A, eig_B = _eighs(prods, damping, order)
  return _vmap_coefficients(prods.C_A, prods.C_B, eig_A, eig_B, s, x_choice, ratio)


def _raw_trusted(
  prods: _Products, coef: eq.Coefficients, gamma_A, gamma_B, s, x_choice, r, dtype
) -> Array:
  """Whether the raw path's products are finite and accurate in ``dtype``."""
  info = jnp.finfo(dtype)
  # Below tiny/eps a Gram matrix may have lost its small entries to underflow,
  # and an exactly zero one may be an underflowed nonzero factor. Above eps/tiny
  # (or at Inf: an overflowed product) its inverse may underflow to zero.
  floor, ceiling = r * info.tiny / info.eps, info.eps / info.tiny
  tr_A, tr_B = (jnp.trace(G, axis1=-2, axis2=-1) for G in (prods.G_A, prods.G_B))
  # A bound on every partial sum of the output products (|A|max <= ‖A‖_F):
  # below it no product overflows, so none can give Inf - Inf = NaN.
  m1, m3 = amax(coef.M1), amax(coef.M3)
  bound = r * jnp.maximum(
    m1 * gamma_A + amax(coef.Z) * jnp.sqrt(tr_A),
    m3 * gamma_B + amax(coef.P + coef.Z) * jnp.sqrt(tr_B),
  )
  in_range = lambda tr: jnp.all((tr >= floor) & (tr <= ceiling))
  ok = in_range(tr_A) & in_range(tr_B) & jnp.all(bound <= info.max / 4)  # False for NaN
  # From below: the natural scale of every intermediate product (the product of
  # its operands' sizes: max|.| of an r×r matrix or a gradient, ‖.‖_F of a factor)
  # is at least r·tiny/eps, or exactly 0 (a zero gradient). Below it the product
  # may be subnormal, which XLA on CPU flushes to zero: with a large B and tiny
  # gradients (BᵀB)⁻¹/s²·Bᵀg_lora^B did, P became 0 and g^B lost its projection
  # term. Summed as log2 sizes, so that no estimate under- or overflows itself;
  # (N,)-sized work. The symmetric X is -P/2; the zero X has no products.
  log_s2 = 2 * jnp.log2(s)
  C_B = jnp.log2(gamma_B) + jnp.log2(tr_B) / 2  # Bᵀ·g_lora^B
  M1_C_B = jnp.log2(m1) + C_B
  scales = [C_B, M1_C_B, M1_C_B + jnp.log2(m3) + log_s2]  # ... ·(AAᵀ)⁻¹ = P
  if x_choice == "sylvester":  # -M1·(g_lora^A·Aᵀ), then divided by λ_i + μ_j
    C_A = jnp.log2(gamma_A) + jnp.log2(tr_A) / 2
    M1_C_A = jnp.log2(m1) + C_A
    scales += [C_A, M1_C_A, M1_C_A - jnp.log2(tr_A + tr_B)]
  log_floor = jnp.log2(jnp.asarray(floor, dtype))
  for x in scales:
    ok &= jnp.all((x == -jnp.inf) | (x >= log_floor))  # False for NaN
  return ok


def _raw_outputs(ps: Sequence[LeafPair], coef: eq.Coefficients) -> list[tuple[Array, Array]]:
  sizes = [p.s.shape[0] for p in ps]
  out = []
  for p, (M1, M3, P, Z) in zip(ps, zip(*(split(c, sizes) for c in coef))):
    L = p.layout
    g_A = lo.left(L, M1, p.g_A) + lo.left(L, Z, p.A)
    g_B = lo.right(L, p.g_B, M3) - lo.right(L, p.B, P + Z)
    out.append((g_A, g_B))
  return out


def _normalised_outputs(
  ps: Sequence[LeafPair], x_choice: XChoice, damping
) -> tuple[list[tuple[Array, Array]], Array]:
  """Theorem 2.1 on normalised factors and gradients (the fallback), and a
  `EighOrder.token` of its coefficients.

  The map is linear in the gradients: each slice's gradients are divided by
  their largest entry γ, and γ and the factors' scales α, β are applied last,
  so no finite input overflows midway and an output beyond the dtype's range
  saturates. A slice with a NaN or Inf gradient returns NaN in both of its
  outputs, which propagates like optax's own transformations.
  """
  sizes = [p.s.shape[0] for p in ps]
  hats, prods = [], []
  for p in ps:
    A, B = normalise_slices(p.A), normalise_slices(p.B)
    gamma = jnp.maximum(amax(p.g_A), amax(p.g_B))
    finite = jnp.isfinite(gamma)
    gamma = jnp.where(finite & (gamma > 0), gamma, jnp.ones_like(gamma))
    g_A, g_B = eq.divide(p.g_A, gamma[:, None, None]), eq.divide(p.g_B, gamma[:, None, None])
    hats.append((A, B, g_A, g_B, gamma, finite))
    prods.append(_products(p.layout, A.hat, B.hat, g_A, g_B))
  prods = _Products(*(cat(x) for x in zip(*prods)))
  ratio = cat([eq.divide(B.scale, A.scale) ** 2 for A, B, *_ in hats])
  coef = _coefficients(prods, cat([p.s for p in ps]), x_choice, damping, ratio, EighOrder())

  out = []
  for p, (A, B, g_A, g_B, gamma, finite), (M1, M3, P, Z) in zip(
    ps, hats, zip(*(split(c, sizes) for c in coef))
  ):
    L = p.layout
    a, b, c = col(A.scale), col(B.scale), col(gamma)
    d = b if eq.x_unit(x_choice) == "B" else a
    out_A = eq.rescale(lo.left(L, M1, g_A), c, b, b) + eq.rescale(lo.left(L, Z, A.hat), c, b, d)
    out_B = eq.rescale(lo.right(L, g_B, M3) - lo.right(L, B.hat, P), c, a, a) - eq.rescale(
      lo.right(L, B.hat, Z), c, a, d
    )
    out.append(tuple(jnp.where(col(finite), eq.saturate(x), jnp.nan) for x in (out_A, out_B)))
  return out, EighOrder.token(coef.M1)


def stack_groups(
  items: Sequence[Any], tags: Sequence[Any]
) -> tuple[list, Callable[[Sequence[Any]], list]]:
  """Concatenates the items of equal ``tags`` whose arrays have equal shapes (but for
  their leading, slice axis N) and dtypes along that axis.

  Each item is a pytree (e.g. a `LeafPair` and its moments) whose every array has
  the slice axis first. Returns the groups' items, and a function that splits
  per-group results (pytrees of such arrays, one per group) back into per-item
  results. Work traced per group instead of per pair keeps the compile time
  proportional to the number of kinds of pairs, not of pairs: a model's blocks
  repeat the same layers. ``tags`` keeps apart items that must not be mixed: on a
  mesh, pairs of one shape but another sharding (a column- and a row-parallel
  projection) would be resharded by the concatenation.
  """
  groups: dict = {}
  for i, (item, tag) in enumerate(zip(items, tags, strict=True)):
    leaves, treedef = jax.tree.flatten(item)
    key = (tag, treedef, tuple((x.shape[1:], jnp.dtype(x.dtype)) for x in leaves))
    groups.setdefault(key, []).append(i)
  members = list(groups.values())
  sizes = [[jax.tree.leaves(items[i])[0].shape[0] for i in m] for m in members]
  stacked = [
    items[m[0]]
    if len(m) == 1
    else jax.tree.map(lambda *xs: jnp.concatenate(xs, 0), *(items[i] for i in m))
    for m in members
  ]

  def split(results: Sequence[Any]) -> list:
    out: list = [None] * len(items)
    for m, n, result in zip(members, sizes, results):
      for j, i in enumerate(m):
        start = sum(n[:j])
        out[i] = (
          result if len(m) == 1 else jax.tree.map(lambda x, a=start, k=n[j]: x[a : a + k], result)
        )
    return out

  return stacked, split


# Set by `record_paths`; read when compiled code runs.
_path_log: list[bool] | None = None


@contextlib.contextmanager
def record_paths() -> Iterator[list[bool]]:
  """Test hook: which path compiled code takes.

  Code traced inside the block appends, each time it runs, True (raw) or
  False (normalised) for every rank bucket of every `adjust` call and every
  group of a factored or full step, in the order they run.
  """
  global _path_log
  previous, _path_log = _path_log, []
  try:
    yield _path_log
  finally:
    _path_log = previous


def recording() -> bool:
  """Whether code traced now is inside `record_paths` (a static argument of the jitted
  steps, so that recording and non-recording code are compiled apart)."""
  return _path_log is not None


def log_path(raw) -> None:
  """Logs, when compiled code runs inside `record_paths`, whether a group took the
  raw path (True) or the normalised one."""
  if _path_log is not None:
    jax.debug.callback(_append_path, raw)


def _append_path(raw):
  if _path_log is not None:
    _path_log.append(bool(raw))


# Whether the `eigh`s of one step run one after another (`EighOrder`). None: on
# XLA:CPU only, where the deadlock below happens; True or False forces it.
serial_eigh: bool | None = None


class EighOrder:
  """The `eigh`s of one step, made to run one after another on XLA:CPU.

  jaxlib's CPU `eigh` splits a large batch into chunks on XLA's intra-op pool
  and waits for them: two such calls at once on a pool of two threads waited
  for each other forever (the factored mode's step at Llama-2-7B r = 32 on a
  2-core CPU). Each `eigh` input gets an exact 0 added that depends on the end
  of the previous computation that may contain an `eigh`: a `jax.lax.cond`
  whose branches return `token` of their last result (`wait_for`). The 0 must
  be formed inside the branches: outside, XLA sees that fmin(|x|, 0) is 0 and
  drops the dependency, and an optimization barrier does not survive to
  XLA:CPU's schedule. Off on other backends (`serial_eigh`).
  """

  def __init__(self, zero: Array | None = None):
    self.zero = zero
    self._on = jax.default_backend() == "cpu" if serial_eigh is None else serial_eigh

  @staticmethod
  def token(x: Array) -> Array:
    """An exact 0 that depends on ``x`` (for every value, NaN included): one entry
    of a small array, replicated on a mesh, so taking it moves nothing."""
    return jnp.fmin(jnp.abs(jnp.ravel(x)[0]), 0)

  def wait_for(self, token: Array) -> None:
    """The next `eigh` starts after ``token`` (`token`, returned by a cond) is computed."""
    self.zero = token

  def eigh(self, G: Array, damping) -> eq.DampedEig:
    """`equations.damped_eigh` of G, after the last `wait_for`."""
    if self._on and self.zero is not None:
      G = G + self.zero.astype(G.dtype)
    return eq.damped_eigh(G, damping)


def _adjust_bucket(ps: Sequence[LeafPair], x_choice, damping, order: EighOrder) -> tuple:
  """`adjust` for pairs of one rank and dtype."""
  # The named scopes label each stage's ops in the compiled HLO, where the
  # benchmarks (benchmarks/hlo_traffic.py) attribute their cost.
  with jax.named_scope("lorapro/adjust/products"):
    prods = _Products(
      *(cat(x) for x in zip(*(_products(p.layout, p.A, p.B, p.g_A, p.g_B) for p in ps)))
    )
  s = cat([p.s for p in ps])
  with jax.named_scope("lorapro/adjust/coefficients"):
    coef = _coefficients(prods, s, x_choice, damping, jnp.ones_like(s), order)
  with jax.named_scope("lorapro/adjust/guard"):
    gamma_A = cat([amax(p.g_A) for p in ps])
    gamma_B = cat([amax(p.g_B) for p in ps])
    ok = _raw_trusted(prods, coef, gamma_A, gamma_B, s, x_choice, ps[0].rank, prods.G_A.dtype)
  log_path(ok)

  def raw():
    with jax.named_scope("lorapro/adjust/outputs"):
      return _raw_outputs(ps, coef), EighOrder.token(coef.M1)

  def normalised():
    with jax.named_scope("lorapro/adjust/normalised"):
      return _normalised_outputs(ps, x_choice, damping)

  out, token = jax.lax.cond(ok, raw, normalised)
  order.wait_for(token)
  return out


def adjust(
  pairs: Sequence[LeafPair], x_choice: XChoice, damping, order: EighOrder | None = None
) -> list[tuple[Array, Array]]:
  """Theorem 2.1 for every pair: (g^A, g^B) per pair, laid out like (A, B).

  A result beyond the dtype's range saturates; a slice with a NaN or Inf
  gradient returns NaN in both of its outputs. ``order`` runs the `eigh`s
  after those of earlier calls of the same step (`EighOrder`).
  """
  if x_choice not in X_CHOICES:
    raise ValueError(f"x_choice must be one of {X_CHOICES}, got {x_choice!r}")
  order = EighOrder() if order is None else order
  # Jitted so that an eager call compiles one computation (with both branches
  # of each cond) instead of dispatching every op; inlined under an outer jit.
  out, order.zero = _adjust_jit(tuple(pairs), x_choice, damping, recording(), order.zero)
  return out


@partial(jax.jit, static_argnums=(1, 3))
def _adjust_jit(pairs, x_choice, damping, record, zero):
  del record  # a static argument: code traced to record paths is compiled apart
  order = EighOrder(zero)
  buckets: dict = {}
  for i, p in enumerate(pairs):
    buckets.setdefault((p.rank, jnp.dtype(p.A.dtype)), []).append(i)
  out = [None] * len(pairs)
  for members in buckets.values():
    result = _adjust_bucket([pairs[i] for i in members], x_choice, damping, order)
    for i, res in zip(members, result):
      out[i] = tuple(res)
  return out, order.zero
