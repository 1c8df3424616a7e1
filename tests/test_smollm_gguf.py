"""The GGUF loader and tokenizer of examples/smollm on a tiny GGUF the test writes.

Dequantization is checked against ``gguf``'s reader and against the block formats of Q8_0
and Q4_1 decoded here in NumPy; the tokenizer against byte-level BPE worked by hand.
"""

import dataclasses

import gguf
import numpy as np
import pytest

from examples.smollm import tiny
from examples.smollm import weights as W
from examples.smollm.tokenizer import chat_prompt, encode, tokenizer_from_gguf


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  return path, tiny.write(path)


def _blocks(t, block_bytes):
  return np.asarray(t.data, np.uint8).reshape(-1, block_bytes)


def _f16(b, at):
  return b[:, at : at + 2].copy().view(np.float16).astype(np.float64)


def _q8_0(t):
  """GGML's Q8_0 block: float16 scale d, 32 int8 q; x = d·q."""
  b = _blocks(t, 34)
  return (_f16(b, 0) * b[:, 2:].view(np.int8)).reshape(-1)


def _q4_1(t):
  """GGML's Q4_1 block: float16 d and m, 16 bytes of nibbles (low nibbles the first 16
  values, high the last 16); x = d·q + m."""
  b = _blocks(t, 20)
  q = np.concatenate([b[:, 4:] & 15, b[:, 4:] >> 4], axis=1)
  return (_f16(b, 0) * q + _f16(b, 2)).reshape(-1)


def test_config_and_shapes(written):
  path, _ = written
  reader = W.open_gguf(path)
  c = W.read_config(reader)
  assert c == dataclasses.replace(tiny.CONFIG, norm_eps=float(np.float32(1e-5)))  # stored as f32
  tensors = W.read_tensors(reader, c)
  assert {k: v.shape for k, v in tensors.items()} == W.expected_shapes(c)
  assert all(v.dtype == np.float32 for v in tensors.values())
  assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "Q4_1", "F32"}


def test_dequantization_matches_gguf_and_block_formats(written):
  path, original = written
  reader = W.open_gguf(path)
  tensors = W.read_tensors(reader, W.read_config(reader))
  decode = {"Q8_0": _q8_0, "Q4_1": _q4_1}
  for t in reader.tensors:
    ours = tensors[t.name]
    theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
    np.testing.assert_array_equal(ours, theirs, err_msg=t.name)
    if t.tensor_type.name in decode:
      np.testing.assert_allclose(
        ours.reshape(-1), decode[t.tensor_type.name](t), rtol=1e-6, atol=1e-7
      )
      # Quantization error: half a step of each 32-value block, plus float16 scales.
      x = original[t.name].reshape(-1, 32)
      step = np.abs(x).max(1) / 127 if t.tensor_type.name == "Q8_0" else np.ptp(x, 1) / 15
      err = np.abs(ours.reshape(-1, 32) - x).max(1)
      assert np.all(err <= 0.6 * step), t.name
    else:
      np.testing.assert_array_equal(ours, original[t.name])


def test_qk_permutation_round_trip():
  w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
  np.testing.assert_array_equal(W.unpermute_qk(W.permute_qk(w, 4), 4), w)
  # llama.cpp's order: within a head of 8 rows, rows (0, 4), (1, 5), ... become adjacent.
  np.testing.assert_array_equal(W.permute_qk(w, 4)[:8, 0], w[[0, 4, 1, 5, 2, 6, 3, 7], 0])


def test_bad_files_name_the_problem(tmp_path):
  wrong = tmp_path / "gpt2.gguf"
  tiny.write(wrong, arch="gpt2")
  with pytest.raises(ValueError, match="architecture is 'gpt2'"):
    W.read_config(W.open_gguf(wrong))
  missing = tmp_path / "missing.gguf"
  tiny.write(missing, drop=("blk.1.ffn_up.weight",))
  reader = W.open_gguf(missing)
  with pytest.raises(ValueError, match=r"tensor 'blk\.1\.ffn_up\.weight' missing"):
    W.read_tensors(reader, W.read_config(reader))
  with pytest.raises(KeyError, match=r"llama\.block_count"):
    W.field(reader, "llama.block_count_x")


def test_tokenizer_byte_level_bpe_and_chat_template(written):
  path, _ = written
  tok = tokenizer_from_gguf(W.open_gguf(path))
  vocab = tiny.vocabulary()
  sym = dict(zip(range(256), tiny.byte_symbols()))
  ids = lambda *pieces: [vocab.index(p) for p in pieces]
  # "the": t + (h e); " the": Ġ t -> Ġt, h e -> he, Ġt he -> Ġthe; digits one by one; the
  # control token whole; "é" is two bytes.
  text = "<|im_start|>the the 12 def\né"
  want = ids("<|im_start|>", "t", "he", "Ġthe", "Ġ", "1", "2", "Ġ", "def", "Ċ")
  want += ids(sym[0xC3], sym[0xA9])
  assert encode(tok, text) == want
  assert tok.decode(encode(tok, text), skip_special_tokens=False) == text
  prompt = chat_prompt([{"role": "user", "content": "hi"}])
  assert prompt == (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  )
  assert encode(tok, prompt).count(vocab.index("<|im_start|>")) == 3
  system_first = chat_prompt(
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}], False
  )
  assert system_first == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu<|im_end|>\n"


def test_unsupported_tokenizer_raises(tmp_path, monkeypatch):
  path = tmp_path / "t.gguf"
  tiny.write(path)
  reader = W.open_gguf(path)
  real = W.field

  def fake(r, key, default=W._MISSING):
    return "llama-bpe" if key == "tokenizer.ggml.pre" else real(r, key, default)

  monkeypatch.setattr("examples.smollm.tokenizer.field", fake)
  with pytest.raises(ValueError, match="pre-tokenizer 'llama-bpe'"):
    tokenizer_from_gguf(reader)
