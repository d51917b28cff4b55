#!/usr/bin/env python3
"""Verify and measure linescan's GPU path on a machine with an NVIDIA GPU, in one run.

    python tools/gpu_check.py --out gpu.json [--model BUNDLE] [--budget 270]

What it does, each step on its own (a step that cannot run says why and the rest go on):

1. environment: torch/CUDA/GPU, TensorRT, pycuda, nvcc;
2. a model: ``--model`` or a small SSIM autoencoder trained for one epoch on a synthetic woven
   web (patch 128, latent 100: the paper's network; its weights do not matter for timing),
   plus a tiny VAE for the N-sample path; both exported to ONNX and checked with onnxruntime;
3. parity with the CPU path: torch-cuda fp32/fp16/bf16 and TensorRT fp32/fp16 against torch
   on the CPU, the fused CUDA SSIM kernel against the CPU residual (textures, flat black/white
   webs, uint8/uint16 input, a 4096x1024 frame);
4. speed: tiles/s per backend and precision at batch 64 and 256; the kernel's Gpx/s on a
   4096x1024 frame (CUDA events, device-resident); end-to-end Mpx/s on a 4096-wide web at
   stride 30/64/128 (frame -> tiles -> engine -> stitch -> residual -> regions), with the CPU
   and the CUDA residual; the daemon (``linescan demo`` machinery) at stride 64;
5. the ``gpu``-marked pytest tests.

It prints a table and writes everything (including failures) to ``--out`` as JSON after every
step, so a run cut short still leaves its results. Steps that would overrun ``--budget``
seconds are skipped, so the whole run stays under five minutes on one GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FRAME_H, FRAME_W = 1024, 4096  # the kernel and end-to-end frame: 4096-wide web
LINE_RATE_GOAL_MPX = 204.8  # 4096 px x 50 kHz
KERNEL_GOAL_GPX = 50.0


class SkipStepError(Exception):
    """A step that cannot run here; the message says why."""


class Report:
    """Results, step statuses and the time budget; saved after every step."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.data: dict[str, Any] = {
            "tool": "tools/gpu_check.py",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "steps": {},
            "env": {},
            "parity": {},
            "tiles_per_s": {},
            "kernel": {},
            "end_to_end": {},
            "daemon": {},
            "pytest": {},
        }

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def step(self, name: str, fn: Callable[[], Any], need_s: float = 0.0) -> Any:
        if self.remaining() < need_s:
            self._record(name, "skipped", 0.0, f"time budget: {self.remaining():.0f} s left")
            return None
        t = time.monotonic()
        print(f"-- {name} ...", flush=True)
        try:
            result = fn()
        except SkipStepError as exc:
            self._record(name, "skipped", time.monotonic() - t, str(exc))
            return None
        except Exception as exc:  # every failure is a result to report, not a crash
            tb = traceback.format_exc(limit=4).strip().splitlines()[-6:]
            self._record(name, "failed", time.monotonic() - t, f"{type(exc).__name__}: {exc}", tb)
            return None
        self._record(name, "ok", time.monotonic() - t, None)
        return result

    def _record(
        self,
        name: str,
        status: str,
        seconds: float,
        detail: str | None,
        tb: list[str] | None = None,
    ) -> None:
        entry: dict[str, Any] = {"status": status, "seconds": round(seconds, 2)}
        if detail:
            entry["detail"] = detail
        if tb:
            entry["traceback"] = tb
        self.data["steps"][name] = entry
        print(
            f"   {status}" + (f": {detail}" if detail else "") + f" ({seconds:.1f} s)", flush=True
        )
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.out)


# --------------------------------------------------------------------------- helpers


def ensure_nvcc_on_path() -> str | None:
    """nvcc for pycuda's kernel compile: PATH, /usr/local/cuda, or pip's nvidia-cuda-nvcc."""
    found = shutil.which("nvcc")
    if found:
        return found
    candidates = [Path("/usr/local/cuda/bin")]
    with contextlib.suppress(ImportError):
        import nvidia  # type: ignore[import-not-found]

        for base in getattr(nvidia, "__path__", []):
            candidates += [Path(base) / "cuda_nvcc" / "bin", Path(base) / "cu13" / "bin"]
    for d in candidates:
        if (d / "nvcc").is_file():
            os.environ["PATH"] = f"{d}{os.pathsep}{os.environ.get('PATH', '')}"
            return str(d / "nvcc")
    return None


def rand_tiles(b: int, p: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((b, 1, p, p), dtype=np.float32)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def tiles_per_s(backend: Any, batch: int, p: int, seconds: float = 1.2) -> float:
    x = rand_tiles(batch, p, seed=batch)
    for _ in range(3):  # graph capture, cuDNN autotuning, lazy allocations
        backend.infer(x)
    n, t = 0, time.perf_counter()
    while n < 5 or time.perf_counter() - t < seconds:
        backend.infer(x)
        n += 1
    return batch * n / (time.perf_counter() - t)


def woven_frame(height: int, width: int, seed: int = 3) -> np.ndarray:
    from linescan.data.synthetic import WovenWeb

    return np.asarray(WovenWeb(width, seed).lines(0, height), dtype=np.uint8)


# --------------------------------------------------------------------------- steps


def step_env(rep: Report) -> None:
    import torch

    env = rep.data["env"]
    env.update(
        python=sys.version.split()[0],
        platform=platform.platform(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        nvcc=ensure_nvcc_on_path(),
    )
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for mod in ("tensorrt", "pycuda", "onnxruntime"):
        try:
            m = __import__(mod)
            env[mod] = str(getattr(m, "__version__", "installed"))
        except Exception as exc:  # ImportError, or a broken install's OSError
            env[mod] = f"unavailable: {type(exc).__name__}: {exc}"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    if not torch.cuda.is_available():
        raise SkipStepError("torch sees no CUDA GPU: the torch-cuda checks will be skipped")


def step_model(rep: Report, work: Path, model: Path | None) -> dict[str, Path]:
    import torch

    from linescan.data.synthetic import write_synthetic_dataset
    from linescan.model.bundle import BundleMeta, build_module, save_bundle
    from linescan.preprocess import InputSpec
    from linescan.train import TrainConfig, train

    bundles: dict[str, Path] = {}
    if model is not None:
        # A copy: the checks export to ONNX and set a timing threshold inside the bundle.
        bundles["ae"] = Path(shutil.copytree(model, work / "model", ignore=_no_checkpoints))
    else:
        data = write_synthetic_dataset(work / "data", "woven", 6, 0, 0, (512, 1024), seed=1)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        res = train(
            TrainConfig(
                data=data, out=work / "ae128", loss="ssim", latent=100, patch=128, patches=512,
                epochs=1, batch=64, input=InputSpec(), device=device, holdout=0.0,
                checkpoint_every=0, name="gpu-check",
            ),
            log=io.StringIO(),
        )  # fmt: skip
        bundles["ae"] = res.bundle
    meta = BundleMeta(loss="vae", latent=8, patch=32, residual="vae", name="gpu-check-vae")
    save_bundle(work / "vae32", build_module(meta), meta)
    bundles["vae"] = work / "vae32"
    rep.data["model"] = {k: str(v) for k, v in bundles.items()}
    return bundles


def _no_checkpoints(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "checkpoints"]


def step_export(rep: Report, bundles: dict[str, Path]) -> None:
    from linescan.export import export_onnx, verify_onnx

    out = rep.data["parity"].setdefault("onnxruntime_vs_torch_cpu", {})
    for name, path in bundles.items():
        export_onnx(path)
        out[name] = verify_onnx(path)
        out[f"{name}_fp16_export"] = verify_onnx(path, precision="fp16")


def set_threshold(bundles: dict[str, Path]) -> float:
    """A threshold for timing runs: above the residual of a defect-free frame (no regions)."""
    import torch

    from linescan.backends import create_backend
    from linescan.model.bundle import load_bundle, update_meta
    from linescan.pipeline import Settings, reconstruct

    b = load_bundle(bundles["ae"])
    backend = create_backend(b, "torch-cuda" if torch.cuda.is_available() else "torch", "fp32")
    rec = reconstruct(woven_frame(512, 1024, seed=11), b.meta, backend, Settings(max_batch=256))
    backend.close()
    thr = float(rec.score.max()) * 1.2 + 1e-3  # the score is what the threshold applies to
    update_meta(bundles["ae"], threshold=thr)
    return thr


def step_torch_cuda(rep: Report, bundles: dict[str, Path]) -> None:
    import torch

    from linescan.backends.torch_cpu import TorchBackend
    from linescan.backends.torch_cuda import TorchCudaBackend
    from linescan.model.bundle import load_bundle

    if not torch.cuda.is_available():
        raise SkipStepError("no CUDA GPU visible to torch")
    parity = rep.data["parity"].setdefault("torch_cuda_vs_torch_cpu", {})
    for name, path in bundles.items():
        b = load_bundle(path)
        p = b.meta.patch
        x = rand_tiles(37, p, seed=5)  # 37: chunks and a padded partial batch
        want = TorchBackend(b, precision="fp32").infer(x)
        for prec in ("fp32", "fp16", "bf16"):
            if prec == "bf16" and not torch.cuda.is_bf16_supported():
                continue
            be = TorchCudaBackend(b, precision=prec, max_batch=16)
            parity[f"{name}/{prec}"] = max_diff(be.infer(x), want)
            be.close()
    b = load_bundle(bundles["ae"])
    for prec in ("fp32", "fp16", "bf16"):
        if prec == "bf16" and not torch.cuda.is_bf16_supported():
            continue
        be = TorchCudaBackend(b, precision=prec, max_batch=256)
        for batch in (64, 256):
            rep.data["tiles_per_s"][f"torch-cuda/{prec}/b{batch}"] = round(
                tiles_per_s(be, batch, b.meta.patch)
            )
        be.close()
    rep.data["parity"]["torch_cuda_fp32_within_1e-4"] = all(
        v <= 1e-4 for k, v in parity.items() if k.endswith("/fp32")
    )


def step_tensorrt(rep: Report, bundles: dict[str, Path], engines: Path) -> None:
    from linescan.backends.tensorrt import TensorRTBackend, import_tensorrt
    from linescan.backends.torch_cpu import TorchBackend
    from linescan.errors import EngineError
    from linescan.model.bundle import load_bundle

    try:
        import_tensorrt()
        import pycuda.driver  # noqa: F401
    except (EngineError, ImportError) as exc:
        raise SkipStepError(f"TensorRT path unavailable: {exc}") from exc
    parity = rep.data["parity"].setdefault("tensorrt_vs_torch_cpu", {})
    b = load_bundle(bundles["ae"])
    p = b.meta.patch
    x = rand_tiles(300, p, seed=6)  # > max_batch: chunked, two batches in flight
    want = TorchBackend(b, precision="fp32").infer(x)
    for prec in ("fp32", "fp16"):
        if rep.remaining() < 60:
            rep.data["tiles_per_s"][f"tensorrt/{prec}"] = "skipped: time budget"
            continue
        t = time.monotonic()
        be = TensorRTBackend(b, precision=prec, max_batch=256, opt_batch=64, engines_dir=engines)
        rep.data.setdefault("tensorrt_build_s", {})[prec] = round(time.monotonic() - t, 1)
        parity[f"ae/{be.precision}"] = max_diff(be.infer(x), want)
        for batch in (64, 256):
            rep.data["tiles_per_s"][f"tensorrt/{be.precision}/b{batch}"] = round(
                tiles_per_s(be, batch, p)
            )
        rep.data["tiles_per_s"][f"tensorrt/{be.precision}/b1024-pipelined"] = round(
            tiles_per_s(be, 1024, p)
        )
        be.close()
    vb = load_bundle(bundles["vae"])
    xv = rand_tiles(40, vb.meta.patch, seed=7)
    be = TensorRTBackend(vb, precision="fp32", max_batch=16, opt_batch=8, engines_dir=engines)
    parity["vae/fp32"] = max_diff(be.infer(xv), TorchBackend(vb, precision="fp32").infer(xv))
    be.close()
    rep.data["parity"]["tensorrt_fp32_within_1e-4"] = all(
        v <= 1e-4 for k, v in parity.items() if k.endswith("/fp32")
    )


def step_kernel(rep: Report) -> None:
    from linescan.backends.cuda_residual import CudaResidual
    from linescan.errors import EngineError
    from linescan.residual import ssim_residual
    from linescan.ssim import SSIMParams

    params = SSIMParams()
    try:
        res = CudaResidual(params)
    except EngineError as exc:
        raise SkipStepError(f"CUDA residual unavailable: {exc}") from exc
    rng = np.random.default_rng(0)
    parity: dict[str, float] = {}
    # Textures, near-perfect reconstructions, flat webs near black/white, odd shapes.
    cases: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    noise = rng.random((333, 517), dtype=np.float32)
    cases["noise"] = (noise, rng.random((333, 517), dtype=np.float32), 1.0)
    cases["near"] = (noise, (noise + rng.normal(0, 0.005, noise.shape)).astype(np.float32), 1.0)
    cases["tiny_3x7"] = (noise[:3, :7], noise[5:8, 9:16].copy(), 1.0)
    for level in (0, 255):
        q = np.full((200, 300), level, np.uint8)
        q[::7, ::5] = 1 if level == 0 else 254
        xf = q.astype(np.float32) / np.float32(255)
        cases[f"flat_u8_{level}"] = (
            q,
            (xf + rng.normal(0, 2e-3, q.shape)).astype(np.float32),
            1 / 255,
        )
    q16 = rng.integers(0, 4096, (257, 129)).astype(np.uint16)
    cases["u16_12bit"] = (q16, rng.random(q16.shape, dtype=np.float32), 1 / 4095)
    frame = woven_frame(FRAME_H, FRAME_W)
    xf = frame.astype(np.float32) * np.float32(1 / 255)
    recon = np.clip(xf + rng.normal(0, 0.02, xf.shape), 0, 1).astype(np.float32)
    cases["woven_4096x1024_u8"] = (frame, recon, 1 / 255)
    for name, (x, y, scale) in cases.items():
        ref_x = x.astype(np.float32) * np.float32(scale) if x.dtype != np.float32 else x
        parity[name] = max_diff(res.residual(x, y, scale=scale), ssim_residual(ref_x, y, params))
    rep.data["parity"]["cuda_residual_vs_cpu"] = parity
    rep.data["parity"]["cuda_residual_within_1e-4"] = all(v <= 1e-4 for v in parity.values())

    # Throughput, device-resident, timed with CUDA events.
    kern: dict[str, Any] = rep.data["kernel"]
    with res.context.active() as cuda:
        d_recon = cuda.to_device(recon)
        d_out = cuda.mem_alloc(recon.nbytes)
        for label, x in (("u8", frame), ("f32", xf)):
            d_x = cuda.to_device(np.ascontiguousarray(x))
            start, end = cuda.Event(), cuda.Event()

            def launch(d_x: Any = d_x, x: np.ndarray = x) -> None:
                res.launch(int(d_x), int(d_recon), int(d_out), FRAME_H, FRAME_W, x.dtype, 1 / 255)

            for _ in range(20):
                launch()
            iters = 400
            start.record(res.stream)
            for _ in range(iters):
                launch()
            end.record(res.stream)
            end.synchronize()
            ms = end.time_since(start)
            kern[f"gpx_per_s_{label}"] = round(FRAME_H * FRAME_W * iters / (ms / 1e3) / 1e9, 1)
            kern[f"us_per_frame_{label}"] = round(ms * 1e3 / iters, 1)
            d_x.free()
        d_recon.free()
        d_out.free()
    t = time.perf_counter()
    for _ in range(10):
        res.residual(frame, recon, scale=1 / 255)
    kern["host_path_ms_per_frame"] = round((time.perf_counter() - t) * 100, 2)
    kern["frame"] = f"{FRAME_W}x{FRAME_H}"
    kern["goal_gpx_per_s"] = KERNEL_GOAL_GPX
    kern["meets_goal"] = kern.get("gpx_per_s_u8", 0) > KERNEL_GOAL_GPX
    res.close()


def best_gpu_backend(rep: Report) -> tuple[str, str] | None:
    tps = rep.data["tiles_per_s"]
    for name, prec in (("tensorrt", "fp16"), ("torch-cuda", "fp16"), ("tensorrt", "fp32")):
        if isinstance(tps.get(f"{name}/{prec}/b256"), int | float):
            return name, prec
    return None


def step_end_to_end(rep: Report, bundles: dict[str, Path], engines: Path) -> None:
    from linescan.backends import create_backend
    from linescan.backends.tensorrt import TensorRTBackend
    from linescan.model.bundle import load_bundle
    from linescan.pipeline import segment
    from linescan.residual import compute_residual
    from linescan.tiling import TileGrid, cut_tiles, stitch

    choice = best_gpu_backend(rep)
    if choice is None:
        raise SkipStepError("no GPU backend ran")
    name, prec = choice
    rep.data["end_to_end"]["backend"] = f"{name}/{prec}"
    set_threshold(bundles)
    b = load_bundle(bundles["ae"])
    meta = b.meta
    if name == "tensorrt":
        backend: Any = TensorRTBackend(b, precision=prec, max_batch=256, engines_dir=engines)
    else:
        backend = create_backend(b, name, prec)
    cuda_res = None
    with contextlib.suppress(Exception):
        from linescan.backends.cuda_residual import CudaResidual

        cuda_res = CudaResidual(meta.ssim)
    frame = woven_frame(FRAME_H, FRAME_W, seed=5)
    scale = 1.0 / (2**meta.input.bit_depth - 1)
    threshold = float(meta.threshold or 0.5)
    for stride in (30, 64, 128):
        if stride > meta.patch:
            rep.data["end_to_end"][f"stride{stride}"] = f"skipped: above the patch ({meta.patch})"
            continue
        grid = TileGrid(meta.patch, stride)
        for residual in ("cpu", "cuda"):
            if residual == "cuda" and cuda_res is None:
                continue
            times: dict[str, list[float]] = {
                k: [] for k in ("tile", "infer", "stitch", "residual", "segment")
            }
            for rep_i in range(4):  # the first run warms up and is dropped
                t0 = time.perf_counter()
                x = meta.input.to_model(frame)
                h, w = x.shape
                ys, xs = grid.positions(h), grid.positions(w)
                tiles = cut_tiles(x, ys, xs, meta.patch)
                t1 = time.perf_counter()
                out = backend.infer(tiles)
                t2 = time.perf_counter()
                recon = stitch(out, ys, xs, h, w)
                t3 = time.perf_counter()
                if residual == "cuda" and cuda_res is not None:
                    r = cuda_res.residual(frame, recon[0], scale=scale)
                else:
                    r = compute_residual(meta.residual, x, recon, meta.ssim, meta.vae_sigma)
                t4 = time.perf_counter()
                segment(r, threshold, meta.input, FRAME_H, FRAME_W)
                t5 = time.perf_counter()
                if rep_i:
                    for k, a, z in (("tile", t0, t1), ("infer", t1, t2), ("stitch", t2, t3),
                                    ("residual", t3, t4), ("segment", t4, t5)):  # fmt: skip
                        times[k].append(z - a)
            ms = {k: round(1e3 * float(np.median(v)), 2) for k, v in times.items()}
            total = sum(ms.values())
            rep.data["end_to_end"][f"stride{stride}/{residual}-residual"] = {
                "tiles_per_frame": len(tiles),
                "ms_per_frame": round(total, 2),
                "mpx_per_s": round(FRAME_H * FRAME_W / (total / 1e3) / 1e6, 1),
                "breakdown_ms": ms,
            }
    rep.data["end_to_end"]["frame"] = f"{FRAME_W}x{FRAME_H} uint8, model scale 1:1"
    rep.data["end_to_end"]["goal_mpx_per_s_stride64"] = LINE_RATE_GOAL_MPX
    backend.close()
    if cuda_res is not None:
        cuda_res.close()


def step_daemon(rep: Report, bundles: dict[str, Path], engines: Path) -> None:
    from linescan.config import Config
    from linescan.demo import run_demo
    from linescan.model.bundle import load_bundle

    choice = best_gpu_backend(rep)
    if choice is None:
        raise SkipStepError("no GPU backend ran")
    name, prec = choice
    meta = load_bundle(bundles["ae"]).meta
    if meta.threshold is None:
        set_threshold(bundles)
    stride = min(64, meta.patch)
    # Capacity: overload "block" makes the sender wait instead of the daemon dropping frames,
    # so lines/s is what the daemon sustains. Then, if time allows, a run paced at the goal's
    # 50 kHz line rate with the default drop policy: drops and capture-to-event latency.
    runs = [("capacity", "block", 0.0), ("paced_50khz", "drop-newest", 50_000.0)]
    for label, overload, rate in runs:
        if label != "capacity" and rep.remaining() < 40:
            rep.data["daemon"][label] = "skipped: time budget"
            continue
        config = Config().with_overrides(
            {
                "engine": {"backend": name, "precision": prec},
                "inspection": {"stride": stride, "max_batch": 256},
                "metrics": {"enabled": False},
                "queues": {"overload": overload},
            }
        )
        out = io.StringIO()
        res = run_demo(config, bundles["ae"], lines=16_384, width=FRAME_W, frame_height=256,
                       defects=4, line_rate_hz=rate, out=out)  # fmt: skip
        lps = res.lines / max(res.seconds, 1e-9)
        rep.data["daemon"][label] = {
            "backend": f"{name}/{prec}",
            "stride": stride,
            "overload": overload,
            "line_rate_hz": rate or "as fast as accepted",
            "lines_inspected": res.lines,
            "seconds": round(res.seconds, 2),
            "lines_per_s": round(lps),
            "mpx_per_s": round(lps * FRAME_W / 1e6, 1),
            "latency_ms_p50": res.latency_ms(0.5),
            "latency_ms_p99": res.latency_ms(0.99),
            "final_status": res.final_status,
            "summary": out.getvalue().splitlines()[-12:],
        }
    rep.data["daemon"]["note"] = (
        "the simulator renders the web on the CPU, so capacity may be the simulator's; latency "
        "comes from defect events only (none found: null)"
    )


def step_pytest(rep: Report) -> None:
    timeout = max(30.0, rep.remaining() - 10)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rs",
         "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    tail = (run.stdout + run.stderr).strip().splitlines()
    rep.data["pytest"] = {"returncode": run.returncode, "tail": tail[-25:]}
    if run.returncode != 0:
        raise RuntimeError(f"pytest -m gpu failed: {tail[-1] if tail else run.returncode}")


# --------------------------------------------------------------------------- table


def print_table(rep: Report) -> None:
    d = rep.data
    print("\n================ linescan GPU check ================")
    env = d["env"]
    print(f"GPU {env.get('gpu')} (sm {env.get('compute_capability')}), torch {env.get('torch')} "
          f"CUDA {env.get('torch_cuda')}, TensorRT {env.get('tensorrt')}, "
          f"pycuda {env.get('pycuda')}")  # fmt: skip
    print("\nsteps")
    for name, s in d["steps"].items():
        print(f"  {name:<14} {s['status']:<8} {s['seconds']:>7.1f} s  {s.get('detail', '')}")
    print("\nparity (max |GPU - CPU|)")
    for group, vals in d["parity"].items():
        if isinstance(vals, dict):
            for k, v in vals.items():
                print(f"  {group:<28} {k:<22} {v:.2e}")
        else:
            print(f"  {group:<28} {vals}")
    print("\ntiles/s")
    for k, v in d["tiles_per_s"].items():
        print(f"  {k:<36} {v}")
    if d["kernel"]:
        k = d["kernel"]
        print(f"\nfused SSIM kernel on {k.get('frame')}: u8 {k.get('gpx_per_s_u8')} Gpx/s, "
              f"f32 {k.get('gpx_per_s_f32')} Gpx/s (goal > {KERNEL_GOAL_GPX}); "
              f"host path {k.get('host_path_ms_per_frame')} ms/frame")  # fmt: skip
    if d["end_to_end"]:
        print(f"\nend to end ({d['end_to_end'].get('backend')}), 4096-wide web")
        for k, v in d["end_to_end"].items():
            if isinstance(v, dict):
                print(f"  {k:<28} {v['mpx_per_s']:>8} Mpx/s  {v['ms_per_frame']:>8} ms/frame  "
                      f"{v['tiles_per_frame']} tiles  {v['breakdown_ms']}")  # fmt: skip
    for label, dm in d["daemon"].items():
        if isinstance(dm, dict):
            print(
                f"\ndaemon {label} stride {dm.get('stride')} ({dm.get('backend')}): "
                f"{dm.get('mpx_per_s')} Mpx/s, latency p50 {dm.get('latency_ms_p50')} ms "
                f"p99 {dm.get('latency_ms_p99')} ms"
            )
    if d["pytest"]:
        print("\npytest -m gpu: " + (d["pytest"]["tail"][-1] if d["pytest"]["tail"] else ""))
    print(f"\nwrote {rep.out} ({d['elapsed_s']} s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    ap.add_argument("--model", type=Path, default=None, help="bundle (default: train a small one)")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds for the whole run")
    ap.add_argument("--no-pytest", action="store_true", help="skip the pytest -m gpu step")
    a = ap.parse_args()
    rep = Report(a.out, a.budget)
    work = Path(tempfile.mkdtemp(prefix="linescan-gpu-check-"))
    engines = work / "engines"
    # The daemon step builds its backend from the config alone: point it at these engines.
    os.environ["LINESCAN_ENGINES"] = str(engines)
    rep.data["workdir"] = str(work)
    rep.step("env", lambda: step_env(rep))
    bundles = rep.step("model", lambda: step_model(rep, work, a.model))
    if bundles:
        rep.step("export", lambda: step_export(rep, bundles))
        rep.step("torch-cuda", lambda: step_torch_cuda(rep, bundles), need_s=30)
        rep.step("tensorrt", lambda: step_tensorrt(rep, bundles, engines), need_s=70)
    rep.step("kernel", lambda: step_kernel(rep), need_s=15)
    if bundles:
        rep.step("end-to-end", lambda: step_end_to_end(rep, bundles, engines), need_s=30)
        rep.step("daemon", lambda: step_daemon(rep, bundles, engines), need_s=45)
    if not a.no_pytest:
        rep.step("pytest-gpu", lambda: step_pytest(rep), need_s=40)
    rep.save()
    print_table(rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
