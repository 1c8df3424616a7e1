"""Shared fixtures for the LoRA-Pro tests (helpers are in tests/helpers.py)."""

from __future__ import annotations

import gc

import jax
import numpy as np
import pytest


@pytest.fixture
def x64():
  """Enables float64 inside the test only (jax.enable_x64 is a context manager
  in jax >= 0.4.36), so the setting never leaks into other test files."""
  with jax.enable_x64(True):
    yield


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
  """Leaves little for the garbage collector once the session is over.

  Under ``-n 2`` a worker reports "finished" to the controller after its sessionfinish hooks
  (this one included); it then still runs pytest's cleanup, which calls ``gc.collect()`` five
  times. The controller waits 5 s for the worker and then sends it SIGINT (execnet's
  ``_terminate_execution``). A worker holds every program it compiled and a heap of millions
  of objects, and on a busy machine those collections took longer: the SIGINT arrived inside
  jax's ``gc.callbacks`` hook (``_xla_gc_callback``), and pytest reported the
  ``KeyboardInterrupt`` there as a ``PytestUnraisableExceptionWarning``.

  So here, before the worker reports: drop jax's caches of compiled programs and traces,
  collect once (finalizers run now, while pytest still reports what they raise), and freeze
  what survives, so that the later collections have next to nothing to traverse.
  """
  jax.clear_caches()
  gc.collect()
  gc.freeze()
