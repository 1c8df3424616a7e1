"""Diagnostics: the equivalent gradient of every LoRA pair."""

from __future__ import annotations

import jax

from lorapro_jax import layout
from lorapro_jax import pairs as pairs_lib


def equivalent_gradients(
  params, updates, scale: pairs_lib.ScaleArg = 1.0, pairs: pairs_lib.PairsArg = None
) -> dict:
  """Definition 1: g̃ = s·B·g^A + s·g^B·A for every pair.

  Args:
    params: the parameters holding the LoRA pairs.
    updates: gradients (or adjusted gradients, e.g. the output of `lorapro`)
      with the structure of ``params``.
    scale: LoRA scaling s, as in `lorapro` (a number, an array broadcastable to
      the batch axes, or a callable ``(path, rank) -> number``).
    pairs: as in `lorapro`.

  Returns:
    A dict from each pair's key, the key of its moments in the optimizer state
    (its parent's path, e.g. ``"layers/0/attn/query"``; the A leaf's path when a
    ``pairs`` callable put two pairs under one parent; ``"<root>"`` at the
    root), to its equivalent gradient, laid out like the adapted weight: ``(..., in,
    out)`` for the flax layout (the kernel's layout) and ``(..., out, in)`` for
    the paper layout.

  Examples:
    >>> import jax.numpy as jnp, lorapro_jax as lpj
    >>> params = {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))}
    >>> lpj.equivalent_gradients(params, params, scale=2.0)["<root>"].shape
    (4, 3)
  """
  index = pairs_lib.PairIndex.build(params, pairs)
  leaf_pairs = index.leaf_pairs(jax.tree.leaves(params), jax.tree.leaves(updates), scale)
  out = {}
  for key, f, p in zip(index.keys, index.pairs, leaf_pairs, strict=True):
    g = p.s[:, None, None] * layout.outer(f.layout, p.B, p.g_A, p.g_B, p.A)
    out[key] = g.reshape(f.weight_shape)
  return out
