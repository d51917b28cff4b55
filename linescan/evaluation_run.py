"""``linescan evaluate``: run a model over an MVTec-layout test set and score it.

Residual maps are brought back to each image's original size (bilinear) and compared with the
ground-truth masks there, so the figures do not depend on the model's internal scale.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from linescan.backends import Backend
from linescan.data.images import read_grey, read_mask, test_samples
from linescan.errors import DataError, ModelError
from linescan.evaluate import evaluate_maps, write_evaluation
from linescan.model.bundle import BundleMeta
from linescan.pipeline import Settings, reconstruct
from linescan.preprocess import upscale_to
from linescan.residual import ResidualKind


def residual_maps(
    data: Path,
    meta: BundleMeta,
    backend: Backend,
    stride: int | None = None,
    residual: ResidualKind | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Residual maps at original size and the matching ground-truth masks of a test set."""
    if residual is not None and residual != meta.residual:
        if "vae" in (residual, meta.residual):
            raise ModelError("the VAE residual needs a VAE model (and a VAE model needs it)")
        meta = replace(meta, residual=residual)
    samples = test_samples(data)
    if not samples:
        raise DataError(f"{data}: no test images (expected test/<type>/*.png)")
    scores, masks = [], []
    for s in samples:
        img = read_grey(s.image)
        rec = reconstruct(img, meta, backend, Settings(stride=stride))
        h, w = img.shape
        scores.append(upscale_to(rec.residual, h, w, meta.input, nearest=False))
        if s.mask is None:
            masks.append(np.zeros((h, w), dtype=bool))
        else:
            m = read_mask(s.mask)
            if m.shape != (h, w):
                raise DataError(f"{s.mask}: mask is {m.shape}, image {s.image} is {(h, w)}")
            masks.append(m)
    return scores, masks


def run_evaluation(
    data: Path,
    meta: BundleMeta,
    backend: Backend,
    out: Path,
    stride: int | None = None,
    residual: ResidualKind | None = None,
    name: str = "model",
) -> dict[str, Any]:
    t0 = time.perf_counter()
    scores, masks = residual_maps(data, meta, backend, stride, residual)
    ev = evaluate_maps(scores, masks)
    write_evaluation(ev, out, name)
    doc = ev.to_metrics_json()
    doc.pop("roc_points", None)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    doc["residual"] = residual or meta.residual
    return doc
