#!/usr/bin/env bash
# Prepare a bare CUDA machine for tools/gpu_check.py, from the repository root:
#
#     pip install torch==2.13.0      # first, as the README says (the CUDA build on Linux)
#     bash tools/gpu_setup.sh
#     python tools/gpu_check.py --out gpu.json
#
# Every step reports ok or FAILED and the script goes on: gpu_check.py verifies whatever got
# installed and says exactly what could not be checked. Set PYTHON to choose the interpreter.
#
# Offline (no package index reachable, e.g. a lent GPU machine): run tools/gpu_wheels.sh where
# PyPI is reachable first; with .whl/ present this script installs from it alone, and
# gpu_check.py imports linescan from this checkout (no install of linescan itself needed).
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
failed=()

step() {
    local name=$1
    shift
    echo "== $name: $*"
    if "$@"; then
        echo "   ok: $name"
    else
        echo "   FAILED (continuing): $name"
        failed+=("$name")
        return 1
    fi
}

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    || echo "   nvidia-smi not found: no NVIDIA driver?"
"$PY" - <<'EOF' || echo "   torch is not importable: pip install torch==2.13.0 first"
import torch
print(f"   torch {torch.__version__}, CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}")
EOF

# The CUDA toolkit: pycuda builds against its headers, and compiles the SSIM kernel with nvcc.
for root in "${CUDA_ROOT:-}" "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13 /usr/local/cuda-12; do
    if [ -n "$root" ] && [ -x "$root/bin/nvcc" ]; then
        export CUDA_ROOT=$root CUDA_HOME=$root PATH="$root/bin:$PATH"
        break
    fi
done
if ! command -v nvcc >/dev/null; then
    # No toolkit: pip's nvcc is enough to compile the kernel (not to build pycuda).
    step "nvcc from pip" "$PY" -m pip install --timeout 5 --retries 0 "nvidia-cuda-nvcc-cu12"
fi
command -v nvcc && nvcc --version | tail -1

if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== offline: installing .whl/ (from tools/gpu_wheels.sh) without an index"
    # Installed one by one: a wheel for another Python or platform fails alone, not the rest.
    for whl in .whl/*.whl; do
        step "$(basename "$whl")" "$PY" -m pip install -q --no-index --no-deps --no-cache-dir \
            "$whl" || true
    done
    echo "   TensorRT is not carried (a multi-GB download from pypi.nvidia.com): trying it online"
    step "tensorrt" "$PY" -m pip install -q --timeout 5 --retries 0 "tensorrt>=10" || true
else
    step "linescan[dev]" "$PY" -m pip install -e ".[dev]"
    step "pycuda" "$PY" -m pip install "pycuda>=2024.1"
    # The tensorrt meta-package pulls the wheels for the CUDA major version it targets; fall
    # back to the CUDA 12 build, which runs on any driver that runs CUDA 12.
    if ! step "tensorrt" "$PY" -m pip install "tensorrt>=10"; then
        step "tensorrt-cu12" "$PY" -m pip install "tensorrt-cu12>=10"
    fi
fi

echo "== imports"
for mod in torch onnx onnxruntime zmq structlog pydantic pycuda.driver tensorrt; do
    "$PY" -c "import $mod" 2>/dev/null && echo "   $mod: ok" || echo "   $mod: NOT importable"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "== failed steps: ${failed[*]} (gpu_check.py will report what this leaves unverified)"
fi
exit 0
