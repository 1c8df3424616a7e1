"""Where each mode's train step spends its time (findings F11, F12 in benchmarks/FINDINGS.md).

    python -m benchmarks.factored_cost                   # Llama-2-7B L1, r = 8, every arm
    python -m benchmarks.factored_cost --rank 32 --no-profile
    python -m benchmarks.factored_cost --layers 1 --full --out benchmarks/results/cpu-modes-L1.json

For each arm (``optax.adamw``; efficient ``chain(lorapro, adamw)``; ``lorapro_adamw`` in
factored mode, with and without a first moment; with ``--full``, full mode and AdamW on
the dense m×n weights), the donated train step of `benchmarks.train_step` is compiled and

* counted from its compiled HLO (exact, no noise) by `benchmarks.hlo_traffic`: passes over
  arrays the size of the LoRA parameters, kernels, dot FLOPs (2·|out|·K for every dot, also
  inside fusions), arithmetic elementwise FLOPs inside fusions (an estimate), and XLA's own
  ``cost_analysis`` FLOPs;
* timed, interleaved with the other arms (`timing.measure`, ``--repeats`` measurements);
* profiled per HLO op (``--profile``; `train_step.profile_ops`), each kernel joined with its
  counts and attributed to a kind (dot, reduction, elementwise, custom call, copy) and to a
  stage of the algorithm by the ``jax.named_scope`` the library sets (e.g.
  ``factored/second_moment``, ``full/adjust_zero > adjust/coefficients``). A stage whose
  scope is missing from the compiled HLO stops the run before any timing.

The report ends each configuration with its counts next to the bounds of
`benchmarks.targets`. A micro-benchmark (``--ksweep``) times XLA:CPU's (N, n, K)·(K, K)
products for K = 8 .. 64 against a copy of the same (N, n, K) array: bytes grow as K, FLOPs
as K². If the time per byte grows with K, the products are compute-bound.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings

import jax.numpy as jnp
import numpy as np

from benchmarks import hlo_traffic, models, optimizers, targets, timing, train_step


def arms(full: bool = False) -> dict:
  """Every mode's train step (`optimizers.every_mode`)."""
  return optimizers.every_mode(full)


# ---------------------------------------------------------------------------
# K sweep: are XLA:CPU's small-K products compute-bound?


def ksweep(n_pairs=7, n=11008, ks=(8, 16, 32, 64), rounds=5, target_s=0.5, log=print) -> list:
  rng = np.random.default_rng(0)
  rows = []
  for k in ks:
    x = jnp.asarray(rng.standard_normal((n_pairs, n, k), dtype=np.float32))
    m = jnp.asarray(rng.standard_normal((n_pairs, k, k), dtype=np.float32))
    runners = [
      timing.Runner("copy", lambda x: x * 1.5 + 1.0, [x]).compile(),
      timing.Runner("dot", lambda x, m: jnp.einsum("pnk,pkj->pnj", x, m), [x, m]).compile(),
      timing.Runner("gram", lambda x: jnp.einsum("pnk,pnj->pkj", x, x), [x]).compile(),
    ]
    res = timing.measure(runners, rounds=rounds, target_s=target_s)
    size = x.size * 4
    for rn in runners:
      t = res[rn.name]["median_ms"] / 1e3
      flops = {"copy": 2 * x.size, "dot": 2 * x.size * k, "gram": 2 * x.size * k}[rn.name]
      moved = {"copy": 2 * size, "dot": 2 * size, "gram": size}[rn.name]
      rows.append(
        {
          "K": k,
          "op": rn.name,
          "shape": [n_pairs, n, k],
          **res[rn.name],
          "gb_per_s": moved / t / 1e9,
          "gflop_per_s": flops / t / 1e9,
          "ms_per_mb_moved": res[rn.name]["median_ms"] / (moved / 2**20),
        }
      )
    log(
      f"K={k:3d}: "
      + ", ".join(
        f"{r['op']} {r['median_ms']:.3f} ms ({r['gb_per_s']:.1f} GB/s, {r['gflop_per_s']:.1f} "
        "GFLOP/s)"
        for r in rows[-3:]
      )
    )
  return rows


# ---------------------------------------------------------------------------


def _static(rn, pb: int, db: int | None) -> dict:
  """A compiled arm's counts from its HLO; its kernels under ``_kernels`` and the check
  of its named scopes under ``scopes`` (a missing scope raises before any timing)."""
  text = rn.compiled.as_text()
  ca = rn.compiled.cost_analysis()
  ca = (ca[0] if isinstance(ca, (list, tuple)) else ca) or {}
  ks = hlo_traffic.kernels(text)
  mode = optimizers.scope_mode(rn.name)
  out = {
    "compile_s": rn.compile_s,
    "state_bytes": timing.tree_bytes(rn.args[1]),
    **hlo_traffic.passes(text, pb, ks=ks),
    "dot_mflop": sum(k["dot_flops"] for k in ks) / 1e6,
    "elem_mflop": sum(k["elem_flops"] for k in ks) / 1e6,
    "xla_mflop": float(ca.get("flops", 0.0)) / 1e6,
    "xla_bytes_accessed_passes": float(ca.get("bytes accessed", 0.0)) / pb,
    # passes over arrays of the dense weights' size (m×n), for full mode vs dense AdamW
    "dense_passes": hlo_traffic.passes(text, db, ks=ks)["passes"] if db else None,
    "scopes": hlo_traffic.require_scopes(text, mode, ks) if mode else None,
    "_kernels": ks,
  }
  del out["by_kernel_passes"]
  return out


def run(
  model_name, layers, rank, *, repeats, rounds, target_s, profile, full=False, log=print
) -> dict:
  model = models.MODELS[model_name]
  params, grads = models.lora_tree(model, layers, rank, seed=1)
  pb = timing.tree_bytes(params)
  dense = models.dense_tree(model, layers, seed=2) if full else None
  db = timing.tree_bytes(dense[0]) if full else None
  runners, static = [], {}
  for name, tx in arms(full).items():
    trees = dense if name in optimizers.DENSE_ARMS else (params, grads)
    rn = train_step.runner(name, tx, *trees).compile()
    static[name] = st = _static(rn, pb, db)
    log(
      f"{name}: compiled in {rn.compile_s:.1f}s; {st['kernels']} kernels, "
      f"{st['passes']:.1f} passes, dot {st['dot_mflop']:.1f} MFLOP, "
      f"elementwise {st['elem_mflop']:.1f} MFLOP, XLA {st['xla_mflop']:.1f} MFLOP"
    )
    runners.append(rn)
  measured = timing.measure_repeatedly(runners, repeats, log=log, rounds=rounds, target_s=target_s)
  timings = [m["res"] for m in measured]
  out = {
    "model": model_name,
    "layers": layers,
    "rank": rank,
    "param_bytes": pb,
    "dense_bytes": db,
    "arms": {},
  }
  ratio = lambda name, base: [t[name]["median_ms"] / t[base]["median_ms"] for t in timings]
  for rn in runners:
    s = static[rn.name]
    ks = s.pop("_kernels")
    ops_ms = None
    if profile:
      with tempfile.TemporaryDirectory() as d:
        ops_ms = train_step.profile_ops(rn, d)
    out["arms"][rn.name] = {
      **s,
      "median_ms": [t[rn.name]["median_ms"] for t in timings],
      "ratio_vs_efficient": ratio(rn.name, "lorapro-sylvester+adamw"),
      "ratio_vs_adamw": ratio(rn.name, "adamw"),
      "ratio_vs_dense_adamw": ratio(rn.name, "dense-adamw") if full else None,
      "profile_ms": None if ops_ms is None else sum(ops_ms.get(k["name"], 0.0) for k in ks),
      "by_kind": hlo_traffic.summarise(ks, "kind", pb, ops_ms),
      "by_stage": hlo_traffic.summarise(ks, "stage", pb, ops_ms),
    }
  return out


def _target_lines(cfg: dict) -> list[str]:
  """Each mode's counts next to its bounds in `targets.TARGETS`."""
  T = targets.TARGETS
  lines = []
  for name in optimizers.FACTORED_VARIANTS:
    a = cfg["arms"][name]
    lines.append(
      f"targets: {name}: {a['passes']:.1f} passes ({T['factored_passes'].describe()}), "
      f"{a['kernels']} kernels ({T['factored_kernels'].describe()}), x efficient "
      + ", ".join(f"{x:.2f}" for x in a["ratio_vs_efficient"])
      + f" ({T['factored_vs_efficient'].describe()})"
    )
  if cfg.get("dense_bytes"):
    a = cfg["arms"]["lorapro-full"]
    lines.append(
      f"targets: lorapro-full: {a['dense_passes']:.1f} passes over D "
      f"({T['full_passes'].describe()}), x dense-adamw "
      + ", ".join(f"{x:.2f}" for x in a["ratio_vs_dense_adamw"])
      + f" ({T['full_vs_dense'].describe()})"
    )
  return lines


def format_report(res: dict) -> str:
  lines = [timing.header(res), ""]
  for cfg in res["configs"]:
    lines.append(
      f"== {cfg['model']} L{cfg['layers']} r{cfg['rank']}: donated train step, counted from the "
      f"compiled HLO; LoRA params P = {cfg['param_bytes'] / 1e6:.2f} MB =="
    )
    lines.append(
      f"{'arm':<24} {'kernels':>8} {'passes':>7} {'dot MFLOP':>10} {'elem MFLOP':>11} "
      f"{'XLA MFLOP':>10} {'median ms (each measurement)':>30} {'x efficient':>18}"
    )
    for name, a in cfg["arms"].items():
      lines.append(
        f"{name:<24} {a['kernels']:>8} {a['passes']:>7.1f} {a['dot_mflop']:>10.1f} "
        f"{a['elem_mflop']:>11.1f} {a['xla_mflop']:>10.1f} "
        f"{', '.join(f'{x:.2f}' for x in a['median_ms']):>30} "
        f"{', '.join(f'{x:.2f}' for x in a['ratio_vs_efficient']):>18}"
      )
    if cfg.get("dense_bytes"):
      lines.append(
        f"-- full mode vs dense AdamW on the same m×n weights (D = {cfg['dense_bytes'] / 1e6:.1f} "
        "MB): passes over m×n arrays and time ratios --"
      )
      for name in ("dense-adamw", "lorapro-full", "lorapro-full-bf16"):
        a = cfg["arms"][name]
        lines.append(
          f"{name:<24} {a['dense_passes']:>7.2f} passes over D   x dense-adamw "
          + ", ".join(f"{x:.2f}" for x in a["ratio_vs_dense_adamw"])
        )
    lines += _target_lines(cfg)
    lines.append("")
    for key in ("by_kind", "by_stage"):
      what = " (named scopes of lorapro_jax and the step)" if key == "by_stage" else ""
      lines.append(
        f"-- {key.replace('_', ' ')}{what} (profiled ms per step, summed over threads) --"
      )
      for name, a in cfg["arms"].items():
        if name == "adamw" and key == "by_stage":
          continue
        lines.append(f"{name} (profile total {a['profile_ms'] or 0:.2f} ms):")
        for g, v in a[key].items():
          lines.append(
            f"  {g:<52} {v.get('kernels', 0):>5} kernels {v.get('passes', 0):>7.1f} passes "
            f"{v.get('dot_mflop', 0):>8.1f} dot MFLOP {v.get('elem_mflop', 0):>8.1f} elem MFLOP "
            f"{v.get('ms', 0):>8.2f} ms"
          )
        if key == "by_stage":
          lines += hlo_traffic.scope_lines(a[key], a.get("scopes"))
      lines.append("")
  if res.get("ksweep"):
    lines.append(
      "== K sweep: (N, n, K)·(K, K) products ('dot'), (N, n, K)ᵀ(N, n, K) Gram products "
      "('gram') and an elementwise copy of the (N, n, K) array =="
    )
    lines.append(
      f"{'K':>4} {'op':<6} {'median ms':>10} {'GB/s':>7} {'GFLOP/s':>8} {'ms/MiB moved':>13}"
    )
    for r in res["ksweep"]:
      lines.append(
        f"{r['K']:>4} {r['op']:<6} {r['median_ms']:>10.3f} {r['gb_per_s']:>7.1f} "
        f"{r['gflop_per_s']:>8.1f} {r['ms_per_mb_moved']:>13.4f}"
      )
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--model", default="llama2-7b", choices=sorted(models.MODELS))
  ap.add_argument("--layers", type=int, default=1)
  ap.add_argument("--rank", default="8", help="comma-separated ranks")
  ap.add_argument("--repeats", type=int, default=3, help="interleaved measurements")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--target-s", type=float, default=1.0)
  ap.add_argument("--no-profile", dest="profile", action="store_false")
  ap.add_argument("--ksweep", default="8,16,32,64", help="K values of the sweep ('' to skip)")
  ap.add_argument("--ksweep-n", type=int, default=11008)
  ap.add_argument(
    "--full", action="store_true", help="add full mode and dense AdamW on the m×n weights"
  )
  ap.add_argument(
    "--fast-compile", action="store_true", help="XLA's unoptimised build (the smoke test)"
  )
  ap.add_argument(
    "--out", default=None, help="JSON path ending in .json (the text report goes next to it)"
  )
  args = ap.parse_args(argv)
  if args.out and not args.out.endswith(".json"):
    ap.error("--out must end in .json")
  if args.profile:
    timing.enable_op_profiles()
  warnings.filterwarnings("ignore", message=".*[Dd]onat.*")
  timing.COMPILER_OPTIONS.clear()
  if args.fast_compile:
    timing.COMPILER_OPTIONS.update(timing.FAST_COMPILE)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  res = {
    "device": timing.device_info(),
    "provenance": timing.provenance(),
    "settings": vars(args),
    "configs": [],
  }

  def save():
    if args.out:
      timing.write_report(args.out, res, format_report(res))

  for r in [int(x) for x in args.rank.split(",") if x]:
    res["configs"].append(
      run(
        args.model,
        args.layers,
        r,
        repeats=args.repeats,
        rounds=args.rounds,
        target_s=args.target_s,
        profile=args.profile,
        full=args.full,
        log=log,
      )
    )
    save()  # after every configuration: a stopped run keeps what it measured
  ks = [int(x) for x in args.ksweep.split(",") if x]
  res["ksweep"] = ksweep(n=args.ksweep_n, ks=ks, log=log) if ks else []
  report = format_report(res)
  print(report)
  save()
  return res


if __name__ == "__main__":
  main()
