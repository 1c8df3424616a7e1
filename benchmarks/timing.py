"""Timing and memory helpers shared by every benchmark section.

Every measured function is jitted, compiled ahead of time (compile time is
recorded separately), warmed up, then called repeatedly with
``jax.block_until_ready`` on all of its outputs. Several variants of one
configuration are measured *interleaved* (round-robin over rounds) so that
slow drifts of a shared, noisy machine hit all of them alike, and the ratios
printed come from the same rounds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

# XLA options for every Runner compile; --smoke sets a fast, unoptimised build.
COMPILER_OPTIONS: dict = {}
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def device_info() -> dict:
  """What the numbers were measured on."""
  d = jax.devices()[0]
  return {
    "platform": d.platform,
    "device_kind": d.device_kind,
    "device_count": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
    "machine": platform.machine(),
    "processor": platform.processor() or platform.machine(),
    "label": f"{d.device_kind} ({d.platform}, {jax.device_count()} device(s), "
    f"{os.cpu_count()} CPU cores)",
  }


def provenance() -> dict:
  """What code the numbers were measured with: git commit, uncommitted changes, versions."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args):
    try:
      out = subprocess.run(
        ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
      )
    except (OSError, subprocess.SubprocessError):
      return None
    return out.stdout

  commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
  versions = {"jax": jax.__version__, "python": platform.python_version()}
  for mod in ("jaxlib", "optax", "flax", "numpy"):
    try:
      versions[mod] = importlib.import_module(mod).__version__
    except (ImportError, AttributeError):
      versions[mod] = None
  import lorapro_jax

  pkg = os.path.dirname(os.path.abspath(lorapro_jax.__file__))
  digest = hashlib.sha256()
  for name in sorted(os.listdir(pkg)):
    if name.endswith(".py"):
      with open(os.path.join(pkg, name), "rb") as f:
        digest.update(name.encode() + b"\0" + f.read())
  return {
    # Without git (a copy of the tree, e.g. on a device machine): LORAPRO_GIT_COMMIT.
    "git_commit": commit.strip() if commit else os.environ.get("LORAPRO_GIT_COMMIT"),
    # Modified tracked files at measurement time (the commit alone does not describe them).
    "git_modified": None if status is None else [x[3:] for x in status.splitlines() if x],
    "versions": versions,
    # The library actually imported (a copy on PYTHONPATH may shadow the checkout).
    "lorapro_jax_path": pkg,
    "lorapro_jax_sha256": digest.hexdigest(),
  }


def header(result: dict) -> str:
  """The first line of a text report: device, jax, commit and modified files."""
  prov = result.get("provenance") or {}
  modified = prov.get("git_modified")
  return (
    f"device: {result['device']['label']}; jax {result['device']['jax']}; "
    f"commit {prov.get('git_commit')}" + (f" (modified: {', '.join(modified)})" if modified else "")
  )


def write_report(json_path: str, result: dict, text: str) -> str:
  """``result`` as JSON at ``json_path`` and ``text`` next to it (``.txt``); the text path."""
  os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
  with open(json_path, "w") as f:
    json.dump(result, f, indent=1, default=str)
  txt_path = os.path.splitext(json_path)[0] + ".txt"
  with open(txt_path, "w") as f:
    f.write(text + "\n")
  return txt_path


def enable_op_profiles() -> None:
  """Sets ``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true`` for per-op profiles
  (`train_step.profile_ops`); it must be set before JAX starts its backends."""
  if "xprof_traceme" in os.environ.get("XLA_FLAGS", ""):
    return
  if jax._src.xla_bridge.backends_are_initialized():  # too late for the flag: run anew
    raise SystemExit("--profile: set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true")
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
  ).strip()


def tree_bytes(tree) -> int:
  """Exact bytes of the array leaves of a pytree (``optax.MaskedNode`` has none)."""
  return int(
    sum(
      np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree)
      if hasattr(x, "shape") and hasattr(x, "dtype")
    )
  )


def memory_stats(compiled) -> dict:
  """XLA's memory analysis of a compiled executable (bytes; None where unknown)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    m = None
  keys = (
    "temp_size_in_bytes",
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "generated_code_size_in_bytes",
  )
  if m is None:
    return {k: None for k in keys}
  return {k: int(getattr(m, k, 0) or 0) for k in keys}


@dataclasses.dataclass
class Runner:
  """One jitted step with its arguments.

  ``fn(*args)`` returns ``(outputs, new_state)`` when ``state_index`` is set:
  the argument at ``state_index`` is donated and replaced by ``new_state``
  after every call. With ``carry`` (a tuple of argument indices), ``fn(*args)``
  returns one new value per index, in order: those arguments are donated and
  replaced after every call, as a train step does with its params and optimizer
  state. Otherwise ``fn(*args)`` returns anything and all arguments are kept.
  Donated arguments must not be shared with another runner.
  """

  name: str
  fn: Callable
  args: list
  state_index: int | None = None
  carry: tuple | None = None
  compiled: Any = None
  compile_s: float = float("nan")
  times: list = dataclasses.field(default_factory=list)

  def donated(self) -> tuple:
    if self.carry is not None:
      return tuple(self.carry)
    return () if self.state_index is None else (self.state_index,)

  def lowered(self, donate: bool = True):
    """``jax.jit(fn, donate_argnums=...).lower(*args)`` (for the HLO of the step)."""
    return jax.jit(self.fn, donate_argnums=self.donated() if donate else ()).lower(*self.args)

  def compile(self, donate: bool = True):
    donate_argnums = self.donated() if donate else ()
    t0 = time.perf_counter()
    self.compiled = (
      jax.jit(self.fn, donate_argnums=donate_argnums)
      .lower(*self.args)
      .compile(compiler_options=COMPILER_OPTIONS or None)
    )
    self.compile_s = time.perf_counter() - t0
    return self

  def call(self) -> float:
    t0 = time.perf_counter()
    out = self.compiled(*self.args)
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    if self.carry is not None:
      for i, x in zip(self.carry, out):
        self.args[i] = x
    elif self.state_index is not None:
      self.args[self.state_index] = out[1]
    return dt


@dataclasses.dataclass
class PyRunner:
  """A Python-level step (e.g. a loop of jitted per-layer calls)."""

  name: str
  step: Callable[[], Any]  # runs one step, returns what to block on
  compile_s: float = float("nan")
  times: list = dataclasses.field(default_factory=list)
  compiled: Any = None

  def compile(self, donate: bool = True):
    del donate
    t0 = time.perf_counter()
    jax.block_until_ready(self.step())  # first call traces and compiles
    self.compile_s = time.perf_counter() - t0
    return self

  def call(self) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(self.step())
    return time.perf_counter() - t0


def summarise(times: Sequence[float]) -> dict:
  t = np.asarray(times) * 1e3
  return {
    "median_ms": float(np.median(t)),
    "p25_ms": float(np.percentile(t, 25)),
    "p75_ms": float(np.percentile(t, 75)),
    "min_ms": float(np.min(t)),
    "n": int(t.size),
  }


def measure(
  runners: Sequence,
  *,
  warmup: int = 2,
  rounds: int = 5,
  target_s: float = 1.0,
  max_reps: int = 50,
  min_reps: int = 3,
) -> dict:
  """Median time of each runner, measured interleaved.

  After ``warmup`` calls each, the number of repetitions is chosen so that a
  runner spends about ``target_s`` seconds (between ``min_reps`` and
  ``max_reps``), then the repetitions run in ``rounds`` round-robin rounds.
  Returns ``{name: summarise(times)}``.
  """
  est = {}
  for r in runners:
    est[r.name] = r.call()
    for _ in range(warmup - 1 if est[r.name] < 0.5 else 0):  # slow steps: one warm-up call
      est[r.name] = r.call()
  # Steps slower than 2 s (full mode on a Llama layer under load) get 2 repetitions.
  reps = {
    r.name: (
      2
      if est[r.name] > 2.0
      else int(np.clip(target_s / max(est[r.name], 1e-6), min_reps, max_reps))
    )
    for r in runners
  }
  rounds = max(1, min(rounds, min(reps.values())))
  for k in range(rounds):
    for r in runners:
      n = reps[r.name] // rounds + (1 if k < reps[r.name] % rounds else 0)
      for _ in range(n):
        r.times.append(r.call())
  return {r.name: summarise(r.times) for r in runners}


def measure_repeatedly(runners: Sequence, repeats: int, *, log, label: str = "", **kw) -> list:
  """``repeats`` independent `measure` calls of the same compiled runners (the spread of
  their ratios): each ``{"res": {name: summary}, "times": {name: every call's seconds}}``."""
  out = []
  for rep in range(repeats):
    for rn in runners:
      rn.times = []
    res = measure(runners, **kw)
    out.append({"res": res, "times": {rn.name: list(rn.times) for rn in runners}})
    log(
      f"{label}measurement {rep + 1}/{repeats}: "
      + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in res.items())
    )
  return out
