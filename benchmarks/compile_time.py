"""Compile time of the donated train step against the number of separate LoRA pairs.

    python -m benchmarks.compile_time                       # 8, 32, 128 pairs, every mode
    python -m benchmarks.compile_time --pairs 8 --modes factored --timeout-s 300
    python -m benchmarks.compile_time --worker factored 32  # one measurement, JSON on stdout

Every point compiles `benchmarks.train_step.train_step(tx)` (update + apply_updates,
params and state donated) for N separate pairs ``{"layers": {"0": {"w": {"lora_a",
"lora_b"}}, ...}}`` of ``--dim``×``--dim`` adapters at rank ``--rank``, from abstract
shapes (nothing is allocated), in a fresh Python process (so no trace or compilation
cache is shared between points, and a compilation that does not finish in ``--timeout-s``
is stopped and recorded as such). It records the wall seconds to trace and lower to
StableHLO (``lower_s``) and to compile with XLA (``compile_s``), the CPU seconds of both
(``*_cpu_s``, all threads of the process: on a shared machine the wall time also counts
the time other processes held the cores), and the size of what XLA got and made:
StableHLO ops, compiled HLO instructions and kernels (`benchmarks.hlo_traffic`).
The points run one after another, never concurrently.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("adamw", "efficient", "factored", "factored-b1=0", "full")  # optimizers.MODES


def make_tx(mode: str):
  from benchmarks import optimizers

  if mode not in optimizers.MODES:
    raise ValueError(mode)
  return optimizers.MODES[mode]()


def measure_one(mode: str, pairs: int, dim: int = 512, rank: int = 8, fast: bool = False) -> dict:
  """Lower and compile one train step in this process (call it in a fresh one).

  ``fast``: XLA's unoptimised build (`timing.FAST_COMPILE`), for the smoke test."""
  import jax

  from benchmarks import hlo_traffic, models, timing, train_step

  warnings.filterwarnings("ignore", message=".*[Dd]onat.*")
  tx = make_tx(mode)
  params, grads = models.abstract_lora_tree(models.square("sq", dim), pairs, rank)
  c0, t0 = time.process_time(), time.perf_counter()
  state = jax.eval_shape(tx.init, params)
  lowered = jax.jit(train_step.train_step(tx), donate_argnums=(0, 1)).lower(params, state, grads)
  c1, t1 = time.process_time(), time.perf_counter()
  compiled = lowered.compile(compiler_options=timing.FAST_COMPILE if fast else None)
  c2, t2 = time.process_time(), time.perf_counter()
  text = compiled.as_text()
  stablehlo_ops = sum(1 for line in lowered.as_text().splitlines() if " = " in line)
  instructions = sum(1 for line in text.splitlines() if line.startswith("  ") and " = " in line)
  return {
    "mode": mode,
    "pairs": pairs,
    "dim": dim,
    "rank": rank,
    "lower_s": t1 - t0,
    "compile_s": t2 - t1,
    "total_s": t2 - t0,
    # CPU seconds of this process (all threads): less sensitive to other load than the wall
    "lower_cpu_s": c1 - c0,
    "compile_cpu_s": c2 - c1,
    "stablehlo_ops": stablehlo_ops,
    "hlo_instructions": instructions,
    "kernels": hlo_traffic.traffic(text)["kernels"],
    "fast_compile": fast,
  }


def sweep(
  modes=MODES, pairs=(8, 32, 128), *, dim=512, rank=8, timeout_s=900.0, fast=False, log=print
):
  """Every (mode, pairs) point in its own process, one after another.

  A mode whose compilation times out at N pairs is not tried at larger N."""
  rows, given_up = [], set()
  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
  }
  for n in pairs:
    for mode in modes:
      if mode in given_up:
        rows.append({"mode": mode, "pairs": n, "skipped": "timed out at fewer pairs"})
        continue
      cmd = [sys.executable, "-m", "benchmarks.compile_time", "--worker", mode, str(n)]
      cmd += ["--dim", str(dim), "--rank", str(rank)] + (["--fast-compile"] if fast else [])
      t0 = time.perf_counter()
      try:
        proc = subprocess.run(
          cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=env
        )
      except subprocess.TimeoutExpired:
        rows.append({"mode": mode, "pairs": n, "dim": dim, "rank": rank, "timeout_s": timeout_s})
        given_up.add(mode)
        log(f"[compile] {mode} x{n}: did not finish in {timeout_s:.0f}s")
        continue
      if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
      row = json.loads(proc.stdout.strip().splitlines()[-1])
      row["process_s"] = time.perf_counter() - t0
      rows.append(row)
      log(
        f"[compile] {mode} x{n}: lower {row['lower_s']:.1f}s, compile {row['compile_s']:.1f}s "
        f"({row['total_s'] / n:.2f}s per pair; CPU {row['lower_cpu_s']:.1f}+"
        f"{row['compile_cpu_s']:.1f}s), {row['kernels']} kernels"
      )
  return rows


def format_table(rows) -> str:
  lines = [
    "== compile time of the donated train step vs #separate pairs "
    f"({rows[0].get('dim', '?')}x{rows[0].get('dim', '?')}, r={rows[0].get('rank', '?')}): "
    "wall seconds to trace+lower + XLA compile (wall s per pair) [CPU s of both], kernels =="
  ]
  modes = list(dict.fromkeys(r["mode"] for r in rows))
  lines.append(f"{'pairs':>6} " + " ".join(f"{m:>34}" for m in modes))
  for n in dict.fromkeys(r["pairs"] for r in rows):
    cells = []
    for m in modes:
      r = next((x for x in rows if x["mode"] == m and x["pairs"] == n), None)
      if r is None:
        cells.append("-")
      elif "timeout_s" in r:
        cells.append(f"> {r['timeout_s']:.0f} (timeout)")
      elif "skipped" in r:
        cells.append("(skipped)")
      else:
        cells.append(
          f"{r['lower_s']:.0f}+{r['compile_s']:.0f} ({r['total_s'] / n:.2f}/p) "
          f"[{r['lower_cpu_s']:.0f}+{r['compile_cpu_s']:.0f}] {r['kernels']}k"
        )
    lines.append(f"{n:>6} " + " ".join(f"{c:>34}" for c in cells))
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--worker", nargs=2, metavar=("MODE", "PAIRS"), help=argparse.SUPPRESS)
  ap.add_argument("--modes", default=",".join(MODES))
  ap.add_argument("--pairs", default="8,32,128")
  ap.add_argument("--dim", type=int, default=512)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--timeout-s", type=float, default=900.0)
  ap.add_argument("--fast-compile", action="store_true", help="XLA unoptimised (smoke test)")
  ap.add_argument("--out", default=None, help="write the rows as JSON here")
  args = ap.parse_args(argv)
  if args.worker:
    row = measure_one(args.worker[0], int(args.worker[1]), args.dim, args.rank, args.fast_compile)
    print(json.dumps(row))
    return row
  rows = sweep(
    [m for m in args.modes.split(",") if m],
    [int(x) for x in args.pairs.split(",") if x],
    dim=args.dim,
    rank=args.rank,
    timeout_s=args.timeout_s,
    fast=args.fast_compile,
    log=lambda m: print(m, file=sys.stderr, flush=True),
  )
  print(format_table(rows))
  if args.out:
    from benchmarks import timing

    with open(args.out, "w") as f:
      json.dump(
        {"device": timing.device_info(), "provenance": timing.provenance(), "rows": rows},
        f,
        indent=1,
      )
  return rows


if __name__ == "__main__":
  main()
