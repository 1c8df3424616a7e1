"""LoRA-Pro (Wang et al., ICLR 2025) as batched Optax gradient transformations.

Modules, from the math outwards:
  equations:   the paper's equations for one pair, on r×r matrices (pure).
  layout:      the products with the tall factors, on the stored layout.
  batched:     Theorem 2.1 for every pair, the r×r work batched per rank.
  full:        Algorithm 3: Adam moments of each m×n equivalent gradient.
  factored:    Algorithm 3 at LoRA's memory, on Gram matrices of the factors.
  pairs:       finding LoRA (A, B) pairs in a pytree; the pair index.
  sharding:    shardings of the per-pair state on a device mesh.
  transform:   the optax transformations.
  diagnostics: equivalent gradients of every pair.
"""

from lorapro_jax.diagnostics import equivalent_gradients
from lorapro_jax.factored import FactoredMoments, FactoredSecondMoment
from lorapro_jax.full import FullMoments
from lorapro_jax.pairs import FLAX_NNX, PEFT, QWIX, LoRAPair, LoRASpec, find_pairs
from lorapro_jax.sharding import full_moment_shardings, moment_shardings, state_shardings
from lorapro_jax.transform import (
  DEFAULT_DAMPING,
  LoraProWeightDecayState,
  ScaleByLoraProState,
  add_lorapro_weight_decay,
  lorapro,
  lorapro_adamw,
)

__version__ = "0.1.0"

__all__ = [
  "DEFAULT_DAMPING",
  "FLAX_NNX",
  "PEFT",
  "QWIX",
  "FactoredMoments",
  "FactoredSecondMoment",
  "FullMoments",
  "LoRAPair",
  "LoRASpec",
  "LoraProWeightDecayState",
  "ScaleByLoraProState",
  "add_lorapro_weight_decay",
  "equivalent_gradients",
  "find_pairs",
  "full_moment_shardings",
  "lorapro",
  "lorapro_adamw",
  "moment_shardings",
  "state_shardings",
]
