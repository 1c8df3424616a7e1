"""The docstring examples of every `lorapro_jax` module, one test per docstring.

Run here rather than with pytest's `--doctest-modules`, so that `python -m pytest tests` runs
them and no module under tests/ is imported just to look for docstrings (sharding_check.py
sets XLA_FLAGS when imported).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lorapro_jax

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules():
  yield lorapro_jax
  for info in pkgutil.walk_packages(lorapro_jax.__path__, lorapro_jax.__name__ + "."):
    yield importlib.import_module(info.name)


def _doctests():
  """{name: DocTest} of every docstring with examples, defined in a lorapro_jax module."""
  finder = doctest.DocTestFinder()
  return {t.name: t for m in _modules() for t in finder.find(m) if t.examples}


DOCTESTS = sorted(_doctests())


def test_there_are_docstring_examples():
  assert any(name.endswith(".lorapro") for name in DOCTESTS), DOCTESTS


@pytest.mark.parametrize("name", DOCTESTS)
def test_docstring_examples(name):
  test = _doctests()[name]  # fresh globals for every run
  report = []
  runner = doctest.DocTestRunner(optionflags=FLAGS)
  result = runner.run(test, out=report.append)
  assert result.failed == 0, "".join(report)
