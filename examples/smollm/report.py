"""Results files (one JSON record per line, appended after every run) and their tables.

Each method's learning rate is the one with the lowest mean validation loss over seeds;
test loss and exact match are reported at that lr as mean ± sample std over seeds, and
against LoRA as paired differences (same seed: same adapter initialisation and batches).
A difference counts only when its 95% t-interval excludes zero.
"""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from examples.minilm.study_report import T_CRIT  # two-sided 95% t quantiles by n
from examples.smollm.train import LABELS


def commit() -> str:
  """The repository's HEAD, with ``+dirty`` when ``examples/smollm`` has uncommitted code."""
  root = Path(__file__).resolve().parents[2]
  run = lambda *a: subprocess.run(a, cwd=root, capture_output=True, text=True).stdout.strip()
  head = run("git", "rev-parse", "--short=12", "HEAD") or "unknown"
  dirty = run("git", "status", "--porcelain", "--", "examples/smollm/")
  changed = [ln for ln in dirty.splitlines() if ln.endswith(".py")]  # code, not results or prose
  return head + ("+dirty" if changed else "")


def load(path: str | Path) -> list[dict]:
  p = Path(path)
  if not p.is_file():
    return []
  return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def append(path: str | Path, record: dict) -> None:
  p = Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  with p.open("a", encoding="utf-8") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")


def key(record: dict) -> tuple:
  """What makes two records the same run (so a resumed study skips it)."""
  return (record["method"], record.get("lr"), record.get("seed"), record["config_key"])


def _mean_std(xs) -> str:
  xs = np.asarray(xs, float)
  std = xs.std(ddof=1) if len(xs) > 1 else float("nan")
  return f"{xs.mean():.4f} ± {std:.4f}"


def by_method(runs: Iterable[dict]) -> dict[str, dict[float, dict[int, dict]]]:
  out: dict = defaultdict(lambda: defaultdict(dict))
  for r in runs:
    if r["method"] != "zero_shot":
      out[r["method"]][r["lr"]][r["seed"]] = r
  return out


def choose_lrs(runs: Iterable[dict]) -> dict[str, dict]:
  """Per method: the grid, the mean validation loss per lr, the chosen lr and whether it is
  interior to the grid."""
  out = {}
  for method, grid in by_method(runs).items():
    # The main command evaluates test only: its single lr per method needs no choice.
    val = {
      lr: float(np.mean([s.get("validation", {}).get("loss", np.nan) for s in seeds.values()]))
      for lr, seeds in grid.items()
    }
    lrs = sorted(val)
    best = lrs[0] if len(lrs) == 1 else min(lrs, key=val.get)
    out[method] = {"grid": lrs, "val_loss": val, "lr": best, "interior": lrs[0] < best < lrs[-1]}
  return out


def summarize(runs: list[dict], split: str = "test") -> list[dict]:
  """One row per method at its chosen lr, with paired differences against LoRA."""
  chosen, grid = choose_lrs(runs), by_method(runs)
  rows = []
  zero = [r for r in runs if r["method"] == "zero_shot" and split in r]
  if zero:
    z = zero[-1][split]
    rows.append(
      {"method": "zero_shot", "loss": f"{z['loss']:.4f}", "em": f"{z['em']:.3f}", "seeds": []}
    )
  base = grid["lora"][chosen["lora"]["lr"]] if "lora" in chosen else {}
  for method in (m for m in LABELS if m in chosen):
    seeds = grid[method][chosen[method]["lr"]]
    ss = sorted(seeds)
    row = {
      "method": method,
      "lr": chosen[method]["lr"],
      "interior": chosen[method]["interior"],
      "grid": chosen[method]["grid"],
      "seeds": ss,
      "loss": _mean_std([seeds[s][split]["loss"] for s in ss]),
      "em": _mean_std([seeds[s][split]["em"] for s in ss]),
    }
    paired = [s for s in ss if s in base]
    if method != "lora" and len(paired) >= 2:
      d = np.array([seeds[s][split]["loss"] - base[s][split]["loss"] for s in paired])
      e = np.array([seeds[s][split]["em"] - base[s][split]["em"] for s in paired])
      half = T_CRIT.get(len(d), 2.0) * d.std(ddof=1) / np.sqrt(len(d))
      verdict = "within noise" if abs(d.mean()) <= half else ("better" if d.mean() < 0 else "worse")
      row |= {
        "d_loss": _mean_std(d),
        "d_em": _mean_std(e),
        "ci95": f"±{half:.4f}",
        "verdict": verdict,
      }
    rows.append(row)
  return rows


def format_table(rows: list[dict], split: str = "test") -> str:
  head = (
    f"| method | lr (grid) | seeds | {split} loss | {split} exact match | Δ loss vs LoRA (paired) "
    "| Δ exact match | loss verdict (95% t) |"
  )
  lines = [head, "|---|---|---|---:|---:|---:|---:|---|"]
  for r in rows:
    if r["method"] == "zero_shot":
      lines.append(f"| {LABELS['zero_shot']} | - | - | {r['loss']} | {r['em']} | | | |")
      continue
    grid = ", ".join(f"{x:g}" for x in r["grid"])
    edge = "" if r["interior"] or len(r["grid"]) == 1 else " (edge)"
    lines.append(
      f"| {LABELS[r['method']]} | {r['lr']:g}{edge} ({grid}) | {','.join(map(str, r['seeds']))} "
      f"| {r['loss']} | {r['em']} | {r.get('d_loss', '')} | {r.get('d_em', '')} "
      f"| {r.get('verdict', '')} {r.get('ci95', '')} |"
    )
  return "\n".join(lines)


def format_grid(runs: list[dict]) -> str:
  """Mean validation loss (seeds) at every lr of every method."""
  lines = [
    "| method | lr | seeds | validation loss | validation exact match |",
    "|---|---:|---|---:|---:|",
  ]
  for method, grid in by_method(runs).items():
    for lr in sorted(grid):
      seeds = grid[lr]
      ss = sorted(seeds)
      lines.append(
        f"| {LABELS[method]} | {lr:g} | {','.join(map(str, ss))} "
        f"| {_mean_std([seeds[s]['validation']['loss'] for s in ss])} "
        f"| {_mean_std([seeds[s]['validation']['em'] for s in ss])} |"
      )
  return "\n".join(lines)
