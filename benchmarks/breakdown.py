"""Where the efficient-mode update's time goes (finding F6 in benchmarks/README.md).

    python -m benchmarks.breakdown                 # Llama-2-7B shapes, 2 layers, r = 8
    python -m benchmarks.breakdown --layers 1 --rank 16

Times, interleaved in one run, each step of `lorapro_jax`'s raw path on its own,
as the fraction of `optax.adamw`'s update on the same LoRA leaves:

  grams        the four r×r products per pair (AAᵀ, BᵀB, g^A·Aᵀ, Bᵀ·g^B)
  grams+amax   the same plus max|g| of both gradients (the finite-output bound)
  outs+adamw   the two K = r output products per leaf, fed to AdamW (random r×r
               coefficients: the values do not change the time)
  lorapro      `lorapro()` alone, and chained with AdamW as users run it

(outs+adamw) - adamw is what the output products cost when XLA fuses them into
AdamW; grams + amax + that is the adjustment's cost apart from its r×r work.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
import optax

import lorapro_jax as lpj
from benchmarks import models, timing
from lorapro_jax import layout as lo


def _pairs(params, grads):
  """(A, B, g_A, g_B) per pair in the flax layout, with a unit batch axis."""
  out = []
  for name in params["layers"]:
    for lin in params["layers"][name]:
      p, g = params["layers"][name][lin], grads["layers"][name][lin]
      out.append(tuple(x[None] for x in (p["lora_a"], p["lora_b"], g["lora_a"], g["lora_b"])))
  return out


def _grams(pairs, with_amax):
  out = []
  for a, b, ga, gb in pairs:
    prods = (
      lo.gram_A("flax", a, a),
      lo.gram_B("flax", b, b),
      lo.gram_A("flax", ga, a),
      lo.gram_B("flax", b, gb),
    )
    if with_amax:
      prods += (jnp.max(jnp.abs(ga)), jnp.max(jnp.abs(gb)))
    out.append(prods)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="llama2-7b", choices=sorted(models.MODELS))
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--target-s", type=float, default=1.5)
  ap.add_argument("--rounds", type=int, default=5)
  args = ap.parse_args(argv)

  params, grads = models.lora_tree(models.MODELS[args.model], args.layers, args.rank)
  pairs = _pairs(params, grads)
  coef = jnp.asarray(
    0.1 * np.random.default_rng(0).standard_normal((4, 1, args.rank, args.rank)), jnp.float32
  )
  adamw = optax.adamw(1e-4)
  flat = [x[0] for a, b, _, _ in pairs for x in (a, b)]

  def outs_adamw(pairs, state, params):
    g = []
    for a, b, ga, gb in pairs:
      g.append((lo.left("flax", coef[0], ga) + lo.left("flax", coef[1], a))[0])
      g.append((lo.right("flax", gb, coef[2]) - lo.right("flax", b, coef[3]))[0])
    return adamw.update(g, state, params)

  def update(tx):
    return lambda g, s, p: tx.update(g, s, p)

  lp, lp_adamw = lpj.lorapro(2.0), optax.chain(lpj.lorapro(2.0), optax.adamw(1e-4))
  runners = [
    timing.Runner("adamw", update(adamw), [grads, adamw.init(params), params], state_index=1),
    timing.Runner("grams", lambda p: _grams(p, False), [pairs]),
    timing.Runner("grams+amax", lambda p: _grams(p, True), [pairs]),
    timing.Runner("outs+adamw", outs_adamw, [pairs, adamw.init(flat), flat], state_index=1),
    timing.Runner("lorapro", update(lp), [grads, lp.init(params), params], state_index=1),
    timing.Runner(
      "lorapro+adamw", update(lp_adamw), [grads, lp_adamw.init(params), params], state_index=1
    ),
  ]
  for r in runners:
    r.compile()
  res = timing.measure(runners, rounds=args.rounds, target_s=args.target_s)
  base = res["adamw"]["median_ms"]
  print(
    f"{args.model} L{args.layers} r{args.rank}, {len(pairs)} pairs, {timing.device_info()['label']}"
  )
  for name, v in res.items():
    print(f"  {name:14s} {v['median_ms']:8.2f} ms  {v['median_ms'] / base:5.2f}x adamw")


if __name__ == "__main__":
  main()
