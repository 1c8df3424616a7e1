"""Loads model, data and the frozen-layer cache once, then trains and evaluates runs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flax import nnx

from examples.smollm import data
from examples.smollm.model import load_gguf
from examples.smollm.tokenizer import tokenizer_from_gguf
from examples.smollm.train import (
  TARGETS,
  Config,
  Split,
  Trainer,
  frozen_cache,
  run,
  top_stack,
  with_lora,
)
from examples.smollm.weights import locate_gguf

PAD_ID = 2  # <|im_end|>: padding after the answer, never a target


def config_key(cfg: Config, gguf: Path) -> str:
  """Names the setting of a run: the config, the weights file and the Python (whose stdlib
  is the data)."""
  fields = dataclasses.asdict(cfg)
  if fields["targets"] == TARGETS:  # a later field: the default leaves earlier keys unchanged
    del fields["targets"]
  blob = json.dumps([fields, gguf.name, platform.python_version()], sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


class Setup:
  """Model, tokenized splits and cached frozen activations of one :class:`Config`.

  The cache of each split is stored under ``cache_dir`` (keyed by the setting), so a
  resumed study or a second command skips the frozen layers' forward passes.
  """

  def __init__(
    self,
    cfg: Config,
    splits: Iterable[str],
    gguf: str | Path | None = None,
    cache_dir: str | Path | None = "out/smollm/cache",
    modules: Iterable[str] | None = None,
    progress: bool = True,
    log=print,
  ):
    self.cfg, self.log, self.progress = cfg, log, progress
    self.gguf = Path(gguf) if gguf is not None else locate_gguf()
    self.key = config_key(cfg, self.gguf)
    if modules is not None:
      self.key += "-" + hashlib.sha256(",".join(sorted(modules)).encode()).hexdigest()[:6]
    t = time.perf_counter()
    model, reader = load_gguf(self.gguf)
    self.tokenizer = tokenizer_from_gguf(reader)
    self.model_config = model.c
    log(f"loaded {self.gguf.name}: {model.c} ({time.perf_counter() - t:.0f} s)")
    enc = data.build(
      self.tokenizer,
      seq_len=cfg.seq_len,
      answer_len=cfg.answer_len,
      caps=cfg.caps,
      pad_id=PAD_ID,
      seed=cfg.data_seed,
      modules=modules,
    )
    self.encoded = enc
    log("examples: " + ", ".join(f"{len(v)} {k}" for k, v in enc.items()) + " (split by module)")
    stop = model.c.layers - cfg.train_layers
    self.splits = {}
    for name in splits:
      if len(enc[name]) == 0:
        raise ValueError(
          f"no {name} examples fit seq_len={cfg.seq_len}, answer_len={cfg.answer_len}"
        )
      path = Path(cache_dir) / f"{self.key}-{name}.npy" if cache_dir else None
      if path is not None and path.is_file():
        h = np.load(path)
      else:
        h = frozen_cache(
          model, enc[name], stop, cfg.eval_batch, progress, f"frozen layers 0-{stop - 1}: {name}"
        )
        if path is not None:
          path.parent.mkdir(parents=True, exist_ok=True)
          np.save(path, h)
      self.splits[name] = Split.make(h, enc[name], cfg.answer_len)
    self.top = top_stack(model, cfg.train_layers)
    del model  # only the top blocks and the head are needed from here on
    self.template = with_lora(self.top, cfg, 0)  # the graph every method and seed shares
    self._lora: dict[int, object] = {}
    self._trainers: dict[str, Trainer] = {}

  def lora(self, seed: int):
    """The initial LoRA weights of ``seed`` (A from Qwix's initializer, B = 0)."""
    if seed not in self._lora:
      self._lora[seed] = nnx.split(with_lora(self.top, self.cfg, seed), nnx.LoRAParam, ...)[1]
    return self._lora[seed]

  def trainer(self, method: str) -> Trainer:
    if method not in self._trainers:
      self._trainers[method] = Trainer(method, self.cfg, self.template)
    return self._trainers[method]

  def _record(self, out: dict) -> dict:
    return out | {
      "config": dataclasses.asdict(self.cfg),
      "config_key": self.key,
      "gguf": self.gguf.name,
    }

  def zero_shot(self, splits: Iterable[str]) -> dict:
    """The pretrained model (LoRA's B = 0) on ``splits``."""
    trainer = self.trainer("lora")
    return self._record(
      {"method": "zero_shot"} | {s: trainer.evaluate(self.lora(0), self.splits[s]) for s in splits}
    )

  def run(self, method: str, lr: float, seed: int, eval_splits: Iterable[str]) -> dict:
    t = time.perf_counter()
    out = run(
      self.trainer(method),
      self.lora(seed),
      self.splits,
      lr,
      seed,
      tuple(eval_splits),
      self.progress,
    )
    return self._record(out | {"total_s": time.perf_counter() - t})
