"""Byte-level text from the Python standard library's docstrings, offline.

The corpus is every module, class and function docstring of a fixed list of
stdlib packages, read from the running Python's sources with `ast`. Tokens are
bytes (vocabulary 256). Modules are split into train and validation by a
deterministic hash of their name, so the validation text is unseen.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

VOCAB = 256
# Packages and modules with plenty of prose in their docstrings.
MODULES = (
  "argparse",
  "collections",
  "csv",
  "dataclasses",
  "email",
  "functools",
  "http",
  "json",
  "logging",
  "pathlib",
  "string",
  "textwrap",
  "urllib",
  "zipfile",
)


def _files(modules: Sequence[str]) -> Iterator[tuple[str, Path]]:
  root = Path(sysconfig.get_paths()["stdlib"])
  for name in modules:
    path = root / name
    if path.is_dir():
      for f in sorted(path.rglob("*.py")):
        if "test" not in f.parts:
          yield ".".join((name, *f.relative_to(path).with_suffix("").parts)), f
    elif path.with_suffix(".py").is_file():
      yield name, path.with_suffix(".py")


def docstrings(source: str) -> list[str]:
  """Every module, class and function docstring of ``source``, in order."""
  tree = ast.parse(source)
  nodes = [tree, *ast.walk(tree)]
  kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  out = [ast.get_docstring(n) for n in nodes if isinstance(n, kinds)]
  return list(dict.fromkeys(d for d in out if d))  # the module appears twice


def is_validation(module: str, fraction: float = 0.15) -> bool:
  digest = hashlib.sha256(module.encode()).digest()
  return int.from_bytes(digest[:4], "big") / 2**32 < fraction


@dataclasses.dataclass(frozen=True)
class Corpus:
  train: np.ndarray  # uint8 bytes
  validation: np.ndarray
  modules: int

  @classmethod
  def load(cls, modules: Sequence[str] = MODULES, max_bytes: int | None = None) -> Corpus:
    parts: dict[bool, list[str]] = {False: [], True: []}
    count = 0
    for name, path in _files(modules):
      try:
        text = "\n\n".join(docstrings(path.read_text(encoding="utf-8")))
      except (SyntaxError, UnicodeDecodeError):
        continue
      parts[is_validation(name)].append(text)
      count += 1
    train, val = ("\n\n".join(parts[k]).encode("utf-8") for k in (False, True))
    if max_bytes is not None:
      train, val = train[:max_bytes], val[: max(max_bytes // 4, 1)]
    return cls(np.frombuffer(train, np.uint8), np.frombuffer(val, np.uint8), count)


def batches(data: np.ndarray, batch: int, seq_len: int, seed: int) -> Iterator[np.ndarray]:
  """Random windows of ``seq_len + 1`` bytes (inputs and next-byte targets), forever."""
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(data) - seq_len - 1, batch)
    yield np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def fixed_batches(data: np.ndarray, batch: int, seq_len: int, count: int) -> list[np.ndarray]:
  """``count`` evenly spaced batches of windows, the same every time."""
  n = batch * count
  starts = np.linspace(0, len(data) - seq_len - 2, n).astype(int)
  windows = np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)
  return list(windows.reshape(count, batch, seq_len + 1))
