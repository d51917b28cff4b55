"""The torch CUDA backend: for GPUs where TensorRT is not installed.

Why CUDA graphs: the autoencoder is 18 small layers; at the daemon's batch sizes eager
PyTorch spends more time launching kernels than running them. A graph per batch-size bucket
(powers of two up to ``max_batch``) is captured the first time that bucket is used, and every
later batch is one ``replay()``. A partial batch is padded up to its bucket (the padding rows
are zeros and are dropped from the output), so at most log2(max_batch) + 1 graphs exist.

Precision: ``auto`` is fp16 autocast (tensor cores on every GPU this targets, and a 10-bit
mantissa keeps the reconstructions within ~1e-3 of fp32); ``fp32`` and ``bf16`` on request.
The network is the one every engine runs (``linescan.export.inference_module``), so a VAE
decodes the same fixed posterior draws as the CPU backend.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np
import torch

from linescan.backends import F32
from linescan.errors import EngineError
from linescan.model.bundle import Bundle

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEFAULT_MAX_BATCH = 256
WARMUP = 3  # eager runs before capture: cuDNN picks its algorithms, lazy state is created


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... below ``max_batch``, then ``max_batch`` itself."""
    if max_batch < 1:
        raise EngineError(f"max_batch must be >= 1, got {max_batch}")
    sizes = []
    b = 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return tuple(sizes)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise EngineError(
            f"torch CUDA backend: precision must be one of {PRECISIONS}, got {precision!r}"
        )
    if precision == "auto":
        return "fp16"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise EngineError(f"GPU {torch.cuda.get_device_name(device)} has no bf16; use fp16")
    return precision


class _Graph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # (bucket, 1, p, p) float32 on the GPU, channels_last
    outputs: torch.Tensor  # (bucket, C, p, p) float32 on the GPU


class TorchCudaBackend:
    """The bundle's network on one GPU with CUDA graphs. Not thread-safe: one inference thread."""

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "auto",
        *,
        device: str = "cuda",
        max_batch: int = DEFAULT_MAX_BATCH,
        graphs: bool = True,
    ) -> None:
        from linescan.export import inference_module

        self.name = "torch-cuda"
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise EngineError(
                f"torch-cuda backend: CUDA is not available (torch {torch.__version__} is "
                f"{build}, and no NVIDIA GPU is visible); choose backend 'torch' on this machine"
            )
        try:
            self.device = torch.device(device)
            if self.device.type != "cuda":
                raise EngineError(f"torch-cuda backend needs a cuda device, got {device!r}")
            index = self.device.index or 0
            if index >= torch.cuda.device_count():
                raise EngineError(f"GPU {index} does not exist ({torch.cuda.device_count()} found)")
            self.precision = resolve_precision(precision, self.device)
            self._autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
            self._buckets = batch_buckets(max_batch)
            self.max_batch = max_batch
            self._use_graphs = graphs
            self._patch = bundle.meta.patch
            self._channels = bundle.meta.channels
            # A copy: .to() moves a module in place, and the bundle's CPU module may be in use.
            module = copy.deepcopy(inference_module(bundle)).eval()
            self._module = module.to(self.device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            p = self._patch
            self._host_in = torch.empty((max_batch, 1, p, p), dtype=torch.float32).pin_memory()
            self._host_out = torch.empty(
                (max_batch, self._channels, p, p), dtype=torch.float32
            ).pin_memory()
        except RuntimeError as exc:
            raise EngineError(f"torch-cuda backend cannot start: {exc}") from exc
        self._graphs: dict[int, _Graph] = {}

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # cuDNN settings scoped to this backend's kernels (a graph keeps the kernels chosen at
        # capture): benchmark, because every bucket has one fixed shape; no TF32 for fp32,
        # whose 10-bit mantissa would make "fp32" a reduced-precision mode.
        with (
            torch.backends.cudnn.flags(
                enabled=True, benchmark=True, deterministic=False,
                allow_tf32=self.precision != "fp32",
            ),
            torch.autocast(
                "cuda",
                dtype=self._autocast or torch.float16,
                enabled=self._autocast is not None,
                cache_enabled=False,  # required for graph capture; weights are cast in the graph
            ),
        ):  # fmt: skip
            y: torch.Tensor = self._module(x)
        return y.float()

    def _capture(self, size: int) -> _Graph:
        p = self._patch
        inputs = torch.zeros((size, 1, p, p), device=self.device).contiguous(
            memory_format=torch.channels_last
        )
        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self._forward(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._forward(inputs)
        return _Graph(graph, inputs, outputs)

    def bucket(self, size: int) -> int:
        """The padded batch size a batch of ``size`` tiles runs at."""
        return next(b for b in self._buckets if b >= size)

    @torch.inference_mode()
    def infer(self, batch: F32) -> F32:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        p = self._patch
        if x.ndim != 4 or x.shape[1:] != (1, p, p) or x.shape[0] == 0:
            raise EngineError(f"torch-cuda backend: expected (B, 1, {p}, {p}) tiles, got {x.shape}")
        outs = []
        try:
            # The daemon calls from its inference thread, whose current device is GPU 0.
            with torch.cuda.device(self.device):
                for i in range(0, x.shape[0], self.max_batch):
                    outs.append(self._run(x[i : i + self.max_batch]))
        except RuntimeError as exc:
            raise EngineError(f"torch-cuda inference failed: {exc}") from exc
        out: F32 = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)
        return out

    def _run(self, chunk: F32) -> F32:
        b = chunk.shape[0]
        host_in = self._host_in[:b]
        host_in.copy_(torch.from_numpy(chunk))
        stream = torch.cuda.current_stream(self.device)
        if not self._use_graphs:
            y = self._forward(
                host_in.to(self.device, non_blocking=True).contiguous(
                    memory_format=torch.channels_last
                )
            )
        else:
            size = self.bucket(b)
            g = self._graphs.get(size)
            if g is None:
                g = self._graphs[size] = self._capture(size)
            g.inputs[:b].copy_(host_in, non_blocking=True)
            if b < size:
                g.inputs[b:].zero_()
            g.graph.replay()
            y = g.outputs[:b]
        host_out = self._host_out[:b]
        host_out.copy_(y, non_blocking=True)
        stream.synchronize()
        out: F32 = host_out.numpy().copy()
        return out

    def close(self) -> None:
        self._graphs.clear()
        torch.cuda.empty_cache()
