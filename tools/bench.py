#!/usr/bin/env python3
"""Performance benchmark: one run, one table, ratios measured side by side, and a JSON file.

    .venv/bin/python tools/bench.py [--quick] [--out bench.json] [--markdown]

What it measures (the Table I autoencoder, d = 100, 128x128 patches, batches of 64):

* the naive per-patch reference (a loop over windows, batch 1, fp32 eager NCHW, overlap-averaged,
  then a 2-D-convolution SSIM in torch: the way the public SSIM-autoencoder scripts do it)
  against our pipeline on the same 1024x700 image, with the largest residual difference;
* the SSIM residual of a 4096x1024 frame against scikit-image (and kornia / pytorch-msssim
  when installed), with the largest difference, border included;
* model tiles/s per backend and precision;
* offline end-to-end Mpx/s at stride 30, 64 and 128, and the 1024x700 image beside the paper's
  3.61 s (Tesla V100);
* stitching + residual + segmentation as a share of the model's time (4096x1024, stride 30);
* the daemon's sustained lines/s and capture-to-event latency, driven by the simulator;
* bf16 against fp32 pixel AUROC on trained models, when they exist (``--accuracy``).

Every timing except the naive reference and the daemon is taken twice: on the machine as it
is, and with one core kept busy by another process (a spinning subprocess, killed after), as
an inspection PC that runs other software. Nothing here is a test: no result fails the run.

The thread plan (``linescan.threads``) is set before torch or OpenCV is imported, as the
daemon's entry point does; offline work is sequential, so the plan is the non-pipelined one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from linescan.threads import SPIN_ENV, ThreadPlan, configure_threads  # noqa: E402

PLAN: ThreadPlan = configure_threads(pipelined=False)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import torch  # noqa: E402

from linescan import ssim as ssim_mod  # noqa: E402
from linescan.backends.torch_cpu import TorchBackend, cpu_has_native_bf16  # noqa: E402
from linescan.data.synthetic import WovenWeb  # noqa: E402
from linescan.model.autoencoder import Autoencoder  # noqa: E402
from linescan.model.bundle import Bundle, BundleMeta, load_bundle, save_bundle  # noqa: E402
from linescan.pipeline import Settings, infer_tiles, inspect_image, reconstruct  # noqa: E402
from linescan.pipeline import segment as segment_residual  # noqa: E402
from linescan.preprocess import InputSpec  # noqa: E402
from linescan.residual import compute_residual  # noqa: E402
from linescan.ssim import SSIMParams, ssim_map  # noqa: E402
from linescan.tiling import TileGrid, cut_tiles, stitch  # noqa: E402

F32 = npt.NDArray[np.float32]
PAPER_V100_S = 3.61  # Bergmann et al. 2018: one 1024x700 image at stride 30 on a Tesla V100
PATCH, LATENT, BATCH = 128, 100, 64
FRAME_H, FRAME_W = 1024, 4096  # a 4096-pixel line-scan frame of 1024 lines
PAPER_H, PAPER_W = 700, 1024


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Timing:
    best: float
    median: float
    reps: int

    def to_dict(self) -> dict[str, float | int]:
        return {"best_s": self.best, "median_s": self.median, "reps": self.reps}


def timeit(
    fn: Callable[[], object], min_time: float = 1.0, min_reps: int = 3, max_reps: int = 50
) -> Timing:
    """Run ``fn`` once to warm up, then until ``min_time`` and ``min_reps`` are both reached."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (
        len(times) < min_reps or time.perf_counter() - start < min_time
    ):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(min(times), float(np.median(times)), len(times))


@contextlib.contextmanager
def one_core_loaded(enabled: bool = True) -> Iterator[None]:
    """Another process keeps one core busy (a plain spinning loop) while the block runs."""
    if not enabled:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)  # let it get on a core
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def woven(height: int, width: int, seed: int = 11) -> npt.NDArray[np.uint8]:
    img: npt.NDArray[np.uint8] = WovenWeb(width, seed).lines(0, height)
    return img


def table1_bundle(folder: Path) -> Bundle:
    """The Table I network (d = 100, 128x128) with fixed random weights, as a saved bundle.

    Random weights time the same as trained ones; the threshold is set per image below so that
    segmentation sees a sparse mask, as on a good web.
    """
    torch.manual_seed(0)
    module = Autoencoder(PATCH, LATENT).eval()
    meta = BundleMeta(loss="ssim", latent=LATENT, patch=PATCH, residual="ssim", stride=30,
                      input=InputSpec(downscale=1), threshold=0.5, name="table1-bench")  # fmt: skip
    save_bundle(folder, module, meta)
    return load_bundle(folder)


class EagerNCHW:
    """fp32 eager, NCHW, no autocast: the plain ``model(x)`` of the public scripts."""

    name = "torch"
    precision = "fp32-nchw"

    def __init__(self, bundle: Bundle) -> None:
        self.module = copy.deepcopy(bundle.module).eval().to(memory_format=torch.contiguous_format)

    @torch.inference_mode()
    def infer(self, batch: F32) -> F32:
        out: F32 = self.module(torch.from_numpy(batch)).numpy()
        return out

    def close(self) -> None:
        return None


# --------------------------------------------------------------------------- the naive way


def naive_ssim_torch(
    x: torch.Tensor, y: torch.Tensor, params: SSIMParams, region: int = PATCH
) -> torch.Tensor:
    """SSIM as the public PyTorch scripts write it: a 2-D Gaussian window in ``conv2d``, five
    moments, no centring, one call per ``region`` x ``region`` block of pixels (each with its
    window's context). The border is BORDER_REFLECT (index-gathered: torch's "reflect" pad is
    the other reflection), so that the output can be compared pixel for pixel with ours."""
    k1 = torch.from_numpy(params.kernel())
    win = (k1[:, None] * k1[None, :]).to(torch.float32)[None, None]
    r = params.radius
    h, w = x.shape[-2:]
    c1, c2 = params.c1, params.c2
    out = torch.empty_like(x)
    for y0 in range(0, h, region):
        for x0 in range(0, w, region):
            y1, x1 = min(y0 + region, h), min(x0 + region, w)
            iy = torch.tensor([_reflect(i, h) for i in range(y0 - r, y1 + r)])
            ix = torch.tensor([_reflect(i, w) for i in range(x0 - r, x1 + r)])
            xs, ys = x[..., iy, :][..., ix], y[..., iy, :][..., ix]

            def blur(t: torch.Tensor) -> torch.Tensor:
                return torch.nn.functional.conv2d(t, win)

            mx, my = blur(xs), blur(ys)
            vx = blur(xs * xs) - mx * mx
            vy = blur(ys * ys) - my * my
            cxy = blur(xs * ys) - mx * my
            out[..., y0:y1, x0:x1] = ((2 * mx * my + c1) * (2 * cxy + c2)) / (
                (mx * mx + my * my + c1) * (vx + vy + c2)
            )
    return out


def _reflect(i: int, n: int) -> int:
    period = 2 * n
    i %= period
    return i if i < n else period - 1 - i


def naive_residual(image: npt.NDArray[np.uint8], bundle: Bundle, stride: int) -> F32:
    """A loop over windows, one tile per forward pass, fp32 eager NCHW; overlap-averaged."""
    module = EagerNCHW(bundle).module
    x = image.astype(np.float32) / 255.0
    h, w = x.shape
    grid = TileGrid(PATCH, stride)
    acc = np.zeros((h, w), np.float32)
    cnt = np.zeros((h, w), np.float32)
    with torch.inference_mode():
        for y0 in grid.positions(h):
            for x0 in grid.positions(w):
                tile = torch.from_numpy(x[y0 : y0 + PATCH, x0 : x0 + PATCH].copy())
                rec = module(tile[None, None])[0, 0].numpy()
                acc[y0 : y0 + PATCH, x0 : x0 + PATCH] += rec
                cnt[y0 : y0 + PATCH, x0 : x0 + PATCH] += 1
        recon = torch.from_numpy(acc / cnt)[None, None]
        s = naive_ssim_torch(torch.from_numpy(x)[None, None], recon, bundle.meta.ssim)
    out: F32 = (1.0 - s[0, 0]).numpy()
    return out


# --------------------------------------------------------------------------- sections


def bench_ssim(quick: bool, loaded: bool) -> dict[str, Any]:
    from skimage.metrics import structural_similarity

    x = woven(FRAME_H, FRAME_W).astype(np.float32) / 255.0
    y = np.clip(cv2.GaussianBlur(x, (5, 5), 1.0) + 0.01, 0, 1).astype(np.float32)
    p = SSIMParams()
    reps = 1 if quick else 3
    out: dict[str, Any] = {"frame": f"{FRAME_W}x{FRAME_H}"}
    with one_core_loaded(loaded):
        sk_t = timeit(
            lambda: structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=1.0, full=True),
            min_time=0, min_reps=reps, max_reps=reps,
        )  # fmt: skip
        ref = structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0,
                                    full=True)[1]  # fmt: skip
        out["skimage"] = sk_t.to_dict()
        workers_before = ssim_mod.get_workers()
        for label, workers in (("ours_1_thread", 1), (f"ours_{PLAN.usable}_threads", PLAN.usable)):
            ssim_mod.set_workers(workers)
            t = timeit(lambda: ssim_map(x, y, p), min_time=0.5 if quick else 1.5)
            got = ssim_map(x, y, p)
            out[label] = {
                **t.to_dict(),
                "speedup_vs_skimage": sk_t.median / t.median,
                "max_abs_diff": float(np.abs(got - ref).max()),
            }
        ssim_mod.set_workers(workers_before)
        out.update(_ssim_peers(x, y, ref, sk_t, quick))
    return out


def _ssim_peers(x: F32, y: F32, ref: F32, sk_t: Timing, quick: bool) -> dict[str, Any]:
    """kornia / pytorch-msssim, when installed (never a dependency): time and interior diff."""
    out: dict[str, Any] = {}
    r = 5
    tx, ty = torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None]
    try:
        import kornia  # type: ignore[import-not-found,unused-ignore]

        def kornia_map() -> torch.Tensor:
            m: torch.Tensor = kornia.metrics.ssim(tx, ty, 11, max_val=1.0)
            return m

        t = timeit(kornia_map, min_time=0, min_reps=1 if quick else 2, max_reps=3)
        diff = (kornia_map()[0, 0].numpy() - ref)[r:-r, r:-r]
        out["kornia"] = {**t.to_dict(), "speedup_vs_skimage": sk_t.median / t.median,
                         "max_abs_diff_interior": float(np.abs(diff).max())}  # fmt: skip
    except ImportError:
        out["kornia"] = "not installed"
    try:
        from pytorch_msssim import ssim as msssim_ssim  # type: ignore[import-not-found,unused-ignore]

        def msssim_mean() -> torch.Tensor:
            v: torch.Tensor = msssim_ssim(tx, ty, data_range=1.0, win_size=11, win_sigma=1.5)
            return v

        # pytorch-msssim returns the mean over a valid-only window, not a map: time only.
        t = timeit(msssim_mean, min_time=0, min_reps=1 if quick else 2, max_reps=3)
        out["pytorch_msssim"] = {**t.to_dict(), "speedup_vs_skimage": sk_t.median / t.median,
                                 "note": "mean only (no map), valid region"}  # fmt: skip
    except ImportError:
        out["pytorch_msssim"] = "not installed"
    return out


def bench_engines(bundle: Bundle, quick: bool, loaded: bool) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    batch = rng.random((BATCH, 1, PATCH, PATCH), dtype=np.float32)
    engines: list[tuple[str, Any]] = [
        ("torch fp32 eager NCHW", EagerNCHW(bundle)),
        ("torch fp32 channels_last", TorchBackend(bundle, precision="fp32")),
    ]
    if cpu_has_native_bf16():
        engines.append(("torch bf16 channels_last", TorchBackend(bundle, precision="bf16")))
    onnx = _onnx_backend(bundle)
    if isinstance(onnx, str):
        engines_note = onnx
    else:
        engines.append(("onnxruntime fp32", onnx))
        engines_note = ""
    out: dict[str, Any] = {"batch": BATCH, "patch": PATCH, "latent": LATENT}
    if engines_note:
        out["onnxruntime"] = engines_note
    ov = _openvino_engines(bundle)
    if isinstance(ov, str):
        out["openvino"] = ov
    else:
        engines += ov
    with one_core_loaded(loaded):
        for name, eng in engines:
            t = timeit(lambda e=eng: e.infer(batch), min_time=0.6 if quick else 2.0)
            out[name] = {**t.to_dict(), "tiles_per_s": BATCH / t.median}
            log(f"  {name}: {BATCH / t.median:.0f} tiles/s")
        if loaded and PLAN.usable > 1:
            # The operator's answer to a busy core: configure_threads(reserve=1).
            configure_threads(reserve=1, pipelined=False)
            prod = (
                "torch bf16 channels_last" if cpu_has_native_bf16() else "torch fp32 channels_last"
            )
            eng = dict(engines)[prod]
            name = f"{prod}, reserve=1"
            t = timeit(lambda: eng.infer(batch), min_time=0.6 if quick else 2.0)
            out[name] = {**t.to_dict(), "tiles_per_s": BATCH / t.median}
            log(f"  {name}: {BATCH / t.median:.0f} tiles/s")
            configure_threads(pipelined=False)
    return out


def _openvino_engines(bundle: Bundle) -> list[tuple[str, Any]] | str:
    """OpenVINO fp32, bf16 (native bf16 only) and INT8 (NNCF on 512 tiles of a woven web),
    or why not."""
    try:
        from linescan.backends.openvino_cpu import convert
        from linescan.openvino_export import _Compiled, quantize
    except ImportError as exc:
        return f"not available ({exc})"
    try:
        model = convert(bundle)
        web = bundle.meta.input.to_model(woven(1024, 4096, seed=21))
        grid = TileGrid(PATCH, 60)
        coords = grid.coords(*web.shape)[:512]
        tiles = np.concatenate([cut_tiles(web, [y], [x], PATCH) for y, x in coords])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = quantize(model, tiles, BATCH)
        threads = PLAN.torch_intra
        out: list[tuple[str, Any]] = [("openvino fp32", _Compiled(model, "fp32", threads, BATCH))]
        if cpu_has_native_bf16():
            out.append(("openvino bf16", _Compiled(model, "bf16", threads, BATCH)))
        out.append(
            (f"openvino int8 (NNCF, {len(tiles)} tiles)", _Compiled(q, "int8", threads, BATCH))
        )
        return out
    except Exception as exc:  # optional extra; report, never fail the benchmark
        return f"not available ({type(exc).__name__}: {exc})"


def _onnx_backend(bundle: Bundle) -> Any:
    try:
        from linescan.backends.onnx_cpu import OnnxBackend
        from linescan.export import export_onnx
    except ImportError as exc:
        return f"not available ({exc})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(bundle.path)
        return OnnxBackend(load_bundle(bundle.path), threads=PLAN.torch_intra)
    except Exception as exc:  # optional extra; report, never fail the benchmark
        return f"not available ({type(exc).__name__}: {exc})"


def production_backend(bundle: Bundle) -> TorchBackend:
    return TorchBackend(bundle, precision="auto")


def bench_naive(bundle: Bundle, quick: bool) -> dict[str, Any]:
    stride = 64 if quick else 30
    image = woven(PAPER_H, PAPER_W, seed=5)
    meta = replace(bundle.meta, stride=stride)
    n_tiles = len(TileGrid(PATCH, stride).coords(PAPER_H, PAPER_W))
    log(f"  naive reference: {n_tiles} tiles one by one...")
    t0 = time.perf_counter()
    naive = naive_residual(image, bundle, stride)
    t_naive = time.perf_counter() - t0
    out: dict[str, Any] = {"image": f"{PAPER_W}x{PAPER_H}", "stride": stride, "tiles": n_tiles,
                           "naive_s": t_naive}  # fmt: skip
    for label, backend in (
        ("ours_fp32", TorchBackend(bundle, precision="fp32")),
        ("ours_production", production_backend(bundle)),
    ):
        res = reconstruct(image, meta, backend).residual
        t = timeit(lambda b=backend: reconstruct(image, meta, b), min_time=0.5, min_reps=2)
        out[label] = {
            **t.to_dict(),
            "precision": backend.precision,
            "speedup_vs_naive": t_naive / t.median,
            "max_abs_residual_diff": float(np.abs(res - naive).max()),
        }
    return out


def bench_offline(bundle: Bundle, quick: bool, loaded: bool) -> dict[str, Any]:
    frame = woven(FRAME_H, FRAME_W)
    paper = woven(PAPER_H, PAPER_W, seed=5)
    backend = production_backend(bundle)
    out: dict[str, Any] = {"precision": backend.precision, "frame": f"{FRAME_W}x{FRAME_H}"}
    strides = (30, 128) if quick else (30, 64, 128)
    with one_core_loaded(loaded):
        for stride in strides:
            meta = _with_threshold(bundle.meta, stride, frame, backend)
            t = timeit(lambda m=meta: inspect_image(frame, m, backend),
                       min_time=0, min_reps=1 if quick else 2, max_reps=2)  # fmt: skip
            out[f"stride_{stride}"] = {**t.to_dict(), "mpx_per_s": frame.size / 1e6 / t.median}
            log(f"  stride {stride}: {frame.size / 1e6 / t.median:.2f} Mpx/s")
        meta = _with_threshold(bundle.meta, 30, paper, backend)
        t = timeit(lambda: inspect_image(paper, meta, backend), min_time=0, min_reps=2, max_reps=3)
        out["paper_image_1024x700_stride_30"] = {**t.to_dict(), "paper_v100_s": PAPER_V100_S}
    return out


def _with_threshold(
    meta: BundleMeta, stride: int, image: npt.NDArray[np.uint8], backend: Any
) -> BundleMeta:
    """A threshold at the residual's 99.9th percentile: a sparse mask, like a good web."""
    m = replace(meta, stride=stride)
    res = reconstruct(image, m, backend, Settings(stride=128)).residual
    return replace(m, threshold=float(np.quantile(res, 0.999)))


def bench_overhead(bundle: Bundle, quick: bool, loaded: bool) -> dict[str, Any]:
    """Per stage on a 4096x1024 frame at stride 30: model vs everything around it."""
    frame = woven(FRAME_H, FRAME_W)
    backend = production_backend(bundle)
    meta = _with_threshold(bundle.meta, 30, frame, backend)
    x = meta.input.to_model(frame)
    h, w = x.shape
    grid = TileGrid(PATCH, 30)
    ys, xs = grid.positions(h), grid.positions(w)
    reps = 1 if quick else 2
    stages: dict[str, Timing] = {}
    with one_core_loaded(loaded):
        tiles = cut_tiles(x, ys, xs, PATCH)
        stages["cut_tiles"] = timeit(lambda: cut_tiles(x, ys, xs, PATCH), 0, reps + 1, reps + 1)
        recon_tiles = infer_tiles(backend, tiles, BATCH)
        stages["model"] = timeit(lambda: infer_tiles(backend, tiles, BATCH), 0, reps, reps)
        recon = stitch(recon_tiles, ys, xs, h, w)
        stages["stitch"] = timeit(lambda: stitch(recon_tiles, ys, xs, h, w), 0, 3, 5)
        residual = compute_residual(meta.residual, x, recon, meta.ssim)
        stages["residual"] = timeit(
            lambda: compute_residual(meta.residual, x, recon, meta.ssim), 0, 3, 5
        )
        assert meta.threshold is not None
        thr = meta.threshold
        stages["segment"] = timeit(
            lambda: segment_residual(residual, thr, meta.input, FRAME_H, FRAME_W), 0, 3, 5
        )
    model = stages["model"].median
    around = stages["stitch"].median + stages["residual"].median + stages["segment"].median
    return {
        "frame": f"{FRAME_W}x{FRAME_H}",
        "stride": 30,
        "tiles": len(tiles),
        "precision": backend.precision,
        "stages": {k: v.to_dict() for k, v in stages.items()},
        "overhead_pct": 100.0 * around / model,
        "overhead_with_cut_pct": 100.0 * (around + stages["cut_tiles"].median) / model,
    }


_WAIT_PROBE = """
import time, torch
from linescan.model.autoencoder import Autoencoder
torch.set_num_threads({threads})
m = Autoencoder(128, 100).eval()
x = torch.rand(1, 1, 128, 128)
ts = []
with torch.inference_mode():
    for _ in range(5):
        m(x)
    end = time.perf_counter() + {seconds}
    while time.perf_counter() < end or len(ts) < 5:
        t0 = time.perf_counter(); m(x); ts.append(time.perf_counter() - t0)
ts.sort()
print(ts[len(ts) // 2] * 1e3, ts[int(len(ts) * 0.99)] * 1e3)
"""


def bench_wait_policy(quick: bool) -> dict[str, Any]:
    """Batch-1 forward with one core busy: OpenMP's default spin-wait against the plan's
    passive wait, in fresh processes (the policy is read when torch loads)."""
    out: dict[str, Any] = {}
    seconds = 1.0 if quick else 3.0
    base_env = {k: v for k, v in os.environ.items() if k not in SPIN_ENV}
    cases = (
        ("torch 2 threads, OpenMP default wait", 2, {}),
        ("torch 2 threads, OMP_WAIT_POLICY=PASSIVE (the plan)", 2, SPIN_ENV),
        ("torch 1 thread (reserve=1)", 1, SPIN_ENV),
    )
    with one_core_loaded(True):
        for label, threads, extra in cases:
            env = {**base_env, **extra, "PYTHONPATH": str(ROOT)}
            code = _WAIT_PROBE.format(threads=threads, seconds=seconds)
            try:
                res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                     text=True, timeout=120, check=True)  # fmt: skip
                p50, p99 = (float(v) for v in res.stdout.split())
                out[label] = {"batch1_p50_ms": p50, "batch1_p99_ms": p99}
                log(f"  {label}: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
            except (subprocess.SubprocessError, ValueError) as exc:
                out[label] = f"failed: {exc}"
    return out


# --------------------------------------------------------------------------- daemon


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def daemon_model(model: Path | None) -> Path | str:
    """The streamable, calibrated bundle the daemon rows run (engines/default), or why not."""
    try:
        from linescan.demo import default_bundle_path

        path = model if model is not None else default_bundle_path()
        meta = load_bundle(path).meta
    except Exception as exc:
        return f"daemon: not available (no model: {exc})"
    if not meta.input.streamable or meta.threshold is None:
        return f"daemon: not available ({path} is not streamable or has no threshold)"
    return Path(path)


def openvino_copy(path: Path, tmp: Path) -> tuple[Path | None, dict[str, Any] | str]:
    """A copy of the daemon's bundle with its OpenVINO export, INT8 calibrated on synthetic
    woven webs like its training data and checked (``linescan export --openvino --int8``)."""
    try:
        from linescan.data.synthetic import write_synthetic_dataset
        from linescan.openvino_export import export_openvino
    except ImportError as exc:
        return None, f"not available ({exc})"
    import shutil

    copy_path = tmp / "daemon-openvino"
    shutil.copytree(path, copy_path)
    data = write_synthetic_dataset(tmp / "woven-cal", "woven", 12, 0, 0, (512, 1024), seed=3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = export_openvino(copy_path, int8=True, data=data, progress=log)
    except Exception as exc:  # optional extra; report, never fail the benchmark
        return None, f"not available ({type(exc).__name__}: {exc})"
    return copy_path, {
        "accuracy": report.record.get("accuracy"),
        "refused": report.refused,
        "speed": report.record.get("speed"),
    }


def bench_daemon(
    path: Path, ov_path: Path | None, quick: bool, loaded: bool
) -> dict[str, Any] | str:
    """Sustained lines/s and capture-to-event latency of the real daemon, fed by the simulator,
    per engine and stride.

    Runs ``linescan.demo.run_demo`` (daemon + simulator + subscriber on loopback): as fast as
    the daemon accepts (``overload = block``: lines/s) with each engine (torch auto, OpenVINO
    fp32, bf16, int8) at the bundle's stride and at stride 64, then paced at 70 % of that rate
    for torch and OpenVINO int8 (latency p50/p99 from the defect events).
    """
    from linescan.config import Config
    from linescan.demo import run_demo

    meta = load_bundle(path).meta
    lines = 4096 if quick else 12288
    out: dict[str, Any] = {"model": str(path), "scale": f"1/{meta.input.downscale}",
                           "width": FRAME_W, "lines": lines, "runs": {}}  # fmt: skip
    engines: list[tuple[str, Path, str, str]] = [("torch auto", path, "torch", "auto")]
    if ov_path is not None:
        engines.append(("openvino fp32", ov_path, "openvino", "fp32"))
        if cpu_has_native_bf16():
            engines.append(("openvino bf16", ov_path, "openvino", "bf16"))
        engines.append(("openvino int8", ov_path, "openvino", "int8"))
    plan: list[tuple[str, Path, str, str, int, float | None]] = []
    for stride in (meta.stride, 64):
        for name, bundle_path, backend, precision in engines:
            if stride != meta.stride and precision in ("fp32", "bf16") and backend == "openvino":
                continue  # the stride rows: torch and INT8 are enough
            plan.append((name, bundle_path, backend, precision, stride, 0.0))
    for name, bundle_path, backend, precision in engines:
        if precision in ("auto", "int8"):
            plan.append((name, bundle_path, backend, precision, meta.stride, None))
    for name, bundle_path, backend, precision, stride, rate in plan:
        label = f"{'sustained' if rate == 0.0 else 'paced'}, {name}, stride {stride}"
        if rate is None:
            rate = 0.7 * float(out["runs"][f"sustained, {name}, stride {stride}"]["lines_per_s"])
        config = Config().with_overrides(
            {
                "model": {"bundle": Path(bundle_path).absolute()},
                "frames": {"endpoint": f"tcp://127.0.0.1:{_free_port()}"},
                "events": {"endpoint": f"tcp://127.0.0.1:{_free_port()}"},
                "metrics": {"enabled": False},
                "queues": {"overload": "block"},
                "journal": {"enabled": False},
                "engine": {"backend": backend, "precision": precision},
                "inspection": {"stride": stride},
            }
        )
        sink = open(os.devnull, "w")  # noqa: SIM115 - closed below
        try:
            with one_core_loaded(loaded):
                res = run_demo(config, lines=lines, width=FRAME_W, frame_height=256,
                               defects=lines // 1024, line_rate_hz=rate, out=sink)  # fmt: skip
        except Exception as exc:  # one engine failing must not lose the others' rows
            out["runs"][label] = f"failed: {type(exc).__name__}: {exc}"
            log(f"  daemon {label}: failed ({exc})")
            continue
        finally:
            sink.close()
        out["runs"][label] = {
            "line_rate_hz": rate,
            "lines_inspected": res.lines,
            "seconds": res.seconds,
            "lines_per_s": res.lines / max(res.seconds, 1e-9),
            "latency_p50_ms": res.latency_ms(0.5),
            "latency_p99_ms": res.latency_ms(0.99),
            "defects_found": len(res.found()),
            "defects_planted": len(res.planted),
        }
        log(f"  daemon {label}: {out['runs'][label]['lines_per_s']:.0f} lines/s")
    return out


def bench_stride_quality(specs: list[str], quick: bool) -> dict[str, Any]:
    """Detection against stride: pixel AUROC and the recall of synthetic (and labelled)
    defects at the calibrated threshold, and false alarms on good images, for each stride
    ``stride = "auto"`` may choose. ``specs``: NAME=MODEL@DATA (DATA: MVTec layout or a
    folder of good images; its test/good and labelled test images when it has them)."""
    from linescan.data.images import test_samples, training_images
    from linescan.openvino_export import check_cases, measure_accuracy, split_images
    from linescan.stride import candidate_strides

    out: dict[str, Any] = {}
    for spec in specs:
        name, rest = spec.split("=", 1)
        model, data = rest.split("@", 1)
        bundle = load_bundle(Path(model))
        meta = bundle.meta
        try:
            samples = test_samples(Path(data))
            goods = [s.image for s in samples if s.mask is None][:8]
            labelled = [(s.image, s.mask) for s in samples if s.mask is not None][:16]
        except Exception:  # a plain folder of good images
            goods, labelled = split_images(training_images(Path(data)))[1], []
        backend = production_backend(bundle)
        good_px, cases = check_cases(goods[: 2 if quick else 8], labelled, meta, backend)
        row: dict[str, Any] = {"model": model, "data": data, "precision": backend.precision}
        for stride in candidate_strides(meta.patch, meta.stride):
            acc = measure_accuracy(replace(meta, stride=stride), backend, good_px, cases)
            row[str(stride)] = acc.to_json()
            log(f"  stride quality {name} stride {stride}: {acc.to_json()}")
        out[name] = row
    return out


# --------------------------------------------------------------------------- accuracy


def default_accuracy_specs() -> list[str]:
    """Trained bundles this checkout has: the study's grid model (an SSIM one when there is
    one), ours from the README's commands, and the synthetic woven and toy ones."""
    specs = []
    grid_data = next(
        (d for d in (Path("/work/shared/datasets/mvtec_grid"),
                     ROOT.parent / "shared" / "datasets" / "mvtec_grid") if d.is_dir()),
        None,
    )  # fmt: skip
    study = [p.parent for p in (ROOT / "runs" / "study").glob("**/bundle.json")]
    study = [b for b in study if "mvtec_grid" in str(b)]
    study.sort(
        key=lambda b: ('"loss": "ssim"' in (b / "bundle.json").read_text(), b.stat().st_mtime)
    )
    candidates = [
        ("grid (study)", study[-1] if study else None, grid_data),
        ("grid", ROOT / "runs" / "perf_grid", grid_data),
        ("woven", ROOT / "runs" / "perf_woven", ROOT / "runs" / "perf_woven_data"),
        ("toy", ROOT / "runs" / "perf_toy", ROOT / "runs" / "perf_toy_data"),
    ]
    for name, model, data in candidates:
        if model and data and data.is_dir() and (model / "bundle.json").is_file():
            specs.append(f"{name}={model}@{data}")
    return specs


def bench_accuracy(specs: list[str]) -> dict[str, Any]:
    """Pixel AUROC of each model in fp32 and bf16; the goal is |delta| <= 0.005."""
    from linescan.evaluate import pixel_roc
    from linescan.evaluation_run import residual_maps

    out: dict[str, Any] = {}
    for spec in specs:
        name, rest = spec.split("=", 1)
        model, data = rest.split("@", 1)
        bundle = load_bundle(Path(model))
        row: dict[str, Any] = {"model": model, "data": data}
        for precision in ("fp32", "bf16"):
            if precision == "bf16" and not cpu_has_native_bf16():
                row[precision] = None
                continue
            backend = TorchBackend(bundle, precision=precision)
            scores, masks = residual_maps(Path(data), bundle.meta, backend)
            row[precision] = pixel_roc(scores, masks).auc
        if row.get("bf16") is not None:
            row["delta"] = row["bf16"] - row["fp32"]
        out[name] = row
        log(f"  accuracy {name}: {row}")
    return out


# --------------------------------------------------------------------------- report


def environment() -> dict[str, Any]:
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines()
                  if ln.startswith("model name")), platform.processor())  # fmt: skip
    words = set(flags.split())
    return {
        "cpu": model,
        "cores_allowed": PLAN.cores_affinity,
        "avx512_bf16": "avx512_bf16" in words,
        "amx_bf16": "amx_bf16" in words,
        "torch": torch.__version__,
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        "thread_plan": PLAN.to_dict(),
    }


def rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, as it is, one core loaded) for the table."""
    base, load = results["base"], results.get("loaded", {})
    out: list[tuple[str, str, str]] = []

    def both(section: str, fn: Callable[[dict[str, Any]], str]) -> tuple[str, str]:
        a = fn(base[section]) if section in base else "-"
        b = fn(load[section]) if section in load else "-"
        return a, b

    def ms(d: dict[str, Any]) -> str:
        return f"{d['median_s'] * 1e3:.1f} ms"

    n = results.get("naive")
    if n:
        for key, label in (("ours_production", "our pipeline"), ("ours_fp32", "our pipeline fp32")):
            o = n[key]
            out.append((
                f"naive per-patch reference vs {label} ({o['precision']}), {n['image']} "
                f"stride {n['stride']}",
                f"{n['naive_s']:.2f} s vs {o['median_s']:.3f} s = {o['speedup_vs_naive']:.1f}x "
                f"(max residual diff {o['max_abs_residual_diff']:.1e})",
                "-",
            ))  # fmt: skip
    s = base["ssim"]
    out.append(("SSIM 4096x1024: scikit-image", *both("ssim", lambda d: ms(d["skimage"]))))
    for key in [k for k in s if k.startswith("ours_")]:
        out.append((
            f"SSIM 4096x1024: ours, {key.split('_', 1)[1].replace('_', ' ')}",
            *both("ssim", lambda d, k=key: f"{ms(d[k])} = {d[k]['speedup_vs_skimage']:.1f}x "
                  f"(max diff {d[k]['max_abs_diff']:.1e})"),
        ))  # fmt: skip
    for peer in ("kornia", "pytorch_msssim"):
        if isinstance(s.get(peer), dict):
            out.append((f"SSIM 4096x1024: {peer}", *both(
                "ssim", lambda d, p=peer: f"{ms(d[p])} = {d[p]['speedup_vs_skimage']:.1f}x"),
            ))  # fmt: skip
    engine_keys = [
        *base["engines"],
        *(k for k in load.get("engines", {}) if k not in base["engines"]),
    ]
    for key in engine_keys:
        v = base["engines"].get(key, load.get("engines", {}).get(key))
        if isinstance(v, dict):
            out.append((f"model tiles/s, batch 64: {key}", *both(
                "engines", lambda d, k=key: f"{d[k]['tiles_per_s']:.0f}" if k in d else "-"),
            ))  # fmt: skip
    off = base["offline"]
    for key in [k for k in off if k.startswith("stride_")]:
        out.append((
            f"offline 4096x1024, {key.replace('_', ' ')} ({off['precision']})",
            *both("offline", lambda d, k=key: f"{d[k]['mpx_per_s']:.2f} Mpx/s ({ms(d[k])})"),
        ))  # fmt: skip
    out.append((
        "1024x700 image, stride 30 (paper: 3.61 s on a V100)",
        *both("offline", lambda d: f"{d['paper_image_1024x700_stride_30']['median_s']:.3f} s"),
    ))  # fmt: skip
    out.append((
        "stitch + residual + segmentation / model time (4096x1024, stride 30)",
        *both("overhead", lambda d: f"{d['overhead_pct']:.1f} % "
              f"(with tile cutting {d['overhead_with_cut_pct']:.1f} %)"),
    ))  # fmt: skip
    for label, d in results.get("wait_policy", {}).items():
        if isinstance(d, dict):
            lat = f"p50 {d['batch1_p50_ms']:.1f} ms, p99 {d['batch1_p99_ms']:.1f} ms"
            out.append((f"batch-1 forward, {label}", "-", lat))
    dm = results.get("daemon")
    if isinstance(dm, dict):
        for label, d in dm["runs"].items():
            if isinstance(d, str):
                out.append((f"daemon {label}", d, "-"))
                continue
            lat = ""  # as fast as accepted, latency is queueing: paced run only
            if label.startswith("paced") and d["latency_p50_ms"] is not None:
                lat = (f", latency p50 {d['latency_p50_ms']:.0f} ms "
                       f"p99 {d['latency_p99_ms']:.0f} ms")  # fmt: skip
            out.append((f"daemon {label}, 4096 wide, model {dm['scale']}",
                        f"{d['lines_per_s']:.0f} lines/s{lat}", "-"))  # fmt: skip
    else:
        out.append(("daemon", str(dm), "-"))
    ov = results.get("daemon_openvino")
    if isinstance(ov, dict) and isinstance(ov.get("accuracy"), dict):
        acc = ov["accuracy"]
        for key in ("bf16", "int8"):
            if isinstance(acc.get(key), dict):
                a, r = acc[key], acc["fp32"]
                out.append((
                    f"daemon's model, OpenVINO {key} vs fp32 on synthetic defects "
                    f"({acc['held_out_images']} held-out woven images x {acc['planted_copies']})",
                    f"AUROC {a['auroc']:.4f} vs {r['auroc']:.4f}, recall {a['recall']:.3f} vs "
                    f"{r['recall']:.3f}: {a['verdict']}",
                    "-",
                ))  # fmt: skip
    elif ov is not None:
        out.append(("daemon's model, OpenVINO export", str(ov), "-"))
    for name, row in results.get("stride_quality", {}).items():
        for stride, a in row.items():
            if isinstance(a, dict):
                recall = "-" if a["recall"] is None else f"{a['recall']:.3f}"
                out.append((
                    f"{name}, stride {stride} ({row['precision']}): AUROC, recall at the "
                    "calibrated threshold, false alarms",
                    f"{a['auroc']:.4f}, {recall} ({a['found']}/{a['defects']}), "
                    f"{a['false_alarms']} on {a['good_mpx']:.1f} Mpx",
                    "-",
                ))  # fmt: skip
    for name, d in results.get("accuracy", {}).items():
        if d.get("delta") is not None:
            out.append((f"pixel AUROC {name}: fp32 vs bf16",
                        f"{d['fp32']:.4f} vs {d['bf16']:.4f} (delta {d['delta']:+.4f})",
                        "-"))  # fmt: skip
    return out


def print_table(table: list[tuple[str, str, str]], markdown: bool) -> None:
    head = ("measurement", "as is", "one core loaded")
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|---|---|---|")
        for r in table:
            print("| " + " | ".join(r) + " |")
        return
    w0 = max(len(r[0]) for r in [head, *table])
    w1 = max(len(r[1]) for r in [head, *table])
    for r in [head, *table]:
        print(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench.json"))
    ap.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    ap.add_argument("--no-loaded", action="store_true", help="skip the one-core-loaded pass")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive reference")
    ap.add_argument("--daemon-model", type=Path, default=None,
                    help="a streamable bundle with a threshold "
                         "(default: engines/default)")  # fmt: skip
    ap.add_argument("--accuracy", action="append", default=None, metavar="NAME=MODEL@DATA",
                    help="evaluate MODEL on DATA in fp32 and bf16 (default: trained bundles "
                         "under runs/ when present; 'none' to skip)")  # fmt: skip
    ap.add_argument("--stride-quality", action="append", default=None, metavar="NAME=MODEL@DATA",
                    help="AUROC and recall at the calibrated threshold per stride (default: "
                         "the daemon's model on synthetic woven webs; 'none' to skip)")  # fmt: skip
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    results: dict[str, Any] = {"environment": environment(), "quick": a.quick}
    log(f"thread plan: {PLAN.to_dict()}")
    with tempfile.TemporaryDirectory(prefix="linescan-bench-") as tmp:
        bundle = table1_bundle(Path(tmp) / "table1")
        if not a.no_naive:
            log("naive reference vs our pipeline...")
            results["naive"] = bench_naive(bundle, a.quick)
        passes = [("base", False)] + ([] if a.no_loaded else [("loaded", True)])
        for key, loaded in passes:
            log(f"pass: {'one core loaded' if loaded else 'as is'}")
            r: dict[str, Any] = {}
            log(" SSIM...")
            r["ssim"] = bench_ssim(a.quick, loaded)
            log(" engines...")
            r["engines"] = bench_engines(bundle, a.quick, loaded)
            log(" offline...")
            r["offline"] = bench_offline(bundle, a.quick, loaded)
            log(" overhead...")
            r["overhead"] = bench_overhead(bundle, a.quick, loaded)
            results[key] = r
    if not a.no_loaded:
        log("batch-1 latency with one core busy, by OpenMP wait policy...")
        results["wait_policy"] = bench_wait_policy(a.quick)
    log("daemon...")
    path = daemon_model(a.daemon_model)
    if isinstance(path, str):
        results["daemon"] = path
        print(path)
    else:
        with tempfile.TemporaryDirectory(prefix="linescan-bench-") as tmp:
            log(" OpenVINO export of the daemon's model (INT8, checked)...")
            ov_path, results["daemon_openvino"] = openvino_copy(path, Path(tmp))
            # The daemon's own layout: post-processing runs beside inference (pipelined plan).
            results["daemon_thread_plan"] = configure_threads(pipelined=True).to_dict()
            results["daemon"] = bench_daemon(path, ov_path, a.quick, loaded=False)
            configure_threads(pipelined=False)
            quality = a.stride_quality
            if quality is None:
                from linescan.data.synthetic import write_synthetic_dataset

                webs = write_synthetic_dataset(Path(tmp) / "woven-q", "woven", 0, 4, 6,
                                               (512, 1024), seed=9)  # fmt: skip
                quality = [f"woven webs, daemon's model={path}@{webs}"]
            quality = [q for q in quality if q != "none"]
            if quality:
                log("detection against stride...")
                results["stride_quality"] = bench_stride_quality(quality, a.quick)
    specs = a.accuracy if a.accuracy is not None else default_accuracy_specs()
    specs = [s for s in specs if s != "none"]
    if specs:
        log("accuracy (fp32 vs bf16)...")
        results["accuracy"] = bench_accuracy(specs)
    results["seconds"] = time.perf_counter() - t_start
    a.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_table(rows(results), a.markdown)
    print(f"\n{results['seconds']:.0f} s; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
