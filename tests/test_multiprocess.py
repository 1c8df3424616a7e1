"""LoRA-Pro training and Orbax checkpoints across two JAX processes (CPU, gloo).

Starts `tests/multiprocess_worker.py` three times: two processes joined by
``jax.distributed.initialize`` (coordinator on a free local port, gloo CPU
collectives, 4 CPU devices each), whose devices form one 8-device mesh, and a
single process with 8 devices as the reference. Each trains every mode of
``lorapro_adamw`` with FSDP-sharded LoRA factors and optimizer state, saves a
checkpoint from every process, restores it and trains on; the tests compare
what the processes wrote (see the worker's docstring). This pytest process
never initialises JAX with more devices or changes its config.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import multiprocess_worker as worker
from tests.helpers import assert_close

# Three subprocesses that each train every mode and write checkpoints.
pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODES = worker.MODES  # every mode of lorapro_jax.transform.Mode
NUM_PROCESSES, LOCAL_DEVICES = 2, 4
TIMEOUT_S = 300
# Every array relative to the largest entry of the reference's: the processes'
# collectives add in another order than one process does. Updates come out of
# Adam's m/√v (and LoRA-Pro's Gram inverses), which amplify that rounding a few
# times (about 5e-6 was seen; params and optimizer state about 1e-6).
RTOL_STATE, RTOL_UPDATES = 1e-5, 2e-5


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tail(path, n=4000):
  with open(path, errors="replace") as f:
    text = "".join(line for line in f if not line.startswith("[Gloo]"))  # gloo's connect log
  return text[-n:]


def _start(name, tmp, devices, checkpoint_dir, extra_args=()):
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
  )
  out = tmp / name
  out.mkdir()
  args = [sys.executable, os.path.join(HERE, "multiprocess_worker.py")]
  args += ["--out", str(out), "--checkpoint-dir", str(checkpoint_dir), *extra_args]
  # Logs to files: gloo writes to stdout, and full pipes would block the workers.
  with open(out / "stdout.txt", "w") as stdout, open(out / "stderr.txt", "w") as stderr:
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=stdout, stderr=stderr)


def _stop(procs):
  for p in procs.values():
    if p.poll() is None:
      p.kill()
      p.wait()


def _logs(tmp, procs, why):
  parts = [why]
  for name, proc in procs.items():
    parts.append(f"===== {name}: exit code {proc.returncode} =====")
    for log in ("stderr", "stdout"):
      parts.append(f"--- {name} {log} (tail) ---\n{_tail(tmp / name / f'{log}.txt')}")
  return "\n".join(parts)


def _load(tmp, name):
  with open(tmp / name / "result.json") as f:
    report = json.load(f)
  with np.load(tmp / name / "result.npz") as data:
    arrays = {k: data[k] for k in data.files}
  return report, arrays


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  if importlib.util.find_spec("orbax.checkpoint") is None:
    pytest.skip("orbax-checkpoint is not installed")
  tmp = tmp_path_factory.mktemp("multiprocess")
  shared = tmp / "shared-checkpoints"  # one directory that every process writes
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = {}
  try:
    for i in range(NUM_PROCESSES):
      args = ["--num-processes", str(NUM_PROCESSES), "--process-id", str(i)]
      args += ["--coordinator", coordinator]
      procs[f"process{i}"] = _start(f"process{i}", tmp, LOCAL_DEVICES, shared, args)
    devices = NUM_PROCESSES * LOCAL_DEVICES
    procs["reference"] = _start("reference", tmp, devices, tmp / "reference-checkpoints")
    deadline = time.monotonic() + TIMEOUT_S
    while None in [p.poll() for p in procs.values()]:  # poll() every process
      failed = [n for n, p in procs.items() if p.returncode not in (None, 0)]
      if failed or time.monotonic() > deadline:
        # A process whose peer died would wait for it until jax's own timeouts (minutes).
        why = f"{', '.join(failed)} failed" if failed else f"timed out after {TIMEOUT_S}s"
        _stop(procs)
        pytest.fail(_logs(tmp, procs, why + "; killed those still running"), pytrace=False)
      time.sleep(0.2)
    if any(p.returncode != 0 for p in procs.values()):
      pytest.fail(_logs(tmp, procs, "a process failed"), pytrace=False)
  finally:
    _stop(procs)
  return {name: _load(tmp, name) for name in procs}


def _keys(arrays, mode, kind):
  prefix = f"{mode}/{kind}"
  keys = sorted(k for k in arrays if k.startswith((prefix + "[", prefix + "/")))
  assert keys, f"no arrays under {prefix}"
  return keys


def _assert_bitwise(got, want, what):
  assert got.dtype == want.dtype and got.shape == want.shape, what
  assert got.tobytes() == want.tobytes(), what


def test_two_processes_form_one_mesh(runs):
  for i in range(NUM_PROCESSES):
    report = runs[f"process{i}"][0]
    assert report["process_index"] == i
    assert report["process_count"] == NUM_PROCESSES
    assert report["local_device_count"] == LOCAL_DEVICES
    assert report["device_count"] == NUM_PROCESSES * LOCAL_DEVICES
    assert report["mesh_processes"] == list(range(NUM_PROCESSES))
  ref = runs["reference"][0]
  assert (ref["process_count"], ref["device_count"]) == (1, NUM_PROCESSES * LOCAL_DEVICES)
  assert {"efficient", "full"} <= set(MODES)
  for report, _ in runs.values():
    assert list(report["modes"]) == list(MODES)


@pytest.mark.parametrize("mode", MODES)
def test_processes_agree_with_each_other(runs, mode):
  """Each process's own replica of the loss, and everything gathered, is the same."""
  (r0, a0), (r1, a1) = runs["process0"], runs["process1"]
  assert r0["modes"][mode]["loss"] == r1["modes"][mode]["loss"]
  assert r0["modes"][mode]["resumed_loss"] == r1["modes"][mode]["resumed_loss"]
  assert sorted(a0) == sorted(a1)
  for k in a0:
    if k.startswith(mode + "/"):
      _assert_bitwise(a1[k], a0[k], k)


@pytest.mark.parametrize("mode", MODES)
def test_processes_match_single_process(runs, mode):
  """Every step's updates, the params and state saved and at the end, and the
  losses agree with one process on 8 devices to float32 rounding."""
  ref_report, ref = runs["reference"]
  for i in range(NUM_PROCESSES):
    report, arrays = runs[f"process{i}"]
    assert sorted(arrays) == sorted(ref)
    for kind, rtol in (("run/updates", RTOL_UPDATES), ("saved", RTOL_STATE), ("final", RTOL_STATE)):
      for k in _keys(ref, mode, kind):
        assert_close(arrays[k], ref[k], rtol=rtol, atol=0, err_msg=f"process {i}: {k}")
    np.testing.assert_allclose(
      report["modes"][mode]["loss"], ref_report["modes"][mode]["loss"], rtol=RTOL_STATE
    )


@pytest.mark.parametrize("mode", MODES)
def test_state_is_split_across_processes(runs, mode):
  """Params and every optimizer-state array as large as a LoRA factor are split
  over the mesh (so over both processes); counts and the like are replicated."""
  report, arrays = runs["process0"]
  smallest_factor = min(np.prod(a.shape) for a in worker.host_params()[0]["q"].values())
  specs = report["modes"][mode]["saved_specs"]
  for path, spec in specs.items():
    if arrays[f"{mode}/saved{path}"].size >= smallest_factor:
      assert worker.FSDP in spec, (path, spec)


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_restores_bitwise_in_every_process(runs, mode):
  for name in ("process0", "process1", "reference"):
    report, arrays = runs[name]
    m = report["modes"][mode]
    assert m["latest_step"] == worker.SAVE_AT
    assert m["restored_shardings_match_target"]
    assert m["restored_specs"] == m["saved_specs"]
    saved, restored = _keys(arrays, mode, "saved"), _keys(arrays, mode, "restored")
    assert [k.replace("/restored", "/saved", 1) for k in restored] == saved
    for k in saved:
      _assert_bitwise(arrays[k.replace("/saved", "/restored", 1)], arrays[k], f"{name}: {k}")


@pytest.mark.parametrize("mode", MODES)
def test_training_continues_identically_after_restore(runs, mode):
  """Training on from the restored checkpoint gives bitwise the updates, losses
  and final params and state of the uninterrupted run."""
  for name in ("process0", "process1", "reference"):
    report, arrays = runs[name]
    m = report["modes"][mode]
    assert m["resumed_loss"] == m["loss"][worker.SAVE_AT :]
    resumed = _keys(arrays, mode, "resumed/updates")
    assert len(resumed) == len(_keys(arrays, mode, "run/updates/0")) * (
      worker.STEPS - worker.SAVE_AT
    )
    for k in resumed:
      _assert_bitwise(arrays[k], arrays[k.replace("/resumed/", "/run/", 1)], f"{name}: {k}")
    for k in _keys(arrays, mode, "final"):
      _assert_bitwise(arrays[k.replace("/final", "/resumed", 1)], arrays[k], f"{name}: {k}")
