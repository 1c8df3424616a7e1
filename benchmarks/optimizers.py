"""The optimizers every benchmark times, built the same way everywhere.

Every arm does the same work apart from the method: the same learning rate LR, the
same weight decay WD (AdamW's decoupled decay; full mode's Eq. (57)-(58) decay of A
and B, which decays s·B·A like a dense weight), and ``apply_updates`` (the donated
train step of `benchmarks.train_step`).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

import lorapro_jax as lpj

LR = 1e-4
WD = 1e-4  # optax.adamw's default, given explicitly: every arm decays alike
SCALE = 2.0  # LoRA's alpha / r with alpha = 2r; timing does not depend on it

X_CHOICES = ("sylvester", "zero", "symmetric")
FACTORED_VARIANTS = ("lorapro-factored", "lorapro-factored-b1=0")
# Arms that run on dense m×n weights instead of the LoRA factors.
DENSE_ARMS = ("dense-adamw",)


def adamw_tx():
  return optax.adamw(LR, weight_decay=WD)


def efficient_tx(x_choice="sylvester", lib=lpj):
  """chain(lorapro(x_choice), adamw); ``lib``: another copy of the library (a patched one)."""
  return optax.chain(lib.lorapro(SCALE, x_choice=x_choice), adamw_tx())


def full_tx(moment_dtype=jnp.float32):
  return lpj.lorapro_adamw(LR, scale=SCALE, mode="full", weight_decay=WD, moment_dtype=moment_dtype)


def factored_tx(b1=None):
  """lorapro_adamw(mode='factored') (b1=0.0: the second moment only)."""
  kw = {} if b1 is None else {"b1": b1}
  return lpj.lorapro_adamw(LR, scale=SCALE, mode="factored", weight_decay=WD, **kw)


def every_mode(full: bool = True) -> dict:
  """name -> optimizer: adamw, efficient, both factored variants and, with ``full``, full
  mode (float32 and bfloat16 moments) and ``dense-adamw`` (run it on `DENSE_ARMS`' trees)."""
  out = {
    "adamw": adamw_tx(),
    "lorapro-sylvester+adamw": efficient_tx(),
    "lorapro-factored": factored_tx(),
    "lorapro-factored-b1=0": factored_tx(0.0),
  }
  if full:
    out["lorapro-full"] = full_tx(jnp.float32)
    out["lorapro-full-bf16"] = full_tx(jnp.bfloat16)
    out["dense-adamw"] = adamw_tx()
  return out


# `benchmarks.compile_time`'s short names of the modes.
MODES = {
  "adamw": adamw_tx,
  "efficient": efficient_tx,
  "factored": factored_tx,
  "factored-b1=0": lambda: factored_tx(0.0),
  "full": full_tx,
}


def scope_mode(variant: str) -> str | None:
  """Which of `hlo_traffic.STAGES`' modes an arm runs (None: no LoRA-Pro stage)."""
  if "factored" in variant:
    return "factored"
  if "full" in variant and variant != "full-ft-adamw":
    return "full"
  if variant.startswith("lorapro"):
    return "efficient"
  return None
