"""Checkpointing the optimizer state with Orbax mid-training.

A run that is saved after a few steps, restored into a fresh optimizer from
an abstract target (as a new process would) and resumed must end with
bitwise the same parameters and state as an uninterrupted run (CPU, jit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorapro_jax as lpj

ocp = pytest.importorskip("orbax.checkpoint")

# Compiles a training step per mode and writes Orbax checkpoints.
pytestmark = pytest.mark.slow

STEPS, SAVE_AT, SCALE = 6, 3, 2.0


def _params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {
    "layer": {"lora_a": f(6, 2), "lora_b": jnp.zeros((2, 5), jnp.float32)},  # LoRA init
    "stack": {"lora_a": f(3, 4, 2), "lora_b": f(3, 2, 7)},
    "head": f(5, 3),
  }


def _targets():
  rng = np.random.default_rng(1)
  return {
    "layer": rng.standard_normal((6, 5)),
    "stack": rng.standard_normal((3, 4, 7)),
    "head": rng.standard_normal((5, 3)),
  }


def _loss(params, targets, step):
  """A quadratic in the adapted weights s·a@b (and the head) that moves with the step."""
  shift = jnp.sin(step.astype(jnp.float32))
  loss = 0.0
  for k in ("layer", "stack"):
    delta = SCALE * params[k]["lora_a"] @ params[k]["lora_b"]
    loss += jnp.sum((delta - targets[k] - shift) ** 2)
  return loss + jnp.sum((params["head"] - targets["head"]) ** 2)


def _make_tx(mode):
  return lpj.lorapro_adamw(
    optax.linear_schedule(1e-2, 1e-3, STEPS), scale=SCALE, mode=mode, weight_decay=1e-2
  )


def _make_step(tx):
  targets = jax.tree.map(jnp.asarray, _targets())

  @jax.jit
  def step(params, opt_state, t):
    grads = jax.grad(_loss)(params, targets, t)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def _train(step, params, opt_state, start, stop):
  for t in range(start, stop):
    params, opt_state = step(params, opt_state, jnp.asarray(t))
  return params, opt_state


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("mode", ["efficient", "full", "factored"])
def test_resumed_run_is_bitwise_identical(tmp_path, mode):
  tx = _make_tx(mode)
  step = _make_step(tx)
  params0 = _params()
  want = _train(step, params0, tx.init(params0), 0, STEPS)

  # First run: stop after SAVE_AT steps and checkpoint params and optimizer state.
  params, opt_state = _train(step, params0, tx.init(params0), 0, SAVE_AT)
  saved = {"params": params, "opt_state": opt_state}
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(SAVE_AT, args=ocp.args.StandardSave(saved))
    mngr.wait_until_finished()

  # Second run: a fresh optimizer; the restore target is abstract (shapes, dtypes
  # and the state's tree structure, including its masked Adam moments).
  tx2 = _make_tx(mode)
  abstract = jax.eval_shape(lambda p: {"params": p, "opt_state": tx2.init(p)}, params0)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    assert mngr.latest_step() == SAVE_AT
    restored = mngr.restore(SAVE_AT, args=ocp.args.StandardRestore(abstract))
  if mode == "full":
    mu = restored["opt_state"][0].pair_moments["layer"].mu
    assert mu.shape == (6, 5)  # the m×n moment, (in, out)
    assert mu.dtype == jnp.float32
  _assert_bitwise_equal(restored, saved)
  # The same program as the first run's (a new process would compile it again).
  got = _train(step, restored["params"], restored["opt_state"], SAVE_AT, STEPS)
  _assert_bitwise_equal(got, want)
