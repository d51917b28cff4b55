"""Threshold calibration from defect-free images, stored in the bundle.

Rules (``--rule``):

* ``max-opened`` (default): the lowest threshold at which none of the defect-free images shows
  a single pixel after the opening, times ``margin`` (default 1.1). Because the opening
  commutes with thresholding, that threshold is exactly the largest value of the grey-level
  opening of the residual over all images (``segment.grey_open``): a defect-free image at
  this threshold raises no alarm, and the margin buys headroom for material not seen yet.
* ``quantile``: the ``quantile`` (default 0.999) of all defect-free residual pixels. Keeps a
  target pixel false-positive rate (1 - quantile) before the opening; use it when a few false
  alarms are acceptable in exchange for sensitivity.

The images should be defect-free and unseen in training (``linescan train`` keeps 10 % of the
training images out for this and calibrates on them when it finishes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from linescan.backends import Backend
from linescan.data.images import read_grey
from linescan.errors import DataError
from linescan.model.bundle import BundleMeta
from linescan.pipeline import Settings, reconstruct
from linescan.segment import grey_open

Rule = Literal["max-opened", "quantile"]
RULES: tuple[Rule, ...] = ("max-opened", "quantile")


@dataclass(frozen=True)
class Calibration:
    threshold: float
    record: dict[str, Any]


def calibrate(
    paths: Sequence[Path],
    meta: BundleMeta,
    backend: Backend,
    rule: Rule = "max-opened",
    margin: float = 1.1,
    quantile: float = 0.999,
    settings: Settings = Settings(),
) -> Calibration:
    if not paths:
        raise DataError("calibration needs at least one defect-free image")
    if rule not in RULES:
        raise ValueError(f"unknown calibration rule {rule!r}; expected one of {RULES}")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    opened_max: list[float] = []
    samples: list[np.ndarray] = []
    rng = np.random.default_rng(0)
    for p in paths:
        rec = reconstruct(read_grey(p), meta, backend, settings)
        opened_max.append(float(grey_open(rec.residual).max()))
        flat = rec.residual.ravel()
        # A bounded sample per image keeps memory flat for thousands of large images.
        samples.append(flat if flat.size <= 200_000 else rng.choice(flat, 200_000, replace=False))
    pixels = np.concatenate(samples)
    q_value = float(np.quantile(pixels, quantile))
    base = max(opened_max) if rule == "max-opened" else q_value
    threshold = base * margin if rule == "max-opened" else q_value
    record = {
        "rule": rule,
        "margin": margin if rule == "max-opened" else None,
        "quantile": quantile,
        "images": len(paths),
        "opened_max": {
            "min": min(opened_max),
            "median": float(np.median(opened_max)),
            "max": max(opened_max),
        },
        "pixel_quantile_value": q_value,
        "threshold": threshold,
        "stride": settings.stride or meta.stride,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": [str(p) for p in paths[:50]],
    }
    return Calibration(threshold, record)
