#!/usr/bin/env bash
# One prepared command for a CUDA machine: the numerics tests and the benchmark tables on
# the GPU, within a time budget (default 8 minutes), every result written under one folder.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine (repository root or not)
#   bash benchmarks/gpu_check.sh --dry-run       # the same steps at tiny sizes on the CPU
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh
#
# Environment:
#   OUT                   results folder (default ./out/gpu_check); the device tool returns
#                         what is written under $OUT
#   GPU_CHECK_DRY_RUN=1   same as --dry-run
#   GPU_CHECK_BUDGET_S    total seconds (default 480); each step's timeout is capped by what
#                         is left, and a step that would start with under 15 s left is skipped
#                         (recorded as failed)
#   GPU_CHECK_WHEELHOUSE  a folder of wheels: missing Python packages (optax, chex, hypothesis,
#                         pytest, flax) are installed from it with
#                         `pip install --no-index --find-links`; nothing is ever downloaded
#   LORAPRO_GIT_COMMIT    the commit being checked, recorded when the copy has no .git
#   PYTHON                the interpreter (default: python3, else python)
#
# Steps (each under `timeout`, each logged to $OUT/<step>.log; a failure is recorded and
# the next step still runs): env (nvidia-smi, versions), deps, devices (JAX must see a GPU
# unless dry-run), pytest (tests/test_theorems.py, test_paths.py, test_fuzz.py,
# test_transform.py on the GPU; dry-run: collection only), train_step (donated train-step
# ratio at Llama-2-7B shapes, r = 8, L = 1, 2, 8), modes (benchmarks.factored_cost --full:
# every mode's time ratio and pass count at Llama-2-7B L1 and L2, r = 8, full mode next to
# dense AdamW on the same m×n weights), bench (python -m benchmarks.run, a trimmed default:
# JSON and text tables), breakdown (efficient-mode components).
# $OUT/summary.txt lists every step with its exit status and seconds; the script exits
# non-zero if any step failed.
#
# Building the wheelhouse (on a machine with the network, for the GPU machine's Python):
#   python -m pip download -d wheelhouse --only-binary=:all: \
#     --python-version 3.12 --platform manylinux2014_x86_64 \
#     optax chex hypothesis pytest flax
# (or `python -m pip wheel -w wheelhouse optax chex hypothesis pytest flax` with the same
# Python as the GPU machine). jax and jaxlib wheels that come along are not installed over
# the preinstalled CUDA jax: pip keeps an installed version that satisfies the requirement.

set -u
cd "$(dirname "$0")/.." || exit 2

DRY="${GPU_CHECK_DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h | --help)
      sed -n '2,40p' "$0"
      exit 0
      ;;
    *)
      echo "unknown argument: $arg" >&2
      exit 2
      ;;
  esac
done
OUTDIR="${OUT:-./out/gpu_check}"
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
START=$SECONDS
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
failed=()

if [ "$DRY" = "1" ]; then
  export JAX_PLATFORMS=cpu
  MODE="dry-run (CPU, tiny sizes)"
else
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
  export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
  MODE="gpu"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
if [ -z "${LORAPRO_GIT_COMMIT:-}" ]; then
  LORAPRO_GIT_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
  export LORAPRO_GIT_COMMIT
fi
export OUTDIR DRY PY
echo "mode: $MODE; budget ${BUDGET}s; commit $LORAPRO_GIT_COMMIT; out $OUTDIR" | tee -a "$SUMMARY"

# step NAME LIMIT_S CMD...: runs CMD under `timeout` (capped by the budget left), output to
# $OUTDIR/NAME.log; records "NAME ok|FAILED (rc) SECONDS" in summary.txt.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 15 ]; then
    echo "$name SKIPPED (budget spent: ${left}s left)" | tee -a "$SUMMARY"
    failed+=("$name")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS rc=0
  echo "== $name (timeout ${limit}s): $*" | tee -a "$SUMMARY"
  if declare -F "$1" >/dev/null; then # a function of this script: run it in a child bash
    timeout -k 10 "$limit" bash -c "$(declare -f "$1"); \"\$@\"" _ "$@" >"$OUTDIR/$name.log" 2>&1 || rc=$?
  else
    timeout -k 10 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1 || rc=$?
  fi
  local dt=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then
    echo "$name ok ${dt}s" | tee -a "$SUMMARY"
  else
    [ "$rc" -eq 124 ] && rc="124: timed out"
    echo "$name FAILED (rc $rc) ${dt}s; last lines of $name.log:" | tee -a "$SUMMARY"
    tail -n 15 "$OUTDIR/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    failed+=("$name")
  fi
}

env_info() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $LORAPRO_GIT_COMMIT"
  echo "host: $(uname -a)"
  echo "cpus: $(nproc)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu \
      --format=csv,noheader >"$OUTDIR/nvidia-smi.txt" 2>&1
    echo "nvidia-smi: $(head -n 1 "$OUTDIR/nvidia-smi.txt")"
    nvidia-smi >"$OUTDIR/nvidia-smi-full.txt" 2>&1
  else
    echo "nvidia-smi: not found" | tee "$OUTDIR/nvidia-smi.txt"
    [ "$DRY" = "1" ] || return 1
  fi
  "$PY" -c 'import sys; print("python:", sys.version.replace("\n", " "))'
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(jax|jaxlib|jax-cuda|optax|chex|flax|hypothesis|pytest|numpy|nvidia-)' || true
}

deps() {
  local missing
  missing=$("$PY" - <<'EOF'
import importlib.util
need = ["jax", "numpy", "optax", "chex", "hypothesis", "pytest", "flax"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
  )
  echo "missing: ${missing:-none}"
  [ -z "$missing" ] && return 0
  case " $missing " in *" jax "* | *" numpy "*)
    echo "jax/numpy must be preinstalled (CUDA jax)"
    return 1
    ;;
  esac
  if [ -z "${GPU_CHECK_WHEELHOUSE:-}" ]; then
    echo "set GPU_CHECK_WHEELHOUSE to a folder of wheels (see the header of this script)"
    return 1
  fi
  # shellcheck disable=SC2086
  "$PY" -m pip install --no-index --find-links "$GPU_CHECK_WHEELHOUSE" $missing
}

devices() {
  "$PY" - <<'EOF'
import os, sys
import jax
devs = jax.devices()
print("jax", jax.__version__, "backend", jax.default_backend())
for d in devs:
  print(" ", d, d.platform, d.device_kind)
want_gpu = os.environ.get("JAX_PLATFORMS") != "cpu"
if want_gpu and jax.default_backend() != "gpu":
  sys.exit("JAX does not see a GPU")
EOF
}

step env 30 env_info
cp "$OUTDIR/env.log" "$OUTDIR/env.txt" 2>/dev/null
step deps 90 deps
step devices 60 devices
cp "$OUTDIR/devices.log" "$OUTDIR/jax-devices.txt" 2>/dev/null

TESTS=(tests/test_theorems.py tests/test_paths.py tests/test_fuzz.py tests/test_transform.py)
if [ "$DRY" = "1" ]; then
  step pytest 60 "$PY" -m pytest "${TESTS[@]}" -q -p no:cacheprovider --collect-only
  step train_step 60 "$PY" -m benchmarks.train_step --model tiny --layers 1 --rounds 1 \
    --target-s 0.02 --out "$OUTDIR/train_step.json"
  # (XLA's unoptimised build: the dry run checks the commands, and the factored step's
  # optimised compile alone can take a minute on a loaded 2-core CPU)
  step modes 150 "$PY" -m benchmarks.factored_cost --model tiny --layers 1 --full --repeats 1 \
    --rounds 1 --target-s 0.02 --no-profile --ksweep '' --fast-compile \
    --out "$OUTDIR/modes-L1.json"
  step bench 90 "$PY" -m benchmarks.run --smoke --sections update --no-plot \
    --out-dir "$OUTDIR/bench" --tag dry-run
  step breakdown 60 "$PY" -m benchmarks.breakdown --model tiny --layers 1 --rounds 1 \
    --target-s 0.02 --passes
else
  step modes 110 bash -c "\"\$0\" -m benchmarks.factored_cost --layers 1 --full --repeats 2 \
    --rounds 5 --target-s 0.5 --no-profile --ksweep '' --out \"\$1/modes-L1.json\" && \
    \"\$0\" -m benchmarks.factored_cost --layers 2 --repeats 2 --rounds 5 --target-s 0.5 \
    --no-profile --ksweep '' --out \"\$1/modes-L2.json\"" "$PY" "$OUTDIR"
  step pytest 200 "$PY" -m pytest "${TESTS[@]}" -q -p no:cacheprovider -ra \
    --junitxml="$OUTDIR/pytest.xml"
  step train_step 70 "$PY" -m benchmarks.train_step --layers 1,2,8 --rounds 7 --target-s 1 \
    --out "$OUTDIR/train_step.json"
  step bench 130 "$PY" -m benchmarks.run --no-plot --out-dir "$OUTDIR/bench" --tag gpu \
    --layers 1,2,8 --ranks 8,32 --full-llama-layers 1 --small-models minilm:6 \
    --adapters 8,32,256,1024 --max-separate-adapters 32 --scaling-ranks 4,64 \
    --rounds 5 --target-s 0.5
  step breakdown 40 "$PY" -m benchmarks.breakdown --layers 2 --rounds 5 --target-s 0.5
fi

echo "total $((SECONDS - START))s; failed: ${failed[*]:-none}" | tee -a "$SUMMARY"
[ "${#failed[@]}" -eq 0 ]
