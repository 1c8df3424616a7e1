"""Memory traffic of a compiled step, counted from its HLO (no timing, so no noise).

Every top-level instruction of the compiled module that runs as its own kernel
(a fusion, dot, reduce, copy, custom call, ...) reads each of its operands and
writes its result; an instruction inside a fusion does not touch memory. This
module adds up, per step, the bytes each kernel reads and writes, descending
into the branch of a ``conditional`` that ``branch`` selects (LoRA-Pro's raw
path is the last branch of its cond) and into ``while`` bodies once. Shape-only
instructions (parameter, tuple, get-tuple-element, bitcast, constant) are free.

Dividing by the bytes of the LoRA parameters gives the number of *passes* over
arrays of the parameters' size: ``optax.adamw`` makes 10 on XLA:CPU (its moment
and parameter updates are three loop fusions per leaf: read g, μ -> write μ;
read g, ν -> write ν; read p, μ, ν -> write p).

It is an estimate: a fusion that reads only a slice of an operand is charged
the whole operand, and caches are ignored.
"""

from __future__ import annotations

import collections
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
_COMP = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\{\s*$")
_INST = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*|pred)\[([\d,]*)\]")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string, e.g. ``f32[8,4096]{1,0}`` or a tuple of them."""
  total = 0
  for dt, dims in _ARRAY.findall(shape):
    if dt not in _DTYPE_BYTES:
      continue
    n = 1
    for d in dims.split(","):
      if d:
        n *= int(d)
    total += n * _DTYPE_BYTES[dt]
  return total


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


def traffic(text: str, branch: int = -1) -> dict:
  """Bytes read and written per step by the kernels of a compiled module.

  Returns ``{"read": bytes, "written": bytes, "kernels": count,
  "by_opcode": {opcode: bytes read + written}}``.
  """
  comps, entry = parse(text)
  out = {"read": 0, "written": 0, "kernels": 0, "by_opcode": collections.Counter()}

  def walk(comp):
    shapes = {name: shape for name, shape, *_ in comps[comp]}
    for name, shape, op, operands, attrs in comps[comp]:
      if op in _FREE:
        continue
      if op == "conditional":
        m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
        if m:
          branches = re.findall(r"%([\w.\-]+)", m.group(1))
          walk(branches[branch])
        else:  # (pred, true, false) form
          m = re.search(r"true_computation=%([\w.\-]+)", attrs)
          if m:
            walk(m.group(1))
        continue
      if op == "while":
        m = re.search(r"body=%([\w.\-]+)", attrs)
        if m:
          walk(m.group(1))
        continue
      if op == "call":
        m = re.search(r"to_apply=%([\w.\-]+)", attrs)
        if m:
          walk(m.group(1))
          continue
      r = sum(shape_bytes(shapes.get(o, "")) for o in operands)
      w = shape_bytes(shape)
      out["read"] += r
      out["written"] += w
      out["kernels"] += 1
      out["by_opcode"][name.rstrip("0123456789.").split(".")[0] or op] += r + w

  walk(entry)
  out["by_opcode"] = dict(out["by_opcode"].most_common())
  return out


def passes(text: str, param_bytes: int, branch: int = -1) -> dict:
  """`traffic` in units of the parameters' bytes (passes over parameter-sized arrays)."""
  t = traffic(text, branch)
  return {
    "read_passes": t["read"] / param_bytes,
    "write_passes": t["written"] / param_bytes,
    "passes": (t["read"] + t["written"]) / param_bytes,
    "kernels": t["kernels"],
    "by_kernel_passes": {k: v / param_bytes for k, v in t["by_opcode"].items()},
  }
