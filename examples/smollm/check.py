"""The NNX model against llama.cpp on the same GGUF, and greedy answers under the chat template.

Reads the fixture of ``make_llamacpp_fixture.py`` (``tests/fixtures/smollm/``) and writes
``results/agreement.json``: whether our tokenizer gives llama.cpp's token ids, top-1
agreement of the logits at every position, the correlation and largest difference of the
full-vocabulary logits at each prompt's last position, and greedy answers (ours and
llama.cpp's). llama.cpp multiplies the 4-bit weights with 8-bit quantized activations;
this model multiplies the dequantized weights in float32, so the logits agree only up to
that arithmetic, and near-ties can flip.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.smollm import report
from examples.smollm.model import Llama, load_gguf
from examples.smollm.tokenizer import chat_prompt, encode, tokenizer_from_gguf

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "smollm"
RESULTS = Path(__file__).parent / "results"
EOS = 2  # <|im_end|>
# Further chat prompts whose greedy answers show the model's coherence (no reference).
EXTRA_CHATS = ("Name three primary colors.", "How do I reverse a list in Python?")


def greedy(model: Llama, ids: list[int], max_new: int = 48, size: int = 160) -> list[int]:
  """Greedy decoding with a KV cache, fed one token at a time (one compilation); stops
  after ``<|im_end|>``."""
  graphdef, state = nnx.split(model)
  step = _decoder(graphdef)
  cache = model.init_cache(1, size)
  for t in ids:
    logits, cache = step(state, jnp.asarray([[t]]), cache)
  out = []
  while len(out) < max_new and len(ids) + len(out) < size:
    out.append(int(jnp.argmax(logits[0])))
    if out[-1] == EOS:
      break
    logits, cache = step(state, jnp.asarray([[out[-1]]]), cache)
  return out


_DECODERS: dict = {}


def _decoder(graphdef):
  if graphdef not in _DECODERS:
    _DECODERS[graphdef] = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode(t, c))
  return _DECODERS[graphdef]


def compare(model: Llama, tok, fixture: dict, last: dict) -> dict:
  """The agreement figures of one fixture (see the module docstring)."""
  prompts = fixture["prompts"]
  ids = [p["ids"] for p in prompts]
  width = max(map(len, ids))
  batch = np.full((len(ids), width), EOS, np.int32)  # right padding: causal, so harmless
  for i, x in enumerate(ids):
    batch[i, : len(x)] = x
  graphdef, state = nnx.split(model)
  logits = np.asarray(jax.jit(lambda s, b: nnx.merge(graphdef, s)(b))(state, jnp.asarray(batch)))
  rows, agree, total, in_top = [], 0, 0, 0
  corr, margins = [], []
  for i, p in enumerate(prompts):
    ours = logits[i, : len(p["ids"])]
    top = np.asarray(p["top_ids"])
    a = ours.argmax(-1) == top[:, 0]
    agree, total = agree + int(a.sum()), total + len(a)
    gap = np.asarray(p["top_logits"])[:, 0] - np.asarray(p["top_logits"])[:, 1]
    margins += [round(float(g), 4) for g in gap[~a]]
    in_top += int(sum(o in t for o, t in zip(ours.argmax(-1), top)))
    theirs = last[f"prompt{i}"].astype(np.float64)
    r = float(np.corrcoef(ours[-1], theirs)[0, 1])
    corr.append(r)
    at_top = np.take_along_axis(ours, top, 1) - np.asarray(p["top_logits"])
    rows.append(
      {
        "prompt": p["prompt"],
        "tokens": len(p["ids"]),
        "same_token_ids": encode(tok, p["prompt"]) == p["ids"],
        "top1_agree": f"{int(a.sum())}/{len(a)}",
        "last_corr": round(r, 6),
        "last_max_abs_diff": round(float(np.abs(ours[-1] - theirs).max()), 4),
        "last_logit_std": round(float(theirs.std()), 4),
        "top10_max_abs_diff": round(float(np.abs(at_top).max()), 4),
        "last_top1": {"ours": int(ours[-1].argmax()), "llama_cpp": int(top[-1, 0])},
      }
    )
  return {
    "top1_agreement": agree / total,
    "positions": total,
    "ours_top1_in_llamacpp_top10": in_top / total,
    # llama.cpp's top-1 minus top-2 logit where the top-1 tokens differ: near-ties.
    "llamacpp_margin_where_top1_differs": sorted(margins),
    "last_position_corr_min": min(corr),
    "last_position_corr_mean": float(np.mean(corr)),
    "all_token_ids_equal": all(r["same_token_ids"] for r in rows),
    "prompts": rows,
  }


def generations(model: Llama, tok, fixture: dict) -> list[dict]:
  out = []
  for p in fixture["prompts"]:
    if "greedy_ids" in p:
      ours = greedy(model, p["ids"])
      same = next((k for k, (a, b) in enumerate(zip(ours, p["greedy_ids"])) if a != b), None)
      out.append(
        {
          "prompt": p["prompt"],
          "ours": tok.decode(ours),
          "llama_cpp": p["greedy_text"],
          "same_tokens": same is None and len(ours) == len(p["greedy_ids"]),
          "first_difference_at": same,
        }
      )
  for q in EXTRA_CHATS:
    prompt = chat_prompt([{"role": "user", "content": q}])
    out.append({"prompt": prompt, "ours": tok.decode(greedy(model, encode(tok, prompt)))})
  return out


def main(a) -> dict:
  model, reader = load_gguf(a.gguf)
  tok = tokenizer_from_gguf(reader)
  fixture = json.loads((FIXTURE / "llamacpp.json").read_text(encoding="utf-8"))
  last = dict(np.load(FIXTURE / "llamacpp_last_logits.npz"))
  result = {"commit": report.commit(), "fixture": fixture["meta"]} | compare(
    model, tok, fixture, last
  )
  result["generations"] = generations(model, tok, fixture)
  print(
    f"top-1 agreement {result['top1_agreement']:.3f} over {result['positions']} positions; "
    f"last-position correlation min {result['last_position_corr_min']:.5f}, "
    f"mean {result['last_position_corr_mean']:.5f}; token ids equal: {result['all_token_ids_equal']}"
  )
  for g in result["generations"]:
    print(f"\n{g['prompt']!r}\n  ours:      {g['ours']!r}")
    if "llama_cpp" in g:
      print(f"  llama.cpp: {g['llama_cpp']!r}")
  out = Path(a.results) if a.results.suffix == ".json" else RESULTS / "agreement.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
  print(f"wrote {out}")
  return result
