"""Memory traffic and cost of a compiled step, counted from its HLO (no timing, so no noise).

The one walker of compiled HLO that the benchmarks share (`kernels`). Every top-level
instruction of the compiled module that runs as its own kernel (a fusion, dot, reduce,
copy, custom call, ...) reads each of its operands and writes its result; an instruction
inside a fusion does not touch memory. The walker adds up, per step, the bytes each kernel
reads and writes, descending into the branch of a ``conditional`` that ``branch`` selects
(LoRA-Pro's raw path is the last branch of its conds) and into ``while`` bodies once.
Shape-only instructions (parameter, tuple, get-tuple-element, bitcast, constant) are free.

Dividing by the bytes of the LoRA parameters gives the number of *passes* over arrays of
the parameters' size: ``optax.adamw`` makes 10 on XLA:CPU (its moment and parameter
updates are three loop fusions per leaf: read g, μ -> write μ; read g, ν -> write ν;
read p, μ, ν -> write p).

**Stages.** Each kernel is attributed to a stage of the algorithm by the
``jax.named_scope`` names in its ``op_name`` metadata: the ``lorapro/<mode>/<stage>``
scopes that `lorapro_jax` sets (`STAGES`), nested ones joined by " > " (e.g.
``full/adjust_zero > adjust/coefficients``), and the ``step/update`` and
``step/apply_updates`` scopes of `benchmarks.train_step`. Python function names play no
part, so renaming a function cannot move a kernel. `check_scopes` says which of a mode's
expected scopes are missing from a compiled HLO (renamed or removed: `require_scopes`
raises) and which were fused into another stage's kernels.

It is an estimate: a fusion that reads only a slice of an operand is charged the whole
operand, and caches are ignored.
"""

from __future__ import annotations

import collections
import math
import re

_DTYPE_BYTES = {
  "f64": 8,
  "f32": 4,
  "f16": 2,
  "bf16": 2,
  "s64": 8,
  "s32": 4,
  "s16": 2,
  "s8": 1,
  "u64": 8,
  "u32": 4,
  "u16": 2,
  "u8": 1,
  "pred": 1,
  "c64": 8,
  "c128": 16,
}
_FREE = {
  "parameter",
  "tuple",
  "get-tuple-element",
  "bitcast",
  "constant",
  "after-all",
  "partition-id",
  "replica-id",
  "opt-barrier",
}
# One FLOP per output element (an estimate of the elementwise work inside fusions).
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
_COMP = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\{\s*$")
_INST = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*|pred)\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SCOPE = re.compile(r"lorapro/([a-z_]+/[a-z_0-9]+)")

# The stages of each mode's raw path (the branch the walker takes), by the named scope
# `lorapro_jax` puts them in. The normalised fallbacks (``.../normalised``) are in the
# HLO but not walked; ``factored/stack_groups`` and ``split_groups`` only have ops when
# pairs of one kind repeat (two layers or more).
_ADJUST = ("adjust/products", "adjust/coefficients", "adjust/guard", "adjust/outputs")
STAGES = {
  "efficient": _ADJUST,
  "full": (
    "full/adjust_zero",
    "full/guard",
    "full/equivalent_gradient",
    "full/moments",
    "full/project",
    "full/adjust",
    *_ADJUST,
  ),
  "factored": (
    "factored/grams",
    "factored/guard",
    "factored/eigh",
    "factored/gradient_and_moment",
    "factored/second_moment",
    "factored/direction",
    "factored/outputs",
  ),
}
FALLBACKS = {
  "efficient": ("adjust/normalised",),
  "full": ("full/normalised", "adjust/normalised"),
  "factored": ("factored/normalised",),
}
UNATTRIBUTED = "unattributed"
XLA_COPY = "XLA copy (no source op)"


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string, e.g. ``f32[8,4096]{1,0}`` or a tuple of them."""
  return sum(n * _DTYPE_BYTES[dt] for dt, n in _arrays(shape) if dt in _DTYPE_BYTES)


def _arrays(shape: str) -> list[tuple[str, int]]:
  return [
    (dt, math.prod(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(shape)
  ]


def _elements(shape: str) -> int:
  return sum(n for _, n in _arrays(shape))


def parse(text: str) -> tuple[dict, str]:
  """{computation: [(name, shape, opcode, operand names, attributes)]}, entry name."""
  comps, entry, cur = {}, None, None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m:
      cur = m.group(2)
      comps[cur] = []
      if m.group(1):
        entry = cur
      continue
    m = _INST.match(line)
    if m and cur is not None:
      name, shape, op, rest = m.groups()
      depth, args = 0, ""
      for i, ch in enumerate(rest):  # the operand list ends at the matching ')'
        if ch == "(":
          depth += 1
        elif ch == ")":
          if depth == 0:
            args, rest = rest[:i], rest[i + 1 :]
            break
          depth -= 1
      operands = re.findall(r"%([\w.\-]+)", args)
      comps[cur].append((name, shape, op, operands, rest))
  return comps, entry


def stage(op_name: str | None) -> str | None:
  """The stage of an ``op_name`` from its named scopes (None: no scope the walker knows)."""
  if not op_name:
    return None
  scopes = _SCOPE.findall(op_name)
  if scopes:
    return " > ".join(scopes)
  for scope in ("step/apply_updates", "step/update"):
    if scope in op_name:
      # ops of the update outside LoRA-Pro's stages: optax's, and the transformation's glue
      return "apply_updates" if scope.endswith("apply_updates") else "update (no lorapro scope)"
  return None


def _dot_flops(shape: str, operands, shapes: dict, attrs: str) -> int:
  m = _ARRAY.search(shapes.get(operands[0], ""))
  lhs = [int(d) for d in m.group(2).split(",") if d] if m else []
  cd = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
  k = math.prod(lhs[int(c)] for c in cd.group(1).split(",") if c) if cd else 1
  return 2 * _elements(shape) * k


def _fused(comps, comp) -> tuple[int, int, set, str | None]:
  """(dot flops, elementwise flops, opcodes, first op_name) of a fused computation."""
  dot = elem = 0
  ops, first = set(), None
  shapes = {n: s for n, s, *_ in comps.get(comp, [])}
  for _name, shape, op, operands, attrs in comps.get(comp, []):
    ops.add(op)
    if op == "dot":
      dot += _dot_flops(shape, operands, shapes, attrs)
    elif op in _ARITH:
      elem += _elements(shape)
    elif op == "reduce":
      elem += _elements(shapes.get(operands[0], ""))
    m = _OP_NAME.search(attrs)
    first = first or (m.group(1) if m else None)
    m = re.search(r"calls=%([\w.\-]+)", attrs)
    if m:
      d, e, o, f = _fused(comps, m.group(1))
      dot, elem, ops, first = dot + d, elem + e, ops | o, first or f
  return dot, elem, ops, first


def _kind(op: str, ops: set) -> str:
  if "dot" in ops:
    return "dot"
  if op == "custom-call":
    return "custom-call"
  if "reduce" in ops:
    return "reduction"
  if ops <= {"copy", "concatenate", "slice", "bitcast", "parameter", "transpose"}:
    return "copy"
  return "elementwise"


def kernels(text: str, branch: int = -1) -> list[dict]:
  """Every kernel of a compiled module, in order: name, opcode, kind (dot, reduction,
  elementwise, copy, custom-call), stage, bytes read and written, dot and elementwise
  FLOPs. A kernel without scoped metadata (XLA's copies and some dots have none) takes
  the stage of a neighbour that has one (``stage_from_neighbours``; `_from_neighbours`)."""
  comps, entry = parse(text)
  out = []

  def walk(comp):
    shapes = {n: s for n, s, *_ in comps[comp]}
    for name, shape, op, operands, attrs in comps[comp]:
      if op in _FREE:
        continue
      if op == "conditional":
        m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
        if m:
          walk(re.findall(r"%([\w.\-]+)", m.group(1))[branch])
        else:  # (pred, true, false) form
          m = re.search(r"true_computation=%([\w.\-]+)", attrs)
          if m:
            walk(m.group(1))
        continue
      m = re.search(r"(?:body|to_apply)=%([\w.\-]+)", attrs)
      if op in ("while", "call") and m:
        walk(m.group(1))
        continue
      m = re.search(r"calls=%([\w.\-]+)", attrs)
      dot, elem, ops, fused_name = _fused(comps, m.group(1)) if m else (0, 0, {op}, None)
      if op == "dot":
        dot = _dot_flops(shape, operands, shapes, attrs)
      own = _OP_NAME.search(attrs)
      read = sum(shape_bytes(shapes.get(o, "")) for o in operands)
      out.append(
        {
          "name": name,
          "op": op,
          "kind": _kind(op, ops),
          "stage": stage(own.group(1) if own else None) or stage(fused_name),
          "read": read,
          "written": shape_bytes(shape),
          "bytes": read + shape_bytes(shape),
          "dot_flops": dot,
          "elem_flops": elem,
        }
      )

  walk(entry)
  _from_neighbours(comps, out)
  return out


def _from_neighbours(comps: dict, out: list[dict]) -> None:
  """Kernels without a stage take their consumer's, else their operand's (looking
  through up to four free instructions or kernels without a stage); else a copy is
  `XLA_COPY` (XLA's own, e.g. of a value passed through a cond) and any other kernel
  `UNATTRIBUTED`."""
  by_name = {k["name"]: k for k in out}
  graph = {n: ops for c in comps.values() for n, _s, _op, ops, _a in c}
  users = collections.defaultdict(list)
  for n, ops in graph.items():
    for o in ops:
      users[o].append(n)

  def find(name, nbrs, depth=0):
    for x in nbrs(name):
      k = by_name.get(x)
      if k is not None and k["stage"] and not k.get("stage_from_neighbours"):
        return k["stage"]
    if depth < 4:
      for x in nbrs(name):
        if x not in by_name or not by_name[x]["stage"]:
          st = find(x, nbrs, depth + 1)
          if st:
            return st
    return None

  for k in out:
    if k["stage"] is None:
      st = find(k["name"], lambda n: users.get(n, [])) or find(
        k["name"], lambda n: graph.get(n, ())
      )
      k["stage_from_neighbours"] = bool(st)
      k["stage"] = st or (XLA_COPY if k["op"] == "copy" else UNATTRIBUTED)


def traffic(text: str, branch: int = -1, ks: list[dict] | None = None) -> dict:
  """Bytes read and written per step by the kernels of a compiled module (``ks``: its
  `kernels`, if already walked).

  Returns ``{"read": bytes, "written": bytes, "kernels": count,
  "by_opcode": {kernel name stem: bytes read + written}}``.
  """
  ks = kernels(text, branch) if ks is None else ks
  by = collections.Counter()
  for k in ks:
    by[k["name"].rstrip("0123456789.").split(".")[0] or k["op"]] += k["bytes"]
  return {
    "read": sum(k["read"] for k in ks),
    "written": sum(k["written"] for k in ks),
    "kernels": len(ks),
    "by_opcode": dict(by.most_common()),
  }


def passes(text: str, param_bytes: int, branch: int = -1, ks: list[dict] | None = None) -> dict:
  """`traffic` in units of the parameters' bytes (passes over parameter-sized arrays)."""
  t = traffic(text, branch, ks)
  return {
    "read_passes": t["read"] / param_bytes,
    "write_passes": t["written"] / param_bytes,
    "passes": (t["read"] + t["written"]) / param_bytes,
    "kernels": t["kernels"],
    "by_kernel_passes": {k: v / param_bytes for k, v in t["by_opcode"].items()},
  }


def summarise(ks: list[dict], key: str, param_bytes: int, ops_ms: dict | None = None) -> dict:
  """Kernels grouped by ``key`` ('kind' or 'stage'): count, passes, FLOPs, profiled ms."""
  out = collections.defaultdict(collections.Counter)
  for k in ks:
    g = out[k[key]]
    g["kernels"] += 1
    g["kernels_placed_by_neighbours"] += bool(k.get("stage_from_neighbours"))
    g["passes"] += k["bytes"] / param_bytes
    g["dot_mflop"] += k["dot_flops"] / 1e6
    g["elem_mflop"] += k["elem_flops"] / 1e6
    if ops_ms is not None:
      g["ms"] += ops_ms.get(k["name"], 0.0)
  order = lambda kv: (-kv[1].get("ms", 0), -kv[1]["passes"])
  return {k: dict(v) for k, v in sorted(out.items(), key=order)}


def check_scopes(text: str, mode: str, ks: list[dict] | None = None) -> dict:
  """Which of ``mode``'s `STAGES` (and `FALLBACKS`) scopes are ``missing`` from the
  compiled HLO ``text`` (renamed or removed in `lorapro_jax`), and which are there but
  ``fused`` into kernels of other stages (no walked kernel is attributed to them)."""
  present = set(_SCOPE.findall(text))
  ks = kernels(text) if ks is None else ks
  seen = {s for k in ks for s in k["stage"].split(" > ")}
  expected = STAGES[mode] + FALLBACKS[mode]
  return {
    "missing": [s for s in expected if s not in present],
    "fused": [s for s in STAGES[mode] if s in present and s not in seen],
  }


def require_scopes(text: str, mode: str, ks: list[dict] | None = None) -> dict:
  """`check_scopes`, raising if a scope is missing: its kernels would be unattributed."""
  res = check_scopes(text, mode, ks)
  if res["missing"]:
    raise ValueError(
      f"named scopes {res['missing']} of the {mode} mode are not in the compiled HLO: "
      "renamed or removed in lorapro_jax? Update benchmarks/hlo_traffic.STAGES to match."
    )
  return res


def scope_lines(by_stage: dict, scopes: dict | None) -> list[str]:
  """Report lines, from `summarise` by stage and `check_scopes`, for the kernels that no
  stage claims and the stages that were fused into others or are missing."""
  lines = []
  lost = by_stage.get(UNATTRIBUTED)
  if lost:
    lines.append(
      f"  {UNATTRIBUTED.upper()}: {lost['kernels']} kernels, {lost['passes']:.1f} passes "
      "(no named scope, nor a neighbour with one)"
    )
  if scopes and scopes.get("fused"):
    lines.append(f"  fused into other stages' kernels: {', '.join(scopes['fused'])}")
  if scopes and scopes.get("missing"):
    lines.append(f"  MISSING from the HLO (renamed?): {', '.join(scopes['missing'])}")
  return lines
