"""Optimisation quality of the LoRA-Pro modes on LoRA least-squares problems (issue 11).

    python -m benchmarks.lstsq_quality           # all three studies, a few minutes on 2 CPU cores
    python -m benchmarks.lstsq_quality --smoke   # tiny, for tests

Writes ``benchmarks/results/lstsq_quality.{json,txt}`` (``--out``; ``--smoke``: under ``out/``).
The problems and methods are in `benchmarks.lstsq_problem`, the tables in
`benchmarks.lstsq_report`.

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
import time
from pathlib import Path

from benchmarks import timing
from benchmarks.lstsq_problem import (
  ADAFACTOR_METHODS,
  CODE,
  MODE_METHODS,
  Problem,
  memory_table,
  run,
)
from benchmarks.lstsq_report import (
  at_steps,
  fmt,
  fmt_paired,
  mean_std,
  paired,
  report_adafactor,
  report_modes,
  report_nonzero_b,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SMOKE_OUT = ROOT / "out" / "lstsq-smoke" / "lstsq_quality"  # ignored by git


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


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny problem, 2 seeds, few steps")
  p.add_argument(
    "--out",
    default=None,
    help=f"path without suffix (default {RESULTS / 'lstsq_quality'}; --smoke: {SMOKE_OUT})",
  )
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
    "device": timing.device_info(),
    "provenance": timing.provenance(),
    "methods": CODE,
    "dtype": "float32",
  }
  text = [
    "# LoRA least squares: LoRA-Pro modes (benchmarks/lstsq_quality.py)",
    "",
    timing.header(results) + f"; optax {results['provenance']['versions']['optax']}.",
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
  out = a.out or (SMOKE_OUT if a.smoke else RESULTS / "lstsq_quality")
  timing.write_report(f"{out}.json", results, "\n".join(text))
  log("\n".join(text))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
