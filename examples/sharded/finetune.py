r"""Sharded LoRA-Pro fine-tuning on a device mesh with JAX's SPMD partitioner.

A two-layer MLP with frozen kernels W0 and LoRA adapters learns a rank-4
change of a teacher network (`examples.sharded.model`). Everything is sharded
on a 2-D mesh ("data", "fsdp"):

* the batch is split over "data" (data parallelism: each device computes the
  loss of its examples; ``jax.grad`` all-reduces the gradients);
* frozen kernels, A and B are split over "fsdp" along their long axis (A on in
  features, B on out features), so no device holds a whole factor;
* the optimizer state is laid out like the pairs (`lorapro_jax.state_shardings`):
  factored mode's arrays like A and B and their feature axes, full mode's m×n
  moments like the adapted weight, never replicated.

The optimizer runs inside the jitted, donated train step; its r×r work needs
only all-reduces of r×r Gram partial products (tests/test_sharding.py checks
the collectives of every mode). Every mode runs (factored, the default, has
LoRA's memory), on 8 simulated CPU devices::

    python -m examples.sharded.finetune [--mode factored|full|efficient] [--steps 200]
    python -m examples.sharded.finetune --checkpoint-dir /tmp/ckpt   # Orbax save + restore

Multi-host (one process per TPU host or GPU node): call
``jax.distributed.initialize()`` first thing in every process (Cloud TPU and
SLURM are detected; otherwise pass ``coordinator_address``, ``num_processes``
and ``process_id``). ``jax.devices()`` then lists every process's devices, so
the mesh spans the cluster unchanged. Each process loads its share of a batch
and assembles the global array with
``jax.make_array_from_process_local_data(batch_sharding, local_batch)`` (this
example builds the global batch directly, which only a single process can do),
logs from ``jax.process_index() == 0``, and writes its own shards of an Orbax
checkpoint to a directory every host can reach. ``tests/test_multiprocess.py``
trains every mode this way in two processes with 4 CPU devices each (gloo
collectives) and checks the result and a checkpoint against one 8-device process.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Simulated devices must be requested before jax starts.
if __name__ == "__main__" and "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
if __package__ in (None, ""):  # `python examples/sharded/finetune.py`
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax

from examples.sharded import train


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--mode", choices=("factored", "full", "efficient"), default="factored")
  parser.add_argument("--steps", type=int, default=train.Config.steps)
  parser.add_argument("--batch-size", type=int, default=train.Config.batch_size)
  parser.add_argument("--lr", type=float, default=train.Config.lr)
  parser.add_argument(
    "--checkpoint-dir", default=None, help="save and restore params and state here (Orbax)"
  )
  args = parser.parse_args(argv)
  config = train.Config(mode=args.mode, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
  main_process = jax.process_index() == 0
  log = print if main_process else (lambda *_: None)
  first, last, lora, opt_state = train.train(config, log)
  if args.checkpoint_dir:
    train.checkpoint_round_trip(args.checkpoint_dir, args.steps, {"lora": lora, "opt": opt_state})
    log(f"checkpoint saved to and restored from {args.checkpoint_dir}")
  return first, last


if __name__ == "__main__":
  main()
