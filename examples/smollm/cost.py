"""Cost of each method on this model: optimizer-state bytes and train-step time vs LoRA.

State bytes are exact: ``jax.eval_shape`` of each optimizer's ``init`` on the LoRA weights
of the trained blocks (no learning-rate injection). Step time is the whole jitted train step
(forward and backward through the trained blocks and head, the optimizer, the update
applied; weights and state donated) on real cached batches, timed in interleaved rounds so
that the shared machine's load moves every method alike; each round gives each method's
median step and its ratio to LoRA's.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorapro_jax as lpj
from examples.smollm import report
from examples.smollm.train import LABELS, METHODS

RESULTS = Path(__file__).parent / "results"


def plain_tx(method: str, scale: float, lr: float = 1e-3) -> optax.GradientTransformation:
  if method == "lora":
    return optax.adamw(lr, weight_decay=0.0)
  return lpj.lorapro_adamw(lr, scale=scale, mode=method.removeprefix("lorapro_"), pairs=lpj.QWIX)


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def state_bytes(lora, scale: float, methods=METHODS) -> dict[str, int]:
  return {m: tree_bytes(jax.eval_shape(plain_tx(m, scale).init, lora)) for m in methods}


def step_times(
  setup, methods, rounds: int, steps: int = 3, seed: int = 0
) -> dict[str, list[float]]:
  """Median seconds of ``steps`` train steps per method and round (after one warm-up)."""
  train = setup.splits["train"]
  cfg = setup.cfg
  batch = train.batch(np.random.default_rng(seed).permutation(len(train))[: cfg.batch])
  state = {}
  for m in methods:  # compile and warm up every method first
    t = setup.trainer(m)
    lora = jax.tree.map(jnp.copy, setup.lora(seed))
    opt = t.init(lora)
    lora, opt, loss = t.step(lora, t.frozen, opt, batch, 1e-4)
    loss.block_until_ready()
    state[m] = (lora, opt)
  times = {m: [] for m in methods}
  for _ in range(rounds):
    for m in methods:
      t, (lora, opt) = setup.trainer(m), state[m]
      ts = []
      for _ in range(steps):
        start = time.perf_counter()
        lora, opt, loss = t.step(lora, t.frozen, opt, batch, 1e-4)
        loss.block_until_ready()
        ts.append(time.perf_counter() - start)
      state[m] = (lora, opt)
      times[m].append(float(np.median(ts)))
  return times


def main(cfg, a, setup) -> dict:
  methods = [m for m in METHODS if m in a.methods]
  if "lora" not in methods:
    methods.insert(0, "lora")
  lora = setup.lora(0)
  params = tree_bytes(lora)
  sizes = state_bytes(lora, cfg.scale, methods)
  times = step_times(setup, methods, a.rounds)
  ratios = {m: [t / b for t, b in zip(times[m], times["lora"])] for m in methods}
  result = {
    "commit": report.commit(),
    "config_key": setup.key,
    "config": {
      "train_layers": cfg.train_layers,
      "rank": cfg.rank,
      "batch": cfg.batch,
      "seq_len": cfg.seq_len,
    },
    "python": platform.python_version(),
    "jax": jax.__version__,
    "devices": [str(d) for d in jax.devices()],
    "lora_param_bytes": params,
    "state_bytes": sizes,
    "step_s": times,
    "step_ratio_vs_lora": ratios,
    "rounds": a.rounds,
  }
  lines = [
    "| method | optimizer state (bytes) | vs LoRA | train step vs LoRA, min-max over rounds |",
    "|---|---:|---:|---:|",
  ]
  for m in methods:
    r = ratios[m]
    lines.append(
      f"| {LABELS[m]} | {sizes[m]:,} | {sizes[m] / sizes['lora']:.2f}x | "
      f"{min(r):.2f}-{max(r):.2f}x (median ratio {np.median(r):.2f}x, step {np.median(times[m]):.2f} s) |"
    )
  print(f"LoRA parameters: {params:,} bytes\n" + "\n".join(lines))
  out = Path(a.results) if a.results.suffix == ".json" else RESULTS / "cost.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
  print(f"wrote {out}")
  return result
