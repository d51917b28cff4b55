"""The CPU engine: PyTorch eager, channels_last, bf16 where the CPU has it.

Precision is chosen at start-up: ``auto`` picks bf16 on CPUs with native bf16 (AVX512-BF16 or
AMX), fp32 elsewhere. The choice is logged and exported as a metric label by the caller.
Measured with ``tools/bench.py`` (Table I network, batches of 64, 2 cores of an AVX512-BF16
EPYC without AMX): fp32 NCHW about 850 tiles/s, fp32 channels_last 1,120, bf16
channels_last 1,960; pixel AUROC moves by less than 1e-4 between fp32 and bf16.

What was tried and not adopted, because it gained less than the run-to-run noise (<= 5 %)
for a start-up cost or a fragility: ``torch.jit.trace`` + ``freeze`` (+3 %), ``torch.compile``
(+2 to 6 %, a minute of compilation per start), onnxruntime (fp32 only: as fast as fp32
channels_last), batches of 128 or 256 (slower: the activations leave the cache).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import torch

from linescan.backends import F32
from linescan.errors import EngineError
from linescan.model.autoencoder import VariationalAutoencoder
from linescan.model.bundle import Bundle
from linescan.threads import affinity_cores

PRECISIONS = ("auto", "fp32", "bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise EngineError(
            f"torch CPU backend: precision must be one of {PRECISIONS}, got {precision!r}"
        )
    if precision == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return precision


def vae_noise(latent: int, samples: int, seed: int = 0) -> torch.Tensor:
    """Fixed posterior noise: the same N draws for every tile, so inspection is deterministic
    (a tile's score never depends on which batch or frame it arrived in)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, latent, 1, 1, generator=g)


class TorchBackend:
    def __init__(self, bundle: Bundle, precision: str = "auto", threads: int | None = None) -> None:
        self.name = "torch"
        self.precision = resolve_precision(precision)
        if threads is not None:
            # Never a bigger OpenMP team than the cores this process may run on: a team larger
            # than its cores stalls at every barrier (see linescan.threads).
            torch.set_num_threads(max(1, min(threads, affinity_cores())))
        # A copy: ``Module.to`` works in place, and the caller's bundle (which may feed other
        # backends, or a second TorchBackend in another precision) must stay as it was.
        self._module = copy.deepcopy(bundle.module).eval()
        self._module = self._module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._meta = bundle.meta
        self._noise = (
            vae_noise(bundle.meta.latent, bundle.meta.vae_samples)
            if isinstance(self._module, VariationalAutoencoder)
            else None
        )
        # bf16 for the plain autoencoder: a bf16 copy of the weights, made once. Bit for bit
        # what autocast computes (autocast rounds the same fp32 weights to bf16, on every
        # call), without the per-call casts. The VAE keeps autocast: its posterior sampling
        # mixes fp32 noise into the bf16 code, which autocast promotes and casts back.
        self._bf16: torch.nn.Module | None = None
        if self.precision == "bf16" and self._noise is None:
            self._bf16 = copy.deepcopy(self._module).to(dtype=torch.bfloat16)

    @torch.inference_mode()
    def infer(self, batch: F32) -> F32:
        try:
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            x = x.contiguous(memory_format=torch.channels_last)
            if self._bf16 is not None:
                y = self._bf16(x.to(torch.bfloat16))
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                    y = self._forward(x)
            out: F32 = y.float().contiguous().numpy()
        except RuntimeError as exc:
            raise EngineError(f"torch CPU inference failed: {exc}") from exc
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._module
        if isinstance(m, VariationalAutoencoder):
            if self._noise is None:  # pragma: no cover - set in __init__ for a VAE
                raise EngineError("VAE backend without posterior noise")
            mu, logvar = m.encode(x)
            std = torch.exp(0.5 * logvar)
            outs = [m.decoder(mu + eps[None] * std) for eps in self._noise]
            return torch.cat(outs, dim=1)
        out: torch.Tensor = m(x)
        return out

    def close(self) -> None:
        return None
