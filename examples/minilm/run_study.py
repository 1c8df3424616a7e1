"""Command line of the study (examples/minilm/study.py; issue 17).

python -m examples.minilm.run_study                   # every phase, resuming
python -m examples.minilm.run_study --phases grid,seeds
python -m examples.minilm.run_study --summarize-only  # results files from runs.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from examples.minilm import study, study_report

OUT = Path(__file__).parent / "results" / "study"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--phases", default=",".join(study.PHASES), help="comma list, run in order")
  p.add_argument("--out", type=Path, default=OUT, help="runs.jsonl and the results files")
  p.add_argument(
    "--summary",
    type=Path,
    default=None,
    help="where study_summary.json goes (default: results/ beside the default --out, else --out)",
  )
  p.add_argument("--summarize-only", action="store_true")
  a = p.parse_args(argv)
  phases = [x for x in a.phases.split(",") if x]
  unknown = sorted(set(phases) - set(study.PHASES))
  if unknown:
    p.error(f"unknown phases {unknown}; choose from {list(study.PHASES)}")
  if not a.summarize_only:
    study.run_phases(phases, a.out, log=lambda s: print(s, flush=True))
  summary = a.summary or (OUT.parent if a.out == OUT else a.out) / "study_summary.json"
  for path in study_report.write(a.out, summary):
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
