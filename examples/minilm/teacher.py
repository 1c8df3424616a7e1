"""The study's optimisation-limited task: a student LoRA learns a rank-r teacher.

Teacher: the pretrained model whose trained layers' kernels are changed by the
best rank-r approximation (truncated SVD) of a real full fine-tuning run's
change, ``W0 + SVD_r(W_FT − W0)``; biases and LayerNorms stay pretrained.
Student: the pretrained model with LoRA adapters of rank r from LoRA's
initialisation (B = 0), trained to match the teacher's embeddings of the real
code-search texts (``experiment.distill_loss``). A rank-r LoRA can represent
the teacher exactly, so whatever separates the methods here is optimisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.minilm.cache import Encoded
from examples.minilm.data import evaluate_retrieval
from examples.minilm.experiment import Config, batch_order, distill_loss, lr_values, make_top
from examples.minilm.model import LORA_TARGETS
from examples.minilm.runner import Comparison


def train_top(
  comp: Comparison,
  cfg: Config,
  method: str,
  lr: float,
  seed: int,
  on_step: Callable[[int, nnx.State], None] | None = None,
):
  """Trains ``method`` as ``comp.train`` does and returns the trained TopStack;
  ``on_step(done, params)`` after each step (for measurements inside the run)."""
  top = make_top(method, cfg, comp.base_state, comp.model_cfg, seed)
  fns = comp.fns(method, top, cfg)
  params, frozen, other = fns.split(top)
  opt_state = fns.init_opt(params)
  order = batch_order(len(comp.splits.train), cfg.batch, cfg.steps, seed)
  schedule = lr_values(lr, cfg.steps, cfg.warmup_ratio)
  enc = comp.data["train"]
  for step in range(cfg.steps):
    batch = enc.batch(comp.train_row[order[step]])
    params, opt_state, _, _ = fns.step(params, frozen, other, opt_state, batch, schedule[step])
    if on_step is not None:
      on_step(step + 1, params)
  return fns.merge(params, frozen, other)


def low_rank_teacher(
  comp: Comparison, cfg: Config, lr: float, seed: int, rank: int
) -> tuple[nnx.State, dict]:
  """The teacher's eval state (a rank-0 TopStack) and, per kernel, the share of
  ‖W_FT − W0‖² that the rank-``rank`` truncation keeps."""
  trained = train_top(comp, dataclasses.replace(cfg, objective="contrastive"), "full_ft", lr, seed)
  ev = comp.eval_template
  nnx.update(ev, comp.base_state)
  kept = {}
  for i, (dst, src) in enumerate(zip(ev.layers, trained.layers)):
    for t in LORA_TARGETS:
      w0 = np.asarray(getattr(dst, t).base.kernel[...], np.float64)
      delta = np.asarray(getattr(src, t).base.kernel[...], np.float64) - w0
      u, s, vt = np.linalg.svd(delta, full_matrices=False)
      getattr(dst, t).base.kernel[...] = jnp.asarray(
        w0 + (u[:, :rank] * s[:rank]) @ vt[:rank], jnp.float32
      )
      kept[f"layers/{i}/{t}"] = float((s[:rank] ** 2).sum() / max((s**2).sum(), 1e-300))
  state = jax.tree.map(jnp.array, nnx.state(ev))  # a copy: eval_template is reused
  return state, kept


@dataclasses.dataclass
class Targeted(Encoded):
  """Cached hidden states with the teacher's embeddings of each query and document."""

  tq: np.ndarray = None  # (n, hidden)
  td: np.ndarray = None

  def batch(self, idx):
    return super().batch(idx) + (jnp.asarray(self.tq[idx]), jnp.asarray(self.td[idx]))


class DistillComparison(Comparison):
  """A :class:`Comparison` on the teacher task, sharing ``comp``'s data and cache.

  The fixed-set ``train_loss`` and ``val_loss`` are the distillation loss on the
  fixed training pairs and on the validation split (held-out modules);
  ``val_mrr`` and the test metrics stay code-search retrieval.
  """

  def __init__(self, comp: Comparison, teacher: nnx.State):
    self.__dict__.update(comp.__dict__)
    self._fns, self._probes, self._baseline, self._fixed_start = {}, {}, {}, None
    enc = comp.data["train"]
    self.data = dict(comp.data)
    self.data["train"] = Targeted(enc.hq, enc.mq, enc.hd, enc.md, *self.embed_split(teacher, enc))
    self.fixed_targets = self.embed_split(teacher, self.fixed_train)
    self.val_targets = self.embed_split(teacher, comp.data["validation"])

  def _fixed_eval_of(self, state, validation=None) -> dict[str, float]:
    q, d = self.embed_split(state, self.fixed_train)
    out = {"train_loss": float(distill_loss(q, d, *self.fixed_targets))}
    q, d = (
      validation if validation is not None else self.embed_split(state, self.data["validation"])
    )
    out["val_loss"] = float(distill_loss(q, d, *self.val_targets))
    return out | {"val_mrr": evaluate_retrieval(q, d)["mrr"]}

  def baseline_losses(self, seed: int, steps: int | None = None) -> list[float]:
    return []  # the pretrained model's per-batch contrastive loss means nothing here
