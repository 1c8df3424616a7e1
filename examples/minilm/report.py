"""Report of the MiniLM comparison: lr choice and result table, merging of
earlier ``results.json`` files, captions and the output files."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from examples.minilm.experiment import DEFAULT_LRS, LABELS, METHODS, Config


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


def config_caption(cfg: Config, n_train: int | None = None, device: str | None = None) -> str:
  return (
    f"{device or device_label()}. Top {cfg.train_layers}/6 layers trained, r={cfg.rank}, alpha={cfg.alpha:g}, "
    f"{cfg.steps} steps, batch {cfg.batch}, query/doc tokens {cfg.query_len}/{cfg.max_len}, "
    f"AdamW wd={cfg.weight_decay:g}, warmup {cfg.warmup_ratio:g} + cosine, "
    f"seeds {','.join(map(str, cfg.seeds))}"
    + (f", {n_train} train pairs" if n_train else "")
    + (f"; LoRA, long: {cfg.run_steps('lora_long')} steps" if "lora_long" in cfg.methods else "")
    + (
      f"; fixed evaluation set: {cfg.eval_train_pairs} train pairs + validation"
      + (f", every {cfg.eval_every} steps" if cfg.eval_every else "")
      if cfg.fixed_eval
      else ""
    )
  )


def describe_lrs(cfg: Config) -> str:
  """Each trained method's learning rates and how they are chosen."""
  lines = []
  for m in (m for m in cfg.methods if m != "zero_shot"):
    how = "chosen on validation MRR" if cfg.select_on_validation else "given"
    if not cfg.select_on_validation and cfg.lrs[m] == (DEFAULT_LRS.get(m),):
      how = "pre-chosen from the validation sweep in examples/minilm/RESULTS.md"
    lines.append(f"  {LABELS[m]:<21} lr {', '.join(f'{x:g}' for x in cfg.lrs[m])} ({how})")
  return "\n".join(lines)


def table_heading(cfg: Config, n_test: int) -> str:
  seeds = f"mean ± std over seeds {list(cfg.seeds)}" if len(cfg.seeds) > 1 else ""
  seeds = seeds or f"seed {cfg.seeds[0]}"
  lrs = (
    "lr chosen on validation MRR" if cfg.select_on_validation else "lr pre-chosen (one per method)"
  )
  return f"Test retrieval ({n_test} held-out pairs), {seeds}, {lrs}:"


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
    for key in ("train_loss", "val_loss", "val_mrr"):
      vals = [r["fixed_eval"][key][-1] for r in chosen if r.get("fixed_eval")]
      row["fixed_" + key] = _mean_std(vals) if vals else None
    rows.append(row)
  return rows


# --------------------------------------------------------------------------- gap closure

CLOSURE_METHODS = ("rslora", "lorapro_eff", "lorapro_full", "lorapro_fact")
CLOSURE_TARGETS = ("full_ft", "lora_long")


def final_fixed(runs: Sequence[dict], rows: Sequence[dict], key: str) -> dict[str, dict]:
  """{method: {seed: last fixed-set ``key``}} of each method's chosen-lr runs."""
  chosen = {row["method"]: row["lr"] for row in rows}
  out: dict[str, dict] = {}
  for r in runs:
    m = r["method"]
    if m in chosen and r["lr"] == chosen[m] and r.get("fixed_eval") and r["seed"] is not None:
      out.setdefault(m, {})[r["seed"]] = r["fixed_eval"][key][-1]
  return out


def gap_closure(runs: Sequence[dict], rows: Sequence[dict], key: str = "train_loss") -> dict | None:
  """How much of the LoRA → target gap in the final fixed-set ``key`` each method
  closes, paired by seed: closure = (L_LoRA − L_method) / (L_LoRA − L_target) per
  seed, mean ± std over the seeds every run has; targets full FT and the long LoRA
  run. Also the gaps themselves and the paired differences L_method − L_LoRA.
  None without LoRA runs or targets."""
  final = final_fixed(runs, rows, key)
  targets = [t for t in CLOSURE_TARGETS if t in final]
  if "lora" not in final or not targets:
    return None
  out: dict[str, Any] = {"key": key, "targets": {}, "methods": {}}
  for t in targets:
    seeds = sorted(set(final["lora"]) & set(final[t]))
    gap = [final["lora"][s] - final[t][s] for s in seeds]
    mean, std = _mean_std(gap)
    out["targets"][t] = {
      "gap": (mean, std),
      "seeds": seeds,
      "gap_over_std": mean / std if std else None,
    }
  for m in CLOSURE_METHODS + tuple(t for t in targets if t != "full_ft"):
    if m not in final:
      continue
    seeds = sorted(set(final["lora"]) & set(final[m]))
    entry = {"seeds": seeds, "diff": _mean_std([final[m][s] - final["lora"][s] for s in seeds])}
    for t in targets:
      ss = [s for s in seeds if s in final[t]]
      if m == t or not ss:
        continue
      c = [(final["lora"][s] - final[m][s]) / (final["lora"][s] - final[t][s]) for s in ss]
      entry["closure_" + t] = _mean_std(c)
    out["methods"][m] = entry
  return out


def format_closure(closure: dict) -> str:
  """The gap-closure table (markdown)."""
  targets = list(closure["targets"])
  key = {"train_loss": "fixed train-pair loss", "val_loss": "validation loss"}.get(
    closure["key"], closure["key"]
  )
  lines = [
    f"Gap closure on the {key} (paired by seed; ± std over seeds; — where the LoRA → target "
    "gap is under 2 std of its paired seed differences):",
    "",
  ]
  for t, g in closure["targets"].items():
    ratio = f", {g['gap_over_std']:.1f} std" if g["gap_over_std"] else ""
    lines.append(
      f"* LoRA − {LABELS[t]}: {g['gap'][0]:.4f} ± {g['gap'][1]:.4f}{ratio} (seeds {g['seeds']})"
    )
  head = ["Method", "loss − LoRA's"] + [f"closure vs {LABELS[t]} (%)" for t in targets]
  lines += [
    "",
    "| " + " | ".join(head) + " |",
    "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
  ]
  for m, e in closure["methods"].items():
    cells = [LABELS[m], f"{e['diff'][0]:+.4f} ± {e['diff'][1]:.4f}"]
    for t in targets:
      c, g = e.get("closure_" + t), closure["targets"][t]["gap_over_std"]
      if c is not None and not (g and abs(g) >= 2):  # a gap within the noise: no closure
        c = None
      cells.append("—" if c is None else f"{100 * c[0]:.0f} ± {100 * c[1]:.0f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def format_table(rows: Sequence[dict], markdown: bool = False) -> str:
  def cell(ms, pct=True, digits=1):
    if ms is None:
      return "—"
    m, s = ms
    f = 100.0 if pct else 1.0
    txt = f"{m * f:.{digits}f}"
    return txt + (f" ± {s * f:.{digits}f}" if s else "")

  fixed = any(r.get("fixed_train_loss") for r in rows)
  head = ["Method", "R@1 (%)", "R@5 (%)", "MRR (%)", "final train loss", "vs zero-shot"]
  head += ["fixed-set train loss", "validation loss"] if fixed else []
  head += ["lr", "trainable params", "seeds"]
  body = []
  for r in rows:
    cells = [
      r["label"],
      cell(r["recall@1"]),
      cell(r["recall@5"]),
      cell(r["mrr"]),
      cell(r["final_train_loss"], pct=False, digits=3),
      cell(r.get("final_loss_vs_pretrained"), pct=False, digits=3),
    ]
    if fixed:
      cells += [
        cell(r.get("fixed_train_loss"), pct=False, digits=4),
        cell(r.get("fixed_val_loss"), pct=False, digits=4),
      ]
    cells += [
      "—" if r["lr"] is None else f"{r['lr']:g}",
      f"{r['trainable_params']:,}" if r["trainable_params"] else "0",
      str(r["n_seeds"]) if r["lr"] is not None else "—",
    ]
    body.append(cells)
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


# --------------------------------------------------------------------------- results files


def config_dict(cfg: Config) -> dict[str, Any]:
  """``cfg`` as JSON-ready values (the inverse of :func:`config_from_json`)."""
  return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dataclasses.asdict(cfg).items()}


def config_from_json(d: Mapping[str, Any]) -> Config:
  """The Config stored in a results.json."""
  fields = {f.name for f in dataclasses.fields(Config)}
  kw = {k: v for k, v in d.items() if k in fields}
  for k in ("methods", "seeds", "select_seeds", "modules"):
    if kw.get(k) is not None:
      kw[k] = tuple(kw[k])
  kw["lrs"] = {m: tuple(v) for m, v in kw.get("lrs", {}).items()}
  return Config(**kw)


def merge_results(
  paths: Sequence[str | Path], keep_lrs: Mapping[str, Sequence[float]] | None = None
) -> tuple[Config, dict, list[dict]]:
  """Runs of several results.json (one zero-shot run kept) and a Config covering them all;
  the lr choice uses the first file's selection seeds. ``keep_lrs``: for the methods it
  names, only the runs at those learning rates."""
  loaded = [json.loads(Path(p).read_text()) for p in paths]
  cfgs = [config_from_json(r["config"]) for r in loaded]
  keep = {m: {float(x) for x in v} for m, v in (keep_lrs or {}).items()}
  runs, seen_zero = [], False
  for r in loaded:
    for run in r["runs"]:
      if run["method"] == "zero_shot":
        if seen_zero:
          continue
        seen_zero = True
      if run["method"] in keep and run["lr"] not in keep[run["method"]]:
        continue
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


def merged_results(
  paths: Sequence[str | Path], keep_lrs: Mapping[str, Sequence[float]] | None = None
) -> tuple[Config, dict[str, Any]]:
  """:func:`merge_results` with its rows and caption, as a results.json."""
  cfg, first, runs = merge_results(paths, keep_lrs)
  caption = config_caption(cfg, device=first.get("device")) + " (merged runs)"
  results = {"config": config_dict(cfg), "device": first.get("device"), "caption": caption}
  results |= {"merged_from": [str(p) for p in paths], "runs": runs, "rows": summarize(runs, cfg)}
  return cfg, results


def write_json(out: Path, results: Mapping[str, Any]) -> None:
  (out / "results.json").write_text(json.dumps(results, indent=1, default=float))


_RUN_SUMMARY = ("method", "lr", "seed", "steps", "metrics", "final_train_loss", "fixed_eval")
_RUN_SUMMARY += ("trainable_params", "time_train_s", "time_eval_s", "time_fixed_eval_s")


def summary(results: Mapping[str, Any]) -> dict[str, Any]:
  """A small ``results.json``: config, table rows, gap closure, and per run its
  metrics, final losses, fixed-set evaluations and times (no per-step curves or probes)."""
  keep = ("config", "device", "caption", "timings", "data", "argv", "merged_from", "rows")
  out = {k: results[k] for k in keep if k in results}
  out["runs"] = [{k: r[k] for k in _RUN_SUMMARY if k in r} for r in results["runs"]]
  out["gap_closure"] = {
    key: c
    for key in ("train_loss", "val_loss")
    if (c := gap_closure(results["runs"], results["rows"], key)) is not None
  }
  return out


def write_summary(out: Path, results: Mapping[str, Any]) -> Path:
  path = out / "summary.json"
  path.write_text(json.dumps(summary(results), indent=1, default=float))
  return path


def write_table_and_figures(
  results: dict[str, Any], cfg: Config, out: Path, fig_dir: Path | None, fig_prefix: str = ""
) -> None:
  """``table.md`` and, unless ``fig_dir`` is None, the figures (listed in ``results``)."""
  caption = results["caption"]
  text = format_table(results["rows"], markdown=True) + "\n\n" + caption + "\n"
  for key in ("train_loss", "val_loss"):
    closure = gap_closure(results["runs"], results["rows"], key)
    if closure is not None:
      results.setdefault("gap_closure", {})[key] = closure
      text += "\n" + format_closure(closure) + "\n"
  (out / "table.md").write_text(text)
  if fig_dir is not None:
    from examples.minilm.figures import make_figures

    paths = make_figures(results["runs"], results["rows"], cfg, fig_dir, caption, fig_prefix)
    results["figures"] = [str(p) for p in paths]
    print("figures: " + ", ".join(map(str, paths)))
