"""``linescan evaluate``: run a model over an MVTec-layout test set and score it.

Two kinds of figures, both in ``metrics.json``:

* **Maps** (the paper's): pixel AUROC, PRO and region overlap of the score maps against the
  ground-truth masks, at each image's original size (maps brought back bilinearly), so the
  figures do not depend on the model's internal scale. ``pixel_auroc_residual`` is the same
  AUROC of the raw residual, for comparison with the paper and older bundles.
* **The operating point** (the product's): at the bundle's calibrated threshold, counted exactly
  as the daemon publishes (``detection.py``: the score thresholded, the bundle's opening,
  ``min_area_px``): false alarms per defect-free test image and per megapixel, and the share
  of ground-truth regions and defect images found. ``froc`` repeats that over a sweep of
  thresholds (``froc.png``: defects found against false alarms per image).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from linescan.backends import Backend
from linescan.data.images import TestSample, read_grey, read_mask, test_samples
from linescan.detection import Counts, SparseMap, count
from linescan.errors import DataError, ModelError
from linescan.evaluate import evaluate_maps, pixel_roc, plot_froc, write_evaluation
from linescan.model.bundle import BundleMeta
from linescan.pipeline import Settings, opening_for, reconstruct, scoring_for
from linescan.preprocess import upscale_to
from linescan.residual import ResidualKind
from linescan.segment import grey_open

FROC_POINTS = 48


def _with_residual(meta: BundleMeta, residual: ResidualKind | None) -> BundleMeta:
    if residual is not None and residual != meta.residual:
        if "vae" in (residual, meta.residual):
            raise ModelError("the VAE residual needs a VAE model (and a VAE model needs it)")
        meta = replace(meta, residual=residual)
    return meta


def _samples(data: Path) -> list[TestSample]:
    samples = test_samples(data)
    if not samples:
        raise DataError(f"{data}: no test images (expected test/<type>/*.png)")
    return samples


def _mask(s: TestSample, h: int, w: int) -> np.ndarray:
    if s.mask is None:
        return np.zeros((h, w), dtype=bool)
    m = read_mask(s.mask)
    if m.shape != (h, w):
        raise DataError(f"{s.mask}: mask is {m.shape}, image {s.image} is {(h, w)}")
    return m


def residual_maps(
    data: Path,
    meta: BundleMeta,
    backend: Backend,
    stride: int | None = None,
    residual: ResidualKind | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Raw residual maps at original size and the matching ground-truth masks of a test set."""
    meta = _with_residual(meta, residual)
    scores, masks = [], []
    for s in _samples(data):
        img = read_grey(s.image)
        rec = reconstruct(img, meta, backend, Settings(stride=stride))
        h, w = img.shape
        scores.append(upscale_to(rec.residual, h, w, meta.input, nearest=False))
        masks.append(_mask(s, h, w))
    return scores, masks


def run_evaluation(
    data: Path,
    meta: BundleMeta,
    backend: Backend,
    out: Path,
    stride: int | None = None,
    residual: ResidualKind | None = None,
    name: str = "model",
    settings: Settings | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    meta = _with_residual(meta, residual)
    settings = replace(settings or Settings(), stride=stride)
    opening = opening_for(meta, settings)
    scores, raws, masks, maps = [], [], [], []
    floor = np.inf
    for s in _samples(data):
        img = read_grey(s.image)
        rec = reconstruct(img, meta, backend, settings)
        h, w = img.shape
        scores.append(upscale_to(rec.score, h, w, meta.input, nearest=False))
        raws.append(upscale_to(rec.residual, h, w, meta.input, nearest=False))
        mask = _mask(s, h, w)
        masks.append(mask)
        opened = grey_open(rec.score, opening)
        if s.mask is None:
            floor = min(floor, float(np.quantile(opened, 0.995)))
        labels, n = None, 0
        if s.mask is not None:
            small = meta.input.to_model(mask.astype(np.uint8)) > 0
            n, lab = cv2.connectedComponents(small.astype(np.uint8), connectivity=8)
            labels, n = lab.astype(np.int32), int(n - 1)
        maps.append((opened, h * w, labels, n))
    ev = evaluate_maps(scores, masks)
    raw_auroc = pixel_roc(raws, masks).auc
    del scores, raws
    threshold = settings.threshold if settings.threshold is not None else meta.threshold
    if not np.isfinite(floor):  # no defect-free test image: sweep from the defect images
        floor = min(float(np.quantile(o, 0.995)) for o, *_ in maps)
    if threshold is not None:
        floor = min(floor, threshold)
    sparse = [SparseMap.build(o, floor, px, lab, n) for o, px, lab, n in maps]
    top = max((float(m.values.max()) for m in sparse if m.values.size), default=floor)
    points = {*np.linspace(floor, max(top, floor * 1.01, floor + 1e-6), FROC_POINTS).tolist()}
    # as many again where the false alarms die out (up to the good images' highest region)
    good_top = max(
        (float(m.values.max()) for m in sparse if m.gt is None and m.values.size), default=0
    )
    if good_top > floor:
        points |= set(np.linspace(floor, good_top * 1.05, FROC_POINTS).tolist())
    sweep: list[float] = sorted(points)
    if threshold is not None:
        sweep = sorted({*sweep, float(threshold)})
    h0, w0 = maps[0][0].shape

    def area(a: int) -> int:
        n = meta.input.downscale
        return meta.input.area_to_original(a, h0 * n, w0 * n)

    counts = count(sparse, sweep, area, settings.min_area_px)
    froc = _points(counts)
    operating = None
    if threshold is not None:
        operating = froc[sweep.index(float(threshold))]
    doc: dict[str, Any] = {
        "pixel_auroc_residual": raw_auroc,
        "score": scoring_for(meta, settings).describe(w0),
        "residual": meta.residual,
        "opening_disk_diameter": opening,
        "min_area_px": settings.min_area_px,
        "operating_point": operating,
        "froc": froc,
    }
    write_evaluation(ev, out, name, doc)
    plot_froc(froc, out / "froc.png", f"Defects found: {name}", operating=operating)
    metrics = ev.to_metrics_json()
    metrics.pop("roc_points", None)
    metrics.update(doc)
    metrics.pop("froc", None)
    metrics["froc_points"] = len(froc)
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    return metrics


def _points(c: Counts) -> list[dict[str, Any]]:
    rr, ir = c.region_recall(), c.image_recall()
    return [
        {
            "threshold": float(t),
            "false_alarms_per_image": float(c.alarms_per_image()[i]) if c.good_images else None,
            "false_alarms_per_mpx": float(c.alarms_per_mpx()[i]) if c.good_images else None,
            "region_recall": None if rr is None else float(rr[i]),
            "image_recall": None if ir is None else float(ir[i]),
            "good_images": c.good_images,
            "defect_images": c.defect_images,
            "defect_regions": c.regions,
        }
        for i, t in enumerate(c.thresholds)
    ]
