"""Diagnostics: the equivalent gradient of every LoRA pair."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorapro_jax import batched, layout
from lorapro_jax import pairs as pairs_lib


def equivalent_gradients(params, updates, scale=1.0, pairs: pairs_lib.PairsArg = None) -> dict:
  """Definition 1: g̃ = s·B·g^A + s·g^B·A for every pair.

  Args:
    params: the parameters holding the LoRA pairs.
    updates: gradients (or adjusted gradients, e.g. the output of `lorapro`)
      with the structure of ``params``.
    scale: LoRA scaling s, as in `lorapro` (a number, an array broadcastable to
      the batch axes, or a callable ``(path, rank) -> number``).
    pairs: as in `lorapro`.

  Returns:
    A dict from each pair's parent path (a tuple of keys; the A leaf's path
    when a ``pairs`` callable put two pairs under one parent) to its equivalent
    gradient, laid out like the adapted weight: ``(..., in, out)`` for the flax
    layout (the kernel's layout) and ``(..., out, in)`` for the paper layout.
  """
  from lorapro_jax.transform import _pair_scale  # shared scale resolution

  p_leaves = jax.tree.leaves(params)
  u_leaves = jax.tree.leaves(updates)
  out = {}
  found = pairs_lib.find_pairs(params, pairs)
  parents = [f.path for f in found]
  for f in found:
    arrs = [p_leaves[f.a_index], p_leaves[f.b_index], u_leaves[f.a_index], u_leaves[f.b_index]]
    dt = batched.compute_dtype(*arrs)
    A, B, gA, gB = (jnp.asarray(x, dt).reshape((-1,) + x.shape[-2:]) for x in arrs)
    s = _pair_scale(scale, f, dt)[:, None, None]
    g = s * layout.outer(f.layout, B, gA, gB, A)
    key = f.path if parents.count(f.path) == 1 else f.a_path
    out[key] = g.reshape(f.batch_shape + g.shape[-2:])
  return out
