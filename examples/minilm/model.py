"""Flax NNX BERT encoder matching sentence-transformers' all-MiniLM-L6-v2.

Architecture: BERT (post-LayerNorm), learned absolute position and token-type
embeddings, GELU(erf), then mean pooling over non-padding tokens and L2
normalisation. Every encoder linear is a :class:`LoRALinear` whose adapter
parameters are ``nnx.LoRAParam`` named ``lora_a`` (in, r) and ``lora_b``
(r, out), so ``nnx.LoRAParam`` selects exactly the adapters and ``nnx.Param``
(of which ``LoRAParam`` is a subclass) selects everything trainable.

Parameter paths, e.g. ``layers/3/ffn_in/lora_a``, name the layer type:
``query``, ``key``, ``value``, ``attn_out``, ``ffn_in``, ``ffn_out``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

LORA_TARGETS: tuple[str, ...] = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
  """BERT hyper-parameters; defaults are all-MiniLM-L6-v2's ``config.json``."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  # The checkpoint was trained with 0.1; default 0 keeps optimizer comparisons
  # deterministic. Set >0 and pass rngs with a "dropout" stream to enable.
  dropout_rate: float = 0.0

  @classmethod
  def from_hf_json(cls, path: str | os.PathLike, **overrides) -> MiniLMConfig:
    """Read a Hugging Face BERT ``config.json``; refuses non-BERT-like configs."""
    with open(path, encoding="utf-8") as f:
      cfg = json.load(f)
    if cfg.get("model_type") != "bert":
      raise ValueError(f"{path}: model_type={cfg.get('model_type')!r}, expected 'bert'")
    if cfg.get("hidden_act") != "gelu":
      raise ValueError(f"{path}: hidden_act={cfg.get('hidden_act')!r}, expected 'gelu' (erf)")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"{path}: only absolute position embeddings are supported")
    kw = dict(
      vocab_size=cfg["vocab_size"],
      hidden_size=cfg["hidden_size"],
      num_layers=cfg["num_hidden_layers"],
      num_heads=cfg["num_attention_heads"],
      intermediate_size=cfg["intermediate_size"],
      max_position_embeddings=cfg["max_position_embeddings"],
      type_vocab_size=cfg["type_vocab_size"],
      layer_norm_eps=cfg["layer_norm_eps"],
    )
    kw.update(overrides)
    return cls(**kw)


def lora_scale(rank: int, alpha: float, scale_mode: str = "lora") -> float:
  """LoRA output scale: ``alpha / rank`` ("lora") or ``alpha / sqrt(rank)`` ("rslora")."""
  if rank <= 0:
    return 0.0
  if scale_mode == "lora":
    return float(alpha) / rank
  if scale_mode == "rslora":
    return float(alpha) / math.sqrt(rank)
  raise ValueError(f"scale_mode must be 'lora' or 'rslora', got {scale_mode!r}")


# BERT's initializer_range.
_BERT_INIT = nnx.initializers.normal(0.02)


def _peft_a_init(key, shape, dtype=jnp.float32):
  # PEFT initialises A as torch Linear(in, r) with kaiming_uniform(a=sqrt(5)),
  # i.e. U(-1/sqrt(in), 1/sqrt(in)); B starts at zero so the adapter is a no-op.
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRALinear(nnx.Module):
  """``y = base(x) + scale * (x @ lora_a @ lora_b)``; rank 0 means a plain Linear.

  ``nnx.LoRALinear`` has no scale, hence this module. ``base`` is an
  ``nnx.Linear`` (params ``kernel`` (in, out) and ``bias``); ``scale`` and
  ``rank`` are static Python attributes (an optimizer such as LoRA-Pro can
  read ``scale`` from here).
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    rank: int = 0,
    scale: float = 1.0,
    rngs: nnx.Rngs,
    a_init=_peft_a_init,
    b_init=nnx.initializers.zeros,
    kernel_init=_BERT_INIT,
  ):
    self.in_features = in_features
    self.out_features = out_features
    self.base = nnx.Linear(in_features, out_features, kernel_init=kernel_init, rngs=rngs)
    self.rank = int(rank)
    self.scale = float(scale) if rank > 0 else 0.0
    if self.rank > 0:
      self.lora_a = nnx.LoRAParam(a_init(rngs.params(), (in_features, self.rank), jnp.float32))
      self.lora_b = nnx.LoRAParam(b_init(rngs.params(), (self.rank, out_features), jnp.float32))
    else:
      self.lora_a = None
      self.lora_b = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.base(x)
    if self.rank > 0:
      y = y + self.scale * ((x @ self.lora_a[...]) @ self.lora_b[...])
    return y


class Embeddings(nnx.Module):
  def __init__(self, cfg: MiniLMConfig, *, rngs: nnx.Rngs, init=_BERT_INIT):
    self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, rngs=rngs)
    self.position = nnx.Embed(
      cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init, rngs=rngs
    )
    self.token_type = nnx.Embed(
      cfg.type_vocab_size, cfg.hidden_size, embedding_init=init, rngs=rngs
    )
    self.norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

  def __call__(self, ids, type_ids):
    pos = jnp.arange(ids.shape[-1])
    h = self.word(ids) + self.position(pos)[None] + self.token_type(type_ids)
    return self.dropout(self.norm(h))


class EncoderLayer(nnx.Module):
  """One post-LN BERT block; ``attn_norm``/``ffn_norm`` are BERT's two LayerNorms."""

  def __init__(
    self,
    cfg: MiniLMConfig,
    *,
    rank_for: dict[str, int],
    scale: float,
    rngs: nnx.Rngs,
    init=_BERT_INIT,
  ):
    d, f = cfg.hidden_size, cfg.intermediate_size
    if d % cfg.num_heads:
      raise ValueError(f"hidden_size {d} not divisible by num_heads {cfg.num_heads}")
    self.num_heads = cfg.num_heads

    def lin(name, i, o):
      return LoRALinear(i, o, rank=rank_for[name], scale=scale, kernel_init=init, rngs=rngs)

    self.query = lin("query", d, d)
    self.key = lin("key", d, d)
    self.value = lin("value", d, d)
    self.attn_out = lin("attn_out", d, d)
    self.attn_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.ffn_in = lin("ffn_in", d, f)
    self.ffn_out = lin("ffn_out", f, d)
    self.ffn_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.attn_dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

  def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
    b, t, d = h.shape
    nh = self.num_heads
    hd = d // nh

    def heads(x):
      return x.reshape(b, t, nh, hd)

    q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    # Padding keys get a large negative bias (HF uses finfo.min the same way).
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    probs = self.attn_dropout(jax.nn.softmax(scores, axis=-1))
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
    h = self.attn_norm(h + self.dropout(self.attn_out(ctx)))
    ff = self.ffn_out(jax.nn.gelu(self.ffn_in(h), approximate=False))
    return self.ffn_norm(h + self.dropout(ff))


class MiniLMEncoder(nnx.Module):
  """BERT encoder + mean pooling + L2 norm (all-MiniLM-L6-v2 sentence embedding).

  ``model(ids, mask, type_ids)`` returns (batch, hidden) unit-norm embeddings.
  ``pooler`` holds BERT's CLS pooler weights from the checkpoint; the sentence
  embedding does not use it (as in sentence-transformers), so exclude it from
  full fine-tuning, e.g. ``nnx.All(nnx.Param, nnx.Not(nnx.PathContains("pooler")))``.
  """

  def __init__(
    self,
    cfg: MiniLMConfig = MiniLMConfig(),
    *,
    rank: int = 0,
    alpha: float = 16.0,
    scale_mode: str = "lora",
    targets: Sequence[str] = LORA_TARGETS,
    random_base_init: bool = True,
    rngs: nnx.Rngs,
  ):
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown:
      raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {LORA_TARGETS}")
    if rank < 0:
      raise ValueError(f"rank must be >= 0, got {rank}")
    self.config = cfg
    self.rank = int(rank)
    self.scale = lora_scale(rank, alpha, scale_mode)
    rank_for = {name: (rank if name in targets else 0) for name in LORA_TARGETS}
    # Zeros skip ~6 s of per-shape RNG compilation on CPU when a checkpoint
    # will overwrite the base weights anyway (see weights.load_pretrained).
    init = _BERT_INIT if random_base_init else nnx.initializers.zeros_init()
    self.embeddings = Embeddings(cfg, rngs=rngs, init=init)
    self.layers = nnx.List(
      [
        EncoderLayer(cfg, rank_for=rank_for, scale=self.scale, rngs=rngs, init=init)
        for _ in range(cfg.num_layers)
      ]
    )
    self.pooler = nnx.Linear(cfg.hidden_size, cfg.hidden_size, kernel_init=init, rngs=rngs)

  def hidden_states(self, ids, mask, type_ids=None) -> jax.Array:
    """Last-layer token states, (batch, seq, hidden)."""
    ids = jnp.asarray(ids)
    mask = jnp.asarray(mask).astype(bool)
    type_ids = jnp.zeros_like(ids) if type_ids is None else jnp.asarray(type_ids)
    h = self.embeddings(ids, type_ids)
    for layer in self.layers:
      h = layer(h, mask)
    return h

  def pooled_unnormalized(self, ids, mask, type_ids=None) -> jax.Array:
    """Mean of token states over ``mask`` (before L2 normalisation)."""
    h = self.hidden_states(ids, mask, type_ids)
    m = jnp.asarray(mask).astype(h.dtype)[..., None]
    # Clamp like sentence-transformers so an all-padding row gives 0, not NaN.
    return (h * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)

  def __call__(self, ids, mask, type_ids=None) -> jax.Array:
    pooled = self.pooled_unnormalized(ids, mask, type_ids)
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, 1e-12)  # torch.nn.functional.normalize's eps

  def cls_pooler_output(self, ids, mask, type_ids=None) -> jax.Array:
    """BERT's ``tanh(dense(h[:, 0]))`` output; not part of the sentence embedding."""
    return jnp.tanh(self.pooler(self.hidden_states(ids, mask, type_ids)[:, 0]))


def iter_lora_layers(model: nnx.Module) -> Iterator[tuple[str, LoRALinear]]:
  """Yield ``("layers/3/ffn_in", module)`` for each LoRALinear with rank > 0."""
  for path, node in nnx.iter_graph(model):
    if isinstance(node, LoRALinear) and node.rank > 0:
      yield "/".join(str(p) for p in path), node
