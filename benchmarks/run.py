"""One command for every lorapro_jax benchmark: table, JSON and PNG.

    python -m benchmarks.run            # default run (~25 min on a loaded 2-core CPU)
    python -m benchmarks.run --quick    # a few minutes
    python -m benchmarks.run --smoke    # tiny shapes, seconds (used by the tests)

Sections (``--sections``, default all but compile), one module each in
`benchmarks.sections`:
  update   train-step time on real LoRA shapes (Llama-2-7B, BERT-base, MiniLM): adamw,
           lorapro+adamw for each x_choice, full mode and dense AdamW.
  factored the factored mode next to efficient mode and AdamW (and full mode), several
           interleaved measurements after one compilation.
  scaling  batched engine vs a per-layer loop against #adapters and rank (and the
           factored mode's update, stacked and separate).
  memory   optimizer-state bytes and XLA peak temporaries of the whole
           Llama-2-7B (compile only, nothing allocated).
  compile  (not in the default) compile time of the train step of every mode against
           the number of separate pairs (benchmarks/compile_time.py).
  e2e      MiniLM train step (examples/minilm, random init; --smoke: a tiny model).

Everything runs on ``jax.devices()[0]``; the output is labelled with it. The targets
(`benchmarks.targets`) are judged at the end, except on a smoke run, whose output goes
to ``out/benchmarks-smoke/`` (ignored by git) unless ``--out-dir`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from benchmarks import targets, timing
from benchmarks.sections import DEFAULT, SECTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SMOKE_OUT = os.path.join(ROOT, "out", "benchmarks-smoke")
SMOKE_NOTE = "not judged: a smoke run (tiny shapes, few repetitions) measures no target"


def parse_args(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument(
    "--sections",
    default=",".join(DEFAULT),
    help=f"any of {','.join(SECTIONS)} (compile is not in the default)",
  )
  ap.add_argument("--target-s", type=float, default=1.0, help="seconds of repetitions per variant")
  ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
  ap.add_argument("--quick", action="store_true", help="fewer points (a few minutes)")
  ap.add_argument(
    "--smoke", action="store_true", help="tiny shapes (seconds), for tests; judges no target"
  )
  ap.add_argument(
    "--out-dir",
    default=None,
    help=f"where the results go (default: benchmarks/results; --smoke: {SMOKE_OUT})",
  )
  ap.add_argument("--tag", default=None, help="file name stem (default: the JAX platform)")
  ap.add_argument("--no-plot", action="store_true")
  for section in SECTIONS.values():
    section.add_arguments(ap)
  args = ap.parse_args(argv)
  presets = []
  if args.quick:
    presets += [s.QUICK for s in SECTIONS.values()] + [{"target_s": 0.5, "rounds": 3}]
  if args.smoke:
    presets += [s.SMOKE for s in SECTIONS.values()] + [{"target_s": 0.02, "rounds": 1}]
  for preset in presets:  # a preset overrides the options it names
    for k, v in preset.items():
      setattr(args, k, v)
  if args.out_dir is None:
    args.out_dir = SMOKE_OUT if args.smoke else RESULTS
  args.sections = [s for s in args.sections.split(",") if s]
  unknown = set(args.sections) - set(SECTIONS)
  if unknown:
    ap.error(f"unknown sections {sorted(unknown)}")
  timing.COMPILER_OPTIONS.clear()
  if args.smoke:
    timing.COMPILER_OPTIONS.update(timing.FAST_COMPILE)
  return args


def format_tables(result) -> str:
  lines = [timing.header(result), ""]
  for section in SECTIONS.values():
    lines += section.format(result)
  if "targets" in result:
    lines += targets.format_targets(result["targets"], result.get("targets_note"))
  return "\n".join(lines)


def _json_path(args, result) -> str:
  tag = args.tag or ("smoke" if args.smoke else result["device"]["platform"])
  return os.path.join(args.out_dir, f"{tag}.json")


def main(argv=None):
  args = parse_args(argv)
  warnings.filterwarnings("ignore", message=".*[Dd]onat.*")
  t_start = time.perf_counter()
  log = lambda msg: print(
    f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True
  )
  result = {
    "device": timing.device_info(),
    "provenance": timing.provenance(),
    "settings": dict(vars(args)),
    # every section's keys, empty where it does not run
    **{k: [] for k in ("update", "ratios", "factored", "factored_ratios", "scaling", "memory")},
    "compile": [],
    "e2e": {"skipped": "section not selected"},
  }

  def checkpoint():
    """Writes the partial result (a long run that is stopped keeps what it measured)."""
    timing.write_report(
      _json_path(args, result), {**result, "partial": True}, format_tables(result)
    )

  log(f"device: {result['device']['label']}")
  for name, section in SECTIONS.items():
    if name in args.sections:
      section.run(args, result, log, checkpoint)
  if args.smoke:
    result["targets"], result["targets_note"] = [], SMOKE_NOTE
  else:
    result["targets"] = targets.evaluate(result)
  result["wall_s"] = time.perf_counter() - t_start
  table = format_tables(result)
  print(table)
  json_path = _json_path(args, result)
  timing.write_report(json_path, result, table)
  log(f"wrote {json_path}")
  if not args.no_plot:
    try:
      from benchmarks import plot

      png = plot.plot(result, json_path[: -len(".json")] + ".png")
      log(f"wrote {png}")
    except ImportError as e:
      log(f"no plot ({e}); pip install matplotlib")
  log(f"done in {result['wall_s']:.0f}s")
  return result


if __name__ == "__main__":
  main()
