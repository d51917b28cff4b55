#!/usr/bin/env bash
# Prepare .whl/ for a GPU machine that cannot reach a package index, from the repository root:
#
#     bash tools/gpu_wheels.sh            # here, where PyPI is reachable
#     # copy the checkout (with .whl/) to the GPU machine, then there:
#     bash tools/gpu_setup.sh && python3 tools/gpu_check.py --out gpu.json
#
# What goes in .whl/ (for PY_VERSION, default 3.12, manylinux x86-64):
#   - linescan's own dependencies that a CUDA image with PyTorch usually lacks (pyzmq,
#     structlog, pydantic and theirs), as binary wheels;
#   - pycuda, which PyPI has only as source: built here into a wheel against the CUDA toolkit's
#     headers. Linking needs libcuda.so, which only a machine with the NVIDIA driver has, so
#     where there is none a stub is generated from cuda.h (every entry point returns
#     CUDA_ERROR_STUB_LIBRARY) with the driver's soname, libcuda.so.1: the wheel then loads the
#     real driver on the GPU machine. CURAND is left out (linescan does not use it).
# TensorRT cannot be carried this way: its libraries are a multi-GB download from NVIDIA's own
# index (pypi.nvidia.com), which tools/gpu_setup.sh tries online and gpu_check.py reports.
#
# Needs: a python of PY_VERSION (PYTHON, default python$PY_VERSION), gcc/g++, the CUDA toolkit
# (CUDA_ROOT, default /usr/local/cuda). Every step says ok or FAILED.
set -u
cd "$(dirname "$0")/.." || exit 1
PY_VERSION=${PY_VERSION:-3.12}
PY=${PYTHON:-python$PY_VERSION}
CUDA_ROOT=${CUDA_ROOT:-/usr/local/cuda}
PYCUDA_VERSION=${PYCUDA_VERSION:-2026.1}
OUT=$PWD/.whl
mkdir -p "$OUT"
# One version of each package: wheels left by an earlier run (another pydantic, say) would be
# installed beside these in name order, and the last one would win.
rm -f "$OUT"/*.whl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0

tag=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') || {
    echo "FAILED: no python $PY_VERSION ($PY); set PYTHON"
    exit 1
}
[ "$tag" = "$PY_VERSION" ] || { echo "FAILED: $PY is Python $tag, not $PY_VERSION"; exit 1; }

echo "== binary wheels for Python $PY_VERSION"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64 manylinux_2_26_x86_64 manylinux_2_24_x86_64 manylinux_2_5_x86_64; do
    platforms+=(--platform "$p")
done
# One resolution for all of them (pydantic pins its pydantic-core exactly): linescan's
# dependencies a PyTorch CUDA image lacks, and pycuda's run-time dependencies.
reqs=(pyzmq structlog pydantic pytools platformdirs mako)
if "$PY" -m pip download -q --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp "${platforms[@]}" -d "$OUT" "${reqs[@]}"; then
    echo "   ok: ${reqs[*]} and their dependencies"
else
    echo "   FAILED: ${reqs[*]}"
    status=1
fi

echo "== pycuda $PYCUDA_VERSION from source"
if ! "$PY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d "$work" \
    "pycuda==$PYCUDA_VERSION" 2>/dev/null; then
    # pip prepares metadata on download, which fails without a configured CUDA: fetch directly.
    # The simple index (PEP 503) is what every PyPI mirror serves.
    "$PY" - "$PYCUDA_VERSION" "$work/pycuda.tar.gz" <<'EOF' \
        || { echo "   FAILED: cannot fetch the pycuda sdist"; exit 1; }
import re, sys, urllib.request
version, dest = sys.argv[1], sys.argv[2]
page = urllib.request.urlopen("https://pypi.org/simple/pycuda/").read().decode()
url = re.search(rf'href="(https://[^"#]*/pycuda-{re.escape(version)}\.tar\.gz)', page).group(1)
urllib.request.urlretrieve(url, dest)
EOF
fi
tar -xzf "$work"/pycuda*.tar.gz -C "$work" || { echo "   FAILED: cannot unpack pycuda"; exit 1; }
src=$(find "$work" -maxdepth 1 -type d -name 'pycuda-*' | head -1)

libdir=$CUDA_ROOT/lib64/stubs
if ! ls "$libdir"/libcuda.so >/dev/null 2>&1; then
    libdir=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}' | xargs -r dirname)
fi
if [ -z "$libdir" ] || ! ls "$libdir"/libcuda.so* >/dev/null 2>&1; then
    echo "   no libcuda here: linking against a stub generated from cuda.h"
    libdir=$work/stub
    mkdir -p "$libdir"
    # Every driver entry point the headers declare (both API versions); declarations can span
    # lines, so the preprocessed text is joined first. cuGetError{String,Name} must answer:
    # pycuda calls them to word the error it raises.
    printf '#include <cuda.h>\n#include <cudaProfiler.h>\n' >"$libdir/inc.h"
    {
        gcc -E -P -D__CUDA_API_VERSION_INTERNAL -I"$CUDA_ROOT/include" "$libdir/inc.h" \
            | tr '\n' ' ' | grep -oE 'CUresult +(CUDAAPI +)?cu[A-Za-z0-9_]+ *\(' \
            | sed -E 's/CUresult +(CUDAAPI +)?//; s/ *\(//' | sort -u \
            | grep -vE '^cuGetError(String|Name)$' \
            | awk '{print "int " $1 "(void) { return 34; }"}'
        echo 'int cuGetErrorString(int e, const char **s) { *s = "no NVIDIA driver (stub)"; return 0; }'
        echo 'int cuGetErrorName(int e, const char **s) { *s = "CUDA_ERROR_STUB_LIBRARY"; return 0; }'
    } >"$libdir/stub.c"
    gcc -shared -fPIC -o "$libdir/libcuda.so.1" -Wl,-soname,libcuda.so.1 "$libdir/stub.c" \
        || { echo "   FAILED: cannot build the stub"; exit 1; }
    ln -sf libcuda.so.1 "$libdir/libcuda.so"
elif [ ! -e "$libdir/libcuda.so" ]; then
    mkdir -p "$work/drv" && ln -sf "$libdir/libcuda.so.1" "$work/drv/libcuda.so" && libdir=$work/drv
fi
cat >"$src/siteconf.py" <<EOF
CUDA_ROOT = "$CUDA_ROOT"
CUDA_ENABLE_GL = False
CUDA_ENABLE_CURAND = False
CUDADRV_LIB_DIR = ["$libdir"]
CUDADRV_LIBNAME = ["cuda"]
CUDART_LIB_DIR = ["$CUDA_ROOT/lib64"]
CUDART_LIBNAME = ["cudart"]
CURAND_LIB_DIR = []
CURAND_LIBNAME = []
CXXFLAGS = []
LDFLAGS = []
EOF
venv=$work/venv
"$PY" -m venv "$venv" && "$venv/bin/pip" install -q numpy setuptools wheel \
    || { echo "   FAILED: build environment"; exit 1; }
if (cd "$src" && "$venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$OUT" .); then
    echo "   ok: $(ls "$OUT"/pycuda-*.whl)"
else
    echo "   FAILED: pycuda build"
    status=1
fi
echo "== $OUT: $(du -sh "$OUT" | cut -f1) in $(find "$OUT" -type f -name '*.whl' | wc -l) wheels"
exit $status
