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

from lorapro_jax import full as full_lib
from lorapro_jax import pairs as pairs_lib


def _specs(pair: pairs_lib.FoundPair, sa: NamedSharding, sb: NamedSharding):
  """The partition specs of A and B, padded to the leaves' rank."""
  pad = lambda spec, role: (
    tuple(spec) + (None,) * (len(pairs_lib.stored_shape(pair, role)) - len(spec))
  )
  return pad(sa.spec, "a"), pad(sb.spec, "b")


def feature_axes(pair: pairs_lib.FoundPair, sa: NamedSharding, sb: NamedSharding):
  """The mesh axes of a pair's batch axes (B's, else A's), in-feature axes
  (A's) and out-feature axes (B's), as three tuples of spec entries."""
  pa, pb = _specs(pair, sa, sb)
  nb = len(pair.batch_shape)
  batch = tuple(x if x is not None else y for x, y in zip(pb[:nb], pa[:nb]))
  if pair.layout == "flax":  # a (..., in..., r), b (..., r, out...)
    return batch, pa[nb:-1], pb[nb + 1 :]
  return batch, pa[nb + 1 :], pb[nb:-1]  # A (..., r, in...), B (..., out..., r)


def weight_sharding(pair: pairs_lib.FoundPair, a, b) -> NamedSharding | None:
  """The sharding of a pair's m×n array (`FoundPair.weight_shape`), from those
  of its A and B leaves.

  Out-feature axes follow B, batch axes B (else A), in-feature axes A, in that
  order of priority: a mesh axis already used is not used again (FSDP splits
  A and B over the same mesh axis; the moment is then split over out
  features, as the equivalent gradient ``B @ A`` is computed). A kernel
  ``(in, heads, head_dim)`` adapted by a ``(in, r)`` and b ``(r, heads,
  head_dim)`` gets the heads axis of b's spec. None unless both leaves carry
  a `jax.sharding.NamedSharding` on the same mesh.
  """
  sa, sb = getattr(a, "sharding", None), getattr(b, "sharding", None)
  if not (isinstance(sa, NamedSharding) and isinstance(sb, NamedSharding) and sa.mesh == sb.mesh):
    return None
  batch, in_, out = feature_axes(pair, sa, sb)
  used = set()

  def take(ax):  # each mesh axis may split one array axis only
    names = {ax} if isinstance(ax, str) else set(ax or ())
    if not names or names & used:
      return None
    used.update(names)
    return ax

  out = tuple(take(x) for x in out)
  batch = tuple(take(x) for x in batch)
  in_ = tuple(take(x) for x in in_)
  spec = batch + (in_ + out if pair.layout == "flax" else out + in_)
  return NamedSharding(sb.mesh, PartitionSpec(*spec))


def role_sharding(pair: pairs_lib.FoundPair, a, b, role: pairs_lib.Role) -> NamedSharding | None:
  """The sharding of a pair's ``role`` array (`pairs.stored_shape`): like the
  A or B leaf, like the adapted weight (`weight_sharding`), or for a vector
  over the out (in) features, like B's out (A's in) axes with B's (A's)
  batch axes. None unless both leaves carry a NamedSharding on one mesh."""
  if role == "weight":
    return weight_sharding(pair, a, b)
  sa, sb = getattr(a, "sharding", None), getattr(b, "sharding", None)
  if not (isinstance(sa, NamedSharding) and isinstance(sb, NamedSharding) and sa.mesh == sb.mesh):
    return None
  if role in ("a", "b"):
    return sa if role == "a" else sb
  pa, pb = _specs(pair, sa, sb)
  nb = len(pair.batch_shape)
  _, in_, out = feature_axes(pair, sa, sb)
  spec = pb[:nb] + out if role == "out" else pa[:nb] + in_
  return NamedSharding(sb.mesh, PartitionSpec(*spec))


def moment_shardings(params, pair_moments: dict[str, Any], pairs: pairs_lib.PairsArg = None):
  """Shardings of a LoRA-Pro state's ``pair_moments`` (arrays or abstract
  arrays) for sharded params: each field as its ``roles`` says."""
  index = pairs_lib.PairIndex.build(params, pairs)
  leaves = jax.tree.leaves(params)
  out = {}
  for key, f in zip(index.keys, index.pairs):
    if key not in pair_moments:
      continue  # a lorapro under optax.masked or partition sees some pairs only
    a, b = leaves[f.a_index], leaves[f.b_index]
    moments = pair_moments[key]
    shardings = [role_sharding(f, a, b, moments.roles[name]) for name in moments._fields]
    if any(x is None for x in shardings):
      raise ValueError(
        f"The LoRA pair {pairs_lib.path_str(f.path)} has no NamedSharding on both of its "
        f"leaves (A: {getattr(a, 'sharding', None)}, B: {getattr(b, 'sharding', None)})."
      )
    out[key] = type(moments)(*shardings)
  missing = set(pair_moments) - set(out)
  if missing:
    raise ValueError(
      f"The LoRA-Pro state has pairs {sorted(missing)} that `pairs` does not find in the "
      "params: pass the same `pairs` as to lorapro."
    )
  return out


def full_moment_shardings(params, pairs: pairs_lib.PairsArg = None) -> dict[str, Any]:
  """Shardings of the full-mode moments for sharded params.

  ``lorapro(mode="full").init(params)`` called outside ``jax.jit`` on sharded
  arrays already places the moments this way. Under ``jax.jit`` nothing ties
  a freshly created moment to the params: pass `state_shardings` (which
  covers every mode) as ``out_shardings``.

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
  template = {key: full_lib.FullMoments(None, None) for key in index.keys}
  return moment_shardings(params, template, pairs)


def state_shardings(tx: optax.GradientTransformation, params, pairs: pairs_lib.PairsArg = None):
  """Shardings of ``tx.init(params)`` for sharded ``params``.

  Arrays shaped like the params (e.g. optax's Adam moments) are laid out
  like them, LoRA-Pro's pair moments like their pair (`role_sharding`), and
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
  from lorapro_jax.transform import ScaleByLoraProState  # here: transform imports this module

  is_state = lambda x: isinstance(x, ScaleByLoraProState)
  states = [x for x in jax.tree.leaves(abstract, is_leaf=is_state) if is_state(x)]
  if not states:
    return out
  place = lambda x, a: (
    x._replace(pair_moments=moment_shardings(params, a.pair_moments, pairs)) if is_state(x) else x
  )
  return jax.tree.map(place, out, abstract, is_leaf=is_state)
