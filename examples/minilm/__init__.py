"""all-MiniLM-L6-v2 in Flax NNX with LoRA adapters, plus a stdlib code-search task."""

from .data import CodePair, Splits, build_splits, contrastive_loss, evaluate_retrieval
from .model import (
  LORA_TARGETS,
  LoRALinear,
  MiniLMConfig,
  MiniLMEncoder,
  iter_lora_layers,
  lora_scale,
)
from .weights import (
  MiniLMFiles,
  embed_texts,
  load_pretrained,
  load_state_dict,
  locate_files,
  read_safetensors,
  to_state_dict,
  tokenize,
  weights_available,
)

__all__ = [
  "LORA_TARGETS",
  "CodePair",
  "LoRALinear",
  "MiniLMConfig",
  "MiniLMEncoder",
  "MiniLMFiles",
  "Splits",
  "build_splits",
  "contrastive_loss",
  "embed_texts",
  "evaluate_retrieval",
  "iter_lora_layers",
  "load_pretrained",
  "load_state_dict",
  "locate_files",
  "lora_scale",
  "read_safetensors",
  "to_state_dict",
  "tokenize",
  "weights_available",
]
