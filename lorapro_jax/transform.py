"""LoRA-Pro as optax gradient transformations."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lorapro_jax import batched
from lorapro_jax import equations as eq
from lorapro_jax import layout as layout_lib
from lorapro_jax import pairs as pairs_lib

Mode = Literal["efficient", "full"]
ScaleArg = float | jax.Array | Callable[[pairs_lib.Path, int], Any]

DEFAULT_DAMPING = 1e-6

_NO_PARAMS = (
  "lorapro needs the current parameters to adjust the LoRA gradients: "
  "call update(updates, state, params)."
)


class ScaleByLoraProFullState(NamedTuple):
  """State of the full mode (Algorithm 3).

  Attributes:
    count: number of updates so far (int32).
    mu: first moments. Same tree as the parameters; the slot of each pair's A
      leaf holds the moment of its m×n equivalent gradient, laid out like the
      adapted weight (``(..., in, out)`` for the flax layout, ``(..., out, in)``
      for the paper layout); the slot of its B leaf is a `PairedSlot`.
      Other leaves hold ordinary Adam moments.
    nu: second moments, laid out like ``mu``.
  """

  count: jax.Array
  mu: optax.Params
  nu: optax.Params


class PairedSlot(NamedTuple):
  """Placeholder in the full-mode moments at a pair's B leaf (its A slot holds
  the pair's m×n moment). Distinct from ``optax.MaskedNode``, which
  ``optax.masked`` uses for leaves outside the mask."""


def _is_slot(x):
  return isinstance(x, PairedSlot)


def _saturating_cast(x, dtype):
  """Casts to ``dtype``, clipping finite overflow to the largest finite value.

  NaN stays NaN, so non-finite gradients propagate as in optax.
  """
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).max < jnp.finfo(x.dtype).max:
    big = jnp.finfo(dtype).max
    x = jnp.clip(x, -big, big)
  return x.astype(dtype)


def _pair_scale(scale: ScaleArg, pair: pairs_lib.FoundPair, dtype):
  """The scaling s of every slice of a pair, flattened to (N,)."""
  s = scale(pair.path, pair.r) if callable(scale) else scale
  s = jnp.asarray(s, dtype)
  try:
    s = jnp.broadcast_to(s, pair.batch_shape)
  except ValueError:
    raise ValueError(
      f"The scale for LoRA pair {pairs_lib.path_str(pair.path)} has shape "
      f"{s.shape}, which does not broadcast to its batch shape "
      f"{pair.batch_shape}."
    ) from None
  return s.reshape(-1)


@dataclasses.dataclass
class _Pairs:
  """The pairs of one update in their storage layout, batch axes flattened."""

  found: list
  leaf: list  # batched.LeafPair per pair

  @classmethod
  def build(cls, params, updates, scale, pairs):
    found = pairs_lib.find_pairs(params, pairs)
    p_leaves = jax.tree.leaves(params)
    u_paths = jax.tree_util.tree_flatten_with_path(updates)[0]
    if len(u_paths) != len(p_leaves):
      raise ValueError(
        f"updates have {len(u_paths)} leaves but params have "
        f"{len(p_leaves)}; they must have the same structure."
      )
    u_leaves = [u for _, u in u_paths]
    leaf = []
    for f in found:
      for idx, path in ((f.a_index, f.a_path), (f.b_index, f.b_path)):
        if jnp.shape(u_leaves[idx]) != jnp.shape(p_leaves[idx]):
          raise ValueError(
            f"The update for LoRA leaf {pairs_lib.path_str(path)} has shape "
            f"{jnp.shape(u_leaves[idx])} but the parameter has shape "
            f"{jnp.shape(p_leaves[idx])}."
          )
      arrs = [p_leaves[f.a_index], p_leaves[f.b_index], u_leaves[f.a_index], u_leaves[f.b_index]]
      dt = batched.compute_dtype(*arrs)
      a, b, ga, gb = (jnp.asarray(x, dt).reshape((-1,) + jnp.shape(x)[-2:]) for x in arrs)
      leaf.append(batched.LeafPair(a, b, ga, gb, _pair_scale(scale, f, dt), f.layout))
    return cls(found, leaf), u_leaves

  def write(self, u_leaves, adjusted):
    """Replaces the pairs' leaves in ``u_leaves`` by their (N, ...) adjusted pairs."""
    out = list(u_leaves)
    for f, pair in zip(self.found, adjusted):
      for idx, x in zip((f.a_index, f.b_index), pair):
        x = x.reshape(jnp.shape(u_leaves[idx]))
        out[idx] = _saturating_cast(x, jnp.result_type(u_leaves[idx]))
    return out


def _check_options(mode, x_choice):
  if mode not in ("efficient", "full"):
    raise ValueError(f"mode must be 'efficient' or 'full', got {mode!r}")
  if x_choice not in batched.X_CHOICES:
    raise ValueError(f"x_choice must be one of {batched.X_CHOICES}, got {x_choice!r}")


def _check_positive(name, value):
  if isinstance(value, (int, float)) and not value > 0:
    raise ValueError(f"{name} must be positive, got {value!r}")


def _adam_direction(g, mu, nu, count, b1, b2, eps, saturating=False):
  """Bias-corrected Adam direction m̂/(√v̂ + ε) (Alg. 3, lines 9-13).

  ``saturating`` (for a pair's g̃, which is finite or NaN): the moments and the
  direction saturate instead of overflowing (g̃² beyond the range would make v
  Inf and the direction 0). Other leaves overflow and propagate Inf as optax does.
  """
  stored = mu.dtype  # moment_dtype, fixed at init
  dt = batched.compute_dtype(g, mu)
  g = g.astype(dt)
  mu = b1 * mu.astype(dt) + (1 - b1) * g
  nu = b2 * nu.astype(dt) + (1 - b2) * g * g
  t = count.astype(dt)
  if saturating:
    mu, nu = eq.saturate(mu), eq.saturate(nu)
    direction = eq.saturate(mu / (1 - b1**t)) / (jnp.sqrt(nu) / jnp.sqrt(1 - b2**t) + eps)
    return direction, _saturating_cast(mu, stored), _saturating_cast(nu, stored)
  direction = (mu / (1 - b1**t)) / (jnp.sqrt(nu / (1 - b2**t)) + eps)
  return direction, mu.astype(stored), nu.astype(stored)


_vmap_normalise = jax.vmap(eq.normalise)


def _equivalent_gradient(g_A, g_B, A: eq.Normalised, B: eq.Normalised, s, layout):
  """Eq. (55), g̃ = s·β·B̂·g^A + s·α·g^B·Â, in the weight's layout, without
  overflowing midway: both terms are formed at most 1 in size and their common
  scale applied last, saturating. g^A, g^B are finite (saturated) or NaN.
  Batched over the leading axis."""
  a, b = _vmap_normalise(g_A), _vmap_normalise(g_B)
  c_A, c_B = eq.saturate(s * B.scale * a.scale), eq.saturate(s * A.scale * b.scale)
  c = jnp.maximum(c_A, c_B)
  c = jnp.where(c > 0, c, jnp.ones_like(c))[:, None, None]
  g = layout_lib.outer(
    layout, B.hat, a.hat * (c_A[:, None, None] / c), b.hat * (c_B[:, None, None] / c), A.hat
  )
  return eq.saturate(g * c)


def _moment_shape(f: pairs_lib.FoundPair):
  return f.batch_shape + ((f.n, f.m) if f.layout == "flax" else (f.m, f.n))


def _moment_sharding(f: pairs_lib.FoundPair, a, b):
  """The sharding of a pair's m×n moment, from those of its A and B leaves.

  Out features follow B, batch axes B (else A), in features A, in that order
  of priority: a mesh axis already used is not used again (FSDP splits A and B
  over the same mesh axis; the moment is then split over out features, as
  the equivalent gradient ``B @ A`` is computed). None unless both leaves
  carry a `jax.sharding.NamedSharding` on the same mesh.
  """
  sa, sb = getattr(a, "sharding", None), getattr(b, "sharding", None)
  if not (
    isinstance(sa, jax.sharding.NamedSharding)
    and isinstance(sb, jax.sharding.NamedSharding)
    and sa.mesh == sb.mesh
  ):
    return None
  nd = len(f.batch_shape) + 2
  pa, pb = (tuple(s.spec) + (None,) * (nd - len(s.spec)) for s in (sa, sb))
  if f.layout == "flax":  # a (..., in, r), b (..., r, out), moment (..., in, out)
    in_ax, out_ax = pa[-2], pb[-1]
  else:  # A (..., r, in), B (..., out, r), moment (..., out, in)
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
  spec = batch + ((in_ax, out_ax) if f.layout == "flax" else (out_ax, in_ax))
  return jax.sharding.NamedSharding(sb.mesh, jax.sharding.PartitionSpec(*spec))


def full_moment_shardings(params, pairs: pairs_lib.PairsArg = None):
  """Shardings of the full-mode moments (``mu`` and ``nu``) for sharded params.

  ``lorapro(mode="full").init(params)`` called outside ``jax.jit`` on sharded
  arrays already places the moments this way. Under ``jax.jit`` nothing ties
  a freshly created moment to the params, so pass these as ``out_shardings``
  (e.g. through ``optax.tree.map_params``, see ``examples/sharded_finetune.py``).

  Args:
    params: the parameters, as arrays or ``jax.ShapeDtypeStruct`` whose
      ``sharding`` is a `jax.sharding.NamedSharding`.
    pairs: as in `lorapro`.

  Returns:
    A tree with the structure of ``ScaleByLoraProFullState.mu``: each pair's A
    slot holds the sharding of its m×n moment (out features split like B, in
    features like A unless that mesh axis is taken), its B slot an
    `PairedSlot`, other leaves their own sharding.
  """
  leaves, treedef = jax.tree.flatten(params)
  out = [getattr(x, "sharding", None) for x in leaves]
  for f in pairs_lib.find_pairs(params, pairs):
    sharding = _moment_sharding(f, leaves[f.a_index], leaves[f.b_index])
    if sharding is None:
      raise ValueError(
        f"The LoRA pair {pairs_lib.path_str(f.path)} has no NamedSharding on both of its leaves."
      )
    out[f.a_index], out[f.b_index] = sharding, PairedSlot()
  return jax.tree.unflatten(treedef, out)


def lorapro(
  scale: ScaleArg = 1.0,
  *,
  mode: Mode = "efficient",
  x_choice: batched.XChoice = "sylvester",
  damping: float = DEFAULT_DAMPING,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
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
    again by Theorem 2.1. Other leaves get plain Adam scaling, so
    ``chain(lorapro(mode="full"), optax.scale_by_learning_rate(lr))`` is a
    complete optimizer (see `lorapro_adamw` for weight decay).

  Leading axes of a pair's leaves are batch axes (stacked or scanned layers,
  experts): each slice is adjusted independently. All pairs are adjusted in one
  traced computation with the r×r work batched per rank.

  Args:
    scale: LoRA scaling s (α/r for LoRA, α/√r for rsLoRA; 1.0 for ``nnx.LoRA``,
      which applies none). A number, an array broadcastable to a pair's batch
      axes, or a callable ``(path, rank) -> number`` for per-layer values;
      ``path`` is the tuple of keys of the pair's parent.
    mode: "efficient" or "full".
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
    b1: full mode: decay of the first moment.
    b2: full mode: decay of the second moment.
    eps: full mode: added to the root of the second moment.
    moment_dtype: full mode: dtype of the moments (default float32, or
      float64 for float64 parameters; bfloat16 halves their memory).
    pairs: which leaves form pairs: a `LoRASpec` (default ``FLAX_NNX``:
      siblings ``lora_a`` (..., in, r) and ``lora_b`` (..., r, out)), a
      sequence of them (e.g. ``(FLAX_NNX, QWIX)``), or a callable
      ``params -> iterable of LoRAPair`` for any other arrangement.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` requires
    ``params`` and raises ``ValueError`` without them.

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
  for name, v in (("damping", damping), ("eps", eps)):
    _check_positive(name, v)
  moment_dtype_of = lambda *xs: jnp.dtype(moment_dtype or batched.compute_dtype(*xs))

  def adjusted_updates(updates, params):
    if params is None:
      raise ValueError(_NO_PARAMS)
    return _Pairs.build(params, updates, scale, pairs)

  if mode == "efficient":

    def update_efficient(updates, state, params=None, **extra_args):
      del extra_args
      P, u_leaves = adjusted_updates(updates, params)
      out = P.write(u_leaves, batched.adjust(P.leaf, x_choice, damping))
      return jax.tree.unflatten(jax.tree.structure(updates), out), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_efficient)

  def init_full(params):
    found = pairs_lib.find_pairs(params, pairs)
    leaves, treedef = jax.tree.flatten(params)
    # zeros_like keeps the sharding of a concrete sharded leaf, as optax.adam does.
    moments = [jnp.zeros_like(x, dtype=moment_dtype_of(x)) for x in leaves]
    for f in found:
      moments[f.a_index] = jnp.zeros(
        _moment_shape(f),
        moment_dtype_of(leaves[f.a_index], leaves[f.b_index]),
        device=_moment_sharding(f, leaves[f.a_index], leaves[f.b_index]),
      )
      moments[f.b_index] = PairedSlot()
    mu = jax.tree.unflatten(treedef, moments)
    return ScaleByLoraProFullState(jnp.zeros([], jnp.int32), mu, jax.tree.map(jnp.copy, mu))

  def update_full(updates, state, params=None, **extra_args):
    del extra_args
    P, u_leaves = adjusted_updates(updates, params)
    count = optax.safe_int32_increment(state.count)
    mu, mu_def = jax.tree.flatten(state.mu, is_leaf=_is_slot)
    nu = jax.tree.leaves(state.nu, is_leaf=_is_slot)
    if len(mu) != len(u_leaves):
      raise ValueError(
        "The full-mode state does not match the parameters: "
        f"{len(mu)} moment slots for {len(u_leaves)} leaves. "
        "Re-initialise the optimizer after changing the model."
      )
    paired = set()
    for f in P.found:
      paired.update((f.a_index, f.b_index))
    out = list(u_leaves)
    for i, u in enumerate(u_leaves):  # ordinary Adam on leaves outside pairs
      if i not in paired:
        d, mu[i], nu[i] = _adam_direction(u, mu[i], nu[i], count, b1, b2, eps)
        out[i] = d.astype(jnp.result_type(u))

    # Alg. 3 lines 6-8: equivalent gradient of the X = 0 adjustment.
    projected = []
    for f, p, (g_A, g_B) in zip(P.found, P.leaf, batched.adjust(P.leaf, "zero", damping)):
      A, B = _vmap_normalise(p.A), _vmap_normalise(p.B)
      # The moments are laid out like the adapted weight ((in, out) kernels for
      # the flax layout), as g̃ is formed: no m×n array is transposed.
      g_tilde = _equivalent_gradient(g_A, g_B, A, B, p.s, p.layout).reshape(_moment_shape(f))
      # Lines 9-13: Adam on the m×n equivalent gradient.
      d, mu[f.a_index], nu[f.a_index] = _adam_direction(
        g_tilde, mu[f.a_index], nu[f.a_index], count, b1, b2, eps, saturating=True
      )
      d = d.astype(p.A.dtype).reshape((-1,) + _moment_shape(f)[-2:])
      # Lines 14-15, Eq. (56): back to LoRA gradients, s·Bᵀd = s·β·(B̂ᵀd) etc.
      pa, pb = layout_lib.project(p.layout, d, A.hat, B.hat)
      s3 = p.s[:, None, None]
      projected.append(
        p._replace(
          g_A=eq.saturate(s3 * pa * B.scale[:, None, None]),
          g_B=eq.saturate(s3 * pb * A.scale[:, None, None]),
        )
      )
    # Lines 16-18: Theorem 2.1 with the chosen X.
    out = P.write(out, batched.adjust(projected, x_choice, damping))
    new_state = ScaleByLoraProFullState(
      count, jax.tree.unflatten(mu_def, mu), jax.tree.unflatten(mu_def, nu)
    )
    return jax.tree.unflatten(jax.tree.structure(updates), out), new_state

  return optax.GradientTransformationExtraArgs(init_full, update_full)


class LoraProWeightDecayState(NamedTuple):
  count: jax.Array


def add_lorapro_weight_decay(
  learning_rate: optax.ScalarOrSchedule,
  weight_decay: float,
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
    weight_decay: λ.
    pairs: as in `lorapro`.

  Returns:
    An ``optax.GradientTransformation`` that needs ``params``.
  """

  def init(params):
    del params
    return LoraProWeightDecayState(jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("add_lorapro_weight_decay needs params.")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    c_pair = weight_decay / (1 + jnp.sqrt(jnp.maximum(1 - lr * weight_decay, 0.0)))
    paired = set()
    for f in pairs_lib.find_pairs(params, pairs):
      paired.update((f.a_index, f.b_index))
    u_leaves, treedef = jax.tree.flatten(updates)
    p_leaves = jax.tree.leaves(params)
    out = [
      (u + (c_pair if i in paired else weight_decay) * p).astype(jnp.result_type(u))
      for i, (u, p) in enumerate(zip(u_leaves, p_leaves))
    ]
    return (
      jax.tree.unflatten(treedef, out),
      LoraProWeightDecayState(optax.safe_int32_increment(state.count)),
    )

  return optax.GradientTransformation(init, update)


def lorapro_adamw(
  learning_rate: optax.ScalarOrSchedule,
  *,
  scale: ScaleArg = 1.0,
  mode: Mode = "efficient",
  weight_decay: float = 1e-4,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  x_choice: batched.XChoice = "sylvester",
  damping: float = DEFAULT_DAMPING,
  moment_dtype: jnp.dtype | None = None,
  pairs: pairs_lib.PairsArg = None,
  mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LoRA-Pro with AdamW: Algorithm 2 (efficient) or Algorithm 3 (full).

  * efficient: ``chain(lorapro(...), optax.adamw(...))``: Adam moments on A and
    B, and AdamW's decoupled weight decay on A and B (and on other leaves).
  * full: Adam moments on each pair's m×n equivalent gradient, then Eq. (57)-(58)
    weight decay: A and B are multiplied by √(1 - γλ), so that s·B·A decays by
    (1 - γλ) like a fully fine-tuned weight. The frozen W0 would also decay by
    (1 - γλ) in full fine-tuning; it is not a trainable parameter here, so that
    part of the decay is not applied. Other leaves get AdamW.

  Args:
    learning_rate: a float or an optax schedule.
    scale: LoRA scaling s, as in `lorapro`.
    mode: "efficient" or "full".
    weight_decay: λ.
    b1, b2, eps: Adam hyperparameters.
    x_choice, damping, moment_dtype, pairs: as in `lorapro`.
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
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask),
    )
  decay = add_lorapro_weight_decay(learning_rate, weight_decay, pairs)
  if mask is not None:
    decay = optax.masked(decay, mask)
  return optax.chain(
    lorapro(
      scale,
      mode="full",
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
