"""Efficient mode as users run it: the donated train step (finding F9 in benchmarks/FINDINGS.md).

    python -m benchmarks.train_step                      # Llama-2-7B shapes, r = 8, L = 1, 2, 8
    python -m benchmarks.train_step --layers 2 --profile out/prof   # + per-HLO-op CPU times
    python -m benchmarks.train_step --hlo out/hlo        # + compiled HLO text of every arm
    PYTHONPATH=/tmp/x python -m benchmarks.train_step --module proto=lorapro_proto
        # + an arm built from another copy of the library (same interleaved rounds)

Every arm is the step a training loop runs, jitted with params and optimizer
state donated (``donate_argnums=(0, 1)``) and fed back after each call; the
gradients are fixed inputs (not donated)::

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

with ``tx = optax.adamw(LR, weight_decay=WD)`` (plain LoRA) and
``tx = optax.chain(lpj.lorapro(SCALE), optax.adamw(LR, weight_decay=WD))``
(LoRA-Pro efficient mode), both with the same weight decay (`benchmarks.optimizers`). The arms of one
configuration are timed interleaved over rounds, so the ratio comes from the
same rounds of the same run; each configuration prints its median ratio.
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib
import json
import os
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import optax

from benchmarks import models, optimizers, timing


def train_step(tx):
  """The step users run: optimizer update and apply_updates."""

  def step(params, state, grads):
    # Scopes for `hlo_traffic`'s attribution of the ops outside LoRA-Pro's own stages.
    with jax.named_scope("step/update"):
      updates, state = tx.update(grads, state, params)
    with jax.named_scope("step/apply_updates"):
      return optax.apply_updates(params, updates), state

  return step


def runner(name, tx, params, grads) -> timing.Runner:
  """A `timing.Runner` of ``train_step(tx)`` with its own (donated) copy of params and state."""
  params = jax.tree.map(jnp.copy, params)
  return timing.Runner(name, train_step(tx), [params, tx.init(params), grads], carry=(0, 1))


def arms(modules=()):
  """name -> optimizer; ``modules``: (label, importable package) pairs, e.g. a patched copy."""
  out = {"adamw": optimizers.adamw_tx(), "lorapro+adamw": optimizers.efficient_tx()}
  for label, mod in modules:
    out[f"lorapro[{label}]+adamw"] = optimizers.efficient_tx(lib=importlib.import_module(mod))
  return out


def profile_ops(rn: timing.Runner, logdir: str, calls: int = 20) -> dict:
  """Per-HLO-op CPU time (ms per step) of a compiled runner, from a `jax.profiler` trace.

  Needs ``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true`` set before JAX starts
  (``main`` does it for ``--profile``); op names match ``compiled.as_text()``.
  """
  for _ in range(3):
    rn.call()
  with jax.profiler.trace(logdir):
    for _ in range(calls):
      rn.call()
  files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
  data = jax.profiler.ProfileData.from_file(files[-1])
  tot = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        tot[ev.name] += ev.duration_ns
  return {k: v / 1e6 / calls for k, v in tot.items()}


def bench(model_name, layers, rank, *, modules=(), rounds=7, target_s=1.5, hlo_dir=None, log=print):
  model = models.MODELS[model_name]
  params, grads = models.lora_tree(model, layers, rank, seed=1)
  runners = []
  for name, tx in arms(modules).items():
    rn = runner(name, tx, params, grads)
    if hlo_dir:
      os.makedirs(hlo_dir, exist_ok=True)
      stem = os.path.join(hlo_dir, f"{model_name}-L{layers}-r{rank}-{name}")
      with open(stem + ".compiled.txt", "w") as f:
        f.write(rn.lowered().compile().as_text())
    runners.append(rn.compile())
    log(f"  compiled {name} in {rn.compile_s:.1f}s")
  res = timing.measure(runners, rounds=rounds, target_s=target_s)
  base = res["adamw"]["median_ms"]
  rows = [
    {
      "model": model_name,
      "layers": layers,
      "rank": rank,
      "variant": rn.name,
      **res[rn.name],
      "ratio_vs_adamw": res[rn.name]["median_ms"] / base,
      "compile_s": rn.compile_s,
      **timing.memory_stats(rn.compiled),
    }
    for rn in runners
  ]
  return rows, runners


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--model", default="llama2-7b", choices=sorted(models.MODELS))
  ap.add_argument("--layers", default="1,2,8", help="comma-separated layer counts")
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--target-s", type=float, default=1.5, help="seconds of calls per arm")
  ap.add_argument("--repeats", type=int, default=1, help="independent measurements per config")
  ap.add_argument(
    "--module",
    action="append",
    default=[],
    help="LABEL=PACKAGE: also time chain(PACKAGE.lorapro, adamw), e.g. a patched copy",
  )
  ap.add_argument("--hlo", default=None, help="write each arm's compiled HLO text here")
  ap.add_argument("--profile", default=None, help="write per-op profiles (JSON) here")
  ap.add_argument("--out", default=None, help="write the rows as JSON here")
  args = ap.parse_args(argv)
  if args.profile:
    timing.enable_op_profiles()
  warnings.filterwarnings("ignore", message=".*[Dd]onat.*")
  modules = [tuple(m.split("=", 1)) for m in args.module]
  out = {"device": timing.device_info(), "provenance": timing.provenance(), "rows": []}
  print(
    f"{out['device']['label']}; jax {jax.__version__}; commit {out['provenance']['git_commit']}"
  )
  for layers in [int(x) for x in args.layers.split(",") if x]:
    for rep in range(args.repeats):
      print(f"{args.model} L{layers} r{args.rank} (measurement {rep + 1}/{args.repeats}):")
      sys.stdout.flush()
      rows, runners = bench(
        args.model,
        layers,
        args.rank,
        modules=modules,
        rounds=args.rounds,
        target_s=args.target_s,
        hlo_dir=args.hlo if rep == 0 else None,
      )
      for r in rows:
        r["repeat"] = rep
        print(
          f"  {r['variant']:24s} {r['median_ms']:9.2f} ms (p25-p75 {r['p25_ms']:.2f}-"
          f"{r['p75_ms']:.2f})  {r['ratio_vs_adamw']:5.2f}x adamw"
        )
      out["rows"] += rows
      if args.profile and rep == 0:
        os.makedirs(args.profile, exist_ok=True)
        for rn in runners:
          with tempfile.TemporaryDirectory() as d:
            ops = profile_ops(rn, d)
          top = sorted(ops.items(), key=lambda kv: -kv[1])
          path = os.path.join(args.profile, f"{args.model}-L{layers}-r{args.rank}-{rn.name}.json")
          with open(path, "w") as f:
            json.dump(dict(top), f, indent=1)
          print(f"  profile {rn.name}: top ops (ms/step) -> {path}")
          for k, v in top[:12]:
            print(f"    {v:8.3f}  {k}")
      sys.stdout.flush()
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1, default=str)
  return out


if __name__ == "__main__":
  main()
