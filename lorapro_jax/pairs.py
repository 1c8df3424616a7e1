"""Finding LoRA (A, B) pairs in a parameter pytree.

A pair is two sibling leaves. `LoRASpec` names them and says how they are laid
out, in the spirit of optax's `MuonDimensionNumbers`: all axes before the last
two are batch axes (stacked or scanned layers, experts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

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
  m: int  # out features (rows of the paper's B and W)
  n: int  # in features (columns of the paper's A and W)
  r: int


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
    found.append(FoundPair(ia, ib, parent, a_path, b_path, layout, batch, m, n, r))

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
