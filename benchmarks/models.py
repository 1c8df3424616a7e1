"""Real LoRA shapes and synthetic parameters/gradients in the flax layout.

Every adapted linear is given as (in_features, out_features); its LoRA leaves
are ``lora_a`` (in, r) and ``lora_b`` (r, out) (``flax.nnx.LoRA`` layout), i.e.
the paper's m = out, n = in. Values are random: A ~ N(0, 1/in) like a Kaiming
init, B ~ N(0, 0.01²) (a trained, non-zero B: the B = 0 first step is not the
typical step) and gradients ~ N(0, 1). Timing does not depend on the values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelShapes:
  name: str
  linears: tuple  # ((name, in, out), ...) adapted in every layer
  total_layers: int  # layers of the real model (we may time fewer)

  def per_layer_params(self, r: int) -> int:
    return sum(r * (i + o) for _, i, o in self.linears)

  def per_layer_dense(self) -> int:
    return sum(i * o for _, i, o in self.linears)


def _llama(d, f, L, name):
  return ModelShapes(
    name,
    (
      ("q", d, d),
      ("k", d, d),
      ("v", d, d),
      ("o", d, d),
      ("gate", d, f),
      ("up", d, f),
      ("down", f, d),
    ),
    L,
  )


def _bert(d, f, L, name):
  return ModelShapes(
    name,
    (
      ("query", d, d),
      ("key", d, d),
      ("value", d, d),
      ("attn_out", d, d),
      ("ffn_in", d, f),
      ("ffn_out", f, d),
    ),
    L,
  )


MODELS = {
  "llama2-7b": _llama(4096, 11008, 32, "llama2-7b"),
  "bert-base": _bert(768, 3072, 12, "bert-base"),
  "minilm": _bert(384, 1536, 6, "minilm"),
  # --smoke only: 2 pairs of different shapes, compiles in seconds
  "tiny": ModelShapes("tiny", (("q", 16, 16), ("up", 16, 32)), 1),
}


def square(name: str, d: int) -> ModelShapes:
  """One d×d adapter per 'layer' (the scaling sweeps)."""
  return ModelShapes(name, (("w", d, d),), 0)


def _rng(seed):
  return np.random.default_rng(seed)


def _normal(rng, shape, std, dtype):
  return jnp.asarray((rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype))


def lora_tree(
  model: ModelShapes, layers: int, r: int, seed: int = 0, dtype=jnp.float32, stacked: bool = False
):
  """(params, grads): ``{'layers': {'0': {'q': {'lora_a', 'lora_b'}, ...}}}``.

  With ``stacked=True`` every linear is one pair with a leading layer axis,
  ``{'q': {'lora_a': (layers, in, r), 'lora_b': (layers, r, out)}}`` (the
  layout of scanned layers); leading axes are batch axes for `lorapro`.
  """
  rng = _rng(seed)

  def pair(shape_prefix, i, o):
    p = {
      "lora_a": _normal(rng, shape_prefix + (i, r), 1 / np.sqrt(i), dtype),
      "lora_b": _normal(rng, shape_prefix + (r, o), 0.01, dtype),
    }
    g = {
      "lora_a": _normal(rng, shape_prefix + (i, r), 1.0, dtype),
      "lora_b": _normal(rng, shape_prefix + (r, o), 1.0, dtype),
    }
    return p, g

  if stacked:
    ps, gs = {}, {}
    for nm, i, o in model.linears:
      ps[nm], gs[nm] = pair((layers,), i, o)
    return ps, gs
  params, grads = {"layers": {}}, {"layers": {}}
  for l in range(layers):
    pl, gl = {}, {}
    for nm, i, o in model.linears:
      pl[nm], gl[nm] = pair((), i, o)
    params["layers"][str(l)], grads["layers"][str(l)] = pl, gl
  return params, grads


def dense_tree(model: ModelShapes, layers: int, seed: int = 0, dtype=jnp.float32):
  """(params, grads) of the same adapted weights, fully fine-tuned: ``kernel`` (in, out)."""
  rng = _rng(seed)
  params, grads = {"layers": {}}, {"layers": {}}
  for l in range(layers):
    pl, gl = {}, {}
    for nm, i, o in model.linears:
      pl[nm] = {"kernel": _normal(rng, (i, o), 1 / np.sqrt(i), dtype)}
      gl[nm] = {"kernel": _normal(rng, (i, o), 1.0, dtype)}
    params["layers"][str(l)], grads["layers"][str(l)] = pl, gl
  return params, grads


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def abstract_lora_tree(model: ModelShapes, layers: int, r: int, dtype=jnp.float32):
  """Shapes only (nothing allocated): for compile-only memory analysis of big models."""
  sds = lambda s: jax.ShapeDtypeStruct(s, dtype)
  t = {
    "layers": {
      str(l): {nm: {"lora_a": sds((i, r)), "lora_b": sds((r, o))} for nm, i, o in model.linears}
      for l in range(layers)
    }
  }
  return t, t


def abstract_dense_tree(model: ModelShapes, layers: int, dtype=jnp.float32):
  sds = lambda s: jax.ShapeDtypeStruct(s, dtype)
  t = {
    "layers": {
      str(l): {nm: {"kernel": sds((i, o))} for nm, i, o in model.linears} for l in range(layers)
    }
  }
  return t, t
