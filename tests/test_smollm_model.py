"""The NNX Llama of examples/smollm against an independent float64 NumPy forward pass.

The reference reads the GGUF layout as llama.cpp does: query and key rows permuted, RoPE on
adjacent pairs. The model un-permutes the rows and rotates halves, as Hugging Face does;
both must give the same logits.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.smollm import tiny
from examples.smollm import weights as W
from examples.smollm.model import Llama, load_gguf, load_tensors


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope_adjacent(x, base):
  """llama.cpp's RoPE (LLAMA_ROPE_TYPE_NORM): pairs (2j, 2j + 1) by pos·base^(-2j/D)."""
  T, _, D = x.shape
  theta = np.arange(T)[:, None] * base ** (-np.arange(0, D, 2) / D)  # (T, D/2)
  cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]
  a, b = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
  return out


def reference_logits(t, c, ids):
  """Float64 logits (T, vocab) of one sequence from GGUF-layout tensors ``t``."""
  t = {k: np.asarray(v, np.float64) for k, v in t.items()}
  T, H, KV, D = len(ids), c.heads, c.kv_heads, c.head_dim
  x = t["token_embd.weight"][ids]
  causal = np.tril(np.ones((T, T), bool))
  for i in range(c.layers):
    g = lambda n, i=i: t[f"blk.{i}.{n}.weight"]
    h = _rms(x, g("attn_norm"), c.norm_eps)
    q = _rope_adjacent((h @ g("attn_q").T).reshape(T, H, D), c.rope_base)
    k = _rope_adjacent((h @ g("attn_k").T).reshape(T, KV, D), c.rope_base)
    v = (h @ g("attn_v").T).reshape(T, KV, D)
    heads = []
    for n in range(H):
      kv = n // (H // KV)
      s = np.where(causal, q[:, n] @ k[:, kv].T / np.sqrt(D), -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      heads.append((p / p.sum(-1, keepdims=True)) @ v[:, kv])
    x = x + np.concatenate(heads, -1) @ g("attn_output").T
    h = _rms(x, g("ffn_norm"), c.norm_eps)
    gate = h @ g("ffn_gate").T
    x = x + (gate / (1 + np.exp(-gate)) * (h @ g("ffn_up").T)) @ g("ffn_down").T
  head = t.get("output.weight", t["token_embd.weight"])  # tied when absent
  return _rms(x, t["output_norm.weight"], c.norm_eps) @ head.T


IDS = np.array(
  [[1, 80, 81, 260, 5, 261, 2, 30, 7, 263, 100, 4], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
)


# Jitted: eager dispatch compiles every small op separately, which is slower here.
_forward = nnx.jit(lambda model, ids: model(ids))
_decode = nnx.jit(lambda model, ids, cache: model.decode(ids, cache))


def _model(tensors, c):
  model = Llama(c, nnx.Rngs(0))
  load_tensors(model, W.hf_layout(tensors, c))
  return model


def _assert_close(ours, ref):
  scale = np.abs(ref).max()
  np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=0, atol=2e-5 * scale)


def test_forward_matches_float64_reference():
  c = tiny.CONFIG
  tensors = tiny.random_tensors(c, seed=1)
  logits = _forward(_model(tensors, c), jnp.asarray(IDS))
  for b in range(len(IDS)):
    _assert_close(logits[b], reference_logits(tensors, c, IDS[b]))


def test_loaded_gguf_matches_reference_on_dequantized_tensors(tmp_path):
  import gguf

  path = tmp_path / "tiny.gguf"
  tiny.write(path, seed=2)
  model, reader = load_gguf(path)
  deq = {
    t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
    for t in reader.tensors
  }
  _assert_close(_forward(model, jnp.asarray(IDS[:1]))[0], reference_logits(deq, model.c, IDS[0]))


def test_untied_head_and_multi_query_attention():
  import dataclasses

  c = dataclasses.replace(tiny.CONFIG, tied=False, kv_heads=1, layers=1)
  tensors = tiny.random_tensors(c, seed=3)
  model = _model(tensors, c)
  assert model.head.weight is not model.embed_tokens.embedding
  _assert_close(_forward(model, jnp.asarray(IDS[1:]))[0], reference_logits(tensors, c, IDS[1]))


def test_kv_cache_decode_matches_full_forward():
  c = tiny.CONFIG
  model = _model(tiny.random_tensors(c, seed=4), c)
  full = np.asarray(_forward(model, jnp.asarray(IDS[:1])))[0]
  cache = model.init_cache(1, 16)
  last, cache = _decode(model, jnp.asarray(IDS[:1, :5]), cache)  # a prompt chunk, then tokens
  np.testing.assert_allclose(last[0], full[4], atol=1e-5 * np.abs(full).max())
  for j in range(5, IDS.shape[1]):
    last, cache = _decode(model, jnp.asarray(IDS[:1, j : j + 1]), cache)
    np.testing.assert_allclose(last[0], full[j], atol=1e-5 * np.abs(full).max())
  assert int(cache[0].length) == IDS.shape[1]
