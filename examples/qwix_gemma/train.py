"""Qwix LoRA on the Gemma-style decoder, trained with plain LoRA and LoRA-Pro.

One frozen random decoder gets Qwix LoRA weights (`qwix.apply_lora_to_model`,
as Tunix does); each method trains a copy of the same LoRA weights on the same
batches of stdlib docstring bytes and is evaluated on held-out modules.
"""

from __future__ import annotations

import dataclasses
import time
import typing

import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import nnx

import lorapro_jax as lpj
from examples.qwix_gemma.data import Corpus, batches, fixed_batches
from examples.qwix_gemma.model import Config, Decoder

MODES = typing.get_args(lpj.transform.Mode)
METHODS = ("LoRA", *(f"LoRA-Pro {m}" for m in MODES))
# Qwix module paths ("layers/0/attn/q_einsum", ...) of the adapted einsums. The attention
# projections by default: LoRA-Pro's factored mode compiles in about 4 s per pair on a CPU.
TARGETS = {
  "attention": r"layers/\d+/attn/(q|kv|attn_vec)_einsum",
  "all": r"layers/\d+/(attn/(q|kv|attn_vec)_einsum|mlp/(gating_einsum|linear))",
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: Config = dataclasses.field(default_factory=Config)
  rank: int = 8
  alpha: float = 16.0
  lr: float = 3e-3
  weight_decay: float = 1e-4
  steps: int = 100
  batch: int = 16
  seq_len: int = 64
  eval_every: int = 20
  eval_batches: int = 4
  seed: int = 0
  targets: str = TARGETS["attention"]
  max_bytes: int | None = None  # cap on the training text (the smoke run)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank  # Qwix's LoRA scaling


def optimizer(method: str, c: RunConfig) -> optax.GradientTransformation:
  """The three lines a Tunix user changes are the LoRA-Pro branch here."""
  if method == "LoRA":
    return optax.adamw(c.lr, weight_decay=c.weight_decay)
  mode = method.removeprefix("LoRA-Pro ")
  return lpj.lorapro_adamw(
    c.lr, scale=c.scale, mode=mode, weight_decay=c.weight_decay, pairs=lpj.QWIX
  )


def lora_model(c: RunConfig) -> nnx.Module:
  """The random decoder with Qwix LoRA weights on ``c.targets`` (B = 0)."""
  provider = qwix.LoraProvider(module_path=c.targets, rank=c.rank, alpha=c.alpha)
  tokens = jnp.zeros((1, c.seq_len), jnp.int32)

  @nnx.jit  # one compilation for the initialisers and Qwix's first call
  def build():
    base = Decoder(c.model, nnx.Rngs(c.seed))
    return qwix.apply_lora_to_model(base, provider, tokens, rngs=nnx.Rngs(c.seed + 1))

  return build()


def loss_fn(model, batch):
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@nnx.jit
def train_step(model, opt, batch):
  grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
  loss, grads = grad_fn(model, batch)
  opt.update(model, grads)
  return loss


eval_loss = nnx.jit(loss_fn)


@dataclasses.dataclass
class Curve:
  method: str
  steps: list[int]
  validation: list[float]  # mean next-byte cross-entropy, nats
  train: list[float]  # mean training loss since the previous evaluation
  seconds: float


def train(method: str, template: nnx.Module, corpus: Corpus, c: RunConfig) -> Curve:
  model = nnx.clone(template)
  opt = nnx.Optimizer(model, optimizer(method, c), wrt=nnx.LoRAParam)
  val = [
    jnp.asarray(b) for b in fixed_batches(corpus.validation, c.batch, c.seq_len, c.eval_batches)
  ]
  data = batches(corpus.train, c.batch, c.seq_len, c.seed)
  evaluate = lambda: float(np.mean([eval_loss(model, b) for b in val]))
  curve = Curve(method, [0], [evaluate()], [float("nan")], 0.0)
  start, window = time.perf_counter(), []
  for step in range(1, c.steps + 1):
    window.append(train_step(model, opt, jnp.asarray(next(data))))
    if step % c.eval_every == 0 or step == c.steps:
      curve.steps.append(step)
      curve.train.append(float(np.mean(window)))
      curve.validation.append(evaluate())
      window = []
  curve.seconds = time.perf_counter() - start
  return curve


def run(c: RunConfig, methods=METHODS, log=print) -> list[Curve]:
  corpus = Corpus.load(max_bytes=c.max_bytes)
  log(
    f"corpus: {corpus.modules} stdlib modules, {len(corpus.train):,} training and "
    f"{len(corpus.validation):,} validation bytes"
  )
  template = lora_model(c)
  pairs = lpj.find_pairs(nnx.state(template, nnx.LoRAParam), lpj.QWIX)
  log(
    f"model: {c.model}; Qwix LoRA r={c.rank} alpha={c.alpha} on {len(pairs)} einsum kernels, e.g. "
    + ", ".join(
      f"{'/'.join(map(str, f.path[-2:]))} a{f.in_shape + (f.r,)} b{(f.r,) + f.out_shape}"
      for f in pairs[:3]
    )
  )
  curves = []
  for method in methods:
    curves.append(train(method, template, corpus, c))
    log(f"{method}: validation loss {curves[-1].validation[-1]:.3f} ({curves[-1].seconds:.1f} s)")
  return curves


def table(curves: list[Curve]) -> str:
  """Validation loss (nats per byte) of every method at every evaluation."""
  head = "| step | " + " | ".join(c.method for c in curves) + " |"
  rule = "|---:|" + "---:|" * len(curves)
  rows = [
    f"| {step} | " + " | ".join(f"{c.validation[i]:.3f}" for c in curves) + " |"
    for i, step in enumerate(curves[0].steps)
  ]
  times = "| time (s) | " + " | ".join(f"{c.seconds:.1f}" for c in curves) + " |"
  return "\n".join([head, rule, *rows, times])
