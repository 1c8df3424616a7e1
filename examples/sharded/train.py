"""The optimizer state laid out on the mesh, the donated train step, and an
Orbax checkpoint that is saved and restored onto the same shardings.

``tx.init(params)`` called eagerly on sharded params already lays every moment
out like its param (full mode: each m×n moment like its adapted weight). Under
``jax.jit`` freshly created zeros are not tied to the inputs, so the state's
shardings are passed as ``out_shardings``: `lorapro_jax.state_shardings` gives
them for any mode (Adam moments like the params; full mode's moments like the
weight; factored mode's arrays like A, B and their feature axes; counts
replicated). The same shardings are the target when restoring a checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lorapro_jax as lpj
from examples.sharded import model


@dataclasses.dataclass(frozen=True)
class Config:
  mode: str = "factored"
  steps: int = 200
  batch_size: int = 256
  lr: float = 1e-2
  weight_decay: float = 1e-4
  log_every: int = 50


def make_mesh():
  """("data", "fsdp"): 2 × (devices / 2) where the count is even, else 1 × devices."""
  devices = np.array(jax.devices())
  data = 2 if devices.size % 2 == 0 and devices.size > 1 else 1
  return Mesh(devices.reshape(data, -1), ("data", "fsdp"))


def pair_state_shardings(opt_state):
  """{pair: {field: spec}} of the LoRA-Pro state's per-pair arrays (none in efficient mode)."""
  lorapro_state = opt_state[0]
  moments = getattr(lorapro_state, "pair_moments", {})
  return {
    key: {name: str(x.sharding.spec) for name, x in m._asdict().items()}
    for key, m in moments.items()
  }


def train(config: Config, log=print):
  """Trains the LoRA factors on the mesh; returns (first eval loss, last eval
  loss, lora params, optimizer state)."""
  mesh = make_mesh()
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), model.param_specs())
  batch_sharding = NamedSharding(mesh, P("data", None))
  params = jax.device_put(model.init_params(jax.random.key(0)), shardings)
  frozen, lora = params["frozen"], params["lora"]
  teacher = model.make_teacher(jax.random.key(1), model.init_params(jax.random.key(0))["frozen"])

  tx = lpj.lorapro_adamw(
    optax.cosine_decay_schedule(config.lr, config.steps),
    scale=model.SCALE,
    mode=config.mode,
    weight_decay=config.weight_decay,
  )
  opt_sh = lpj.state_shardings(tx, lora)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(lora)

  def step(lora, opt_state, frozen, batch):
    loss, grads = jax.value_and_grad(model.loss_fn)(lora, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  # Pin the layouts of what the step returns, and donate what it replaces.
  step = jax.jit(
    step, donate_argnums=(0, 1), out_shardings=(shardings["lora"], opt_sh, NamedSharding(mesh, P()))
  )
  log(f"{jax.device_count()} devices, mesh {dict(mesh.shape)}, mode {config.mode}")
  eval_batch = jax.device_put(model.make_batch(jax.random.key(2), teacher, 1024), batch_sharding)
  evaluate = jax.jit(model.loss_fn)
  first = float(evaluate(lora, frozen, eval_batch))
  start = time.time()
  for i in range(config.steps):
    batch = model.make_batch(jax.random.key(100 + i), teacher, config.batch_size)
    lora, opt_state, loss = step(lora, opt_state, frozen, jax.device_put(batch, batch_sharding))
    if i % config.log_every == 0 or i == config.steps - 1:
      log(f"step {i:4d}  train loss {float(loss):.5f}")
  last = float(evaluate(lora, frozen, eval_batch))
  log(f"eval loss {first:.5f} -> {last:.5f} in {time.time() - start:.1f}s")
  for key, fields in pair_state_shardings(opt_state).items():
    log(f"{key} state sharded as {fields}")
  return first, last, lora, opt_state


def checkpoint_round_trip(directory, step, tree):
  """Saves ``tree`` with Orbax (each process writes its shards) and restores it
  onto the same shardings; returns the restored tree."""
  import orbax.checkpoint as ocp  # pip install orbax-checkpoint

  with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
    manager.save(step, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
    # The target carries shapes, dtypes and shardings.
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  same = all(
    jnp.array_equal(a, b) and a.sharding == b.sharding
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree))
  )
  if not same:
    raise RuntimeError(f"the checkpoint in {directory} did not restore what was saved")
  return restored
