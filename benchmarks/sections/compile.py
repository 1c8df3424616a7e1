"""The compile section (not in the default): compile time of the train step of every mode
against the number of separate pairs, each point in a fresh process
(`benchmarks.compile_time`)."""

from __future__ import annotations

from benchmarks import compile_time
from benchmarks.sections import common

NAME = "compile"
QUICK: dict = {}
SMOKE = {"compile_pairs": [1], "compile_modes": ["adamw", "factored-b1=0"], "compile_dim": 16}


def add_arguments(ap) -> None:
  g = ap.add_argument_group("compile")
  g.add_argument("--compile-pairs", type=common.ints, default=[8, 32, 128])
  g.add_argument(
    "--compile-modes",
    type=common.names,
    default=list(compile_time.MODES),
  )
  g.add_argument("--compile-dim", type=int, default=512)
  g.add_argument("--compile-timeout-s", type=float, default=900.0)


def run(args, result, log, checkpoint) -> None:
  result["compile"] = compile_time.sweep(
    args.compile_modes,
    args.compile_pairs,
    dim=args.compile_dim,
    rank=args.adapter_rank,
    timeout_s=args.compile_timeout_s,
    fast=args.smoke,
    log=log,
  )
  checkpoint()


def format(result) -> list[str]:
  rows = result.get("compile", [])
  return [compile_time.format_table(rows), ""] if rows else []
