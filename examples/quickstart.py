"""Quickstart: LoRA-Pro on a Flax NNX model in a standard training loop.

A frozen random MLP is adapted by rank-4 LoRA to match a teacher whose weights
differ from it by a full-rank perturbation, so full fine-tuning could fit it
exactly. Plain LoRA and LoRA-Pro (efficient, full and factored mode) train for
the same number of steps with the same learning rate.

  python examples/quickstart.py [--steps 300] [--lr 3e-3]
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lorapro_jax as lpj


class MLP(nnx.Module):
  def __init__(self, sizes, rank, rngs):
    self.layers = nnx.List(
      [nnx.LoRALinear(i, o, lora_rank=rank, rngs=rngs) for i, o in zip(sizes[:-1], sizes[1:])]
    )

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jnp.tanh(layer(x))
    return self.layers[-1](x)


def train(tx, sizes, rank, x, y, steps, seed):
  model = MLP(sizes, rank, nnx.Rngs(seed))
  opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, opt, x, y):
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt, x, y)) for _ in range(steps)]
  return losses


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--rank", type=int, default=4)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  sizes = (32, 64, 64, 16)

  # The teacher is the seed's base model with every kernel perturbed densely.
  teacher = MLP(sizes, args.rank, nnx.Rngs(args.seed))
  keys = jax.random.split(jax.random.key(args.seed + 1), len(sizes))
  for layer, k in zip(teacher.layers, keys):
    noise = jax.random.normal(k, layer.kernel.shape) / layer.kernel.shape[0] ** 0.5
    layer.kernel[...] = layer.kernel[...] + 0.3 * noise
  x = jax.random.normal(jax.random.key(args.seed + 2), (512, sizes[0]))
  y = teacher(x)

  txs = {
    "LoRA (AdamW)": optax.adamw(args.lr, weight_decay=0.0),
    "LoRA-Pro efficient": optax.chain(
      lpj.lorapro(scale=1.0), optax.adamw(args.lr, weight_decay=0.0)
    ),
    "LoRA-Pro full": lpj.lorapro_adamw(args.lr, scale=1.0, mode="full", weight_decay=0.0),
    "LoRA-Pro factored": lpj.lorapro_adamw(args.lr, scale=1.0, mode="factored", weight_decay=0.0),
  }
  print(f"{'method':<22}{'loss@0':>10}{'loss@end':>12}")
  for name, tx in txs.items():
    losses = train(tx, sizes, args.rank, x, y, args.steps, args.seed)
    print(f"{name:<22}{losses[0]:>10.4f}{losses[-1]:>12.5f}")


if __name__ == "__main__":
  main()
