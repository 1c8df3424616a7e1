"""What the train-step sections (update, factored, memory) share."""

from __future__ import annotations

import jax
import numpy as np

from benchmarks import timing, train_step

# (model, layers, rank, variant) -> (state_bytes, param_bytes, memory_stats, compile_s) of
# executables already compiled by the update and factored sections, reused by the memory
# section.
COMPILED_MEMORY: dict = {}


def compiled_runner(name, tx, params, grads, key, cfg, section, log):
  """A donated train-step runner, compiled, and its state and parameter bytes; the
  compiled memory is kept for the memory section (`COMPILED_MEMORY`)."""
  rn = train_step.runner(name, tx, params, grads)
  state = rn.args[1]
  meta = {
    "state_bytes": timing.tree_bytes(state),
    "state_scalar_bytes": timing.tree_bytes([x for x in jax.tree.leaves(state) if not x.shape]),
    "param_bytes": timing.tree_bytes(params),
  }
  rn.compile()
  log(f"[{section}] {cfg}: compiled {name} in {rn.compile_s:.1f}s")
  COMPILED_MEMORY[(*key, name)] = (
    meta["state_bytes"],
    meta["param_bytes"],
    timing.memory_stats(rn.compiled),
    rn.compile_s,
  )
  return rn, meta


def train_step_row(section, cfg, model_name, model, layers, r, rn, meta) -> dict:
  """The fields every timed train-step row has (the section adds the measurements)."""
  return {
    "section": section,
    "config": cfg,
    "model": model_name,
    "layers": layers,
    "total_layers": model.total_layers,
    "rank": r,
    "variant": rn.name,
    "timed": "train step (update + apply_updates, params and state donated)",
    "adapters": layers * len(model.linears),
    "compile_s": rn.compile_s,
    **meta,
    **timing.memory_stats(rn.compiled),
  }


def spread(xs) -> dict:
  """Measurements of one ratio: all of them, their median, min and max."""
  xs = [float(x) for x in xs]
  return {"runs": xs, "value": float(np.median(xs)), "min": min(xs), "max": max(xs)}


def mib(b) -> str:
  if b is None:
    return ""
  return f"{b / 2**20:.1f}" if b >= 2**20 or b == 0 else f"{b / 2**20:.4f}"


def ints(s) -> list[int]:
  """A comma-separated list of integers (an option's type)."""
  return [int(x) for x in str(s).split(",") if x]


def names(s) -> list[str]:
  """A comma-separated list of names (an option's type)."""
  return [x for x in str(s).split(",") if x]
