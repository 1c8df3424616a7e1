"""A two-layer MLP with frozen kernels W0 and LoRA adapters, its FSDP partition
specs, and a teacher with a rank-``RANK`` change of each kernel to learn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

DIMS = (64, 128, 32)  # in -> hidden -> out
RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK  # LoRA's s = α / r


def param_specs():
  """FSDP: kernels, A (in features) and B (out features) split over "fsdp"."""
  layer = {"lora_a": P("fsdp", None), "lora_b": P(None, "fsdp")}
  return {
    "frozen": {"l1": P("fsdp", None), "l2": P("fsdp", None)},
    "lora": {"l1": layer, "l2": layer},
  }


def init_params(key):
  """Frozen kernels, and LoRA's initialisation: A random, B zero
  (``lora_a (in, r)``, ``lora_b (r, out)``, delta kernel ``s · a @ b``)."""
  k = jax.random.split(key, 4)
  (i, h, o) = DIMS
  frozen = {
    "l1": jax.random.normal(k[0], (i, h)) / np.sqrt(i),
    "l2": jax.random.normal(k[1], (h, o)) / np.sqrt(h),
  }
  lora = {
    name: {
      "lora_a": jax.random.normal(key_a, (m, RANK)) / np.sqrt(m),
      "lora_b": jnp.zeros((RANK, n)),
    }
    for name, key_a, m, n in (("l1", k[2], i, h), ("l2", k[3], h, o))
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
  """The frozen network plus a rank-``RANK`` change of each kernel."""
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
