"""The fused SSIM residual on the GPU: ``ssim_residual.cu`` loaded with pycuda.

``CudaResidual(params).residual(x, recon, scale)`` returns the same 1 - SSIM map as
``linescan.residual.ssim_residual(x * scale, recon, params)`` within 1e-4 (the same window,
border, constants, centring and four-moment arithmetic; see the kernel's header). ``x`` may be
the camera's uint8/uint16 pixels with the bundle's normalisation ``scale``, or float32 model
input with scale 1.

pycuda and the CUDA driver are imported only when this class is built, so ``import linescan``
never needs them. The kernel is compiled at first use with the CUDA toolkit's ``nvcc``, with
the window radius fixed at compile time so every loop unrolls. ``nvcc`` is looked for on the
PATH, then in ``$CUDA_HOME``/``$CUDA_PATH``/``$CUDA_ROOT`` and ``/usr/local/cuda`` (a systemd
service's PATH has no CUDA directory); the compiled binary is cached beside the TensorRT
engines (``$STATE_DIRECTORY/engines/kernels`` under the shipped unit, whose home directory is
not writable), or not cached where that is not writable.

CUDA contexts: everything runs in the device's *primary* context, the one torch and TensorRT
use too, pushed around each call; so the class may be built on one thread and used on another.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from linescan.errors import EngineError
from linescan.log import get_logger
from linescan.ssim import SSIMParams

F32 = npt.NDArray[np.float32]
log = get_logger("linescan.cuda")
GPU_HINT = "pip install 'linescan[gpu]'"
KERNEL_FILE = Path(__file__).with_name("ssim_residual.cu")
KERNELS: dict[np.dtype[Any], str] = {
    np.dtype(np.uint8): "ssim_residual_u8",
    np.dtype(np.uint16): "ssim_residual_u16",
    np.dtype(np.float32): "ssim_residual_f32",
}
# The kernels' parameters in pycuda's ``prepare`` notation: x, recon, out pointers; height,
# width and the three pitches; scale, data_range / 2, C1, C2 (see ssim_residual.cu).
ARG_TYPES = "PPPiiiiiffff"
BLOCK = (32, 8, 1)
TILE = 32
MAX_RADIUS = 10  # 48 KiB of shared memory holds a 32 x 32 tile with this apron


def import_cuda() -> Any:
    """``pycuda.driver``, initialised; EngineError saying what to install when it cannot be."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise EngineError(f"the CUDA path needs pycuda: {GPU_HINT}") from exc
    try:
        cuda.init()
        count = cuda.Device.count()
    except cuda.Error as exc:
        raise EngineError(f"no usable NVIDIA GPU (CUDA driver: {exc})") from exc
    if count == 0:
        raise EngineError("no NVIDIA GPU found by the CUDA driver")
    return cuda


def free_pinned(array: npt.NDArray[Any]) -> None:
    """Free a pycuda page-locked array now (its ``base`` is the host allocation)."""
    base: Any = array.base
    base.free()


class CudaContext:
    """The primary context of one GPU, made current only for the duration of ``active()``."""

    def __init__(self, device: int = 0) -> None:
        self.cuda = import_cuda()
        if not 0 <= device < self.cuda.Device.count():
            raise EngineError(
                f"GPU {device} does not exist ({self.cuda.Device.count()} GPU(s) found)"
            )
        try:
            self.device = self.cuda.Device(device)
            self._ctx = self.cuda.Device(device).retain_primary_context()
        except self.cuda.Error as exc:
            raise EngineError(f"cannot open GPU {device}: {exc}") from exc
        self.index = device

    @property
    def name(self) -> str:
        return str(self.device.name())

    @property
    def compute_capability(self) -> str:
        major, minor = self.device.compute_capability()
        return f"{major}.{minor}"

    @contextmanager
    def active(self) -> Iterator[Any]:
        """Push the context; pop it afterwards even when the body fails. Yields pycuda.driver."""
        try:
            self._ctx.push()
        except self.cuda.Error as exc:
            raise EngineError(f"cannot make GPU {self.index}'s context current: {exc}") from exc
        try:
            yield self.cuda
        finally:
            self.cuda.Context.pop()

    def release(self) -> None:
        """Drop this object's reference to the primary context (other users keep theirs)."""
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            # Releasing at shutdown: if the driver objects, there is nothing useful to do.
            with contextlib.suppress(self.cuda.Error):
                ctx.detach()


_compile_lock = threading.Lock()
CUDA_ROOT_VARS = ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT")


def find_nvcc(environ: dict[str, str] | None = None) -> str | None:
    """The CUDA toolkit's nvcc: on the PATH, else under $CUDA_HOME/$CUDA_PATH/$CUDA_ROOT or
    /usr/local/cuda; None when there is none."""
    env = os.environ if environ is None else environ
    found = shutil.which("nvcc", path=env.get("PATH", os.defpath))
    if found:
        return found
    roots = [env.get(v, "") for v in CUDA_ROOT_VARS] + ["/usr/local/cuda"]
    for root in roots:
        candidate = Path(root) / "bin" / "nvcc"
        if root and candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def kernel_cache_dir() -> str | bool:
    """Where pycuda caches the compiled kernel: ``kernels/`` in the engines directory, or
    False (no cache: compile at every start) where that cannot be written."""
    from linescan.engine_cache import default_engines_dir

    path = default_engines_dir() / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return str(path) if os.access(path, os.W_OK) else False


def compile_module(radius: int, cache_dir: str | bool | None = None) -> Any:
    """Compile the kernel for one window radius in the current context (cached, see above)."""
    try:
        from pycuda.compiler import SourceModule
    except ImportError as exc:
        raise EngineError(f"the CUDA path needs pycuda: {GPU_HINT}") from exc
    nvcc = find_nvcc()
    if nvcc is None:
        raise EngineError(
            f"cannot compile {KERNEL_FILE.name}: no nvcc on the PATH, in $CUDA_HOME/bin or in "
            "/usr/local/cuda/bin; install the CUDA toolkit or set CUDA_HOME"
        )
    source = KERNEL_FILE.read_text(encoding="utf-8")
    cache = kernel_cache_dir() if cache_dir is None else cache_dir

    def build(cache: str | bool) -> Any:
        with _compile_lock:
            return SourceModule(
                source,
                nvcc=nvcc,
                options=[f"-DLS_RADIUS={radius}", "-lineinfo"],
                no_extern_c=True,  # the file declares its own extern "C" entry points
                cache_dir=cache,
            )

    try:
        return build(cache)
    except Exception as first:  # pycuda.driver.CompileError, OSError from the cache or nvcc
        if cache is False:
            raise EngineError(f"cannot compile {KERNEL_FILE.name} with {nvcc}: {first}") from first
        # pycuda writes its cache file in place: one truncated by a power cut would fail every
        # later start. Compiling without the cache tells that apart from a real error.
        log.warning("cuda_kernel_cache_unusable", cache=str(cache), error=str(first))
        try:
            return build(False)
        except Exception as exc:
            raise EngineError(f"cannot compile {KERNEL_FILE.name} with {nvcc}: {exc}") from exc


class CudaResidual:
    """1 - SSIM of (input, reconstruction) on one GPU, with device buffers reused across calls.

    Not thread-safe: one instance per thread that computes residuals.
    """

    def __init__(
        self,
        params: SSIMParams = SSIMParams(),
        device: int = 0,
        cache_dir: str | bool | None = None,
    ) -> None:
        if params.radius > MAX_RADIUS:
            raise EngineError(
                f"the CUDA residual supports SSIM windows up to {2 * MAX_RADIUS + 1}, "
                f"got {params.window}; use the CPU residual"
            )
        self.params = params
        self.context = CudaContext(device)
        self._buffers: dict[str, tuple[Any, int]] = {}
        self._host_out: F32 | None = None
        self._closed = False
        with self.context.active() as cuda:
            try:
                module = compile_module(params.radius, cache_dir)
                self._functions = {}
                for dtype, name in KERNELS.items():
                    fn = module.get_function(name)
                    fn.prepare(ARG_TYPES)
                    self._functions[dtype] = fn
                ptr, size = module.get_global("c_window")
                weights = params.kernel().astype(np.float32)
                if size != weights.nbytes:
                    raise EngineError(
                        f"kernel compiled for {size // 4} taps, the window has {weights.size}"
                    )
                cuda.memcpy_htod(ptr, weights)
                self.stream = cuda.Stream()
            except cuda.Error as exc:
                raise EngineError(f"cannot load the SSIM kernel on the GPU: {exc}") from exc
        self._module = module

    # ----------------------------------------------------------------- device-resident API

    def launch(
        self,
        x_ptr: int,
        recon_ptr: int,
        out_ptr: int,
        height: int,
        width: int,
        dtype: npt.DTypeLike,
        scale: float,
        x_pitch: int | None = None,
        recon_pitch: int | None = None,
        out_pitch: int | None = None,
        stream: Any = None,
    ) -> None:
        """Enqueue the kernel on device pointers (pitches in elements, default the width).

        For pipelines that keep frames on the GPU (and for benchmarks); the caller makes the
        context current (``with residual.context.active():``) and synchronises ``stream``.
        """
        fn = self._functions.get(np.dtype(dtype))
        if fn is None:
            raise EngineError(f"CUDA residual: unsupported input dtype {np.dtype(dtype)}")
        if height < 1 or width < 1:
            raise EngineError(f"CUDA residual: empty image {height}x{width}")
        grid = ((width + TILE - 1) // TILE, (height + TILE - 1) // TILE)
        p = self.params
        fn.prepared_async_call(
            grid,
            BLOCK,
            self.stream if stream is None else stream,
            x_ptr,
            recon_ptr,
            out_ptr,
            height,
            width,
            width if x_pitch is None else x_pitch,
            width if recon_pitch is None else recon_pitch,
            width if out_pitch is None else out_pitch,
            scale,
            0.5 * p.data_range,
            p.c1,
            p.c2,
        )

    # ----------------------------------------------------------------- host API

    def residual(self, x: npt.ArrayLike, recon: npt.ArrayLike, scale: float = 1.0) -> F32:
        """1 - SSIM(x * scale, recon) as float32 (H, W); x uint8, uint16 or float32."""
        xa = np.ascontiguousarray(x)
        ra = np.ascontiguousarray(recon, dtype=np.float32)
        if xa.dtype not in KERNELS:
            raise EngineError(
                f"CUDA residual: input must be uint8, uint16 or float32, not {xa.dtype}"
            )
        if xa.ndim != 2 or xa.shape != ra.shape:
            raise EngineError(
                f"CUDA residual needs two 2-D images of one shape, got {xa.shape} and {ra.shape}"
            )
        h, w = xa.shape
        with self.context.active() as cuda:
            try:
                dx = self._buffer(cuda, "x", xa.nbytes)
                dy = self._buffer(cuda, "recon", ra.nbytes)
                dout = self._buffer(cuda, "out", h * w * 4)
                host = self._pinned_out(cuda, h * w)
                cuda.memcpy_htod_async(dx, xa, self.stream)
                cuda.memcpy_htod_async(dy, ra, self.stream)
                self.launch(int(dx), int(dy), int(dout), h, w, xa.dtype, scale)
                cuda.memcpy_dtoh_async(host, dout, self.stream)
                self.stream.synchronize()
            except cuda.Error as exc:
                raise EngineError(f"CUDA residual failed: {exc}") from exc
        out: F32 = host.reshape(h, w).copy()
        return out

    def _buffer(self, cuda: Any, name: str, nbytes: int) -> Any:
        """A device buffer of at least ``nbytes``, grown (never shrunk) as frames need."""
        have = self._buffers.get(name)
        if have is not None and have[1] >= nbytes:
            return have[0]
        if have is not None:
            have[0].free()
        alloc = cuda.mem_alloc(max(nbytes, 1))
        self._buffers[name] = (alloc, nbytes)
        return alloc

    def _pinned_out(self, cuda: Any, count: int) -> F32:
        if self._host_out is None or self._host_out.size < count:
            if self._host_out is not None:
                free_pinned(self._host_out)
            self._host_out = cuda.pagelocked_empty(count, np.float32)
        out: F32 = self._host_out[:count]
        return out

    def close(self) -> None:
        """Free device and pinned memory, release the context; unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        with self.context.active():
            for alloc, _ in self._buffers.values():
                alloc.free()
            if self._host_out is not None:
                free_pinned(self._host_out)
        self._buffers.clear()
        self._host_out = None
        self.context.release()
