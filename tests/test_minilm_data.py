"""Stdlib code-search data pipeline, retrieval metrics and contrastive loss."""

import ast
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest

from examples.minilm import data as D

SAMPLE = textwrap.dedent('''
    """Module docstring."""
    import os

    def public(a, b=1):
        """Add two numbers together. More text here.

        Long description that must not leak.
        """
        # keep this comment
        return a + b

    def _private(x):
        """Private helper function here."""
        return x

    def undocumented(x):
        return x

    def stub(x):
        """An abstract stub function."""
        raise NotImplementedError

    def short(x):
        """Short."""
        return x

    def sig_only(x):
        """sig_only(x) -> int"""
        return 1

    def outer():
        """Outer function with nested helper.

        Details.
        """
        def inner():
            """Nested functions are not public API."""
            return 2
        return inner()

    def one_line(x): "One line docstring on def line."; return x * 2

    class Widget:
        """A widget class."""

        def render(self, out):
            """Render the widget to a stream.

            Extra.
            """
            out.write("w")

        async def fetch(self):
            """Fetch remote data asynchronously
            across two lines."""
            return await self.get()

        def _hidden(self):
            """Hidden method is skipped."""
            return 0

    class _Private:
        def visible(self):
            """Method of a private class."""
            return 1
''')


def test_extract_pairs_selection_and_docstring_removal():
  pairs = D.extract_pairs(SAMPLE, "sample")
  by_name = {p.qualname: p for p in pairs}
  assert sorted(by_name) == ["Widget.fetch", "Widget.render", "one_line", "outer", "public"]
  pub = by_name["public"]
  assert pub.query == "Add two numbers together."
  assert pub.document == "def public(a, b=1):\n    # keep this comment\n    return a + b"
  assert pub.module == "sample" and pub.lineno == 5
  assert by_name["Widget.render"].document == 'def render(self, out):\n    out.write("w")'
  assert by_name["Widget.fetch"].query == "Fetch remote data asynchronously across two lines."
  assert by_name["Widget.fetch"].document.startswith("async def fetch(self):")
  assert by_name["one_line"].document == "def one_line(x):\n    return x * 2"
  assert (
    "Nested functions are not public API." in by_name["outer"].document
  )  # only its own docstring goes
  for p in pairs:
    assert '"""' not in p.document.split("\n", 1)[0] and p.query not in p.document


def test_line_numbers_survive_form_feeds():
  # str.splitlines() would split at the form feed and shift every later line.
  src = 'x = 1\n\x0c\ndef f(a):\n    """Return a plus one here."""\n    return a + 1\n'
  (p,) = D.extract_pairs(src, "m")
  assert p.document == "def f(a):\n    return a + 1"


def test_first_sentence_and_truncation():
  assert D.first_sentence("Return x. Then y.\n\nMore.") == "Return x."
  assert (
    D.first_sentence("  Spans\n  two lines without stop\n\nrest") == "Spans two lines without stop"
  )
  assert D.first_sentence("Version 3.11 is used here.") == "Version 3.11 is used here."
  long_src = "def f():\n" + "".join(f"    x{i} = {i}\n" for i in range(200))
  (p,) = D.extract_pairs(
    long_src.replace("def f():\n", 'def f():\n    """Make many variables here."""\n'),
    "m",
    max_doc_chars=100,
  )
  assert len(p.document) <= 100 and p.document.startswith("def f():")


def _fake_stdlib(root: Path, n_modules: int = 60) -> Path:
  for i in range(n_modules):
    (root / f"mod{i:02d}.py").write_text(
      f'def alpha_{i}(x):\n    """Compute alpha number {i} quickly."""\n    return x + {i}\n\n'
      f'def beta_{i}(y):\n    """Compute beta value {i} slowly."""\n    return y * {i}\n'
    )
  pkg = root / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text(
    'def init_fn(a):\n    """Package level function docs."""\n    return a\n'
  )
  (pkg / "sub.py").write_text(
    'def sub_fn(a):\n    """Submodule level function docs."""\n    return -a\n'
  )
  # Everything below must be ignored.
  noise = [
    "test/test_x.py",
    "idlelib/x.py",
    "tkinter/x.py",
    "site-packages/x.py",
    "lib2to3/x.py",
    "pkg/tests/x.py",
    "test_top.py",
    "__main__.py",
    "_sysconfigdata_x.py",
    "antigravity.py",
  ]
  for rel in noise:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('def noise(z):\n    """This must never be collected."""\n    return z\n')
  (root / "broken.py").write_text("def (:\n")  # unparsable files are skipped, not fatal
  return root


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
  return _fake_stdlib(tmp_path_factory.mktemp("stdlib"))


def test_walk_skips_noise(fake_root):
  names = [n for n, _ in D.iter_stdlib_modules(fake_root)]
  assert names == sorted(names)
  assert "pkg" in names and "pkg.sub" in names and "mod00" in names
  assert not any(
    n.startswith(("test", "idlelib", "tkinter", "site", "lib2to3", "_sysconfig", "__main__"))
    for n in names
  )
  assert "pkg.tests.x" not in names and "antigravity" not in names
  assert [n for n, _ in D.iter_stdlib_modules(fake_root, modules=["pkg"])] == ["pkg", "pkg.sub"]
  pairs = D.collect_pairs(fake_root)
  assert len(pairs) == 60 * 2 + 2
  assert all("never be collected" not in p.query for p in pairs)


def test_splits_are_disjoint_by_module_and_deterministic(fake_root):
  s = D.build_splits(root=fake_root, seed=0)
  modules = {name: {p.module for p in s[name]} for name in D.SPLITS}
  assert all(modules.values()), "every split should be non-empty for 62 modules"
  assert not (
    modules["train"] & modules["validation"]
    or modules["train"] & modules["test"]
    or modules["validation"] & modules["test"]
  )
  for name in D.SPLITS:
    assert all(D.split_of(m) == name for m in modules[name])
  assert sum(len(s[n]) for n in D.SPLITS) == 122

  D._collect_cached.cache_clear()  # rebuild from disk, not from the cache
  assert D.build_splits(root=fake_root, seed=0) == s
  other = D.build_splits(root=fake_root, seed=1)
  assert other.train != s.train and set(other.train) == set(s.train)  # same pairs, new order

  capped = D.build_splits(root=fake_root, seed=0, max_pairs={"train": 10, "test": 3})
  assert len(capped.train) == 10 and len(capped.test) == min(3, len(s.test))
  assert capped.validation == s.validation and capped.train == s.train[:10]
  assert len(D.build_splits(root=fake_root, max_pairs=2).validation) == 2
  with pytest.raises(ValueError):
    D.build_splits(root=fake_root, max_pairs={"dev": 3})


def test_split_hash_is_stable():
  # Pinned so an accidental change of the hashing (which would reshuffle the
  # benchmark's train/test modules) fails loudly.
  assert [D.split_of(m) for m in ("json", "fnmatch", "bisect", "ipaddress", "email.utils")] == [
    "train",
    "test",
    "validation",
    "validation",
    "train",
  ]
  assert (
    D.split_of("email.encoders") == "test" and D.split_of("email.encoders", by="package") == "train"
  )
  with pytest.raises(ValueError):
    D.split_of("json", fractions=(0.5, 0.5, 0.5))


def test_real_stdlib_slice():
  mods = ["json", "textwrap", "shlex", "fnmatch", "bisect", "ipaddress", "glob", "heapq"]
  s = D.build_splits(modules=mods, seed=0)
  assert len(s.train) > 20 and len(s.validation) > 5 and len(s.test) > 0
  sources = {n: p.read_text(encoding="utf-8") for n, p in D.iter_stdlib_modules(modules=mods)}
  for pair in s.train + s.validation + s.test:
    assert pair.query and pair.document.lstrip().startswith(("def ", "async def "))
    # The function's full docstring must be gone from its document.
    tree = ast.parse(sources[pair.module])
    node = next(
      n
      for n in ast.walk(tree)
      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.lineno == pair.lineno
    )
    doc = ast.get_docstring(node, clean=False)
    assert doc and doc not in pair.document
    assert pair.query in " ".join(ast.get_docstring(node).split())


def test_evaluate_retrieval_hand_made():
  q = np.eye(3, dtype=np.float32)
  # Gold doc ranks: query 0 -> 1st, query 1 -> 2nd, query 2 -> 3rd.
  d = np.array([[1.0, 0.0, 0.5], [0.0, 0.5, 0.9], [0.0, 0.6, 0.1]], np.float32)
  assert [(-(q @ d.T)[i]).argsort().tolist().index(i) for i in range(3)] == [0, 1, 2]
  m = D.evaluate_retrieval(q, d)
  assert m["recall@1"] == pytest.approx(1 / 3)
  assert m["recall@5"] == pytest.approx(1.0)
  assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
  assert D.evaluate_retrieval(q, d, ks=(1, 2), chunk=1) == {
    "recall@1": pytest.approx(1 / 3),
    "recall@2": pytest.approx(2 / 3),
    "mrr": pytest.approx(m["mrr"]),
  }
  # Constant embeddings tie everywhere; ties count against the query.
  const = np.ones((10, 4), np.float32)
  m = D.evaluate_retrieval(const, const)
  assert m["recall@1"] == 0.0 and m["recall@5"] == 0.0 and m["mrr"] == pytest.approx(0.1)
  with pytest.raises(ValueError):
    D.evaluate_retrieval(q, d[:2])


def test_contrastive_loss():
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  q = rng.normal(size=(5, 8)).astype(np.float32)
  d = rng.normal(size=(5, 8)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  d /= np.linalg.norm(d, axis=1, keepdims=True)
  logits = (q @ d.T) / 0.05

  def ce(lg):  # rows are predictions, label i for row i
    lg = lg - lg.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(lg).sum(axis=1)) - np.diag(lg)))

  want = 0.5 * (ce(logits) + ce(logits.T))
  assert float(D.contrastive_loss(jnp.asarray(q), jnp.asarray(d))) == pytest.approx(want, rel=1e-5)
  assert float(D.contrastive_loss(d, q)) == pytest.approx(want, rel=1e-5)  # symmetric
  same = np.tile(q[:1], (5, 1))
  assert float(D.contrastive_loss(same, same, temperature=0.1)) == pytest.approx(
    math.log(5), rel=1e-5
  )
  eye = np.eye(5, dtype=np.float32)
  assert float(D.contrastive_loss(eye, eye)) < 1e-6
