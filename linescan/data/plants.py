"""Synthetic defects planted into real defect-free images, for calibration without labels.

Users rarely have labelled defects of their own material, yet the threshold (and the choice of
residual) should be judged by what it finds, not only by what it keeps quiet. ``linescan
calibrate`` therefore plants defects of several kinds into copies of the defect-free
calibration images and counts how many each threshold finds, next to the false alarms it
raises on the untouched images. The kinds are what a web shows and what a model can miss:

=================  ==========================================================================
``dark_spot``      a flat dark disk (hole, contamination, oil drop): radius 3-10 px
``bright_spot``    a flat bright disk (knot, fluff, glare)
``line_along``     a thin straight line along the web (a broken end, a scratch in the running
                   direction): 2-4 px wide, 40-160 px long
``line_across``    the same across the web (a broken pick, a crease)
``shifted_patch``  a square of the same material pasted from elsewhere in the image: the
                   texture is right, its phase is not (a weaving fault, a splice)
``smudge``         a soft-edged, low-contrast brightness change (a stain)
``smooth_patch``   a disk where the texture is gone and only its mean is left: a defect
                   *smoother* than the material (a flattened or glazed spot). On a stochastic
                   texture a blurry reconstruction looks more like this than like the
                   material, so every residual may rank it below chance: calibration says so
=================  ==========================================================================

Contrasts are set relative to the material around each plant (its local mean and standard
deviation), so the same kinds are equally "visible" on a dark foil and a bright nonwoven:
spots and lines at 3-6 standard deviations, smudges at 2-4. Sizes are in camera pixels.
Everything is drawn from the ``rng`` passed in: the same seed plants the same defects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]

PLANT_KINDS: tuple[str, ...] = (
    "dark_spot",
    "bright_spot",
    "line_along",
    "line_across",
    "shifted_patch",
    "smudge",
    "smooth_patch",
)
GUARD = 16  # camera pixels kept free between plants


@dataclass(frozen=True)
class Plant:
    """One planted defect: its kind and box (camera pixels, ends exclusive)."""

    kind: str
    y: int
    x: int
    height: int
    width: int


def _size(kind: str, rng: np.random.Generator, h: int, w: int) -> tuple[int, int, dict[str, float]]:
    """Box height and width of a plant, and its shape parameters."""
    lim = max(4, min(h, w) // 3)
    if kind in ("dark_spot", "bright_spot"):
        r = float(rng.uniform(3.0, min(10.0, lim / 2)))
        side = int(2 * np.ceil(r) + 1)
        return side, side, {"r": r}
    if kind in ("line_along", "line_across"):
        thick = int(rng.integers(2, 5))
        length = int(rng.integers(min(40, lim), min(160, max(41, lim)) + 1))
        return (length, thick, {}) if kind == "line_along" else (thick, length, {})
    if kind == "shifted_patch":
        side = int(rng.integers(min(24, lim), min(64, max(25, lim)) + 1))
        return side, side, {}
    if kind == "smudge":
        s = float(rng.uniform(5.0, min(12.0, max(5.0, lim / 5))))
        side = int(2 * np.ceil(2.5 * s) + 1)
        return side, side, {"s": s}
    r = float(rng.uniform(8.0, min(20.0, max(8.0, lim / 2))))  # smooth_patch
    side = int(2 * np.ceil(r) + 1)
    return side, side, {"r": r}


def _disk(h: int, w: int, r: float) -> F64:
    """Anti-aliased disk of radius r centred in an h x w box: coverage in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    d = np.hypot(yy - (h - 1) / 2.0, xx - (w - 1) / 2.0)
    out: F64 = np.clip(r + 0.5 - d, 0.0, 1.0)
    return out


def plant(
    image: npt.NDArray[np.generic],
    rng: np.random.Generator,
    kinds: Sequence[str] = PLANT_KINDS,
    columns: tuple[int, int] | None = None,
    max_value: float = 255.0,
) -> tuple[npt.NDArray[np.generic], list[Plant], I32]:
    """A copy of ``image`` with one defect of each of ``kinds`` (where they fit), the plants,
    and a label image (plant i is label i + 1) of the pixels each visibly changed.

    ``columns`` = [first, end) limits the plants to the web (camera pixels).
    """
    h, w = image.shape
    x_lo, x_hi = columns if columns is not None else (0, w)
    x_lo, x_hi = max(0, x_lo), min(w, x_hi)
    img = image.astype(np.float64)
    labels = np.zeros((h, w), dtype=np.int32)
    taken = np.zeros((h, w), dtype=bool)
    plants: list[Plant] = []
    for kind in kinds:
        bh, bw, shape = _size(kind, rng, h, x_hi - x_lo)
        if bh > h or bw > x_hi - x_lo:
            continue
        for _ in range(50):
            y = int(rng.integers(0, h - bh + 1))
            x = int(rng.integers(x_lo, x_hi - bw + 1))
            y0, y1 = max(0, y - GUARD), min(h, y + bh + GUARD)
            x0, x1 = max(0, x - GUARD), min(w, x + bw + GUARD)
            if not taken[y0:y1, x0:x1].any():
                break
        else:
            continue
        ctx = img[max(0, y - 24) : y + bh + 24, max(x_lo, x - 24) : min(x_hi, x + bw + 24)]
        mu = float(ctx.mean())
        sigma = max(float(ctx.std()), 0.02 * max_value)
        box = img[y : y + bh, x : x + bw]
        changed = _draw(kind, box, shape, rng, img, (y, x), (x_lo, x_hi), mu, sigma, max_value)
        if changed is None:
            continue
        new, mask = changed
        img[y : y + bh, x : x + bw] = new
        plants.append(Plant(kind, y, x, bh, bw))
        labels[y : y + bh, x : x + bw][mask] = len(plants)
        taken[max(0, y - GUARD) : y + bh + GUARD, max(0, x - GUARD) : x + bw + GUARD] = True
    out = np.clip(np.rint(img), 0, max_value).astype(image.dtype)
    return out, plants, labels


def _draw(
    kind: str,
    box: F64,
    shape: dict[str, float],
    rng: np.random.Generator,
    img: F64,
    at: tuple[int, int],
    columns: tuple[int, int],
    mu: float,
    sigma: float,
    max_value: float,
) -> tuple[F64, npt.NDArray[np.bool_]] | None:
    """New pixels for the box and the mask of what visibly changed (None: cannot draw)."""
    bh, bw = box.shape
    sign = 1.0 if kind == "bright_spot" else -1.0 if kind == "dark_spot" else rng.choice([-1, 1])
    if kind in ("dark_spot", "bright_spot"):
        alpha = _disk(bh, bw, shape["r"])
        target = np.clip(mu + sign * rng.uniform(3.0, 6.0) * sigma, 0.0, max_value)
        return box + alpha * (target - box), alpha >= 0.5
    if kind in ("line_along", "line_across"):
        target = np.clip(mu + sign * rng.uniform(3.0, 6.0) * sigma, 0.0, max_value)
        return np.full_like(box, target), np.ones(box.shape, dtype=bool)
    if kind == "shifted_patch":
        y, x = at
        h, _ = img.shape
        x_lo, x_hi = columns
        for _ in range(20):
            dy = int(rng.integers(bh // 4, bh + 1)) * int(rng.choice([-1, 1]))
            dx = int(rng.integers(bw // 4, bw + 1)) * int(rng.choice([-1, 1]))
            sy, sx = y + dy, x + dx
            if sy >= 0 and sy + bh <= h and x_lo <= sx and sx + bw <= x_hi:
                src = img[sy : sy + bh, sx : sx + bw]
                if np.abs(src - box).mean() > 0.5 * sigma:  # a visible misfit
                    return src.copy(), np.ones(box.shape, dtype=bool)
        return None
    if kind == "smudge":
        s = shape["s"]
        yy, xx = np.mgrid[0:bh, 0:bw].astype(np.float64)
        g = np.exp(-((yy - (bh - 1) / 2) ** 2 + (xx - (bw - 1) / 2) ** 2) / (2 * s * s))
        amp = sign * rng.uniform(2.0, 4.0) * sigma
        return np.clip(box + amp * g, 0.0, max_value), g >= 0.5
    # smooth_patch: the texture replaced by its local mean (a heavy blur of the surroundings)
    alpha = _disk(bh, bw, shape["r"])
    smooth = cv2.GaussianBlur(box, (0, 0), sigmaX=max(3.0, bw / 4))
    return box + alpha * (smooth - box), alpha >= 0.5
