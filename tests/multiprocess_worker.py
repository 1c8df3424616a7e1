"""One process of a multi-process LoRA-Pro run on JAX's CPU backend; run by
`tests/test_multiprocess.py`, which starts two of these (4 CPU devices each,
``jax.distributed`` with gloo collectives: one 8-device mesh spanning both) and a
third with 8 devices and no ``jax.distributed`` as the single-process reference:

    python tests/multiprocess_worker.py --out DIR --checkpoint-dir CKPT \
        --num-processes 2 --process-id I --coordinator 127.0.0.1:PORT

For every mode of ``lorapro_jax.transform.Mode`` it trains a small LoRA model
with ``lorapro_adamw`` on a 1-D "fsdp" mesh: the LoRA factors, frozen kernels
and head split along their long axis, the batch split over the same axis, the
optimizer state created by ``jax.jit(tx.init, out_shardings=state_shardings)``,
a jitted train step (``jax.grad`` + ``tx.update`` + ``optax.apply_updates``)
with params and optimizer state donated. After `SAVE_AT` steps every process
saves params and state with Orbax (``CheckpointManager``, ``StandardSave``),
and training goes on to `STEPS`. Then the checkpoint is restored onto the mesh
(``StandardRestore`` with a sharded abstract target built from a fresh
optimizer) and the same remaining steps are trained again.

Nothing is asserted here. Every array the test compares is gathered to the host
(``multihost_utils.process_allgather``) and written to ``DIR/result.npz``;
``DIR/result.json`` holds the set-up, each step's loss as this process
sees it, and the shardings of the state before saving and after restoring.
Results go to files because gloo prints to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lorapro_jax as lpj
from lorapro_jax import transform

# Every mode the installed library has (a mode added to `Mode` is run too).
MODES: tuple[str, ...] = typing.get_args(transform.Mode)

# in -> hidden (q pair), LAYERS residual hidden -> hidden layers (stacked mlp pair),
# hidden -> OUT head (a plain trained leaf). Flax layout: lora_a (..., in, r), lora_b (..., r, out).
IN, HIDDEN, OUT, R, LAYERS, BATCH = 32, 64, 8, 4, 2, 64
SCALE = 2.0
STEPS, SAVE_AT = 5, 2

FSDP = "fsdp"
PARAM_SPECS = {
  "q": {"lora_a": P(FSDP, None), "lora_b": P(None, FSDP)},
  "mlp": {"lora_a": P(None, FSDP, None), "lora_b": P(None, None, FSDP)},
  "head": P(FSDP, None),
}
FROZEN_SPECS = {"q": P(FSDP, None), "mlp": P(None, FSDP, None)}
BATCH_SPEC = P(FSDP, None)


def host_params():
  """Host-identical initial values (every process computes the same ones)."""
  rng = np.random.default_rng(0)
  f = lambda scale, *s: (scale * rng.standard_normal(s)).astype(np.float32)
  params = {
    # LoRA initialisation (B = 0) for q: the first step takes the normalised path.
    "q": {"lora_a": f(IN**-0.5, IN, R), "lora_b": np.zeros((R, HIDDEN), np.float32)},
    "mlp": {"lora_a": f(HIDDEN**-0.5, LAYERS, HIDDEN, R), "lora_b": f(0.1, LAYERS, R, HIDDEN)},
    "head": f(HIDDEN**-0.5, HIDDEN, OUT),
  }
  frozen = {"q": f(IN**-0.5, IN, HIDDEN), "mlp": f(HIDDEN**-0.5, LAYERS, HIDDEN, HIDDEN)}
  return params, frozen


def host_batch(step):
  rng = np.random.default_rng(1000 + step)
  x = rng.standard_normal((BATCH, IN)).astype(np.float32)
  y = np.sin(x[:, :OUT] + x[:, OUT : 2 * OUT]).astype(np.float32)
  return x, y


def loss_fn(params, frozen, batch):
  x, y = batch
  q = params["q"]
  h = jax.nn.gelu(x @ frozen["q"] + SCALE * (x @ q["lora_a"]) @ q["lora_b"])
  m = params["mlp"]
  for layer in range(LAYERS):
    delta = SCALE * (h @ m["lora_a"][layer]) @ m["lora_b"][layer]
    h = h + jnp.tanh(h @ frozen["mlp"][layer] + delta)
  return jnp.mean((h @ params["head"] - y) ** 2)


def place(host, sharding):
  """A global array from a host-identical value: each process fills its shards."""
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_local(host, sharding):
  """A global batch from this process's rows only, as a multi-host input pipeline would."""
  index_map = sharding.addressable_devices_indices_map(host.shape)
  rows = sorted({(i[0].start or 0, i[0].stop or host.shape[0]) for i in index_map.values()})
  local = np.concatenate([host[a:b] for a, b in rows])
  return jax.make_array_from_process_local_data(sharding, local, host.shape)


def to_host(tree):
  """Global arrays as NumPy arrays, identical in every process."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def flatten(tree, prefix):
  """{'prefix/path': array} for every leaf of ``tree``."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    out[prefix + jax.tree_util.keystr(path)] = leaf
  return out


def specs(tree):
  return {
    jax.tree_util.keystr(p): str(x.sharding.spec)
    for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def make_tx(mode):
  return lpj.lorapro_adamw(
    optax.linear_schedule(1e-2, 1e-3, STEPS), scale=SCALE, mode=mode, weight_decay=1e-2
  )


def make_step(tx, param_sh, state_sh, replicated):
  def train_step(params, opt_state, frozen, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, updates

  return jax.jit(
    train_step,
    donate_argnums=(0, 1),
    out_shardings=(param_sh, state_sh, replicated, param_sh),
  )


def run_mode(mode, mesh, checkpoint_dir, arrays, report):
  import orbax.checkpoint as ocp

  param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), PARAM_SPECS)
  frozen_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), FROZEN_SPECS)
  batch_sh = NamedSharding(mesh, BATCH_SPEC)
  replicated = NamedSharding(mesh, P())
  hp, hf = host_params()
  params = jax.tree.map(place, hp, param_sh)
  frozen = jax.tree.map(place, hf, frozen_sh)
  batches = [tuple(place_local(a, batch_sh) for a in host_batch(t)) for t in range(STEPS)]

  tx = make_tx(mode)
  state_sh = lpj.state_shardings(tx, params)
  opt_state = jax.jit(tx.init, out_shardings=state_sh)(params)
  step = make_step(tx, param_sh, state_sh, replicated)

  def train(params, opt_state, step, start, stop, tag):
    losses = []
    for t in range(start, stop):
      params, opt_state, loss, updates = step(params, opt_state, frozen, batches[t])
      arrays.update(flatten(to_host(updates), f"{mode}/{tag}/updates/{t}"))
      losses.append(float(np.asarray(loss.addressable_data(0))))  # this process's replica
    return params, opt_state, losses

  params, opt_state, report["loss"] = train(params, opt_state, step, 0, SAVE_AT, "run")
  saved = {"params": params, "opt_state": opt_state}
  report["saved_specs"] = specs(saved)
  arrays.update(flatten(to_host(saved), f"{mode}/saved"))
  directory = os.path.join(checkpoint_dir, mode)
  with ocp.CheckpointManager(directory) as mngr:
    mngr.save(SAVE_AT, args=ocp.args.StandardSave(saved))
    mngr.wait_until_finished()
  del saved  # the next step donates these arrays

  params, opt_state, losses = train(params, opt_state, step, SAVE_AT, STEPS, "run")
  report["loss"] += losses
  arrays.update(flatten(to_host({"params": params, "opt_state": opt_state}), f"{mode}/final"))
  del params, opt_state

  # The restore target from a fresh optimizer, as a restarted job would build it. The train
  # step is reused (a restarted job would compile the same program again; saves compile time).
  tx = make_tx(mode)
  abstract_params = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), hp, param_sh
  )
  state_sh = lpj.state_shardings(tx, abstract_params)
  abstract = {"params": abstract_params, "opt_state": jax.eval_shape(tx.init, abstract_params)}
  shardings = {"params": param_sh, "opt_state": state_sh}
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  with ocp.CheckpointManager(directory) as mngr:
    report["latest_step"] = mngr.latest_step()
    restored = mngr.restore(SAVE_AT, args=ocp.args.StandardRestore(target))
  report["restored_specs"] = specs(restored)
  report["restored_shardings_match_target"] = all(
    x.sharding.is_equivalent_to(t.sharding, x.ndim)
    for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target))
  )
  arrays.update(flatten(to_host(restored), f"{mode}/restored"))
  params, opt_state, losses = train(
    restored["params"], restored["opt_state"], step, SAVE_AT, STEPS, "resumed"
  )
  report["resumed_loss"] = losses
  arrays.update(flatten(to_host({"params": params, "opt_state": opt_state}), f"{mode}/resumed"))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--checkpoint-dir", required=True)
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--coordinator", default=None)
  args = parser.parse_args()

  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
    )
  mesh = Mesh(np.array(jax.devices()), (FSDP,))
  report = {
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "device_count": jax.device_count(),
    "local_device_count": jax.local_device_count(),
    "mesh_processes": sorted({d.process_index for d in mesh.devices.flat}),
    "modes": {},
  }
  arrays = {}
  for mode in MODES:
    report["modes"][mode] = {}
    run_mode(mode, mesh, args.checkpoint_dir, arrays, report["modes"][mode])
  np.savez(os.path.join(args.out, "result.npz"), **arrays)
  with open(os.path.join(args.out, "result.json"), "w") as f:
    json.dump(report, f)


if __name__ == "__main__":
  try:
    main()
  except BaseException:
    # Exit at once: a normal exit would wait in jax.distributed's shutdown barrier for the
    # peer, which waits for this process, for minutes.
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
