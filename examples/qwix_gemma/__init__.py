"""A Gemma-style NNX decoder with Qwix LoRA, trained with plain LoRA and LoRA-Pro."""
