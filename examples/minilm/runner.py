"""The runner of the MiniLM comparison: trains and evaluates every (method, lr, seed)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.minilm.cache import Encoded, encode_pairs, make_prefix_fn, progress_bar
from examples.minilm.data import build_splits, contrastive_loss, evaluate_retrieval
from examples.minilm.experiment import (
  LABELS,
  Config,
  TopStack,
  TrainFns,
  batch_order,
  fixed_eval_indices,
  lr_values,
  make_probe,
  make_top,
  method_scale,
  optimizer_kind,
)
from examples.minilm.model import LORA_TARGETS
from examples.minilm.report import summarize
from examples.minilm.weights import load_pretrained


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
    validation = cfg.select_on_validation or cfg.fixed_eval
    needed = ["train", "test"] + (["validation"] if validation else [])
    self.data: dict[str, Encoded] = {}
    prefix_fn = make_prefix_fn(full, self.n_frozen)
    n_train = len(self.splits.train)
    # The fixed evaluation pairs, in whole batches (see Config.eval_train_pairs).
    fixed = fixed_eval_indices(n_train, cfg.eval_train_pairs, cfg.data_seed)
    self.fixed_index = fixed[: len(fixed) // cfg.batch * cfg.batch]
    steps = max(cfg.run_steps(m) for m in cfg.methods)
    for name in needed:
      pairs = self.splits[name]
      if name == "train":
        orders = [batch_order(n_train, cfg.batch, steps, s).ravel() for s in cfg.seeds]
        used = np.unique(np.concatenate(orders + [self.fixed_index]))
        self.train_index = used
        pairs = [pairs[i] for i in used]
      self.data[name] = encode_pairs(
        prefix_fn, pairs, cfg.query_len, cfg.max_len, cfg.chunk, cfg.progress, name
      )
    # Map original train indices to rows of the (possibly partial) cache.
    self.train_row = np.full(n_train, -1, np.int64)
    self.train_row[self.train_index] = np.arange(len(self.train_index))
    if cfg.fixed_eval:
      enc, rows = self.data["train"], self.train_row[self.fixed_index]
      self.fixed_train = Encoded(enc.hq[rows], enc.mq[rows], enc.hd[rows], enc.md[rows])
    self.timings["frozen_prefix_s"] = time.perf_counter() - t0
    del full

    @jax.jit
    def embed(state, h, mask):
      return nnx.merge(self.eval_graphdef, state)(h, mask)

    self._embed = embed
    self._fns: dict[str, TrainFns] = {}
    self._probes: dict[tuple[int, int], Callable] = {}  # (id of a cached TrainFns, layers)
    self._baseline: dict[tuple[int, int], list[float]] = {}
    self._baseline_fn = None
    self._fixed_start: dict[str, float] | None = None

  def describe(self) -> str:
    """The data, the frozen prefix and the setup times."""
    s = self.splits
    return (
      f"data: {len(s.train)} train / {len(s.validation)} validation / {len(s.test)} test pairs; "
      f"frozen prefix: embeddings + {self.n_frozen} layers, cached for {len(self.train_index)} "
      "train pairs\nsetup: " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items())
    )

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
    """Retrieval metrics on validation (when encoded) and test."""
    return self._evaluate(top)[0]

  def _evaluate(self, top: TopStack | None, fixed: bool = False):
    """(metrics, fixed-set evaluation or None), the validation pass shared by both."""
    state = self.merged_eval_state(top)
    out, emb = {}, {}
    for name in ("validation", "test"):
      if name in self.data:
        emb[name] = q, d = self.embed_split(state, self.data[name])
        out[name] = evaluate_retrieval(q, d)
    return out, (self._fixed_eval_of(state, emb.get("validation")) if fixed else None)

  def _grouped_loss(self, q: np.ndarray, d: np.ndarray) -> float:
    """Mean InfoNCE over consecutive batches of ``cfg.batch`` pairs (a partial last one dropped)."""
    b = self.cfg.batch
    n = len(q) // b * b
    qg, dg = q[:n].reshape(-1, b, q.shape[-1]), d[:n].reshape(-1, b, d.shape[-1])
    per_batch = jax.vmap(lambda x, y: contrastive_loss(x, y, self.cfg.temperature))(qg, dg)
    return float(jnp.mean(per_batch))

  def fixed_evaluate(self, top: TopStack | None) -> dict[str, float]:
    """The fixed evaluation set: mean loss over the fixed training batches
    (``train_loss``) and over validation in batches (``val_loss``), and validation MRR."""
    if top is None and self._fixed_start is not None:
      return dict(self._fixed_start)
    out = self._fixed_eval_of(self.merged_eval_state(top))
    if top is None:
      self._fixed_start = dict(out)
    return out

  def _fixed_eval_of(self, state, validation=None) -> dict[str, float]:
    """:meth:`fixed_evaluate` of a merged eval state; ``validation``: its (q, d) embeddings."""
    q, d = self.embed_split(state, self.fixed_train)
    out = {"train_loss": self._grouped_loss(q, d)}
    q, d = (
      validation if validation is not None else self.embed_split(state, self.data["validation"])
    )
    return out | {"val_loss": self._grouped_loss(q, d), "val_mrr": evaluate_retrieval(q, d)["mrr"]}

  def baseline_losses(self, seed: int, steps: int | None = None) -> list[float]:
    """The pretrained model's loss on each training batch of ``seed`` (cached).

    Every method sees the same batches, so the per-batch difficulty cancels
    in ``loss - baseline``: the loss figure plots that next to the raw loss.
    """
    steps = steps or self.cfg.steps
    if (seed, steps) not in self._baseline:
      cfg = self.cfg
      state = self.merged_eval_state(None)
      graphdef, temperature = self.eval_graphdef, cfg.temperature

      if self._baseline_fn is None:

        @jax.jit
        def f(state, batch):
          return contrastive_loss(*nnx.merge(graphdef, state).embed_pair(*batch), temperature)

        self._baseline_fn = f
      order = batch_order(len(self.splits.train), cfg.batch, steps, seed)
      enc = self.data["train"]
      self._baseline[seed, steps] = [
        float(self._baseline_fn(state, enc.batch(self.train_row[idx])))
        for idx in progress_bar(
          order,
          desc=f"pretrained loss per batch, seed {seed}",
          leave=False,
          disable=not cfg.progress,
          mininterval=1.0,
        )
      ]
    return self._baseline[seed, steps]

  # ----------------------------------------------------------------- training

  def fns(self, method: str, top: TopStack, cfg: Config | None = None) -> TrainFns:
    cfg = cfg or self.cfg
    kind = (optimizer_kind(method), cfg.rank, cfg.trainable, cfg.objective)
    if kind not in self._fns:
      self._fns[kind] = TrainFns(method, cfg, top)
    return self._fns[kind]

  def probe(self, fns: TrainFns, cfg: Config | None = None):
    cfg = cfg or self.cfg
    key = (id(fns), cfg.train_layers)
    if key not in self._probes:  # one per train step kind: runs of two kinds alternate
      self._probes[key] = make_probe(fns.graphdef, cfg)
    return self._probes[key]

  def train(self, method: str, lr: float, seed: int, cfg: Config | None = None) -> dict[str, Any]:
    """One run: losses, lrs and update sizes (``step_stats``) at every step, the
    gradient probe (LoRA methods) every ``grad_every`` steps, metrics and times.

    ``cfg`` overrides the comparison's configuration for this run (rank, steps,
    what is trained, evaluation period); the data and the frozen cache stay.
    """
    cfg = cfg or self.cfg
    t_start = time.perf_counter()
    top = make_top(method, cfg, self.base_state, self.model_cfg, seed)
    fns = self.fns(method, top, cfg)
    scale = jnp.asarray(method_scale(method, cfg), jnp.float32)
    params, frozen, other = fns.split(top)
    opt_state = fns.init_opt(params)
    steps = cfg.run_steps(method)
    order = batch_order(len(self.splits.train), cfg.batch, steps, seed)
    enc = self.data["train"]
    schedule = lr_values(lr, steps, cfg.warmup_ratio)
    losses, lrs, stats_hist, probes = [], [], [], []
    fixed: dict[str, list] = {}
    t_fixed = 0.0

    def record(step, ev):
      for k, v in {"step": step, **ev}.items():
        fixed.setdefault(k, []).append(v)

    def fixed_eval(step, params):  # on the fixed evaluation set, timed apart from training
      nonlocal t_fixed
      t0 = time.perf_counter()
      record(step, self.fixed_evaluate(fns.merge(params, frozen, other) if step else None))
      t_fixed += time.perf_counter() - t0

    # The same number of evaluations for the long run: every eval_every × long_factor steps.
    every = cfg.eval_every * steps // cfg.steps
    if cfg.fixed_eval and every:
      fixed_eval(0, params)
    t_first = None
    bar = progress_bar(
      range(steps),
      desc=f"{method} lr={lr:g} seed={seed}",
      leave=False,
      disable=not cfg.progress,
      mininterval=1.0,
    )
    for step in bar:
      batch = enc.batch(self.train_row[order[step]])
      if fns.lora and cfg.grad_every and step % cfg.grad_every == 0:
        pr = jax.device_get(self.probe(fns, cfg)(params, frozen, other, batch, scale))
        probes.append({"step": step, **{k: np.asarray(v).tolist() for k, v in pr.items()}})
      lr_t = schedule[step]
      params, opt_state, loss, stats = fns.step(params, frozen, other, opt_state, batch, lr_t)
      loss = float(loss)
      if t_first is None:
        t_first = time.perf_counter() - t_start
      if not math.isfinite(loss):
        self.log(f"  {method} lr={lr:g} seed={seed}: non-finite loss at step {step}; stopping")
        losses.append(loss)
        break
      losses.append(loss)
      lrs.append(lr_t)
      stats_hist.append({k: float(v) / lr_t for k, v in stats.items()})  # update size per unit lr
      if hasattr(bar, "set_postfix") and step % 5 == 0:
        bar.set_postfix(loss=f"{loss:.3f}")
      done = step + 1
      if cfg.fixed_eval and every and done % every == 0 and done < steps:
        fixed_eval(done, params)
    finite = all(map(math.isfinite, losses))
    t_train = time.perf_counter() - t_start - t_fixed
    top = fns.merge(params, frozen, other)
    t0 = time.perf_counter()
    metrics = {}
    if finite:  # test, validation and (after the last step) the fixed set
      metrics, ev = self._evaluate(top, fixed=cfg.fixed_eval)
      if ev is not None:
        record(len(losses), ev)
    n_tail = max(1, len(losses) // 10)
    return {
      "method": method,
      "lr": lr,
      "seed": seed,
      "steps": steps,
      "metrics": metrics,
      "fixed_eval": fixed,
      "final_train_loss": float(np.mean(losses[-n_tail:])),
      "initial_train_loss": losses[0],
      "losses": losses,
      "lrs": lrs,
      "step_stats": {k: [s[k] for s in stats_hist] for k in (stats_hist[0] if stats_hist else {})},
      "baseline_losses": self.baseline_losses(seed, steps)[: len(losses)],
      "probes": probes,
      "trainable_params": int(sum(x.size for x in jax.tree.leaves(params))),
      "time_first_step_s": t_first,
      "time_train_s": t_train,
      "time_eval_s": time.perf_counter() - t0,
      "time_fixed_eval_s": t_fixed,
    }

  def run_all(self, on_run: Callable[[dict], None] | None = None) -> list[dict]:
    cfg = self.cfg
    runs = []
    if "zero_shot" in cfg.methods:
      t0 = time.perf_counter()
      metrics = self.evaluate(None)
      fixed = {}
      if cfg.fixed_eval:
        fixed = {"step": [0], **{k: [v] for k, v in self.fixed_evaluate(None).items()}}
      runs.append(
        {
          "method": "zero_shot",
          "lr": None,
          "seed": None,
          "metrics": metrics,
          "fixed_eval": fixed,
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
        + (
          f"  fixed-set loss {run['fixed_eval']['train_loss'][-1]:.4f}" if run["fixed_eval"] else ""
        )
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
