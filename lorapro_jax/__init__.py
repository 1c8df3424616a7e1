"""LoRA-Pro (Wang et al., ICLR 2025) as batched Optax gradient transformations.

Modules:
  equations:   the paper's equations for one pair (pure functions).
  layout:      the equations' products on the stored (flax or paper) layout.
  pairs:       finding and validating LoRA (A, B) pairs in a pytree.
  batched:     all pairs' r×r work batched per rank; raw or normalised path.
  transform:   the optax transformations `lorapro` and `lorapro_adamw`.
  diagnostics: equivalent gradients of every pair.
"""

from lorapro_jax.diagnostics import equivalent_gradients
from lorapro_jax.pairs import FLAX_NNX, PEFT, QWIX, LoRAPair, LoRASpec, find_pairs
from lorapro_jax.transform import (
  DEFAULT_DAMPING,
  LoraProWeightDecayState,
  PairedSlot,
  ScaleByLoraProFullState,
  add_lorapro_weight_decay,
  full_moment_shardings,
  lorapro,
  lorapro_adamw,
)

__version__ = "0.1.0"

__all__ = [
  "DEFAULT_DAMPING",
  "FLAX_NNX",
  "PEFT",
  "QWIX",
  "LoRAPair",
  "LoRASpec",
  "LoraProWeightDecayState",
  "PairedSlot",
  "ScaleByLoraProFullState",
  "add_lorapro_weight_decay",
  "equivalent_gradients",
  "find_pairs",
  "full_moment_shardings",
  "lorapro",
  "lorapro_adamw",
]
