"""ONNX export of a bundle's network: the input of every GPU engine.

``export_onnx`` writes ``BUNDLE/model.onnx`` with a dynamic batch axis (input ``tiles``
(B, 1, p, p), output ``reconstructions`` (B, C, p, p)) and records its sha256 in
``bundle.json``; backends that load the ONNX (onnxruntime, TensorRT builds) refuse a file whose
checksum differs, so a stale or tampered export is never run. ``verify_onnx`` runs the export
with onnxruntime on the CPU against the torch network and returns the largest difference.

Beside it goes ``BUNDLE/model.fp16.onnx``: the same network with FP16 weights and arithmetic
between a cast in and a cast out, so its inputs and outputs stay FP32. TensorRT 11 builds only
strongly typed networks (the precision of every tensor is the ONNX file's, and the FP16
builder flag is gone), so an FP16 engine needs an FP16 graph; TensorRT 10 builds it the same
way with the strongly typed flag. ``verify_onnx(..., precision="fp16")`` checks it with
onnxruntime against the FP32 torch network (within ``FP16_TOLERANCE``).

A VAE is exported as inspection uses it: encode, then decode the N fixed posterior noise draws
of ``torch_cpu.vae_noise`` (baked into the graph as a constant), so every engine returns the
same (B, N, p, p) reconstructions as the torch backend.

The legacy TorchScript exporter is used (``dynamo=False``): the dynamo exporter needs
``onnxscript``, which the ``onnx`` extra does not install, and this network (convolutions and
a reshape) is exactly what the tracer handles well.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from linescan.backends.torch_cpu import vae_noise
from linescan.errors import EngineError, ModelError
from linescan.model.autoencoder import VariationalAutoencoder
from linescan.model.bundle import (
    ONNX_FILE,
    ONNX_FP16_FILE,
    Bundle,
    load_bundle,
    sha256_file,
    update_meta,
)

INPUT_NAME = "tiles"
OUTPUT_NAME = "reconstructions"
DEFAULT_OPSET = 17
ONNX_HINT = "pip install 'linescan[onnx]'"
TOLERANCE = 1e-4
# FP16 has an 11-bit significand: reconstructions in [0, 1] come out within ~5e-4 of FP32 on
# the bundled model; 1e-2 still catches a broken graph (wrong weights, a lost cast).
FP16_TOLERANCE = 1e-2
# Not re-exported in torch.jit's type stubs; UserWarning if a future torch drops the name.
_TRACER_WARNING: type[Warning] = getattr(torch.jit, "TracerWarning", UserWarning)


class VAEInference(nn.Module):
    """A VAE as inspection runs it: N decodes of fixed posterior draws, (B, 1, p, p) ->
    (B, N, p, p). The same arithmetic as ``TorchBackend._forward``, batched over the draws."""

    noise: torch.Tensor

    def __init__(self, vae: VariationalAutoencoder, samples: int) -> None:
        super().__init__()
        self.vae = vae
        self.samples = samples
        self.register_buffer("noise", vae_noise(vae.latent, samples)[None])  # (1, N, d, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.vae.encode(x)  # (B, d, 1, 1)
        std = torch.exp(0.5 * logvar)
        z = mu[:, None] + self.noise * std[:, None]  # (B, N, d, 1, 1)
        decoded = self.vae.decoder(z.reshape(-1, self.vae.latent, 1, 1))  # (B * N, 1, p, p)
        p = decoded.shape[-1]
        out: torch.Tensor = decoded.reshape(-1, self.samples, p, p)
        return out


def inference_module(bundle: Bundle) -> nn.Module:
    """The network every non-torch-CPU backend runs: (B, 1, p, p) -> (B, C, p, p)."""
    module = bundle.module.eval()
    if isinstance(module, VariationalAutoencoder):
        return VAEInference(module, bundle.meta.vae_samples).eval()
    return module


class HalfPrecision(nn.Module):
    """``module`` in FP16 between a cast in and a cast out: FP32 tensors at the boundary."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(module).half().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.inner(x.half())
        return y.float()


def export_onnx(bundle_path: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``BUNDLE/model.onnx`` and ``BUNDLE/model.fp16.onnx`` (dynamic batch axis) and
    record both checksums in the bundle; returns the FP32 file's path."""
    bundle = load_bundle(Path(bundle_path))
    module = inference_module(bundle)
    p = bundle.meta.patch
    example = torch.rand(2, 1, p, p, generator=torch.Generator().manual_seed(0))
    out = bundle.path / ONNX_FILE
    out16 = bundle.path / ONNX_FP16_FILE
    # Both traced to temporary files first: a failure in either leaves the previous pair (and
    # its record) as it was, instead of one new file that no longer matches bundle.json.
    tmp = _export(module, example, bundle.path, opset)
    try:
        tmp16 = _export(HalfPrecision(module), example, bundle.path, opset)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sha, sha16 = sha256_file(tmp), sha256_file(tmp16)
    os.replace(tmp, out)
    os.replace(tmp16, out16)
    update_meta(bundle.path, onnx_sha256=sha, onnx_fp16_sha256=sha16)
    return out


def _export(module: nn.Module, example: torch.Tensor, where: Path, opset: int) -> Path:
    """Trace ``module`` into a new temporary file in ``where``; returns its path."""
    fd, tmp_name = tempfile.mkstemp(dir=where, prefix=f".{ONNX_FILE}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with warnings.catch_warnings():
            # The legacy exporter announces its deprecation and warns about traced shapes;
            # neither applies to a fixed convolutional graph, and the CLI should stay quiet.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", _TRACER_WARNING)
            with torch.no_grad():
                torch.onnx.export(
                    module,
                    (example,),
                    str(tmp),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, ImportError):
            raise ModelError(f"ONNX export needs the onnx package: {ONNX_HINT} ({exc})") from exc
        if isinstance(exc, RuntimeError | ValueError | TypeError):
            raise ModelError(f"ONNX export of {where} failed: {exc}") from exc
        raise
    return tmp


def verify_onnx(
    bundle_path: Path,
    batch_sizes: Sequence[int] = (1, 5),
    tolerance: float | None = None,
    seed: int = 0,
    precision: str = "fp32",
) -> float:
    """Max |onnxruntime - torch FP32| over random batches of each size; ModelError above
    ``tolerance`` (``TOLERANCE``, or ``FP16_TOLERANCE`` for the FP16 export). Several batch
    sizes check that the batch axis really is dynamic."""
    from linescan.backends.onnx_cpu import OnnxBackend

    if tolerance is None:
        tolerance = FP16_TOLERANCE if precision == "fp16" else TOLERANCE
    bundle = load_bundle(Path(bundle_path))
    module = inference_module(bundle)
    name = ONNX_FP16_FILE if precision == "fp16" else ONNX_FILE
    backend = OnnxBackend(bundle, threads=1, precision=precision)
    rng = np.random.default_rng(seed)
    p = bundle.meta.patch
    worst = 0.0
    try:
        for b in batch_sizes:
            x = rng.random((b, 1, p, p), dtype=np.float32)
            with torch.inference_mode():
                want = module(torch.from_numpy(x)).numpy()
            got = backend.infer(x)
            if got.shape != want.shape:
                raise ModelError(
                    f"{bundle.path / name}: batch of {b} gives shape {got.shape}, "
                    f"torch gives {want.shape}"
                )
            worst = max(worst, float(np.abs(got - want).max()))
    except EngineError as exc:
        raise ModelError(f"cannot run {bundle.path / name} with onnxruntime: {exc}") from exc
    finally:
        backend.close()
    if not worst <= tolerance:
        raise ModelError(
            f"{bundle.path / name} differs from the torch network by {worst:.2e} "
            f"(> {tolerance:.0e}); do not deploy it"
        )
    return worst
