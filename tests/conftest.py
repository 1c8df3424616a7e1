"""Shared fixtures for the LoRA-Pro tests (helpers are in tests/helpers.py)."""

from __future__ import annotations

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
