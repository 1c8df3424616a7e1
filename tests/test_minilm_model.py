"""MiniLM Flax model and loader on a tiny random config (no checkpoint needed)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples.minilm.model import (
  LORA_TARGETS,
  LoRALinear,
  MiniLMConfig,
  MiniLMEncoder,
  iter_lora_layers,
  lora_scale,
)
from examples.minilm.weights import load_state_dict, to_state_dict

# One layer keeps XLA compile times (the bulk of this file's runtime) small.
TINY = MiniLMConfig(
  vocab_size=50,
  hidden_size=16,
  num_layers=1,
  num_heads=4,
  intermediate_size=32,
  max_position_embeddings=24,
)
TINY2 = dataclasses.replace(TINY, num_layers=2)


@nnx.jit
def fwd(model, ids, mask, type_ids):
  # One compile per model structure instead of op-by-op eager compiles.
  return model(ids, mask, type_ids)


def _tiny(rank=0, cfg=TINY, **kw):
  # Zero base init + numpy weights: eager JAX RNG init compiles one program per
  # shape, which dominated this file's runtime.
  return MiniLMEncoder(cfg, rank=rank, random_base_init=False, rngs=nnx.Rngs(0), **kw)


@pytest.fixture(scope="module")
def tiny_weights():
  rng = np.random.default_rng(0)
  tensors = {}
  for name, zeros in to_state_dict(_tiny()).items():
    noise = rng.normal(size=zeros.shape).astype(np.float32)
    tensors[name] = 1.0 + 0.1 * noise if name.endswith("LayerNorm.weight") else 0.2 * noise
  return tensors


@pytest.fixture(scope="module")
def tiny_base(tiny_weights):
  model = _tiny()
  load_state_dict(model, tiny_weights)
  return model


def _batch():
  ids = np.array([[2, 7, 9, 11, 3, 0, 0, 0], [2, 5, 3, 0, 0, 0, 0, 0]], np.int32)
  mask = (ids != 0).astype(np.int32)
  return ids, mask, np.zeros_like(ids)


def _lora_paths(model):
  return sorted(
    "/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  )


def test_lora_linear_forward_and_params():
  lin = LoRALinear(5, 3, rank=2, scale=1.5, rngs=nnx.Rngs(0))
  assert isinstance(lin.lora_a, nnx.LoRAParam) and isinstance(lin.lora_b, nnx.LoRAParam)
  assert lin.lora_a[...].shape == (5, 2) and lin.lora_b[...].shape == (2, 3)
  assert not isinstance(lin.base.kernel, nnx.LoRAParam)
  assert np.all(np.asarray(lin.lora_b[...]) == 0)  # adapter starts as a no-op
  rng = np.random.default_rng(0)
  lin.lora_b[...] = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  want = (
    x @ lin.base.kernel[...] + lin.base.bias[...] + 1.5 * (x @ lin.lora_a[...] @ lin.lora_b[...])
  )
  np.testing.assert_allclose(lin(x), want, rtol=1e-5, atol=1e-6)


def test_lora_scale_modes():
  assert lora_scale(8, 16.0, "lora") == 2.0
  assert lora_scale(16, 16.0, "rslora") == 4.0
  assert lora_scale(0, 16.0) == 0.0
  with pytest.raises(ValueError):
    lora_scale(8, 16.0, "bogus")
  m = nnx.eval_shape(
    lambda: MiniLMEncoder(TINY, rank=4, alpha=8.0, scale_mode="rslora", rngs=nnx.Rngs(0))
  )
  assert all(layer.scale == 4.0 for _, layer in iter_lora_layers(m))


def test_rank_zero_has_no_adapters(tiny_base):
  assert _lora_paths(tiny_base) == []
  assert list(iter_lora_layers(tiny_base)) == []


def test_adapter_names_and_targets():
  m = nnx.eval_shape(lambda: MiniLMEncoder(TINY2, rank=4, rngs=nnx.Rngs(0)))
  want = sorted(
    f"layers/{i}/{t}/{ab}" for i in range(2) for t in LORA_TARGETS for ab in ("lora_a", "lora_b")
  )
  assert _lora_paths(m) == want
  assert m.layers[0].ffn_in.lora_a.get_value().shape == (16, 4)
  assert m.layers[0].ffn_out.lora_b.get_value().shape == (4, 16)
  sub = nnx.eval_shape(
    lambda: MiniLMEncoder(TINY2, rank=4, targets=("query", "value"), rngs=nnx.Rngs(0))
  )
  assert sorted(p for p, _ in iter_lora_layers(sub)) == [
    f"layers/{i}/{t}" for i in range(2) for t in ("query", "value")
  ]
  with pytest.raises(ValueError):
    MiniLMEncoder(TINY, rank=4, targets=("dense",), rngs=nnx.Rngs(0))


def test_state_dict_round_trip_and_zero_b_is_noop(tiny_base, tiny_weights):
  exported = to_state_dict(tiny_base)
  assert exported.keys() == tiny_weights.keys()
  jax.tree.map(np.testing.assert_array_equal, exported, tiny_weights)
  lora = _tiny(rank=4)
  load_state_dict(lora, exported)
  ids, mask, tt = _batch()
  e0, e4 = fwd(tiny_base, ids, mask, tt), fwd(lora, ids, mask, tt)
  np.testing.assert_allclose(e4, e0, atol=1e-7)
  np.testing.assert_allclose(jnp.linalg.norm(e0, axis=-1), 1.0, atol=1e-6)
  lora.layers[0].value.lora_b[...] = jnp.ones((4, 16))
  assert not np.allclose(fwd(lora, ids, mask, tt), e0, atol=1e-4)


def test_load_state_dict_fails_loudly_and_leaves_model_untouched(tiny_base):
  src = to_state_dict(tiny_base)
  dst = _tiny(rank=2)
  before = jax.tree.map(np.asarray, nnx.state(dst, nnx.Param))

  bad_cases = {
    "absent from checkpoint": {
      k: v for k, v in src.items() if k != "encoder.layer.0.output.dense.bias"
    },
    "no model parameter": {**src, "encoder.layer.1.output.dense.bias": np.zeros(16, np.float32)},
    "shape": {**src, "encoder.layer.0.attention.self.query.weight": np.zeros((16, 8), np.float32)},
  }
  for expected, tensors in bad_cases.items():
    with pytest.raises(ValueError, match=expected):
      load_state_dict(dst, tensors)
  after = jax.tree.map(np.asarray, nnx.state(dst, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, before, after)

  # position_ids is the one tolerated extra (a buffer in HF checkpoints).
  load_state_dict(dst, {**src, "embeddings.position_ids": np.arange(24)[None]})
  np.testing.assert_array_equal(
    dst.layers[0].ffn_out.base.kernel[...], src["encoder.layer.0.output.dense.weight"].T
  )


def test_padding_does_not_change_embeddings(tiny_base):
  ids, mask, tt = _batch()
  short = fwd(tiny_base, ids[:, :5], mask[:, :5], tt[:, :5])
  long = fwd(tiny_base, ids, mask, tt)
  np.testing.assert_allclose(short, long, atol=1e-6)


def test_gradients_reach_only_adapters(tiny_weights):
  m = _tiny(rank=2)
  load_state_dict(m, tiny_weights)
  ids, mask, tt = _batch()

  w = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16)), jnp.float32)

  def loss_fn(model):  # one forward keeps the compiled graph (and test time) small
    return jnp.sum(model(ids, mask, tt) * w)

  grads = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam)))(m)
  flat = dict(nnx.to_flat_state(grads))
  assert {p[-1] for p in flat} == {"lora_a", "lora_b"}
  # With B = 0 at init only B receives gradient (the usual LoRA asymmetry).
  assert all(np.all(np.asarray(v[...]) == 0) for p, v in flat.items() if p[-1] == "lora_a")
  assert any(np.any(np.asarray(v[...]) != 0) for p, v in flat.items() if p[-1] == "lora_b")


def test_dropout_is_configurable_and_off_in_view(tiny_base, tiny_weights):
  cfg = dataclasses.replace(TINY, dropout_rate=0.5)
  # rbg keys: threefry dropout masks roughly double this test's XLA compile time.
  m = MiniLMEncoder(
    cfg, random_base_init=False, rngs=nnx.Rngs(0, dropout=jax.random.key(1, impl="rbg"))
  )
  load_state_dict(m, tiny_weights)
  ids, mask, tt = _batch()
  assert not np.allclose(fwd(m, ids, mask, tt), fwd(m, ids, mask, tt))  # rng state advances
  ev = nnx.view(m, deterministic=True)
  np.testing.assert_allclose(fwd(ev, ids, mask, tt), fwd(tiny_base, ids, mask, tt), atol=1e-6)
