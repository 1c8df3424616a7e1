"""Section 3, memory: optimizer-state bytes and XLA peak temporaries of a whole model.

Compile only, nothing allocated: state bytes are exact for ``--memory-layers`` layers
(``jax.eval_shape`` of ``init``); XLA's temporaries of the donated train step come from
compiling it for ``--memory-compile-layers`` layers (reusing the update and factored
sections' executables when they compiled that configuration). They grow linearly with the
layer count, so the per-layer figure is also reported.
"""

from __future__ import annotations

import time

import jax

from benchmarks import models, optimizers, timing, train_step
from benchmarks.optimizers import FACTORED_VARIANTS
from benchmarks.sections import common

NAME = "memory"
QUICK: dict = {}
SMOKE = {"memory_model": "tiny", "memory_layers": 1, "memory_rank": 4, "memory_compile_layers": 1}


def add_arguments(ap) -> None:
  g = ap.add_argument_group("memory")
  g.add_argument("--memory-model", default="llama2-7b")
  g.add_argument("--memory-layers", type=int, default=32)
  g.add_argument("--memory-rank", type=int, default=8)
  g.add_argument(
    "--memory-compile-layers",
    type=int,
    default=0,
    help="layers compiled for XLA temporaries (default: --full-llama-layers)",
  )
  g.add_argument(
    "--memory-variants",
    type=common.names,
    default=None,
    help="comma-separated rows of the memory section (default: all; adamw always)",
  )


def bench(model_name, layers, compile_layers, r, log, only=None) -> list[dict]:
  model = models.MODELS[model_name]
  step = lambda tx: jax.jit(train_step.train_step(tx), donate_argnums=(0, 1))
  trees = {
    "lora": (
      models.abstract_lora_tree(model, layers, r)[0],
      models.abstract_lora_tree(model, compile_layers, r),
    ),
    "dense": (
      models.abstract_dense_tree(model, layers)[0],
      models.abstract_dense_tree(model, compile_layers),
    ),
  }
  arms = optimizers.every_mode(full=True)
  if only is not None:
    arms = {k: v for k, v in arms.items() if k in only or k == "adamw"}
  rows = []
  for name, tx in arms.items():
    pp, (cpp, cgg) = trees["dense" if name in optimizers.DENSE_ARMS else "lora"]
    state = jax.eval_shape(tx.init, pp)
    state_bytes = timing.tree_bytes(state)
    cached = common.COMPILED_MEMORY.get((model_name, compile_layers, r, name))
    if cached:
      stats, dt = cached[2], cached[3]
    else:
      t0 = time.perf_counter()
      compiled = step(tx).lower(cpp, jax.eval_shape(tx.init, cpp), cgg).compile()
      dt = time.perf_counter() - t0
      stats = timing.memory_stats(compiled)
      del compiled
    temp = stats["temp_size_in_bytes"]
    rows.append(
      {
        "section": "memory",
        "config": f"{model_name} L{layers}/{model.total_layers} r{r}",
        "model": model_name,
        "layers": layers,
        "rank": r,
        "variant": name,
        "state_bytes": state_bytes,
        "state_scalar_bytes": timing.tree_bytes([x for x in jax.tree.leaves(state) if not x.shape]),
        "param_bytes": timing.tree_bytes(pp),
        "sum_m_plus_n": layers * sum(i + o for _, i, o in model.linears),
        "compile_layers": compile_layers,
        "compile_s": dt,
        "temp_per_layer_bytes": None if temp is None else temp / compile_layers,
        **{f"compiled_{k}": v for k, v in stats.items()},
      }
    )
    log(
      f"[memory] {name}: state {state_bytes / 2**20:.1f} MiB at L{layers}; temp "
      f"{(temp or 0) / 2**20:.1f} MiB at L{compile_layers} (compile {dt:.1f}s)"
    )
  return rows


def run(args, result, log, checkpoint) -> None:
  if args.memory_layers <= 0:
    return
  compile_layers = args.memory_compile_layers or max(args.full_llama_layers, 1)
  result["memory"] = bench(
    args.memory_model,
    args.memory_layers,
    compile_layers,
    args.memory_rank,
    log,
    only=args.memory_variants,
  )
  checkpoint()


def format(result) -> list[str]:
  mem = result.get("memory", [])
  if not mem:
    return []
  cl = mem[0]["compile_layers"]
  lines = [
    f"== 3. memory, {mem[0]['config']}: exact optimizer-state bytes (eval_shape); "
    f"XLA temporaries of the train step compiled at L{cl} ==",
    f"{'variant':<26} {'params MiB':>11} {'state MiB':>11} {'x adamw':>8} "
    f"{f'temp MiB L{cl}':>13} {'temp MiB/layer':>15}",
  ]
  adamw = next(r for r in mem if r["variant"] == "adamw")
  base = adamw["state_bytes"]
  for r in mem:
    lines.append(
      f"{r['variant']:<26} {common.mib(r.get('param_bytes')):>11} "
      f"{common.mib(r['state_bytes']):>11} {r['state_bytes'] / base:>8.1f} "
      f"{common.mib(r['compiled_temp_size_in_bytes']):>13} "
      f"{common.mib(r['temp_per_layer_bytes']):>15}"
    )
  for r in mem:
    if r["variant"] in FACTORED_VARIANTS and r.get("sum_m_plus_n"):
      lines.append(
        f"{r['variant']}: state - adamw's = {r['state_bytes'] - base:,} bytes; (m + n) "
        f"float32 per pair = {4 * r['sum_m_plus_n']:,} bytes; step counters (int32 scalars) "
        f"{r['state_scalar_bytes']:,} bytes (adamw: {adamw.get('state_scalar_bytes', 0):,})"
      )
  lines.append("")
  return lines
