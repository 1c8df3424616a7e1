"""Finding LoRA (A, B) pairs in a parameter pytree, and the index built from them.

A pair is two sibling leaves. `LoRASpec` names them and says how they are laid
out, in the spirit of optax's `MuonDimensionNumbers`. In the flax layout
``a`` is (batch…, in…, r) and ``b`` is (batch…, r, out…): the rank axis is the
last axis of ``a`` and the first non-batch axis of ``b``; the paper layout is
the mirror image, ``A`` (batch…, r, in…) and ``B`` (batch…, out…, r). Batch
axes (stacked or scanned layers, experts) lead both leaves; in- and
out-features may span several axes (an einsum kernel's (heads, head_dim)),
and the pair is adjusted as the 2-D pair with n = ∏in… and m = ∏out….

How many axes are batch axes is read from the shapes where only one number
fits (`readings`), or given as ``batch_axes``; where several fit, finding the
pairs raises and asks for it.

`PairIndex` is the flattened-tree bookkeeping that every transformation
shares: which leaves are paired, gathering a pair's leaves as
`batched.LeafPair` (batch axes flattened, compute dtype) and scattering
results back, moment shapes, per-pair scales and state keys.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lorapro_jax import batched
from lorapro_jax import equations as eq
from lorapro_jax.layout import Layout

Path = tuple[Hashable, ...]


BatchAxes = int | Callable[[Path], int | None] | None


class LoRASpec(NamedTuple):
  """How to recognise one kind of LoRA pair by leaf names.

  Attributes:
    a_name: name of the A leaf, matched against the end of a leaf's path; use
      "/" to match several trailing keys (e.g. "lora_A/weight").
    b_name: name of the B leaf, which must sit at the same parent path.
    layout: "flax" for ``a (batch…, in…, r)`` and ``b (batch…, r, out…)``
      (the delta kernel is ``s · a @ b``, as in ``flax.nnx.LoRA``, Qwix and
      Flax Linen); "paper" for ``A (batch…, r, in…)`` and ``B (batch…, out…,
      r)`` (the delta weight is ``s · B @ A``, as in the paper and PEFT).
    batch_axes: how many leading axes of both leaves are batch axes (stacked
      or scanned layers, experts). None (default): read from the shapes,
      which raises where more than one number fits (see `readings`). A
      callable ``parent path -> int | None`` gives it per pair.
  """

  a_name: str = "lora_a"
  b_name: str = "lora_b"
  layout: Layout = "flax"
  batch_axes: BatchAxes = None


FLAX_NNX = LoRASpec("lora_a", "lora_b", "flax")
QWIX = LoRASpec("kernel_lora_a", "kernel_lora_b", "flax")
PEFT = LoRASpec("lora_A", "lora_B", "paper")


class LoRAPair(NamedTuple):
  """One pair, by the (normalised) key paths of its two leaves; ``batch_axes``
  as in `LoRASpec` (None: read from the shapes)."""

  a_path: Path
  b_path: Path
  layout: Layout = "flax"
  batch_axes: int | None = None


PairsArg = LoRASpec | Sequence[LoRASpec] | Callable[[Any], Iterable[LoRAPair]] | None


@dataclasses.dataclass(frozen=True)
class FoundPair:
  """A validated pair: leaf indices in the flattened tree and its dimensions."""

  a_index: int
  b_index: int
  path: Path  # the parent of the A leaf (and of B, for name-based specs)
  a_path: Path
  b_path: Path
  layout: Layout
  batch_shape: tuple[int, ...]
  out_shape: tuple[int, ...]  # out-feature axes (the rows of the paper's B and W)
  in_shape: tuple[int, ...]  # in-feature axes (the columns of the paper's A and W)
  r: int

  @property
  def m(self) -> int:
    """Out features, all out-feature axes together."""
    return math.prod(self.out_shape)

  @property
  def n(self) -> int:
    """In features, all in-feature axes together."""
    return math.prod(self.in_shape)

  @property
  def weight_shape(self) -> tuple[int, ...]:
    """Shape of the adapted weight, as its m×n moments are stored: the kernel's
    ``(..., in, out)`` for the flax layout, ``(..., out, in)`` for the paper's."""
    if self.layout == "flax":
      return self.batch_shape + self.in_shape + self.out_shape
    return self.batch_shape + self.out_shape + self.in_shape

  @property
  def out_vector_shape(self) -> tuple[int, ...]:
    """Shape of a per-out-feature vector (an m-vector per batch slice)."""
    return self.batch_shape + self.out_shape

  @property
  def in_vector_shape(self) -> tuple[int, ...]:
    """Shape of a per-in-feature vector (an n-vector per batch slice)."""
    return self.batch_shape + self.in_shape


def _key_name(k) -> Hashable:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def normalise_path(path) -> Path:
  """Key path to a tuple of plain names, dropping an `nnx.Variable`'s 'value'."""
  names = tuple(_key_name(k) for k in path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names = names[:-1]
  return names


def path_str(path: Path) -> str:
  return "/".join(str(p) for p in path) or "<root>"


def _leaves(tree) -> list[tuple[Path, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(normalise_path(p), leaf) for p, leaf in flat]


def _as_specs(pairs: PairsArg) -> tuple[LoRASpec, ...]:
  if pairs is None:
    return (FLAX_NNX,)
  if isinstance(pairs, LoRASpec):
    return (pairs,)
  specs = tuple(pairs)
  for s in specs:
    if not isinstance(s, LoRASpec):
      raise TypeError(f"pairs must be a LoRASpec, a sequence of them or a callable; got {s!r}")
  return specs


def _split(name: str) -> tuple[str, ...]:
  return tuple(name.split("/"))


def _name_matches(path: Path, suffix: tuple[str, ...]) -> bool:
  return len(path) >= len(suffix) and tuple(str(p) for p in path[-len(suffix) :]) == suffix


class Reading(NamedTuple):
  """One way to read a pair's shapes: its batch, out- and in-feature axes, rank."""

  batch_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  in_shape: tuple[int, ...]
  r: int


_LAYOUT_DOC = {
  "flax": "a (batch…, in…, r), b (batch…, r, out…)",
  "paper": "A (batch…, r, in…), B (batch…, out…, r)",
}


def _reading(a_shape, b_shape, layout: Layout, k: int) -> Reading:
  """The reading with k batch axes (unchecked)."""
  if layout == "flax":  # a (batch, in…, r), b (batch, r, out…)
    return Reading(a_shape[:k], b_shape[k + 1 :], a_shape[k:-1], a_shape[-1])
  return Reading(a_shape[:k], b_shape[k:-1], a_shape[k + 1 :], b_shape[-1])  # paper


def _rank_axes(a_shape, b_shape, layout: Layout) -> tuple[int, tuple[int, ...]]:
  """The rank (the last axis of a, flax, or of B, paper) and, for k = 0, 1, …,
  the other leaf's axis k, which is its rank axis if there are k batch axes."""
  ks = range(min(len(a_shape), len(b_shape)) - 1)  # at least one in- and one out-axis
  if layout == "flax":
    return a_shape[-1], tuple(b_shape[k] for k in ks)
  return b_shape[-1], tuple(a_shape[k] for k in ks)


def readings(a_shape, b_shape, layout: Layout) -> dict[int, Reading]:
  """Every number k of batch axes that the shapes of a pair allow, and its reading.

  k fits when both leaves agree on their first k axes, the rank axis (a's
  last, flax; B's last, paper) equals the other leaf's axis k, and at least
  one in- and one out-feature axis remain. For a (L, 16, 3), b (L, 3, 24) in
  the flax layout only k = 1 fits unless L = 3; with L = 3, k = 0 (in (3,
  16), out (3, 24)) fits too, and the number must be given.

  Examples:
    >>> {k: (x.in_shape, x.out_shape) for k, x in readings((16, 3), (3, 4, 8), "flax").items()}
    {0: ((16,), (4, 8))}
    >>> sorted(readings((3, 16, 3), (3, 3, 24), "flax"))
    [0, 1]
  """
  a_shape, b_shape = tuple(a_shape), tuple(b_shape)
  if layout not in _LAYOUT_DOC:
    return {}
  r, axes = _rank_axes(a_shape, b_shape, layout)
  return {
    k: _reading(a_shape, b_shape, layout, k)
    for k, ax in enumerate(axes)
    if a_shape[:k] == b_shape[:k] and ax == r
  }


def _describe(k: int, x: Reading) -> str:
  return f"batch_axes={k}: batch {x.batch_shape}, in {x.in_shape}, out {x.out_shape}, r {x.r}"


def _dims(a_shape, b_shape, layout: Layout, a_path: Path, b_path: Path, batch_axes=None):
  """The `Reading` of a pair, or a ValueError naming both leaves."""
  a_shape, b_shape = tuple(int(d) for d in a_shape), tuple(int(d) for d in b_shape)
  where = (
    f"LoRA pair A={path_str(a_path)} {a_shape}, B={path_str(b_path)} {b_shape} (layout {layout!r})"
  )
  if layout not in _LAYOUT_DOC:
    raise ValueError(f"{where}: unknown layout {layout!r}; use 'flax' or 'paper'.")
  if len(a_shape) < 2 or len(b_shape) < 2:
    raise ValueError(f"{where}: both leaves need at least 2 dimensions.")
  r, axes = _rank_axes(a_shape, b_shape, layout)
  rank_leaf, other = ("A", "B") if layout == "flax" else ("B", "A")
  if batch_axes is not None:
    k = batch_axes
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
      raise ValueError(f"{where}: batch_axes must be a non-negative int or None, got {k!r}.")
    k = int(k)
    if k >= len(axes):
      raise ValueError(
        f"{where}: batch_axes={k} leaves no in- or out-feature axis ({_LAYOUT_DOC[layout]})."
      )
    if a_shape[:k] != b_shape[:k]:
      raise ValueError(
        f"{where}: the leading (batch) axes differ with batch_axes={k}: "
        f"{a_shape[:k]} vs {b_shape[:k]}."
      )
    if axes[k] != r:
      raise ValueError(
        f"{where}: the ranks differ ({r} vs {axes[k]}) with batch_axes={k}: {rank_leaf}'s last "
        f"axis is the rank, and {other}'s axis {k} must equal it ({_LAYOUT_DOC[layout]})."
      )
    found = {k: _reading(a_shape, b_shape, layout, k)}
  else:
    found = readings(a_shape, b_shape, layout)
  if not found:
    shared = max(k for k in range(len(axes)) if a_shape[:k] == b_shape[:k])
    if shared == 0:
      tried = f"with no batch axes {other}'s rank axis, its axis 0, is {axes[0]}"
    else:
      tried = (
        f"for k = 0…{shared} batch axes (the leading axes both leaves share) {other}'s rank "
        f"axis, its axis k, is {axes[: shared + 1]}"
      )
    raise ValueError(
      f"{where}: no number of batch axes fits the layout, {_LAYOUT_DOC[layout]}: the rank is "
      f"{r} ({rank_leaf}'s last axis), but {tried}; the ranks differ ({r} vs {axes[shared]})."
    )
  if len(found) > 1:
    raise ValueError(
      f"{where}: the number of leading (batch) axes is ambiguous; the shapes fit "
      + "; ".join(_describe(k, x) for k, x in found.items())
      + ". Say which with LoRASpec(..., batch_axes=k) or LoRAPair(..., batch_axes=k)."
    )
  ((_, x),) = found.items()
  if x.r == 0 or 0 in x.in_shape or 0 in x.out_shape:
    raise ValueError(f"{where}: a zero-sized dimension.")
  return x


def find_pairs(params, pairs: PairsArg = None) -> list[FoundPair]:
  """Finds and validates every LoRA pair in ``params``.

  Raises:
    ValueError: for an A leaf without its B sibling (or the reverse), for
      shapes that fit no reading of the layout (mismatched ranks or batch
      axes, fewer than 2 dimensions) or several (the number of batch axes is
      ambiguous: give ``batch_axes``); the message names the leaf paths and
      shapes.
  """
  leaves = _leaves(params)
  index = {p: i for i, (p, _) in enumerate(leaves)}
  shape = lambda i: tuple(np.shape(leaves[i][1]))
  found: list[FoundPair] = []
  used: dict[int, Path] = {}

  def add(a_path, b_path, layout, parent, batch_axes):
    ia, ib = index[a_path], index[b_path]
    for i, p in ((ia, a_path), (ib, b_path)):
      if i in used:
        raise ValueError(
          f"Leaf {path_str(p)} belongs to two LoRA pairs "
          f"({path_str(used[i])} and {path_str(parent)})."
        )
      used[i] = parent
    if callable(batch_axes):
      batch_axes = batch_axes(parent)
    x = _dims(shape(ia), shape(ib), layout, a_path, b_path, batch_axes)
    found.append(FoundPair(ia, ib, parent, a_path, b_path, layout, *x))

  if callable(pairs) and not isinstance(pairs, LoRASpec):
    for pair in pairs(params):
      pair = LoRAPair(*pair)
      for p in (pair.a_path, pair.b_path):
        if tuple(p) not in index:
          raise ValueError(
            f"The pairs callable returned {path_str(p)}, which is not a leaf "
            f"of the parameters; leaves are e.g. "
            f"{[path_str(q) for q, _ in leaves[:5]]}."
          )
      add(
        tuple(pair.a_path),
        tuple(pair.b_path),
        pair.layout,
        tuple(pair.a_path[:-1]),
        pair.batch_axes,
      )
    return found

  for spec in _as_specs(pairs):
    a_sfx, b_sfx = _split(spec.a_name), _split(spec.b_name)
    a_parents = {p[: -len(a_sfx)] for p, _ in leaves if _name_matches(p, a_sfx)}
    b_parents = {p[: -len(b_sfx)] for p, _ in leaves if _name_matches(p, b_sfx)}
    for parent in sorted(a_parents ^ b_parents, key=path_str):
      lone, missing = (
        (parent + a_sfx, parent + b_sfx)
        if parent in a_parents
        else (parent + b_sfx, parent + a_sfx)
      )
      raise ValueError(
        f"LoRA leaf {path_str(lone)} {shape(index[lone])} has no partner "
        f"{path_str(missing)} (spec {spec}). Pass both leaves of every pair to the "
        "optimizer (check optax.masked/partition labels and nnx filters)."
      )
    for parent in sorted(a_parents, key=path_str):
      add(parent + a_sfx, parent + b_sfx, spec.layout, parent, spec.batch_axes)
  return found


ScaleArg = float | jax.Array | Callable[[Path, int], Any]


def pair_scale(scale: ScaleArg, pair: FoundPair, dtype) -> jax.Array:
  """The scaling s of every slice of a pair, flattened to (N,)."""
  s = scale(pair.path, pair.r) if callable(scale) else scale
  s = jnp.asarray(s, dtype)
  try:
    s = jnp.broadcast_to(s, pair.batch_shape)
  except ValueError:
    raise ValueError(
      f"The scale for LoRA pair {path_str(pair.path)} has shape {s.shape}, which does not "
      f"broadcast to its batch shape {pair.batch_shape}."
    ) from None
  return s.reshape(-1)


# What a per-pair array is shaped like: the A leaf, the B leaf, the adapted
# weight, or a vector over the out (m) or in (n) features.
Role = Literal["a", "b", "weight", "out", "in"]


def stored_shape(pair: FoundPair, role: Role) -> tuple[int, ...]:
  """The shape of a ``role`` array of ``pair`` as stored (leaves, optimizer state)."""
  r, batch = (pair.r,), pair.batch_shape
  flax = pair.layout == "flax"
  return {
    "a": batch + (pair.in_shape + r if flax else r + pair.in_shape),
    "b": batch + (r + pair.out_shape if flax else pair.out_shape + r),
    "weight": pair.weight_shape,
    "out": pair.out_vector_shape,
    "in": pair.in_vector_shape,
  }[role]


def flat_shape(pair: FoundPair, role: Role) -> tuple[int, ...]:
  """The shape a ``role`` array of ``pair`` is computed in: batch axes
  flattened to N, feature axes merged (A (N, n, r) and B (N, r, m) for the
  flax layout, as in `batched.LeafPair`; vectors (N, m) or (N, n))."""
  N, m, n, r = math.prod(pair.batch_shape), pair.m, pair.n, pair.r
  flax = pair.layout == "flax"
  return {
    "a": (N, n, r) if flax else (N, r, n),
    "b": (N, r, m) if flax else (N, m, r),
    "weight": (N, n, m) if flax else (N, m, n),
    "out": (N, m),
    "in": (N, n),
  }[role]


@dataclasses.dataclass(frozen=True)
class PairIndex:
  """The pairs of a parameter tree, by position in its flattened leaves.

  Attributes:
    pairs: every pair, in `find_pairs` order.
    keys: one unique name per pair (its parent's path, or its A leaf's path
      where two pairs share a parent), keying per-pair optimizer state.
    num_leaves: how many leaves the tree has.
  """

  pairs: tuple[FoundPair, ...]
  keys: tuple[str, ...]
  num_leaves: int

  @classmethod
  def build(cls, params, pairs: PairsArg = None) -> PairIndex:
    found = tuple(find_pairs(params, pairs))
    parents = [path_str(f.path) for f in found]
    keys = tuple(
      name if parents.count(name) == 1 else path_str(f.a_path) for name, f in zip(parents, found)
    )
    return cls(found, keys, len(jax.tree.leaves(params)))

  @property
  def kinds(self) -> tuple[str, ...]:
    """Each pair's key with its integer path components (layer indices) as "*":
    the pairs of one kind are the same layer of different blocks, e.g.
    "layers/*/attn/q", which share their shapes and, on a mesh, their sharding."""
    return tuple("/".join("*" if c.isdigit() else c for c in key.split("/")) for key in self.keys)

  @property
  def paired(self) -> frozenset[int]:
    """Indices of the leaves that belong to a pair."""
    return frozenset(i for f in self.pairs for i in (f.a_index, f.b_index))

  def mask(self, tree) -> Any:
    """A tree of booleans like ``tree``: True at the leaves outside pairs."""
    leaves, treedef = jax.tree.flatten(tree)
    self.check_leaf_count(leaves, "the tree")
    paired = self.paired
    return jax.tree.unflatten(treedef, [i not in paired for i in range(len(leaves))])

  def check_leaf_count(self, leaves: Sequence[Any], what: str) -> None:
    if len(leaves) != self.num_leaves:
      raise ValueError(
        f"{what} has {len(leaves)} leaves but the parameters have {self.num_leaves}; "
        "they must have the same structure."
      )

  def leaf_pairs(
    self, param_leaves: Sequence[Any], update_leaves: Sequence[Any], scale: ScaleArg
  ) -> list[batched.LeafPair]:
    """Every pair's factors and gradients as 2-D slices, in compute dtype: batch
    axes flattened to N and feature axes to n and m (`flat_shape`)."""
    self.check_leaf_count(update_leaves, "updates")
    out = []
    for f in self.pairs:
      for i, path in ((f.a_index, f.a_path), (f.b_index, f.b_path)):
        if np.shape(update_leaves[i]) != np.shape(param_leaves[i]):
          raise ValueError(
            f"The update for LoRA leaf {path_str(path)} has shape "
            f"{np.shape(update_leaves[i])} but the parameter has shape "
            f"{np.shape(param_leaves[i])}."
          )
      arrays = (
        param_leaves[f.a_index],
        param_leaves[f.b_index],
        update_leaves[f.a_index],
        update_leaves[f.b_index],
      )
      dt = batched.compute_dtype(*arrays)
      A, B, g_A, g_B = (
        jnp.asarray(x, dt).reshape(flat_shape(f, role)) for x, role in zip(arrays, "abab")
      )
      out.append(batched.LeafPair(A, B, g_A, g_B, pair_scale(scale, f, dt), f.layout))
    return out

  def scatter(self, leaves: Sequence[Any], per_pair: Sequence[tuple[Any, Any]]) -> list[Any]:
    """``leaves`` with every pair's two leaves replaced by its results shaped
    like `leaf_pairs`' (N, ., .), reshaped and cast (saturating) to the replaced
    leaves' shapes and dtypes."""
    out = list(leaves)
    for f, results in zip(self.pairs, per_pair):
      for i, x in zip((f.a_index, f.b_index), results):
        out[i] = eq.saturating_cast(x.reshape(np.shape(leaves[i])), jnp.result_type(leaves[i]))
    return out

  def flatten(self, x: jax.Array, k: int, role: Role) -> jax.Array:
    """Pair k's stored ``role`` array in its compute shape (`flat_shape`)."""
    return x.reshape(flat_shape(self.pairs[k], role))

  def unflatten(self, x: jax.Array, k: int, role: Role) -> jax.Array:
    """The inverse of `flatten`."""
    return x.reshape(stored_shape(self.pairs[k], role))

  def flatten_moments(self, m: NamedTuple, k: int):
    """Pair k's moments (a NamedTuple whose ``roles`` name each field's `Role`) in
    their compute shapes."""
    return type(m)(*(self.flatten(getattr(m, f), k, m.roles[f]) for f in m._fields))

  def unflatten_moments(self, m: NamedTuple, k: int):
    """The inverse of `flatten_moments`."""
    return type(m)(*(self.unflatten(getattr(m, f), k, m.roles[f]) for f in m._fields))
