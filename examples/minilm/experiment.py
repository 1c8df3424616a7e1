"""The experiment of the MiniLM comparison: configuration, models, optimizers,
train step and gradient probe.

Only the top ``Config.train_layers`` encoder layers are trained (:class:`TopStack`);
their input, the frozen prefix's hidden states, comes from ``cache.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lorapro_jax as lpj
from examples.minilm.data import contrastive_loss
from examples.minilm.model import LORA_TARGETS, EncoderLayer, MiniLMConfig, lora_scale
from lorapro_jax.pairs import normalise_path

METHODS = (
  "zero_shot",
  "full_ft",
  "lora",
  "rslora",
  "lorapro_eff",
  "lorapro_full",
  "lorapro_fact",
  "lora_long",
  "scaled_gd",
)
# The default run and the sweep: every method but the long LoRA run, which is a
# reference for the harder configuration (--hard), not a competitor, and the
# scaled-gradient comparator, which belongs to the study (study.py).
DEFAULT_METHODS = tuple(m for m in METHODS if m not in ("lora_long", "scaled_gd"))
LABELS = {
  "zero_shot": "Zero-shot",
  "full_ft": "Full FT",
  "lora": "LoRA",
  "rslora": "rsLoRA",
  "lorapro_eff": "LoRA-Pro (efficient)",
  "lorapro_full": "LoRA-Pro (full)",
  "lorapro_fact": "LoRA-Pro (factored)",
  "lora_long": "LoRA, long",  # Config.long_factor × the steps
  "scaled_gd": "Scaled GD (Zhang & Pilanci)",
}
LORA_METHODS = tuple(m for m in METHODS if m not in ("zero_shot", "full_ft"))
LORAPRO_MODES = {"lorapro_eff": "efficient", "lorapro_full": "full", "lorapro_fact": "factored"}

# Learning-rate grids of the sweep: three values a half-decade apart per method
# (different centres for full fine-tuning and the adapters), extended by one
# value wherever the best validation MRR sat at an edge of the grid (full FT
# 1e-3, rsLoRA 3e-4, LoRA-Pro full 3e-4 and 1e-4). DEFAULT_LRS is each method's
# lr with the best validation MRR (seed 0) in that sweep; see
# examples/minilm/RESULTS.md.
SWEEP_LRS: dict[str, tuple[float, ...]] = {
  "full_ft": (3e-5, 1e-4, 3e-4, 1e-3),
  "lora": (1e-3, 3e-3, 1e-2),
  "rslora": (3e-4, 1e-3, 3e-3, 1e-2),
  "lorapro_eff": (1e-3, 3e-3, 1e-2),
  "lorapro_full": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
  "lorapro_fact": (1e-4, 3e-4, 1e-3, 3e-3),
}
DEFAULT_LRS: dict[str, float] = {
  "full_ft": 3e-4,
  "lora": 3e-3,
  "rslora": 1e-3,
  "lorapro_eff": 3e-3,
  "lorapro_full": 3e-4,
  "lorapro_fact": 3e-4,
  "lora_long": 3e-3,  # LoRA's
  "scaled_gd": 3e-3,  # LoRA's; the study tunes it
}


@dataclasses.dataclass
class Config:
  """One comparison. Defaults are the CLI's default (quick) run."""

  methods: tuple[str, ...] = DEFAULT_METHODS
  lrs: Mapping[str, tuple[float, ...]] = dataclasses.field(
    default_factory=lambda: {m: (lr,) for m, lr in DEFAULT_LRS.items()}
  )
  seeds: tuple[int, ...] = (0,)
  steps: int = 60
  batch: int = 16
  query_len: int = 32
  max_len: int = 64  # documents
  train_layers: int = 1  # top layers trained; the rest is frozen and cached
  pretrained_layers: int | None = None  # use only the first n checkpoint layers (tests); None: all
  rank: int = 8
  alpha: float = 16.0
  temperature: float = 0.05
  weight_decay: float = 0.0
  warmup_ratio: float = 0.03
  eval_pairs: int = 300  # cap on validation and test pairs
  train_pairs: int | None = None  # cap on training pairs (None: all)
  grad_every: int = 15  # gradient-distance probe period (0: off)
  # Fixed evaluation set, the same for every method and seed: the first
  # eval_train_pairs of a data_seed permutation of the training split, in fixed
  # batches of `batch`, and the validation split. Evaluated after training and,
  # if eval_every > 0, every eval_every steps (0 pairs: off).
  eval_train_pairs: int = 512
  eval_every: int = 0
  long_factor: int = 4  # lora_long trains long_factor × steps (its own schedule)
  eval_validation: bool | None = None  # None: only when some method has several lrs
  select_seeds: tuple[int, ...] | None = (
    None  # lr chosen on these seeds; the other seeds run the chosen lr only
  )
  data_seed: int = 0  # the split shuffle; run seeds vary batch order and adapter init
  modules: tuple[str, ...] | None = None  # restrict the stdlib modules (tests)
  chunk: int = 64  # batch size of the frozen-prefix and evaluation passes
  progress: bool = True
  # What else a run trains besides its method's parameters (the study's
  # decomposition of the full-FT gap): "extra" adds the trained layers' biases
  # and LayerNorms to a LoRA method's adapters; "kernels" restricts full FT to
  # the weight matrices. "" trains the method's own parameters only.
  trainable: str = ""
  scaled_gd_damping: float = 1e-6  # λ of the scaled-gradient comparator (PEFT's default)
  # "contrastive": InfoNCE on code search; "distill": match a teacher's embeddings
  # (the study's optimisation-limited task; batches then carry the targets).
  objective: str = "contrastive"

  def __post_init__(self):
    unknown = set(self.methods) - set(METHODS)
    if unknown:
      raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    for m in self.methods:
      if m != "zero_shot" and not self.lrs.get(m):
        raise ValueError(f"no learning rate for method {m!r}")
    if not self.train_layers >= 1:
      raise ValueError("train_layers must be >= 1")
    if not self.long_factor >= 1:
      raise ValueError("long_factor must be >= 1")
    if self.objective not in ("contrastive", "distill"):
      raise ValueError(f"objective must be 'contrastive' or 'distill', got {self.objective!r}")
    if self.trainable not in ("", "extra", "kernels"):
      raise ValueError(f"trainable must be '', 'extra' or 'kernels', got {self.trainable!r}")

  def run_steps(self, method: str) -> int:
    """Training steps of ``method``: ``steps``, or ``long_factor × steps`` for lora_long."""
    return self.steps * (self.long_factor if method == "lora_long" else 1)

  @property
  def fixed_eval(self) -> bool:
    return self.eval_train_pairs > 0

  @property
  def select_on_validation(self) -> bool:
    if self.eval_validation is not None:
      return self.eval_validation
    return any(len(self.lrs.get(m, ())) > 1 for m in self.methods)


# The harder, opt-in configuration (compare.py --hard): two trained layers, rank
# 2, more steps, every method with three seeds, the long LoRA run, and the fixed
# evaluation set every few steps. Full fine-tuning and LoRA differ there by more
# than 3× the seed std of the paired difference (docs/study.md: 5.1 std on the
# fixed-set train loss against a tuned LoRA, 5 seeds).
HARD: dict = {
  "methods": tuple(m for m in METHODS if m != "scaled_gd"),
  "seeds": (0, 1, 2),
  "train_layers": 2,
  "rank": 2,
  "steps": 120,
  "eval_every": 30,
  "grad_every": 0,
}


def fixed_eval_indices(n_train: int, n_pairs: int, data_seed: int) -> np.ndarray:
  """The training pairs of the fixed evaluation set: the first ``n_pairs`` of a
  permutation seeded by ``data_seed`` alone (the same for every method and seed),
  cut to whole batches by the caller."""
  rng = np.random.default_rng([data_seed, 54321])
  return rng.permutation(n_train)[: min(n_pairs, n_train)]


def batch_order(n_train: int, batch: int, steps: int, seed: int) -> np.ndarray:
  """(steps, batch) training indices: whole batches of seeded permutations, epoch after epoch."""
  if n_train < batch:
    raise ValueError(f"{n_train} training pairs < batch {batch}")
  rng = np.random.default_rng([seed, 12345])
  per_epoch = n_train // batch
  rows = []
  while len(rows) < steps:
    perm = rng.permutation(n_train)[: per_epoch * batch].reshape(per_epoch, batch)
    rows.extend(perm)
  return np.stack(rows[:steps])


# --------------------------------------------------------------------------- models


class LoRAScale(nnx.Variable):
  """The LoRA scale s as state rather than a static attribute, so that LoRA and
  rsLoRA (and the gradient probe of every LoRA method) share one compilation."""


class TopStack(nnx.Module):
  """The trained top encoder layers, mean pooling and L2 normalisation.

  Input: the frozen prefix's hidden states (batch, seq, hidden) and the mask.
  ``rank=0`` gives plain linears (full fine-tuning, zero-shot, evaluation).
  Each adapted ``LoRALinear``'s ``scale`` is a :class:`LoRAScale` variable.
  """

  def __init__(self, cfg: MiniLMConfig, n_layers: int, *, rank: int, scale: float, rngs: nnx.Rngs):
    self.rank = rank
    zeros = nnx.initializers.zeros_init()  # overwritten by the pretrained weights
    self.layers = nnx.List(
      [
        EncoderLayer(
          cfg, rank_for={t: rank for t in LORA_TARGETS}, scale=scale, rngs=rngs, init=zeros
        )
        for _ in range(n_layers)
      ]
    )
    if rank > 0:
      for layer in self.layers:
        for t in LORA_TARGETS:
          getattr(layer, t).scale = nnx.data(LoRAScale(jnp.asarray(scale, jnp.float32)))

  def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(bool)
    for layer in self.layers:
      h = layer(h, mask)
    m = mask.astype(h.dtype)[..., None]
    pooled = (h * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

  def embed_pair(self, hq, mq, hd, md):
    """Query and document embeddings; one pass (and one traced copy) when the shapes agree."""
    if hq.shape == hd.shape:
      e = self(jnp.concatenate([hq, hd]), jnp.concatenate([mq, md]))
      return e[: hq.shape[0]], e[hq.shape[0] :]
    return self(hq, mq), self(hd, md)


def method_scale(method: str, cfg: Config) -> float:
  if method == "rslora":
    return lora_scale(cfg.rank, cfg.alpha, "rslora")
  if method in LORA_METHODS:
    return lora_scale(cfg.rank, cfg.alpha, "lora")
  return 0.0


def make_top(
  method: str, cfg: Config, base_state: nnx.State, model_cfg: MiniLMConfig, seed: int
) -> TopStack:
  rank = cfg.rank if method in LORA_METHODS else 0
  top = TopStack(
    model_cfg, cfg.train_layers, rank=rank, scale=method_scale(method, cfg), rngs=nnx.Rngs(seed)
  )
  nnx.update(top, base_state)  # pretrained base weights; adapters stay as initialised (b = 0)
  return top


# --------------------------------------------------------------------------- optimizers


def optimizer_kind(method: str) -> str:
  """Methods of one kind share a compiled train step."""
  kinds = {
    "full_ft": "adamw",
    "lora": "adamw_lora",
    "rslora": "adamw_lora",
    "lora_long": "adamw_lora",
  }
  return kinds.get(method, method)


class ScaledGradientState(NamedTuple):
  """The scaled-gradient preconditioner keeps no state."""


def scaled_gradient(damping: float = 1e-6) -> optax.GradientTransformation:
  r"""The scaled-gradient (Riemannian) preconditioner of Zhang & Pilanci (ICML 2024).

  In the paper's layout W = W0 + s·B·A it maps ``g_A ← (BᵀB + λI)⁻¹ g_A`` and
  ``g_B ← g_B (AAᵀ + λI)⁻¹``. Here the adapters are ``lora_a`` (in, r) = Aᵀ and
  ``lora_b`` (r, out) = Bᵀ, so ``g_a ← g_a (b bᵀ + λI)⁻¹`` and ``g_b ← (aᵀa + λI)⁻¹ g_b``.
  Other leaves pass unchanged. A comparator for the study, not part of the library.

  Args:
    damping: λ (PEFT's ``create_riemannian_optimizer`` uses ``reg=1e-6``).

  Returns:
    An ``optax.GradientTransformation`` to chain before AdamW.

  References:
    Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation
    Models", ICML 2024.
  """

  def init_fn(params):
    del params
    return ScaledGradientState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scaled_gradient needs the parameters (pass params to update)")
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    pflat = dict((normalise_path(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0])
    out = []
    for path, g in flat:
      key = normalise_path(path)
      if key[-1] in ("lora_a", "lora_b"):
        a, b = pflat[key[:-1] + ("lora_a",)], pflat[key[:-1] + ("lora_b",)]
        eye = jnp.eye(a.shape[-1], dtype=g.dtype)
        if key[-1] == "lora_a":  # solve X (b bᵀ + λI) = g_a; the matrix is symmetric
          g = jnp.linalg.solve(b @ b.T + damping * eye, g.T).T
        else:
          g = jnp.linalg.solve(a.T @ a + damping * eye, g)
      out.append(g)
    return jax.tree_util.tree_unflatten(treedef, out), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_tx(
  method: str, scale: float, weight_decay: float, damping: float = 1e-6
) -> optax.GradientTransformation:
  """The method's optimizer with an injected (per-step) learning rate."""
  if method == "scaled_gd":

    def scaled_adamw(learning_rate):
      return optax.chain(
        scaled_gradient(damping), optax.adamw(learning_rate, weight_decay=weight_decay)
      )

    return optax.inject_hyperparams(scaled_adamw)(learning_rate=0.0)
  if method in ("full_ft", "lora", "rslora", "lora_long"):
    return optax.inject_hyperparams(optax.adamw, static_args=("weight_decay",))(
      learning_rate=0.0, weight_decay=weight_decay
    )
  mode = LORAPRO_MODES[method]
  return optax.inject_hyperparams(lpj.lorapro_adamw, static_args=("mode", "scale", "weight_decay"))(
    learning_rate=0.0, scale=scale, mode=mode, weight_decay=weight_decay
  )


def lr_schedule(peak: float, steps: int, warmup_ratio: float) -> optax.Schedule:
  """Linear warmup from ``peak / (w + 1)`` to ``peak`` over ``w = ceil(warmup_ratio * steps)``
  steps (at least one unless ``warmup_ratio`` is 0), then cosine decay to 0 at step ``steps``."""
  warm = max(1, math.ceil(warmup_ratio * steps)) if warmup_ratio > 0 else 0
  return optax.warmup_cosine_decay_schedule(
    init_value=peak / (warm + 1),
    peak_value=peak,
    warmup_steps=warm,
    decay_steps=max(steps, warm + 1),
  )


def lr_values(peak: float, steps: int, warmup_ratio: float) -> list[float]:
  """:func:`lr_schedule` at steps 0 .. steps - 1, evaluated in float64.

  The train step receives each value as an argument, so one compilation serves every lr.
  """
  # float64 as in the runs of RESULTS.md: in float32 the schedule's late values
  # move by up to 1e-4 (relative), which would change every run's results.
  enable_x64 = getattr(jax, "enable_x64", None)  # older jax: only jax.experimental.enable_x64
  if enable_x64 is None:
    from jax.experimental import enable_x64
  with enable_x64(True):
    return np.asarray(lr_schedule(peak, steps, warmup_ratio)(np.arange(steps))).tolist()


# --------------------------------------------------------------------------- train step and probe


def _leaves_named(tree, leaf_name: str) -> list:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [x for p, x in flat if normalise_path(p)[-1] == leaf_name]


def _mean_abs(tree, leaf_name: str) -> jax.Array:
  xs = _leaves_named(tree, leaf_name)
  return sum(jnp.abs(x).sum() for x in xs) / max(1, sum(x.size for x in xs))


def _norm(xs) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(x * x) for x in xs))


def distill_loss(q: jax.Array, d: jax.Array, tq: jax.Array, td: jax.Array) -> jax.Array:
  """Mean squared distance to the teacher's (unit) embeddings, queries and documents."""
  return 0.5 * (jnp.mean(jnp.sum((q - tq) ** 2, -1)) + jnp.mean(jnp.sum((d - td) ** 2, -1)))


def _loss_fn(graphdef, temperature: float, objective: str = "contrastive"):
  def loss_fn(params, frozen, other, batch):
    m = nnx.merge(graphdef, params, frozen, other)
    if objective == "distill":  # batch: (hq, mq, hd, md, teacher q, teacher d)
      return distill_loss(*m.embed_pair(*batch[:4]), *batch[4:])
    return contrastive_loss(*m.embed_pair(*batch), temperature)

  return loss_fn


def _is_kernel(path, x) -> bool:
  del x
  return bool(path) and path[-1] == "kernel"


def trainable_filter(method: str, cfg: Config):
  """The nnx filter of what ``method`` trains under ``cfg.trainable`` (see Config)."""
  lora = method in LORA_METHODS
  if cfg.trainable == "kernels":
    if lora:
      raise ValueError("trainable='kernels' restricts full fine-tuning; LoRA trains no kernel")
    return nnx.All(nnx.Param, _is_kernel)
  if not lora:
    if cfg.trainable == "extra":
      raise ValueError("trainable='extra' adds biases and LayerNorms to a LoRA method")
    return nnx.Param
  if cfg.trainable == "extra":  # the adapters, the biases and the LayerNorms
    return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.Not(_is_kernel)))
  return nnx.LoRAParam


class TrainFns:
  """The jitted train step of one optimizer kind (see :func:`optimizer_kind`).

  The graph (module structure, optimizer) is the same for every learning rate
  and seed, and for LoRA and rsLoRA (the scale is state), so it compiles once;
  the learning rate is a traced argument (``inject_hyperparams``). ``step``
  returns the new parameters and optimizer state, the loss and the mean
  absolute update of A and B (``upd_a``, ``upd_b``) or of the kernels (``upd_w``).
  """

  def __init__(self, method: str, cfg: Config, template: TopStack):
    self.lora = method in LORA_METHODS
    self.trainable = trainable_filter(method, cfg)
    self.graphdef, _, _, _ = nnx.split(template, self.trainable, nnx.Param, ...)
    self.tx = tx = make_tx(
      method, method_scale(method, cfg), cfg.weight_decay, cfg.scaled_gd_damping
    )
    loss_fn = self.loss_fn = _loss_fn(self.graphdef, cfg.temperature, cfg.objective)
    lora = self.lora

    @jax.jit
    def step(params, frozen, other, opt_state, batch, lr):
      hp = dict(opt_state.hyperparams)
      hp["learning_rate"] = jnp.asarray(lr, jnp.float32)
      opt_state = opt_state._replace(hyperparams=hp)
      loss, grads = jax.value_and_grad(loss_fn)(params, frozen, other, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      # Mean |update| only: gradient statistics come from the probe, so that the
      # step does the method's work alone and its timing is the method's.
      if lora:
        stats = {"upd_a": _mean_abs(updates, "lora_a"), "upd_b": _mean_abs(updates, "lora_b")}
      else:
        stats = {"upd_w": _mean_abs(updates, "kernel")}
      return params, opt_state, loss, stats

    self.step = step
    self.init_opt = jax.jit(tx.init)

  def split(self, top: TopStack):
    """(trained parameters, frozen parameters, other state) of ``top``."""
    _, params, frozen, other = nnx.split(top, self.trainable, nnx.Param, ...)
    return params, frozen, other

  def merge(self, params, frozen, other) -> TopStack:
    return nnx.merge(self.graphdef, params, frozen, other)


def make_probe(graphdef, cfg: Config):
  """Jitted gradient probe of a LoRA model (paper Fig. 4).

  One backward gives the LoRA gradients and the gradients of the frozen base
  kernels, i.e. the full fine-tuning gradient g (in, out) at W0 + s·a·b.
  Returns, per trained layer and target (arrays (layers, 6)): ||g||, the
  distances ||g̃ - g|| of LoRA's equivalent gradient (``d_raw``) and of
  LoRA-Pro's (efficient adjustment, ``d_adj``) and their norms
  (``geq_raw_norm``, ``geq_adj_norm``); and the norms of the run's A and B
  gradients over all layers and of their LoRA-Pro adjustment (``gA_raw_norm``,
  ``gA_adj_norm``, ``gB_raw_norm``, ``gB_adj_norm``), for every LoRA method
  (for the LoRA-Pro runs the optimizer computes the same adjustment internally).
  """
  loss_fn = _loss_fn(graphdef, cfg.temperature)

  @jax.jit
  def probe(params, frozen, other, batch, scale):
    g_lora, g_base = jax.grad(loss_fn, argnums=(0, 1))(params, frozen, other, batch)
    adjusted, _ = lpj.lorapro(scale).update(g_lora, None, params)
    eq_raw = lpj.equivalent_gradients(params, g_lora, scale)
    eq_adj = lpj.equivalent_gradients(params, adjusted, scale)
    kernels = {}  # keyed like the pairs: the adapted layer's path, "layers/0/query"
    for p, g in jax.tree_util.tree_flatten_with_path(g_base)[0]:
      names = normalise_path(p)
      if names[-2:] == ("base", "kernel"):
        kernels["/".join(map(str, names[:-2]))] = g
    out = {k: [] for k in ("g_norm", "d_raw", "d_adj", "geq_raw_norm", "geq_adj_norm")}
    for i in range(cfg.train_layers):
      keys = [f"layers/{i}/{t}" for t in LORA_TARGETS]
      out["g_norm"].append(jnp.stack([jnp.linalg.norm(kernels[k]) for k in keys]))
      out["d_raw"].append(jnp.stack([jnp.linalg.norm(eq_raw[k] - kernels[k]) for k in keys]))
      out["d_adj"].append(jnp.stack([jnp.linalg.norm(eq_adj[k] - kernels[k]) for k in keys]))
      out["geq_raw_norm"].append(jnp.stack([jnp.linalg.norm(eq_raw[k]) for k in keys]))
      out["geq_adj_norm"].append(jnp.stack([jnp.linalg.norm(eq_adj[k]) for k in keys]))
    out = {k: jnp.stack(v) for k, v in out.items()}
    for name, tag in (("lora_a", "A"), ("lora_b", "B")):
      out[f"g{tag}_raw_norm"] = _norm(_leaves_named(g_lora, name))
      out[f"g{tag}_adj_norm"] = _norm(_leaves_named(adjusted, name))
    return out

  return probe
