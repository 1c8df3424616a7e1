"""Finding LoRA (A, B) pairs in a parameter pytree, and the index built from them.

A pair is two sibling leaves. `LoRASpec` names them and says how they are laid
out, in the spirit of optax's `MuonDimensionNumbers`: all axes before the last
two are batch axes (stacked or scanned layers, experts).

`PairIndex` is the flattened-tree bookkeeping that every transformation
shares: which leaves are paired, gathering a pair's leaves as
`batched.LeafPair` (batch axes flattened, compute dtype) and scattering
results back, moment shapes, per-pair scales and state keys.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lorapro_jax import batched
from lorapro_jax import equations as eq
from lorapro_jax.layout import Layout

Path = tuple[Hashable, ...]


class LoRASpec(NamedTuple):
  """How to recognise one kind of LoRA pair by leaf names.

  Attributes:
    a_name: name of the A leaf, matched against the end of a leaf's path; use
      "/" to match several trailing keys (e.g. "lora_A/weight").
    b_name: name of the B leaf, which must sit at the same parent path.
    layout: "flax" for ``a (..., in, r)`` and ``b (..., r, out)`` (the delta
      kernel is ``s · a @ b``, as in ``flax.nnx.LoRA``, Qwix and Flax Linen);
      "paper" for ``A (..., r, in)`` and ``B (..., out, r)`` (the delta weight
      is ``s · B @ A``, as in the paper and PyTorch/PEFT).
  """

  a_name: str = "lora_a"
  b_name: str = "lora_b"
  layout: Layout = "flax"


FLAX_NNX = LoRASpec("lora_a", "lora_b", "flax")
QWIX = LoRASpec("kernel_lora_a", "kernel_lora_b", "flax")
PEFT = LoRASpec("lora_A", "lora_B", "paper")


class LoRAPair(NamedTuple):
  """One pair, by the (normalised) key paths of its two leaves."""

  a_path: Path
  b_path: Path
  layout: Layout = "flax"


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


def _dims(a_shape, b_shape, layout: Layout, a_path: Path, b_path: Path):
  """(batch_shape, m, n, r) of a pair, or a ValueError naming both leaves."""
  where = (
    f"LoRA pair A={path_str(a_path)} {tuple(a_shape)}, "
    f"B={path_str(b_path)} {tuple(b_shape)} (layout {layout!r})"
  )
  if len(a_shape) < 2 or len(b_shape) < 2:
    raise ValueError(f"{where}: both leaves need at least 2 dimensions.")
  if len(a_shape) != len(b_shape) or tuple(a_shape[:-2]) != tuple(b_shape[:-2]):
    raise ValueError(f"{where}: the leading (batch) axes differ.")
  if layout == "flax":
    (n, r), (r_b, m) = a_shape[-2:], b_shape[-2:]
  elif layout == "paper":
    (r, n), (m, r_b) = a_shape[-2:], b_shape[-2:]
  else:
    raise ValueError(f"{where}: unknown layout {layout!r}; use 'flax' or 'paper'.")
  if r != r_b:
    raise ValueError(f"{where}: the ranks differ ({r} vs {r_b}).")
  if r == 0 or m == 0 or n == 0:
    raise ValueError(f"{where}: a zero-sized dimension.")
  return tuple(a_shape[:-2]), int(m), int(n), int(r)


def find_pairs(params, pairs: PairsArg = None) -> list[FoundPair]:
  """Finds and validates every LoRA pair in ``params``.

  Raises:
    ValueError: for an A leaf without its B sibling (or the reverse), for
      mismatched ranks, batch axes or dimensionality; the message names the
      leaf paths and shapes.
  """
  leaves = _leaves(params)
  index = {p: i for i, (p, _) in enumerate(leaves)}
  shape = lambda i: tuple(np.shape(leaves[i][1]))
  found: list[FoundPair] = []
  used: dict[int, Path] = {}

  def add(a_path, b_path, layout, parent):
    ia, ib = index[a_path], index[b_path]
    for i, p in ((ia, a_path), (ib, b_path)):
      if i in used:
        raise ValueError(
          f"Leaf {path_str(p)} belongs to two LoRA pairs "
          f"({path_str(used[i])} and {path_str(parent)})."
        )
      used[i] = parent
    batch, m, n, r = _dims(shape(ia), shape(ib), layout, a_path, b_path)
    found.append(FoundPair(ia, ib, parent, a_path, b_path, layout, batch, (m,), (n,), r))

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
      add(tuple(pair.a_path), tuple(pair.b_path), pair.layout, tuple(pair.a_path[:-1]))
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
      add(parent + a_sfx, parent + b_sfx, spec.layout, parent)
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


def _flat(x, pair: FoundPair, dtype=None) -> jax.Array:
  x = jnp.asarray(x, dtype)
  return x.reshape((-1,) + x.shape[len(pair.batch_shape) :])


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
    """Every pair's factors and gradients, batch axes flattened, in compute dtype."""
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
      A, B, g_A, g_B = (_flat(x, f, dt) for x in arrays)
      out.append(batched.LeafPair(A, B, g_A, g_B, pair_scale(scale, f, dt), f.layout))
    return out

  def scatter(self, leaves: Sequence[Any], per_pair: Sequence[tuple[Any, Any]]) -> list[Any]:
    """``leaves`` with every pair's two leaves replaced by its (N, ...) results,
    reshaped and cast (saturating) to the replaced leaves' shapes and dtypes."""
    out = list(leaves)
    for f, results in zip(self.pairs, per_pair):
      for i, x in zip((f.a_index, f.b_index), results):
        out[i] = eq.saturating_cast(x.reshape(np.shape(leaves[i])), jnp.result_type(leaves[i]))
    return out

  def weight_flat(self, x: jax.Array, k: int) -> jax.Array:
    """Pair k's weight-shaped array (its `FoundPair.weight_shape`) as (N, ., .)."""
    return _flat(x, self.pairs[k])
