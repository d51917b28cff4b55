"""Tests of the GPU path: what can be checked without a GPU runs everywhere, the rest skips.

Everywhere: the CUDA kernel compiles to PTX with nvcc (wherever nvcc is on the PATH), the
kernel's arithmetic (emulated in numpy float32) agrees with the CPU residual, the TensorRT
engine cache key and lookup rules, and the missing-extra messages. With an NVIDIA GPU (and
pycuda / TensorRT where needed): parity of every GPU path with the CPU path.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from linescan.backends import create_backend
from linescan.backends.cuda_residual import (
    ARG_TYPES,
    KERNEL_FILE,
    KERNELS,
    find_nvcc,
    kernel_cache_dir,
)
from linescan.backends.torch_cpu import TorchBackend
from linescan.engine_cache import (
    EngineKey,
    default_engines_dir,
    engine_path,
    lookup,
    other_engines,
    sidecar_path,
    store,
    timing_cache_path,
    why_not_usable,
)
from linescan.errors import EngineError
from linescan.model.bundle import BundleMeta, build_module, load_bundle, read_meta, save_bundle
from linescan.residual import ssim_residual
from linescan.ssim import SSIMParams

GPU_HINT = "pip install 'linescan[gpu]'"
PATCH = 32


def make_bundle(path: Path, loss: str = "ssim") -> Path:
    residual = "vae" if loss == "vae" else "ssim"
    meta = BundleMeta(loss=loss, latent=8, patch=PATCH, residual=residual)  # type: ignore[arg-type]
    save_bundle(path, build_module(meta), meta)
    return path


def has_module(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- PTX build


NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not on the PATH")


def nvcc_ptx(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    assert NVCC is not None
    out = tmp_path / "kernel.ptx"
    return subprocess.run(
        [NVCC, "--ptx", *flags, "-o", str(out), str(KERNEL_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@needs_nvcc
@pytest.mark.parametrize("arch", [["-arch=sm_90"], []], ids=["sm_90", "default-arch"])
def test_kernel_compiles_to_ptx(tmp_path: Path, arch: list[str]) -> None:
    """The .cu builds to PTX (H200's sm_90 and nvcc's default) with all three entry points."""
    run = nvcc_ptx(tmp_path, *arch)
    assert run.returncode == 0, run.stderr
    ptx = (tmp_path / "kernel.ptx").read_text()
    for name in KERNELS.values():
        assert f".entry {name}(" in ptx
    if arch:
        assert ".target sm_90" in ptx


PTX_PARAM = {"P": ".u64", "i": ".u32", "f": ".f32"}


@needs_nvcc
def test_kernel_entry_points_match_the_loader(tmp_path: Path) -> None:
    """What the pycuda loader looks up and passes is what the kernel file defines: unmangled
    entry points and ``c_window`` in the cubin (built with the loader's own options), and each
    entry point's PTX parameters in the order and widths of ``ARG_TYPES``."""
    assert NVCC is not None
    cubin = tmp_path / "kernel.cubin"
    run = subprocess.run(
        [NVCC, "--cubin", "-arch=sm_90", "-DLS_RADIUS=5", "-lineinfo", "-o", str(cubin),
         str(KERNEL_FILE)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    blob = cubin.read_bytes()
    for name in [*KERNELS.values(), "c_window"]:
        assert b"\0" + name.encode() + b"\0" in blob, name
    assert nvcc_ptx(tmp_path, "-arch=sm_90").returncode == 0
    ptx = (tmp_path / "kernel.ptx").read_text()
    want = [PTX_PARAM[c] for c in ARG_TYPES]
    for name in KERNELS.values():
        body = ptx.split(f".entry {name}(", 1)[1].split(")", 1)[0]
        got = re.findall(r"\.param\s+(\.\w+)", body)
        assert got == want, name


def test_nvcc_is_found_off_the_path(tmp_path: Path) -> None:
    """A systemd service's PATH has no CUDA directory: nvcc is found via $CUDA_HOME."""
    fake = tmp_path / "cuda" / "bin" / "nvcc"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    empty = str(tmp_path / "nothing")
    assert find_nvcc({"PATH": empty, "CUDA_HOME": str(tmp_path / "cuda")}) == str(fake)
    assert find_nvcc({"PATH": str(fake.parent)}) == str(fake)
    if not Path("/usr/local/cuda/bin/nvcc").exists():
        assert find_nvcc({"PATH": empty}) is None


def test_kernel_cache_dir_is_writable_or_off(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The compiled kernel is cached beside the engines; an unwritable place turns caching off
    (compile at every start) instead of failing the daemon's start."""
    monkeypatch.setenv("LINESCAN_ENGINES", str(tmp_path / "engines"))
    assert kernel_cache_dir() == str(tmp_path / "engines" / "kernels")
    assert (tmp_path / "engines" / "kernels").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LINESCAN_ENGINES", str(blocker / "engines"))  # below a plain file
    assert kernel_cache_dir() is False


@needs_nvcc
def test_kernel_radius_is_bounded(tmp_path: Path) -> None:
    """Windows up to 21 compile; larger ones stop at a clear #error, not a shared-memory crash."""
    assert nvcc_ptx(tmp_path, "-arch=sm_90", "-DLS_RADIUS=10").returncode == 0
    bad = nvcc_ptx(tmp_path, "-arch=sm_90", "-DLS_RADIUS=11")
    assert bad.returncode != 0
    assert "LS_RADIUS must be in 1..10" in bad.stderr


# --------------------------------------------------------------------------- kernel arithmetic


def kernel_emulation(x: np.ndarray, y: np.ndarray, params: SSIMParams, scale: float = 1.0) -> Any:
    """The kernel's float32 arithmetic in numpy: data centred on L/2, the four moments (E[xc],
    E[yc], E[xc^2 + yc^2], E[d^2]) through the symmetric separable window with reflected
    borders, then the closed form. Not bit-exact (the GPU fuses multiply-adds)."""
    f = np.float32
    r = params.radius
    w = params.kernel().astype(np.float32)
    half = f(0.5 * params.data_range)
    xs = np.pad(x.astype(np.float32) * f(scale), r, mode="symmetric") - half
    ys = np.pad(y.astype(np.float32), r, mode="symmetric") - half
    h, wd = x.shape

    def blur(a: np.ndarray) -> np.ndarray:
        acc = w[r] * a[:, r : r + wd]
        for j in range(1, r + 1):
            acc = acc + w[r + j] * (a[:, r - j : r - j + wd] + a[:, r + j : r + j + wd])
        out = w[r] * acc[r : r + h]
        for j in range(1, r + 1):
            out = out + w[r + j] * (acc[r - j : r - j + h] + acc[r + j : r + j + h])
        return out

    d = xs - ys
    mx, my, e1, edd = blur(xs), blur(ys), blur(xs * xs + ys * ys), blur(d * d)
    md2 = (mx - my) * (mx - my)
    q = edd - md2
    v = e1 - mx * mx - my * my + f(params.c2)
    a = f(2) * ((mx + half) * (my + half)) + f(params.c1)
    return f(1) - (a * (v - q)) / ((a + md2) * v)


def exact_residual(x: np.ndarray, y: np.ndarray, params: SSIMParams) -> Any:
    """1 - SSIM in float64 with the same window and border: the precision reference."""
    k = params.kernel()

    def blur(a: np.ndarray) -> np.ndarray:
        out: np.ndarray = cv2.sepFilter2D(a, cv2.CV_64F, k, k, borderType=cv2.BORDER_REFLECT)
        return out

    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    mx, my = blur(x64), blur(y64)
    vx, vy, cxy = blur(x64 * x64) - mx * mx, blur(y64 * y64) - my * my, blur(x64 * y64) - mx * my
    num = (2 * mx * my + params.c1) * (2 * cxy + params.c2)
    return 1 - num / ((mx * mx + my * my + params.c1) * (vx + vy + params.c2))


def textured_pairs(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inputs and reconstructions like the daemon's: noise, texture, near-perfect, tiny."""
    noise = rng.random((70, 101), dtype=np.float32)
    yy, xx = np.mgrid[0:64, 0:96]
    weave = (0.5 + 0.3 * np.sin(xx / 3.0) * np.cos(yy / 4.0)).astype(np.float32)
    return [
        (noise, rng.random((70, 101), dtype=np.float32)),
        (weave, (weave + rng.normal(0, 0.02, weave.shape)).astype(np.float32)),
        (noise, (noise + rng.normal(0, 0.005, noise.shape)).astype(np.float32)),
        (rng.random((3, 7), dtype=np.float32), rng.random((3, 7), dtype=np.float32)),
    ]


def flat_pairs(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Flat 8-bit webs near black and white, nearly perfectly reconstructed: the worst case for
    float32 moments (variances far below C2, means far from 0.5)."""
    out = []
    for level in (0, 3, 252, 255):
        q = np.full((64, 64), level, np.uint8)
        q[::7, ::5] = level + 1 if level < 255 else 254
        x = q.astype(np.float32) * np.float32(1 / 255)
        out.append((x, (x + rng.normal(0, 2e-3, x.shape)).astype(np.float32)))
    return out


def test_kernel_arithmetic_agrees_with_cpu_residual() -> None:
    """The kernel's arithmetic is within 1e-4 of the CPU residual (and 1e-5 of float64) on
    textured data and on flat webs near black and white, float32's worst case."""
    rng = np.random.default_rng(0)
    params = SSIMParams()
    for x, y in [*textured_pairs(rng), *flat_pairs(rng)]:
        got = kernel_emulation(x, y, params)
        assert np.abs(got - ssim_residual(x, y, params)).max() <= 1e-4
        assert np.abs(got - exact_residual(x, y, params)).max() <= 1e-5


# --------------------------------------------------------------------------- kernel on the CPU

# The kernel source itself, compiled as C++ and run on the CPU: one std::thread per CUDA thread,
# a std::barrier for __syncthreads, blocks one after another (so block-local statics behave as
# shared memory). Slow, so only small images; it checks the kernel's indexing, apron, borders,
# pitches and input types wherever a C++20 compiler is installed, GPU or not.
HOST_HARNESS = r"""
#include <barrier>
#include <thread>
#include <vector>
struct Dim { int x = 0, y = 0, z = 0; };
thread_local Dim threadIdx, blockIdx;
static std::barrier<>* g_barrier = nullptr;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __constant__
#define __launch_bounds__(n)
#define __syncthreads() g_barrier->arrive_and_wait()
#include KERNEL_SOURCE
#define API extern "C" __attribute__((visibility("default")))

template <typename T, typename K>
static void launch(K kernel, const void* x, const float* y, float* out, int h, int w, int xp,
                   int yp, int op, float scale, float half, float c1, float c2) {
    const int gx = (w + LS_TILE_W - 1) / LS_TILE_W, gy = (h + LS_TILE_H - 1) / LS_TILE_H;
    for (int by = 0; by < gy; ++by) {
        for (int bx = 0; bx < gx; ++bx) {
            std::barrier<> bar(LS_BLOCK_X * LS_BLOCK_Y);
            g_barrier = &bar;
            std::vector<std::thread> threads;
            for (int ty = 0; ty < LS_BLOCK_Y; ++ty) {
                for (int tx = 0; tx < LS_BLOCK_X; ++tx) {
                    threads.emplace_back([=] {
                        threadIdx = Dim{tx, ty, 0};
                        blockIdx = Dim{bx, by, 0};
                        kernel(static_cast<const T*>(x), y, out, h, w, xp, yp, op, scale, half,
                               c1, c2);
                    });
                }
            }
            for (auto& t : threads) t.join();
        }
    }
}

API void set_window(const float* w, int n) {
    for (int i = 0; i < n; ++i) c_window[i] = w[i];
}
API void run(int kind, const void* x, const float* y, float* o, int h, int w, int xp, int yp,
             int op, float s, float half, float c1, float c2) {
    if (kind == 0)
        launch<unsigned char>(ssim_residual_u8, x, y, o, h, w, xp, yp, op, s, half, c1, c2);
    if (kind == 1)
        launch<unsigned short>(ssim_residual_u16, x, y, o, h, w, xp, yp, op, s, half, c1, c2);
    if (kind == 2)
        launch<float>(ssim_residual_f32, x, y, o, h, w, xp, yp, op, s, half, c1, c2);
}
"""
CXX = shutil.which("g++") or shutil.which("clang++")


class HostKernel:
    """ssim_residual.cu compiled for the CPU, one shared library per window radius."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.libs: dict[int, ctypes.CDLL] = {}
        (workdir / "harness.cpp").write_text(HOST_HARNESS)

    def lib(self, radius: int) -> ctypes.CDLL:
        if radius not in self.libs:
            assert CXX is not None
            so = self.workdir / f"kernel_r{radius}.so"
            # Hidden symbols and no GNU_UNIQUE statics: libraries for several radii live in one
            # process without sharing their "shared memory" arrays.
            run = subprocess.run(
                [CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-fvisibility=hidden",
                 "-fno-gnu-unique", "-Wno-unknown-pragmas", f"-DLS_RADIUS={radius}",
                 f'-DKERNEL_SOURCE="{KERNEL_FILE}"', "-o", str(so),
                 str(self.workdir / "harness.cpp")],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            if run.returncode != 0:
                pytest.skip(f"cannot build the CPU harness with {CXX}: {run.stderr[-300:]}")
            self.libs[radius] = ctypes.CDLL(str(so))
        return self.libs[radius]

    def residual(
        self, x: np.ndarray, y: np.ndarray, params: SSIMParams, scale: float = 1.0
    ) -> np.ndarray:
        lib = self.lib(params.radius)
        kind = {np.uint8: 0, np.uint16: 1, np.float32: 2}[x.dtype.type]
        yc = np.ascontiguousarray(y, dtype=np.float32)
        h, w = yc.shape
        if x.shape != (h, w) or x.strides[1] != x.itemsize:
            raise ValueError("x must have y's shape and contiguous rows")
        out = np.full((h, w), np.nan, np.float32)
        k = params.kernel().astype(np.float32)
        lib.set_window(k.ctypes.data_as(ctypes.c_void_p), ctypes.c_int(k.size))
        i, f = ctypes.c_int, ctypes.c_float
        lib.run(
            i(kind), ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(yc.ctypes.data),
            ctypes.c_void_p(out.ctypes.data), i(h), i(w), i(x.strides[0] // x.itemsize), i(w),
            i(w), f(scale), f(0.5 * params.data_range), f(params.c1), f(params.c2),
        )  # fmt: skip
        return out


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory: pytest.TempPathFactory) -> HostKernel:
    if CXX is None:
        pytest.skip("no C++ compiler (g++ or clang++) on the PATH")
    return HostKernel(tmp_path_factory.mktemp("host-kernel"))


def test_kernel_source_on_cpu_matches_cpu_residual(host_kernel: HostKernel) -> None:
    """The kernel source, run on the CPU, equals the CPU residual within 1e-4 (and float64
    within 1e-5) on textures, flat black/white webs and tiny images."""
    rng = np.random.default_rng(10)
    params = SSIMParams()
    for x, y in [*textured_pairs(rng), *flat_pairs(rng)]:
        got = host_kernel.residual(x, y, params)
        assert np.abs(got - ssim_residual(x, y, params)).max() <= 1e-4
        assert np.abs(got - exact_residual(x, y, params)).max() <= 1e-5


def test_kernel_source_on_cpu_shapes_types_and_pitch(host_kernel: HostKernel) -> None:
    """Every shape (1x1, single rows/columns, tile multiples), uint8/uint16 input scaled in the
    kernel, and a row pitch wider than the image (a view of a band) give the CPU's residual."""
    rng = np.random.default_rng(11)
    params = SSIMParams()
    for shape in [(1, 1), (1, 50), (50, 1), (32, 64), (33, 31)]:
        x, y = rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32)
        assert (
            np.abs(host_kernel.residual(x, y, params) - ssim_residual(x, y, params)).max() <= 1e-4
        )
    for dtype, bits in ((np.uint8, 8), (np.uint16, 12)):
        q = rng.integers(0, 2**bits, size=(45, 77)).astype(dtype)
        scale = 1.0 / (2**bits - 1)
        xf = q.astype(np.float32) * np.float32(scale)
        y = np.clip(xf + rng.normal(0, 0.05, xf.shape), 0, 1).astype(np.float32)
        got = host_kernel.residual(q, y, params, scale=scale)
        assert np.abs(got - ssim_residual(xf, y, params)).max() <= 1e-4
    band = rng.random((40, 100), dtype=np.float32)
    view, y = band[:, 10:80], rng.random((40, 70), dtype=np.float32)
    got = host_kernel.residual(view, y, params)
    assert np.abs(got - ssim_residual(np.ascontiguousarray(view), y, params)).max() <= 1e-4


@pytest.mark.parametrize(
    "params",
    [SSIMParams(window=3), SSIMParams(window=7), SSIMParams(window=21), SSIMParams(gaussian=False)],
    ids=["K3", "K7", "K21", "uniform"],
)
def test_kernel_source_on_cpu_other_windows(host_kernel: HostKernel, params: SSIMParams) -> None:
    """Other window sizes (compiled radius) and the uniform window agree with the CPU."""
    rng = np.random.default_rng(12)
    x = rng.random((50, 70), dtype=np.float32)
    y = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
    assert np.abs(host_kernel.residual(x, y, params) - ssim_residual(x, y, params)).max() <= 1e-4


# --------------------------------------------------------------------------- engine cache


def key(**changes: Any) -> EngineKey:
    parts: dict[str, Any] = {
        "onnx_sha256": "a" * 64,
        "tensorrt_version": "10.13.0",
        "gpu_name": "NVIDIA H200",
        "compute_capability": "9.0",
        "fp16": True,
        "max_batch": 256,
        "opt_batch": 64,
    }
    parts.update(changes)
    return EngineKey(**parts)


@pytest.mark.parametrize(
    "change",
    [
        {"onnx_sha256": "b" * 64},
        {"tensorrt_version": "10.14.1"},
        {"gpu_name": "NVIDIA GeForce RTX 4090"},
        {"compute_capability": "8.9"},
        {"fp16": False},
        {"max_batch": 128},
        {"opt_batch": 32},
    ],
    ids=lambda c: next(iter(c)),
)
def test_key_changes_with_each_part(tmp_path: Path, change: dict[str, Any]) -> None:
    """Every part of the key changes the digest and so the engine's file name."""
    assert key(**change).digest() != key().digest()
    assert engine_path(tmp_path, "m", key(**change)) != engine_path(tmp_path, "m", key())


def test_key_is_stable_and_named_after_the_bundle(tmp_path: Path) -> None:
    """Equal parts give equal digests; the file is <bundle>-<16 hex>.plan."""
    assert key().digest() == key().digest()
    path = engine_path(tmp_path, "carpet v2", key())
    assert path.name == f"carpet-v2-{key().digest()[:16]}.plan"
    assert sidecar_path(path).name == f"carpet-v2-{key().digest()[:16]}.plan.json"


def test_key_rejects_bad_parts() -> None:
    """A malformed ONNX digest or an opt batch above the max is refused."""
    with pytest.raises(EngineError, match="sha256"):
        key(onnx_sha256="not-a-digest")
    with pytest.raises(EngineError, match="opt_batch"):
        key(opt_batch=512)


def test_lookup_finds_a_stored_engine(tmp_path: Path) -> None:
    """A stored engine is found for the same key, and only for it."""
    assert lookup(tmp_path, "m", key()) is None
    plan = store(tmp_path, "m", key(), b"plan bytes")
    assert lookup(tmp_path, "m", key()) == plan
    assert lookup(tmp_path, "m", key(fp16=False)) is None
    assert json.loads(sidecar_path(plan).read_text())["key"] == key().parts()


def test_lookup_refuses_a_foreign_sidecar(tmp_path: Path) -> None:
    """An engine whose sidecar names another GPU (copied from another machine) is not used."""
    plan = store(tmp_path, "m", key(), b"plan bytes")
    side = json.loads(sidecar_path(plan).read_text())
    side["key"]["gpu_name"] = "NVIDIA A100"
    sidecar_path(plan).write_text(json.dumps(side))
    assert lookup(tmp_path, "m", key()) is None
    reason = why_not_usable(plan, key())
    assert reason is not None
    assert "gpu_name" in reason


def test_lookup_refuses_damaged_or_unexplained_engines(tmp_path: Path) -> None:
    """A replaced plan file, or a plan without its sidecar, is never loaded."""
    plan = store(tmp_path, "m", key(), b"plan bytes")
    plan.write_bytes(b"other bytes")
    assert lookup(tmp_path, "m", key()) is None
    store(tmp_path, "m", key(), b"plan bytes")
    sidecar_path(plan).unlink()
    assert lookup(tmp_path, "m", key()) is None
    sidecar_path(plan).write_text("{not json")
    assert lookup(tmp_path, "m", key()) is None


def test_stale_engines_are_listed(tmp_path: Path) -> None:
    """Engines of the same bundle under other keys are reported as stale."""
    old = store(tmp_path, "m", key(onnx_sha256="c" * 64), b"old")
    store(tmp_path, "m", key(), b"new")
    store(tmp_path, "other", key(onnx_sha256="d" * 64), b"x")
    assert other_engines(tmp_path, "m", key()) == [old]


def test_timing_cache_is_per_gpu_and_version(tmp_path: Path) -> None:
    """One timing cache per GPU model and TensorRT version, shared by models and flags."""
    assert timing_cache_path(tmp_path, key()) == timing_cache_path(tmp_path, key(fp16=False))
    assert timing_cache_path(tmp_path, key()) != timing_cache_path(
        tmp_path, key(gpu_name="NVIDIA L4")
    )
    assert timing_cache_path(tmp_path, key()) != timing_cache_path(
        tmp_path, key(tensorrt_version="10.14")
    )


def test_engines_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$LINESCAN_ENGINES overrides the default engine directory."""
    monkeypatch.setenv("LINESCAN_ENGINES", str(tmp_path))
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    assert default_engines_dir() == tmp_path


def test_engines_dir_under_systemd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Under the shipped unit (StateDirectory=linescan, ProtectSystem=strict) the install tree
    is read-only, so engines are built into $STATE_DIRECTORY/engines, beside the journal."""
    monkeypatch.delenv("LINESCAN_ENGINES", raising=False)
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}:/var/lib/other")
    assert default_engines_dir() == tmp_path / "engines"
    monkeypatch.delenv("STATE_DIRECTORY")
    assert default_engines_dir() != tmp_path / "engines"


# --------------------------------------------------------------------------- missing extras


needs_no_tensorrt = pytest.mark.skipif(has_module("tensorrt"), reason="tensorrt is installed")


def trt_like(version: str, **attrs: Any) -> Any:
    """The two TensorRT module attributes the build's version logic reads, for one release."""
    flags = SimpleNamespace(STRONGLY_TYPED=1)
    return SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=flags, **attrs)


@pytest.mark.parametrize(
    ("version", "flags"), [("10.13.0.35", 1 << 1), ("11.4.0.106", 0), ("12.0.0", 0)]
)
def test_network_is_strongly_typed_on_every_tensorrt(version: str, flags: int) -> None:
    """TensorRT 10 is asked for a strongly typed network (precision from the ONNX file, as
    TensorRT 11 always does); 11+ gets no flag, since it deprecated and ignores it."""
    from linescan.backends.tensorrt import network_flags

    assert network_flags(trt_like(version)) == flags


def test_fp16_resolution_without_the_removed_query() -> None:
    """TensorRT 11 dropped ``platform_has_fast_fp16``: auto and fp16 still mean FP16 there;
    a TensorRT 10 GPU without fast FP16 builds FP32; fp32 is always FP32."""
    from linescan.backends.tensorrt import resolve_fp16

    trt11_builder = SimpleNamespace()
    assert resolve_fp16("auto", trt11_builder) is True
    assert resolve_fp16("fp16", trt11_builder) is True
    assert resolve_fp16("fp32", trt11_builder) is False
    slow = SimpleNamespace(platform_has_fast_fp16=False)
    assert resolve_fp16("auto", slow) is False
    with pytest.raises(EngineError, match="precision must be one of"):
        resolve_fp16("int8", trt11_builder)


@needs_no_tensorrt
def test_build_engine_without_tensorrt_says_how_to_install(tmp_path: Path) -> None:
    """`linescan build-engine` without TensorRT prints the pip command and exits non-zero."""
    bundle = make_bundle(tmp_path / "b")
    run = subprocess.run(
        [sys.executable, "-m", "linescan.cli", "build-engine", "--model", str(bundle)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode != 0
    assert GPU_HINT in run.stderr
    assert "Traceback" not in run.stderr


@needs_no_tensorrt
def test_tensorrt_backend_without_tensorrt(tmp_path: Path) -> None:
    """Choosing the tensorrt backend without TensorRT is an EngineError naming the fix."""
    bundle = load_bundle(make_bundle(tmp_path / "b"))
    with pytest.raises(EngineError, match=r"pip install 'linescan\[gpu\]'"):
        create_backend(bundle, "tensorrt")


@pytest.mark.skipif(has_module("pycuda"), reason="pycuda is installed")
def test_cuda_residual_without_pycuda() -> None:
    """The fused residual without pycuda is an EngineError naming the fix."""
    from linescan.backends.cuda_residual import CudaResidual

    with pytest.raises(EngineError, match=r"pip install 'linescan\[gpu\]'"):
        CudaResidual()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_torch_cuda_backend_without_cuda(tmp_path: Path) -> None:
    """The torch-cuda backend on a machine without CUDA is an EngineError, not a crash."""
    bundle = load_bundle(make_bundle(tmp_path / "b"))
    with pytest.raises(EngineError, match="CUDA is not available"):
        create_backend(bundle, "torch-cuda")


# --------------------------------------------------------------------------- GPU parity


def pycuda_gpu() -> None:
    """Skip unless pycuda is installed and sees an NVIDIA GPU."""
    cuda = pytest.importorskip("pycuda.driver", reason="pycuda is not installed")
    try:
        cuda.init()
        count = cuda.Device.count()
    except cuda.Error:
        count = 0
    if count == 0:
        pytest.skip("no NVIDIA GPU")


needs_torch_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no NVIDIA GPU (torch.cuda.is_available() is False)"
)


@pytest.fixture(scope="module")
def cuda_residual() -> Any:
    pycuda_gpu()
    from linescan.backends.cuda_residual import CudaResidual

    res = CudaResidual(SSIMParams())
    yield res
    res.close()


@pytest.mark.gpu
def test_cuda_residual_matches_cpu(cuda_residual: Any) -> None:
    """The fused kernel equals the CPU residual within 1e-4 on textured data, any shape."""
    rng = np.random.default_rng(3)
    params = SSIMParams()
    pairs = [*textured_pairs(rng), (rng.random((1000, 333), dtype=np.float32),) * 2]
    for x, y in pairs:
        got = cuda_residual.residual(x, y)
        assert got.shape == x.shape
        assert np.abs(got - ssim_residual(x, y, params)).max() <= 1e-4
        assert np.abs(got - exact_residual(x, y, params)).max() <= 1e-5


@pytest.mark.gpu
def test_cuda_residual_integer_input(cuda_residual: Any) -> None:
    """uint8 and uint16 camera pixels with the bundle's scale equal the normalised CPU path."""
    rng = np.random.default_rng(4)
    params = SSIMParams()
    for dtype, bits in ((np.uint8, 8), (np.uint16, 12), (np.uint16, 16)):
        q = rng.integers(0, 2**bits, size=(129, 257)).astype(dtype)
        scale = np.float32(1.0 / (2**bits - 1))
        x = q.astype(np.float32) * scale
        y = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
        got = cuda_residual.residual(q, y, scale=float(scale))
        assert np.abs(got - ssim_residual(x, y, params)).max() <= 1e-4


@pytest.mark.gpu
def test_cuda_residual_flat_extremes_match_float64(cuda_residual: Any) -> None:
    """On flat webs near black and white (float32's worst case) the kernel stays within 1e-5
    of float64 and 1e-4 of the CPU."""
    rng = np.random.default_rng(5)
    params = SSIMParams()
    for x, y in flat_pairs(rng):
        got = cuda_residual.residual(x, y)
        assert np.abs(got - exact_residual(x, y, params)).max() <= 1e-5
        assert np.abs(got - ssim_residual(x, y, params)).max() <= 1e-4


@pytest.fixture(scope="module")
def gpu_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu-bundles")
    return {loss: make_bundle(root / loss, loss) for loss in ("ssim", "vae")}


def cpu_reference(bundle_dir: Path, x: np.ndarray) -> Any:
    return TorchBackend(load_bundle(bundle_dir), precision="fp32").infer(x)


@pytest.mark.gpu
@needs_torch_gpu
@pytest.mark.parametrize("loss", ["ssim", "vae"])
def test_torch_cuda_matches_cpu(gpu_bundles: dict[str, Path], loss: str) -> None:
    """torch-cuda fp32 (CUDA graphs, padded partial batches) equals the CPU within 1e-4."""
    from linescan.backends.torch_cuda import TorchCudaBackend

    bundle = load_bundle(gpu_bundles[loss])
    backend = TorchCudaBackend(bundle, precision="fp32", max_batch=16)
    rng = np.random.default_rng(6)
    for b in (1, 3, 16, 37):  # 3 pads to 4; 37 runs as 16 + 16 + 5 (padded to 8)
        x = rng.random((b, 1, PATCH, PATCH), dtype=np.float32)
        got = backend.infer(x)
        assert np.abs(got - cpu_reference(gpu_bundles[loss], x)).max() <= 1e-4
    backend.close()


@pytest.mark.gpu
@needs_torch_gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_cuda_half_precision_is_close(gpu_bundles: dict[str, Path], precision: str) -> None:
    """fp16/bf16 autocast reconstructions stay close to fp32 (a sanity bound, not parity)."""
    from linescan.backends.torch_cuda import TorchCudaBackend

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    bundle = load_bundle(gpu_bundles["ssim"])
    x = np.random.default_rng(7).random((8, 1, PATCH, PATCH), dtype=np.float32)
    want = cpu_reference(gpu_bundles["ssim"], x)
    got = TorchCudaBackend(bundle, precision=precision).infer(x)
    tol = (2e-2 if precision == "fp16" else 1e-1) * max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= tol


@pytest.fixture(scope="module")
def trt_ready(gpu_bundles: dict[str, Path]) -> dict[str, Path]:
    """Bundles exported to ONNX, once TensorRT, pycuda and a GPU are known to be there."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    pytest.importorskip("onnx", reason="the onnx extra is not installed")
    pycuda_gpu()
    from linescan.export import export_onnx

    for path in gpu_bundles.values():
        export_onnx(path)
    return gpu_bundles


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["ssim", "vae"])
def test_tensorrt_matches_cpu(trt_ready: dict[str, Path], tmp_path: Path, loss: str) -> None:
    """The fp32 engine equals torch on the CPU within 1e-4, across chunked, pipelined batches."""
    from linescan.backends.tensorrt import TensorRTBackend

    bundle = load_bundle(trt_ready[loss])
    backend = TensorRTBackend(
        bundle, precision="fp32", max_batch=16, opt_batch=8, engines_dir=tmp_path
    )
    rng = np.random.default_rng(8)
    for b in (1, 5, 16, 40):  # 40 runs as three chunks with two in flight
        x = rng.random((b, 1, PATCH, PATCH), dtype=np.float32)
        assert np.abs(backend.infer(x) - cpu_reference(trt_ready[loss], x)).max() <= 1e-4
    backend.close()


@pytest.mark.gpu
def test_tensorrt_fp16_engine_from_fp16_export(trt_ready: dict[str, Path], tmp_path: Path) -> None:
    """The FP16 engine is built from model.fp16.onnx (strongly typed: TensorRT 11 has no FP16
    flag), keyed by that file's checksum, and lands within FP16 rounding of the CPU."""
    from linescan.backends.tensorrt import TensorRTBackend

    bundle = load_bundle(trt_ready["ssim"])
    backend = TensorRTBackend(
        bundle, precision="fp16", max_batch=8, opt_batch=8, engines_dir=tmp_path
    )
    assert backend.precision == "fp16"
    side = json.loads(sidecar_path(backend.engine_path).read_text())
    assert side["key"]["onnx_sha256"] == read_meta(trt_ready["ssim"]).onnx_fp16_sha256
    x = np.random.default_rng(10).random((8, 1, PATCH, PATCH), dtype=np.float32)
    diff = np.abs(backend.infer(x) - cpu_reference(trt_ready["ssim"], x)).max()
    assert 0 < diff <= 1e-2
    backend.close()


@pytest.mark.gpu
def test_tensorrt_two_batches_in_flight(trt_ready: dict[str, Path], tmp_path: Path) -> None:
    """Two batches enqueued before either is collected come back intact and in order."""
    from linescan.backends.tensorrt import TensorRTBackend

    bundle = load_bundle(trt_ready["ssim"])
    backend = TensorRTBackend(
        bundle, precision="fp32", max_batch=8, opt_batch=8, engines_dir=tmp_path
    )
    rng = np.random.default_rng(9)
    a = rng.random((8, 1, PATCH, PATCH), dtype=np.float32)
    b = rng.random((3, 1, PATCH, PATCH), dtype=np.float32)
    pa, pb = backend.infer_async(a), backend.infer_async(b)
    c = rng.random((2, 1, PATCH, PATCH), dtype=np.float32)
    pc = backend.infer_async(c)  # reuses a's slot: a must have been collected first
    for pending, x in ((pa, a), (pb, b), (pc, c)):
        assert np.abs(pending.result() - cpu_reference(trt_ready["ssim"], x)).max() <= 1e-4
    backend.close()


@pytest.mark.gpu
def test_tensorrt_engine_cache_reuse_and_rebuild(
    trt_ready: dict[str, Path], tmp_path: Path
) -> None:
    """A second start reuses the cached engine; a foreign sidecar makes it rebuild."""
    from linescan.backends.tensorrt import build_engine

    plan = build_engine(trt_ready["ssim"], max_batch=8, opt_batch=4, engines_dir=tmp_path)
    stamp = plan.stat().st_mtime_ns
    assert build_engine(trt_ready["ssim"], max_batch=8, opt_batch=4, engines_dir=tmp_path) == plan
    assert plan.stat().st_mtime_ns == stamp
    side = json.loads(sidecar_path(plan).read_text())
    side["key"]["gpu_name"] = "some other GPU"
    sidecar_path(plan).write_text(json.dumps(side))
    assert build_engine(trt_ready["ssim"], max_batch=8, opt_batch=4, engines_dir=tmp_path) == plan
    assert json.loads(sidecar_path(plan).read_text())["key"]["gpu_name"] != "some other GPU"
    assert any(p.name.startswith("timing-") for p in tmp_path.iterdir())
