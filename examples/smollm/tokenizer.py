"""The GGUF's byte-level BPE tokenizer through the ``tokenizers`` library, and its chat
template.

SmolLM2 is a GPT-2 style byte-level BPE (``tokenizer.ggml.model == "gpt2"``) whose
pre-tokenizer (``tokenizer.ggml.pre == "smollm"``) first splits every digit off, then
applies GPT-2's regex: llama.cpp's ``LLAMA_VOCAB_PRE_TYPE_SMOLLM`` and Hugging Face's
``Sequence([Digits(individual_digits=True), ByteLevel(use_regex=True)])``. Control tokens
(type 3, e.g. ``<|im_start|>``) are special: matched whole in the text, never merged.
"""

from __future__ import annotations

from collections.abc import Sequence

from examples.smollm.weights import field

PRE_TOKENIZERS = ("smollm",)
CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL
# SmolLM2's template (the GGUF's tokenizer.chat_template) inserts this system turn when the
# conversation has none.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def tokenizer_from_gguf(reader):
  """A ``tokenizers.Tokenizer`` from the GGUF's vocabulary, merges and token types.

  ``ValueError`` for a tokenizer model or pre-tokenizer other than SmolLM2's.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  kind = field(reader, "tokenizer.ggml.model")
  pre = field(reader, "tokenizer.ggml.pre", "default")
  if kind != "gpt2" or pre not in PRE_TOKENIZERS:
    raise ValueError(
      f"tokenizer {kind!r} with pre-tokenizer {pre!r}: only 'gpt2' with {PRE_TOKENIZERS} "
      "is supported"
    )
  tokens = field(reader, "tokenizer.ggml.tokens")
  types = field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError("tokenizer.ggml.tokens holds duplicate tokens")
  tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  special = [t for t, ty in zip(tokens, types) if ty == CONTROL]
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
  return tok


def chat_prompt(messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
  """SmolLM2's chat template (the GGUF's Jinja template, written out in Python)."""
  out = []
  if messages and messages[0]["role"] != "system":
    out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
  out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
  if add_generation_prompt:
    out.append("<|im_start|>assistant\n")
  return "".join(out)


def encode(tok, text: str) -> list[int]:
  """Token ids of ``text``; special tokens in it are parsed, no BOS is added (SmolLM2's
  ``tokenizer.ggml.add_bos_token`` is false)."""
  return tok.encode(text, add_special_tokens=False).ids
