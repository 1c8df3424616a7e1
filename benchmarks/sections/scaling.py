"""Section 2, scaling: the batched engine against a per-layer loop, by #adapters and rank.

LoRA-Pro's gradient adjustment alone (and the factored mode's update, its moments
included), on the same adapters as separate leaves and stacked along a layer axis.
"""

from __future__ import annotations

import gc

import optax

import lorapro_jax as lpj
from benchmarks import loop_baseline, models, timing
from benchmarks.optimizers import SCALE
from benchmarks.sections import common

NAME = "scaling"
VARIANTS = (
  "batched",
  "factored",
  "batched-stacked",
  "factored-stacked",
  "loop-factored",
  "loop-projector",
)
LOOPS = ("factored", "projector")
QUICK = {"adapters": [8, 64, 256], "scaling_ranks": [4, 32, 128]}
SMOKE = {
  "adapters": [2],
  "adapter_dim": 16,
  "adapter_rank": 2,
  "scaling_ranks": [2],  # reuses the point above
  "rank_dim": 16,
  "rank_adapters": 2,
  "scaling_variants": [v for v in VARIANTS if v != "factored"],
}


def add_arguments(ap) -> None:
  g = ap.add_argument_group("scaling")
  g.add_argument("--adapters", type=common.ints, default=[8, 32, 128, 256, 512, 1024])
  g.add_argument("--adapter-dim", type=int, default=512)
  g.add_argument("--adapter-rank", type=int, default=8)
  g.add_argument("--max-loop-adapters", type=int, default=1024)
  g.add_argument(
    "--max-separate-adapters",
    type=int,
    default=32,
    help="largest #adapters timed as separate leaves with the batched engine "
    "(its compile time grows ~linearly with the leaf count); stacked "
    "leaves are timed at every point",
  )
  g.add_argument("--scaling-ranks", type=common.ints, default=[4, 16, 64, 256])
  g.add_argument("--rank-dim", type=int, default=1024)
  g.add_argument("--rank-adapters", type=int, default=32)
  g.add_argument(
    "--scaling-variants",
    type=common.names,
    default=list(VARIANTS),
    help="arms of the scaling section (factored*: lorapro(mode='factored')'s update)",
  )


def _spec(batch_axes):
  """The flax pairs with ``batch_axes`` leading batch axes, given explicitly where the
  library takes it: a stacked (L, n, r) / (L, r, m) pair with L = r also reads as a pair
  with 2-axis features and no batch axis."""
  if "batch_axes" in lpj.LoRASpec._fields:
    return lpj.LoRASpec("lora_a", "lora_b", "flax", batch_axes=batch_axes)
  return lpj.FLAX_NNX


def _runners(p, g, ps, gs, n_adapters, args) -> list:
  """The arms of one point: the same adapters as separate leaves (batched, loops) and
  stacked."""
  variants = args.scaling_variants

  def adjust(batch_axes):
    tx = lpj.lorapro(SCALE, pairs=_spec(batch_axes))
    return lambda grads, params: tx.update(grads, optax.EmptyState(), params)[0]

  def factored(name, batch_axes, grads, params):
    """lorapro(mode='factored')'s update (its moments included), the state donated."""
    tx = lpj.lorapro(SCALE, mode="factored", pairs=_spec(batch_axes))
    fn = lambda grads, state, params: tx.update(grads, state, params)
    return timing.Runner(name, fn, [grads, tx.init(params), params], state_index=1)

  runners = []
  if n_adapters <= args.max_separate_adapters:
    if "batched" in variants:
      runners.append(timing.Runner("batched", adjust(0), [g, p]).compile())
    if "factored" in variants:
      runners.append(factored("factored", 0, g, p).compile())
  if "batched-stacked" in variants:
    runners.append(timing.Runner("batched-stacked", adjust(1), [gs, ps]).compile())
  if "factored-stacked" in variants:
    runners.append(factored("factored-stacked", 1, gs, ps).compile())
  if n_adapters <= args.max_loop_adapters:
    for loop in LOOPS:
      if f"loop-{loop}" in variants:
        lp = loop_baseline.LoopLoraPro(p, g, SCALE, variant=loop)
        runners.append(timing.PyRunner(f"loop-{loop}", lp.step).compile())
  return runners


def point(kind, value, dim, n_adapters, r, args, log) -> list[dict]:
  """One point of the sweep of ``kind`` ('adapters' or 'rank')."""
  model = models.square(f"{dim}x{dim}", dim)
  p, g = models.lora_tree(model, n_adapters, r, seed=3)
  ps, gs = models.lora_tree(model, n_adapters, r, seed=3, stacked=True)
  runners = _runners(p, g, ps, gs, n_adapters, args)
  res = timing.measure(runners, rounds=args.rounds, target_s=args.target_s / 2, max_reps=30)
  rows = [
    {
      "section": f"scaling_{kind}",
      "variant": rn.name,
      "adapters": n_adapters,
      "rank": r,
      "dim": dim,
      **res[rn.name],
      "compile_s": rn.compile_s,
    }
    for rn in runners
  ]
  log(
    f"[scaling] {kind}={value} ({n_adapters}x {dim}x{dim}, r={r}): "
    + ", ".join(
      f"{rn.name} {res[rn.name]['median_ms']:.2f} ms (compile {rn.compile_s:.1f}s)"
      for rn in runners
    )
  )
  del runners, p, g, ps, gs
  gc.collect()
  return rows


def run(args, result, log, checkpoint) -> None:
  rows, done = [], set()
  for n in args.adapters:
    done.add((args.adapter_dim, n, args.adapter_rank))
    rows += point("adapters", n, args.adapter_dim, n, args.adapter_rank, args, log)
  for r in args.scaling_ranks:
    if r > args.rank_dim:
      continue
    key = (args.rank_dim, args.rank_adapters, r)
    if key in done:  # the same point was measured in the adapters sweep
      same = [
        x
        for x in rows
        if x["section"] == "scaling_adapters" and (x["dim"], x["adapters"], x["rank"]) == key
      ]
      rows += [{**x, "section": "scaling_rank"} for x in same]
      continue
    rows += point("rank", r, args.rank_dim, args.rank_adapters, r, args, log)
  result["scaling"] = rows
  checkpoint()


def format(result) -> list[str]:
  lines = []
  sc = result.get("scaling", [])
  for kind in ("adapters", "rank"):
    rs = [r for r in sc if r["section"] == f"scaling_{kind}"]
    if not rs:
      continue
    variants = list(dict.fromkeys(r["variant"] for r in rs))
    r0 = rs[0]
    what = (
      f"{r0['dim']}x{r0['dim']} adapters, r={r0['rank']}"
      if kind == "adapters"
      else f"{r0['adapters']} adapters of {r0['dim']}x{r0['dim']}"
    )
    lines.append(
      f"== 2. scaling vs {kind} ({what}); LoRA-Pro adjustment only (factored*: "
      "lorapro(mode='factored')'s update, its moments included), median ms =="
    )
    compiled = [v for v in variants if not v.startswith("loop-")]
    chead = f"compile s ({', '.join(compiled)})"
    lines.append(
      f"{kind:>9} "
      + " ".join(f"{v:>17}" for v in variants)
      + f" {'loop/batched':>13} {'loop/stacked':>13} {chead:>29}"
    )
    for val in dict.fromkeys(r[kind] for r in rs):
      by = {r["variant"]: r["median_ms"] for r in rs if r[kind] == val}
      cs = {r["variant"]: r["compile_s"] for r in rs if r[kind] == val}
      sp = [
        f"{by['loop-factored'] / by[b]:.1f}x" if "loop-factored" in by and b in by else "-"
        for b in ("batched", "batched-stacked")
      ]
      comp = ", ".join(f"{cs[b]:.1f}" if b in cs else "-" for b in compiled)
      lines.append(
        f"{val:>9} "
        + " ".join(f"{by[v]:>17.2f}" if v in by else f"{'-':>17}" for v in variants)
        + f" {sp[0]:>13} {sp[1]:>13} {comp:>29}"
      )
    lines.append("")
  return lines
