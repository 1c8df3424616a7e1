"""The study's results files from ``runs.jsonl``: ``study_summary.json``,
``tables.md`` and the figures (``lr_sensitivity.png``, ``tangent.png``).

Statistics: mean ± sample std over seeds; differences are paired by seed
(method − LoRA, so negative is better for a loss); "t" is the paired t
statistic mean / (std / √n). A method is called better or worse than LoRA only
when every seed agrees and |t| exceeds the two-sided 5% point of Student's t
(2.776 at 5 seeds, 4.303 at 3); otherwise the difference is within the noise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from examples.minilm import study
from examples.minilm.experiment import LABELS

METRICS = ("train_loss", "val_loss", "val_mrr", "test_mrr")
METRIC_LABELS = {
  "train_loss": "fixed-set train loss",
  "val_loss": "validation loss",
  "val_mrr": "validation MRR",
  "test_mrr": "test MRR",
}
T_CRIT = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365}
ARM_LABELS = {a.name: LABELS[a.method] for a in study.COMPETITORS} | {
  "full_ft_kernels": "Full FT, kernels only",
  "lora_extra": "LoRA + biases/LayerNorms",
  "lorapro_fact_extra": "LoRA-Pro (factored) + biases/LayerNorms",
  "lora_r8": "LoRA, r = 8",
  "lora_x4": "LoRA, 4× the steps",
  "lora_long": f"LoRA, {study.LONG_FACTOR}× the steps",
}
ARM_LABELS |= {a.name: "teacher task: " + LABELS[a.method] for a in study.TEACHER}


def _lr_key(lr: float) -> str:
  return f"{lr:g}"


def verdict(p: dict, lower_is_better: bool) -> str:
  """'better', 'worse' or 'within noise' than LoRA, from a paired difference."""
  n, t = p["n"], p["t"]
  if n < 2 or not math.isfinite(t):
    return "n/a"
  agree = p["below"] if t < 0 else n - p["below"]
  if agree < n or abs(t) < T_CRIT.get(n, 2.0):
    return "within noise"
  return "better" if (t < 0) == lower_is_better else "worse"


def arm_block(store: study.Store, arm: str, lr: float, seeds: Sequence[int], ref: dict | None):
  """Per-seed finals, mean ± std and the paired difference against ``ref`` (LoRA's block)."""
  runs = {r["seed"]: r for r in store.of(arm, lr) if r["seed"] in seeds}
  got = sorted(runs)
  per_seed = {m: {str(s): study.final(runs[s], m) for s in got} for m in METRICS}
  out = {"arm": arm, "lr": lr, "seeds": got, "per_seed": per_seed, "commits": []}
  out["commits"] = sorted({runs[s].get("commit", "?") for s in got})
  out["mean_std"] = {
    m: [float(np.mean(list(v.values()))), float(np.std(list(v.values()), ddof=1))]
    if len(v) > 1
    else [float(np.mean(list(v.values()) or [math.nan])), math.nan]
    for m, v in per_seed.items()
  }
  if ref is not None and ref["arm"] != arm:
    common = [s for s in got if str(s) in ref["per_seed"]["train_loss"]]
    out["vs_lora"] = {}
    for m in METRICS:
      p = study.paired(
        [per_seed[m][str(s)] for s in common], [ref["per_seed"][m][str(s)] for s in common]
      )
      p["verdict"] = verdict(p, m.endswith("loss"))
      out["vs_lora"][m] = p
  return out


def grid_block(store: study.Store, arm: study.Arm) -> dict:
  runs = {_lr_key(r["lr"]): r for r in store.of(arm.name) if r["seed"] == 0}
  chosen = study.chosen_lr(store, arm)
  return {
    "grid": list(arm.grid),
    "chosen_lr": chosen,
    "selection": "lowest fixed-set train loss, seed 0",
    "interior": chosen is not None and chosen not in (arm.grid[0], arm.grid[-1]),
    "seed0": {
      _lr_key(lr): {m: study.final(runs[_lr_key(lr)], m) for m in METRICS}
      for lr in arm.grid
      if _lr_key(lr) in runs
    },
  }


def protocol(store: study.Store, arms: Sequence[study.Arm], seeds, lr_of, grids=True) -> dict:
  """Each arm at ``lr_of(arm)``, with its grid (``grids``: the lr is its own choice)."""
  lora = next(a for a in arms if a.method == "lora")
  ref = arm_block(store, lora.name, lr_of(lora), seeds, None) if lr_of(lora) else None
  out = {}
  for a in arms:
    lr = lr_of(a)
    if lr is None:
      continue
    out[a.name] = (grid_block(store, a) if grids else {}) | arm_block(store, a.name, lr, seeds, ref)
  return out


def closure(block: dict, lora: dict, target: dict, key: str = "train_loss") -> list[float] | None:
  """Per seed, the share of LoRA's gap to ``target`` that ``block`` closes."""
  s = [
    k for k in block["per_seed"][key] if k in lora["per_seed"][key] and k in target["per_seed"][key]
  ]
  if not s:
    return None
  out = []
  for k in s:
    gap = lora["per_seed"][key][k] - target["per_seed"][key][k]
    out.append((lora["per_seed"][key][k] - block["per_seed"][key][k]) / gap if gap else math.nan)
  return out


def summarize(out: Path) -> dict:
  store = study.Store(Path(out) / "runs.jsonl")
  lrs = {a.name: study.chosen_lr(store, a) for a in study.COMPETITORS}
  s: dict = {
    "setting": dict(study.SETTING)
    | {"batch": 16, "query_len": 32, "doc_len": 64, "eval_train_pairs": 512},
    "seeds": list(study.SEEDS),
    "commits": sorted({r.get("commit", "?") for r in store.runs}),
    "runs": len(store.runs),
    "statistics": __doc__.split("Statistics: ")[1].strip(),
  }
  s["own_lr"] = protocol(store, study.COMPETITORS, study.SEEDS, lambda a: lrs[a.name])
  vlrs = {a.name: study.chosen_lr(store, a, key="val_loss") for a in study.COMPETITORS}
  held = [a for a in study.COMPETITORS if a.name in study.HELDOUT_ARMS]
  if all(vlrs[a.name] for a in held):
    s["own_lr_validation"] = protocol(store, held, study.SEEDS, lambda a: vlrs[a.name], grids=False)
  if lrs["full_ft"]:
    s["paper_lr"] = protocol(
      store, study.COMPETITORS, study.PAPER_SEEDS, lambda a: lrs["full_ft"], grids=False
    )
  own = s["own_lr"]
  if "lora" in own and "full_ft" in own:
    ref = own["lora"]
    s["decomposition"] = {}
    for name, arm, parent in study.DECOMP:
      if lrs[parent] and store.of(arm.name, lrs[parent]):
        b = arm_block(store, name, lrs[parent], study.DECOMP_SEEDS, ref)
        b["closure_of_full_ft_gap"] = closure(b, ref, own["full_ft"])
        s["decomposition"][name] = b
    for b in own.values():
      b["closure_of_full_ft_gap"] = closure(b, ref, own["full_ft"])
  long_runs = store.of(study.CAPACITY.name)
  if long_runs:
    s["capacity"] = {
      _lr_key(r["lr"]): {
        "seed": r["seed"],
        **{k: r["fixed_eval"].get(k) for k in ("step", *METRICS[:3])},
      }
      for r in long_runs
    }
    plateau = min(study.final(r, "train_loss") for r in long_runs)
    s["capacity_plateau_train_loss"] = plateau
    if "lora" in own:
      lo = own["lora"]["mean_std"]["train_loss"][0]
      s["optimisation_gap_closure"] = {
        name: (lo - b["mean_std"]["train_loss"][0]) / (lo - plateau) for name, b in own.items()
      }
  teach = [a for a in study.TEACHER if study.chosen_lr(store, a)]
  if teach:
    tlr = {a.name: study.chosen_lr(store, a) for a in teach}
    s["teacher"] = protocol(store, teach, study.TEACHER_SEEDS, lambda a: tlr.get(a.name))
    tpath = Path(out) / "teacher.json"
    if tpath.exists():
      s["teacher_info"] = json.loads(tpath.read_text())
  s["tangent"] = tangent(store)
  spath = Path(out) / "full_ft_spectrum.json"
  if spath.exists():
    s["full_ft_spectrum"] = spectrum_means(json.loads(spath.read_text()))
  return s


def tangent(store: study.Store) -> dict:
  """Per probe arm: the share ‖P_T g‖²/‖g‖² of the full-FT gradient g in the LoRA
  tangent space at the run's (A, B), averaged over the layers and targets, per probe step.

  LoRA-Pro's equivalent gradient is that projection (Theorem 2.1), so the share
  is 1 − d_adj²/‖g‖² from the probe's distance d_adj.
  """
  out = {}
  for name in study.ARMS:
    if "_probe_r" not in name:
      continue
    for r in store.of(name):
      steps, share = [], []
      for p in r.get("probes", []):
        g = np.asarray(p["g_norm"]) ** 2
        d = np.asarray(p["d_adj"]) ** 2
        steps.append(p["step"])
        share.append(float(np.mean(1 - d / np.maximum(g, 1e-30))))
      out[name] = {"rank": r["rank"], "lr": r["lr"], "step": steps, "share": share}
  return out


def spectrum_means(spec: dict) -> dict:
  """Mean over kernels of the top-r energy shares, per recorded step."""
  out = {"ranks": spec["ranks"], "step": spec["step"], "lr": spec.get("lr")}
  for key in ("update", "delta"):
    out[key] = [np.mean(np.asarray(list(rec.values())), axis=0).tolist() for rec in spec[key]]
  return out


# --------------------------------------------------------------------------- tables


def _ms(ms: Sequence[float], digits: int = 4) -> str:
  m, s = ms
  if not math.isfinite(m):
    return "diverged"
  return f"{m:.{digits}f} ± {s:.{digits}f}" if math.isfinite(s) else f"{m:.{digits}f}"


def _diff(p: dict) -> str:
  if not math.isfinite(p["mean"]):
    return "diverged"
  return f"{p['mean']:+.4f} ± {p['std']:.4f} (t {p['t']:+.1f}, {p['below']}/{p['n']} below; {p['verdict']})"


def protocol_table(block: dict, title: str) -> list[str]:
  lines = [f"### {title}", ""]
  head = "| method | lr | interior | " + " | ".join(METRIC_LABELS[m] for m in METRICS)
  lines += [head + " | Δ train loss vs LoRA | Δ validation loss vs LoRA | Δ test MRR vs LoRA |"]
  lines += ["|" + "---|" * (len(METRICS) + 6)]
  for name, b in block.items():
    interior = {True: "yes", False: "**no**", None: "—"}[b.get("interior")]
    row = [ARM_LABELS.get(name, name), f"{b['lr']:g}", interior]
    row += [_ms(b["mean_std"][m]) for m in METRICS]
    vs = b.get("vs_lora")
    row += [_diff(vs[m]) for m in ("train_loss", "val_loss", "test_mrr")] if vs else ["—"] * 3
    lines.append("| " + " | ".join(row) + " |")
  n = max((len(b["seeds"]) for b in block.values()), default=0)
  lines += ["", f"Seeds: {n} per row (see the per-seed values in study_summary.json).", ""]
  return lines


def grid_table(block: dict, title: str) -> list[str]:
  grid = sorted({lr for b in block.values() for lr in b["seed0"]}, key=float)
  lines = [f"### {title}", "", "| method | " + " | ".join(grid) + " |"]
  lines.append("|" + "---|" * (len(grid) + 1))
  for name, b in block.items():
    cells = []
    for lr in grid:
      v = b["seed0"].get(lr)
      if v is None:
        cells.append("")
        continue
      c = (
        "diverged"
        if not math.isfinite(v["train_loss"])
        else f"{v['train_loss']:.4f} / {v['val_loss']:.4f}"
      )
      cells.append(f"**{c}**" if b["chosen_lr"] and float(lr) == b["chosen_lr"] else c)
    lines.append(f"| {ARM_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
  return lines + [
    "",
    "Cells: fixed-set train loss / validation loss, seed 0; bold: the chosen lr.",
    "",
  ]


def tables(s: dict) -> str:
  lines = [
    "# Study tables (generated by `python -m examples.minilm.run_study --summarize-only`)",
    "",
  ]
  lines += [f"Runs: {s['runs']}; commits: {', '.join(c[:8] for c in s['commits'])}.", ""]
  if s.get("own_lr"):
    lines += grid_table(s["own_lr"], "Learning-rate grids (protocol c)")
    lines += protocol_table(s["own_lr"], "Protocol (a): each method at its own tuned lr")
  if s.get("own_lr_validation"):
    title = "Protocol (a), lr chosen on validation loss instead (seed 0)"
    lines += protocol_table(s["own_lr_validation"], title)
  if s.get("paper_lr"):
    lines += protocol_table(s["paper_lr"], "Protocol (b): every method at full FT's tuned lr")
  if s.get("decomposition"):
    lines += protocol_table(s["decomposition"], "Decomposition of the full-FT gap")
    lines += ["Share of the LoRA − full FT gap (fixed-set train loss) closed, per seed:", ""]
    for name, b in {**s["own_lr"], **s["decomposition"]}.items():
      c = b.get("closure_of_full_ft_gap")
      if c and name not in ("lora", "full_ft"):
        lines.append(f"- {ARM_LABELS.get(name, name)}: {np.mean(c):+.2f} ± {np.std(c, ddof=1):.2f}")
    lines.append("")
  if s.get("capacity"):
    lines += ["### Capacity: long LoRA runs (seed 0)", ""]
    for lr, c in s["capacity"].items():
      pts = ", ".join(f"{st}: {v:.4f}" for st, v in zip(c["step"], c["train_loss"]))
      lines.append(f"- lr {lr}: fixed-set train loss by step: {pts}")
    lines += [
      "",
      f"Plateau estimate (lowest long-run loss): {s['capacity_plateau_train_loss']:.4f}.",
      "",
    ]
    if s.get("optimisation_gap_closure"):
      lines += ["Share of the optimisation gap (LoRA at T − plateau) closed, on the means:", ""]
      for name, v in s["optimisation_gap_closure"].items():
        lines.append(f"- {ARM_LABELS.get(name, name)}: {v:+.2f}")
      lines.append("")
  if s.get("teacher"):
    lines += grid_table(s["teacher"], "Teacher task: learning-rate grids")
    lines += protocol_table(s["teacher"], "Teacher task: each method at its own tuned lr")
  if s.get("tangent"):
    lines += ["### Share of the full-FT gradient in the LoRA tangent space", ""]
    lines += ["| run | rank | mean share over probes | first → last |", "|---|---|---|---|"]
    for name, t in s["tangent"].items():
      if t["share"]:
        lines.append(
          f"| {name} | {t['rank']} | {np.mean(t['share']):.3f} | {t['share'][0]:.3f} → {t['share'][-1]:.3f} |"
        )
    lines.append("")
  if s.get("full_ft_spectrum"):
    sp = s["full_ft_spectrum"]
    lines += ["### Full FT's updates: share of ‖·‖² in the top-r singular directions", ""]
    lines += ["| step | " + " | ".join(f"r={r} step / delta" for r in sp["ranks"]) + " |"]
    lines.append("|" + "---|" * (len(sp["ranks"]) + 1))
    for st, u, d in zip(sp["step"], sp["update"], sp["delta"]):
      lines.append(f"| {st} | " + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(u, d)) + " |")
    lines.append("")
  return "\n".join(lines)


def figures(s: dict, out: Path) -> list[Path]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  for key, fname, title in (
    ("own_lr", "lr_sensitivity.png", "code search"),
    ("teacher", "teacher_lr_sensitivity.png", "teacher task"),
  ):
    if not s.get(key):
      continue
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, b in s[key].items():
      lrs = sorted(b["seed0"], key=float)
      for ax, m in zip(axes, ("train_loss", "val_loss")):
        ys = [b["seed0"][lr][m] for lr in lrs]
        ax.plot(
          [float(x) for x in lrs],
          [y if math.isfinite(y) else np.nan for y in ys],
          "o-",
          label=ARM_LABELS.get(name, name),
        )
    for ax, m in zip(axes, ("train_loss", "val_loss")):
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_xlabel("peak learning rate")
      what = METRIC_LABELS[m] if key == "own_lr" else f"{m.split('_')[0]} distance to the teacher"
      ax.set_ylabel(what + " (seed 0)")
      ax.grid(alpha=0.3)
    axes[0].set_title(f"MiniLM {title}: final loss against lr")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    p = out / fname
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
  if s.get("tangent"):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, t in s["tangent"].items():
      if t["share"]:
        ax.plot(t["step"], t["share"], "o-" if "fact" in name else "s--", label=f"{name}")
    ax.set_xlabel("step")
    ax.set_ylabel("‖P_T g‖² / ‖g‖²")
    ax.set_title("Full-FT gradient's share in the LoRA tangent space")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = out / "tangent.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
  return paths


def write(out: Path, summary_path: Path | None = None) -> list[Path]:
  """The results files of the runs in ``out``; the summary at ``summary_path``
  (default ``out/study_summary.json``)."""
  out = Path(out)
  if not (out / "runs.jsonl").exists():
    return []
  s = summarize(out)
  p1 = Path(summary_path or out / "study_summary.json")
  p1.write_text(json.dumps(s, indent=1, default=float))
  p2 = out / "tables.md"
  p2.write_text(tables(s))
  return [p1, p2, *figures(s, out)]
