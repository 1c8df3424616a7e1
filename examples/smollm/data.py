"""The task: from a stdlib function's name and docstring summary, write its ``def`` line.

Every public function and method of a public class with a docstring in the running
Python's standard library (the modules ``examples/minilm/data.py`` mines) gives one
example: the user turn is ``module.Class.name: first sentence of the docstring`` and the
assistant's answer is the signature, ``def name(params) -> returns:``, as ``ast.unparse``
writes it. Modules are split into train, validation and test by a hash of their name, so
the evaluated modules never occur in training. An answer is right when greedy decoding
reproduces it exactly (up to ``<|im_end|>``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import tokenize as _tokenize
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from examples.minilm.data import SPLITS, first_sentence, iter_stdlib_modules, split_of
from examples.smollm.tokenizer import chat_prompt, encode

SYSTEM = "Reply with the Python def line only."
END = "<|im_end|>"


@dataclasses.dataclass(frozen=True)
class Example:
  module: str
  qualname: str  # e.g. "JSONEncoder.encode"
  summary: str  # first sentence of the docstring
  signature: str  # "def encode(self, o):"

  def prompt(self) -> str:
    user = f"{self.module}.{self.qualname}: {self.summary}"
    return chat_prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
  ret = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
  prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
  return f"{prefix} {node.name}({ast.unparse(node.args)}){ret}:"


def extract(source: str, module: str) -> list[Example]:
  """Examples of the public functions and public classes' methods of one module's source."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # invalid escape sequences in old modules
    tree = ast.parse(source)
  out: list[Example] = []

  def visit(body, prefix):
    for node in body:
      if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
        visit(node.body, f"{prefix}{node.name}.")
      elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        summary = first_sentence(doc) if doc and not node.name.startswith("_") else ""
        if len(summary.split()) >= 3:
          out.append(Example(module, prefix + node.name, summary, signature(node)))

  visit(tree.body, "")
  return out


@functools.lru_cache(maxsize=4)
def collect(root: str | None = None, modules: tuple[str, ...] | None = None) -> tuple[Example, ...]:
  """Every example in (module, line) order; the first of identical prompts is kept."""
  seen, out = set(), []
  for name, path in iter_stdlib_modules(root, modules):
    try:
      with _tokenize.open(path) as f:  # honours coding cookies
        examples = extract(f.read(), name)
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    for e in examples:
      if (e.module, e.qualname) not in seen:
        seen.add((e.module, e.qualname))
        out.append(e)
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Encoded:
  """Token ids of one split, right-padded to a common length.

  ``ids`` (n, T) holds prompt, answer and ``<|im_end|>``; the answer's tokens are
  ``ids[i, start[i] : start[i] + length[i]]``, predicted from positions one to the left.
  """

  examples: tuple[Example, ...]
  ids: np.ndarray  # int32 (n, T)
  start: np.ndarray  # int32 (n,)
  length: np.ndarray  # int32 (n,)

  def __len__(self) -> int:
    return len(self.examples)

  def targets(self, answer_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions, ids, mask), each (n, answer_len): where each answer token is predicted
    from, the token, and whether the slot is an answer token."""
    j = np.arange(answer_len)
    mask = j[None] < self.length[:, None]
    pos = np.where(mask, self.start[:, None] - 1 + j, 0).astype(np.int32)
    ids = np.where(mask, np.take_along_axis(self.ids, pos + 1, axis=1), 0).astype(np.int32)
    return pos, ids, mask


def encode_split(tok, examples: Sequence[Example], seq_len: int, answer_len: int, pad_id: int):
  """Tokenized examples that fit ``seq_len`` tokens with answers of at most ``answer_len``
  tokens (the rest are dropped)."""
  kept, rows, starts, lengths = [], [], [], []
  for e in examples:
    prompt = encode(tok, e.prompt())
    answer = encode(tok, e.signature + END)
    if len(answer) > answer_len or len(prompt) + len(answer) > seq_len:
      continue
    kept.append(e)
    rows.append(prompt + answer + [pad_id] * (seq_len - len(prompt) - len(answer)))
    starts.append(len(prompt))
    lengths.append(len(answer))
  ids = np.asarray(rows, np.int32).reshape(len(rows), seq_len)
  return Encoded(tuple(kept), ids, np.asarray(starts, np.int32), np.asarray(lengths, np.int32))


def build(
  tok,
  *,
  seq_len: int,
  answer_len: int,
  caps: dict[str, int | None],
  pad_id: int,
  seed: int = 0,
  root: str | Path | None = None,
  modules: Iterable[str] | None = None,
) -> dict[str, Encoded]:
  """Train, validation and test splits (by module), each shuffled with ``seed`` and capped."""
  mods = tuple(sorted(modules)) if modules is not None else None
  by_split: dict[str, list[Example]] = {s: [] for s in SPLITS}
  for e in collect(str(root) if root is not None else None, mods):
    by_split[split_of(e.module)].append(e)
  out = {}
  for i, name in enumerate(SPLITS):
    enc = encode_split(tok, by_split[name], seq_len, answer_len, pad_id)
    order = np.random.default_rng([seed, i]).permutation(len(enc))[: caps.get(name)]
    ex = tuple(enc.examples[j] for j in order)
    out[name] = Encoded(ex, enc.ids[order], enc.start[order], enc.length[order])
  return out
