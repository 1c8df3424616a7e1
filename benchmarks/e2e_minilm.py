"""End-to-end train step of the MiniLM example (examples/minilm/model.py).

Hook: ``run(...)`` returns ``{"skipped": reason}`` when the example model
cannot be imported (it is built separately), otherwise the median step time
of one jitted train step (forward + backward + optimizer + apply) per
optimizer. The model is randomly initialised (no download: timing does not
depend on the weights); the loss is an in-batch contrastive (InfoNCE) loss
between two random token batches, the shape of a retrieval fine-tune.
"""

from __future__ import annotations

import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorapro_jax as lpj
from benchmarks import timing


def _import_model():
  try:
    from examples.minilm.model import MiniLMConfig, MiniLMEncoder
  except Exception as e:  # not built yet, or broken
    return None, f"examples.minilm.model not importable: {type(e).__name__}: {e}"
  return (MiniLMConfig, MiniLMEncoder), None


def run(*, rank=8, batch=16, seq=32, smoke=False, target_s=2.0, rounds=3) -> dict:
  mod, why = _import_model()
  if mod is None:
    return {"skipped": why}
  try:
    return _run(mod, rank=rank, batch=batch, seq=seq, smoke=smoke, target_s=target_s, rounds=rounds)
  except Exception as e:
    return {
      "skipped": f"MiniLM end-to-end failed: {type(e).__name__}: {e}",
      "traceback": traceback.format_exc(limit=5),
    }


def _run(mod, *, rank, batch, seq, smoke, target_s, rounds):
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
    "adamw": optax.adamw(1e-4),
    "lorapro-sylvester+adamw": optax.chain(lpj.lorapro(scale), optax.adamw(1e-4)),
    "lorapro-full": lpj.lorapro_adamw(1e-4, scale=scale, mode="full"),
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
  full_ft = optax.adamw(1e-4)

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
  res = timing.measure(runners, rounds=rounds, target_s=target_s, max_reps=20)
  floor_ms = res["adamw"]["median_ms"]
  rows = []
  for r in runners:
    rows.append(
      {
        "variant": r.name,
        **res[r.name],
        "compile_s": r.compile_s,
        "ratio_vs_adamw": res[r.name]["median_ms"] / floor_ms,
        **timing.memory_stats(r.compiled),
      }
    )
  n_lora = sum(jnp.size(x) for x in jax.tree.leaves(lora))
  n_base = sum(jnp.size(x) for x in jax.tree.leaves(base))
  return {
    "config": f"MiniLM-L{cfg.num_layers} h{cfg.hidden_size} r{rank} batch 2x{batch}x{seq}",
    "lora_params": int(n_lora),
    "base_params": int(n_base),
    "rows": rows,
  }
