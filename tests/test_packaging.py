"""The wheel built from this checkout: it installs, imports from where it was installed, ships
its `py.typed` marker, and needs only jax and optax at run time.

The wheel is built offline (`pip wheel --no-build-isolation`, with the setuptools of the test
extra) from a copy of the sources, so no stale `build/` directory of the checkout can leak into
it, and installed with `--no-deps` into a target directory; a subprocess started outside the
repository imports it from there (jax and optax come from this environment).
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

# Builds and installs the wheel with pip in subprocesses.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# What the build reads: the project table, the readme, the package and any license file.
SOURCES = ("pyproject.toml", "README.md", "MANIFEST.in", "setup.cfg", "setup.py", "LICENSE")


def _run(*cmd, **kwargs):
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
  assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("packaging")
  src = tmp / "src"
  src.mkdir()
  for name in SOURCES:
    if (ROOT / name).exists():
      shutil.copy2(ROOT / name, src / name)
  shutil.copytree(
    ROOT / "lorapro_jax", src / "lorapro_jax", ignore=shutil.ignore_patterns("__pycache__")
  )
  dist = tmp / "dist"
  _run(
    sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
    "-q", "-w", str(dist), str(src),
  )  # fmt: skip
  (whl,) = dist.glob("lorapro_jax-*.whl")
  return whl


def test_wheel_contents(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = email.message_from_string(z.read(meta).decode())
  assert "lorapro_jax/__init__.py" in names
  assert "lorapro_jax/py.typed" in names
  assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/"))], names
  assert metadata["License-Expression"] == "Apache-2.0"
  requires = metadata.get_all("Requires-Dist") or []
  runtime = [r for r in requires if "extra ==" not in r]
  names_of = {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip() for r in runtime}
  assert names_of == {"jax", "jaxlib", "optax"}, requires
  for dep in ("flax", "chex"):
    assert [r for r in requires if r.startswith(dep)], f"{dep} is in no extra: {requires}"


def test_wheel_installs_and_imports(wheel, tmp_path):
  target = tmp_path / "site"
  _run(
    sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
    "--target", str(target), str(wheel),
  )  # fmt: skip
  probe = (
    "import json, pathlib, lorapro_jax as m; f = pathlib.Path(m.__file__).parent; "
    "print(json.dumps([str(f), (f / 'py.typed').is_file(), hasattr(m, 'lorapro')]))"
  )
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
  env["PYTHONPATH"] = str(target)
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  out = _run(sys.executable, "-c", probe, cwd=cwd, env=env).stdout
  where, typed, has_api = json.loads(out.strip().splitlines()[-1])
  assert Path(where) == target / "lorapro_jax", where
  assert typed and has_api
