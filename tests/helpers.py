"""Helpers shared by the LoRA-Pro tests: random pairs, pair trees in either layout, and one
`lorapro` update of a single pair. Fixtures live in conftest.py."""

from __future__ import annotations

import jax
import numpy as np

# Exact-theorem checks in float64 use a negligible relative damping.
TINY_DAMPING = 1e-12


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
