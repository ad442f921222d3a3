#!/usr/bin/env bash
# The GPU protocol, one prepared script: installs what is missing, then runs
# bench/gpu_check.py (influence costs, KD-AIF vs KD step costs of resnet8x4 <-
# resnet32x4 and WRN-28-2 in float32 and bfloat16, one CIFAR-shaped epoch of the
# trainer on synthetic data) and writes one JSON. Under 8 minutes on one GPU.
#
# Usage, from anywhere:
#   bash bench/gpu_check.sh [OUT.json]          # default bench/results/gpu_check.json
# Environment:
#   PYTHON=python3         the interpreter whose jax sees the GPU (jax[cuda] installed)
#   WHEELS=DIR             install missing packages from these wheels (offline machines)
#   GPU_CHECK_ALLOW_CPU=1  run anyway when jax sees no GPU (to check the script)
#   GPU_CHECK_ARGS=...     extra arguments for bench/gpu_check.py (e.g. --tiny, or
#                          "--parts tests": the accelerator-sensitive test files,
#                          about 4 minutes on an H200, best as a call of its own)
#
# The project itself is put on PYTHONPATH, not pip-installed: setup.cfg pins the jax
# this project is tested with on CPU, and installing it would replace the GPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_JSON=${1:-bench/results/gpu_check.json}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# Import name -> pip name of what the library and the benchmarks import. jax is not in
# the list: a CPU-only jax from PyPI would hide the GPU.
missing=$("$PYTHON" - <<'EOF'
import importlib.util
need = {"flax": "flax", "optax": "optax", "orbax.checkpoint": "orbax-checkpoint",
        "ml_collections": "ml_collections", "einops": "einops", "sklearn": "scikit-learn",
        "matplotlib": "matplotlib", "tqdm": "tqdm", "tensorboardX": "tensorboardX",
        "absl": "absl-py"}
def present(mod):
  try:
    return importlib.util.find_spec(mod) is not None
  except ModuleNotFoundError:
    return False
print(" ".join(pip for mod, pip in need.items() if not present(mod)))
EOF
)
if [ -n "$missing" ]; then
  echo "installing: $missing"
  if [ -n "${WHEELS:-}" ]; then
    # --no-deps: the wheels are pure Python and their own dependencies are already there
    "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site "$WHEELS"/*.whl
  else
    "$PYTHON" -m pip install -q --target /tmp/gpu_check_site $missing
  fi
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi

backend=$("$PYTHON" -c 'import jax; print(jax.default_backend())')
if [ "$backend" != "gpu" ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" != "1" ]; then
  echo "error: jax sees no GPU (backend: $backend); install jax[cuda12] or jax[cuda13], or set GPU_CHECK_ALLOW_CPU=1" >&2
  exit 2
fi
"$PYTHON" -c 'import jax; print("devices:", jax.devices())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

# 470 s hard limit; no part starts after 300 s (the last one, the epoch, takes about 2 min).
# shellcheck disable=SC2086
timeout 470 "$PYTHON" bench/gpu_check.py --out "$OUT_JSON" --budget-s 300 ${GPU_CHECK_ARGS:-}
