"""Score -> mask -> regions: threshold, opening with a disk, 8-connected parts.

The opening is a true opening (erosion by the disk, then dilation by its reflection), so it
commutes with thresholding: ``open(score >= t) == (grey_open(score) >= t)``. Calibration uses
that to count, exactly, the regions every threshold would raise. The paper opens with a disk of
diameter 4 model pixels; a bundle states its own diameter (``opening_diameter``: chosen in camera
pixels, so that a 1/2-scale model does not erase a 4-pixel scratch). With a disk of diameter d
anchored at (d // 2, d // 2), an opened pixel depends on ``open_halo(d)`` = d - 1 rows on each
side; the daemon opens chunks with that halo and keeps the centre.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import cv2
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


# The disk of diameter 4, written out: OpenCV's MORPH_ELLIPSE of size 4x4 is lopsided (its top
# row has one pixel, its bottom row two), which would make "opening" depend on orientation.
DISK: U8 = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=np.uint8)
PAPER_DIAMETER = 4  # the paper's opening, in model pixels
OPEN_HALO = 3  # rows of context the paper's opening needs on each side (``open_halo(4)``)


def disk(diameter: int) -> U8:
    """The digital disk of ``diameter`` pixels: pixel centres within diameter / 2 of the centre.

    Symmetric under flips and 90-degree turns for every diameter (``disk(4) == DISK``); 1 is a
    single pixel (no opening), 2 a 2x2 square, 3 a 3x3 square.
    """
    if diameter < 1:
        raise ValueError(f"opening diameter must be >= 1, got {diameter}")
    c = np.arange(diameter, dtype=np.float64) + 0.5 - diameter / 2.0
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    out: U8 = (r2 <= (diameter / 2.0) ** 2 + 1e-9).astype(np.uint8)
    return out


def open_halo(diameter: int) -> int:
    """Rows of context an opened pixel depends on, on each side."""
    return diameter - 1


@lru_cache(maxsize=16)
def _structuring(diameter: int) -> tuple[U8, tuple[int, int], U8, tuple[int, int]]:
    k = disk(diameter)
    anchor = (diameter // 2, diameter // 2)
    reflected = np.ascontiguousarray(k[::-1, ::-1])
    anchor_reflected = (diameter - 1 - anchor[0], diameter - 1 - anchor[1])
    return k, anchor, reflected, anchor_reflected


@dataclass(frozen=True)
class Region:
    """A connected defect region. Boxes are end-exclusive, in original image pixels."""

    line_start: int
    line_end: int
    x_start: int
    x_end: int
    area_px: int
    score_max: float
    score_mean: float

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


def open_mask(mask: U8, diameter: int = PAPER_DIAMETER) -> U8:
    """Binary opening (0/1 uint8) with the disk of ``diameter`` pixels (default: the paper's)."""
    if diameter <= 1:
        return mask
    k, anchor, reflected, anchor_reflected = _structuring(diameter)
    eroded = cv2.erode(mask, k, anchor=anchor)
    out: U8 = cv2.dilate(eroded, reflected, anchor=anchor_reflected)
    return out


def grey_open(residual: F32, diameter: int = PAPER_DIAMETER) -> F32:
    """Grey-level opening: the highest threshold at which each pixel survives the opening."""
    if diameter <= 1:
        return residual
    k, anchor, reflected, anchor_reflected = _structuring(diameter)
    eroded = cv2.erode(residual, k, anchor=anchor)
    out: F32 = cv2.dilate(eroded, reflected, anchor=anchor_reflected)
    return out


def threshold_mask(residual: F32, threshold: float) -> U8:
    out: U8 = (residual >= np.float32(threshold)).astype(np.uint8)
    return out


@dataclass(frozen=True)
class Component:
    """A connected component in model pixels (end-exclusive box), with residual statistics."""

    y0: int
    y1: int
    x0: int
    x1: int
    area: int
    score_max: float
    score_sum: float


def label_components(
    mask: U8, residual: F32, y_origin: int = 0
) -> tuple[npt.NDArray[np.int32], list[tuple[Component, bool]]]:
    """8-connected components of ``mask``, each with whether it touches the mask's last row.

    Returns the label image too (component i of the list has label i + 1). Rows are offset by
    ``y_origin`` (the daemon's band does not start at line 0). Scores are summed in raster
    order in float64, so a component gets the same statistics whichever band holds it.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=cv2.CV_32S)
    if n <= 1:
        return labels, []
    lab = labels.ravel()
    sel = lab > 0
    ids = lab[sel]
    vals = residual.ravel()[sel].astype(np.float64)
    sums = np.bincount(ids, weights=vals, minlength=n)
    maxs = np.full(n, -np.inf)
    np.maximum.at(maxs, ids, vals)
    last_row = mask.shape[0] - 1
    out = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        comp = Component(
            y0=y + y_origin,
            y1=y + h + y_origin,
            x0=x,
            x1=x + w,
            area=area,
            score_max=float(maxs[i]),
            score_sum=float(sums[i]),
        )
        out.append((comp, y + h - 1 == last_row))
    return labels, out


def components(mask: U8, residual: F32, y_origin: int = 0) -> list[tuple[Component, bool]]:
    """``label_components`` without the label image."""
    return label_components(mask, residual, y_origin)[1]
