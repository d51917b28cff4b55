"""Residual -> mask -> regions: threshold, opening with a disk of diameter 4, 8-connected parts.

The opening is a true opening (erosion by the disk, then dilation by its reflection), so it
commutes with thresholding: ``open(residual >= t) == (grey_open(residual) >= t)``. Calibration
uses that to find, exactly, the lowest threshold at which a defect-free image stays clean.
With the 4x4 disk anchored at (2, 2), an opened pixel depends on ``OPEN_HALO`` = 3 rows on each
side; the daemon opens chunks with that halo and keeps the centre.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


# The disk of diameter 4, written out: OpenCV's MORPH_ELLIPSE of size 4x4 is lopsided (its top
# row has one pixel, its bottom row two), which would make "opening" depend on orientation.
DISK: U8 = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=np.uint8)
_ANCHOR = (2, 2)
_DISK_REFLECTED = np.ascontiguousarray(DISK[::-1, ::-1])
_ANCHOR_REFLECTED = (DISK.shape[1] - 1 - _ANCHOR[0], DISK.shape[0] - 1 - _ANCHOR[1])
OPEN_HALO = 3


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


def open_mask(mask: U8) -> U8:
    """Binary opening (0/1 uint8) with the disk of diameter 4."""
    eroded = cv2.erode(mask, DISK, anchor=_ANCHOR)
    out: U8 = cv2.dilate(eroded, _DISK_REFLECTED, anchor=_ANCHOR_REFLECTED)
    return out


def grey_open(residual: F32) -> F32:
    """Grey-level opening: the highest threshold at which each pixel survives the opening."""
    eroded = cv2.erode(residual, DISK, anchor=_ANCHOR)
    out: F32 = cv2.dilate(eroded, _DISK_REFLECTED, anchor=_ANCHOR_REFLECTED)
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
