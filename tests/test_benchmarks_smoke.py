"""Smoke test of the benchmark command (tiny shapes; no timing assertions)."""

import json

from benchmarks import run

UPDATE_VARIANTS = {
  "adamw",
  "lorapro-sylvester+adamw",
  "lorapro-zero+adamw",
  "lorapro-symmetric+adamw",
  "lorapro-full",
  "lorapro-full-bf16",
  "dense-adamw",
}


def test_smoke_writes_expected_rows(tmp_path):
  run.main(["--smoke", "--no-plot", "--out-dir", str(tmp_path)])
  with open(tmp_path / "smoke.json") as f:
    res = json.load(f)
  assert {"platform", "device_kind", "cpu_count", "label"} <= set(res["device"])
  assert {r["variant"] for r in res["update"]} == UPDATE_VARIANTS
  for r in res["update"]:
    assert r["median_ms"] > 0 and r["n"] >= 1
    assert r["state_bytes"] >= 0 and "temp_size_in_bytes" in r
  ratios = {x["ratio"] for x in res["ratios"]}
  assert {"sylvester/adamw", "zero/adamw", "symmetric/adamw", "full/dense-adamw"} <= ratios
  for kind in ("scaling_adapters", "scaling_rank"):
    variants = {r["variant"] for r in res["scaling"] if r["section"] == kind}
    assert variants == {"batched", "batched-stacked", "loop-factored", "loop-projector"}, kind
  mem = {r["variant"]: r for r in res["memory"]}
  assert set(mem) == {
    "adamw",
    "lorapro-sylvester+adamw",
    "lorapro-full",
    "lorapro-full-bf16",
    "dense-adamw",
  }
  # Exact state sizes: efficient mode keeps AdamW's state; full mode's moments are m×n.
  assert mem["lorapro-sylvester+adamw"]["state_bytes"] == mem["adamw"]["state_bytes"]
  assert mem["lorapro-full-bf16"]["state_bytes"] < mem["lorapro-full"]["state_bytes"]
  assert res["e2e"] is not None and ("skipped" in res["e2e"] or res["e2e"]["rows"])
  assert (tmp_path / "smoke.txt").exists()


def test_breakdown_prints_every_component(capsys):
  from benchmarks import breakdown

  breakdown.main(["--model", "tiny", "--layers", "1", "--target-s", "0.05", "--rounds", "1"])
  out = capsys.readouterr().out
  for name in ("adamw", "grams", "grams+amax", "outs+adamw", "lorapro", "lorapro+adamw"):
    assert f"  {name} " in out, name
