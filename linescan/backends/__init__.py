"""Inference backends: ``infer(batch) -> reconstructions``, one small interface.

A backend takes a (B, 1, p, p) float32 batch of normalised tiles and returns (B, C, p, p)
float32 reconstructions (C = 1, or the N posterior decodes of a VAE). Everything else
(tiling, stitching, residuals) is the same whichever backend runs.

Backends are chosen by name in the config (``engine.backend``); optional ones import their
libraries only when chosen, so ``import linescan`` never needs TensorRT, onnxruntime or
OpenVINO.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


@runtime_checkable
class Backend(Protocol):
    name: str
    precision: str

    def infer(self, batch: F32) -> F32:
        """(B, 1, p, p) normalised tiles -> (B, C, p, p) reconstructions."""
        ...

    def close(self) -> None: ...


class FunctionBackend:
    """A backend from a plain function: for tests and for experiments without a network."""

    def __init__(self, fn: Callable[[F32], F32], name: str = "function") -> None:
        self._fn = fn
        self.name = name
        self.precision = "fp32"

    def infer(self, batch: F32) -> F32:
        return self._fn(batch)

    def close(self) -> None:
        return None


class FixedBatch:
    """Runs the inner backend on batches of exactly ``size`` tiles (zero-padded, or split).

    Why: a CPU convolution's result for one tile changes in its last bits with the batch it
    is computed in (oneDNN picks kernels and blockings by batch size). The offline pipeline
    cuts an image into batches one way and the daemon fills batches across frames another;
    with every network call the same size, a tile's reconstruction is the same bits wherever
    it travels, and the daemon's events equal the offline regions exactly. The padding costs
    nothing at steady state (the daemon fills whole batches) and little offline.
    """

    def __init__(self, inner: Backend, size: int) -> None:
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        self.inner = inner
        self.size = size
        self.name = inner.name
        self.precision = inner.precision

    def infer(self, batch: F32) -> F32:
        n = len(batch)
        outs = []
        for i in range(0, n, self.size):
            chunk = batch[i : i + self.size]
            k = len(chunk)
            if k < self.size:
                pad = np.zeros((self.size - k, *chunk.shape[1:]), dtype=np.float32)
                chunk = np.concatenate([chunk, pad])
            outs.append(self.inner.infer(chunk)[:k])
        if not outs:
            return np.zeros((0, *batch.shape[1:]), dtype=np.float32)
        out: F32 = outs[0] if len(outs) == 1 else np.concatenate(outs)
        return out

    def close(self) -> None:
        self.inner.close()


BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt", "torch-cuda")


def create_backend(
    bundle: object,
    name: str = "torch",
    precision: str = "auto",
    threads: int | None = None,
    batch: int | None = 64,
    device: str = "cpu",
) -> Backend:
    """The backend ``name`` for a loaded bundle; optional libraries are imported here only.

    With ``batch`` set (the default, 64 = ``inspection.max_batch``) every network call gets
    exactly that many tiles (see ``FixedBatch``); pass the same value to the offline pipeline's
    ``Settings.max_batch`` and the daemon's ``max_batch``.
    """
    inner = _create(bundle, name, precision, threads, batch or 64, device)
    return FixedBatch(inner, batch) if batch else inner


def _create(
    bundle: object, name: str, precision: str, threads: int | None, batch: int, device: str
) -> Backend:
    from linescan.errors import EngineError
    from linescan.model.bundle import Bundle

    if not isinstance(bundle, Bundle):
        raise TypeError("create_backend needs a loaded model bundle")
    if name == "torch":
        from linescan.backends.torch_cpu import TorchBackend

        return TorchBackend(bundle, precision=precision, threads=threads)
    if name == "onnxruntime":
        from linescan.backends.onnx_cpu import OnnxBackend

        backend: Backend = OnnxBackend(bundle, threads=threads)
        return backend
    if name == "openvino":
        from linescan.backends.openvino_cpu import OpenVinoBackend

        ov: Backend = OpenVinoBackend(bundle, precision=precision, threads=threads, max_batch=batch)
        return ov
    if name == "tensorrt":
        from linescan.backends.tensorrt import TensorRTBackend

        index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        trt: Backend = TensorRTBackend(
            bundle, precision=precision, device=index, max_batch=batch, opt_batch=batch
        )
        return trt
    if name == "torch-cuda":
        from linescan.backends.torch_cuda import TorchCudaBackend

        cuda: Backend = TorchCudaBackend(
            bundle,
            precision=precision,
            device=device if device.startswith("cuda") else "cuda",
            max_batch=batch,
        )
        return cuda
    raise EngineError(f"unknown backend {name!r}; expected one of {BACKENDS}")
