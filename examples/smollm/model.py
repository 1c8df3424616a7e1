"""A Llama decoder in Flax NNX with Hugging Face's parameter names, loaded from a GGUF.

Pre-norm blocks: RMSNorm, grouped-query attention with rotary embeddings (rotate-half
layout, see ``weights.py``), RMSNorm, SwiGLU MLP; a final RMSNorm and an output head tied
to the token embedding. Every projection is an ``nnx.Linear`` without bias (kernel
(in, out)), so Qwix's ``apply_lora_to_model`` adapts it: paths such as
``layers/29/self_attn/q_proj`` and ``layers/29/mlp/down_proj``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.smollm.weights import (
  LlamaConfig,
  hf_layout,
  locate_gguf,
  open_gguf,
  read_config,
  read_tensors,
)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.weight[...]


def rope(x, positions, base: float):
  """Rotate-half rotary embeddings on ``x`` (B, T, heads, D) at ``positions`` (B, T)."""
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[:, :, None, None].astype(jnp.float32) * inv_freq
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  a, b = x[..., :half], x[..., half:]
  return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


class KVCache(NamedTuple):
  """Keys and values of one layer, (B, S, kv_heads, D), filled up to ``length``."""

  k: jax.Array
  v: jax.Array
  length: jax.Array  # int32 scalar


def attend(q, k, v, q_pos, k_pos):
  """Causal grouped-query attention: q (B, T, H, D), k and v (B, S, KV, D); a key attends
  where 0 <= k_pos <= q_pos (k_pos -1 marks an empty cache slot)."""
  B, T, H, D = q.shape
  kv = k.shape[2]
  q = q.reshape(B, T, kv, H // kv, D)
  s = jnp.einsum("btkgd,bskd->bkgts", q, k) * D**-0.5
  mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)
  s = jnp.where(mask[:, None, None], s, jnp.finfo(s.dtype).min)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(B, T, H * D)


class Attention(nnx.Module):
  def __init__(self, c: LlamaConfig, rngs: nnx.Rngs):
    self.c = c
    lin = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
    kv = c.kv_heads * c.head_dim
    self.q_proj, self.k_proj = lin(c.dim, c.dim), lin(c.dim, kv)
    self.v_proj, self.o_proj = lin(c.dim, kv), lin(c.dim, c.dim)

  def __call__(self, x, positions, cache: KVCache | None = None):
    c, (B, T, _) = self.c, x.shape
    q = rope(self.q_proj(x).reshape(B, T, c.heads, c.head_dim), positions, c.rope_base)
    k = rope(self.k_proj(x).reshape(B, T, c.kv_heads, c.head_dim), positions, c.rope_base)
    v = self.v_proj(x).reshape(B, T, c.kv_heads, c.head_dim)
    if cache is None:
      out = attend(q, k, v, positions, positions)
    else:  # write this chunk at cache.length, attend to everything written so far
      at = (0, cache.length, 0, 0)
      ks = jax.lax.dynamic_update_slice(cache.k, k, at)
      vs = jax.lax.dynamic_update_slice(cache.v, v, at)
      slots = jnp.arange(ks.shape[1])
      k_pos = jnp.where(slots < cache.length + T, slots, -1)
      out = attend(q, ks, vs, positions, jnp.broadcast_to(k_pos, (B, ks.shape[1])))
      cache = KVCache(ks, vs, cache.length + T)
    return self.o_proj(out), cache


class MLP(nnx.Module):
  def __init__(self, c: LlamaConfig, rngs: nnx.Rngs):
    self.gate_proj = nnx.Linear(c.dim, c.ffn, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(c.dim, c.ffn, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(c.ffn, c.dim, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  def __init__(self, c: LlamaConfig, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
    self.self_attn = Attention(c, rngs)
    self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
    self.mlp = MLP(c, rngs)

  def __call__(self, x, positions, cache: KVCache | None = None):
    a, cache = self.self_attn(self.input_layernorm(x), positions, cache)
    x = x + a
    return x + self.mlp(self.post_attention_layernorm(x)), cache


class Head(nnx.Module):
  """The final RMSNorm and the output projection (the token embedding when tied)."""

  def __init__(self, c: LlamaConfig, embedding: nnx.Param | None, rngs: nnx.Rngs):
    self.norm = RMSNorm(c.dim, c.norm_eps)
    if embedding is None:
      embedding = nnx.Param(jax.random.normal(rngs.params(), (c.vocab, c.dim)) * c.dim**-0.5)
    self.weight = embedding  # (vocab, dim), as the embedding table

  def __call__(self, h):
    return jnp.einsum("...d,vd->...v", self.norm(h), self.weight[...])


class Llama(nnx.Module):
  def __init__(self, c: LlamaConfig, rngs: nnx.Rngs):
    self.c = c
    self.embed_tokens = nnx.Embed(c.vocab, c.dim, rngs=rngs)
    self.layers = nnx.List([Block(c, rngs) for _ in range(c.layers)])
    self.head = Head(c, self.embed_tokens.embedding if c.tied else None, rngs)

  def hidden(self, tokens, stop: int | None = None, positions=None):
    """Hidden states (B, T, dim) after the first ``stop`` blocks (all when None)."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h = self.embed_tokens(tokens)
    for layer in self.layers[:stop]:
      h, _ = layer(h, positions)
    return h

  def __call__(self, tokens):
    """Next-token logits (B, T, vocab)."""
    return self.head(self.hidden(tokens))

  def init_cache(self, batch: int, size: int) -> list[KVCache]:
    shape = (batch, size, self.c.kv_heads, self.c.head_dim)
    zero = jnp.zeros(shape, jnp.float32)
    return [KVCache(zero, zero, jnp.int32(0)) for _ in self.layers]

  def decode(self, tokens, cache: list[KVCache]):
    """Logits of the last position of ``tokens`` (B, T), appended to ``cache``."""
    start = cache[0].length
    positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1]), tokens.shape)
    h = self.embed_tokens(tokens)
    new = []
    for layer, kv in zip(self.layers, cache):
      h, kv = layer(h, positions, kv)
      new.append(kv)
    return self.head(h[:, -1]), new


# --------------------------------------------------------------------------- loading


def _linear(name: str, module: nnx.Linear, transform=None):
  return {name: (module.kernel, lambda w: (transform(w) if transform else w).T)}


def name_map(model: Llama) -> dict[str, tuple[nnx.Variable, object]]:
  """GGUF tensor name -> (model variable, function from the GGUF array to its value).

  The query and key rows are expected in Hugging Face's order (``weights.hf_layout``).
  """
  m = {"token_embd.weight": (model.embed_tokens.embedding, None)}
  m["output_norm.weight"] = (model.head.norm.weight, None)
  if not model.c.tied:
    m["output.weight"] = (model.head.weight, None)
  for i, b in enumerate(model.layers):
    p, a = f"blk.{i}.", b.self_attn
    m[p + "attn_norm.weight"] = (b.input_layernorm.weight, None)
    m[p + "ffn_norm.weight"] = (b.post_attention_layernorm.weight, None)
    for gguf_name, lin in (
      ("attn_q", a.q_proj),
      ("attn_k", a.k_proj),
      ("attn_v", a.v_proj),
      ("attn_output", a.o_proj),
      ("ffn_gate", b.mlp.gate_proj),
      ("ffn_up", b.mlp.up_proj),
      ("ffn_down", b.mlp.down_proj),
    ):
      m[p + gguf_name + ".weight"] = (lin.kernel, np.transpose)  # (out, in) -> (in, out)
  return m


def load_tensors(model: Llama, tensors: Mapping[str, np.ndarray]) -> None:
  """Copy GGUF-named tensors (Hugging Face's query/key order) into ``model`` in place."""
  names = name_map(model)
  missing = sorted(set(names) - set(tensors))
  if missing:
    raise ValueError(f"tensors missing: {missing}")
  for name, (var, transform) in names.items():
    arr = np.asarray(tensors[name], np.float32)
    arr = transform(arr) if transform is not None else arr
    if arr.shape != var[...].shape:
      raise ValueError(f"tensor {name!r}: shape {arr.shape} does not fit {var[...].shape}")
    var[...] = jnp.asarray(arr)


def load_gguf(path: str | Path | None = None):
  """``(model, reader)``: the Llama of a GGUF file (default: the installed SmolLM2),
  dequantized to float32, and the file's ``gguf.GGUFReader`` (for the tokenizer)."""
  reader = open_gguf(path if path is not None else locate_gguf())
  config = read_config(reader)
  tensors = hf_layout(read_tensors(reader, config), config)
  model = Llama(config, nnx.Rngs(0))
  load_tensors(model, tensors)
  return model, reader
