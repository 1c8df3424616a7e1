"""Where the factored mode's train step spends its time (finding F11 in benchmarks/README.md).

    python -m benchmarks.factored_cost                   # Llama-2-7B L1, r = 8, every arm
    python -m benchmarks.factored_cost --rank 32 --no-profile
    python -m benchmarks.factored_cost --out benchmarks/results/cpu-factored-cost.json

For each arm (``optax.adamw``; efficient ``chain(lorapro, adamw)``; ``lorapro_adamw`` in
factored mode, with and without a first moment), the donated train step of
`benchmarks.train_step` is compiled and

* counted from its compiled HLO (exact, no noise): passes over arrays the size of the LoRA
  parameters (`benchmarks.hlo_traffic`), kernels, dot FLOPs (2·|out|·K for every dot, also
  inside fusions), arithmetic elementwise FLOPs inside fusions (one per output element of
  every add, subtract, multiply, divide, max, min, ...: an estimate), and XLA's own
  ``cost_analysis`` FLOPs;
* timed, interleaved with the other arms (`timing.measure`, ``--repeats`` measurements);
* profiled per HLO op (``--profile``; `train_step.profile_ops`), each kernel joined with its
  counts and attributed to a kind (dot, reduction, elementwise, custom call, copy) and to a
  stage of the algorithm, read from the kernel's source stack in the HLO metadata (e.g.
  ``moments.row_sq``, ``batched.adjust@transform.py:270``).

A micro-benchmark (``--ksweep``) times XLA:CPU's (N, n, K)·(K, K) products for K = 8 .. 64
against a copy of the same (N, n, K) array: bytes grow as K, FLOPs as K². If the time per
byte grows with K, the products are compute-bound.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorapro_jax as lpj
from benchmarks import hlo_traffic, models, timing, train_step
from benchmarks.train_step import LR, SCALE, WD


def arms(full: bool = False) -> dict:
  """Every mode's train step; with ``full``, also full mode (float32 and bfloat16 moments)
  and ``dense-adamw``, AdamW on dense m×n weights of the same shapes (full fine-tuning)."""
  out = {
    "adamw": optax.adamw(LR, weight_decay=WD),
    "lorapro-sylvester+adamw": train_step.efficient_tx(),
    "lorapro-factored": lpj.lorapro_adamw(LR, scale=SCALE, mode="factored", weight_decay=WD),
    "lorapro-factored-b1=0": lpj.lorapro_adamw(
      LR, scale=SCALE, mode="factored", weight_decay=WD, b1=0.0
    ),
  }
  if full:
    out["lorapro-full"] = lpj.lorapro_adamw(LR, scale=SCALE, mode="full", weight_decay=WD)
    out["lorapro-full-bf16"] = lpj.lorapro_adamw(
      LR, scale=SCALE, mode="full", weight_decay=WD, moment_dtype=jnp.bfloat16
    )
    out["dense-adamw"] = optax.adamw(LR, weight_decay=WD)
  return out


# Arms that run on dense m×n weights instead of the LoRA factors.
DENSE_ARMS = ("dense-adamw",)


# ---------------------------------------------------------------------------
# static counts from the compiled HLO

_ARITH = {
  "add",
  "subtract",
  "multiply",
  "divide",
  "maximum",
  "minimum",
  "sqrt",
  "rsqrt",
  "exponential",
  "log",
  "power",
  "abs",
  "negate",
}


def _elements(shape: str) -> int:
  total = 0
  for _dt, dims in hlo_traffic._ARRAY.findall(shape):
    n = 1
    for d in dims.split(","):
      if d:
        n *= int(d)
    total += n
  return total


def _dims(shape: str) -> list[int]:
  m = hlo_traffic._ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def stack_frames(text: str) -> dict:
  """{stack_frame_id: [(file, function, line), ...] innermost first} from the HLO header.

  The compiled text prints each frame's parent as its id + 1 (checked against the
  known call stack of `equations.damped_eigh`)."""

  def section(name):
    m = re.search(rf"^{name}\n(.*?)(?:\n\n|\n(?=[A-Z][A-Za-z]+\n))", text, re.S | re.M)
    return m.group(1).splitlines() if m else []

  def table(name):
    return {int(x.split()[0]): x.split(None, 1)[1] for x in section(name) if x.strip()}

  files = {k: v.strip('"') for k, v in table("FileNames").items()}
  funcs = {k: v.strip('"') for k, v in table("FunctionNames").items()}
  locs = {}
  for k, v in table("FileLocations").items():
    d = dict(re.findall(r"(\w+)=(\d+)", v))
    locs[k] = (
      files.get(int(d["file_name_id"])),
      funcs.get(int(d["function_name_id"])),
      int(d["line"]),
    )
  frames = {}
  for k, v in table("StackFrames").items():
    d = dict(re.findall(r"(\w+)=(\d+)", v))
    frames[k] = (int(d["file_location_id"]), int(d["parent_frame_id"]) - 1)
  out = {}
  for k in frames:
    chain, i, seen = [], k, set()
    while i in frames and i not in seen:
      seen.add(i)
      loc, i = frames[i]
      chain.append(locs.get(loc))
    out[k] = chain
  return out


_PLUMBING = {"step", "_step_jit", "<lambda>", "_raw_plan", "raw", "normalised"}


def stage(chain) -> str:
  """A readable stage of the algorithm for a kernel's source stack (innermost first):
  the outermost function of `full` or `factored` below its plumbing (e.g.
  ``factored.grams``, ``factored._outputs``, ``factored._normalised``), else
  ``batched.adjust`` and the line that called it, else optax's function."""
  chain = [c for c in chain or [] if c and c[0]]
  lib = [c for c in chain if "/lorapro_jax/" in c[0]]
  if not lib:  # optax (AdamW, apply_updates) or the step itself
    opt = [c for c in chain if "/optax/" in c[0]]
    c = opt[0] if opt else (chain[0] if chain else None)
    return f"optax:{c[1].split('.<locals>')[0]}" if opt else (c[1] if c else "other")
  base = lambda c: os.path.basename(c[0])[: -len(".py")]
  modes = [c for c in lib if base(c) in ("full", "factored")]
  for c in reversed(modes):  # outermost first
    name = c[1].split(".<locals>")[0].split(".")[-1]
    if name not in _PLUMBING:
      return f"{base(c)}.{name}"
  if any(base(c) == "batched" and c[1] == "adjust" for c in lib):
    call = next((c for c in reversed(lib) if base(c) in ("transform", "full")), None)
    return f"batched.adjust@{base(call)}.py:{call[2]}" if call else "batched.adjust"
  outer = lib[-1]
  return f"{base(outer)}.{outer[1].split('.<locals>')[0]}"


def kernels(text: str, branch: int = -1) -> list[dict]:
  """Every kernel of a compiled module (as `hlo_traffic.traffic` walks it) with its bytes,
  FLOPs, kind and stage."""
  comps, entry = hlo_traffic.parse(text)
  frames = stack_frames(text)

  def inner(comp):
    """(dot flops, elementwise flops, opcodes) of a fused computation, recursively."""
    dot = elem = 0
    ops = set()
    shapes = {n: s for n, s, *_ in comps.get(comp, [])}
    for _name, shape, op, operands, attrs in comps.get(comp, []):
      ops.add(op)
      if op == "dot":
        lhs = _dims(shapes.get(operands[0], ""))
        cd = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
        k = int(np.prod([lhs[int(c)] for c in cd.group(1).split(",") if c])) if cd else 1
        dot += 2 * _elements(shape) * k
      elif op in _ARITH:
        elem += _elements(shape)
      elif op == "reduce":
        elem += _elements(shapes.get(operands[0], ""))
      m = re.search(r"calls=%([\w.\-]+)", attrs)
      if m:
        d, e, o = inner(m.group(1))
        dot, elem, ops = dot + d, elem + e, ops | o
    return dot, elem, ops

  out = []

  def walk(comp):
    shapes = {n: s for n, s, *_ in comps[comp]}
    for name, shape, op, operands, attrs in comps[comp]:
      if op in hlo_traffic._FREE:
        continue
      if op == "conditional":
        m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
        if m:
          walk(re.findall(r"%([\w.\-]+)", m.group(1))[branch])
        continue
      if op == "while":
        walk(re.search(r"body=%([\w.\-]+)", attrs).group(1))
        continue
      if op == "call":
        m = re.search(r"to_apply=%([\w.\-]+)", attrs)
        if m:
          walk(m.group(1))
          continue
      m = re.search(r"calls=%([\w.\-]+)", attrs)
      dot, elem, ops = inner(m.group(1)) if m else (0, 0, {op})
      if op == "dot":
        lhs = _dims(shapes.get(operands[0], ""))
        cd = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
        k = int(np.prod([lhs[int(c)] for c in cd.group(1).split(",") if c])) if cd else 1
        dot = 2 * _elements(shape) * k
      if "dot" in ops:
        kind = "dot"
      elif op == "custom-call":
        kind = "custom-call"
      elif "reduce" in ops or op == "reduce":
        kind = "reduction"
      elif ops <= {"copy", "concatenate", "slice", "bitcast", "parameter", "transpose"}:
        kind = "copy"
      else:
        kind = "elementwise"
      sf = re.search(r"stack_frame_id=(\d+)", attrs)
      if not sf and m:  # a fusion without metadata: the first fused op that has some
        sf = next(
          (
            x for *_, a in comps.get(m.group(1), []) if (x := re.search(r"stack_frame_id=(\d+)", a))
          ),
          None,
        )
      out.append(
        {
          "name": name,
          "op": op,
          "kind": kind,
          "stage": stage(frames.get(int(sf.group(1))))
          if sf
          else ("XLA copy (no source)" if op == "copy" else "other"),
          "bytes": sum(hlo_traffic.shape_bytes(shapes.get(o, "")) for o in operands)
          + hlo_traffic.shape_bytes(shape),
          "dot_flops": dot,
          "elem_flops": elem,
        }
      )

  walk(entry)
  # Kernels without any source (XLA's dots often have none): the stage of the consumer
  # that does, else of the operand that does.
  by_name = {k["name"]: k for k in out}
  graph = {n: (ops, op) for c in comps.values() for n, _s, op, ops, _a in c}
  users = collections.defaultdict(list)
  for n, (ops, _op) in graph.items():
    for o in ops:
      users[o].append(n)

  def find(name, nbrs, depth=0):
    for x in nbrs(name):
      k = by_name.get(x)
      if k is not None and k["stage"] not in ("other", "XLA copy (no source)"):
        return k["stage"]
    if depth < 4:
      for x in nbrs(name):
        if x not in by_name:  # a free op (bitcast, get-tuple-element, ...): look through it
          st = find(x, nbrs, depth + 1)
          if st:
            return st
    return None

  for k in out:
    if k["stage"] == "other":
      st = find(k["name"], lambda n: users.get(n, [])) or find(
        k["name"], lambda n: graph.get(n, ((), None))[0]
      )
      k["stage"], k["stage_from_neighbours"] = (st, True) if st else ("other", False)
  return out


def summarise_kernels(ks: list[dict], key: str, ops_ms: dict | None, param_bytes: int) -> dict:
  """Kernels grouped by ``key`` ('kind' or 'stage'): count, passes, FLOPs, profiled ms."""
  out = collections.defaultdict(lambda: collections.Counter())
  for k in ks:
    g = out[k[key]]
    g["kernels"] += 1
    g["kernels_placed_by_neighbours"] += bool(k.get("stage_from_neighbours"))
    g["passes"] += k["bytes"] / param_bytes
    g["dot_mflop"] += k["dot_flops"] / 1e6
    g["elem_mflop"] += k["elem_flops"] / 1e6
    if ops_ms is not None:
      g["ms"] += ops_ms.get(k["name"], 0.0)
  return {k: dict(v) for k, v in sorted(out.items(), key=lambda kv: -kv[1].get("ms", 0))}


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
    rn = train_step.runner(name, tx, *(dense if name in DENSE_ARMS else (params, grads)))
    rn.compile()
    text = rn.compiled.as_text()
    ca = rn.compiled.cost_analysis()
    ca = (ca[0] if isinstance(ca, (list, tuple)) else ca) or {}
    ks = kernels(text)
    static[name] = {
      "compile_s": rn.compile_s,
      "state_bytes": timing.tree_bytes(rn.args[1]),
      **hlo_traffic.passes(text, pb),
      "dot_mflop": sum(k["dot_flops"] for k in ks) / 1e6,
      "elem_mflop": sum(k["elem_flops"] for k in ks) / 1e6,
      "xla_mflop": float(ca.get("flops", 0.0)) / 1e6,
      "xla_bytes_accessed_passes": float(ca.get("bytes accessed", 0.0)) / pb,
      # passes over arrays of the dense weights' size (m×n), for full mode vs dense AdamW
      "dense_passes": hlo_traffic.passes(text, db)["passes"] if db else None,
      "_kernels": ks,
    }
    del static[name]["by_kernel_passes"]
    log(
      f"{name}: compiled in {rn.compile_s:.1f}s; {static[name]['kernels']} kernels, "
      f"{static[name]['passes']:.1f} passes, dot {static[name]['dot_mflop']:.1f} MFLOP, "
      f"elementwise {static[name]['elem_mflop']:.1f} MFLOP, XLA {static[name]['xla_mflop']:.1f} "
      "MFLOP"
    )
    runners.append(rn)
  timings = []
  for rep in range(repeats):
    for rn in runners:
      rn.times = []
    res = timing.measure(runners, rounds=rounds, target_s=target_s)
    timings.append(res)
    log(
      f"measurement {rep + 1}/{repeats}: "
      + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in res.items())
    )
  out = {
    "model": model_name,
    "layers": layers,
    "rank": rank,
    "param_bytes": pb,
    "dense_bytes": db,
    "arms": {},
  }
  for rn in runners:
    s = static[rn.name]
    ks = s.pop("_kernels")
    ops_ms = None
    if profile:
      with tempfile.TemporaryDirectory() as d:
        ops_ms = train_step.profile_ops(rn, d)
    med = [t[rn.name]["median_ms"] for t in timings]
    out["arms"][rn.name] = {
      **s,
      "median_ms": med,
      "ratio_vs_efficient": [
        t[rn.name]["median_ms"] / t["lorapro-sylvester+adamw"]["median_ms"] for t in timings
      ],
      "ratio_vs_adamw": [t[rn.name]["median_ms"] / t["adamw"]["median_ms"] for t in timings],
      "ratio_vs_dense_adamw": [
        t[rn.name]["median_ms"] / t["dense-adamw"]["median_ms"] for t in timings
      ]
      if full
      else None,
      "profile_ms": None if ops_ms is None else sum(ops_ms.get(k["name"], 0.0) for k in ks),
      "by_kind": summarise_kernels(ks, "kind", ops_ms, pb),
      "by_stage": summarise_kernels(ks, "stage", ops_ms, pb),
    }
  return out


def format_report(res: dict) -> str:
  lines = [
    f"device: {res['device']['label']}; jax {res['device']['jax']}; commit "
    f"{res['provenance']['git_commit']}"
    + (
      f" (modified: {', '.join(res['provenance']['git_modified'])})"
      if res["provenance"].get("git_modified")
      else ""
    ),
    "",
  ]
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
    for name in ("lorapro-factored", "lorapro-factored-b1=0"):
      a = cfg["arms"][name]
      lines.append(
        f"targets: {name}: {a['passes']:.1f} passes (target <= 40 at L1), {a['kernels']} kernels "
        f"(<= 300 at L1), x efficient "
        + ", ".join(f"{x:.2f}" for x in a["ratio_vs_efficient"])
        + " (<= 3 at L2)"
      )
    lines.append("")
    for key in ("by_kind", "by_stage"):
      lines.append(f"-- {key.replace('_', ' ')} (profiled ms per step, summed over threads) --")
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
  if args.profile and "xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
    if jax._src.xla_bridge.backends_are_initialized():
      raise SystemExit("--profile: set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true")
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
    ).strip()
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
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
      with open(args.out[: -len(".json")] + ".txt", "w") as f:
        f.write(format_report(res) + "\n")

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
