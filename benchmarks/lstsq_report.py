"""The tables of `benchmarks.lstsq_quality`: statistics over seeds and the three reports."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from benchmarks.lstsq_problem import ADAFACTOR_METHODS, MODE_METHODS

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
