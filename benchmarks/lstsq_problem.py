"""LoRA least-squares problems and the optimizers compared on them (`benchmarks.lstsq_quality`).

The problem. Pairs k = 1..K of (out × in) weights, frozen W0_k ~ N(0, 1/in) and a target
T_k = W0_k + Δ_k, where Δ_k = U·diag(σ)·Vᵀ + noise: rank ``target_rank`` with singular values
log-spaced from 1 to ``sv_min`` (orthonormal random U, V), plus Gaussian noise holding
``noise`` of the energy, scaled so that the entries of Δ_k have RMS ``delta_rms``. LoRA
trains W_k = W0_k + s·B_k·A_k (flax layout: the kernel (in, out) is W0 + s·a·b with a (in, r),
b (r, out)), and the loss is

    L = Σ_k ½‖W0_k + s·B_k·A_k − T_k‖²_F / ‖Δ_k‖²_F                 (exact gradient)
    L = Σ_k ½‖X_k(W0_k + s·B_k·A_k − T_k)‖²_F / ‖X_k Δ_k‖²_F         (fixed input batch)

so each pair starts at ½ from B = 0 and L is the fraction of the target shift not yet fitted.
The main study uses the exact gradient: no sampling noise, so the seeds vary only the
problem and the initialisation, and its Hessian in W is the identity, so any difference
between methods comes from the factorisation W0 + s·B·A, which is what LoRA-Pro changes.
A fixed batch with features scaled over a decade (``input_cond``) adds an ill-conditioned W
problem; it is one of the problems of the second study. Every loss has a floor that rank r
cannot go below: ½ × the energy outside the best rank-r approximation of Δ_k (of X_kΔ_k), by
Eckart-Young; it is reported with every problem.

Initialisation as LoRA's (PEFT's): A ~ U(±1/√in), B = 0 (``b_std`` > 0: B ~ N(0, b_std²)).
The seed draws problem and initialisation together. float32, AdamW family without weight
decay, constant learning rate. "loss at step t" is the loss after t updates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorapro_jax as lpj
from benchmarks import models

# --------------------------------------------------------------------------- problems


@dataclasses.dataclass(frozen=True)
class Problem:
  """A LoRA least-squares problem; ``make`` draws one instance per seed."""

  name: str
  shapes: tuple[tuple[int, int], ...] = ((64, 48), (96, 64), (48, 80))  # (out, in)
  rank: int = 4
  scale: float = 2.0
  target_rank: int = 8
  sv_min: float = 0.1  # singular values of the low-rank part: log-spaced 1 .. sv_min
  noise: float = 0.05  # fraction of ‖Δ‖² in the full-rank noise
  delta_rms: float = 0.05  # RMS of Δ's entries
  n_inputs: int | None = None  # None: exact gradient; else a fixed batch X of this many rows
  input_cond: float = 10.0  # X's feature scales, log-spaced 1 .. 1/input_cond

  def describe(self) -> str:
    shapes = ", ".join(f"{m}×{n}" for m, n in self.shapes)
    grad = "exact gradient" if self.n_inputs is None else f"fixed batch X ({self.n_inputs} rows, "
    if self.n_inputs is not None:
      grad += f"feature scales 1..{1 / self.input_cond:g})"
    noise = f" + {self.noise:.0%} noise" if self.noise else ""
    return (
      f"{self.name}: pairs {shapes} (out×in), r = {self.rank}, s = {self.scale:g}; "
      f"Δ rank {self.target_rank} (σ 1..{self.sv_min:g}){noise}, RMS {self.delta_rms:g}; {grad}"
    )

  def make(self, seed: int, b_std: float = 0.0):
    """(params0, data, floor): LoRA factors at init, per-pair arrays, the rank-r loss floor."""
    params, data, floor = {}, [], 0.0
    for k, (m, n) in enumerate(self.shapes):
      rng = np.random.default_rng([seed, k, 7])
      W0 = rng.normal(0.0, 1.0 / np.sqrt(n), (n, m))  # kernel layout (in, out)
      U = np.linalg.qr(rng.normal(size=(n, self.target_rank)))[0]
      V = np.linalg.qr(rng.normal(size=(m, self.target_rank)))[0]
      sv = np.logspace(0.0, np.log10(self.sv_min), self.target_rank)
      low = (U * sv) @ V.T
      low *= np.sqrt(1.0 - self.noise) / np.linalg.norm(low)
      E = rng.normal(size=(n, m))
      delta = low + (np.sqrt(self.noise) / np.linalg.norm(E)) * E if self.noise else low
      delta *= self.delta_rms * np.sqrt(m * n)
      if self.n_inputs is None:
        X, seen = None, delta
      else:
        feat = np.logspace(0.0, -np.log10(self.input_cond), n)
        X = rng.normal(size=(self.n_inputs, n)) * feat / np.sqrt(self.n_inputs)
        seen = X @ delta
      energy = np.linalg.svd(seen, compute_uv=False) ** 2
      floor += 0.5 * energy[self.rank :].sum() / energy.sum()
      a = rng.uniform(-1.0, 1.0, (n, self.rank)) / np.sqrt(n)
      b = rng.normal(0.0, b_std, (self.rank, m)) if b_std else np.zeros((self.rank, m))
      params[f"p{k}"] = {
        "lora_a": jnp.asarray(a, jnp.float32),
        "lora_b": jnp.asarray(b, jnp.float32),
      }
      f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
      data.append((f32(W0), f32(W0 + delta), f32(X), jnp.float32(np.sum(seen * seen))))
    return params, data, float(floor)


def loss_fn(params, data, scale: float):
  total = 0.0
  for k, (W0, T, X, norm) in enumerate(data):
    p = params[f"p{k}"]
    R = W0 + scale * (p["lora_a"] @ p["lora_b"]) - T
    if X is not None:
      R = X @ R
    total = total + 0.5 * jnp.sum(R * R) / norm
  return total


# --------------------------------------------------------------------------- methods

# Each method: (lr, s) -> optax transformation; lr may be traced (one compilation per method).
MethodFn = Callable[[jax.Array, float], optax.GradientTransformation]


def _factored(lr, s, *, b1=0.9, clip=False, relative=False):
  parts = [lpj.lorapro(s, mode="factored", b1=b1)]
  if clip:
    parts.append(optax.clip_by_block_rms(1.0))
  if relative:
    parts.append(optax.scale_by_param_block_rms())
  return optax.chain(*parts, optax.scale_by_learning_rate(lr))


METHODS: dict[str, MethodFn] = {
  "lora": lambda lr, s: optax.adamw(lr, weight_decay=0.0),
  "efficient": lambda lr, s: lpj.lorapro_adamw(lr, scale=s, mode="efficient", weight_decay=0.0),
  "full": lambda lr, s: lpj.lorapro_adamw(lr, scale=s, mode="full", weight_decay=0.0),
  "factored": lambda lr, s: lpj.lorapro_adamw(lr, scale=s, mode="factored", weight_decay=0.0),
  "factored_b1_0": lambda lr, s: lpj.lorapro_adamw(
    lr, scale=s, mode="factored", b1=0.0, weight_decay=0.0
  ),
  # Adafactor's update clipping and relative step size, by composition.
  "factored+clip": lambda lr, s: _factored(lr, s, clip=True),
  "factored+relstep": lambda lr, s: _factored(lr, s, relative=True),
  "factored+clip+relstep": lambda lr, s: _factored(lr, s, clip=True, relative=True),
  "factored_b1_0+clip": lambda lr, s: _factored(lr, s, b1=0.0, clip=True),
  "factored_b1_0+clip+relstep": lambda lr, s: _factored(lr, s, b1=0.0, clip=True, relative=True),
}
CODE = {  # how each method is built, for the report
  "lora": "optax.adamw(lr, weight_decay=0)",
  "efficient": 'lorapro_adamw(lr, scale=s, mode="efficient", weight_decay=0)',
  "full": 'lorapro_adamw(lr, scale=s, mode="full", weight_decay=0)',
  "factored": 'lorapro_adamw(lr, scale=s, mode="factored", weight_decay=0)',
  "factored_b1_0": 'lorapro_adamw(lr, scale=s, mode="factored", b1=0.0, weight_decay=0)',
  "factored+clip": 'chain(lorapro(s, mode="factored"), clip_by_block_rms(1.0), '
  "scale_by_learning_rate(lr))",
  "factored+relstep": 'chain(lorapro(s, mode="factored"), scale_by_param_block_rms(), '
  "scale_by_learning_rate(lr))",
  "factored+clip+relstep": 'chain(lorapro(s, mode="factored"), clip_by_block_rms(1.0), '
  "scale_by_param_block_rms(), scale_by_learning_rate(lr))",
  "factored_b1_0+clip": 'chain(lorapro(s, mode="factored", b1=0.0), clip_by_block_rms(1.0), '
  "scale_by_learning_rate(lr))",
  "factored_b1_0+clip+relstep": 'chain(lorapro(s, mode="factored", b1=0.0), '
  "clip_by_block_rms(1.0), scale_by_param_block_rms(), scale_by_learning_rate(lr))",
}


MODE_METHODS = ("lora", "efficient", "full", "factored", "factored_b1_0")
ADAFACTOR_METHODS = (
  "factored",
  "factored_b1_0",
  "factored+clip",
  "factored_b1_0+clip",
  "factored+relstep",
  "factored+clip+relstep",
  "factored_b1_0+clip+relstep",
)


_TRAINERS: dict = {}


def trainer(method: str, steps: int, scale: float):
  """Jitted (params0, data, lr) -> losses after 0..steps updates (steps + 1 values)."""
  key = (method, steps, scale)
  if key not in _TRAINERS:

    @jax.jit
    def train(params, data, lr):
      tx = METHODS[method](lr, scale)
      grad_fn = jax.value_and_grad(loss_fn)

      def body(carry, _):
        params, state = carry
        loss, g = grad_fn(params, data, scale)
        u, state = tx.update(g, state, params)
        return (optax.apply_updates(params, u), state), loss

      (params, _), losses = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
      return jnp.append(losses, loss_fn(params, data, scale))

    _TRAINERS[key] = train
  return _TRAINERS[key]


def run(problem: Problem, method: str, lr: float, seeds: Sequence[int], steps: int, b_std=0.0):
  """Loss curves (seeds, steps + 1) and the rank-r floors (seeds,)."""
  train = trainer(method, steps, problem.scale)
  curves, floors = [], []
  for seed in seeds:
    params, data, floor = problem.make(seed, b_std)
    curves.append(np.asarray(train(params, data, jnp.float32(lr)), np.float64))
    floors.append(floor)
  return np.stack(curves), np.asarray(floors)


# --------------------------------------------------------------------------- state bytes


def state_bytes(tx: optax.GradientTransformation, params) -> int:
  shapes = jax.eval_shape(tx.init, params)
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


# (out, in) of one Llama-2-7B layer's adapted matrices
LLAMA_SHAPES = {name: (o, i) for name, i, o in models.MODELS["llama2-7b"].linears}


def abstract_params(shapes: dict[str, tuple[int, int]], rank: int):
  """ShapeDtypeStructs of flax-layout LoRA factors (nothing allocated)."""
  S = jax.ShapeDtypeStruct
  return {
    k: {"lora_a": S((n, rank), jnp.float32), "lora_b": S((rank, m), jnp.float32)}
    for k, (m, n) in shapes.items()
  }


def memory_table(problem: Problem, methods: Sequence[str]) -> dict:
  """State bytes of each method relative to optax.adamw on the LoRA factors."""
  ours = {f"p{k}": s for k, s in enumerate(problem.shapes)}
  cases = {  # (pairs, rank); the ratios of a whole model equal one layer's
    "this problem": (ours, problem.rank),
    "Llama-2-7B layer, r = 8": (LLAMA_SHAPES, 8),
  }
  out = {}
  for case, (shapes, rank) in cases.items():
    params = abstract_params(shapes, rank)
    base = state_bytes(optax.adamw(1e-3), params)
    # The target for the factored mode: AdamW + (m + n) float32 per pair.
    target = base + 4 * sum(m + n for m, n in shapes.values())
    row = {"adamw_bytes": base, "target_bytes": target}
    for m in methods:
      b = state_bytes(METHODS[m](1e-3, 2.0), params)
      row[m] = {"bytes": b, "vs_adamw": b / base}
    out[case] = row
  return out
