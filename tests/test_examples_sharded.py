"""examples/sharded: every mode trains on 8 simulated devices with its state
laid out like the pairs, and an Orbax checkpoint restores onto the mesh.

Run in a subprocess: this pytest process has already initialised JAX with one
CPU device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
from examples.sharded import finetune, train
out = {}
# The command line, in the modes whose state is checked by tests/test_sharding.py.
for mode in ("full", "efficient"):
  out[mode] = finetune.main(["--mode", mode, "--steps", "8", "--batch-size", "32"])
# The default mode, through the library calls the command line makes, with a checkpoint.
config = train.Config(steps=8, batch_size=32)
first, last, lora, opt_state = train.train(config, log=lambda *_: None)
train.checkpoint_round_trip(sys.argv[1], config.steps, {"lora": lora, "opt": opt_state})
out[config.mode] = [first, last]
out["factored_state"] = train.pair_state_shardings(opt_state)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow  # a subprocess on 8 devices compiles three train steps
def test_every_mode_trains_sharded_and_checkpoints(tmp_path):
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
  )
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt")],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
  out = json.loads(line.removeprefix("RESULT "))
  for mode in ("factored", "full", "efficient"):
    first, last = out[mode]
    assert last < first, (mode, first, last)
  # Factored mode's per-pair arrays are split over "fsdp", never replicated.
  for key, fields in out["factored_state"].items():
    assert set(fields) == {"m_a", "m_b", "a_prev", "b_prev", "row", "col"}, key
    assert all("fsdp" in spec for spec in fields.values()), (key, fields)
