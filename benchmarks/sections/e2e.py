"""Section 4, e2e: the MiniLM train step of examples/minilm (`benchmarks.e2e_minilm`).

Random init; ``--smoke``: a tiny model. Fails on any error; skipped only when a
third-party package is missing.
"""

from __future__ import annotations

NAME = "e2e"
QUICK: dict = {}
SMOKE = {"e2e_batch": 4, "e2e_seq": 8}


def add_arguments(ap) -> None:
  g = ap.add_argument_group("e2e")
  g.add_argument("--e2e-rank", type=int, default=8)
  g.add_argument("--e2e-batch", type=int, default=16)
  g.add_argument("--e2e-seq", type=int, default=32)
  g.add_argument(
    "--e2e-repeats",
    type=int,
    default=3,
    help="independent e2e measurements (their ratios' spread is reported)",
  )


def run(args, result, log, checkpoint) -> None:
  from benchmarks import e2e_minilm

  log(f"[e2e] MiniLM train step ({args.e2e_repeats} measurement(s))")
  result["e2e"] = e2e_minilm.run(
    rank=args.e2e_rank,
    batch=args.e2e_batch,
    seq=args.e2e_seq,
    smoke=args.smoke,
    target_s=0.05 if args.smoke else 2.0,
    rounds=1 if args.smoke else 2 * args.rounds,
    repeats=args.e2e_repeats,
  )
  checkpoint()


def format(result) -> list[str]:
  e2e = result.get("e2e")
  if e2e is None:
    return []
  lines = ["== 4. end-to-end train step =="]
  if "skipped" in e2e:
    return [*lines, f"skipped: {e2e['skipped']}", ""]
  lines.append(
    f"{e2e['config']}, {e2e['lora_params']} LoRA parameters, "
    f"{e2e.get('base_params', '?')} base parameters (full fine-tuning)"
  )
  for r in e2e["rows"]:
    lines.append(f"{r['variant']:<26} {r['median_ms']:>10.2f} ms  x{r['ratio_vs_adamw']:.2f} adamw")
  if e2e.get("spread"):
    n = len(next(iter(e2e["spread"].values()))["ratios"])
    lines.append(f"ratio to adamw over {n} interleaved measurements (rows above: the first):")
    for v, x in e2e["spread"].items():
      lines.append(
        f"{v:<26} {', '.join(f'{y:.3f}' for y in x['ratios'])}  (range {x['range']:.3f})"
      )
  return [*lines, ""]
