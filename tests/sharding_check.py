"""Runs `lorapro` under `jax.jit` on 8 simulated CPU devices; prints a JSON report.

Run in a subprocess by `tests/test_sharding.py` (the pytest process has already
initialised JAX with one device):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_check.py

For every layout (FSDP, tensor-parallel, data-parallel) and mode, in float32,
and FSDP efficient mode in float64 (with LORAPRO_SHARDING_X64=1 also FSDP full
mode, whose float64 single-device reference costs about twice as much), it
trains a few steps with LoRA params, gradients and optimizer state sharded on a
`jax.sharding.Mesh`, and records

* the largest difference from the same steps on a single device,
* the shardings of the updates and of the full-mode moments, pair moments and
  the head's Adam moments (after eager
  init, after jitted init with ``out_shardings``, and after the steps),
* every collective in the compiled update's HLO (``compiled.as_text()``) with
  its result shape(s).

The JSON goes to stdout; nothing is asserted here.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lorapro_jax as lpj

# Two pair shapes (two groups of one rank share one batched eigh), a stack of
# layers, multi-axis features (v: out features (heads, head_dim), as an attention
# projection's; o: in features (heads, head_dim), as an output projection's) and
# a non-LoRA leaf. Flax layout: lora_a (batch…, in…, r), lora_b (batch…, r, out…).
IN, OUT, OUT2, R, LAYERS, SCALE = 64, 128, 96, 4, 2, 2.0
HEADS = 8
STEPS = 3

# Each layout: mesh axis names and shape, and the PartitionSpec of every leaf.
LAYOUTS = {
  # A and B split along their long axis (in features for A, out for B).
  "fsdp": (
    ("fsdp",),
    (8,),
    {
      "q": {"lora_a": P("fsdp", None), "lora_b": P(None, "fsdp")},
      "v": {"lora_a": P("fsdp", None), "lora_b": P(None, "fsdp", None)},
      "mlp": {"lora_a": P(None, "fsdp", None), "lora_b": P(None, None, "fsdp")},
      "o": {"lora_a": P("fsdp", None, None), "lora_b": P(None, "fsdp")},
      "head": P("fsdp", None),
    },
  ),
  # Split along output features: B's out axis, A replicated (column-parallel).
  "tp": (
    ("model",),
    (8,),
    {
      "q": {"lora_a": P(), "lora_b": P(None, "model")},
      "v": {"lora_a": P(), "lora_b": P(None, "model", None)},  # split over heads
      "mlp": {"lora_a": P(), "lora_b": P(None, None, "model")},
      "o": {"lora_a": P("model", None, None), "lora_b": P()},  # row-parallel
      "head": P(None, "model"),
    },
  ),
  # Replicated params; per-device batch gradients are all-reduced by the loss's
  # jit before the optimizer sees them, so the optimizer gets replicated grads.
  "dp": (
    ("data",),
    (8,),
    {
      "q": {"lora_a": P(), "lora_b": P()},
      "v": {"lora_a": P(), "lora_b": P()},
      "mlp": {"lora_a": P(), "lora_b": P()},
      "o": {"lora_a": P(), "lora_b": P()},
      "head": P(),
    },
  ),
}

# Data parallelism with ZeRO-style optimizer state: replicated params, the
# full-mode moments split over the data axis (a user choice through out_shardings).
DP_MOMENT_SPECS = {
  "q": P("data", None),
  "v": P("data", None),
  "mlp": P(None, "data", None),
  "o": P("data", None, None),
  "head": P("data", None),
}

COLLECTIVE = re.compile(
  r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|"
  r"collective-permute|collective-broadcast)(?:-start)?\("
)


def make_params(dtype):
  rng = np.random.default_rng(0)
  normal = lambda *s: rng.standard_normal(s).astype(dtype)
  return {
    "q": {"lora_a": normal(IN, R), "lora_b": normal(R, OUT)},
    "v": {"lora_a": normal(IN, R), "lora_b": normal(R, HEADS, OUT2 // HEADS)},
    "mlp": {"lora_a": normal(LAYERS, IN, R), "lora_b": normal(LAYERS, R, OUT)},
    "o": {"lora_a": normal(HEADS, IN // HEADS, R), "lora_b": normal(R, OUT)},
    "head": normal(OUT, 8),
  }


def make_grads(params, step):
  """Consistent LoRA gradients of a random full kernel gradient G (in, out):
  dL/da = s·G·bᵀ, dL/db = s·aᵀ·G (Eq. 5 in the flax layout), with the feature
  axes of multi-axis pairs merged for the products."""
  rng = np.random.default_rng(100 + step)
  pairs = {f.path[0]: f for f in lpj.find_pairs(params)}
  out = {}
  for k, v in params.items():
    if k == "head":
      out[k] = rng.standard_normal(v.shape).astype(v.dtype)
      continue
    f = pairs[k]
    a, b = np.asarray(v["lora_a"]), np.asarray(v["lora_b"])
    a2, b2 = a.reshape(f.batch_shape + (f.n, f.r)), b.reshape(f.batch_shape + (f.r, f.m))
    G = rng.standard_normal(f.batch_shape + (f.n, f.m)).astype(a.dtype)
    out[k] = {
      "lora_a": (SCALE * G @ np.swapaxes(b2, -1, -2)).reshape(a.shape),
      "lora_b": (SCALE * np.swapaxes(a2, -1, -2) @ G).reshape(b.shape),
    }
  return out


def make_tx(mode):
  if mode == "efficient":
    return optax.chain(lpj.lorapro(SCALE), optax.sgd(0.01))
  return lpj.lorapro_adamw(0.01, scale=SCALE, mode=mode, weight_decay=0.1)


def spec_of(x):
  s = x.sharding
  return (
    [list(a) if isinstance(a, tuple) else a for a in s.spec]
    if isinstance(s, NamedSharding)
    else str(s)
  )


def moment_specs(state):
  """Specs of the moments: per pair, the m×n first moment (full mode; its
  second is checked to match) or every field (factored mode), and the Adam
  moment of the non-LoRA head."""
  lorapro_state = state[0]
  out = {}
  for key, moments in lorapro_state.pair_moments.items():
    if isinstance(moments, lpj.FullMoments):
      assert spec_of(moments.mu) == spec_of(moments.nu), key
      out[key] = spec_of(moments.mu)
    else:
      out[key] = {k: spec_of(v) for k, v in moments._asdict().items()}
  out["head"] = spec_of(lorapro_state.adam_state.inner_state.mu["head"])
  return out


def dp_state_shardings(tx, params, mesh):
  """ZeRO-style data parallelism: replicated params, every moment split over
  the data axis (a user choice, given through out_shardings)."""
  specs = {k: NamedSharding(mesh, v) for k, v in DP_MOMENT_SPECS.items()}

  def place(path, sharding):
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if "pair_moments" in keys:
      return specs[keys[keys.index("pair_moments") + 1]]
    if keys[-1:] == ["head"] and ("mu" in keys or "nu" in keys):
      return specs["head"]
    return sharding

  return jax.tree_util.tree_map_with_path(place, lpj.state_shardings(tx, params))


def collectives(hlo: str):
  return [{"op": m["op"], "shape": m["shape"]} for m in COLLECTIVE.finditer(hlo)]


def train(tx, params, state, steps, update=None):
  """``steps`` steps; returns the final params and state and every step's updates."""
  history = []
  for t in range(steps):
    grads = make_grads(params, t)
    if update is None:
      update = jax.jit(tx.update)
    else:  # lay the gradients out like the params, as a sharded backward pass would
      grads = jax.tree.map(lambda g, p: jax.device_put(g, p.sharding), grads, params)
    u, state = update(grads, state, params)
    params = optax.apply_updates(params, u)
    history.append(u)
  return params, state, history


MOMENT_MODES = ("full", "factored")
_REFERENCE = {}


def run_case(name, mode, dtype):
  axis_names, shape, specs = LAYOUTS[name]
  mesh = Mesh(np.array(jax.devices()).reshape(shape), axis_names)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  host = make_params(dtype)
  tx = make_tx(mode)

  key = (mode, np.dtype(dtype).name)
  if key not in _REFERENCE:  # the same steps on a single device
    _REFERENCE[key] = train(tx, jax.tree.map(jnp.asarray, host), tx.init(host), STEPS)[2]
  ref_updates = _REFERENCE[key]

  params = jax.device_put(host, shardings)
  report = {"layout": name, "mode": mode, "dtype": np.dtype(dtype).name}
  if mode in MOMENT_MODES:
    report["moments_eager_init"] = moment_specs(tx.init(params))
    # Under jit, freshly created zeros have no tie to the params: pass shardings.
    if name == "dp" and mode == "full":
      state_sh = dp_state_shardings(tx, params, mesh)
    else:
      state_sh = lpj.state_shardings(tx, params)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    report["moments_jit_init"] = moment_specs(state)
  else:
    state = tx.init(params)

  # A training step keeps the updates laid out like the params; the state's
  # layout is left to the partitioner (it keeps the moments as they came in).
  grads0 = jax.device_put(make_grads(host, 0), shardings)
  update = jax.jit(tx.update, out_shardings=(shardings, None))
  update = update.lower(grads0, state, params).compile()
  report["collectives"] = collectives(update.as_text())

  _, state, updates = train(tx, params, state, STEPS, update)
  report["update_specs"] = jax.tree.map(spec_of, updates[-1])
  report["param_specs"] = jax.tree.map(spec_of, params)
  if mode in MOMENT_MODES:
    report["moments_after_steps"] = moment_specs(state)
  # Every step's updates, relative to the largest single-device update of the leaf.
  f64 = lambda x: np.asarray(x, np.float64)
  rel = [
    jax.tree.map(
      lambda a, b: float(np.max(np.abs(f64(a) - f64(b))) / np.max(np.abs(f64(b)))), u, ref
    )
    for u, ref in zip(updates, ref_updates)
  ]
  report["rel_diff"] = rel
  report["max_rel_diff"] = max(jax.tree.leaves(rel))
  return report


def main():
  assert jax.device_count() == 8, jax.devices()
  reports = []
  for name in LAYOUTS:
    for mode in ("efficient", *MOMENT_MODES):
      reports.append(run_case(name, mode, np.float32))
  with jax.enable_x64(True):  # float64: agreement down to rounding
    reports.append(run_case("fsdp", "efficient", np.float64))
    if os.environ.get("LORAPRO_SHARDING_X64"):
      reports.append(run_case("fsdp", "full", np.float64))
  shapes = {"in": IN, "out": OUT, "out2": OUT2, "r": R, "layers": LAYERS, "heads": HEADS}
  meta = {"shapes": shapes}
  print(json.dumps({"meta": meta, "cases": reports}))


if __name__ == "__main__":
  main()
