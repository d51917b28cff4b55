"""The onnxruntime backend: the bundle's ONNX export on the CPU.

Why a second CPU backend: onnxruntime runs the exported graph without torch's eager overhead,
and running the very file TensorRT builds from checks the export on machines without a GPU.

The ONNX file is checked against the sha256 that ``linescan export`` recorded in
``bundle.json`` before it is loaded: a stale export (the weights were retrained since) or a
tampered file is refused with the command that fixes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from linescan.backends import F32
from linescan.errors import EngineError, ModelError
from linescan.model.bundle import ONNX_FILE, ONNX_FP16_FILE, Bundle, read_meta, sha256_file

ONNX_HINT = "pip install 'linescan[onnx]'"


def checked_onnx_path(bundle: Bundle, fp16: bool = False) -> Path:
    """The bundle's ONNX export (``model.onnx``, or ``model.fp16.onnx`` with ``fp16``) after
    checking it is the export recorded for these weights.

    The metadata is read again from disk: ``linescan export`` may have run after the bundle
    was loaded, and its record (not the one in memory) says which file is current.
    """
    name = ONNX_FP16_FILE if fp16 else ONNX_FILE
    path = bundle.path / name
    fix = f"run `linescan export --model {bundle.path}`"
    meta = read_meta(bundle.path)
    if meta.weights_sha256 != bundle.meta.weights_sha256:
        raise ModelError(
            f"model bundle {bundle.path} changed on disk since it was loaded; reload it"
        )
    if not path.is_file():
        raise ModelError(f"model bundle {bundle.path} has no {name}: {fix}")
    recorded = meta.onnx_fp16_sha256 if fp16 else meta.onnx_sha256
    if recorded is None or meta.onnx_sha256 is None:
        raise ModelError(
            f"{path} is not recorded in {bundle.path}/bundle.json (stale or foreign export): {fix}"
        )
    if sha256_file(path) != recorded:
        raise ModelError(
            f"{path} does not match the checksum in bundle.json (stale, corrupt or tampered "
            f"export); refusing to load it: {fix}"
        )
    return path


class OnnxBackend:
    """The ONNX export on onnxruntime's CPU provider, ``threads`` intra-op threads.

    ``precision="fp16"`` runs the FP16 export (what FP16 TensorRT engines are built from); on a
    CPU it is slower than FP32 and exists to check that file, not to serve with.
    """

    def __init__(self, bundle: Bundle, threads: int | None = None, precision: str = "fp32") -> None:
        self.name = "onnxruntime"
        if precision not in ("fp32", "fp16"):
            raise EngineError(
                f"onnxruntime backend: precision must be fp32 or fp16, not {precision!r}"
            )
        self.precision = precision
        path = checked_onnx_path(bundle, fp16=precision == "fp16")
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineError(f"the onnxruntime backend needs onnxruntime: {ONNX_HINT}") from exc
        opts = ort.SessionOptions()
        # 0 lets onnxruntime use every physical core; the daemon passes its own budget.
        opts.intra_op_num_threads = threads or 0
        # no spinning worker threads: they steal the core the rest of the pipeline runs on
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own, untyped exception classes
            raise EngineError(f"onnxruntime cannot load {path}: {exc}") from exc
        self._input = self._session.get_inputs()[0].name
        self._channels = bundle.meta.channels
        self._patch = bundle.meta.patch

    def infer(self, batch: F32) -> F32:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (1, self._patch, self._patch):
            raise EngineError(
                f"onnxruntime backend: expected (B, 1, {self._patch}, {self._patch}) tiles, "
                f"got {x.shape}"
            )
        try:
            (out,) = self._session.run(None, {self._input: x})
        except Exception as exc:  # onnxruntime raises its own, untyped exception classes
            raise EngineError(f"onnxruntime inference failed: {exc}") from exc
        result: F32 = np.asarray(out, dtype=np.float32)
        if result.shape != (x.shape[0], self._channels, self._patch, self._patch):
            raise EngineError(f"onnxruntime backend: unexpected output shape {result.shape}")
        return result

    def close(self) -> None:
        self._session = None
