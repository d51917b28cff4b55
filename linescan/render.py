"""Pictures of an inspection for people: heat map, mask and outlined overlay (paper Figure 5)."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from linescan.preprocess import InputSpec, upscale_to

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


def to_display(pixels: npt.NDArray[np.generic], bit_depth: int) -> U8:
    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    scaled = pixels.astype(np.float32) * (255.0 / (2**bit_depth - 1))
    out: U8 = np.clip(scaled, 0, 255).astype(np.uint8)
    return out


def heat_map(residual: F32, threshold: float, height: int, width: int, spec: InputSpec) -> U8:
    """Residual as a colour map scaled to [0, 2 * threshold]: the threshold sits mid-scale."""
    big = upscale_to(residual, height, width, spec, nearest=False)
    top = 2.0 * threshold if threshold > 0 else float(max(big.max(), 1e-6))
    grey = np.clip(big / top * 255.0, 0, 255).astype(np.uint8)
    out: U8 = cv2.applyColorMap(grey, cv2.COLORMAP_JET)
    return out


def full_mask(mask: U8, height: int, width: int, spec: InputSpec) -> U8:
    out: U8 = (upscale_to(mask.astype(np.float32), height, width, spec, nearest=True) > 0).astype(
        np.uint8
    ) * 255
    return out


def overlay(display: U8, mask_full: U8) -> U8:
    """The input in grey with every defect outlined in red."""
    rgb = cv2.cvtColor(display, cv2.COLOR_GRAY2BGR)
    contours, _ = cv2.findContours(mask_full, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(display.shape) / 400))
    cv2.drawContours(rgb, contours, -1, (0, 0, 255), thickness)
    out: U8 = rgb
    return out
