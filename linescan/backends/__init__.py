"""Inference backends: ``infer(batch) -> reconstructions``, one small interface.

A backend takes a (B, 1, p, p) float32 batch of normalised tiles and returns (B, C, p, p)
float32 reconstructions (C = 1, or the N posterior decodes of a VAE). Everything else
(tiling, stitching, residuals) is the same whichever backend runs.

Backends are chosen by name in the config (``engine.backend``); optional ones import their
libraries only when chosen, so ``import linescan`` never needs TensorRT or onnxruntime.
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


BACKENDS = ("torch", "onnxruntime", "tensorrt", "torch-cuda")


def create_backend(
    bundle: object, name: str = "torch", precision: str = "auto", threads: int | None = None
) -> Backend:
    """The backend ``name`` for a loaded bundle; optional libraries are imported here only."""
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
    if name == "tensorrt":
        from linescan.backends.tensorrt import TensorRTBackend

        trt: Backend = TensorRTBackend(bundle, precision=precision)
        return trt
    if name == "torch-cuda":
        from linescan.backends.torch_cuda import TorchCudaBackend

        cuda: Backend = TorchCudaBackend(bundle, precision=precision)
        return cuda
    raise EngineError(f"unknown backend {name!r}; expected one of {BACKENDS}")
