"""A smoke run of examples/smollm's command on a tiny GGUF (no weights package needed):
zero-shot, LoRA and LoRA-Pro factored, the resumable study's results file and report, and
the optimizer-state sizes of every mode."""

import jax
import numpy as np
import pytest

from examples.smollm import compare, cost, report, tiny
from examples.smollm.train import METHODS

# Modules whose hash puts them in train, validation and test (examples/minilm/data.split_of).
MODULES = "heapq,functools,bisect,pprint,fnmatch,hmac"
TINY = [
  "--steps=2",
  "--batch=4",
  "--eval-batch=8",
  "--train-layers=1",
  "--rank=2",
  "--seq-len=224",
  "--answer-len=64",
  "--train-examples=12",
  "--validation-examples=8",
  "--test-examples=8",
  f"--modules={MODULES}",
  # Two pairs: compiling LoRA-Pro's step takes seconds per pair on a CPU.
  r"--targets=layers/\d+/(self_attn/q_proj|mlp/down_proj)",
  "--no-progress",
]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("smollm") / "tiny.gguf"
  tiny.write(path)
  return path


@pytest.mark.slow  # trains a tiny model with two optimizers
def test_study_smoke_resumes_and_reports(gguf_path, tmp_path, capsys):
  results = tmp_path / "runs.jsonl"
  argv = [f"--gguf={gguf_path}", f"--results={results}", f"--cache-dir={tmp_path / 'cache'}"]
  argv += [*TINY, "--study", "--seeds=0,1"]
  argv += ["--methods=lora,lorapro_factored", "--lrs", "lora=1e-3,1e-2,1e-1"]
  argv += ["lorapro_factored=1e-3", "--max-extend=0"]
  assert compare.main(argv) == 0
  runs = report.load(results)
  assert [r["method"] for r in runs].count("zero_shot") == 1
  assert sorted((r["method"], r["lr"], r["seed"]) for r in runs if r["method"] != "zero_shot") == [
    ("lora", lr, s) for lr in (1e-3, 1e-2, 1e-1) for s in (0, 1)
  ] + [("lorapro_factored", 1e-3, 0), ("lorapro_factored", 1e-3, 1)]
  for r in runs:
    assert {"commit", "config_key", "test", "validation"} <= set(r)
    assert np.isfinite(r["test"]["loss"]) and 0 <= r["test"]["em"] <= 1
  trained = [r for r in runs if r["method"] != "zero_shot"]
  assert all(len(r["train_loss"]) == 2 for r in trained)
  # The same command again trains nothing: every run is in the file.
  assert compare.main(argv) == 0
  assert len(report.load(results)) == len(runs)
  rows = report.summarize(runs)
  assert [r["method"] for r in rows] == ["zero_shot", "lora", "lorapro_factored"]
  assert "d_loss" in rows[2] and rows[1]["grid"] == [1e-3, 1e-2, 1e-1]
  assert compare.main(["--report", f"--results={results}"]) == 0
  assert "LoRA-Pro factored" in capsys.readouterr().out


def test_lr_grid_extension_and_choice():
  assert compare._lr_neighbour(3e-2, up=True) == 0.1
  assert compare._lr_neighbour(1e-4, up=False) == 3e-5
  assert compare._lr_neighbour(1e-3, up=True) == 3e-3
  runs = [
    {"method": "lora", "lr": lr, "seed": s, "validation": {"loss": loss + s}, "config_key": "k"}
    for lr, loss in ((1e-3, 2.0), (3e-3, 1.0), (1e-2, 1.5))
    for s in (0, 1)
  ]
  choice = report.choose_lrs(runs)["lora"]
  assert choice["lr"] == 3e-3 and choice["interior"]
  # The main command's records: one lr per method, test only.
  main = [{"method": m, "lr": 1e-3, "seed": 0, "test": {"loss": 1.0, "em": 0.5}} for m in METHODS]
  assert [r["method"] for r in report.summarize(main)] == list(METHODS)


def test_state_bytes_of_every_mode():
  """Exact sizes from jax.eval_shape: full mode keeps two m×n moments per pair, the other
  modes state of the adapters' size."""
  m, n, r = 32, 48, 4
  lora = {
    "blk": {"kernel_lora_a": jax.ShapeDtypeStruct((m, r), np.float32)},
  }
  lora["blk"]["kernel_lora_b"] = jax.ShapeDtypeStruct((r, n), np.float32)
  sizes = cost.state_bytes(lora, scale=2.0, methods=METHODS)
  adapters = 4 * r * (m + n)
  assert sizes["lora"] >= 2 * adapters  # AdamW's two moments
  assert sizes["lorapro_efficient"] == sizes["lora"]
  assert sizes["lorapro_full"] >= 2 * 4 * m * n
  assert sizes["lorapro_factored"] < 3 * adapters
