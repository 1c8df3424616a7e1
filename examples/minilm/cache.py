"""The frozen-layer cache: hidden states of the frozen prefix, computed once per text.

The embeddings and the layers below the trained ones do not change during
training, so their output is exact input for every method and step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.minilm.weights import tokenize


def progress_bar(iterable, **kw):
  """``tqdm`` when installed, else ``iterable`` unchanged."""
  try:
    from tqdm.auto import tqdm
  except ImportError:  # progress bars are optional
    return iterable
  return tqdm(iterable, **kw)


@dataclasses.dataclass
class Encoded:
  """Frozen-prefix hidden states of one split: queries and documents."""

  hq: np.ndarray  # (n, query_len, hidden) float32
  mq: np.ndarray  # (n, query_len) bool
  hd: np.ndarray
  md: np.ndarray

  def __len__(self):
    return self.hq.shape[0]

  def batch(self, idx):
    return (
      jnp.asarray(self.hq[idx]),
      jnp.asarray(self.mq[idx]),
      jnp.asarray(self.hd[idx]),
      jnp.asarray(self.md[idx]),
    )


def make_prefix_fn(model, n_frozen: int):
  """Jitted ``(ids, mask, type_ids) -> hidden states`` of the embeddings and the
  first ``n_frozen`` layers of ``model`` (compiled once per input shape)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids, mask, type_ids):
    m = nnx.merge(graphdef, state)
    maskb = mask.astype(bool)
    h = m.embeddings(ids, type_ids)
    for layer in m.layers[:n_frozen]:
      h = layer(h, maskb)
    return h

  return lambda ids, mask, type_ids: run(state, ids, mask, type_ids)


def encode_prefix(
  prefix_fn, texts: Sequence[str], max_len: int, chunk: int, progress: bool = False, desc: str = ""
) -> tuple[np.ndarray, np.ndarray]:
  """``prefix_fn`` on tokenized ``texts`` in fixed-shape chunks -> (hidden states, bool mask)."""
  hs, ms = [], []
  for s in progress_bar(
    range(0, len(texts), chunk), desc=desc, leave=False, disable=not progress, mininterval=1.0
  ):
    part = list(texts[s : s + chunk])
    n = len(part)
    # Padding the last chunk keeps one input shape, hence one compilation.
    ids, mask, type_ids = tokenize(part + [""] * (chunk - n), max_len)
    hs.append(np.asarray(prefix_fn(ids, mask, type_ids))[:n])
    ms.append(mask[:n].astype(bool))
  return np.concatenate(hs), np.concatenate(ms)


def encode_pairs(
  prefix_fn,
  pairs: Sequence,
  query_len: int,
  max_len: int,
  chunk: int,
  progress: bool = False,
  name: str = "",
) -> Encoded:
  """The frozen prefix's output for the queries and documents of ``pairs``."""
  hq, mq = encode_prefix(
    prefix_fn,
    [p.query for p in pairs],
    query_len,
    chunk,
    progress,
    f"frozen layers: {name} queries",
  )
  hd, md = encode_prefix(
    prefix_fn,
    [p.document for p in pairs],
    max_len,
    chunk,
    progress,
    f"frozen layers: {name} documents",
  )
  return Encoded(hq, mq, hd, md)
