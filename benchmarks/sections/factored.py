"""Section 1b, factored: the factored mode next to efficient mode (and full mode).

lorapro_adamw(mode='factored'), and with b1=0, next to efficient mode and AdamW on
Llama-2-7B shapes at --factored-ranks and --factored-layers: --factored-repeats interleaved
measurements after one compilation (the spread of the ratios); with full mode at
--factored-full-layers.
"""

from __future__ import annotations

import gc

import jax.numpy as jnp

from benchmarks import models, optimizers, timing
from benchmarks.optimizers import FACTORED_VARIANTS, WD
from benchmarks.sections import common

NAME = "factored"
QUICK = {
  "factored_layers": [1],
  "factored_ranks": [8],
  "factored_full_layers": 0,
  "factored_repeats": 2,
}
# one configuration with every arm (full mode included), measured twice
SMOKE = {
  "factored_model": "tiny",
  "factored_layers": [],
  "factored_ranks": [4],
  "factored_full_layers": 1,
  "factored_full_repeats": 2,
}


def add_arguments(ap) -> None:
  g = ap.add_argument_group("factored")
  g.add_argument("--factored-model", default="llama2-7b")
  g.add_argument("--factored-layers", type=common.ints, default=[1, 2])
  g.add_argument("--factored-ranks", type=common.ints, default=[8, 32])
  g.add_argument(
    "--factored-repeats", type=int, default=3, help="interleaved measurements per config"
  )
  g.add_argument(
    "--factored-full-layers",
    type=int,
    default=1,
    help="layers of the factored configs that also run full mode (0: none)",
  )
  g.add_argument("--factored-full-repeats", type=int, default=1)


def bench_config(model_name, layers, r, *, full, repeats, target_s, rounds, log):
  """adamw, efficient (sylvester), factored, factored b1=0 (and full mode): donated train
  steps, compiled once, then ``repeats`` independent interleaved measurements; ratios per
  measurement (their median, min and max)."""
  model = models.MODELS[model_name]
  cfg = f"{model_name} L{layers}/{model.total_layers} r{r}" + (" full" if full else "")
  log(f"[factored] {cfg}: building parameters")
  p, g = models.lora_tree(model, layers, r, seed=1)
  arms = optimizers.every_mode(full=False)
  if full:
    arms["lorapro-full"] = optimizers.full_tx(jnp.float32)
  runners, meta = [], {}
  key = (model_name, layers, r)
  for name, tx in arms.items():
    rn, meta[name] = common.compiled_runner(name, tx, p, g, key, cfg, "factored", log)
    runners.append(rn)
  measurements = timing.measure_repeatedly(
    runners, repeats, log=log, label=f"[factored] {cfg}: ", rounds=rounds, target_s=target_s
  )
  rows = []
  for rn in runners:
    pooled = timing.summarise([t for m in measurements for t in m["times"][rn.name]])
    rows.append(
      {
        **common.train_step_row("factored", cfg, model_name, model, layers, r, rn, meta[rn.name]),
        "sum_m_plus_n": layers * sum(i + o for _, i, o in model.linears),
        **pooled,  # over every call of every measurement
        "measurement_median_ms": [m["res"][rn.name]["median_ms"] for m in measurements],
      }
    )
  med = lambda m, v: m["res"][v]["median_ms"]
  eff = "lorapro-sylvester+adamw"
  pairs = [(v, eff, "efficient") for v in FACTORED_VARIANTS]
  pairs += [(v, "adamw", "adamw") for v in (*FACTORED_VARIANTS, eff)]
  if full:
    pairs += [(v, "lorapro-full", "full") for v in FACTORED_VARIANTS]
    pairs += [("lorapro-full", eff, "efficient")]
  short = lambda v: v.replace("lorapro-", "").replace("+adamw", "")
  ratios = [
    {
      "config": cfg,
      "ratio": f"{short(v)}/{label}",
      **common.spread([med(m, v) / med(m, base) for m in measurements]),
    }
    for v, base, label in pairs
  ]
  del runners, p, g
  gc.collect()
  return rows, ratios


def run(args, result, log, checkpoint) -> None:
  result.setdefault("factored", [])
  result.setdefault("factored_ratios", [])
  configs = [(nl, r, False) for r in args.factored_ranks for nl in args.factored_layers]
  if args.factored_full_layers > 0:
    configs += [(args.factored_full_layers, r, True) for r in args.factored_ranks]
  for nl, r, full in configs:
    rows, ratios = bench_config(
      args.factored_model,
      nl,
      r,
      full=full,
      repeats=args.factored_full_repeats if full else args.factored_repeats,
      target_s=args.target_s,
      rounds=args.rounds,
      log=log,
    )
    result["factored"] += rows
    result["factored_ratios"] += ratios
    checkpoint()


def format(result) -> list[str]:
  fac = result.get("factored", [])
  if not fac:
    return []
  lines = [
    "== 1b. factored mode: train step (update + apply_updates, params and state donated, "
    f"same weight decay {WD:g}); median of every call of "
    f"{len(fac[0]['measurement_median_ms'])} interleaved measurement(s) after one "
    "compilation (config '... full': with full mode) ==",
    f"{'config':<24} {'variant':<26} {'median ms':>10} {'p25-p75 ms':>16} "
    f"{'x adamw':>8} {'x effic.':>8} {'state MiB':>10} {'temp MiB':>9} {'compile s':>9}  "
    "medians of the measurements (ms)",
  ]
  for cfg in dict.fromkeys(r["config"] for r in fac):
    rs = [r for r in fac if r["config"] == cfg]
    by = {r["variant"]: r["median_ms"] for r in rs}
    for r in rs:
      lines.append(
        f"{cfg:<24} {r['variant']:<26} {r['median_ms']:>10.2f} "
        f"{r['p25_ms']:>7.2f}-{r['p75_ms']:<8.2f} {r['median_ms'] / by['adamw']:>8.2f} "
        f"{r['median_ms'] / by['lorapro-sylvester+adamw']:>8.2f} "
        f"{common.mib(r['state_bytes']):>10} {common.mib(r['temp_size_in_bytes']):>9} "
        f"{r['compile_s']:>9.1f}  {', '.join(f'{x:.2f}' for x in r['measurement_median_ms'])}"
      )
  fr = result.get("factored_ratios", [])
  if fr:
    lines.append("ratios of the medians, per measurement (median [min-max]):")
    for x in fr:
      lines.append(
        f"  {x['config']:<24} {x['ratio']:<26} {x['value']:>7.2f} [{x['min']:.2f}-"
        f"{x['max']:.2f}]  ({', '.join(f'{y:.2f}' for y in x['runs'])})"
      )
  lines.append("")
  return lines
