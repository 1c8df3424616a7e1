"""Training the top layers with Qwix LoRA, plain AdamW or LoRA-Pro, on cached activations.

Only the top ``Config.train_layers`` blocks are adapted. Everything below them is frozen in
every method, so its output is computed once per example (:func:`frozen_cache`) and each
step runs forward and backward through the top blocks and the output head only: exact, not
an approximation. The head is evaluated only where an answer token is predicted.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import nnx

import lorapro_jax as lpj
from examples.minilm.cache import progress_bar
from examples.minilm.experiment import lr_values
from examples.smollm.data import Encoded
from examples.smollm.model import Block, Head, Llama

METHODS = ("lora", "lorapro_efficient", "lorapro_full", "lorapro_factored")
LABELS = {
  "zero_shot": "Zero-shot",
  "lora": "LoRA (AdamW)",
  "lorapro_efficient": "LoRA-Pro efficient",
  "lorapro_full": "LoRA-Pro full",
  "lorapro_factored": "LoRA-Pro factored",
}
# The lr grids of the study (``compare.py --study``), a half-decade apart, centred where each
# optimizer's step size works: LoRA-Pro full and factored run Adam on the equivalent gradient
# (W's scale), LoRA and efficient mode on the factors. The study extends a grid whose best lr
# is at an edge.
SWEEP_LRS = {
  "lora": (1e-3, 3e-3, 1e-2, 3e-2),
  "lorapro_efficient": (1e-3, 3e-3, 1e-2, 3e-2),
  "lorapro_full": (1e-4, 3e-4, 1e-3, 3e-3),
  "lorapro_factored": (1e-4, 3e-4, 1e-3, 3e-3),
}
# Each method's lr with the lowest mean validation loss in the study (results/study.jsonl).
DEFAULT_LRS = {
  "lora": 1e-2,
  "lorapro_efficient": 3e-3,
  "lorapro_full": 3e-3,
  "lorapro_factored": 1e-3,
}
# Qwix module paths of the adapted projections: attention and MLP of every trained block.
TARGETS = r"layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"


@dataclasses.dataclass(frozen=True)
class Config:
  """One training run's setting (everything but method, learning rate and seed)."""

  train_layers: int = 2  # the top blocks, adapted; the rest is frozen and cached
  rank: int = 8
  alpha: float = 16.0
  steps: int = 40
  batch: int = 8
  seq_len: int = 56  # prompt + answer tokens, right-padded
  answer_len: int = 12  # longest answer (signature and <|im_end|>) kept
  weight_decay: float = 0.0
  warmup_ratio: float = 0.05  # linear warmup, then cosine decay to 0
  train_examples: int = 320
  validation_examples: int = 96
  test_examples: int = 192
  eval_batch: int = 32
  data_seed: int = 0
  targets: str = TARGETS  # Qwix module-path regex of the adapted projections

  @property
  def scale(self) -> float:
    return self.alpha / self.rank  # Qwix's LoRA scaling

  @property
  def caps(self) -> dict[str, int]:
    return {
      "train": self.train_examples,
      "validation": self.validation_examples,
      "test": self.test_examples,
    }


class TopStack(nnx.Module):
  """The trained top blocks of a Llama and its output head, on hidden states."""

  def __init__(self, layers: list[Block], head: Head):
    self.layers = nnx.List(layers)
    self.head = head

  def __call__(self, h):
    positions = jnp.broadcast_to(jnp.arange(h.shape[1]), h.shape[:2])
    for layer in self.layers:
      h, _ = layer(h, positions)
    return h


def top_stack(model: Llama, train_layers: int) -> TopStack:
  """A copy of ``model``'s top ``train_layers`` blocks and head."""
  return nnx.clone(TopStack(list(model.layers[-train_layers:]), model.head))


def with_lora(top: TopStack, cfg: Config, seed: int) -> TopStack:
  """A copy of ``top`` with Qwix LoRA (``kernel_lora_a`` seeded by ``seed``, B = 0) on
  the projections ``cfg.targets`` matches (default: every attention and MLP projection)."""
  provider = qwix.LoraProvider(module_path=cfg.targets, rank=cfg.rank, alpha=cfg.alpha)
  sample = jnp.zeros((1, cfg.seq_len, top.head.norm.weight.shape[0]), jnp.float32)
  return qwix.apply_lora_to_model(nnx.clone(top), provider, sample, rngs=nnx.Rngs(seed))


def frozen_cache(
  model: Llama, enc: Encoded, stop: int, chunk: int, progress: bool = True, desc: str = ""
) -> np.ndarray:
  """Hidden states (n, T, dim) after the first ``stop`` blocks of ``model``, float32.

  Examples go in fixed-size chunks padded to the chunk's longest example rounded up to 8
  tokens (a few shapes, hence few compilations); attention is causal, so the padding does
  not change the states of the tokens before it.
  """
  graphdef, state = nnx.split(model)
  prefix = jax.jit(lambda s, ids: nnx.merge(graphdef, s).hidden(ids, stop))
  n, T = enc.ids.shape
  out = np.zeros((n, T, model.c.dim), np.float32)
  order = np.argsort(enc.start + enc.length, kind="stable")  # similar lengths together
  for s in progress_bar(range(0, n, chunk), desc=desc, disable=not progress, mininterval=1.0):
    idx = order[s : s + chunk]
    width = min(T, -(-int((enc.start + enc.length)[idx].max()) // 8) * 8)
    ids = np.zeros((chunk, width), np.int32)
    ids[: len(idx)] = enc.ids[idx, :width]
    out[idx, :width] = np.asarray(prefix(state, jnp.asarray(ids)))[: len(idx)]
  return out


@dataclasses.dataclass(frozen=True)
class Split:
  """A split's cached hidden states and answer targets."""

  h: np.ndarray  # (n, T, dim)
  pos: np.ndarray  # (n, K) positions predicting the answer tokens
  ids: np.ndarray  # (n, K) answer tokens
  mask: np.ndarray  # (n, K)

  @classmethod
  def make(cls, h: np.ndarray, enc: Encoded, answer_len: int) -> Split:
    return cls(h, *enc.targets(answer_len))

  def __len__(self) -> int:
    return self.h.shape[0]

  def batch(self, idx):
    return tuple(jnp.asarray(x[idx]) for x in (self.h, self.pos, self.ids, self.mask))


def _answer_logits(model: TopStack, h, pos):
  out = model(h)
  return model.head(jnp.take_along_axis(out, pos[..., None], axis=1))  # (B, K, vocab)


def make_tx(method: str, cfg: Config) -> optax.GradientTransformation:
  """The method's optimizer, its learning rate injected (one compilation for every lr)."""
  if method == "lora":
    return optax.inject_hyperparams(optax.adamw, static_args=("weight_decay",))(
      learning_rate=0.0, weight_decay=cfg.weight_decay
    )
  if not method.startswith("lorapro_") or method.removeprefix("lorapro_") not in (
    "efficient",
    "full",
    "factored",
  ):
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
  static = ("mode", "scale", "weight_decay", "pairs")
  return optax.inject_hyperparams(lpj.lorapro_adamw, static_args=static)(
    learning_rate=0.0,
    scale=cfg.scale,
    mode=method.removeprefix("lorapro_"),
    weight_decay=cfg.weight_decay,
    pairs=lpj.QWIX,
  )


@functools.partial(jax.jit, static_argnums=0)  # shared by every method: one compilation
def _evaluate(graphdef, lora, frozen, h, pos, ids, mask):
  logits = _answer_logits(nnx.merge(graphdef, lora, frozen), h, pos)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids)
  right = (jnp.argmax(logits, -1) == ids) | ~mask
  return jnp.sum(ce * mask, 1), jnp.all(right, 1)


class Trainer:
  """The jitted train step and evaluation of one method, for every lr and seed.

  ``step(lora, frozen, opt_state, batch, lr)`` donates ``lora`` and ``opt_state``.
  """

  def __init__(self, method: str, cfg: Config, template: TopStack):
    self.method, self.cfg = method, cfg
    self.graphdef, _, self.frozen = nnx.split(template, nnx.LoRAParam, ...)
    self.tx = tx = make_tx(method, cfg)
    graphdef = self.graphdef

    def loss_fn(lora, frozen, h, pos, ids, mask):
      logits = _answer_logits(nnx.merge(graphdef, lora, frozen), h, pos)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids)
      return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1)

    @functools.partial(jax.jit, donate_argnums=(0, 2))
    def step(lora, frozen, opt_state, batch, lr):
      hp = dict(opt_state.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
      opt_state = opt_state._replace(hyperparams=hp)
      loss, grads = jax.value_and_grad(loss_fn)(lora, frozen, *batch)
      updates, opt_state = tx.update(grads, opt_state, lora)
      return optax.apply_updates(lora, updates), opt_state, loss

    self.step, self.init = step, jax.jit(tx.init)

  def evaluate(self, lora, split: Split) -> dict[str, float]:
    """Mean cross-entropy per answer token and exact match (greedy decoding gives the
    answer iff the argmax is right at every answer position, teacher-forced)."""
    n, chunk = len(split), self.cfg.eval_batch
    ce, right = [], []
    for s in range(0, n, chunk):
      idx = np.arange(s, s + chunk) % n  # the last chunk wraps around: one shape
      c, r = _evaluate(self.graphdef, lora, self.frozen, *split.batch(idx))
      k = min(chunk, n - s)
      ce.append(np.asarray(c)[:k])
      right.append(np.asarray(r)[:k])
    tokens = float(split.mask.sum())
    return {
      "loss": float(np.concatenate(ce).sum() / tokens),
      "em": float(np.mean(np.concatenate(right))),
    }


def run(
  trainer: Trainer,
  lora0,
  splits: Mapping[str, Split],
  lr: float,
  seed: int,
  eval_splits=("validation", "test"),
  progress: bool = False,
) -> dict:
  """Train one (method, lr, seed) from the LoRA weights ``lora0`` and evaluate it; the
  batches depend on ``seed`` only."""
  cfg = trainer.cfg
  lora = jax.tree.map(jnp.copy, lora0)  # donated below: never the caller's buffers
  opt_state = trainer.init(lora)
  train = splits["train"]
  rng = np.random.default_rng(seed)
  order = np.concatenate(
    [rng.permutation(len(train)) for _ in range(1 + cfg.steps * cfg.batch // len(train))]
  )
  losses = []
  start = time.perf_counter()
  bar = progress_bar(
    range(cfg.steps),
    desc=f"{trainer.method} lr={lr:g} seed={seed}",
    leave=False,
    disable=not progress,
  )
  for i, lr_i in zip(bar, lr_values(lr, cfg.steps, cfg.warmup_ratio)):
    batch = train.batch(order[i * cfg.batch : (i + 1) * cfg.batch])
    lora, opt_state, loss = trainer.step(lora, trainer.frozen, opt_state, batch, lr_i)
    losses.append(float(loss))
  seconds = time.perf_counter() - start
  out = {"method": trainer.method, "lr": lr, "seed": seed, "train_loss": losses, "train_s": seconds}
  for name in eval_splits:
    out[name] = trainer.evaluate(lora, splits[name])
  return out
