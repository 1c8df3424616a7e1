"""The speed and memory targets: one table (`TARGETS`), read by every report that judges one.

`evaluate` judges a `benchmarks.run` result against the table; `benchmarks.factored_cost`
prints its counts next to the same bounds. A smoke run (tiny shapes) judges none.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Target:
  """``value <= bound`` holds (``value >= bound`` when not ``at_most``)."""

  text: str  # formatted with the bound: "... <= {bound:g}x ..."
  bound: float
  at_most: bool = True
  # Several measurements of a ratio resolve the target only if they fall on one side of
  # the bound (and, with ``max_spread``, spread less than it).
  max_spread: float | None = None

  def describe(self) -> str:
    return self.text.format(bound=self.bound)

  def holds(self, value: float) -> bool:
    return value <= self.bound if self.at_most else value >= self.bound


TARGETS = {
  "efficient_vs_adamw": Target(
    "efficient (sylvester) <= {bound:g}x optax.adamw, Llama-2-7B shapes r=8", 1.5
  ),
  "full_vs_dense": Target("full <= {bound:g}x dense AdamW on the same matrices", 1.5),
  "full_passes": Target("full <= {bound:g} passes over the m×n arrays (dense AdamW: 10)", 13),
  "factored_vs_efficient": Target(
    "factored <= {bound:g}x efficient, Llama-2-7B shapes, donated train step", 3.0
  ),
  "factored_passes": Target("factored <= {bound:g} passes over the LoRA parameters at L1", 40),
  "factored_kernels": Target("factored <= {bound:g} kernels at L1", 300),
  "factored_state": Target(
    "state arrays at most {bound:g} bytes above AdamW-on-LoRA's + (m + n) float32 per pair", 0
  ),
  "batched_vs_loop_cpu": Target(
    "batched >= {bound:g}x faster than the per-layer loop at 200+ adapters", 1.0, at_most=False
  ),
  "batched_vs_loop_gpu": Target(
    "batched >= {bound:g}x faster than the per-layer loop at 200+ adapters", 5.0, at_most=False
  ),
  "e2e": Target(
    "e2e train step, LoRA-Pro efficient <= {bound:g}x plain LoRA", 1.05, max_spread=0.05
  ),
}
MIN_LOOP_ADAPTERS = 200  # where batched_vs_loop is judged


def _row(key: str, config: str, value: float, **extra) -> dict:
  t = TARGETS[key]
  return {
    "target": t.describe(),
    "config": config,
    "value": value,
    "holds": t.holds(value),
    **extra,
  }


def _runs(key: str, runs, *, spread: float | None = None) -> dict:
  """Whether several measurements resolve the target: all on one side of the bound (and
  within its ``max_spread``)."""
  t = TARGETS[key]
  one_side = all(t.holds(x) for x in runs) or not any(t.holds(x) for x in runs)
  tight = t.max_spread is None or (spread is not None and spread <= t.max_spread)
  return {"runs": list(runs), "resolved": one_side and tight}


def evaluate(result: dict) -> list[dict]:
  """Every target a `benchmarks.run` result measures, judged against `TARGETS`."""
  out = []
  for x in result.get("ratios", []):
    cfg = x["config"]
    if x["ratio"] == "sylvester/adamw" and cfg.startswith("llama2-7b") and cfg.endswith(" r8"):
      out.append(_row("efficient_vs_adamw", cfg, x["value"]))
    if x["ratio"] == "full/dense-adamw":
      out.append(_row("full_vs_dense", cfg, x["value"]))
  for x in result.get("factored_ratios", []):
    if x["ratio"] == "factored/efficient" and x["config"].startswith("llama2-7b"):
      row = _row(
        "factored_vs_efficient",
        x["config"],
        x["value"],
        **_runs("factored_vs_efficient", x["runs"]),
      )
      row["target"] += f" ({x['config'].split()[2]})"
      row["unresolved_note"] = "the measurements fall on both sides of the bound"
      out.append(row)
  out += _state_targets(result.get("memory", []))
  out += _scaling_targets(result)
  out += _e2e_targets(result.get("e2e") or {})
  return out


def _state_targets(memory: list[dict]) -> list[dict]:
  """The factored variants' state arrays against AdamW's plus (m + n) float32 per pair
  (int32 step counters aside: lorapro_adamw keeps one for its weight decay's schedule)."""
  mem = {r["variant"]: r for r in memory}
  out = []
  for v in ("lorapro-factored", "lorapro-factored-b1=0"):
    if v in mem and "adamw" in mem and mem[v].get("sum_m_plus_n"):
      bound = mem["adamw"]["state_bytes"] + 4 * mem[v]["sum_m_plus_n"]
      extra = mem[v]["state_bytes"] - bound
      arrays = extra - (mem[v]["state_scalar_bytes"] - mem["adamw"]["state_scalar_bytes"])
      row = _row("factored_state", mem[v]["config"], arrays)
      row["target"] = f"{v} {row['target']}"
      row.update(ratio=mem[v]["state_bytes"] / bound, excess_bytes=extra, excess_array_bytes=arrays)
      out.append(row)
  return out


def _scaling_targets(result: dict) -> list[dict]:
  sc = [r for r in result.get("scaling", []) if r["section"] == "scaling_adapters"]
  key = "batched_vs_loop_gpu" if result["device"]["platform"] == "gpu" else "batched_vs_loop_cpu"
  out = []
  for n in sorted({r["adapters"] for r in sc if r["adapters"] >= MIN_LOOP_ADAPTERS}):
    by = {r["variant"]: r["median_ms"] for r in sc if r["adapters"] == n}
    for b in ("batched", "batched-stacked"):
      if "loop-factored" in by and b in by:
        out.append(_row(key, f"{n} adapters, {b} vs loop-factored", by["loop-factored"] / by[b]))
  return out


def _e2e_targets(e2e: dict) -> list[dict]:
  by = {r["variant"]: r["median_ms"] for r in e2e.get("rows", [])}
  if "adamw" not in by or "lorapro-sylvester+adamw" not in by:
    return []
  sp = (e2e.get("spread") or {}).get("lorapro-sylvester+adamw")
  if not sp:
    return [_row("e2e", e2e["config"], by["lorapro-sylvester+adamw"] / by["adamw"])]
  # several measurements: resolved only if they agree and spread less than max_spread
  value = float(np.median(sp["ratios"]))
  return [_row("e2e", e2e["config"], value, **_runs("e2e", sp["ratios"], spread=sp["range"]))]


def _over(n: int) -> str:
  """``n`` bytes above a bound, in words (never a negative "over")."""
  if n > 0:
    return f"{n:,} bytes over the bound"
  return f"{-n:,} bytes within the bound" if n < 0 else "exactly at the bound"


def _bytes_line(t: dict) -> str:
  return (
    f"        state {_over(t['excess_bytes'])}; its arrays {_over(t['excess_array_bytes'])} "
    "(the rest: int32 step counters)"
  )


def format_targets(targets: list[dict] | None, note: str | None = None) -> list[str]:
  """The ``== targets ==`` block of a report (``note``: why none were judged)."""
  lines = ["== targets =="]
  if note:
    return [*lines, note]
  for t in targets or []:
    verdict = "HOLDS" if t["holds"] else "MISSED"
    if t.get("resolved") is False:
      verdict = "UNRESOLVED"
    value = f"{t['value']:,}" if isinstance(t["value"], int) else f"{t['value']:.2f}"
    lines.append(f"{verdict:<7} {t['target']} [{t['config']}]: {value}")
    if "excess_bytes" in t:
      lines.append(_bytes_line(t))
    if "runs" in t:
      lines.append(
        f"        measurements: {', '.join(f'{x:.3f}' for x in t['runs'])}"
        + (
          ""
          if t.get("resolved")
          else f" ({t.get('unresolved_note', 'spread above the margin')}: not resolved)"
        )
      )
  return lines
