"""Where the efficient-mode train step's time goes (findings F6 and F9 in benchmarks/FINDINGS.md).

    python -m benchmarks.breakdown                 # Llama-2-7B shapes, 2 layers, r = 8
    python -m benchmarks.breakdown --layers 8 --rank 16

Every arm is a donated train step (params and optimizer state donated and fed back,
``optax.apply_updates`` applied, AdamW with the same weight decay), timed interleaved
in one run, so each arm's increment over ``adamw`` is what that component costs in
the step users run:

  adamw          optax.adamw on the LoRA gradients (the floor)
  grams          + the four r×r products per pair (AAᵀ, BᵀB, g^A·Aᵀ, Bᵀ·g^B), returned
  grams+amax     + max|g| of both gradients (the bound behind the finite-output check)
  outs-fused     AdamW on the K = r output products g^A = g_lora^A·M1ᵀ + A·M2ᵀ,
                 g^B = M3ᵀ·g_lora^B - M4ᵀ·B (random r×r coefficients, passed as an
                 argument so that XLA cannot fold them into the code as constants;
                 the values do not change the time), written as r broadcast multiply-adds, as
                 `lorapro_jax` does at r <= 16, and left to XLA to fuse into AdamW
  outs-cond      the same, materialised once as the output of a ``lax.cond`` (on a
                 run-time r×r predicate, as the library's raw-or-normalised choice);
                 ``jax.lax.optimization_barrier`` does not materialise them on XLA:CPU
  lorapro        chain(lorapro(), adamw), the library as users run it

The components are written here with plain ``jnp`` (they are the library's raw-path
products at the commit this was written against), so the breakdown does not depend
on the library's internals. With ``--passes`` it also prints each arm's memory
traffic counted from its compiled HLO (`benchmarks.hlo_traffic`), in passes over
arrays the size of the LoRA parameters.
"""

from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorapro_jax as lpj
from benchmarks import hlo_traffic, models, timing
from benchmarks.optimizers import LR, SCALE, WD

# The finite-output bound needs max|g| of both gradients of every pair.


def _pairs(tree):
  """(A, B) leaves, or (g_A, g_B), of every pair in the flax layout."""
  return [
    (tree["layers"][l][k]["lora_a"], tree["layers"][l][k]["lora_b"])
    for l in tree["layers"]
    for k in tree["layers"][l]
  ]


def _grams(params, grads, with_amax):
  out = []
  for (a, b), (ga, gb) in zip(_pairs(params), _pairs(grads)):
    prods = (
      jnp.einsum("nr,ns->rs", a, a),
      jnp.einsum("rm,sm->rs", b, b),
      jnp.einsum("nr,ns->rs", ga, a),
      jnp.einsum("rm,sm->rs", b, gb),
    )
    if with_amax:
      prods += (jnp.max(jnp.abs(ga)), jnp.max(jnp.abs(gb)))
    out.append(prods)
  return out


def _left(M, X):
  """M·X for the flax layout X (n, r): out[n, i] = Σ_s X[n, s]·M[i, s], unrolled over s."""
  r = M.shape[-1]
  return sum((X[:, s, None] * M[None, :, s] for s in range(1, r)), X[:, 0, None] * M[None, :, 0])


def _right(X, M):
  """X·M for the flax layout X (r, m): out[i, m] = Σ_s M[s, i]·X[s, m], unrolled over s."""
  r = M.shape[-1]
  return sum((M[s, :, None] * X[s, None, :] for s in range(1, r)), M[0, :, None] * X[0, None, :])


def _outputs(params, grads, coef, materialise):
  def products():
    leaves = []
    for (a, b), (ga, gb), c in zip(_pairs(params), _pairs(grads), coef):
      leaves.append(_left(c[0], ga) + _left(c[1], a))
      leaves.append(_right(gb, c[2]) - _right(b, c[3]))
    return leaves

  if materialise:  # the library's structure: a cond whose branch writes the products
    leaves = jax.lax.cond(
      jnp.all(jnp.isfinite(coef)), products, lambda: [jnp.zeros_like(x) for x in products()]
    )
  else:
    leaves = products()
  it = iter(leaves)
  return jax.tree.map(lambda _: next(it), grads)  # pairs are leaves in tree order


def coefficients(rank, n_pairs):
  """Random r×r coefficients (4 per pair), an argument of the output-product arms."""
  rng = np.random.default_rng(0)
  return jnp.asarray(0.1 * rng.standard_normal((n_pairs, 4, rank, rank)), jnp.float32)


def arms():
  """name -> (step(params, state, grads, coef), optimizer)."""
  adamw = optax.adamw(LR, weight_decay=WD)

  def plain(extra=None):
    def step(params, state, grads, coef):
      del coef
      extras = None if extra is None else extra(params, grads)
      updates, state = adamw.update(grads, state, params)
      return optax.apply_updates(params, updates), state, extras

    return step

  def outs(barrier):
    def step(params, state, grads, coef):
      g = _outputs(params, grads, coef, barrier)
      updates, state = adamw.update(g, state, params)
      return optax.apply_updates(params, updates), state, None

    return step

  chained = optax.chain(lpj.lorapro(SCALE), adamw)

  def library(params, state, grads, coef):
    del coef
    updates, state = chained.update(grads, state, params)
    return optax.apply_updates(params, updates), state, None

  return {
    "adamw": (plain(), adamw),
    "grams": (plain(lambda p, g: _grams(p, g, False)), adamw),
    "grams+amax": (plain(lambda p, g: _grams(p, g, True)), adamw),
    "outs-fused": (outs(False), adamw),
    "outs-cond": (outs(True), adamw),
    "lorapro": (library, chained),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="llama2-7b", choices=sorted(models.MODELS))
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--target-s", type=float, default=1.5)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--passes", action="store_true", help="also count HLO memory traffic")
  args = ap.parse_args(argv)
  warnings.filterwarnings("ignore", message=".*[Dd]onat.*")

  params, grads = models.lora_tree(models.MODELS[args.model], args.layers, args.rank, seed=1)
  coef = coefficients(args.rank, len(_pairs(params)))
  runners = []
  for name, (step, tx) in arms().items():
    p = jax.tree.map(jnp.copy, params)
    runners.append(timing.Runner(name, step, [p, tx.init(p), grads, coef], carry=(0, 1)))
  passes = {}
  for rn in runners:
    rn.compile()
    if args.passes:
      text = rn.compiled.as_text()
      passes[rn.name] = hlo_traffic.passes(text, timing.tree_bytes(params))
  res = timing.measure(runners, rounds=args.rounds, target_s=args.target_s)
  base = res["adamw"]["median_ms"]
  n_pairs = len(_pairs(params))
  print(
    f"{args.model} L{args.layers} r{args.rank}, {n_pairs} pairs, donated train steps, "
    f"{timing.device_info()['label']}"
  )
  for name, v in res.items():
    line = f"  {name:14s} {v['median_ms']:8.2f} ms  {v['median_ms'] / base:5.2f}x adamw"
    if name in passes:
      line += f"  {passes[name]['passes']:5.1f} passes, {passes[name]['kernels']} kernels"
    print(line)
  return res, passes


if __name__ == "__main__":
  main()
