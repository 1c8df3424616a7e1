"""Qwix LoRA on a small Gemma-style decoder: plain LoRA vs LoRA-Pro (every mode).

A random-init NNX decoder (einsum attention with a heads axis, gated MLP,
RMSNorm, rotary embeddings) gets Qwix LoRA weights on its attention einsums
(``--targets all``: and its MLP's), as Tunix's PEFT trainer applies them, and
trains next-byte prediction on the docstrings of the Python standard library
(offline). Prints the validation loss curve of each method: about 75 s of CPU
time, most of it compiling (2m19s wall on a shared, loaded 2-core machine)::

    python -m examples.qwix_gemma.compare [--steps 100] [--lr 3e-3] [--rank 8] [--targets all]
    python -m examples.qwix_gemma.compare --methods "LoRA,LoRA-Pro full"
    python -m examples.qwix_gemma.compare --smoke   # tiny model, one pair, 3 steps (a test)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python examples/qwix_gemma/compare.py`
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.qwix_gemma.model import Config
from examples.qwix_gemma.train import METHODS, TARGETS, RunConfig, run, table

SMOKE = RunConfig(
  model=Config(layers=1, dim=32, heads=2, head_dim=8, hidden=32),
  rank=2,
  steps=3,
  batch=2,
  seq_len=16,
  eval_every=3,
  eval_batches=1,
  max_bytes=20_000,
  targets=r"layers/\d+/attn/attn_vec_einsum",  # one pair (N, H, r), (r, D): compiling dominates
)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=RunConfig.steps)
  p.add_argument("--lr", type=float, default=RunConfig.lr)
  p.add_argument("--rank", type=int, default=RunConfig.rank)
  p.add_argument("--alpha", type=float, default=RunConfig.alpha)
  p.add_argument("--seed", type=int, default=RunConfig.seed)
  p.add_argument("--targets", choices=sorted(TARGETS), default="attention", help="adapted einsums")
  p.add_argument(
    "--methods", default=",".join(METHODS), help=f"comma list from {', '.join(METHODS)}"
  )
  p.add_argument("--smoke", action="store_true", help="tiny model and 3 steps (a test)")
  args = p.parse_args(argv)
  config = RunConfig() if not args.smoke else SMOKE
  if not args.smoke:
    fields = ("steps", "lr", "rank", "alpha", "seed")
    config = dataclasses.replace(config, **{k: getattr(args, k) for k in fields})
    config = dataclasses.replace(config, targets=TARGETS[args.targets])
  methods = [m.strip() for m in args.methods.split(",")]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
  curves = run(config, methods)
  print("\nValidation loss (nats per byte; ln 256 = 5.545 is uniform):\n")
  print(table(curves))


if __name__ == "__main__":
  main()
