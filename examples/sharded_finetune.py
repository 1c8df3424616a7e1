r"""Sharded LoRA-Pro fine-tuning on a device mesh with JAX's SPMD partitioner.

A small two-layer MLP with frozen base kernels W0 and LoRA adapters
(``lora_a`` (in, r), ``lora_b`` (r, out), delta kernel ``s · a @ b``) learns a
low-rank change of a teacher network. Everything is sharded on a 2-D mesh
("data", "fsdp"):

* the batch is split over "data" (data parallelism: each device computes the
  loss of its examples; ``jax.grad`` all-reduces the gradients);
* frozen kernels, A and B are split over "fsdp" along their long axis (A on in
  features, B on out features), so no device holds a whole factor;
* in full mode the m×n Adam moments of every pair are split like the adapted
  weight (`lorapro_jax.full_moment_shardings`), never replicated.

The optimizer runs inside the jitted train step; its r×r work needs only
all-reduces of r×r Gram partial products (see tests/test_sharding.py).

Run on 8 simulated CPU devices (well under a minute)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python examples/sharded_finetune.py --mode full

Optimizer state shardings. ``tx.init(params)`` called eagerly on sharded
params already lays every moment out like its param (and, in full mode, each
m×n moment like its adapted weight). Under ``jax.jit`` freshly created zeros
are not tied to the inputs, so pass ``out_shardings``: build them with
``optax.tree.map_params`` from the params' shardings (efficient mode, whose
Adam moments are shaped like the params) or from
``lorapro_jax.full_moment_shardings(params)`` (full mode), as ``init_state``
does below. The same shardings serve as the target when restoring a checkpoint.

Multi-host (several processes, e.g. one per TPU host or per GPU node): call
``jax.distributed.initialize()`` first thing in every process (Cloud TPU and
SLURM are detected automatically; otherwise pass ``coordinator_address="host0:1234",
num_processes=N, process_id=i``). Then ``jax.devices()`` lists the devices of
all processes, so the ``Mesh`` below spans the cluster unchanged; every
process runs the same program. Each process loads only its share of a batch
and assembles the global array with
``jax.make_array_from_process_local_data(batch_sharding, local_batch)``
(``make_batch`` below builds the global batch directly, which only a
single-process run can do). Log from ``jax.process_index() == 0``, and save
checkpoints with Orbax (``--checkpoint-dir``), which writes each process's
shards; use a directory every host can reach. Nothing else changes: the
optimizer's collectives are emitted by the partitioner.

``tests/test_multiprocess.py`` runs this on one machine: two processes with 4
CPU devices each (on the CPU, set
``jax.config.update("jax_cpu_collectives_implementation", "gloo")`` before
``jax.distributed.initialize``) train every mode on one 8-device FSDP mesh,
save and restore an Orbax checkpoint from both, and match one 8-device process.
"""

from __future__ import annotations

import argparse
import os
import time

if __name__ == "__main__" and "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lorapro_jax as lpj

DIMS = (64, 128, 32)  # in -> hidden -> out
RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK  # LoRA's s = α / r


def make_mesh():
  devices = np.array(jax.devices())
  data = 2 if devices.size % 2 == 0 and devices.size > 1 else 1
  return Mesh(devices.reshape(data, -1), ("data", "fsdp"))


def param_specs():
  """FSDP: kernels, A (in features) and B (out features) split over "fsdp"."""
  layer = {"lora_a": P("fsdp", None), "lora_b": P(None, "fsdp")}
  return {
    "frozen": {"l1": P("fsdp", None), "l2": P("fsdp", None)},
    "lora": {"l1": layer, "l2": layer},
  }


def init_params(key):
  k = jax.random.split(key, 4)
  (i, h, o) = DIMS
  frozen = {
    "l1": jax.random.normal(k[0], (i, h)) / np.sqrt(i),
    "l2": jax.random.normal(k[1], (h, o)) / np.sqrt(h),
  }
  # LoRA initialisation: A random, B zero.
  lora = {
    "l1": {
      "lora_a": jax.random.normal(k[2], (i, RANK)) / np.sqrt(i),
      "lora_b": jnp.zeros((RANK, h)),
    },
    "l2": {
      "lora_a": jax.random.normal(k[3], (h, RANK)) / np.sqrt(h),
      "lora_b": jnp.zeros((RANK, o)),
    },
  }
  return {"frozen": frozen, "lora": lora}


def forward(lora, frozen, x):
  for name in ("l1", "l2"):
    ab = lora[name]
    x = x @ frozen[name] + SCALE * (x @ ab["lora_a"]) @ ab["lora_b"]
    if name == "l1":
      x = jax.nn.gelu(x)
  return x


def loss_fn(lora, frozen, batch):
  x, y = batch
  return jnp.mean((forward(lora, frozen, x) - y) ** 2)


def make_teacher(key, frozen):
  """The frozen network plus a rank-RANK change of each kernel."""
  k = jax.random.split(key, 4)
  (i, h, o) = DIMS
  shift = lambda ka, kb, m, n: (
    0.5 * (jax.random.normal(ka, (m, RANK)) @ jax.random.normal(kb, (RANK, n))) / np.sqrt(m * RANK)
  )
  return {
    "l1": frozen["l1"] + shift(k[0], k[1], i, h),
    "l2": frozen["l2"] + shift(k[2], k[3], h, o),
  }


def make_batch(key, teacher, batch_size):
  x = jax.random.normal(key, (batch_size, DIMS[0]))
  y = jax.nn.gelu(x @ teacher["l1"]) @ teacher["l2"]
  return x, y


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--mode", choices=("efficient", "full"), default="full")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--lr", type=float, default=1e-2)
  parser.add_argument(
    "--checkpoint-dir",
    default=None,
    help="save params and optimizer state here with Orbax at the end",
  )
  args = parser.parse_args(argv)

  mesh = make_mesh()
  specs = param_specs()
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  batch_sharding = NamedSharding(mesh, P("data", None))
  params = jax.device_put(init_params(jax.random.key(0)), shardings)
  frozen, lora = params["frozen"], params["lora"]
  teacher = make_teacher(jax.random.key(1), init_params(jax.random.key(0))["frozen"])

  tx = lpj.lorapro_adamw(
    optax.cosine_decay_schedule(args.lr, args.steps), scale=SCALE, mode=args.mode, weight_decay=1e-4
  )
  # Moments like the params (Adam) or like the adapted weights (full mode's pair
  # moments); counts replicated.
  opt_sh = lpj.state_shardings(tx, lora)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(lora)

  def train_step(lora, opt_state, frozen, batch):
    loss, grads = jax.value_and_grad(loss_fn)(lora, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  # Pin the layouts of what the step returns, and donate what it replaces.
  train_step = jax.jit(
    train_step,
    donate_argnums=(0, 1),
    out_shardings=(shardings["lora"], opt_sh, NamedSharding(mesh, P())),
  )

  main_process = jax.process_index() == 0
  if main_process:
    print(f"{jax.device_count()} devices, mesh {dict(mesh.shape)}, mode {args.mode}")
  eval_batch = jax.device_put(make_batch(jax.random.key(2), teacher, 1024), batch_sharding)
  evaluate = jax.jit(loss_fn)
  first = float(evaluate(lora, frozen, eval_batch))
  start = time.time()
  for step in range(args.steps):
    batch = jax.device_put(
      make_batch(jax.random.key(100 + step), teacher, args.batch_size), batch_sharding
    )
    lora, opt_state, loss = train_step(lora, opt_state, frozen, batch)
    if main_process and (step % 50 == 0 or step == args.steps - 1):
      print(f"step {step:4d}  train loss {float(loss):.5f}")
  last = float(evaluate(lora, frozen, eval_batch))
  if main_process:
    print(f"eval loss {first:.5f} -> {last:.5f} in {time.time() - start:.1f}s")
    if args.mode == "full":
      moment = opt_state[0].pair_moments["l1"].mu
      print(f"l1 moment {moment.shape} sharded as {moment.sharding.spec}")

  if args.checkpoint_dir:
    import orbax.checkpoint as ocp  # pip install orbax-checkpoint

    with ocp.CheckpointManager(os.path.abspath(args.checkpoint_dir)) as mngr:
      mngr.save(args.steps, args=ocp.args.StandardSave({"lora": lora, "opt_state": opt_state}))
      mngr.wait_until_finished()
      # Restoring onto the mesh: the target carries shapes, dtypes and shardings.
      target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        {"lora": lora, "opt_state": opt_state},
      )
      restored = mngr.restore(args.steps, args=ocp.args.StandardRestore(target))
    assert all(
      jnp.array_equal(a, b)
      for a, b in zip(
        jax.tree.leaves(restored), jax.tree.leaves({"lora": lora, "opt_state": opt_state})
      )
    )
    if main_process:
      print(f"checkpoint saved to and restored from {args.checkpoint_dir}")
  return first, last


if __name__ == "__main__":
  main()
