"""A tiny random SmolLM2-like GGUF, written with ``gguf.GGUFWriter``: for the tests and the
smoke run, which must not need the 93 MB weights package.

Same layout as the real file: Llama metadata, token embedding in Q8_0, projections in Q4_1
with llama.cpp's query/key row permutation, norms in F32, a tied head, and a byte-level BPE
vocabulary (SmolLM2's three control tokens, the 256 byte symbols and a few merges) with
SmolLM2's chat template.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from examples.smollm.weights import LlamaConfig, expected_shapes, permute_qk

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "h e", "i n", "d e", "de f", "Ġt he")
CONFIG = LlamaConfig(
  vocab=len(SPECIAL) + 256 + len(MERGES),
  dim=64,
  layers=3,
  heads=4,
  kv_heads=2,
  ffn=96,
  rope_base=10_000.0,
  norm_eps=1e-5,
)
CHAT_TEMPLATE = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
  "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
  "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_symbols() -> list[str]:
  """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
  extra = iter(range(256, 512))
  return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def vocabulary() -> list[str]:
  return [*SPECIAL, *byte_symbols(), *(m.replace(" ", "") for m in MERGES)]


def random_tensors(c: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Float32 tensors in GGUF order and layout (query/key rows permuted as llama.cpp's)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in expected_shapes(c).items():
    if len(shape) == 1:  # norms around 1
      out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      out[name] = (rng.standard_normal(shape) * shape[-1] ** -0.5).astype(np.float32)
  for i in range(c.layers):
    out[f"blk.{i}.attn_q.weight"] = permute_qk(out[f"blk.{i}.attn_q.weight"], c.heads)
    out[f"blk.{i}.attn_k.weight"] = permute_qk(out[f"blk.{i}.attn_k.weight"], c.kv_heads)
  return out


def qtype(name: str):
  """The tensor types of the real file: Q8_0 embedding, Q4_1 projections, F32 norms."""
  import gguf

  t = gguf.GGMLQuantizationType
  if name == "token_embd.weight":
    return t.Q8_0
  return t.F32 if "norm" in name else t.Q4_1


def write(
  path: str | Path,
  c: LlamaConfig = CONFIG,
  seed: int = 0,
  arch: str = "llama",
  drop: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
  """Writes the GGUF; returns the float tensors before quantization. ``arch`` and ``drop``
  (tensor names left out) make broken files for the error tests."""
  import gguf

  tensors = random_tensors(c, seed)
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.layers)
  w.add_context_length(256)
  w.add_embedding_length(c.dim)
  w.add_feed_forward_length(c.ffn)
  w.add_head_count(c.heads)
  w.add_head_count_kv(c.kv_heads)
  w.add_rope_freq_base(c.rope_base)
  w.add_layer_norm_rms_eps(c.norm_eps)
  w.add_rope_dimension_count(c.head_dim)
  w.add_vocab_size(c.vocab)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  tokens = vocabulary()
  w.add_token_list(tokens)
  w.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
  w.add_token_merges(list(MERGES))
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_chat_template(CHAT_TEMPLATE)
  for name, arr in tensors.items():
    if name in drop:
      continue
    t = qtype(name)
    if t == gguf.GGMLQuantizationType.F32:
      w.add_tensor(name, arr)
    else:
      w.add_tensor(name, gguf.quants.quantize(arr, t), raw_dtype=t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return tensors
