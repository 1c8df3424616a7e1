"""Helpers shared by the LoRA-Pro tests: `assert_close`, random pairs, pair trees in either
layout, and one `lorapro` update of a single pair. Fixtures live in conftest.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest

# Exact-theorem checks in float64 use a negligible relative damping.
TINY_DAMPING = 1e-12

# The default relative tolerance of `assert_close`, by the dtype the checked result was
# computed in (the lower precision of ``got`` and ``want``):
# - float64: 1e-8. The float64 checks (damping TINY_DAMPING) see errors of about 1e-13; the
#   Gram inverses of the test pairs (condition numbers up to ~1e3) and a few steps of Adam's
#   m/√v amplify rounding, and 1e-8 leaves room for that while a wrong formula, a missing
#   term or a damping 1e-12 off by a factor r is off by far more.
# - float32: 1e-5, about 100 ulps (eps 1.2e-7): jitted and eager runs round differently, and
#   the Gram inverses amplify it.
# - bfloat16: 5e-2, about 6 ulps (eps 7.8e-3), for a few steps of training.
# A test that needs another tolerance passes ``rtol`` and says why.
RTOL = {"float64": 1e-8, "float32": 1e-5, "bfloat16": 5e-2}


def assert_close(got, want, rtol=None, atol=None, err_msg=""):
  """Asserts that ``got`` equals ``want`` (the independent reference) to a normwise tolerance.

  ``got`` and ``want`` are arrays or pytrees of arrays with one structure; each leaf must
  have the shape of its reference and pass

      max|got - want|  <=  max(rtol · max|want|, atol),

  the largest error against the reference's largest entry (its max norm), with an absolute
  floor ``atol``. Both are computed in float64. So each entry is checked to ``rtol`` of the
  leaf's scale, not of its own size: entries near zero (a cancellation, B = 0 at LoRA's
  initialisation) need not be relatively accurate, large ones may not hide a wrong small one
  beyond that scale. NaN or Inf anywhere in either fails. Integer and bool leaves must be
  equal.

  - ``rtol``: by default ``RTOL`` of the result's dtype (the lower precision of the two).
  - ``atol``: by default ``rtol``, i.e. the reference's scale is taken as at least 1. Test
    data are O(1), and a leaf whose entries are all much smaller (the lr-sized B after a few
    steps from B = 0) is then checked to ``rtol`` in absolute terms. Pass ``atol=0`` for a
    purely relative check: leaves of any scale (1e-20 or 1e20 factors, the tiny updates of a
    float32 run) are checked against their own largest entry.

  For a check of every entry against its own size use ``np.testing.assert_allclose``.
  """
  import jax.numpy as jnp

  got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
  want_leaves, want_def = jax.tree_util.tree_flatten(want)
  assert got_def == want_def, f"{err_msg or 'trees'}: structures differ: {got_def} vs {want_def}"
  for (path, g), w in zip(got_leaves, want_leaves):
    what = f"{err_msg} {jax.tree_util.keystr(path)}".strip() or "array"
    g_dtype, w_dtype = np.asarray(g).dtype, np.asarray(w).dtype
    assert np.shape(g) == np.shape(w), f"{what}: shape {np.shape(g)} vs {np.shape(w)}"
    if not (jnp.issubdtype(g_dtype, jnp.inexact) or jnp.issubdtype(w_dtype, jnp.inexact)):
      np.testing.assert_array_equal(g, w, err_msg=what)
      continue
    tol = rtol
    if tol is None:
      float_dtypes = [d for d in (g_dtype, w_dtype) if jnp.issubdtype(d, jnp.floating)]
      least = min(float_dtypes, key=lambda d: jnp.finfo(d).bits)
      assert least.name in RTOL, f"{what}: no default tolerance for {least.name}; pass rtol"
      tol = RTOL[least.name]
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.all(np.isfinite(w)), f"{what}: the reference is not finite"
    assert np.all(np.isfinite(g)), f"{what}: not finite where the reference is"
    err = np.max(np.abs(g - w), initial=0.0)
    scale = np.max(np.abs(w), initial=0.0)
    bound = max(tol * scale, tol if atol is None else atol)
    assert err <= bound, (
      f"{what}: max |got - want| = {err:.3e} > {bound:.3e} "
      f"(rtol {tol:g} of max |want| = {scale:.3e}, atol {tol if atol is None else atol:g})"
    )


def quick_diagonal(layouts, x_choices):
  """Every ``(layout, x_choice)`` case for ``parametrize("layout, x_choice", ...)``, those off
  one diagonal marked slow. The layout enters only the products with A and B and X only the
  r×r algebra, so the quick subset (``-m "not slow"``) still runs each layout and each X,
  and the full suite every combination."""
  return [
    pytest.param(layout, x, marks=() if layout == layouts[i % len(layouts)] else pytest.mark.slow)
    for i, x in enumerate(x_choices)
    for layout in layouts
  ]


def random_pair(rng, m, n, r, dtype=np.float64):
  """A full-rank pair in the paper layout: A (r, n), B (m, r), and a full g (m, n)."""
  A = rng.standard_normal((r, n)).astype(dtype)
  B = rng.standard_normal((m, r)).astype(dtype)
  g = rng.standard_normal((m, n)).astype(dtype)
  return A, B, g


def to_layout(A, B, layout):
  """Paper-layout factors (or their gradients) as stored in a ``layout`` tree."""
  if layout == "flax":
    return np.swapaxes(A, -1, -2), np.swapaxes(B, -1, -2)
  return A, B


from_layout = to_layout  # the transposition is its own inverse


LAYOUTS = {
  # layout name -> (leaf names, `pairs` argument for lorapro)
  "flax": (("lora_a", "lora_b"), None),
  "paper": (("lora_A", "lora_B"), "PEFT"),
}


def pairs_arg(layout):
  import lorapro_jax as lpj

  return None if layout == "flax" else lpj.PEFT


def pair_tree(A, B, layout, extra=None):
  """{'layer': {a_name: A', b_name: B'}} with A, B given in the paper layout."""
  a_name, b_name = LAYOUTS[layout][0]
  a, b = to_layout(A, B, layout)
  tree = {"layer": {a_name: a, b_name: b}}
  if extra:
    tree.update(extra)
  return tree


def get_pair(tree, layout):
  """(A, B) of ``pair_tree`` back in the paper layout, as float64 NumPy arrays."""
  a_name, b_name = LAYOUTS[layout][0]
  a, b = tree["layer"][a_name], tree["layer"][b_name]
  A, B = from_layout(np.asarray(a, np.float64), np.asarray(b, np.float64), layout)
  return A, B


def run_lorapro(A, B, gA, gB, s, layout="flax", damping=TINY_DAMPING, **kwargs):
  """One efficient-mode `lorapro` update of a single pair given in the paper
  layout; returns the adjusted (g^A, g^B) in the paper layout as NumPy arrays.

  The arrays keep their dtype (call inside the ``x64`` fixture for float64).
  """
  import jax.numpy as jnp

  import lorapro_jax as lpj

  params = jax.tree.map(jnp.asarray, pair_tree(A, B, layout))
  grads = jax.tree.map(jnp.asarray, pair_tree(gA, gB, layout))
  tx = lpj.lorapro(s, damping=damping, pairs=pairs_arg(layout), **kwargs)
  out, _ = tx.update(grads, tx.init(params), params)
  a_name, b_name = LAYOUTS[layout][0]
  a, b = np.asarray(out["layer"][a_name]), np.asarray(out["layer"][b_name])
  return from_layout(a, b, layout)


def quadratic(seed, m, n, s):
  """Full gradient of L = ½‖W0 + s·B·A - T‖² at (A, B): g = W0 + s·B·A - T (paper layout)."""
  rng = np.random.default_rng(seed)
  W0, T = rng.standard_normal((m, n)), rng.standard_normal((m, n))
  return lambda t, A, B: W0 + s * B @ A - T


def train_pair(tx, A0, B0, full_grad, steps, s, layout):
  """Runs ``tx`` on one pair for ``steps`` steps, its LoRA gradients from
  ``full_grad(t, A, B)`` (Eq. 5); returns [(A_t, B_t, state_t)] (paper layout)."""
  import jax.numpy as jnp
  import optax

  from tests import reference as ref

  params = jax.tree.map(jnp.asarray, pair_tree(A0, B0, layout))
  state = tx.init(params)
  out = []
  for t in range(1, steps + 1):
    A, B = get_pair(params, layout)
    gA, gB = ref.lora_gradients(full_grad(t, A, B), A, B, s)
    grads = jax.tree.map(jnp.asarray, pair_tree(gA, gB, layout))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append((*get_pair(params, layout), state))
  return out
