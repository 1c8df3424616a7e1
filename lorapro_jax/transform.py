"""LoRA-Pro as optax gradient transformations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lorapro_jax import batched
from lorapro_jax import factored as factored_lib
from lorapro_jax import full as full_lib
from lorapro_jax import pairs as pairs_lib
from lorapro_jax import sharding as sharding_lib

Mode = Literal["efficient", "full", "factored"]
MODES: tuple[str, ...] = Mode.__args__
ScaleArg = pairs_lib.ScaleArg

DEFAULT_DAMPING = 1e-6
_ADAM_DEFAULTS = {"b1": 0.9, "b2": 0.999, "eps": 1e-8}

_NO_PARAMS = (
  "lorapro needs the current parameters to adjust the LoRA gradients: "
  "call update(updates, state, params)."
)


def _check_options(mode, x_choice):
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if x_choice not in batched.X_CHOICES:
    raise ValueError(f"x_choice must be one of {batched.X_CHOICES}, got {x_choice!r}")


def _check_positive(name, value):
  if isinstance(value, (int, float)) and not value > 0:
    raise ValueError(f"{name} must be positive, got {value!r}")


def _index(updates, params, pairs) -> tuple[pairs_lib.PairIndex, list, list]:
  """The pair index of ``params`` and both trees' leaves, validated."""
  if params is None:
    raise ValueError(_NO_PARAMS)
  index = pairs_lib.PairIndex.build(params, pairs)
  u_leaves = jax.tree.leaves(updates)
  index.check_leaf_count(u_leaves, "updates")
  return index, jax.tree.leaves(params), u_leaves


# What `init` puts in place of the pair moments when `optax.tree.map_params`
# probes the state's structure with a placeholder for the whole params tree:
# a leaf, so that map_params passes the pair moments whole to its
# `transform_non_params` (they are keyed by pair, not shaped like the params).
_NOT_PARAMS_SHAPED = "pair moments (not params-shaped)"


def _is_structure_probe(params) -> bool:
  """Whether ``params`` is an opaque pytree node without leaves (optax's
  map_params placeholder) rather than a tree of arrays, empty or not."""
  treedef = jax.tree.structure(params)
  containers = (dict, list, tuple, type(None))
  return treedef.num_leaves == 0 and treedef.num_nodes == 1 and not isinstance(params, containers)


def lorapro(
  scale: ScaleArg = 1.0,
  *,
  mode: Mode = "efficient",
  x_choice: batched.XChoice = "sylvester",
  damping: float = DEFAULT_DAMPING,
  b1: float | None = None,
  b2: float | None = None,
  eps: float | None = None,
  moment_dtype: jnp.dtype | None = None,
  pairs: pairs_lib.PairsArg = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LoRA-Pro: replaces LoRA gradients by the optimal low-rank ones.

  For every LoRA pair (A, B) with W = W0 + s·B·A, the LoRA gradients
  (g_lora^A, g_lora^B) are replaced by the pair (g^A, g^B) of Theorem 2.1, whose
  equivalent gradient s·B·g^A + s·g^B·A is the best rank-2r approximation of the
  full fine-tuning gradient g: P_B·g + (I - P_B)·g·P_A. The free r×r matrix X
  is chosen by ``x_choice``.

  * ``mode="efficient"`` (Algorithm 2; with ``optax.sgd``, Algorithm 1): only
    the gradients of the pairs change; chain any optimizer after it, e.g.
    ``optax.adamw``. Other leaves pass through unchanged. Stateless.
  * ``mode="full"`` (Algorithm 3): Adam moments are kept on each pair's m×n
    equivalent gradient (computed with X = 0, which does not affect it); the
    Adam direction is projected back to LoRA gradients by Eq. (56) and adjusted
    again by Theorem 2.1. Other leaves get ``optax.scale_by_adam``, so
    ``chain(lorapro(mode="full"), optax.scale_by_learning_rate(lr))`` is a
    complete optimizer (see `lorapro_adamw` for weight decay).
  * ``mode="factored"``: Algorithm 3 at LoRA's memory. The first moment of
    each pair's equivalent gradient is kept in low rank and re-projected onto
    the current factors' span every step (Theorem 2.1 with X = 0); the second
    moment is factored as Adafactor's (row and column EMAs of g̃² + ε², formed
    from the factors). No m×n array is formed. With ``b1=0.0`` (a Python
    number) only the second moment is kept. See docs/factored.md.

  Leading axes of a pair's leaves are batch axes (stacked or scanned layers,
  experts): each slice is adjusted independently. All pairs are adjusted in one
  traced computation with the r×r work batched per rank.

  Args:
    scale: LoRA scaling s (α/r for LoRA, α/√r for rsLoRA; 1.0 for ``nnx.LoRA``,
      which applies none). A number, an array broadcastable to a pair's batch
      axes, or a callable ``(path, rank) -> number`` for per-layer values;
      ``path`` is the tuple of keys of the pair's parent.
    mode: "efficient", "full" or "factored".
    x_choice: "sylvester" (Theorem 2.3, the X that keeps (g^A, g^B) closest to
      the LoRA gradients), "zero" (X = 0) or "symmetric" (the corrected
      Eq. (16), X = -(1/(2s²))(BᵀB)⁻¹Bᵀ g_lora^B (AAᵀ)⁻¹, which balances
      g^B·A against B·g^A).
    damping: relative Tikhonov damping δ > 0. Each Gram matrix G (BᵀB, AAᵀ)
      is inverted as G + δ·(tr G / r)·I, i.e. its eigenvalues are raised by δ
      times their mean. This keeps the inverses finite for B = 0 (LoRA's
      initialisation, where the update reproduces the paper's first step
      g^A = 0, g^B = g_lora^B (AAᵀ)⁻¹ / s²), for rank-deficient factors and for
      r > min(m, n), and changes well-conditioned problems by a relative
      O(δ·condition number). The default suits float32.
    b1: modes with moments: decay of the first moments (default 0.9).
    b2: modes with moments: decay of the second moments (default 0.999).
    eps: modes with moments: Adam's ε (default 1e-8); added to the root of
      the second moment in full mode, its square added inside the factored
      second moment.
    moment_dtype: modes with moments: dtype of the pair moments and of Adam's
      first moments of other leaves (default float32, or float64 for float64
      parameters; bfloat16 halves their memory).
    pairs: which leaves form pairs: a `LoRASpec` (default ``FLAX_NNX``:
      siblings ``lora_a`` (..., in, r) and ``lora_b`` (..., r, out)), a
      sequence of them (e.g. ``(FLAX_NNX, QWIX)``), or a callable
      ``params -> iterable of LoRAPair`` for any other arrangement.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` requires
    ``params`` and raises ``ValueError`` without them. Efficient mode keeps
    no state; the other modes keep a `ScaleByLoraProState`.

  Raises:
    ValueError: for an unknown mode or x_choice, a non-positive damping or eps,
      or a full-mode option (b1, b2, eps, moment_dtype) given in efficient
      mode, which has no moments (chain e.g. ``optax.adamw(b1=...)`` instead).

  Examples:
    >>> import jax.numpy as jnp, optax, lorapro_jax as lpj
    >>> params = {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.zeros((2, 3))}
    >>> tx = optax.chain(lpj.lorapro(scale=2.0), optax.adamw(1e-3))
    >>> state = tx.init(params)
    >>> grads = {'lora_a': jnp.zeros((4, 2)), 'lora_b': jnp.ones((2, 3))}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates['lora_b'].shape
    (2, 3)

  References:
    Wang et al., `LoRA-Pro: Are Low-Rank Adapters Properly Optimized?
    <https://arxiv.org/abs/2407.18242>`_, ICLR 2025.
  """
  _check_options(mode, x_choice)
  given = {"b1": b1, "b2": b2, "eps": eps, "moment_dtype": moment_dtype}
  if mode == "efficient":
    unused = sorted(k for k, v in given.items() if v is not None)
    if unused:
      raise ValueError(
        f"lorapro(mode='efficient') keeps no moments, so {', '.join(unused)} would be "
        "ignored: set them on the optimizer chained after it (e.g. optax.adamw), or use "
        "mode='full' or 'factored'."
      )
    return _efficient(scale, x_choice, damping, pairs)
  b1, b2, eps = (_ADAM_DEFAULTS[k] if given[k] is None else given[k] for k in ("b1", "b2", "eps"))
  for name, v in (("damping", damping), ("eps", eps)):
    _check_positive(name, v)
  return _with_moments(mode, scale, x_choice, damping, b1, b2, eps, moment_dtype, pairs)


def _efficient(scale, x_choice, damping, pairs) -> optax.GradientTransformationExtraArgs:
  _check_positive("damping", damping)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    index, p_leaves, u_leaves = _index(updates, params, pairs)
    adjusted = batched.adjust(index.leaf_pairs(p_leaves, u_leaves, scale), x_choice, damping)
    out = index.scatter(u_leaves, adjusted)
    return jax.tree.unflatten(jax.tree.structure(updates), out), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


class ScaleByLoraProState(NamedTuple):
  """State of `lorapro` in the modes with moments (full, factored).

  Attributes:
    count: number of updates so far (int32), for the bias corrections.
    pair_moments: per pair, keyed by `pairs.PairIndex.keys` (the pair's parent
      path, e.g. ``"layers/0/attn/query"``): its `FullMoments`,
      `FactoredMoments` or `FactoredSecondMoment`.
    adam_state: ``optax.masked(optax.scale_by_adam(...))`` state of the leaves
      outside pairs (its moments hold ``optax.MaskedNode`` at pair leaves).
  """

  count: jax.Array
  pair_moments: dict[str, Any]
  adam_state: optax.OptState


def _init_moments(mode, f: pairs_lib.FoundPair, a, b, dtype, first_moment: bool):
  """Zero moments of one pair in their stored shapes, placed like the params
  when these are concrete sharded arrays (as optax's zeros_like moments are;
  under jit see `state_shardings`)."""

  def zeros(role, dt=dtype):
    device = sharding_lib.role_sharding(f, a, b, role)
    return jnp.zeros(pairs_lib.stored_shape(f, role), dt, device=device)

  if mode == "full":
    kind = full_lib.FullMoments
  elif first_moment:
    kind = factored_lib.FactoredMoments
  else:
    kind = factored_lib.FactoredSecondMoment
  # a_prev and b_prev hold the factors, in their dtype
  factor_dtype = {"a_prev": a.dtype, "b_prev": b.dtype}
  return kind(*(zeros(kind.roles[k], factor_dtype.get(k, dtype)) for k in kind._fields))


def _with_moments(
  mode, scale, x_choice, damping, b1, b2, eps, moment_dtype, pairs
) -> optax.GradientTransformationExtraArgs:
  """Full (Algorithm 3) or factored mode: per-pair moments of the equivalent
  gradient, `optax.scale_by_adam` for the other leaves."""
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=moment_dtype)
  # Without a first moment (b1 = 0, known when the transformation is built)
  # the factored mode keeps the second moment only.
  first_moment = not (isinstance(b1, (int, float)) and b1 == 0)

  def others(index: pairs_lib.PairIndex, tree) -> optax.GradientTransformation:
    return optax.masked(adam, index.mask(tree))

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    if _is_structure_probe(params):
      return ScaleByLoraProState(count, _NOT_PARAMS_SHAPED, optax.masked(adam, True).init(params))
    index = pairs_lib.PairIndex.build(params, pairs)
    leaves = jax.tree.leaves(params)
    pair_moments = {}
    for key, f in zip(index.keys, index.pairs, strict=True):
      a, b = leaves[f.a_index], leaves[f.b_index]
      dtype = jnp.dtype(moment_dtype or batched.compute_dtype(a, b))
      pair_moments[key] = _init_moments(mode, f, a, b, dtype, first_moment)
    return ScaleByLoraProState(count, pair_moments, others(index, params).init(params))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    index, p_leaves, u_leaves = _index(updates, params, pairs)
    if set(state.pair_moments) != set(index.keys):
      raise ValueError(
        f"The LoRA-Pro state holds moments of pairs {sorted(state.pair_moments)} but the "
        f"parameters have pairs {sorted(index.keys)}. Re-initialise the optimizer after "
        "changing the model."
      )
    adam_updates, adam_state = others(index, updates).update(updates, state.adam_state, params)
    count = optax.safe_int32_increment(state.count)  # this step's t, for the bias corrections
    leaf_pairs = index.leaf_pairs(p_leaves, u_leaves, scale)
    moments = [
      index.flatten_moments(state.pair_moments[key], k) for k, key in enumerate(index.keys)
    ]
    if mode == "full":
      adjusted, new_moments = full_lib.step(
        leaf_pairs, moments, batched.Hyper(b1, b2, eps, count), x_choice, damping
      )
    else:
      # The same layer of every block (pairs of one kind and shape) is concatenated
      # along the slice axis, so that this is traced once per kind, not once per pair
      # (batched.stack_groups). The first moments come back relative to the
      # current factors, which they hold as a_prev, b_prev.
      # (The named scopes label these copies in the compiled HLO, for the benchmarks.)
      with jax.named_scope("lorapro/factored/stack_groups"):
        groups, split = batched.stack_groups(list(zip(leaf_pairs, moments)), index.kinds)
      results = factored_lib.step(
        [p for p, _ in groups],
        [m for _, m in groups],
        batched.Hyper(b1, b2, eps, count),
        x_choice,
        damping,
      )
      with jax.named_scope("lorapro/factored/split_groups"):
        per_pair = split([tuple(r) for r in results])
      adjusted, new_moments = [u for u, _ in per_pair], [m for _, m in per_pair]
    pair_moments = {
      key: index.unflatten_moments(m, k) for k, (key, m) in enumerate(zip(index.keys, new_moments))
    }
    out = index.scatter(jax.tree.leaves(adam_updates), adjusted)
    new_state = ScaleByLoraProState(count, pair_moments, adam_state)
    return jax.tree.unflatten(jax.tree.structure(updates), out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class LoraProWeightDecayState(NamedTuple):
  """State of `add_lorapro_weight_decay`.

  Attributes:
    count: number of updates so far (int32), for the schedules.
  """

  count: jax.Array


def add_lorapro_weight_decay(
  learning_rate: optax.ScalarOrSchedule,
  weight_decay: optax.ScalarOrSchedule,
  pairs: pairs_lib.PairsArg = None,
) -> optax.GradientTransformation:
  r"""Weight decay of LoRA-Pro's full mode, Eq. (57)-(58).

  Full fine-tuning decays W ← (1 - γλ)·W. With W = W0 + s·B·A this is
  W0 ← (1 - γλ)·W0, B ← √(1 - γλ)·B, A ← √(1 - γλ)·A. W0 is frozen in LoRA
  training, so its decay is not applied. Because the result is later scaled by
  -γ (``scale_by_learning_rate``), pair leaves get c·p added with
  c = (1 - √(1 - γλ))/γ = λ/(1 + √(1 - γλ)); other leaves get AdamW's λ·p.

  Args:
    learning_rate: the learning rate γ or an optax schedule of the step count.
    weight_decay: λ, or an optax schedule of the step count.
    pairs: as in `lorapro`.

  Returns:
    An ``optax.GradientTransformation`` that needs ``params``.

  Examples:
    >>> import optax, lorapro_jax as lpj
    >>> decay = lpj.add_lorapro_weight_decay(1e-3, optax.linear_schedule(0.1, 0.0, 100))
  """

  def init_fn(params):
    del params
    return LoraProWeightDecayState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
        "add_lorapro_weight_decay needs params: call update(updates, state, params)."
      )
    at = lambda v: v(state.count) if callable(v) else v
    lr, wd = at(learning_rate), at(weight_decay)
    c_pair = wd / (1 + jnp.sqrt(jnp.maximum(1 - lr * wd, 0.0)))
    index, p_leaves, u_leaves = _index(updates, params, pairs)
    paired = index.paired
    out = [
      (u + (c_pair if i in paired else wd) * p).astype(jnp.result_type(u))
      for i, (u, p) in enumerate(zip(u_leaves, p_leaves))
    ]
    new_state = LoraProWeightDecayState(optax.safe_int32_increment(state.count))
    return jax.tree.unflatten(jax.tree.structure(updates), out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def lorapro_adamw(
  learning_rate: optax.ScalarOrSchedule,
  *,
  scale: ScaleArg = 1.0,
  mode: Mode = "efficient",
  weight_decay: optax.ScalarOrSchedule = 1e-4,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  x_choice: batched.XChoice = "sylvester",
  damping: float = DEFAULT_DAMPING,
  moment_dtype: jnp.dtype | None = None,
  pairs: pairs_lib.PairsArg = None,
  mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LoRA-Pro with AdamW: Algorithm 2 (efficient), Algorithm 3 (full) or factored.

  * efficient: ``chain(lorapro(...), optax.adamw(...))``: Adam moments on A and
    B (in ``moment_dtype``, optax's ``mu_dtype``), and AdamW's decoupled weight
    decay on A and B (and on other leaves).
  * full, factored: moments of each pair's equivalent gradient (m×n, or
    factored; see `lorapro`), then Eq. (57)-(58)
    weight decay: A and B are multiplied by √(1 - γλ), so that s·B·A decays by
    (1 - γλ) like a fully fine-tuned weight. The frozen W0 would also decay by
    (1 - γλ) in full fine-tuning; it is not a trainable parameter here, so that
    part of the decay is not applied. Other leaves get AdamW.

  Args:
    learning_rate: a float or an optax schedule.
    scale: LoRA scaling s, as in `lorapro`.
    mode: "efficient", "full" or "factored".
    weight_decay: λ, a float or an optax schedule.
    b1, b2, eps: Adam hyperparameters.
    x_choice, damping, pairs: as in `lorapro`.
    moment_dtype: efficient mode: AdamW's ``mu_dtype`` (default: the
      parameters' dtype); other modes: as in `lorapro`.
    mask: which leaves get weight decay (a tree of booleans or a callable), as
      in ``optax.adamw``. A mask must not split a LoRA pair.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import optax, lorapro_jax as lpj
    >>> tx = lpj.lorapro_adamw(optax.cosine_decay_schedule(1e-4, 1000),
    ...                        scale=2.0, mode="full", weight_decay=0.01)

  References:
    Wang et al., LoRA-Pro, ICLR 2025, Appendix C.
  """
  _check_options(mode, x_choice)
  if mode == "efficient":
    return optax.chain(
      lorapro(scale, mode="efficient", x_choice=x_choice, damping=damping, pairs=pairs),
      optax.adamw(
        learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        mask=mask,
        mu_dtype=moment_dtype,
      ),
    )
  decay = add_lorapro_weight_decay(learning_rate, weight_decay, pairs)
  if mask is not None:
    decay = optax.masked(decay, mask)
  return optax.chain(
    lorapro(
      scale,
      mode=mode,
      x_choice=x_choice,
      damping=damping,
      b1=b1,
      b2=b2,
      eps=eps,
      moment_dtype=moment_dtype,
      pairs=pairs,
    ),
    decay,
    optax.scale_by_learning_rate(learning_rate),
  )
