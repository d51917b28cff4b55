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
* ``alarm-rate``: the lowest threshold at which the defect-free images raise at most
  ``max_alarms_per_mpx`` false alarms (regions after the opening, as the daemon would publish
  them) per megapixel of camera image, here and at every higher threshold. The rate engineers
  reason in ("one false alarm every N metres of web") instead of a pixel statistic.

Why more than one rule: ``max-opened`` promises no false alarm on the calibration images,
which with a budget-limited model can cost most of the sensitivity (on MVTec grid and AITEX it
flagged 0-1 of 5 defect images; ``docs/results.md``). So every calibration also reports the
trade-off (``operating_points``): for each of a range of thresholds, including every rule's, the
false alarms per image and per megapixel and the share of defect-free images with any; and,
given labelled defect images (``defects``: MVTec ``test/<type>`` with ``ground_truth``), the
share of defect images and of ground-truth regions found. The chosen threshold is the user's
decision; the table is the evidence for it.

The images should be defect-free and unseen in training (``linescan train`` keeps 10 % of the
training images out for this and calibrates on them when it finishes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from linescan.backends import Backend
from linescan.data.images import TestSample, read_grey, read_mask
from linescan.errors import DataError
from linescan.model.bundle import BundleMeta
from linescan.pipeline import Settings, reconstruct
from linescan.preprocess import InputSpec
from linescan.segment import grey_open

Rule = Literal["max-opened", "quantile", "alarm-rate"]
RULES: tuple[Rule, ...] = ("max-opened", "quantile", "alarm-rate")
GRID_POINTS = 32
# Opened maps kept for the trade-off table; above this they are recomputed (model time again).
KEEP_BYTES = 512 << 20
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Calibration:
    threshold: float
    record: dict[str, Any]


@dataclass(frozen=True)
class OperatingPoint:
    """What one threshold does on the calibration images (and labelled defect images)."""

    threshold: float
    rules: tuple[str, ...]  # the rules whose threshold this is, e.g. ("max-opened x1.1",)
    alarms_per_image: float  # false alarms (regions) per defect-free image
    alarms_per_mpx: float  # per megapixel of camera image
    clean_images: float  # share of defect-free images with no alarm
    defect_images_found: float | None  # share of defect images with a region on the defect
    defect_regions_found: float | None  # share of ground-truth regions a region touches

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rules"] = list(self.rules)
        return d


@dataclass
class _Map:
    """One image's opened residual at model scale (None once dropped to save memory)."""

    path: Path
    opened: F32 | None
    shape: tuple[int, int]  # the camera image's (height, width)
    gt: npt.NDArray[np.int32] | None = None  # ground-truth region labels at model scale
    gt_regions: int = 0
    sample: TestSample | None = None  # a labelled defect image: where to recompute from


def _count_regions(
    opened: F32, threshold: float, min_area: int, spec: InputSpec, shape: tuple[int, int]
) -> tuple[int, npt.NDArray[np.bool_]]:
    """Regions the inspection would report at ``threshold`` (the opening commutes with
    thresholding, so the opened map thresholded is the opened mask) and their pixels."""
    flagged = (opened >= np.float32(threshold)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(flagged, connectivity=8)
    if n <= 1:
        return 0, flagged.astype(bool)
    if min_area > 0:
        areas = stats[1:, cv2.CC_STAT_AREA]
        keep = np.array([spec.area_to_original(int(a), *shape) >= min_area for a in areas])
        if not keep.all():
            kept: npt.NDArray[np.bool_] = np.isin(labels, np.flatnonzero(keep) + 1)
            return int(keep.sum()), kept
    return int(n - 1), flagged.astype(bool)


def _gt_at_model_scale(mask: npt.NDArray[np.bool_], spec: InputSpec) -> npt.NDArray[np.bool_]:
    """A model pixel is defective when any camera pixel it covers is: the model's own
    down-scaling (a block mean, or an area resize) of the mask is above zero exactly there."""
    out: npt.NDArray[np.bool_] = spec.to_model(mask.astype(np.uint8)) > 0
    return out


def format_points(points: Sequence[dict[str, Any]], chosen: float) -> str:
    """The trade-off table ``linescan calibrate`` prints (from the record's dicts)."""
    has_defects = any(p["defect_images_found"] is not None for p in points)
    head = ["threshold", "alarms/image", "alarms/Mpx", "clean images"]
    if has_defects:
        head += ["defect images found", "defect regions found"]
    rows = [[*head, "rule"]]
    last: list[str] | None = None
    for p in points:
        row = [
            f"{p['threshold']:.4g}",
            f"{p['alarms_per_image']:.3g}",
            f"{p['alarms_per_mpx']:.3g}",
            f"{100 * p['clean_images']:.0f} %",
        ]
        if has_defects:
            for key in ("defect_images_found", "defect_regions_found"):
                v = p[key]
                row.append("-" if v is None else f"{100 * v:.0f} %")
        mark = "  <- chosen" if p["threshold"] == chosen else ""
        # Rows that change nothing but the threshold are left out, unless a rule names them.
        if row[1:] == last and not p["rules"] and not mark:
            continue
        last = row[1:]
        rows.append([*row, ", ".join(p["rules"]) + mark])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(r[: len(head)], widths, strict=True)) + "  " + r[-1]
        for r in rows
    )


def calibrate(
    paths: Sequence[Path],
    meta: BundleMeta,
    backend: Backend,
    rule: Rule = "max-opened",
    margin: float = 1.1,
    quantile: float = 0.999,
    settings: Settings = Settings(),
    *,
    max_alarms_per_mpx: float = 0.1,
    defects: Sequence[TestSample] = (),
) -> Calibration:
    if not paths:
        raise DataError("calibration needs at least one defect-free image")
    if rule not in RULES:
        raise ValueError(f"unknown calibration rule {rule!r}; expected one of {RULES}")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if not max_alarms_per_mpx >= 0 or not math.isfinite(max_alarms_per_mpx):
        raise ValueError(f"max_alarms_per_mpx must be >= 0, got {max_alarms_per_mpx}")
    labelled = [d for d in defects if d.mask is not None]
    opened_max: list[float] = []
    samples: list[np.ndarray] = []
    rng = np.random.default_rng(0)
    goods: list[_Map] = []
    kept = 0
    for p in paths:
        pixels = read_grey(p)
        rec = reconstruct(pixels, meta, backend, settings)
        opened = grey_open(rec.residual)
        opened_max.append(float(opened.max()))
        flat = rec.residual.ravel()
        # A bounded sample per image keeps memory flat for thousands of large images.
        samples.append(flat if flat.size <= 200_000 else rng.choice(flat, 200_000, replace=False))
        keep = kept + opened.nbytes <= KEEP_BYTES
        kept += opened.nbytes if keep else 0
        goods.append(_Map(p, opened if keep else None, (pixels.shape[0], pixels.shape[1])))
    pixels_all = np.concatenate(samples)
    q_value = float(np.quantile(pixels_all, quantile))
    top = max(opened_max)
    bads = []
    for d in labelled:
        m = _defect_map(d, meta, backend, settings)
        assert m.opened is not None and m.gt is not None  # noqa: PT018 - just made
        need = m.opened.nbytes + m.gt.nbytes
        if kept + need > KEEP_BYTES:  # recomputed when the table is made
            m.opened, m.gt = None, None
        else:
            kept += need
        bads.append(m)
    # The range where the trade-off happens: from the defect-free pixels' 99th percentile (or
    # the cleanest image's opened maximum) to above every rule's threshold.
    # (A perfect reconstruction, residual 0 everywhere, still needs a range above zero.)
    hi = max(top * max(1.25, margin * 1.1), 1e-6)
    lo = max(min(float(np.quantile(pixels_all, 0.99)), min(opened_max)), hi * 1e-3)
    grid = {float(t) for t in np.geomspace(lo, hi, GRID_POINTS)}
    rule_values = {
        f"max-opened x{margin:g}": top * margin,
        # the lowest threshold with no alarm at all: just above the largest opened value
        "max-opened x1": float(np.nextafter(np.float32(top), np.float32(np.inf))),
        f"quantile {quantile:g}": q_value,
    }
    points = _operating_points(
        sorted(grid | set(rule_values.values())), goods, bads, meta, backend, settings
    )
    alarm_value = _alarm_rate_threshold(points, max_alarms_per_mpx)
    rule_values[f"alarm-rate {max_alarms_per_mpx:g}/Mpx"] = alarm_value
    points = _label(points, rule_values)
    if rule == "max-opened":
        threshold = top * margin
    elif rule == "quantile":
        threshold = q_value
    else:
        threshold = alarm_value
    record = {
        "rule": rule,
        "margin": margin if rule == "max-opened" else None,
        "quantile": quantile,
        "max_alarms_per_mpx": max_alarms_per_mpx if rule == "alarm-rate" else None,
        "images": len(paths),
        "defect_images": len(labelled),
        "opened_max": {
            "min": min(opened_max),
            "median": float(np.median(opened_max)),
            "max": max(opened_max),
        },
        "pixel_quantile_value": q_value,
        "threshold": threshold,
        "stride": settings.stride or meta.stride,
        "min_area_px": settings.min_area_px,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": [str(p) for p in paths[:50]],
        "operating_points": [p.to_dict() for p in points],
    }
    return Calibration(threshold, record)


def _alarm_rate_threshold(points: Sequence[OperatingPoint], target: float) -> float:
    """The lowest threshold with at most ``target`` alarms per Mpx there and at every higher
    threshold (region counts need not fall monotonically: one region can split in two)."""
    best = max(p.threshold for p in points)
    for p in sorted(points, key=lambda q: q.threshold, reverse=True):
        if p.alarms_per_mpx > target:
            break
        best = p.threshold
    return best


def _label(points: Sequence[OperatingPoint], rule_values: dict[str, float]) -> list[OperatingPoint]:
    names: dict[float, list[str]] = {}
    for name, value in rule_values.items():
        names.setdefault(value, []).append(name)
    return [replace(p, rules=tuple(names.get(p.threshold, ()))) for p in points]


def _defect_map(sample: TestSample, meta: BundleMeta, backend: Backend, settings: Settings) -> _Map:
    assert sample.mask is not None
    pixels = read_grey(sample.image)
    mask = read_mask(sample.mask)
    if mask.shape != pixels.shape:
        raise DataError(
            f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]}, its image "
            f"{sample.image} is {pixels.shape[1]}x{pixels.shape[0]}"
        )
    rec = reconstruct(pixels, meta, backend, settings)
    gt_small = _gt_at_model_scale(mask, meta.input)
    if gt_small.shape != rec.residual.shape:  # pragma: no cover - same scaling rule
        raise DataError(f"{sample.mask}: mask does not scale to the model's view")
    n, labels = cv2.connectedComponents(gt_small.astype(np.uint8), connectivity=8)
    shape = (pixels.shape[0], pixels.shape[1])
    return _Map(
        sample.image, grey_open(rec.residual), shape, labels.astype(np.int32), n - 1, sample
    )


def _operating_points(
    thresholds: Sequence[float],
    goods: Sequence[_Map],
    bads: Sequence[_Map],
    meta: BundleMeta,
    backend: Backend,
    settings: Settings,
) -> list[OperatingPoint]:
    """Counts at every threshold, image by image (a map dropped to save memory is recomputed
    once here, not once per threshold)."""
    k = len(thresholds)
    alarms = np.zeros(k)
    alarmed = np.zeros(k)
    found_images = np.zeros(k)
    found_regions = np.zeros(k)
    gt_regions = sum(m.gt_regions for m in bads)
    camera_px = sum(m.shape[0] * m.shape[1] for m in goods)
    min_area = settings.min_area_px
    for m in goods:
        opened = m.opened
        if opened is None:
            opened = grey_open(reconstruct(read_grey(m.path), meta, backend, settings).residual)
        for i, t in enumerate(thresholds):
            n, _ = _count_regions(opened, t, min_area, meta.input, m.shape)
            alarms[i] += n
            alarmed[i] += n > 0
    for m in bads:
        if m.opened is None or m.gt is None:
            if m.sample is None:  # pragma: no cover - _defect_map sets it
                raise RuntimeError(f"{m.path}: defect map incomplete")
            m = _defect_map(m.sample, meta, backend, settings)
        opened, gt = m.opened, m.gt
        assert opened is not None and gt is not None  # noqa: PT018 - just made
        for i, t in enumerate(thresholds):
            _, flagged = _count_regions(opened, t, min_area, meta.input, m.shape)
            hit = np.unique(gt[flagged & (gt > 0)])
            found_regions[i] += hit.size
            found_images[i] += hit.size > 0
    n_good = len(goods)
    return [
        OperatingPoint(
            threshold=float(t),
            rules=(),
            alarms_per_image=float(alarms[i] / n_good),
            alarms_per_mpx=float(alarms[i] / (camera_px / 1e6)),
            clean_images=float(1 - alarmed[i] / n_good),
            defect_images_found=float(found_images[i] / len(bads)) if bads else None,
            defect_regions_found=float(found_regions[i] / gt_regions) if gt_regions else None,
        )
        for i, t in enumerate(thresholds)
    ]
