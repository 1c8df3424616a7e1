"""Figures of the MiniLM comparison, from the runs and table rows of ``results.json``.

* ``loss_curves.png``: training loss (paper Fig. 3), raw and relative to the
  pretrained model on the same batch.
* ``grad_distance.png``: distance and cosine of the equivalent gradients to the
  full fine-tuning gradient (paper Fig. 4), at the probe steps.
* ``update_size.png``: Adam's step of A and B at every step, and LoRA-Pro's
  adjustment of g^A at the probe steps (every ``--grad-every`` steps).
* ``fixed_eval.png`` (runs evaluated every ``--eval-every`` steps): the loss on
  the fixed training pairs, its paired difference to LoRA's, and the validation
  loss, with the long LoRA run's final values as dashed lines.

The long LoRA run (``lora_long``) trains on another schedule and horizon, so it
appears in ``fixed_eval.png`` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from examples.minilm.experiment import LABELS, LORA_METHODS, Config
from examples.minilm.model import LORA_TARGETS

COLORS = {
  "zero_shot": "0.5",
  "full_ft": "k",
  "lora": "tab:blue",
  "rslora": "tab:cyan",
  "lorapro_eff": "tab:orange",
  "lorapro_full": "tab:red",
  "lorapro_fact": "tab:green",
  "lora_long": "tab:purple",
  "scaled_gd": "tab:brown",
}


def _smooth(x: np.ndarray, w: int) -> np.ndarray:
  if w <= 1 or len(x) < w:
    return x
  c = np.cumsum(np.insert(x, 0, 0.0))
  head = c[1:w] / np.arange(1, w)
  return np.concatenate([head, (c[w:] - c[:-w]) / w])


def _chosen_runs(runs, rows, method):
  row = next((r for r in rows if r["method"] == method), None)
  if row is None:
    return []
  return [r for r in runs if r["method"] == method and r["lr"] == row["lr"] and r.get("losses")]


def make_figures(
  runs: Sequence[dict],
  rows: Sequence[dict],
  cfg: Config,
  out_dir: Path,
  caption: str,
  prefix: str = "",
) -> list[Path]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  out_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  trained = [m for m in cfg.methods if m not in ("zero_shot", "lora_long")]

  # (1) Training loss (paper Fig. 3): raw, and relative to the pretrained model on the same batch.
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
  w = max(1, cfg.steps // 12)
  for m in trained:
    rs = _chosen_runs(runs, rows, m)
    if not rs:
      continue
    n = min(len(r["losses"]) for r in rs)
    L = np.array([r["losses"][:n] for r in rs])
    base = np.array([r["baseline_losses"][:n] for r in rs])
    x = np.arange(n)
    for ax, Y in ((axes[0], L), (axes[1], L - base)):
      mean = _smooth(Y.mean(0), w)
      ax.plot(x, Y.mean(0), color=COLORS[m], alpha=0.12, lw=0.8)
      ax.plot(x, mean, color=COLORS[m], lw=1.8, label=f"{LABELS[m]} (lr {rs[0]['lr']:g})")
      if len(rs) > 1 and ax is axes[1]:  # raw losses vary by batch far more than by method
        sd = _smooth(Y.std(0), w)
        ax.fill_between(x, mean - sd, mean + sd, color=COLORS[m], alpha=0.10)
  axes[0].set_ylabel(f"InfoNCE training loss ({w}-step moving mean)")
  axes[0].set_title("training loss", fontsize=10)
  axes[1].set_ylabel("loss - pretrained model's loss on the same batch")
  axes[1].set_title("training loss relative to zero-shot (batch difficulty removed)", fontsize=10)
  axes[1].axhline(0.0, color="0.5", lw=0.8, ls="--")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.suptitle(
    "all-MiniLM-L6-v2 code search"
    + (f", mean over {len(cfg.seeds)} seeds" if len(cfg.seeds) > 1 else ""),
    fontsize=11,
  )
  fig.text(0.01, 0.01, caption, fontsize=6.5, va="bottom", wrap=True)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  p = out_dir / f"{prefix}loss_curves.png"
  fig.savefig(p)
  plt.close(fig)
  paths.append(p)

  # (2) Relative distance of equivalent gradients to the full gradient (paper Fig. 4).
  lora_runs = {m: _chosen_runs(runs, rows, m) for m in trained if m in LORA_METHODS}
  lora_runs = {m: rs for m, rs in lora_runs.items() if rs and rs[0]["probes"]}
  if lora_runs:
    fig, axes = plt.subplots(2, 6, figsize=(15, 5.4), dpi=100, sharex=True)
    for j, t in enumerate(LORA_TARGETS):
      for m, rs in lora_runs.items():
        # LoRA and rsLoRA: their own equivalent gradient; LoRA-Pro runs: the adjusted one.
        kind = "adj" if m.startswith("lorapro") else "raw"
        steps = [p["step"] for p in rs[0]["probes"]]
        rel, cos = [], []
        for r in rs:
          d = np.array([np.array(p[f"d_{kind}"])[:, j] for p in r["probes"]])  # (probes, layers)
          e = np.array([np.array(p[f"geq_{kind}_norm"])[:, j] for p in r["probes"]])
          g = np.array([np.array(p["g_norm"])[:, j] for p in r["probes"]])
          rel.append((d / g).mean(1))
          # <g̃, g> from the three norms; 0 where g̃ = 0 (LoRA at b = 0 has g̃ = s² a aᵀ g ≠ 0).
          cos.append(((e**2 + g**2 - d**2) / (2 * np.maximum(e, 1e-30) * g)).mean(1))
        kw = dict(
          color=COLORS[m], lw=1.6, marker=".", ms=4, label=f"{LABELS[m]} (lr {rs[0]['lr']:g})"
        )
        axes[0, j].plot(steps, np.mean(rel, 0), **kw)
        axes[1, j].plot(steps, np.mean(cos, 0), **kw)
      axes[0, j].set_title(t, fontsize=10)
      axes[0, j].set_yscale("log")
      axes[0, j].yaxis.set_major_locator(
        ticker.LogLocator(base=10, subs=(0.6, 0.8, 1.0, 1.5, 2, 3, 4, 6))
      )
      axes[0, j].yaxis.set_major_formatter(ticker.FormatStrFormatter("%.1f"))
      axes[0, j].yaxis.set_minor_formatter(ticker.NullFormatter())
      axes[1, j].set_xlabel("step")
      for ax in axes[:, j]:
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel(r"$\|\tilde g - g\|_F\, /\, \|g\|_F$")
    axes[1, 0].set_ylabel(r"cosine$(\tilde g, g)$")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
      handles, labels, loc="upper center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, 0.955)
    )
    fig.suptitle(
      "Equivalent gradient vs full fine-tuning gradient g (mean over the trained layers); "
      "LoRA-Pro runs: their adjusted gradients",
      fontsize=10,
    )
    fig.text(0.01, 0.01, caption, fontsize=6.5, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 0.92))
    p = out_dir / f"{prefix}grad_distance.png"
    fig.savefig(p)
    plt.close(fig)
    paths.append(p)

  # (3) Adam step sizes of A and B (every step), LoRA-Pro's adjustment of g^A (probe steps).
  if lora_runs:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    titles = (
      "mean |update of A| / lr",
      "mean |update of B| / lr",
      "||adjusted $g^A$|| / ||LoRA $g^A$||\n(this run's gradients, at the probe steps)",
    )
    for m, rs in lora_runs.items():
      kw = dict(color=COLORS[m], lw=1.4, label=f"{LABELS[m]} (lr {rs[0]['lr']:g})")
      for ax, key in zip(axes, ("upd_a", "upd_b")):
        n = min(len(r["step_stats"][key]) for r in rs)
        y = np.mean([r["step_stats"][key][:n] for r in rs], axis=0)
        x0 = 1 if key == "upd_a" else 0  # A's first step is 0 (b = 0 gives g^A = 0)
        ax.plot(np.arange(x0, n), y[x0:], **kw)
      n = min(len(r["probes"]) for r in rs)
      steps = np.array([p["step"] for p in rs[0]["probes"][:n]])
      ratio = [
        [p["gA_adj_norm"] / max(p["gA_raw_norm"], 1e-30) for p in r["probes"][:n]] for r in rs
      ]
      keep = steps > 0  # g^A = 0 at step 0
      axes[2].plot(steps[keep], np.mean(ratio, axis=0)[keep], marker=".", ms=4, **kw)
    for ax, title in zip(axes, titles):
      ax.set_yscale("log")
      ax.set_title(title, fontsize=9.5)
      ax.set_xlabel("step")
      ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.text(0.01, 0.01, caption, fontsize=6.5, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    p = out_dir / f"{prefix}update_size.png"
    fig.savefig(p)
    plt.close(fig)
    paths.append(p)

  # (4) The fixed evaluation set during training.
  fixed = {
    m: [r for r in _chosen_runs(runs, rows, m) if len(r.get("fixed_eval", {}).get("step", [])) > 1]
    for m in cfg.methods
    if m != "zero_shot"
  }
  fixed = {m: rs for m, rs in fixed.items() if rs}
  if fixed:
    p = _fixed_eval_figure(plt, fixed, cfg, out_dir / f"{prefix}fixed_eval.png", caption)
    paths.append(p)
  return paths


def _fixed_eval_figure(plt, fixed: dict[str, list], cfg: Config, path: Path, caption: str) -> Path:
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), dpi=100)

  def curves(rs, key):  # (seeds, evals) by seed, and the eval steps
    n = min(len(r["fixed_eval"]["step"]) for r in rs)
    rs = sorted(rs, key=lambda r: r["seed"])
    return (
      np.array(rs[0]["fixed_eval"]["step"][:n]),
      np.array([r["fixed_eval"][key][:n] for r in rs]),
      [r["seed"] for r in rs],
    )

  lora = fixed.get("lora")
  for m, rs in fixed.items():
    kw = dict(color=COLORS[m], lw=1.6, label=f"{LABELS[m]} (lr {rs[0]['lr']:g})")
    for ax, key in ((axes[0], "train_loss"), (axes[2], "val_loss")):
      x, Y, _ = curves(rs, key)
      if m == "lora_long":  # another horizon: its final value only
        ax.axhline(Y[:, -1].mean(), color=COLORS[m], ls="--", lw=1.4, label=kw["label"] + ", final")
        continue
      ax.plot(x, Y.mean(0), marker=".", ms=4, **kw)
      if len(Y) > 1:
        ax.fill_between(
          x, Y.mean(0) - Y.std(0, ddof=1), Y.mean(0) + Y.std(0, ddof=1), color=COLORS[m], alpha=0.12
        )
    if lora is None:
      continue
    x, Y, seeds = curves(rs, "train_loss")
    _, Y0, seeds0 = curves(lora, "train_loss")
    common = [s for s in seeds if s in seeds0]
    D = np.array([Y[seeds.index(s)] for s in common])
    D0 = np.array([Y0[seeds0.index(s)] for s in common])
    if m == "lora_long":
      diff = D[:, -1] - D0[:, -1]
      axes[1].axhline(diff.mean(), color=COLORS[m], ls="--", lw=1.4, label=kw["label"] + ", final")
      continue
    n = min(D.shape[1], D0.shape[1])
    d = D[:, :n] - D0[:, :n]
    axes[1].plot(x[:n], d.mean(0), marker=".", ms=4, **kw)
    if len(d) > 1:
      sd = d.std(0, ddof=1)
      axes[1].fill_between(x[:n], d.mean(0) - sd, d.mean(0) + sd, color=COLORS[m], alpha=0.12)
  titles = (
    f"loss on the fixed {cfg.eval_train_pairs} training pairs",
    "the same minus LoRA's, paired by seed",
    "validation loss",
  )
  for ax, title in zip(axes, titles):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[1].axhline(0.0, color="0.5", lw=0.8)
  axes[0].set_ylabel(f"InfoNCE, fixed batches of {cfg.batch} (mean ± std over seeds)")
  axes[0].legend(fontsize=7)
  fig.text(0.01, 0.01, caption, fontsize=6.5, va="bottom", wrap=True)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(path)
  plt.close(fig)
  return path
