"""`lorapro` composed with other optax transformations.

* ``optax.partition``: another optimizer for non-LoRA params (a classifier head).
* LoRA+ (a larger learning rate for B): lorapro must see both A and B, so it
  is chained first and the partition acts on its (adjusted) output.
* ``optax.clip_by_global_norm`` before lorapro, on the raw gradients.
* ``optax.tree.map_params`` over the state, both modes.
* ``optax.inject_hyperparams`` for every numeric hyperparameter.
* ``optax.MultiSteps`` gradient accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lorapro_jax as lpj
from tests.helpers import assert_close

S = 2.0
MODES = ("efficient", "full", "factored")
MOMENT_MODES = ("full", "factored")
# A factored update compiles for about 15 s: those cases of the heavier tests are marked slow.
FACTORED_SLOW = pytest.param("factored", marks=pytest.mark.slow)


def _params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {
    "encoder": {"lora_a": f(6, 3), "lora_b": f(3, 5)},
    "stack": {"lora_a": f(2, 4, 3), "lora_b": f(2, 3, 6)},
    "head": f(5, 2),
  }


def _grads(params, seed=1):
  """Consistent LoRA gradients of random full gradients G (in, out) (Eq. 5,
  flax layout: dL/da = s·G·bᵀ, dL/db = s·aᵀ·G) and a random head gradient."""
  rng = np.random.default_rng(seed)
  out = {}
  for k in ("encoder", "stack"):
    a, b = params[k]["lora_a"], params[k]["lora_b"]
    G = jnp.asarray(rng.standard_normal(a.shape[:-1] + b.shape[-1:]), jnp.float32)
    out[k] = {"lora_a": S * G @ jnp.swapaxes(b, -1, -2), "lora_b": S * jnp.swapaxes(a, -1, -2) @ G}
  if "head" in params:
    out["head"] = jnp.asarray(rng.standard_normal(params["head"].shape), jnp.float32)
  return out


def _lora(tree):
  return {k: tree[k] for k in ("encoder", "stack")}


# The updates below run in float32 and are compared with assert_close's float32 default (1e-5)
# relative to each leaf's largest entry, atol=0 (jitted and eager runs round differently).


def _steps(tx, params, n=3):
  """n updates (gradients change with the step); returns every update.

  Eager: the primitives compile once per shape and are shared by every test
  here, where a jitted update would compile once per transformation."""
  state, out = tx.init(params), []
  for t in range(n):
    u, state = tx.update(_grads(params, seed=t), state, params)
    out.append(u)
  return out


def _lorapro_tx(mode, lr=1e-2):
  return lpj.lorapro_adamw(lr, scale=S, mode=mode, weight_decay=1e-2)


@pytest.mark.parametrize("mode", ["efficient", "full", FACTORED_SLOW])
def test_partition_gives_the_head_its_own_optimizer(mode):
  params = _params()
  labels = {
    "encoder": {"lora_a": "lora", "lora_b": "lora"},
    "stack": {"lora_a": "lora", "lora_b": "lora"},
    "head": "head",
  }
  tx = optax.partition({"lora": _lorapro_tx(mode), "head": optax.sgd(0.1, momentum=0.9)}, labels)
  got = _steps(tx, params)

  lora_only = _steps(_lorapro_tx(mode), _lora(params))
  head_only = [u["head"] for u in _steps(optax.sgd(0.1, momentum=0.9), params)]
  for u, want_lora, want_head in zip(got, lora_only, head_only):
    assert_close(_lora(u), want_lora, atol=0)
    np.testing.assert_allclose(u["head"], want_head, rtol=1e-6)


def _ab_labels(params):
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "b" if path[-1].key == "lora_b" else "a", params
  )


@pytest.mark.parametrize("mode", ["efficient", "full", FACTORED_SLOW])
def test_lora_plus_larger_lr_for_b_after_lorapro(mode):
  """LoRA+: chain(lorapro, partition({A: lr, B: ratio·lr})). The B updates are
  ratio times those of the plain optimizer, the A updates unchanged."""
  params, ratio, lr = _lora(_params()), 16.0, 1e-2
  first = lpj.lorapro(S, mode=mode)
  then = (lambda lr: optax.adam(lr)) if mode == "efficient" else optax.scale_by_learning_rate
  tx = optax.chain(
    first, optax.partition({"a": then(lr), "b": then(ratio * lr)}, _ab_labels(params))
  )
  plain = optax.chain(first, then(lr))
  for u, v in zip(_steps(tx, params), _steps(plain, params)):
    for k in params:
      np.testing.assert_allclose(u[k]["lora_a"], v[k]["lora_a"], rtol=1e-6)
      np.testing.assert_allclose(u[k]["lora_b"], ratio * v[k]["lora_b"], rtol=1e-5)


def test_lorapro_inside_a_partition_that_splits_pairs_raises():
  """The wrong way round: a partition that hands A and B to different
  lorapro instances hides each pair's partner."""
  params = _lora(_params())
  tx = optax.partition({"a": lpj.lorapro(S), "b": lpj.lorapro(S)}, _ab_labels(params))
  with pytest.raises(ValueError, match="has no partner"):
    tx.update(_grads(params), tx.init(params), params)


@pytest.mark.parametrize("x_choice", ["sylvester", "zero", "symmetric"])
def test_lorapro_is_linear_in_the_gradients(x_choice):
  """Every x_choice maps g_lora linearly, so scaling the gradients (what global
  norm clipping does) scales the adjusted gradients by the same factor."""
  params = _lora(_params())
  g = _grads(params)
  tx = lpj.lorapro(S, x_choice=x_choice)
  u1, _ = tx.update(g, tx.init(params), params)
  u2, _ = tx.update(jax.tree.map(lambda x: 0.125 * x, g), tx.init(params), params)
  assert_close(u2, jax.tree.map(lambda x: 0.125 * x, u1), atol=0)


def test_clip_by_global_norm_before_lorapro():
  """Clipping the raw gradients g_lora = (s·Bᵀg, s·g·Aᵀ) by c scales them by
  k = c/‖g_lora‖: they stay the consistent pair of the full gradient k·g, and
  lorapro returns k times its adjustment. Clipping after lorapro bounds a
  different quantity: the adjusted gradients, whose norm differs."""
  params = _lora(_params())
  grads = _grads(params)
  adjusted, _ = lpj.lorapro(S).update(grads, None, params)
  norm = float(optax.tree.norm(grads))
  c = 0.1 * min(norm, float(optax.tree.norm(adjusted)))
  before = optax.chain(optax.clip_by_global_norm(c), lpj.lorapro(S))
  got, _ = before.update(grads, before.init(params), params)
  assert_close(got, jax.tree.map(lambda x: (c / norm) * x, adjusted), atol=0)

  after = optax.chain(lpj.lorapro(S), optax.clip_by_global_norm(c))
  got_after, _ = after.update(grads, after.init(params), params)
  assert_close(float(optax.tree.norm(got_after)), c, rtol=1e-5, atol=0)
  assert not np.isclose(float(optax.tree.norm(got)), c, rtol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_map_params_over_the_state(mode):
  """optax.tree.map_params reaches every params-shaped tree in the state (the
  head's Adam moments, masked at the pair leaves in full mode); the full
  mode's pair moments are keyed by pair, not params-shaped, so they go to
  transform_non_params, as one tree, like the step counts."""
  params = _params()
  tx = _lorapro_tx(mode)
  state = tx.init(params)
  mapped = optax.tree.map_params(
    tx,
    lambda x: jnp.full_like(x, 7.0),
    state,
    transform_non_params=lambda x: jax.tree.map(lambda y: jnp.full_like(y, 3), x),
  )
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  adam = mapped[0].adam_state.inner_state if mode in MOMENT_MODES else mapped[1][0]
  assert isinstance(adam, optax.ScaleByAdamState)
  assert np.all(np.asarray(adam.mu["head"]) == 7.0)
  assert np.all(np.asarray(adam.nu["head"]) == 7.0)
  assert int(adam.count) == 3
  if mode in MOMENT_MODES:
    assert isinstance(adam.mu["encoder"]["lora_a"], optax.MaskedNode)
    moments = mapped[0].pair_moments["encoder"]
    assert all(np.all(np.asarray(x) == 3) for x in moments)
  tx.update(_grads(params), mapped, params)  # the mapped state is still usable


@pytest.mark.parametrize("mode", MODES)
def test_state_shardings_for_jitted_init(mode):
  """lpj.state_shardings gives out_shardings for jax.jit(tx.init): params-shaped
  state like the params, pair moments like the adapted weight."""
  params = _params()
  mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
  spec = lambda x: NamedSharding(mesh, P(*([None] * (x.ndim - 1) + ["x"])))
  sharded = jax.device_put(params, jax.tree.map(spec, params))
  tx = _lorapro_tx(mode)
  state_sh = lpj.state_shardings(tx, sharded)
  state = jax.jit(tx.init, out_shardings=state_sh)(sharded)
  assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))
  if mode == "full":
    assert state_sh[0].pair_moments == lpj.full_moment_shardings(sharded)
  if mode in MOMENT_MODES:  # every pair array laid out as its role says
    for key, moments in state[0].pair_moments.items():
      for x, sh in zip(moments, state_sh[0].pair_moments[key]):
        assert x.sharding == sh


@pytest.mark.parametrize("mode", ["full", FACTORED_SLOW])
def test_inject_hyperparams_for_lorapro(mode):
  """scale, damping, b1, b2, eps become state hyperparameters (arrays, traced
  under jit); changing them in the state changes the update like rebuilding
  the transform."""
  params, grads = _params(), _grads(_params())
  hps = dict(scale=S, damping=1e-6, b1=0.9, b2=0.999, eps=1e-8)
  tx = optax.inject_hyperparams(lpj.lorapro)(mode=mode, **hps)
  state = tx.init(params)
  assert set(hps) <= set(state.hyperparams)
  new = dict(scale=0.5, damping=1e-3, b1=0.5, b2=0.9, eps=1e-3)
  state.hyperparams.update({k: jnp.asarray(v, jnp.float32) for k, v in new.items()})
  got, _ = jax.jit(tx.update)(grads, state, params)
  ref = lpj.lorapro(mode=mode, **new)
  want, _ = ref.update(grads, ref.init(params), params)
  assert_close(got, want, atol=0)


def test_inject_hyperparams_for_efficient_lorapro():
  params, grads = _params(), _grads(_params())
  tx = optax.inject_hyperparams(lpj.lorapro)(scale=S, damping=1e-6)
  state = tx.init(params)
  state.hyperparams["scale"] = jnp.asarray(0.5, jnp.float32)
  got, _ = tx.update(grads, state, params)
  assert_close(got, lpj.lorapro(0.5).update(grads, None, params)[0], atol=0)


@pytest.mark.parametrize("mode", ["efficient", "full", FACTORED_SLOW])
def test_inject_hyperparams_for_lorapro_adamw(mode):
  params = _params()
  hps = dict(
    learning_rate=1e-2, weight_decay=1e-2, b1=0.9, b2=0.999, eps=1e-8, scale=S, damping=1e-6
  )
  tx = optax.inject_hyperparams(lpj.lorapro_adamw)(mode=mode, **hps)
  state = tx.init(params)
  assert set(hps) <= set(state.hyperparams)
  new = dict(
    learning_rate=3e-3, weight_decay=0.1, b1=0.8, b2=0.99, eps=1e-4, scale=1.5, damping=1e-4
  )
  state.hyperparams.update({k: jnp.asarray(v, jnp.float32) for k, v in new.items()})
  ref = lpj.lorapro_adamw(mode=mode, **new)
  ref_state = ref.init(params)
  for t in range(2):
    g = _grads(params, seed=t)
    got, state = tx.update(g, state, params)
    want, ref_state = ref.update(g, ref_state, params)
    assert_close(got, want, atol=0)


@pytest.mark.parametrize("mode", ["efficient", "full", FACTORED_SLOW])
def test_multisteps_accumulates_then_applies_once(mode):
  """optax.MultiSteps(k): k-1 zero updates, then the inner optimizer applied to
  the mean of the k gradients."""
  params, k = _params(), 3
  tx = optax.MultiSteps(_lorapro_tx(mode), every_k_schedule=k)
  state = tx.init(params)
  update = jax.jit(tx.update)
  micro = [_grads(params, seed=t) for t in range(k)]
  for t, g in enumerate(micro):
    u, state = update(g, state, params)
    if t < k - 1:
      assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
  inner = _lorapro_tx(mode)
  mean = jax.tree.map(lambda *xs: sum(xs) / k, *micro)
  want, _ = inner.update(mean, inner.init(params), params)
  assert_close(u, want, atol=0)
