"""Section 1, update: train-step time on real LoRA shapes (Llama-2-7B, BERT-base, MiniLM).

jit(step, donate params and state), step = tx.update + apply_updates, with the same weight
decay in every arm: optax.adamw on the LoRA leaves (floor), chain(lorapro(x), adamw) for
each x_choice, full mode (lorapro_adamw(mode='full')) and dense AdamW on the same m×n
weights, with ratios from the same interleaved measurement.
"""

from __future__ import annotations

import gc

import jax.numpy as jnp

from benchmarks import models, optimizers, timing
from benchmarks.optimizers import WD, X_CHOICES
from benchmarks.sections import common

NAME = "update"
QUICK = {
  "layers": [1, 2],
  "ranks": [8],
  "rank_layers": 2,
  "full_llama_layers": 0,
  "small_models": "minilm:6",
}
SMOKE = {
  "layers": [],
  "ranks": [],
  "full_llama_layers": 0,
  "small_models": "tiny:1",
  "small_rank": 4,
}


def add_arguments(ap) -> None:
  g = ap.add_argument_group("update")
  g.add_argument(
    "--layers",
    type=common.ints,
    default=[1, 2, 8],
    help="Llama-2-7B layer counts (of 32) timed at r = 8: adamw vs lorapro+adamw",
  )
  g.add_argument("--ranks", type=common.ints, default=[8, 32, 128], help="ranks on Llama-2-7B")
  g.add_argument(
    "--rank-layers",
    type=int,
    default=2,
    help="Llama-2-7B layers for the --ranks sweep and for every x_choice at r = 8",
  )
  g.add_argument(
    "--full-llama-layers",
    type=int,
    default=1,
    help="Llama-2-7B layers for full mode vs dense AdamW (0: skip)",
  )
  g.add_argument(
    "--small-models",
    default="minilm:6,bert-base:12",
    help="MODEL:LAYERS,... timed at --small-rank: adamw, lorapro-sylvester+adamw, "
    "full mode, dense AdamW (every x_choice and bf16 moments are timed on "
    "Llama-2-7B shapes)",
  )
  g.add_argument("--small-rank", type=int, default=8)


def variants(full: bool, x_choices=X_CHOICES, bf16: bool = True) -> dict:
  """name -> (optimizer, which tree it runs on: 'lora' or 'dense')."""
  v = {"adamw": (optimizers.adamw_tx(), "lora")}
  for x in x_choices:
    v[f"lorapro-{x}+adamw"] = (optimizers.efficient_tx(x), "lora")
  if full:
    v["lorapro-full"] = (optimizers.full_tx(jnp.float32), "lora")
    if bf16:
      v["lorapro-full-bf16"] = (optimizers.full_tx(jnp.bfloat16), "lora")
    v["dense-adamw"] = (optimizers.adamw_tx(), "dense")
  return v


def bench_config(
  model_name, layers, r, *, full, target_s, rounds, log, x_choices=X_CHOICES, bf16=True, suffix=""
):
  """One configuration's rows and ratios (every arm compiled, then measured interleaved)."""
  model = models.MODELS[model_name]
  cfg = f"{model_name} L{layers}/{model.total_layers} r{r}{suffix}"
  log(f"[update] {cfg}: building parameters")
  p, g = models.lora_tree(model, layers, r, seed=1)
  trees = {"lora": (p, g)}
  if full:
    trees["dense"] = models.dense_tree(model, layers, seed=2)
  runners, meta = [], {}
  key = (model_name, layers, r)
  for name, (tx, which) in variants(full, x_choices, bf16).items():
    pp, gg = trees[which]  # each runner has its own donated params and state
    rn, meta[name] = common.compiled_runner(name, tx, pp, gg, key, cfg, "update", log)
    runners.append(rn)
  res = timing.measure(runners, rounds=rounds, target_s=target_s)
  rows = [
    {
      **common.train_step_row("update", cfg, model_name, model, layers, r, rn, meta[rn.name]),
      **res[rn.name],
    }
    for rn in runners
  ]
  med = lambda v: res[v]["median_ms"]
  pairs = [(f"{x}/adamw", f"lorapro-{x}+adamw", "adamw") for x in x_choices]
  if full:
    pairs.append(("full/dense-adamw", "lorapro-full", "dense-adamw"))
    if bf16:
      pairs.append(("full-bf16/dense-adamw", "lorapro-full-bf16", "dense-adamw"))
  ratios = [{"config": cfg, "ratio": k, "value": med(v) / med(base)} for k, v, base in pairs]
  del runners, trees, p, g
  gc.collect()
  return rows, ratios


def configs(args) -> list[tuple]:
  """(model, layers, rank, full mode?, x_choices, bf16 moments?, config suffix): Llama-2-7B
  at r = 8 and each of --layers; every x_choice at --rank-layers; other ranks at
  --rank-layers with the default x_choice; full mode vs dense AdamW on its own; the small
  models."""
  out = []
  for nl in args.layers:
    xs = X_CHOICES if nl == args.rank_layers else ("sylvester",)
    out.append(("llama2-7b", nl, 8, False, xs, False, ""))
  for r in args.ranks:
    if r != 8 or args.rank_layers not in args.layers:
      out.append(("llama2-7b", args.rank_layers, r, False, ("sylvester",), False, ""))
  if args.full_llama_layers > 0:
    out.append(("llama2-7b", args.full_llama_layers, 8, True, (), True, " full"))
  for spec in [m for m in args.small_models.split(",") if m]:
    name, _, nl = spec.partition(":")
    layers = int(nl) if nl else models.MODELS[name].total_layers
    # a smoke run times every arm on its one tiny model
    xs = X_CHOICES if args.smoke else ("sylvester",)
    out.append((name, layers, args.small_rank, True, xs, args.smoke, ""))
  return out


def run(args, result, log, checkpoint) -> None:
  result.setdefault("update", [])
  result.setdefault("ratios", [])
  for model_name, layers, r, full, xs, bf16, suffix in configs(args):
    rows, ratios = bench_config(
      model_name,
      layers,
      r,
      full=full,
      target_s=args.target_s,
      rounds=args.rounds,
      log=log,
      x_choices=xs,
      bf16=bf16,
      suffix=suffix,
    )
    result["update"] += rows
    result["ratios"] += ratios
    checkpoint()


def format(result) -> list[str]:
  ups = result.get("update", [])
  if not ups:
    return []
  lines = [
    "== 1. train step: update + apply_updates, jitted, params and state donated, same weight "
    f"decay ({WD:g}) in every arm; median of interleaved runs ==",
    f"{'config':<24} {'variant':<26} {'median ms':>10} {'p25-p75 ms':>16} "
    f"{'x adamw':>8} {'x dense':>8} {'state MiB':>10} {'temp MiB':>9}",
  ]
  full = ("lorapro-full", "lorapro-full-bf16", "dense-adamw")
  for cfg in dict.fromkeys(r["config"] for r in ups):
    rs = [r for r in ups if r["config"] == cfg]
    base = next(r for r in rs if r["variant"] == "adamw")["median_ms"]
    dense = next((r["median_ms"] for r in rs if r["variant"] == "dense-adamw"), None)
    for r in rs:
      xd = f"{r['median_ms'] / dense:.2f}" if dense and r["variant"] in full else ""
      lines.append(
        f"{cfg:<24} {r['variant']:<26} {r['median_ms']:>10.2f} "
        f"{r['p25_ms']:>7.2f}-{r['p75_ms']:<8.2f} {r['median_ms'] / base:>8.2f} {xd:>8} "
        f"{common.mib(r['state_bytes']):>10} {common.mib(r['temp_size_in_bytes']):>9}"
      )
  lines.append("")
  if result.get("ratios"):
    lines.append("== ratios (same run) ==")
    for x in result["ratios"]:
      lines.append(f"{x['config']:<24} {x['ratio']:<24} {x['value']:.2f}")
    lines.append("")
  return lines
