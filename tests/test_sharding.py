"""`lorapro` on a device mesh with JAX's SPMD partitioner (8 simulated CPU devices).

The checks run once in a subprocess (`tests/sharding_check.py`), because this
pytest process has already initialised JAX with a single CPU device; the
subprocess prints a JSON report that the tests below inspect.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

# One subprocess that trains every mode and layout on 8 simulated devices.
pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
LAYOUTS = ("fsdp", "tp", "dp")
MODES = ("efficient", "full", "factored")
MESH_AXIS = {"fsdp": "fsdp", "tp": "model", "dp": "data"}


@pytest.fixture(scope="module")
def report():
  root = os.path.dirname(HERE)  # lorapro_jax importable even without an install
  path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=path,
  )
  proc = subprocess.run(
    [sys.executable, os.path.join(HERE, "sharding_check.py")],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  data = json.loads(proc.stdout.strip().splitlines()[-1])
  cases = {(c["layout"], c["mode"], c["dtype"]): c for c in data["cases"]}
  return data["meta"]["shapes"], cases


def _norm(spec):
  """A PartitionSpec (as JSON) without trailing Nones, so P('x') == P('x', None)."""
  spec = list(spec)
  while spec and spec[-1] is None:
    spec.pop()
  return spec


def _leaves(tree):
  if isinstance(tree, dict):
    for k in sorted(tree):
      for path, leaf in _leaves(tree[k]):
        yield (k,) + path, leaf
  else:
    yield (), tree


def _arrays(shape_text):
  """'(f32[3,4,4]{1,2,0}, f32[1]{0})' -> [(3, 4, 4), (1,)]."""
  return [
    tuple(int(d) for d in dims.split(",") if d)
    for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", shape_text)
  ]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_training_matches_single_device(report, layout, mode):
  """Every step's updates, relative to the largest single-device update (float32;
  FSDP efficient mode also in float64, and with LORAPRO_SHARDING_X64=1 FSDP full
  mode: there the sharded steps must agree down to float64 rounding)."""
  cases = report[1]
  assert cases[layout, mode, "float32"]["max_rel_diff"] < 2e-5
  if (layout, mode) == ("fsdp", "efficient"):
    assert (layout, mode, "float64") in cases  # in every run, not only on request
  if (layout, mode, "float64") in cases:
    assert cases[layout, mode, "float64"]["max_rel_diff"] < 1e-12


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ("fsdp", "tp"))
def test_updates_are_sharded_like_the_params(report, layout, mode):
  case = report[1][layout, mode, "float32"]
  updates = dict(_leaves(case["update_specs"]))
  for path, spec in _leaves(case["param_specs"]):
    assert _norm(updates[path]) == _norm(spec), path


# Moments of the full mode, flax layout (..., in…, out…), by pair: split like the
# adapted weight. FSDP splits A (in) and B (out) over one mesh axis, which can
# split one axis of the moment only: out features, as B @ A is computed.
# v: (in, heads, head_dim), o: (heads, head_dim, out).
EXPECTED_MOMENTS = {
  "fsdp": {
    "q": [None, "fsdp"],
    "v": [None, "fsdp"],
    "mlp": [None, None, "fsdp"],
    "o": [None, None, "fsdp"],
    "head": ["fsdp"],
  },
  "tp": {
    "q": [None, "model"],
    "v": [None, "model"],
    "mlp": [None, None, "model"],
    "o": ["model"],
    "head": [None, "model"],
  },
  # Replicated params, ZeRO-style moments given through out_shardings.
  "dp": {
    "q": ["data"],
    "v": ["data"],
    "mlp": [None, "data"],
    "o": ["data"],
    "head": ["data"],
  },
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_full_mode_moments_stay_sharded(report, layout):
  case = report[1][layout, "full", "float32"]
  stages = ["moments_jit_init", "moments_after_steps"]
  if layout != "dp":  # eager init derives the moments' sharding from the params'
    stages.append("moments_eager_init")
  for stage in stages:
    got = case[stage]
    assert set(got) == set(EXPECTED_MOMENTS[layout]), stage
    for key, spec in EXPECTED_MOMENTS[layout].items():
      assert _norm(got[key]) == spec, (stage, key, got[key])
      assert MESH_AXIS[layout] in spec  # never replicated on every device


def _check_r_by_r_only(case, r):
  for c in case["collectives"]:
    assert c["op"] == "all-reduce", c  # no all-gather, all-to-all or permute
    for dims in _arrays(c["shape"]):
      # Gram partial products (N, r, r) and max-abs scales, never a factor.
      assert math.prod(dims[1:]) <= r * r, c


@pytest.mark.parametrize("layout", LAYOUTS)
def test_efficient_mode_communicates_only_r_by_r_all_reduces(report, layout):
  """The r×r work needs the Gram matrices BᵀB and AAᵀ and max|A|, max|B|:
  all-reduces of per-device partial products. Nothing gathers A or B."""
  shapes, cases = report
  case = cases[layout, "efficient", "float32"]
  _check_r_by_r_only(case, shapes["r"])
  if layout == "dp":
    assert case["collectives"] == []
  else:
    assert any(_arrays(c["shape"])[0][1:] == (shapes["r"],) * 2 for c in case["collectives"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_full_mode_never_moves_an_m_by_n_array(report, layout):
  """Full mode also forms the m×n equivalent gradient s·[B, g^B]·[g^A; A] and
  projects the Adam direction back (Eq. 56). With one mesh axis splitting both
  A and B (FSDP) one factor must be whole on each device for that product:
  A (n×r) and [g^A; A] (2r×n) are all-gathered, never anything m×n-sized.
  Tensor parallelism needs no gather; ZeRO-style data parallelism (moments
  split, params replicated) gathers the updates, which are param-sized."""
  shapes, cases = report
  r = shapes["r"]
  largest_factor_stack = 2 * r * max(shapes["in"], shapes["out"]) * shapes["layers"]
  smallest_moment = shapes["in"] * min(shapes["out"], shapes["out2"])
  assert largest_factor_stack < smallest_moment
  case = cases[layout, "full", "float32"]
  for c in case["collectives"]:
    for dims in _arrays(c["shape"]):
      assert math.prod(dims) <= largest_factor_stack, c
  gathers = [c for c in case["collectives"] if c["op"] != "all-reduce"]
  assert all(c["op"] == "all-gather" for c in gathers), gathers
  if layout == "fsdp":
    for c in gathers:
      (dims,) = _arrays(c["shape"])
      # (in, r) or (in, 2r), with or without a leading batch axis of layers; o's
      # in features (heads, in / heads) are gathered merged
      assert sorted(dims[-2:]) in (sorted([shapes["in"], r]), sorted([shapes["in"], 2 * r])), c
      assert len(dims) == 2 or dims[0] in (1, shapes["layers"]), c
  elif layout == "tp":
    assert gathers == []


@pytest.mark.parametrize("layout", LAYOUTS)
def test_factored_mode_state_is_laid_out_like_the_factors(report, layout):
  """Factored mode: first-moment factors and previous factors like A and B,
  the m-vector like B's out axes, the n-vector like A's in axes, at eager
  init, jitted init (`state_shardings`) and after the steps."""
  _, cases = report
  case = cases[layout, "factored", "float32"]
  params = {k: v for k, v in case["param_specs"].items() if k != "head"}
  for stage in ("moments_eager_init", "moments_jit_init", "moments_after_steps"):
    got = case[stage]
    assert set(got) == set(params) | {"head"}, stage
    for key, p in params.items():
      a, b = _norm(p["lora_a"]), _norm(p["lora_b"])
      m = {k: _norm(v) for k, v in got[key].items()}
      assert m["m_a"] == m["a_prev"] == a, (stage, key, m)
      assert m["m_b"] == m["b_prev"] == b, (stage, key, m)
      nb = 1 if key == "mlp" else 0  # the stacked layers' batch axis
      pad = lambda spec, n: (list(spec) + [None] * n)[:n]
      if key == "o":  # in features (heads, head_dim): a (heads, head_dim, r)
        in_axes, out_axes = pad(a, 2), pad(b, nb + 2)[nb + 1 :]
      elif key == "v":  # out features (heads, head_dim): b (r, heads, head_dim)
        in_axes, out_axes = pad(a, 1), pad(b, 3)[1:]
      else:
        in_axes, out_axes = pad(a, nb + 2)[nb : nb + 1], pad(b, nb + 2)[nb + 1 :]
      batch = pad(b, nb)
      assert m["row"] == _norm(batch + out_axes), (stage, key, m)
      assert m["col"] == _norm(pad(a, nb) + in_axes), (stage, key, m)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_factored_mode_never_moves_an_m_by_n_array(report, layout):
  shapes, cases = report
  smallest_weight = shapes["in"] * min(shapes["out"], shapes["out2"])
  for c in cases[layout, "factored", "float32"]["collectives"]:
    for dims in _arrays(c["shape"]):
      assert math.prod(dims) < smallest_weight, c


def test_weight_sharding_of_multi_axis_pairs():
  """In process, on a one-device mesh (the specs do not depend on the mesh's
  size): a kernel's (heads, head_dim) axes take the mesh axes of the leaf
  that carries them; `feature_axes` gives them per group."""
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import lorapro_jax as lpj
  from lorapro_jax import sharding

  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "model"))
  leaf = lambda shape, *spec: jax.ShapeDtypeStruct(
    shape, "float32", sharding=NamedSharding(mesh, P(*spec))
  )
  cases = [  # a, b, (batch, in, out) mesh axes, the moment's spec
    # q: kernel (D, N, H), a (D, r) split over fsdp, b (r, N, H) over heads
    (
      leaf((16, 3), "fsdp"),
      leaf((3, 4, 8), None, "model"),
      ((), ("fsdp",), ("model", None)),
      ("fsdp", "model", None),
    ),
    # o: kernel (N, H, D), row-parallel a (N, H, r), FSDP b (r, D)
    (
      leaf((4, 8, 3), "model"),
      leaf((3, 16), None, "fsdp"),
      ((), ("model", None), ("fsdp",)),
      ("model", None, "fsdp"),
    ),
    # stacked q, FSDP over in and heads: out features come first
    (
      leaf((2, 16, 3), None, "fsdp"),
      leaf((2, 3, 4, 8), None, None, "fsdp"),
      ((None,), ("fsdp",), ("fsdp", None)),
      (None, None, "fsdp", None),
    ),
  ]
  for a, b, axes, want in cases:
    (f,) = lpj.find_pairs({"l": {"lora_a": a, "lora_b": b}})
    assert sharding.feature_axes(f, a.sharding, b.sharding) == axes
    got = sharding.weight_sharding(f, a, b)
    assert tuple(got.spec) == want and len(want) == len(f.weight_shape)
  (got,) = lpj.full_moment_shardings({"l": {"lora_a": cases[0][0], "lora_b": cases[0][1]}}).values()
  assert tuple(got.mu.spec) == cases[0][3]
