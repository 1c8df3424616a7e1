"""Shardings of the per-pair optimizer state on a device mesh.

A pair's state arrays are laid out like its leaves: an m×n moment like the
adapted weight (out features split like B, in features like A), an array
shaped like A or B like that leaf. `state_shardings` gives the shardings of a
whole optimizer state for ``jax.jit(tx.init, out_shardings=...)``.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lorapro_jax import moments as moments_lib
from lorapro_jax import pairs as pairs_lib


def _specs(pair: pairs_lib.FoundPair, sa: NamedSharding, sb: NamedSharding):
  """The partition specs of A and B, padded to the leaves' rank."""
  nd = len(pair.batch_shape) + 2
  return tuple(tuple(s.spec) + (None,) * (nd - len(s.spec)) for s in (sa, sb))


def weight_sharding(pair: pairs_lib.FoundPair, a, b) -> NamedSharding | None:
  """The sharding of a pair's m×n array, from those of its A and B leaves.

  Out features follow B, batch axes B (else A), in features A, in that order
  of priority: a mesh axis already used is not used again (FSDP splits A and B
  over the same mesh axis; the moment is then split over out features, as
  the equivalent gradient ``B @ A`` is computed). None unless both leaves
  carry a `jax.sharding.NamedSharding` on the same mesh.
  """
  sa, sb = getattr(a, "sharding", None), getattr(b, "sharding", None)
  if not (isinstance(sa, NamedSharding) and isinstance(sb, NamedSharding) and sa.mesh == sb.mesh):
    return None
  pa, pb = _specs(pair, sa, sb)
  if pair.layout == "flax":  # a (..., in, r), b (..., r, out), weight (..., in, out)
    in_ax, out_ax = pa[-2], pb[-1]
  else:  # A (..., r, in), B (..., out, r), weight (..., out, in)
    in_ax, out_ax = pa[-1], pb[-2]
  used = set()

  def take(ax):  # each mesh axis may split one array axis only
    names = {ax} if isinstance(ax, str) else set(ax or ())
    if not names or names & used:
      return None
    used.update(names)
    return ax

  out_ax = take(out_ax)
  batch = tuple(take(x if x is not None else y) for x, y in zip(pb[:-2], pa[:-2]))
  in_ax = take(in_ax)
  spec = batch + ((in_ax, out_ax) if pair.layout == "flax" else (out_ax, in_ax))
  return NamedSharding(sb.mesh, PartitionSpec(*spec))


def full_moment_shardings(params, pairs: pairs_lib.PairsArg = None) -> dict[str, Any]:
  """Shardings of the full-mode moments for sharded params.

  ``lorapro(mode="full").init(params)`` called outside ``jax.jit`` on sharded
  arrays already places the moments this way. Under ``jax.jit`` nothing ties
  a freshly created moment to the params: pass `state_shardings` (which uses
  this) as ``out_shardings``.

  Args:
    params: the parameters, as arrays or ``jax.ShapeDtypeStruct`` whose
      ``sharding`` is a `jax.sharding.NamedSharding`.
    pairs: as in `lorapro_jax.lorapro`.

  Returns:
    A dict with the structure of the state's ``pair_moments``: for each pair,
    `FullMoments` of the sharding of its m×n moments (out features split like
    B, in features like A unless that mesh axis is taken).
  """
  index = pairs_lib.PairIndex.build(params, pairs)
  leaves = jax.tree.leaves(params)
  out = {}
  for key, f in zip(index.keys, index.pairs):
    sharding = weight_sharding(f, leaves[f.a_index], leaves[f.b_index])
    if sharding is None:
      raise ValueError(
        f"The LoRA pair {pairs_lib.path_str(f.path)} has no NamedSharding on both of its "
        "leaves (A: "
        f"{getattr(leaves[f.a_index], 'sharding', None)}, B: "
        f"{getattr(leaves[f.b_index], 'sharding', None)})."
      )
    out[key] = moments_lib.FullMoments(sharding, sharding)
  return out


def state_shardings(tx: optax.GradientTransformation, params, pairs: pairs_lib.PairsArg = None):
  """Shardings of ``tx.init(params)`` for sharded ``params``.

  Arrays shaped like the params (e.g. optax's Adam moments) are laid out
  like them, LoRA-Pro's pair moments as `full_moment_shardings` says, and
  everything else (step counts, hyperparameters) is replicated on the params'
  mesh.

  Args:
    tx: any optax transformation, e.g. ``lorapro_adamw(...)`` or a chain.
    params: arrays or ``jax.ShapeDtypeStruct`` with `NamedSharding`.
    pairs: as in `lorapro_jax.lorapro` (the ``pairs`` given to ``tx``).

  Returns:
    A tree with the structure of ``tx.init(params)``.

  Examples:
    >>> # opt_state = jax.jit(tx.init, out_shardings=state_shardings(tx, params))(params)
  """
  shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(params)]
  meshes = {s.mesh for s in shardings if isinstance(s, NamedSharding)}
  if len(meshes) != 1:
    raise ValueError(
      f"state_shardings needs params on one mesh with NamedShardings; found {len(meshes)} meshes."
    )
  replicated = NamedSharding(meshes.pop(), PartitionSpec())
  abstract = jax.eval_shape(tx.init, params)
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  masked = lambda x: isinstance(x, optax.MaskedNode)
  out = optax.tree.map_params(
    tx,
    lambda x, s: x if masked(x) else s,  # optax.masked leaves MaskedNode in moments
    abstract,
    param_shardings,
    transform_non_params=lambda _: replicated,
    is_leaf=masked,
  )
  is_state = lambda x: isinstance(x, moments_lib.ScaleByLoraProState)
  states = [x for x in jax.tree.leaves(abstract, is_leaf=is_state) if is_state(x)]
  if not states:
    return out
  moments = full_moment_shardings(params, pairs)
  for state in states:
    if not set(state.pair_moments) <= set(moments):
      raise ValueError(
        f"The LoRA-Pro state has pairs {sorted(state.pair_moments)} but `pairs` finds "
        f"{sorted(moments)} in the params: pass state_shardings the same `pairs` as lorapro."
      )
  # A lorapro under optax.masked or partition holds the moments of its pairs only.
  place = lambda x, a: (
    x._replace(pair_moments={k: moments[k] for k in a.pair_moments}) if is_state(x) else x
  )
  return jax.tree.map(place, out, abstract, is_leaf=is_state)
