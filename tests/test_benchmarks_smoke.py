"""Smoke test of the benchmark command (tiny shapes; no timing assertions)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import run, targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

UPDATE_VARIANTS = {
  "adamw",
  "lorapro-sylvester+adamw",
  "lorapro-zero+adamw",
  "lorapro-symmetric+adamw",
  "lorapro-full",
  "lorapro-full-bf16",
  "dense-adamw",
}


FACTORED_VARIANTS = {
  "adamw",
  "lorapro-sylvester+adamw",
  "lorapro-factored",
  "lorapro-factored-b1=0",
  "lorapro-full",
}


@pytest.mark.slow  # benchmark smoke run: compiles and times several arms
def test_smoke_writes_expected_rows(tmp_path):
  sections = "update,factored,scaling,memory,compile,e2e"
  run.main(["--smoke", "--no-plot", "--out-dir", str(tmp_path), "--sections", sections])
  with open(tmp_path / "smoke.json") as f:
    res = json.load(f)
  assert {"platform", "device_kind", "cpu_count", "label", "jax"} <= set(res["device"])
  prov = res["provenance"]
  assert {"git_commit", "git_modified", "versions", "lorapro_jax_sha256"} <= set(prov)
  assert prov["versions"]["jax"] == res["device"]["jax"]
  assert {r["variant"] for r in res["update"]} == UPDATE_VARIANTS
  for r in res["update"]:
    assert r["median_ms"] > 0 and r["n"] >= 1
    assert r["state_bytes"] >= 0 and "temp_size_in_bytes" in r
    assert r["timed"].startswith("train step")
  ratios = {x["ratio"] for x in res["ratios"]}
  assert {"sylvester/adamw", "zero/adamw", "symmetric/adamw", "full/dense-adamw"} <= ratios
  # The factored mode next to efficient and full mode, measured twice after one compilation.
  fac = res["factored"]
  assert {r["variant"] for r in fac} == FACTORED_VARIANTS
  for r in fac:
    assert r["median_ms"] > 0 and len(r["measurement_median_ms"]) == 2, r
    assert r["timed"].startswith("train step") and r["compile_s"] > 0
  fr = {x["ratio"]: x for x in res["factored_ratios"]}
  assert {"factored/efficient", "factored-b1=0/efficient", "factored/full"} <= set(fr)
  for x in fr.values():
    assert len(x["runs"]) == 2 and x["min"] <= x["value"] <= x["max"], x
  for kind in ("scaling_adapters", "scaling_rank"):
    variants = {r["variant"] for r in res["scaling"] if r["section"] == kind}
    assert variants == {
      "batched",
      "batched-stacked",
      "factored-stacked",
      "loop-factored",
      "loop-projector",
    }, kind
  mem = {r["variant"]: r for r in res["memory"]}
  assert set(mem) == {
    "adamw",
    "lorapro-sylvester+adamw",
    "lorapro-factored",
    "lorapro-factored-b1=0",
    "lorapro-full",
    "lorapro-full-bf16",
    "dense-adamw",
  }
  # Exact state sizes: efficient mode keeps AdamW's state; full mode's moments are m×n;
  # the factored mode's arrays are AdamW's plus an m- and an n-vector per pair (b1 = 0:
  # those vectors only); the rest are int32 step counters.
  assert mem["lorapro-sylvester+adamw"]["state_bytes"] == mem["adamw"]["state_bytes"]
  assert mem["lorapro-full-bf16"]["state_bytes"] < mem["lorapro-full"]["state_bytes"]
  arrays = {v: r["state_bytes"] - r["state_scalar_bytes"] for v, r in mem.items()}
  mn = 4 * mem["lorapro-factored"]["sum_m_plus_n"]
  assert arrays["lorapro-factored"] == arrays["adamw"] + mn
  assert arrays["lorapro-factored-b1=0"] == mn
  comp = {r["mode"]: r for r in res["compile"]}
  assert set(comp) == {"adamw", "factored-b1=0"}
  for r in comp.values():
    assert r["compile_s"] > 0 and r["kernels"] >= 1 and r["fast_compile"], r
  # The tiny end-to-end step ran (it is never skipped here: flax is installed).
  e2e = res["e2e"]
  assert "skipped" not in e2e, e2e
  assert {r["variant"] for r in e2e["rows"]} == {
    "adamw",
    "lorapro-sylvester+adamw",
    "lorapro-full",
    "lorapro-factored",
    "full-ft-adamw",
  }
  for r in e2e["rows"]:
    assert r["median_ms"] > 0 and r["n"] >= 1 and np.isfinite(r["loss_after"])
  # A smoke run judges no target, and says so.
  text = (tmp_path / "smoke.txt").read_text()
  assert res["targets"] == [] and "not judged" in res["targets_note"]
  assert "== targets ==\nnot judged" in text and "MISSED" not in text and "HOLDS" not in text
  # The same result judged: every kind of target it measures has a row.
  judged = {t["target"].split(" <=")[0].split(" state")[0] for t in targets.evaluate(res)}
  assert {"lorapro-factored", "lorapro-factored-b1=0", "full"} <= judged, judged
  assert "e2e train step, LoRA-Pro efficient" in judged


def test_smoke_writes_outside_tracked_folders():
  """--smoke defaults to out/ (ignored by git); a real run to benchmarks/results."""
  args = run.parse_args(["--smoke"])
  assert args.out_dir == run.SMOKE_OUT and args.smoke
  assert os.path.relpath(args.out_dir, ROOT).split(os.sep)[0] == "out"
  with open(os.path.join(ROOT, ".gitignore")) as f:
    assert "/out/" in f.read().split()
  assert run.parse_args([]).out_dir == run.RESULTS


def test_every_section_has_the_interface_and_its_presets_name_options():
  """A preset key that is not an option would be set and never read: a silent typo."""
  import argparse

  from benchmarks.sections import SECTIONS

  ap = argparse.ArgumentParser()
  for name, section in SECTIONS.items():
    assert name == section.NAME
    assert callable(section.run) and callable(section.format)
    section.add_arguments(ap)
  dests = {a.dest for a in ap._actions}
  for section in SECTIONS.values():
    assert set(section.QUICK) | set(section.SMOKE) <= dests, section.NAME


def test_targets_come_from_the_one_table(monkeypatch):
  """Judging and reporting read `targets.TARGETS`; a state below its bound is "within" it."""
  result = {
    "device": {"platform": "cpu"},
    "ratios": [{"config": "llama2-7b L1/32 r8", "ratio": "sylvester/adamw", "value": 1.4}],
    "memory": [
      {"variant": "adamw", "config": "c", "state_bytes": 100, "state_scalar_bytes": 4},
      {
        "variant": "lorapro-factored-b1=0",
        "config": "c",
        "state_bytes": 20,
        "state_scalar_bytes": 8,
        "sum_m_plus_n": 3,
      },
    ],
  }
  (eff, state) = targets.evaluate(result)
  assert eff["holds"] and "1.5x" in eff["target"]
  assert state["holds"] and state["excess_bytes"] == 20 - 112
  lines = "\n".join(targets.format_targets([state]))
  assert "92 bytes within the bound" in lines and "-92" not in lines
  monkeypatch.setitem(targets.TARGETS, "efficient_vs_adamw", targets.Target("<= {bound:g}x", 1.3))
  (eff, _) = targets.evaluate(result)
  assert not eff["holds"] and eff["target"] == "<= 1.3x"


def test_e2e_failure_is_not_a_skip(monkeypatch):
  """An error in the end-to-end step raises instead of becoming {"skipped": ...}."""
  from benchmarks import e2e_minilm

  def broken(*args, **kwargs):
    raise RuntimeError("broken model")

  monkeypatch.setattr(e2e_minilm, "_run", broken)
  with pytest.raises(RuntimeError, match="broken model"):
    e2e_minilm.run(smoke=True)


def test_breakdown_prints_every_component(capsys):
  from benchmarks import breakdown

  breakdown.main(
    ["--model", "tiny", "--layers", "1", "--target-s", "0.05", "--rounds", "1", "--passes"]
  )
  out = capsys.readouterr().out
  for name in ("adamw", "grams", "grams+amax", "outs-fused", "outs-cond", "lorapro"):
    assert f"  {name} " in out, name
  assert "passes" in out


@pytest.mark.slow  # benchmark smoke run: compiles and times several arms
def test_train_step_ratio(tmp_path):
  from benchmarks import train_step

  out = train_step.main(
    ["--model", "tiny", "--layers", "1", "--rounds", "1", "--target-s", "0.02"]
    + ["--out", str(tmp_path / "t.json")]
  )
  assert {r["variant"] for r in out["rows"]} == {"adamw", "lorapro+adamw"}
  with open(tmp_path / "t.json") as f:
    assert json.load(f)["provenance"]["versions"]["jax"]


@pytest.mark.slow  # benchmark smoke run: compiles and times several arms
def test_factored_cost_counts_every_arm(tmp_path):
  """benchmarks.factored_cost on a toy shape: HLO counts, timings, stages, report, K sweep."""
  from benchmarks import factored_cost

  out = tmp_path / "fc.json"
  res = factored_cost.main(
    ["--model", "tiny", "--layers", "1", "--rank", "4", "--repeats", "1", "--rounds", "1"]
    + ["--target-s", "0.02", "--no-profile", "--ksweep", "", "--fast-compile", "--out", str(out)]
  )
  arms = res["configs"][0]["arms"]
  assert set(arms) == set(factored_cost.arms())
  for name, a in arms.items():
    assert a["kernels"] > 0 and a["passes"] > 0 and len(a["median_ms"]) == 1, name
    assert sum(g["kernels"] for g in a["by_kind"].values()) == a["kernels"], name
    assert sum(g["kernels"] for g in a["by_stage"].values()) == a["kernels"], name
  assert arms["adamw"]["dot_mflop"] == 0 and arms["lorapro-factored"]["dot_mflop"] > 0
  assert arms["adamw"]["scopes"] is None and not arms["lorapro-factored"]["scopes"]["missing"]
  # Stages by the library's named scopes, the step's own ops by the benchmark's.
  stages = set(arms["lorapro-factored"]["by_stage"])
  assert {"factored/second_moment", "factored/outputs", "apply_updates"} <= stages, stages
  assert {"adjust/coefficients", "adjust/outputs"} <= set(
    arms["lorapro-sylvester+adamw"]["by_stage"]
  )
  with open(out) as f:
    assert json.load(f)["configs"][0]["rank"] == 4
  report = (tmp_path / "fc.txt").read_text()
  assert "lorapro-factored" in report
  assert targets.TARGETS["factored_passes"].describe() in report  # the bounds of the table
  rows = factored_cost.ksweep(n_pairs=1, n=64, ks=(4,), rounds=1, target_s=0.01, log=lambda m: 0)
  assert {r["op"] for r in rows} == {"copy", "dot", "gram"}


def _compiled_step(mode: str, layers: int) -> str:
  import jax

  from benchmarks import models, optimizers, timing, train_step

  tx = {"efficient": optimizers.efficient_tx(), "full": optimizers.full_tx()}.get(mode)
  tx = tx or optimizers.factored_tx()
  p, g = models.lora_tree(models.MODELS["tiny"], layers, 4, seed=0)
  lowered = jax.jit(train_step.train_step(tx), donate_argnums=(0, 1)).lower(p, tx.init(p), g)
  return lowered.compile(compiler_options=timing.FAST_COMPILE).as_text()


@pytest.mark.parametrize("mode, layers", [("efficient", 1), ("full", 1), ("factored", 2)])
@pytest.mark.slow  # benchmark smoke run: compiles and times several arms
def test_walker_finds_every_named_scope(mode, layers):
  """Each stage the walker expects is a named scope in the compiled HLO of a tiny step, and
  each walked kernel has a stage: renaming a scope in lorapro_jax fails here."""
  from benchmarks import hlo_traffic

  text = _compiled_step(mode, layers)
  ks = hlo_traffic.kernels(text)
  scopes = hlo_traffic.require_scopes(text, mode, ks)
  assert scopes["missing"] == []
  claimed = {s for k in ks for s in k["stage"].split(" > ")}
  assert set(hlo_traffic.STAGES[mode]) <= claimed | set(scopes["fused"])
  assert not [k for k in ks if k["stage"] == hlo_traffic.UNATTRIBUTED]
  if mode == "factored":  # two layers: the pairs of a kind are stacked and split again
    assert {"factored/stack_groups", "factored/split_groups"} <= claimed
  # A renamed scope is reported, and stops a benchmark before it times anything.
  old = hlo_traffic.STAGES[mode][0]
  renamed = text.replace(f"lorapro/{old}/", f"lorapro/{old}_renamed/")
  assert old in hlo_traffic.check_scopes(renamed, mode)["missing"]
  with pytest.raises(ValueError, match="not in the compiled HLO"):
    hlo_traffic.require_scopes(renamed, mode)


def test_hlo_traffic_counts_adamw_passes():
  """optax.adamw reads g, mu, nu, p and writes mu, nu, p: 7 to 10 passes over the params."""
  import jax
  import jax.numpy as jnp

  from benchmarks import hlo_traffic, train_step

  p = {"w": jnp.ones((64, 8))}
  tx = train_step.arms()["adamw"]
  text = (
    jax.jit(train_step.train_step(tx), donate_argnums=(0, 1))
    .lower(p, tx.init(p), p)
    .compile()
    .as_text()
  )
  res = hlo_traffic.passes(text, 64 * 8 * 4)
  assert 7 <= res["passes"] <= 10.5 and res["kernels"] >= 1


def test_loop_baseline_matches_the_library():
  import jax
  import jax.numpy as jnp

  import lorapro_jax as lpj
  from benchmarks import loop_baseline, models

  p, g = models.lora_tree(models.MODELS["tiny"], 1, 4, seed=0)
  for x in ("sylvester", "zero", "symmetric"):
    ref = jax.tree.leaves(lpj.lorapro(2.0, x_choice=x).update(g, None, p)[0])
    for variant in ("factored", "projector"):
      out = loop_baseline.LoopLoraPro(p, g, 2.0, variant=variant, x_choice=x).step()
      for o, r in zip([y for pair in out for y in pair], ref):
        assert jnp.max(jnp.abs(o - r)) <= 1e-4 * jnp.max(jnp.abs(r)), (x, variant)


GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _gpu_check(tmp_path, **env):
  env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, **env}
  return subprocess.run(
    ["bash", GPU_CHECK, "--dry-run"], env=env, capture_output=True, text=True, timeout=300
  )


@pytest.mark.slow  # benchmark smoke run: compiles and times several arms
def test_gpu_check_dry_run(tmp_path):
  """benchmarks/gpu_check.sh runs every step at tiny sizes on the CPU and writes its results."""
  proc = _gpu_check(tmp_path)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  summary = (tmp_path / "summary.txt").read_text()
  for step in ("env", "deps", "devices", "pytest", "train_step", "bench", "breakdown"):
    assert f"{step} ok" in summary, summary
  assert "cpu" in (tmp_path / "jax-devices.txt").read_text()
  with open(tmp_path / "bench" / "dry-run.json") as f:
    assert json.load(f)["update"]
  with open(tmp_path / "train_step.json") as f:
    assert json.load(f)["rows"]


def test_gpu_check_records_failures(tmp_path):
  """A failing step is recorded, later steps still run, and the exit status is non-zero."""
  proc = _gpu_check(tmp_path, PYTHON="false")
  assert proc.returncode != 0
  summary = (tmp_path / "summary.txt").read_text()
  assert "devices FAILED" in summary and "breakdown FAILED" in summary
