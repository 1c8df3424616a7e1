"""all-MiniLM-L6-v2 in Flax NNX with LoRA adapters, plus a stdlib code-search task."""

from .model import LORA_TARGETS, LoRALinear, MiniLMConfig, MiniLMEncoder, iter_lora_layers, lora_scale
from .data import CodePair, Splits, build_splits, contrastive_loss, evaluate_retrieval
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
    "CodePair", "Splits", "build_splits", "contrastive_loss", "evaluate_retrieval",
    "LORA_TARGETS", "LoRALinear", "MiniLMConfig", "MiniLMEncoder", "iter_lora_layers", "lora_scale",
    "MiniLMFiles", "embed_texts", "load_pretrained", "load_state_dict", "locate_files",
    "read_safetensors", "to_state_dict", "tokenize", "weights_available",
]
