"""SmolLM2-135M-Instruct from its GGUF file in Flax NNX, adapted with Qwix LoRA (issue 20)."""
