"""Optimisation quality of the LoRA-Pro modes on LoRA least-squares problems (issue 11).

    python -m benchmarks.lstsq_quality           # all three studies, a few minutes on 2 CPU cores
    python -m benchmarks.lstsq_quality --smoke   # tiny, for tests

Writes ``benchmarks/results/lstsq_quality.{json,txt}`` (``--out``).

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

Studies:

1. **modes**: LoRA (optax.adamw), LoRA-Pro efficient, full, factored, factored with b1 = 0;
   lr 1e-3, 3e-3, 1e-2; seeds 0-4; 100 steps. Loss at steps 30 and 100 (mean ± std over
   seeds), paired differences factored − full and factored − LoRA, and optimizer-state bytes
   relative to AdamW on the LoRA factors (this problem, and Llama-2-7B r = 8 by eval_shape).
2. **nonzero_b**: efficient mode vs LoRA from B ~ N(0, b_std²), several problems, lrs, seeds
   0-4, 300 steps: paired difference efficient − LoRA at step 300.
3. **adafactor**: factored mode composed with Adafactor's update clipping
   (``optax.clip_by_block_rms(1.0)``) and relative step sizes
   (``optax.scale_by_param_block_rms()``), with and without a first moment (b1 = 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorapro_jax as lpj

RESULTS = Path(__file__).resolve().parent / "results"


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


LLAMA_SHAPES = {  # (out, in) of one Llama-2-7B layer's adapted matrices
  "q": (4096, 4096),
  "k": (4096, 4096),
  "v": (4096, 4096),
  "o": (4096, 4096),
  "gate": (11008, 4096),
  "up": (11008, 4096),
  "down": (4096, 11008),
}


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


# --------------------------------------------------------------------------- statistics


def mean_std(x) -> tuple[float, float]:
  x = np.asarray(x, np.float64)
  return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def at_steps(curves: np.ndarray, steps: Sequence[int]) -> dict[str, list]:
  """Losses at ``steps`` per seed, and the first step with a non-finite loss per seed (None)."""
  out: dict[str, list] = {str(t): curves[:, t].tolist() for t in steps}
  bad = ~np.isfinite(curves)
  out["diverged_at"] = [int(np.argmax(b)) if b.any() else None for b in bad]
  return out


def fmt_run(r: dict, t: int) -> str:
  """Loss at step t, mean ± std, or where the runs diverged."""
  div = [d for d in r.get("diverged_at", []) if d is not None and d <= t]
  if div:
    return f"diverged ({len(div)}/{len(r[str(t)])} seeds; non-finite from step {min(div)})"
  return fmt(mean_std(r[str(t)]))


def fmt(ms, digits=4, sci=False) -> str:
  m, s = ms
  if sci or not abs(m) < 1e3:
    return f"{m:.2e} ± {s:.1e}"
  return f"{m:.{digits}f} ± {s:.{digits}f}"


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
  """a − b per seed: mean, std, and how many seeds have a < b."""
  d = np.asarray(a) - np.asarray(b)
  mean, std = mean_std(d)
  return {"mean": mean, "std": std, "wins": int((d < 0).sum()), "n": len(d)}


def fmt_paired(p: dict) -> str:
  return f"{p['mean']:+.2e} ± {p['std']:.1e} ({p['wins']}/{p['n']})"


# --------------------------------------------------------------------------- the studies


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


def study_modes(problem, lrs, seeds, steps, report_steps, log):
  res = {"problem": problem.describe(), "lrs": list(lrs), "steps": steps, "runs": {}}
  floors = None
  for method in MODE_METHODS:
    for lr in lrs:
      t0 = time.perf_counter()
      curves, floors = run(problem, method, lr, seeds, steps)
      res["runs"][f"{method}@{lr:g}"] = at_steps(curves, report_steps)
      log(
        f"  modes {method:<15} lr {lr:<6g} loss@{steps} {fmt(mean_std(curves[:, -1]))}"
        f"  ({time.perf_counter() - t0:.1f} s)"
      )
  res["floor"], res["floors"] = mean_std(floors), floors.tolist()
  return res


def study_nonzero_b(problems, lrs, b_stds, seeds, steps, log):
  res = {"steps": steps, "lrs": list(lrs), "b_stds": list(b_stds), "problems": {}}
  for problem in problems:
    pr = {"describe": problem.describe(), "runs": {}}
    for b_std in b_stds:
      for lr in lrs:
        t0 = time.perf_counter()
        finals = {}
        for method in ("lora", "efficient"):
          curves, floors = run(problem, method, lr, seeds, steps, b_std)
          finals[method] = curves[:, -1].tolist()
          finals["initial"] = curves[:, 0].tolist()
        finals["floor"] = floors.tolist()
        pr["runs"][f"b_std={b_std:g}@{lr:g}"] = finals
        d = paired(finals["efficient"], finals["lora"])
        log(
          f"  nonzero_b {problem.name:<10} b_std {b_std:<5g} lr {lr:<6g} eff − LoRA "
          f"{fmt_paired(d)}  ({time.perf_counter() - t0:.1f} s)"
        )
    res["problems"][problem.name] = pr
  return res


def study_adafactor(problem, lrs_by_method, seeds, steps, report_steps, log):
  res = {"problem": problem.describe(), "steps": steps, "runs": {}, "lrs": {}}
  for method in ADAFACTOR_METHODS:
    res["lrs"][method] = list(lrs_by_method[method])
    for lr in lrs_by_method[method]:
      t0 = time.perf_counter()
      curves, _ = run(problem, method, lr, seeds, steps)
      res["runs"][f"{method}@{lr:g}"] = at_steps(curves, report_steps)
      log(
        f"  adafactor {method:<27} lr {lr:<6g} loss@{steps} {fmt(mean_std(curves[:, -1]))}"
        f"  ({time.perf_counter() - t0:.1f} s)"
      )
  return res


# --------------------------------------------------------------------------- report


def report_modes(res, mem) -> list[str]:
  runs, lrs, steps = res["runs"], res["lrs"], res["steps"]
  t_early = min(30, steps)
  out = [
    "## 1. Modes (B = 0, LoRA's initialisation)",
    "",
    res["problem"],
    f"Loss after {t_early} and {steps} steps, mean ± std over seeds {res['seeds']}; "
    f"rank-r floor {fmt(res['floor'])}.",
    "",
    f"| method | lr | loss @{t_early} | loss @{steps} | loss − floor @{steps} |",
    "|---|---:|---:|---:|---:|",
  ]
  floors = np.asarray(res["floors"])
  for method in MODE_METHODS:
    for lr in lrs:
      r = runs[f"{method}@{lr:g}"]
      excess = mean_std(np.asarray(r[str(steps)]) - floors)
      out.append(
        f"| {method} | {lr:g} | {fmt_run(r, t_early)} | "
        f"{fmt_run(r, steps)} | {fmt(excess, sci=True)} |"
      )
  out += [
    "",
    "Paired differences (same seed), mean ± std over seeds (seeds where the first is lower):",
    "",
    "| lr | step | factored − full | factored − LoRA | factored − efficient | "
    "factored b1=0 − factored |",
    "|---:|---:|---:|---:|---:|---:|",
  ]
  for lr in lrs:
    for t in (t_early, steps):
      get = lambda m, lr=lr, t=t: runs[f"{m}@{lr:g}"][str(t)]
      cells = [
        fmt_paired(paired(get("factored"), get(other))) for other in ("full", "lora", "efficient")
      ]
      cells.append(fmt_paired(paired(get("factored_b1_0"), get("factored"))))
      out.append(f"| {lr:g} | {t} | " + " | ".join(cells) + " |")
  out += [
    "",
    "Optimizer-state bytes relative to optax.adamw on the LoRA factors "
    "(jax.eval_shape of init, all state arrays):",
    "",
    "| case | AdamW bytes | " + " | ".join(MODE_METHODS) + " | target (AdamW + (m + n) f32) |",
    "|---|---:|" + "---:|" * (len(MODE_METHODS) + 1),
  ]
  for case, row in mem.items():
    cells = [f"{row[m]['vs_adamw']:.3f}×" for m in MODE_METHODS]
    cells.append(f"{row['target_bytes'] / row['adamw_bytes']:.3f}×")
    out.append(f"| {case} | {row['adamw_bytes']:,} | " + " | ".join(cells) + " |")
  return out


def report_nonzero_b(res) -> list[str]:
  out = [
    "## 2. Efficient mode vs LoRA from a non-zero B",
    "",
    f"B ~ N(0, b_std²), {res['steps']} steps, seeds {res['seeds']}. Cells: loss at step "
    f"{res['steps']} of LoRA and efficient mode (mean ± std), and the paired difference "
    "efficient − LoRA (mean ± std, seeds where efficient is lower).",
    "",
  ]
  for pr in res["problems"].values():
    out.append(f"* {pr['describe']}")
  out += [
    "",
    "| problem | b_std | lr | floor | LoRA | efficient | efficient − LoRA |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for name, pr in res["problems"].items():
    for key, r in pr["runs"].items():
      b_std, lr = key.removeprefix("b_std=").split("@")
      out.append(
        f"| {name} | {b_std} | {lr} | {mean_std(r['floor'])[0]:.5f} | "
        f"{fmt(mean_std(r['lora']), 5)} | {fmt(mean_std(r['efficient']), 5)} | "
        f"{fmt_paired(paired(r['efficient'], r['lora']))} |"
      )
  return out


def report_adafactor(res, modes) -> list[str]:
  runs, steps = res["runs"], res["steps"]
  t_early = min(30, steps)
  out = [
    "## 3. Adafactor's update clipping and relative step size, b1 = 0",
    "",
    res["problem"],
    "Each composition at every lr of its grid; paired differences against the factored mode "
    "at the same lr where it ran, else at the factored mode's best lr (by mean loss at the "
    f"last step, {modes['lrs']}).",
    "",
    f"| method | lr | loss @{t_early} | loss @{steps} | − factored @{t_early} | "
    f"− factored @{steps} |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  fact_lrs = res["lrs"]["factored"]
  best_fact = min(fact_lrs, key=lambda lr: np.mean(runs[f"factored@{lr:g}"][str(steps)]))
  for method in ADAFACTOR_METHODS:
    for lr in res["lrs"][method]:
      r = runs[f"{method}@{lr:g}"]
      ref_lr = lr if lr in fact_lrs else best_fact
      ref = runs[f"factored@{ref_lr:g}"]
      diffs = (
        ["—", "—"]
        if method == "factored"
        else [
          fmt_paired(paired(r[str(t)], ref[str(t)])) + (f" vs {ref_lr:g}" if ref_lr != lr else "")
          for t in (t_early, steps)
        ]
      )
      if any(d is not None for d in r["diverged_at"]):
        diffs = ["—", "—"]
      out.append(
        f"| {method} | {lr:g} | {fmt_run(r, t_early)} | {fmt_run(r, steps)} | "
        f"{diffs[0]} | {diffs[1]} |"
      )
  return out


# --------------------------------------------------------------------------- main


def _git_commit() -> str | None:
  try:
    return subprocess.run(
      ["git", "rev-parse", "HEAD"],
      capture_output=True,
      text=True,
      check=True,
      cwd=Path(__file__).resolve().parent,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def device_label() -> str:
  d = jax.devices()[0]
  return f"{d.device_kind} ({d.platform}), {os.cpu_count()} CPU cores, {platform.machine()}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny problem, 2 seeds, few steps")
  p.add_argument("--out", default=str(RESULTS / "lstsq_quality"), help="path without suffix")
  p.add_argument("--studies", default="modes,nonzero_b,adafactor")
  a = p.parse_args(argv)
  studies = set(a.studies.split(","))
  log = lambda s: print(s, flush=True)

  main_problem = Problem("main")
  seeds, lrs = (0, 1, 2, 3, 4), (1e-3, 3e-3, 1e-2)
  steps, steps_b = 100, 300
  nz_problems = [
    main_problem,
    Problem("r8", rank=8, target_rank=16),
    Problem("toy-like", target_rank=4, sv_min=0.01, noise=0.0),
    Problem("batch-X", n_inputs=256),
    Problem("wide", shapes=((256, 128), (128, 256)), rank=2),
  ]
  b_stds = (0.02, 0.3)
  relstep_lrs = (1e-2, 3e-2, 1e-1, 3e-1)
  if a.smoke:
    main_problem = Problem("smoke", shapes=((12, 8), (8, 10)), rank=2, target_rank=4)
    seeds, lrs, steps, steps_b = (0, 1), (3e-3,), 12, 12
    nz_problems, b_stds, relstep_lrs = [main_problem], (0.02,), (3e-2,)

  t_all = time.perf_counter()
  results = {
    "device": device_label(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "commit": _git_commit(),
    "methods": CODE,
    "dtype": "float32",
  }
  text = [
    "# LoRA least squares: LoRA-Pro modes (benchmarks/lstsq_quality.py)",
    "",
    f"Device: {results['device']}; jax {jax.__version__}, optax {optax.__version__}; "
    f"commit {results['commit']}.",
    "Methods: " + "; ".join(f"{k} = `{v}`" for k, v in CODE.items()) + ".",
    "",
  ]
  if "modes" in studies:
    log(main_problem.describe())
    res = study_modes(main_problem, lrs, seeds, steps, sorted({min(30, steps), steps}), log)
    res["seeds"] = list(seeds)
    mem = memory_table(main_problem, MODE_METHODS)
    results["modes"], results["memory"] = res, mem
    text += report_modes(res, mem) + [""]
  if "nonzero_b" in studies:
    res = study_nonzero_b(nz_problems, lrs, b_stds, seeds, steps_b, log)
    res["seeds"] = list(seeds)
    results["nonzero_b"] = res
    text += report_nonzero_b(res) + [""]
  if "adafactor" in studies:
    lrs_by = {m: (relstep_lrs if "relstep" in m else lrs) for m in ADAFACTOR_METHODS}
    res = study_adafactor(main_problem, lrs_by, seeds, steps, sorted({min(30, steps), steps}), log)
    res["seeds"] = list(seeds)
    results["adafactor"] = res
    modes = results.get("modes", {"lrs": list(lrs)})
    text += report_adafactor(res, modes) + [""]
  results["wall_s"] = time.perf_counter() - t_all
  text.append(f"Wall time {results['wall_s']:.0f} s.")
  out = Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(results, indent=1))
  out.with_suffix(".txt").write_text("\n".join(text) + "\n")
  log("\n".join(text))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
