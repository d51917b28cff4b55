"""Residual maps: how badly each pixel was reconstructed. Higher means more defective.

* ``ssim``: 1 - SSIM(input, reconstruction), the paper's choice (see ``ssim.py`` for the one
  definition shared with the training loss). Values in [0, 2].
* ``l2``: the per-pixel squared difference.
* ``vae``: the negative log reconstruction probability of each pixel under N decodes of
  posterior samples (An & Cho 2015, as the paper's VAE baseline with N = 6): with a Gaussian
  decoder of fixed spread sigma, -log((1/N) sum_n exp(-(x - r_n)^2 / (2 sigma^2))), constants
  dropped. sigma is measured at the end of training (the RMS reconstruction error) and stored
  in the bundle.
* ``combined`` (beyond the paper): the larger of two normalised maps, 1 - SSIM and the absolute
  difference |x - r| smoothed by the SSIM window. SSIM normalises by local contrast, so a dark
  or bright spot on a busy texture can score lower than the texture's own edges; the smoothed
  difference sees exactly such intensity outliers. The two live on different scales, so they
  are combined only after each is normalised by its statistics on defect-free material
  (``score.py``): a ``combined`` bundle always carries those statistics.

Each kind is made of *components* (``COMPONENTS``): the maps that are normalised one by one and
then combined by their maximum.

Halo: a residual row depends on ``halo(kind, params)`` input and reconstruction rows on each
side. The daemon computes residuals on chunks with that halo and keeps the centre rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

from linescan.ssim import SSIMParams, dssim_map, window_kernels

F32 = npt.NDArray[np.float32]
ResidualKind = Literal["ssim", "l2", "vae", "combined"]
RESIDUAL_KINDS: tuple[ResidualKind, ...] = ("ssim", "l2", "vae", "combined")
Component = Literal["dssim", "absdiff", "sqdiff", "vae"]
COMPONENTS: dict[ResidualKind, tuple[Component, ...]] = {
    "ssim": ("dssim",),
    "l2": ("sqdiff",),
    "vae": ("vae",),
    "combined": ("dssim", "absdiff"),
}
DssimFn = Callable[[F32, F32], F32]  # another engine for 1 - SSIM (the fused CUDA kernel)


def halo(kind: ResidualKind, params: SSIMParams) -> int:
    return params.radius if kind in ("ssim", "combined") else 0


def ssim_residual(x: F32, recon: F32, params: SSIMParams) -> F32:
    return dssim_map(x, recon, params)


def smoothed_absdiff(x: F32, recon: F32, params: SSIMParams) -> F32:
    """|x - recon| averaged by the SSIM window (same kernel, same reflected border, same
    row-then-column passes as ``ssim.py``, so a band of rows with its halo gives the whole
    image's rows bit for bit)."""
    krow, kcol = window_kernels(params)
    d = np.abs(np.subtract(x, recon, dtype=np.float32))
    rows = cv2.filter2D(d, cv2.CV_32F, krow, borderType=cv2.BORDER_REFLECT)
    out: F32 = cv2.sepFilter2D(
        rows, cv2.CV_32F, np.ones(1, np.float32), kcol, borderType=cv2.BORDER_REFLECT
    )
    return out


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
    if kind == "combined":
        raise ValueError("the combined residual exists only as a normalised score (score.py)")
    raise ValueError(f"unknown residual kind {kind!r}; expected one of {RESIDUAL_KINDS}")


def residual_components(
    kind: ResidualKind,
    x: F32,
    recon: F32,
    params: SSIMParams,
    vae_sigma: float = 0.1,
    dssim: DssimFn | None = None,
) -> dict[Component, F32]:
    """The component maps of a residual kind for a (H, W) input and (C, H, W) reconstruction.

    ``dssim`` may stand in for the CPU 1 - SSIM (the fused CUDA kernel, same definition).
    """
    if recon.ndim != 3:
        raise ValueError(f"reconstruction must be (C, H, W), got shape {recon.shape}")
    if kind not in COMPONENTS:
        raise ValueError(f"unknown residual kind {kind!r}; expected one of {RESIDUAL_KINDS}")
    out: dict[Component, F32] = {}
    for comp in COMPONENTS[kind]:
        if comp == "dssim":
            out[comp] = (
                dssim(x, recon[0]) if dssim is not None else ssim_residual(x, recon[0], params)
            )
        elif comp == "absdiff":
            out[comp] = smoothed_absdiff(x, recon[0], params)
        elif comp == "sqdiff":
            out[comp] = l2_residual(x, recon[0])
        else:
            out[comp] = vae_residual(x, recon, vae_sigma)
    return out
