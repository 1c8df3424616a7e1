"""A small Gemma-style decoder in Flax NNX, built from scratch (random init).

Gemma's layout: tied byte embeddings scaled by √D, pre-norm blocks with
RMSNorm (scale stored as an offset from 1), rotary position embeddings,
multi-query attention written as einsums over a heads axis (q_einsum
"BTD,DNH->BTNH", kv_einsum "BSD,CDKH->CBSKH", attn_vec_einsum
"BTNH,NHD->BTD"), and a gated GELU MLP (gating_einsum "BTD,CDF->CBTF",
linear "BTF,FD->BTD"). Qwix gives each einsum kernel a LoRA pair whose A holds
the contracted axes and whose B the others, e.g. (D, r) and (r, 2, K, H) for
kv_einsum.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from examples.qwix_gemma.data import VOCAB


@dataclasses.dataclass(frozen=True)
class Config:
  layers: int = 2
  dim: int = 128
  heads: int = 4
  kv_heads: int = 1  # multi-query attention, as Gemma 2B
  head_dim: int = 32
  hidden: int = 256
  vocab: int = VOCAB


class RMSNorm(nnx.Module):
  def __init__(self, dim: int):
    self.scale = nnx.Param(jnp.zeros((dim,)))

  def __call__(self, x):
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return x * (1 + self.scale[...])


def rope(x, positions, max_wavelength: int = 10_000):
  """Rotary embeddings on the last axis of ``x`` (B, T, heads, H)."""
  half = x.shape[-1] // 2
  freq = max_wavelength ** (-jnp.arange(half) / half)
  angle = positions[:, :, None, None] * freq
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  a, b = x[..., :half], x[..., half:]
  return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


class Attention(nnx.Module):
  def __init__(self, c: Config, rngs: nnx.Rngs):
    self.c = c
    self.q_einsum = nnx.Einsum("BTD,DNH->BTNH", (c.dim, c.heads, c.head_dim), rngs=rngs)
    self.kv_einsum = nnx.Einsum("BSD,CDKH->CBSKH", (2, c.dim, c.kv_heads, c.head_dim), rngs=rngs)
    self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (c.heads, c.head_dim, c.dim), rngs=rngs)

  def __call__(self, x, positions, mask):
    q = rope(self.q_einsum(x), positions) * self.c.head_dim**-0.5
    k, v = self.kv_einsum(x)
    k = rope(k, positions)
    group = self.c.heads // self.c.kv_heads
    k, v = (jnp.repeat(t, group, axis=2) for t in (k, v))
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k)
    logits = jnp.where(mask[:, None], logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return self.attn_vec_einsum(jnp.einsum("BNTS,BSNH->BTNH", probs, v))


class MLP(nnx.Module):
  def __init__(self, c: Config, rngs: nnx.Rngs):
    self.gating_einsum = nnx.Einsum("BTD,CDF->CBTF", (2, c.dim, c.hidden), rngs=rngs)
    self.linear = nnx.Einsum("BTF,FD->BTD", (c.hidden, c.dim), rngs=rngs)

  def __call__(self, x):
    gate, up = self.gating_einsum(x)
    return self.linear(jax.nn.gelu(gate) * up)


class Block(nnx.Module):
  def __init__(self, c: Config, rngs: nnx.Rngs):
    self.pre_attention_norm = RMSNorm(c.dim)
    self.attn = Attention(c, rngs)
    self.pre_ffw_norm = RMSNorm(c.dim)
    self.mlp = MLP(c, rngs)

  def __call__(self, x, positions, mask):
    x = x + self.attn(self.pre_attention_norm(x), positions, mask)
    return x + self.mlp(self.pre_ffw_norm(x))


class Decoder(nnx.Module):
  def __init__(self, c: Config, rngs: nnx.Rngs):
    self.c = c
    self.embedding = nnx.Param(jax.random.normal(rngs.params(), (c.vocab, c.dim)) * c.dim**-0.5)
    self.layers = nnx.List([Block(c, rngs) for _ in range(c.layers)])
    self.final_norm = RMSNorm(c.dim)

  def __call__(self, tokens):
    """Next-token logits (B, T, vocab) of byte tokens (B, T)."""
    T = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(T), tokens.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (tokens.shape[0], T, T))
    x = self.embedding[...][tokens] * jnp.sqrt(jnp.float32(self.c.dim))
    for layer in self.layers:
      x = layer(x, positions, mask)
    return jnp.einsum("BTD,VD->BTV", self.final_norm(x), self.embedding[...])
