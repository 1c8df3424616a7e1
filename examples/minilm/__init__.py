"""all-MiniLM-L6-v2 in Flax NNX with LoRA adapters, plus a stdlib code-search task."""

from .model import LORA_TARGETS, LoRALinear, MiniLMConfig, MiniLMEncoder, iter_lora_layers, lora_scale
from .weights import (
    MiniLMFiles,
    embed_texts,
    load_pretrained,
    load_state_dict,
    locate_files,
    read_safetensors,
    tokenize,
    weights_available,
)

__all__ = [
    "LORA_TARGETS", "LoRALinear", "MiniLMConfig", "MiniLMEncoder", "iter_lora_layers", "lora_scale",
    "MiniLMFiles", "embed_texts", "load_pretrained", "load_state_dict", "locate_files",
    "read_safetensors", "tokenize", "weights_available",
]
