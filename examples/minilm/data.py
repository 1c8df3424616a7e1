"""Offline code-search task from the Python standard library shipped with Python.

Each public function or method with a docstring yields a pair: the query is
the first sentence of its docstring, the document is its source (``def``
line(s) and body) with that docstring removed. Splits are by module, by a
deterministic hash of the module name, so test modules never appear in
training. The data depend only on the running Python's stdlib, so a given
Python version always produces the same pairs.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import hashlib
import os
import re
import sysconfig
import textwrap
import tokenize as _tokenize
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SPLITS = ("train", "validation", "test")

# Directories that are tests, GUIs, vendored/third-party code, build artefacts
# or data rather than library code with real docstrings.
SKIP_DIRS = frozenset(
  {
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "site-packages",
    "dist-packages",
    "lib2to3",
    "ensurepip",
    "pydoc_data",
    "lib-dynload",
    "__pycache__",
    "__phello__",
    "encodings",
    "venv",
    "distutils",  # distutils: deprecated, gone in 3.12
  }
)
# Easter eggs, bootstrap/platform glue and generated data. Other private
# modules stay: e.g. _pydecimal, _pyio and concurrent.futures._base hold the
# real implementations (and docstrings) of public APIs.
SKIP_MODULES = frozenset(
  {
    "this",
    "antigravity",
    "__hello__",
    "__future__",
    "_aix_support",
    "_osx_support",
    "_bootsubprocess",
    "_compat_pickle",
    "_sitebuiltins",
  }
)
SKIP_MODULE_PREFIXES = ("_sysconfigdata",)


@dataclasses.dataclass(frozen=True)
class CodePair:
  query: str  # first sentence of the docstring
  document: str  # signature + body, docstring removed, maybe truncated
  module: str  # dotted module name, e.g. "email.utils"
  qualname: str  # e.g. "Message.get_payload"
  lineno: int


@dataclasses.dataclass(frozen=True)
class Splits:
  train: list[CodePair]
  validation: list[CodePair]
  test: list[CodePair]

  def __getitem__(self, name: str) -> list[CodePair]:
    if name not in SPLITS:
      raise KeyError(name)
    return getattr(self, name)


# --------------------------------------------------------------------------- walking


def stdlib_dir() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def _module_name(rel: Path) -> str:
  parts = list(rel.with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def iter_stdlib_modules(
  root: str | Path | None = None, modules: Iterable[str] | None = None
) -> list[tuple[str, Path]]:
  """Sorted ``(module_name, path)`` of the stdlib modules worth mining.

  ``modules`` keeps only those names or their submodules (e.g. ``["json"]``
  keeps ``json`` and ``json.decoder``).
  """
  root = Path(root) if root is not None else stdlib_dir()
  wanted = tuple(modules) if modules is not None else None
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Prune in place so os.walk never enters tests or site-packages.
    dirnames[:] = [
      d for d in dirnames if d not in SKIP_DIRS and not d.startswith((".", "_", "config-"))
    ]
    for fname in filenames:
      if not fname.endswith(".py") or fname == "__main__.py" or fname.startswith("test_"):
        continue
      path = Path(dirpath) / fname
      name = _module_name(path.relative_to(root))
      if not name or name in SKIP_MODULES or name.startswith(SKIP_MODULE_PREFIXES):
        continue
      if wanted is not None and not any(name == w or name.startswith(w + ".") for w in wanted):
        continue
      out.append((name, path))
  return sorted(out)


# --------------------------------------------------------------------------- pair extraction

_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_SIGNATURE_LIKE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")


def first_sentence(docstring: str) -> str:
  """First sentence of the first paragraph, whitespace collapsed."""
  para = []
  for line in docstring.strip().splitlines():
    if not line.strip():
      break
    para.append(line.strip())
  text = " ".join(para)
  return _SENTENCE_END.split(text, maxsplit=1)[0].strip()


def _is_trivial(stmts: Sequence[ast.stmt]) -> bool:
  """Body with nothing to retrieve: pass, ..., or raise NotImplementedError."""
  for s in stmts:
    if isinstance(s, ast.Pass):
      continue
    if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and s.value.value is Ellipsis:
      continue
    if isinstance(s, ast.Raise) and s.exc is not None:
      exc = s.exc.func if isinstance(s.exc, ast.Call) else s.exc
      if isinstance(exc, ast.Name) and exc.id == "NotImplementedError":
        continue
    return False
  return True


def _truncate(text: str, max_chars: int) -> str:
  if len(text) <= max_chars:
    return text
  cut = text.rfind("\n", 0, max_chars)
  return text[: cut if cut > max_chars // 2 else max_chars]


def _document(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str:
  doc = node.body[0]
  rest = node.body[1:]
  # Line slicing keeps comments and layout; it is only safe when the docstring
  # sits on lines of its own, otherwise fall back to ast.unparse.
  if doc.lineno > node.lineno and (not rest or rest[0].lineno > doc.end_lineno):
    kept = lines[node.lineno - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
    return textwrap.dedent("".join(kept)).strip("\n")
  stripped = copy.copy(node)  # shallow: only the top-level lists change
  stripped.decorator_list = []
  stripped.body = rest
  return ast.unparse(stripped)


def extract_pairs(source: str, module: str, max_doc_chars: int = 1500) -> list[CodePair]:
  """Pairs for public module-level functions and methods of public classes.

  Nested functions and names starting with ``_`` are skipped, as are
  functions whose body is only a docstring or a stub, and docstrings whose
  first sentence is short (< 3 words) or just a call signature.
  """
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # e.g. invalid escape sequences in old modules
    tree = ast.parse(source)
  # Not str.splitlines: it also breaks at form feeds etc., which the stdlib
  # uses (e.g. shlex), and ast line numbers count only \n, \r\n and \r.
  lines = re.findall(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$", source)
  pairs: list[CodePair] = []

  def visit(body, prefix):
    for node in body:
      if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
        visit(node.body, f"{prefix}{node.name}.")
      elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith(
        "_"
      ):
        docstring = ast.get_docstring(node, clean=True)
        if not docstring or _is_trivial(node.body[1:]):
          continue
        query = first_sentence(docstring)
        if len(query.split()) < 3 or _SIGNATURE_LIKE.match(query):
          continue
        document = _truncate(_document(node, lines), max_doc_chars)
        pairs.append(CodePair(query, document, module, prefix + node.name, node.lineno))

  visit(tree.body, "")
  return pairs


@functools.lru_cache(maxsize=4)
def _collect_cached(
  root: str | None, modules: tuple[str, ...] | None, max_doc_chars: int
) -> tuple[CodePair, ...]:
  pairs = []
  for name, path in iter_stdlib_modules(root, modules):
    try:
      with _tokenize.open(path) as f:  # honours PEP 263 coding cookies
        source = f.read()
      pairs.extend(extract_pairs(source, name, max_doc_chars))
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue  # unparsable file: not worth failing the whole dataset for
  return tuple(pairs)


def collect_pairs(
  root: str | Path | None = None, modules: Iterable[str] | None = None, max_doc_chars: int = 1500
) -> list[CodePair]:
  """All pairs in deterministic (module, line) order, before splitting or dedup."""
  mods = tuple(sorted(modules)) if modules is not None else None
  return list(_collect_cached(str(root) if root is not None else None, mods, max_doc_chars))


# --------------------------------------------------------------------------- splitting


def split_unit(module: str, by: str = "module") -> str:
  """Name hashed for the split: the module, or its top-level package (``by="package"``)."""
  if by == "module":
    return module
  if by == "package":
    return module.split(".")[0]
  raise ValueError(f"by must be 'module' or 'package', got {by!r}")


def split_of(module: str, fractions: Sequence[float] = (0.8, 0.1, 0.1), by: str = "module") -> str:
  """Deterministic split ("train"/"validation"/"test") for a module name."""
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
    raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
  digest = hashlib.sha256(split_unit(module, by).encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  if u < fractions[0]:
    return "train"
  if u < fractions[0] + fractions[1]:
    return "validation"
  return "test"


def _dedup(pairs: list[CodePair]) -> list[CodePair]:
  # Identical queries make in-split retrieval ill-posed (e.g. "Return a
  # string representation." on many classes): keep the first.
  seen, out = set(), []
  for p in pairs:
    q = " ".join(p.query.lower().split())
    if q not in seen:
      seen.add(q)
      out.append(p)
  return out


def build_splits(
  *,
  seed: int = 0,
  max_pairs: int | Mapping[str, int | None] | None = None,
  fractions: Sequence[float] = (0.8, 0.1, 0.1),
  by: str = "module",
  root: str | Path | None = None,
  modules: Iterable[str] | None = None,
  max_doc_chars: int = 1500,
) -> Splits:
  """Train/validation/test code-search pairs, split by module.

  Documents are de-duplicated across the whole corpus and queries within each
  split, keeping the first in (module, line) order; each split is then shuffled with ``seed``, then capped at ``max_pairs``
  (one int for every split, or a mapping such as ``{"train": 20000,
  "test": 1000}``; ``None`` means no cap). ``root`` replaces the stdlib
  directory and ``modules`` restricts to some modules (both mainly for tests).
  """
  caps = max_pairs if isinstance(max_pairs, Mapping) else {s: max_pairs for s in SPLITS}
  unknown = set(caps) - set(SPLITS)
  if unknown:
    raise ValueError(f"unknown split names in max_pairs: {sorted(unknown)}")
  by_split: dict[str, list[CodePair]] = {s: [] for s in SPLITS}
  seen_docs = set()
  for p in collect_pairs(root, modules, max_doc_chars):
    # Global document dedup: copied code must not sit in both train and test.
    if p.document in seen_docs:
      continue
    seen_docs.add(p.document)
    by_split[split_of(p.module, fractions, by)].append(p)
  out = {}
  for i, name in enumerate(SPLITS):
    pairs = _dedup(by_split[name])
    order = np.random.default_rng([seed, i]).permutation(len(pairs))
    pairs = [pairs[j] for j in order]
    cap = caps.get(name)
    out[name] = pairs[:cap] if cap is not None else pairs
  return Splits(**out)


# --------------------------------------------------------------------------- metrics and loss


def evaluate_retrieval(
  query_emb: np.ndarray, doc_emb: np.ndarray, ks: Sequence[int] = (1, 5), chunk: int = 1024
) -> dict[str, float]:
  """Recall@k and MRR where query ``i``'s relevant document is document ``i``.

  Scores are dot products (pass L2-normalised embeddings for cosine) against
  all documents of the split. Ties count against the query (rank = 1 + number
  of other documents scoring >= the right one), so collapsed or constant
  embeddings score near zero instead of perfectly.
  """
  q = np.asarray(query_emb, dtype=np.float32)
  d = np.asarray(doc_emb, dtype=np.float32)
  if q.ndim != 2 or q.shape != d.shape:
    raise ValueError(f"need equal (n, dim) shapes, got {q.shape} and {d.shape}")
  n = q.shape[0]
  if n == 0:
    raise ValueError("no queries")
  ranks = np.empty(n, dtype=np.int64)
  for s in range(0, n, chunk):
    scores = q[s : s + chunk] @ d.T
    rows = np.arange(scores.shape[0])
    gold = scores[rows, s + rows][:, None]
    ranks[s : s + chunk] = (scores >= gold).sum(axis=1)  # includes the gold doc itself
  out = {f"recall@{k}": float(np.mean(ranks <= k)) for k in ks}
  out["mrr"] = float(np.mean(1.0 / ranks))
  return out


def contrastive_loss(
  query_emb: jax.Array, doc_emb: jax.Array, temperature: float = 0.05
) -> jax.Array:
  """Symmetric InfoNCE with in-batch negatives; row ``i`` of each is a positive pair.

  Embeddings are expected L2-normalised (logits are cosine / temperature).
  Returns the mean of the query->document and document->query losses.
  """
  logits = (query_emb @ doc_emb.T).astype(jnp.float32) / temperature
  labels = jnp.arange(logits.shape[0])
  q2d = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1).mean()
  d2q = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], axis=0).mean()
  return 0.5 * (q2d + d2q)
