"""The training path of examples/smollm on a tiny model: the frozen-layer cache and the
trained top stack give the full model's answer loss, and teacher-forced exact match is
greedy decoding's."""

import dataclasses

import numpy as np
from flax import nnx

from examples.smollm import tiny
from examples.smollm.check import greedy
from examples.smollm.data import Encoded, Example
from examples.smollm.model import Llama, load_tensors
from examples.smollm.train import Config, Split, Trainer, frozen_cache, top_stack, with_lora
from examples.smollm.weights import hf_layout


def test_cached_top_stack_loss_and_exact_match_agree_with_the_full_model():
  c = tiny.CONFIG
  model = Llama(c, nnx.Rngs(0))
  load_tensors(model, hf_layout(tiny.random_tensors(c, seed=5), c))
  prompt = [1, 80, 81, 82, 83, 260, 2, 1, 90, 91]
  answer = greedy(model, prompt, max_new=5)
  assert len(answer) == 5 and 2 not in answer  # a random model's continuation, no <|im_end|>
  wrong = answer[:-1] + [(answer[-1] + 1) % c.vocab]  # greedy misses its last token
  T, K = 20, 6
  ids = np.zeros((2, T), np.int32)
  ids[0, : len(prompt) + 5] = prompt + answer
  ids[1, : len(prompt) + 5] = prompt + wrong
  ex = Example("m", "f", "a summary here", "def f():")
  enc = Encoded((ex, ex), ids, np.array([len(prompt)] * 2, np.int32), np.array([5, 5], np.int32))
  cfg = dataclasses.replace(Config(), train_layers=1, rank=2, seq_len=T, answer_len=K, eval_batch=2)
  split = Split.make(frozen_cache(model, enc, c.layers - 1, chunk=2, progress=False), enc, K)
  template = with_lora(top_stack(model, 1), cfg, seed=0)  # B = 0: the pretrained model
  got = Trainer("lora", cfg, template).evaluate(nnx.split(template, nnx.LoRAParam, ...)[1], split)
  assert got["em"] == 0.5  # the first example is greedy's own answer, the second is not
  logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  ce = [-logp[b, len(prompt) - 1 + j, ids[b, len(prompt) + j]] for b in range(2) for j in range(5)]
  np.testing.assert_allclose(got["loss"], np.mean(ce), rtol=1e-4)
