"""Residual maps: how badly each pixel was reconstructed. Higher means more defective.

* ``ssim``: 1 - SSIM(input, reconstruction), the paper's choice (see ``ssim.py`` for the one
  definition shared with the training loss). Values in [0, 2].
* ``l2``: the per-pixel squared difference.
* ``vae``: the negative log reconstruction probability of each pixel under N decodes of
  posterior samples (An & Cho 2015, as the paper's VAE baseline with N = 6): with a Gaussian
  decoder of fixed spread sigma, -log((1/N) sum_n exp(-(x - r_n)^2 / (2 sigma^2))), constants
  dropped. sigma is measured at the end of training (the RMS reconstruction error) and stored
  in the bundle.

Halo: a residual row depends on ``halo(kind, params)`` input and reconstruction rows on each
side. The daemon computes residuals on chunks with that halo and keeps the centre rows.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

from linescan.ssim import SSIMParams, dssim_map

F32 = npt.NDArray[np.float32]
ResidualKind = Literal["ssim", "l2", "vae"]
RESIDUAL_KINDS: tuple[ResidualKind, ...] = ("ssim", "l2", "vae")


def halo(kind: ResidualKind, params: SSIMParams) -> int:
    return params.radius if kind == "ssim" else 0


def ssim_residual(x: F32, recon: F32, params: SSIMParams) -> F32:
    return dssim_map(x, recon, params)


def l2_residual(x: F32, recon: F32) -> F32:
    d = x - recon
    out: F32 = d * d
    return out


def vae_residual(x: F32, samples: F32, sigma: float) -> F32:
    """samples: (N, H, W) decodes; returns -log mean_n exp(-(x - r_n)^2 / (2 sigma^2))."""
    d = (samples - x[None]) / np.float32(sigma)
    e = -0.5 * d * d
    m = e.max(axis=0)
    lse = m + np.log(np.exp(e - m[None]).mean(axis=0))
    out: F32 = (-lse).astype(np.float32)
    return out


def compute_residual(
    kind: ResidualKind, x: F32, recon: F32, params: SSIMParams, vae_sigma: float = 0.1
) -> F32:
    """Residual of a (H, W) input against its (C, H, W) stitched reconstruction."""
    if recon.ndim != 3:
        raise ValueError(f"reconstruction must be (C, H, W), got shape {recon.shape}")
    if kind == "ssim":
        return ssim_residual(x, recon[0], params)
    if kind == "l2":
        return l2_residual(x, recon[0])
    if kind == "vae":
        return vae_residual(x, recon, vae_sigma)
    raise ValueError(f"unknown residual kind {kind!r}; expected one of {RESIDUAL_KINDS}")
