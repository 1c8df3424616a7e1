"""PNG of a benchmark result (needs matplotlib)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

COLORS = {
  "adamw": "#7f7f7f",
  "lorapro-sylvester+adamw": "#1f77b4",
  "lorapro-zero+adamw": "#17becf",
  "lorapro-symmetric+adamw": "#9467bd",
  "lorapro-full": "#d62728",
  "lorapro-full-bf16": "#ff9896",
  "dense-adamw": "#2ca02c",
  "batched": "#1f77b4",
  "batched-stacked": "#17becf",
  "loop-factored": "#ff7f0e",
  "loop-projector": "#d62728",
}


def _update_panel(ax, rows):
  cfgs = list(dict.fromkeys(r["config"] for r in rows))
  variants = list(dict.fromkeys(r["variant"] for r in rows))
  w = 0.8 / max(len(variants), 1)
  for j, v in enumerate(variants):
    xs, ys, err = [], [], []
    for i, c in enumerate(cfgs):
      r = next((r for r in rows if r["config"] == c and r["variant"] == v), None)
      if r:
        xs.append(i + (j - len(variants) / 2 + 0.5) * w)
        ys.append(r["median_ms"])
        err.append([r["median_ms"] - r["p25_ms"], r["p75_ms"] - r["median_ms"]])
    ax.bar(xs, ys, w, yerr=np.array(err).T if err else None, label=v, color=COLORS.get(v))
  ax.set_xticks(range(len(cfgs)))
  ax.set_xticklabels(cfgs, rotation=20, ha="right", fontsize=7)
  ax.set_yscale("log")
  ax.set_ylabel("train step, median ms (log)")
  ax.set_title("1. train step (update + apply, params and state donated)")
  ax.legend(fontsize=6, ncol=2)


def _scaling_panel(ax, rows, key, title):
  for v in dict.fromkeys(r["variant"] for r in rows):
    rs = sorted((r for r in rows if r["variant"] == v), key=lambda r: r[key])
    ax.plot([r[key] for r in rs], [r["median_ms"] for r in rs], "o-", label=v, color=COLORS.get(v))
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel(key)
  ax.set_ylabel("LoRA-Pro adjustment, median ms")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  ax.grid(True, which="both", alpha=0.3)


def _memory_panel(ax, rows):
  names = [r["variant"] for r in rows]
  x = np.arange(len(names))
  st = [r["state_bytes"] / 2**20 for r in rows]
  tmp = [(r.get("compiled_temp_size_in_bytes") or 0) / 2**20 for r in rows]
  ax.bar(x - 0.2, st, 0.4, label="optimizer state")
  ax.bar(
    x + 0.2, tmp, 0.4, label=f"XLA temporaries of the train step at L{rows[0]['compile_layers']}"
  )
  ax.set_xticks(x)
  ax.set_xticklabels(names, rotation=20, ha="right", fontsize=7)
  ax.set_yscale("log")
  ax.set_ylabel("MiB (log)")
  ax.set_title(f"3. memory, {rows[0]['config']}")
  ax.legend(fontsize=7)


def plot(result, path):
  fig, axes = plt.subplots(2, 2, figsize=(15, 10))
  axes = axes.ravel()
  if result.get("update"):
    _update_panel(axes[0], result["update"])
  sc = result.get("scaling", [])
  ad = [r for r in sc if r["section"] == "scaling_adapters"]
  rk = [r for r in sc if r["section"] == "scaling_rank"]
  if ad:
    _scaling_panel(
      axes[1],
      ad,
      "adapters",
      f"2a. vs #adapters ({ad[0]['dim']}x{ad[0]['dim']}, r={ad[0]['rank']})",
    )
  if rk:
    _scaling_panel(
      axes[2],
      rk,
      "rank",
      f"2b. vs rank ({rk[0]['adapters']} adapters of {rk[0]['dim']}x{rk[0]['dim']})",
    )
  if result.get("memory"):
    _memory_panel(axes[3], result["memory"])
  for ax in axes:
    if not ax.has_data():
      ax.set_axis_off()
  fig.suptitle(
    f"lorapro_jax benchmarks on {result['device']['label']}, jax {result['device']['jax']}"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
