"""The TensorRT backend: an engine built from the bundle's ONNX export, run with pycuda.

Building (``build_engine``, ``linescan build-engine``, or the backend on first start): the
ONNX export (checked against its recorded sha256) is parsed into a strongly typed network,
given one optimisation profile over the batch (min 1, opt, max), and built with a timing cache
kept beside the engines so rebuilds are quick. Precision comes from the graph, not from builder
flags: TensorRT 11 builds only strongly typed networks and has no FP16 flag, so an FP16 engine
is built from the bundle's FP16 export (``model.fp16.onnx``, FP16 inside, FP32 at the
boundary), and TensorRT 10 is asked for the same strongly typed build.
The plan is filed under a key over everything it depends on (``linescan.engine_cache``); a
stale or foreign engine is rebuilt, never loaded.

Running (``TensorRTBackend``): the engine, its execution context, device buffers and pinned
host buffers are created once. A batch goes H2D on its slot's copy stream, runs on the compute
stream (``execute_async_v3``), and comes back D2H on the copy stream, ordered by events; two
slots let batch k+1's upload and batch k-1's download overlap batch k's compute
(``infer_async`` + ``Pending.result``, or ``infer`` on more than ``max_batch`` tiles). One
execution context serves both slots: TensorRT lets a context use one optimisation profile on one
stream at a time, and compute is serial on the GPU anyway.

tensorrt and pycuda are imported only here, when the backend is chosen; without them every
entry point raises ``EngineError`` naming ``pip install 'linescan[gpu]'``. TensorRT's own
logger is routed to structlog. Every CUDA or TensorRT failure becomes ``EngineError`` with the
cause attached. Not thread-safe: one inference thread per backend.
"""

from __future__ import annotations

import collections
import functools
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from linescan.backends import F32
from linescan.backends.cuda_residual import GPU_HINT, CudaContext, free_pinned
from linescan.backends.onnx_cpu import checked_onnx_path
from linescan.engine_cache import (
    EngineKey,
    default_engines_dir,
    engine_path,
    lookup,
    other_engines,
    store,
    timing_cache_path,
    why_not_usable,
)
from linescan.errors import EngineError, LinescanError, ModelError
from linescan.log import get_logger
from linescan.model.bundle import Bundle, load_bundle, read_meta

PRECISIONS = ("auto", "fp32", "fp16")
DEFAULT_MAX_BATCH = 256
DEFAULT_OPT_BATCH = 64
WORKSPACE_BYTES = 4 << 30
SLOTS = 2

log = get_logger("linescan.tensorrt")


def import_tensorrt() -> Any:
    """The tensorrt module; EngineError with the install command when it is missing."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError(f"the TensorRT backend needs TensorRT 10: {GPU_HINT}") from exc
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise EngineError(f"TensorRT {trt.__version__} is too old (need 10+): {GPU_HINT}")
    return trt


@contextmanager
def _guard(what: str) -> Iterator[None]:
    """Re-raise CUDA/TensorRT failures (any exception type they use) as EngineError."""
    try:
        yield
    except LinescanError:
        raise
    except Exception as exc:  # pycuda.driver.Error, RuntimeError/TypeError from TensorRT
        raise EngineError(f"TensorRT {what} failed: {exc}") from exc


@functools.cache
def trt_logger() -> Any:
    """One TensorRT logger per process, forwarding to structlog.

    TensorRT's INFO messages are build chatter, so they go to debug; VERBOSE is dropped.
    """
    trt = import_tensorrt()
    sev = trt.ILogger.Severity
    levels = {
        sev.INTERNAL_ERROR: "error",
        sev.ERROR: "error",
        sev.WARNING: "warning",
        sev.INFO: "debug",
    }

    class StructlogTrtLogger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity)
            if level is not None:
                getattr(log, level)("tensorrt", message=msg, severity=str(severity))

    return StructlogTrtLogger()


def resolve_fp16(precision: str, builder: Any) -> bool:
    """Whether to build with FP16: asked for (``fp16``, or ``auto``) and fast on this GPU.

    TensorRT 11 dropped ``platform_has_fast_fp16`` (every GPU it supports has fast FP16);
    where the attribute is missing the answer is yes.
    """
    if precision not in PRECISIONS:
        raise EngineError(
            f"TensorRT backend: precision must be one of {PRECISIONS}, got {precision!r}"
        )
    if precision == "fp32":
        return False
    with warnings.catch_warnings():
        # Deprecated in recent TensorRT 10 releases (every supported GPU has fast FP16), yet
        # still the documented check; the answer is what matters, not the warning.
        warnings.simplefilter("ignore", DeprecationWarning)
        fast = bool(getattr(builder, "platform_has_fast_fp16", True))
    if not fast and precision == "fp16":
        log.warning("tensorrt_fp16_unsupported", detail="this GPU has no fast FP16; building FP32")
    return fast


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def network_flags(trt: Any) -> int:
    """``create_network`` flags for a strongly typed network on this TensorRT.

    TensorRT 11 networks are always strongly typed (the flag remains, deprecated and ignored);
    TensorRT 10 needs the flag, or it would pick layer precisions itself.
    """
    if int(str(trt.__version__).split(".")[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _build(trt: Any, bundle: Bundle, onnx: Path, key: EngineKey, engines_dir: Path) -> bytes:
    """Parse the ONNX export and build a serialised engine for ``key`` (context current)."""
    logger = trt_logger()
    p = bundle.meta.patch
    with _guard("engine build"):
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT cannot parse {onnx}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        profile = builder.create_optimization_profile()
        name = network.get_input(0).name
        profile.set_shape(name, (1, 1, p, p), (key.opt_batch, 1, p, p), (key.max_batch, 1, p, p))
        config.add_optimization_profile(profile)
        if not key.fp16 and hasattr(trt.BuilderFlag, "TF32"):
            # TensorRT allows TF32 (a 10-bit mantissa) for FP32 convolutions by default; "fp32"
            # means fp32 here, so the engine agrees with the CPU within 1e-4 and FP16 (from
            # the FP16 export) stays the explicit fast path.
            config.clear_flag(trt.BuilderFlag.TF32)
        timing = timing_cache_path(engines_dir, key)
        engines_dir.mkdir(parents=True, exist_ok=True)
        cache = config.create_timing_cache(timing.read_bytes() if timing.is_file() else b"")
        config.set_timing_cache(cache, False)
        t0 = time.monotonic()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"TensorRT could not build an engine from {onnx} (see the log)")
        _atomic_write(timing, bytes(config.get_timing_cache().serialize()))
        log.info(
            "tensorrt_engine_built",
            bundle=str(bundle.path),
            seconds=round(time.monotonic() - t0, 1),
            fp16=key.fp16,
            max_batch=key.max_batch,
            opt_batch=key.opt_batch,
        )
        return bytes(serialized)


def choose_onnx(bundle: Bundle, precision: str, fp16: bool) -> tuple[bool, Path, str]:
    """(fp16, the checked ONNX export to build from, its recorded sha256).

    A bundle exported before FP16 exports existed has no ``model.fp16.onnx``: ``auto`` then
    builds FP32 with a warning rather than refusing to start after an upgrade; an explicit
    ``fp16`` stays strict (ModelError naming ``linescan export``).
    """
    if fp16 and precision == "auto" and read_meta(bundle.path).onnx_fp16_sha256 is None:
        log.warning(
            "tensorrt_fp16_export_missing",
            bundle=str(bundle.path),
            detail=f"building FP32; run `linescan export --model {bundle.path}` for FP16",
        )
        fp16 = False
    onnx = checked_onnx_path(bundle, fp16=fp16)
    meta = read_meta(bundle.path)  # the record checked_onnx_path just used
    onnx_sha = meta.onnx_fp16_sha256 if fp16 else meta.onnx_sha256
    if onnx_sha is None:  # pragma: no cover - checked_onnx_path refuses this
        raise ModelError(f"{onnx} has no recorded checksum")
    return fp16, onnx, onnx_sha


def ensure_engine(
    trt: Any,
    cuda_ctx: CudaContext,
    bundle: Bundle,
    precision: str,
    max_batch: int,
    opt_batch: int,
    engines_dir: Path,
    build: bool = True,
    force: bool = False,
) -> tuple[Path, EngineKey]:
    """The engine for this bundle, GPU and flags: from the cache, else built (context current)."""
    if not 1 <= opt_batch <= max_batch:
        raise EngineError(f"need 1 <= --opt-batch <= --max-batch, got {opt_batch} and {max_batch}")
    with _guard("builder start"):
        fp16 = resolve_fp16(precision, trt.Builder(trt_logger()))
    fp16, onnx, onnx_sha = choose_onnx(bundle, precision, fp16)
    key = EngineKey(
        onnx_sha256=onnx_sha,
        tensorrt_version=str(trt.__version__),
        gpu_name=cuda_ctx.name,
        compute_capability=cuda_ctx.compute_capability,
        fp16=fp16,
        max_batch=max_batch,
        opt_batch=opt_batch,
    )
    plan = None if force else lookup(engines_dir, bundle.meta.name, key)
    if plan is not None:
        log.info("tensorrt_engine_cached", engine=str(plan))
        return plan, key
    expected = engine_path(engines_dir, bundle.meta.name, key)
    reason = "forced" if force else why_not_usable(expected, key)
    stale = [str(p) for p in other_engines(engines_dir, bundle.meta.name, key)]
    if not build:
        raise EngineError(
            f"no usable TensorRT engine for {bundle.path} on this GPU ({reason}): run "
            f"`linescan build-engine --model {bundle.path}`"
        )
    log.info("tensorrt_engine_building", engine=str(expected), reason=reason, stale=stale)
    data = _build(trt, bundle, onnx, key, engines_dir)
    extra = {"built": datetime.now(UTC).isoformat(timespec="seconds"), "onnx": str(onnx)}
    return store(engines_dir, bundle.meta.name, key, data, extra), key


def build_engine(
    bundle_path: Path,
    fp16: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int = DEFAULT_OPT_BATCH,
    engines_dir: Path | None = None,
    *,
    device: int = 0,
    force: bool = False,
) -> Path:
    """Build (or find cached) the engine for a bundle on GPU ``device``; returns the plan."""
    trt = import_tensorrt()
    cuda_ctx = CudaContext(device)
    try:
        bundle = load_bundle(Path(bundle_path))
        with cuda_ctx.active():
            plan, _ = ensure_engine(
                trt,
                cuda_ctx,
                bundle,
                "fp16" if fp16 else "fp32",
                max_batch,
                opt_batch,
                engines_dir or default_engines_dir(),
                force=force,
            )
    finally:
        cuda_ctx.release()
    return plan


class _Slot:
    """One set of buffers: pinned host in/out, device in/out, a copy stream and its events."""

    def __init__(
        self,
        cuda: Any,
        in_shape: tuple[int, ...],
        in_dtype: Any,
        out_shape: tuple[int, ...],
        out_dtype: Any,
    ) -> None:
        self.host_in = cuda.pagelocked_empty(in_shape, in_dtype)
        self.host_out = cuda.pagelocked_empty(out_shape, out_dtype)
        self.dev_in = cuda.mem_alloc(self.host_in.nbytes)
        self.dev_out = cuda.mem_alloc(self.host_out.nbytes)
        self.stream = cuda.Stream()
        self.uploaded = cuda.Event()
        self.computed = cuda.Event()
        self.downloaded = cuda.Event()
        self.pending: Pending | None = None

    def free(self) -> None:
        self.dev_in.free()
        self.dev_out.free()
        free_pinned(self.host_in)
        free_pinned(self.host_out)


class Pending:
    """A batch in flight; ``result()`` waits for its download and returns (B, C, p, p)."""

    def __init__(self, backend: TensorRTBackend, slot: _Slot, size: int) -> None:
        self._backend = backend
        self._slot: _Slot | None = slot
        self._size = size
        self._result: F32 | None = None

    def result(self) -> F32:
        if self._result is None:
            slot = self._slot
            if slot is None:  # pragma: no cover - _slot is only cleared with _result set
                raise EngineError("TensorRT batch lost its buffers")
            with self._backend.context.active(), _guard("download"):
                slot.downloaded.synchronize()
                self._result = np.asarray(slot.host_out[: self._size], dtype=np.float32).copy()
            slot.pending = None
            self._slot = None
        return self._result


class TensorRTBackend:
    """The bundle's TensorRT engine on one GPU, built on first start when none is cached."""

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "auto",
        *,
        device: int = 0,
        max_batch: int = DEFAULT_MAX_BATCH,
        opt_batch: int = DEFAULT_OPT_BATCH,
        engines_dir: Path | None = None,
        build: bool = True,
    ) -> None:
        self.name = "tensorrt"
        trt = import_tensorrt()
        self.context = CudaContext(device)
        self._closed = False
        self._patch = bundle.meta.patch
        self._channels = bundle.meta.channels
        try:
            with self.context.active() as cuda, _guard("engine load"):
                self.engine_path, key = ensure_engine(
                    trt,
                    self.context,
                    bundle,
                    precision,
                    max_batch,
                    opt_batch,
                    engines_dir or default_engines_dir(),
                    build=build,
                )
                self.precision = "fp16" if key.fp16 else "fp32"
                self._runtime = trt.Runtime(trt_logger())
                self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
                if self._engine is None:
                    raise EngineError(f"TensorRT cannot load {self.engine_path} (see the log)")
                self._exec = self._engine.create_execution_context()
                if self._exec is None:
                    raise EngineError("TensorRT cannot create an execution context")
                self._setup_io(trt, cuda)
        except BaseException:
            self.context.release()
            raise

    def _setup_io(self, trt: Any, cuda: Any) -> None:
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(f"engine {self.engine_path} has I/O {names}, expected one of each")
        self._in, self._out = inputs[0], outputs[0]
        _, _, max_shape = self._engine.get_tensor_profile_shape(self._in, 0)
        self.max_batch = int(max_shape[0])
        p = self._patch
        if not self._exec.set_input_shape(self._in, (1, 1, p, p)):
            raise EngineError(f"engine {self.engine_path} does not take {p}x{p} tiles")
        out_shape = tuple(self._exec.get_tensor_shape(self._out))
        if out_shape != (1, self._channels, p, p):
            raise EngineError(
                f"engine {self.engine_path} returns {out_shape} per tile, the bundle expects "
                f"{(1, self._channels, p, p)}"
            )
        in_dtype = trt.nptype(self._engine.get_tensor_dtype(self._in))
        out_dtype = trt.nptype(self._engine.get_tensor_dtype(self._out))
        self._compute = cuda.Stream()
        self._slots = [
            _Slot(
                cuda,
                (self.max_batch, 1, p, p),
                in_dtype,
                (self.max_batch, self._channels, p, p),
                out_dtype,
            )
            for _ in range(SLOTS)
        ]
        self._next = 0

    def infer_async(self, batch: F32) -> Pending:
        """Enqueue one batch of at most ``max_batch`` tiles; returns at once."""
        if self._closed:
            raise EngineError("TensorRT backend is closed")
        x = np.asarray(batch)
        p = self._patch
        if x.ndim != 4 or x.shape[1:] != (1, p, p) or not 1 <= x.shape[0] <= self.max_batch:
            raise EngineError(
                f"TensorRT backend: expected (1..{self.max_batch}, 1, {p}, {p}) tiles, "
                f"got {x.shape}"
            )
        b = x.shape[0]
        slot = self._slots[self._next]
        self._next = (self._next + 1) % SLOTS
        if slot.pending is not None:
            slot.pending.result()  # the slot's previous batch must be out before reuse
        with self.context.active() as cuda, _guard("inference"):
            np.copyto(slot.host_in[:b], x, casting="same_kind")
            cuda.memcpy_htod_async(slot.dev_in, slot.host_in[:b], slot.stream)
            slot.uploaded.record(slot.stream)
            self._compute.wait_for_event(slot.uploaded)
            if not self._exec.set_input_shape(self._in, (b, 1, p, p)):
                raise EngineError(f"TensorRT rejected a batch of {b}")
            self._exec.set_tensor_address(self._in, int(slot.dev_in))
            self._exec.set_tensor_address(self._out, int(slot.dev_out))
            if not self._exec.execute_async_v3(self._compute.handle):
                raise EngineError("TensorRT execute_async_v3 failed (see the log)")
            slot.computed.record(self._compute)
            slot.stream.wait_for_event(slot.computed)
            cuda.memcpy_dtoh_async(slot.host_out[:b], slot.dev_out, slot.stream)
            slot.downloaded.record(slot.stream)
        pending = Pending(self, slot, b)
        slot.pending = pending
        return pending

    def infer(self, batch: F32) -> F32:
        """(B, 1, p, p) -> (B, C, p, p); batches above ``max_batch`` run pipelined in chunks."""
        x = np.asarray(batch)
        if x.ndim != 4 or x.shape[0] == 0:
            raise EngineError(f"TensorRT backend: expected (B, 1, p, p) tiles, got {x.shape}")
        in_flight: collections.deque[Pending] = collections.deque()
        outs: list[F32] = []
        for i in range(0, x.shape[0], self.max_batch):
            if len(in_flight) == SLOTS:
                outs.append(in_flight.popleft().result())
            in_flight.append(self.infer_async(x[i : i + self.max_batch]))
        outs.extend(p.result() for p in in_flight)
        out: F32 = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self.context.active(), _guard("shutdown"):
            for slot in self._slots:
                slot.stream.synchronize()
            self._compute.synchronize()
            for slot in self._slots:
                slot.free()
            # TensorRT objects must go before the context: context, engine, runtime.
            del self._exec
            del self._engine
            del self._runtime
        self.context.release()
