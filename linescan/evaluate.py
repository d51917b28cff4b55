"""Evaluation of residual maps against ground-truth defect masks (method notes, section 5).

Inputs are one residual map per test image (``scores``: a 2-D float array, higher = more
defective) and its ground-truth mask (``masks``: a 2-D bool array of the same shape, True on
defect pixels). Every function is pure: it reads its arguments and returns new values.

Definitions
-----------
Pooling
    All metrics pool the pixels of the whole test set. A *defect pixel* (positive) is a True
    mask pixel; a *good pixel* (negative) is every False mask pixel of every image, so the good
    pixels of defect images count as well as those of defect-free images.
Segmentation
    At threshold ``t`` a pixel is flagged as defective when ``score >= t``.
Pixel ROC (Bergmann et al. 2018, section 4.2)
    TPR(t) = defect pixels flagged / all defect pixels, FPR(t) = good pixels flagged / all good
    pixels, evaluated exactly at every distinct score, plus ``t = +inf`` (nothing flagged).
    This is ``sklearn.metrics.roc_curve(..., drop_intermediate=False)`` (scikit-learn >= 1.3):
    tied scores form one point, and the AUC is the trapezoid area under the curve, which
    counts a tied (defect, good) pair as one half. Scores are evaluated as float32 (the
    pipeline's residuals are float32); float64 inputs are rounded to float32 first.
Region overlap (Bergmann et al. 2018, Figure 7)
    A ground-truth *region* is an 8-connected component of one image's mask. Its overlap at
    threshold ``t`` is the fraction of its pixels that are flagged, optionally after the
    paper's post-processing: a morphological opening of the binary segmentation with a disk of
    diameter 4 (``segment.DISK``, the same disk as inspection).
PRO curve (Bergmann et al., MVTec AD, CVPR 2019 and IJCV 2021)
    PRO(t) = mean over all ground-truth regions of the test set of their overlap at ``t``
    (without opening), plotted against the pixel FPR(t) over the good pixels. The PRO-AUC is
    the trapezoid area under this curve from FPR 0 to ``max_fpr`` (the point at exactly
    ``max_fpr`` is linearly interpolated between its neighbours), divided by ``max_fpr`` so a
    perfect detector scores 1.0. Because the mean of overlaps equals a weighted count of the
    flagged defect pixels, each weighted 1 / (number of regions * size of its region), the
    curve is computed exactly at every distinct score with one sort and a cumulative sum.

Memory: the pooled scores are held once as float32 (4 bytes a pixel) and sorted in place; the
ROC itself holds one point per distinct score (20 bytes a point: float32 threshold, float64
FPR and TPR), which for continuous residuals approaches one point per pixel; lookups run in
chunks, so the working memory beyond those two stays small.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import cv2
import numpy as np
import numpy.typing as npt

from linescan.segment import DISK

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: The paper's post-processing: an opening with a circular structuring element of diameter 4.
OPENING_KERNEL: npt.NDArray[np.uint8] = DISK  # the inspection's opening, defined once

#: The most points ``Evaluation.to_metrics_json`` writes for the ROC curve.
MAX_ROC_POINTS = 512


@dataclass(frozen=True)
class Roc:
    """A pixel ROC curve. ``thresholds`` decrease, starting at +inf; ``fpr`` and ``tpr`` rise."""

    fpr: F64
    tpr: F64
    thresholds: F32
    auc: float


@dataclass(frozen=True)
class ProCurve:
    """The PRO curve on FPR [0, max_fpr] and its normalised area (``auc``, 1.0 is perfect).

    Points are exact (one per distinct score) except the last one, which is interpolated at
    exactly ``max_fpr`` when no score lands there; its threshold is NaN.
    """

    fpr: F64
    pro: F64
    thresholds: F32
    max_fpr: float
    auc: float


@dataclass(frozen=True)
class Evaluation:
    """Every metric of one test set, as written to ``metrics.json`` by ``write_evaluation``.

    ``region_overlap_at_fpr`` holds ``fpr``, ``threshold``, ``q25``, ``q50``, ``q75``,
    ``regions`` (the number of ground-truth regions) and ``opening``.
    """

    pixel_auroc: float
    pro_auc: float
    max_fpr: float
    region_overlap_at_fpr: Mapping[str, float | int | bool]
    roc: Roc
    n_images: int
    n_defect_pixels: int
    n_good_pixels: int

    def to_metrics_json(self) -> dict[str, object]:
        """The JSON-ready metrics; the PRO key is ``pro_auc_30`` for the default max_fpr 0.3."""
        pro_key = f"pro_auc_{round(self.max_fpr * 100):d}"
        return {
            "pixel_auroc": self.pixel_auroc,
            pro_key: self.pro_auc,
            "region_overlap_at_fpr": dict(self.region_overlap_at_fpr),
            "n_images": self.n_images,
            "n_defect_pixels": self.n_defect_pixels,
            "n_good_pixels": self.n_good_pixels,
            "roc_points": _roc_points_json(self.roc, MAX_ROC_POINTS),
        }


# --------------------------------------------------------------------------------------------
# Pooling


@dataclass(frozen=True)
class _Pooled:
    """The test set's pixels, split by class and sorted ascending.

    ``pos_weight`` (aligned with ``pos``) is 1 / (number of regions * region size) per defect
    pixel, so its sum over flagged pixels is PRO(t); None when not asked for.
    """

    pos: F32
    neg: F32
    pos_weight: F64 | None
    n_images: int
    n_regions: int


def _checked(scores: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Validate the inputs; return the masks as bool arrays."""
    if len(scores) != len(masks):
        raise ValueError(f"got {len(scores)} score maps but {len(masks)} masks")
    if len(scores) == 0:
        raise ValueError("no images to evaluate")
    bool_masks: list[np.ndarray] = []
    for i, (s, m) in enumerate(zip(scores, masks, strict=True)):
        s_arr = np.asarray(s)
        m_arr = np.asarray(m)
        if s_arr.ndim != 2:
            raise ValueError(f"score map {i} must be 2-D, got shape {s_arr.shape}")
        if s_arr.shape != m_arr.shape:
            raise ValueError(
                f"image {i}: score map shape {s_arr.shape} != mask shape {m_arr.shape}"
            )
        if not (np.issubdtype(s_arr.dtype, np.floating) or np.issubdtype(s_arr.dtype, np.integer)):
            raise ValueError(f"score map {i} must be real-valued, got dtype {s_arr.dtype}")
        if not np.isfinite(s_arr).all():
            raise ValueError(f"score map {i} contains NaN or infinite values")
        if m_arr.dtype == np.bool_:
            bool_masks.append(m_arr)
        elif np.issubdtype(m_arr.dtype, np.integer):
            bool_masks.append(m_arr != 0)
        else:
            raise ValueError(
                f"mask {i} must be bool (or integer, nonzero = defect), got {m_arr.dtype}"
            )
    return bool_masks


def _components(mask: np.ndarray) -> tuple[int, npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    """8-connected components of a bool mask: (count incl. background, labels, areas)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(
        np.ascontiguousarray(mask).view(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    return (
        int(n),
        np.asarray(labels, dtype=np.int32),
        np.asarray(stats[:, cv2.CC_STAT_AREA], dtype=np.int64),
    )


def _pool(scores: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, weights: bool) -> _Pooled:
    bool_masks = _checked(scores, masks)
    n_pos = sum(int(np.count_nonzero(m)) for m in bool_masks)
    n_all = sum(int(m.size) for m in bool_masks)
    n_neg = n_all - n_pos
    if n_pos == 0:
        raise ValueError("the masks contain no defect pixels: ROC and PRO are undefined")
    if n_neg == 0:
        raise ValueError("the masks contain no good pixels: ROC and PRO are undefined")
    pos = np.empty(n_pos, dtype=np.float32)
    neg = np.empty(n_neg, dtype=np.float32)
    # Per pixel: the region's size, stored as 1 / size; normalised by the region count below.
    inv_area = np.empty(n_pos, dtype=np.float64) if weights else None
    n_regions = 0
    ip = ineg = 0
    for s, m in zip(scores, bool_masks, strict=True):
        s32 = np.asarray(s, dtype=np.float32)
        k = int(np.count_nonzero(m))
        pos[ip : ip + k] = s32[m]
        neg[ineg : ineg + m.size - k] = s32[~m]
        if inv_area is not None and k:
            n, labels, areas = _components(m)
            n_regions += n - 1
            inv_area[ip : ip + k] = 1.0 / areas[labels[m]]
        ip += k
        ineg += m.size - k
    neg.sort()
    pos_weight: F64 | None = None
    if inv_area is None:
        pos.sort()
    else:
        order = np.argsort(pos, kind="stable")
        pos = pos[order]
        pos_weight = inv_area[order] / n_regions
    return _Pooled(pos, neg, pos_weight, len(bool_masks), n_regions)


def _distinct(sorted_values: F32) -> F32:
    """The distinct values of an ascending array (no re-sort)."""
    if sorted_values.size == 0:
        return sorted_values
    keep = np.empty(sorted_values.size, dtype=bool)
    keep[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=keep[1:])
    distinct: F32 = sorted_values[keep]
    return distinct


def _distinct_desc(pooled: _Pooled) -> F32:
    """+inf followed by every distinct pooled score, decreasing."""
    both = np.concatenate((_distinct(pooled.pos), _distinct(pooled.neg)))
    both.sort(kind="stable")  # two ascending runs: the stable sort merges them in O(n)
    merged = _distinct(both)
    del both
    out = np.empty(merged.size + 1, dtype=np.float32)
    out[0] = np.inf
    out[1:] = merged[::-1]
    return out


#: Thresholds are looked up this many at a time, so lookups never hold a full-length int64 array.
_CHUNK = 1 << 20


def _fraction_at_least(sorted_values: F32, thresholds: F32) -> F64:
    """For each threshold t, the fraction of ``sorted_values`` (ascending) that are >= t."""
    n = sorted_values.size
    out = np.empty(thresholds.size, dtype=np.float64)
    for start in range(0, thresholds.size, _CHUNK):
        below = np.searchsorted(sorted_values, thresholds[start : start + _CHUNK], side="left")
        out[start : start + _CHUNK] = (n - below) / n
    return out


# --------------------------------------------------------------------------------------------
# Pixel ROC


def _roc_from_pooled(pooled: _Pooled) -> Roc:
    thresholds = _distinct_desc(pooled)
    fpr = _fraction_at_least(pooled.neg, thresholds)
    tpr = _fraction_at_least(pooled.pos, thresholds)
    # The trapezoid area under the exact ROC is the Mann-Whitney statistic: for each defect
    # pixel, the good pixels scoring below it plus half those scoring equal, over P * N.
    # Counted exactly in int64 (the sum is at most 2 * P * N).
    twice_u = 0
    for start in range(0, pooled.pos.size, _CHUNK):
        chunk = pooled.pos[start : start + _CHUNK]
        twice_u += int(np.searchsorted(pooled.neg, chunk, side="left").sum())
        twice_u += int(np.searchsorted(pooled.neg, chunk, side="right").sum())
    auc = twice_u / (2.0 * pooled.pos.size * pooled.neg.size)
    return Roc(fpr=fpr, tpr=tpr, thresholds=thresholds, auc=auc)


def pixel_roc(scores: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> Roc:
    """The pixel ROC pooled over the test set, with one point per distinct score.

    Equals ``sklearn.metrics.roc_curve(y, s, drop_intermediate=False)`` on the flattened,
    float32 pixels, and ``auc`` equals ``roc_auc_score`` (ties count one half).
    Raises ValueError when a shape mismatches (naming the image) or a class is absent.
    """
    return _roc_from_pooled(_pool(scores, masks, weights=False))


def threshold_at_fpr(
    roc_or_scores: Roc | Sequence[np.ndarray],
    fpr: float,
    *,
    masks: Sequence[np.ndarray] | None = None,
) -> float:
    """The lowest ROC threshold whose pixel FPR over the good pixels is at most ``fpr``.

    Rule: among the ROC's thresholds (+inf and every distinct pooled score), return the lowest
    ``t`` with ``FP(t) / N_good <= fpr`` (compared in float64), where FP(t) counts the good
    pixels with ``score >= t``. As TPR falls with ``t``, this is the operating point with the
    highest TPR whose FPR does not exceed ``fpr``. It is +inf when even the highest score
    belongs to a good pixel and ``fpr < 1 / N_good``; the lowest score when ``fpr >= 1``.

    Pass a ``Roc``, or score maps with ``masks=``.
    """
    if not 0.0 <= fpr <= 1.0 or math.isnan(fpr):
        raise ValueError(f"fpr must lie in [0, 1], got {fpr}")
    if isinstance(roc_or_scores, Roc):
        if masks is not None:
            raise ValueError("pass masks only with score maps, not with a Roc")
        roc = roc_or_scores
    else:
        if masks is None:
            raise ValueError("threshold_at_fpr needs masks= when given score maps")
        roc = pixel_roc(roc_or_scores, masks)
    # fpr[0] == 0 <= fpr, so the index is >= 0; fpr is non-decreasing along the curve.
    idx = int(np.searchsorted(roc.fpr, fpr, side="right")) - 1
    return float(roc.thresholds[idx])


# --------------------------------------------------------------------------------------------
# Region overlap


def open_segmentation(segmentation: np.ndarray) -> npt.NDArray[np.bool_]:
    """Morphological opening of a 2-D bool segmentation with the diameter-4 disk.

    ``cv2.morphologyEx(MORPH_OPEN)`` is not an opening for this even-sized kernel (its
    dilation does not mirror the kernel about the anchor, so it can add pixels and is not
    idempotent). Here the erosion uses the kernel at its anchor (2, 2) and the dilation the
    mirrored kernel at the mirrored anchor (1, 1): the result is the union of all placements of
    the disk that fit inside the segmentation. Outside the image counts as "fits" (OpenCV's
    default border), so defects touching the image edge are not eroded by the edge.
    """
    seg = np.ascontiguousarray(segmentation, dtype=np.uint8)
    eroded = cv2.erode(seg, OPENING_KERNEL, anchor=(2, 2))
    mirrored = np.ascontiguousarray(OPENING_KERNEL[::-1, ::-1])
    opened = cv2.dilate(eroded, mirrored, anchor=(1, 1))
    result: npt.NDArray[np.bool_] = np.asarray(opened) != 0
    return result


def region_overlaps(
    scores: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    threshold: float,
    opening: bool = False,
) -> F64:
    """For every ground-truth region, the fraction of its pixels flagged (``score >= threshold``).

    Regions are 8-connected components of each mask, listed image by image in OpenCV's label
    order. With ``opening=True`` the segmentation is first opened with the diameter-4 disk
    (the paper's post-processing, see ``open_segmentation``). Returns an empty array when the
    masks hold no defect pixel.
    """
    bool_masks = _checked(scores, masks)
    out: list[F64] = []
    for s, m in zip(scores, bool_masks, strict=True):
        if not m.any():
            continue
        n, labels, areas = _components(m)
        flagged = np.asarray(s, dtype=np.float32) >= np.float32(threshold)
        if opening:
            flagged = open_segmentation(flagged)
        hits = np.bincount(labels[flagged & m], minlength=n)
        out.append(hits[1:] / areas[1:])
    return np.concatenate(out) if out else np.empty(0, dtype=np.float64)


def overlap_quantiles(
    overlaps: np.ndarray, qs: Sequence[float] = (0.25, 0.5, 0.75)
) -> dict[str, float]:
    """Quantiles of region overlaps (linear interpolation), keyed ``q25``, ``q50``, ``q75``."""
    values = np.asarray(overlaps, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no region overlaps to summarise")
    result: dict[str, float] = {}
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must lie in [0, 1], got {q}")
        key = f"q{q * 100:g}"
        result[key] = float(np.quantile(values, q))
    return result


# --------------------------------------------------------------------------------------------
# PRO


def _area_to(x: F64, y: F64, x_max: float) -> tuple[F64, F64, bool]:
    """The curve cut at ``x_max`` (x non-decreasing, starts at 0, ends >= x_max).

    Returns (x, y, interpolated): the points with x <= x_max, plus a point at exactly x_max
    interpolated linearly from its neighbours when no point lies there.
    """
    n_in = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:n_in], y[:n_in]
    if xs[-1] < x_max:
        x0, x1, y0, y1 = x[n_in - 1], x[n_in], y[n_in - 1], y[n_in]
        y_end = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        return np.append(xs, x_max), np.append(ys, y_end), True
    return xs, ys, False


def _trapezoid(x: F64, y: F64) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def _downsample(fpr: F64, tpr: F64, n_max: int) -> npt.NDArray[np.intp]:
    """Indices of at most ``n_max`` points spread evenly along a monotone curve's length.

    Both coordinates rise, so ``fpr + tpr`` is the curve's L1 length so far; the first and last
    points are always kept.
    """
    if n_max < 2:
        raise ValueError(f"need at least 2 points, got {n_max}")
    if fpr.size <= n_max:
        return np.arange(fpr.size)
    length = fpr + tpr
    targets = np.linspace(length[0], length[-1], n_max - 1)
    idx = np.searchsorted(length, targets, side="left")
    return np.unique(np.concatenate((idx, [0, fpr.size - 1])))


def _pro_from_pooled(
    pooled: _Pooled, roc: Roc, max_fpr: float, n_thresholds: int | None
) -> ProCurve:
    """The PRO curve at the ROC's thresholds (same pixels), up to and one past ``max_fpr``."""
    if not 0.0 < max_fpr <= 1.0 or math.isnan(max_fpr):
        raise ValueError(f"max_fpr must lie in (0, 1], got {max_fpr}")
    if pooled.pos_weight is None:
        raise ValueError("internal: pooled data lack region weights")
    n_cut = min(roc.fpr.size, int(np.searchsorted(roc.fpr, max_fpr, side="right")) + 1)
    thresholds, fpr = roc.thresholds[:n_cut], roc.fpr[:n_cut]
    # Sum of the weights of the k highest-scoring defect pixels, k = 0..P.
    top_sums = np.concatenate(([0.0], np.cumsum(pooled.pos_weight[::-1])))
    pro = np.empty(n_cut, dtype=np.float64)
    n_pos = pooled.pos.size
    for start in range(0, n_cut, _CHUNK):
        below = np.searchsorted(pooled.pos, thresholds[start : start + _CHUNK], side="left")
        pro[start : start + _CHUNK] = top_sums[n_pos - below]
    xs, ys, interpolated = _area_to(fpr, pro, max_fpr)
    auc = _trapezoid(xs, ys) / max_fpr
    thr = thresholds[: xs.size - int(interpolated)]
    if interpolated:
        thr = np.append(thr, np.float32(np.nan))
    if n_thresholds is not None:
        keep = _downsample(xs, ys, n_thresholds)
        xs, ys, thr = xs[keep], ys[keep], thr[keep]
    return ProCurve(fpr=xs, pro=ys, thresholds=thr, max_fpr=max_fpr, auc=auc)


def pro_curve(
    scores: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    max_fpr: float = 0.3,
    n_thresholds: int | None = None,
) -> ProCurve:
    """The per-region-overlap curve up to ``max_fpr``, exact at every distinct score.

    ``n_thresholds`` (>= 2) thins the returned points for plotting, keeping both ends; the
    ``auc`` is always computed from the exact curve.
    """
    pooled = _pool(scores, masks, weights=True)
    return _pro_from_pooled(pooled, _roc_from_pooled(pooled), max_fpr, n_thresholds)


def pro_auc(
    scores: Sequence[np.ndarray], masks: Sequence[np.ndarray], max_fpr: float = 0.3
) -> float:
    """Area under the PRO curve on FPR [0, max_fpr], divided by max_fpr (perfect = 1.0)."""
    return pro_curve(scores, masks, max_fpr).auc


# --------------------------------------------------------------------------------------------
# Everything together


def evaluate_maps(
    scores: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    fpr_for_overlap: float = 0.05,
    max_fpr: float = 0.3,
    *,
    opening: bool = False,
) -> Evaluation:
    """Pixel AUROC, PRO-AUC up to ``max_fpr`` and region-overlap quantiles at ``fpr_for_overlap``.

    The overlap threshold is ``threshold_at_fpr(roc, fpr_for_overlap)``; ``opening`` applies
    the paper's opening to the segmentation before measuring overlaps.
    """
    pooled = _pool(scores, masks, weights=True)
    roc = _roc_from_pooled(pooled)
    pro = _pro_from_pooled(pooled, roc, max_fpr, None)
    threshold = threshold_at_fpr(roc, fpr_for_overlap)
    overlaps = region_overlaps(scores, masks, threshold, opening=opening)
    summary: dict[str, float | int | bool] = {
        "fpr": float(fpr_for_overlap),
        "threshold": threshold,
        **overlap_quantiles(overlaps),
        "regions": int(overlaps.size),
        "opening": opening,
    }
    return Evaluation(
        pixel_auroc=roc.auc,
        pro_auc=pro.auc,
        max_fpr=float(max_fpr),
        region_overlap_at_fpr=MappingProxyType(summary),
        roc=roc,
        n_images=pooled.n_images,
        n_defect_pixels=int(pooled.pos.size),
        n_good_pixels=int(pooled.neg.size),
    )


def _roc_points_json(roc: Roc, n_max: int) -> dict[str, list[float | None]]:
    keep = _downsample(roc.fpr, roc.tpr, n_max)
    thresholds: list[float | None] = [
        float(t) if math.isfinite(t) else None for t in roc.thresholds[keep].tolist()
    ]
    return {
        "fpr": [float(v) for v in roc.fpr[keep].tolist()],
        "tpr": [float(v) for v in roc.tpr[keep].tolist()],
        "threshold": thresholds,
    }


# --------------------------------------------------------------------------------------------
# Plot and files

_COLOURS_BGR: tuple[tuple[int, int, int], ...] = (
    (40, 40, 214),  # red
    (180, 119, 31),  # blue
    (44, 160, 44),  # green
    (14, 127, 255),  # orange
    (189, 103, 148),  # purple
    (75, 86, 140),  # brown
)
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BLACK = (0, 0, 0)
_GREY = (140, 140, 140)


def _text(
    img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.5, thickness: int = 1
) -> None:
    cv2.putText(img, text, org, _FONT, scale, _BLACK, thickness, cv2.LINE_AA)


def _text_size(text: str, scale: float = 0.5, thickness: int = 1) -> tuple[int, int]:
    (w, h), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    return int(w), int(h)


def plot_roc(
    curves: Mapping[str, Roc],
    path: Path,
    title: str,
    *,
    size: tuple[int, int] = (800, 600),
    fpr_mark: float = 0.3,
) -> None:
    """Draw ROC curves (legend: name and AUC) on white, with a dashed line at FPR ``fpr_mark``.

    ``size`` is (width, height) in pixels; the PNG is written with ``cv2.imwrite``. Names are
    drawn with OpenCV's Hershey font, which has ASCII glyphs only.
    """
    if not curves:
        raise ValueError("plot_roc needs at least one curve")
    width, height = size
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 80, 30, 50, 70
    x0, x1, y0, y1 = left, width - right, height - bottom, top  # y0 is the bottom of the axes
    if x1 - x0 < 50 or y0 - y1 < 50:
        raise ValueError(f"plot size {size} is too small")

    def to_px(fx: F64, fy: F64) -> npt.NDArray[np.int32]:
        px = x0 + fx * (x1 - x0)
        py = y0 - fy * (y0 - y1)
        return np.stack([px, py], axis=1).round().astype(np.int32)

    # Grid, axes and ticks.
    for v in np.linspace(0.0, 1.0, 6):
        gx = round(x0 + v * (x1 - x0))
        gy = round(y0 - v * (y0 - y1))
        cv2.line(img, (gx, y1), (gx, y0), (230, 230, 230), 1)
        cv2.line(img, (x0, gy), (x1, gy), (230, 230, 230), 1)
        cv2.line(img, (gx, y0), (gx, y0 + 6), _BLACK, 1)
        cv2.line(img, (x0 - 6, gy), (x0, gy), _BLACK, 1)
        label = f"{v:.1f}"
        tw, th = _text_size(label, 0.45)
        _text(img, label, (gx - tw // 2, y0 + 10 + th), 0.45)
        _text(img, label, (x0 - 10 - tw, gy + th // 2), 0.45)
    cv2.rectangle(img, (x0, y1), (x1, y0), _BLACK, 1)

    # Chance diagonal (dotted) and the dashed vertical line at fpr_mark.
    for t in np.arange(0.0, 1.0, 0.02):
        a = to_px(np.array([t]), np.array([t]))[0]
        cv2.circle(img, (int(a[0]), int(a[1])), 1, (200, 200, 200), -1, cv2.LINE_AA)
    if 0.0 < fpr_mark < 1.0:
        mx = round(x0 + fpr_mark * (x1 - x0))
        for ya in range(y1, y0, 14):
            cv2.line(img, (mx, ya), (mx, min(ya + 8, y0)), _GREY, 1, cv2.LINE_AA)
        _text(img, f"FPR {fpr_mark:g}", (mx + 4, y1 + 14), 0.4)

    # Curves.
    legend: list[tuple[str, tuple[int, int, int]]] = []
    for i, (name, roc) in enumerate(curves.items()):
        colour = _COLOURS_BGR[i % len(_COLOURS_BGR)]
        keep = _downsample(roc.fpr, roc.tpr, 2048)
        pts = to_px(roc.fpr[keep], roc.tpr[keep])
        cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, colour, 2, cv2.LINE_AA)
        legend.append((f"{name} (AUC {roc.auc:.3f})", colour))

    # Legend, bottom right inside the axes.
    line_h = 22
    box_w = max(_text_size(t, 0.5)[0] for t, _ in legend) + 50
    box_h = line_h * len(legend) + 10
    bx1, by1 = x1 - 10, y0 - 10
    bx0, by0 = bx1 - box_w, by1 - box_h
    cv2.rectangle(img, (bx0, by0), (bx1, by1), (255, 255, 255), -1)
    cv2.rectangle(img, (bx0, by0), (bx1, by1), _GREY, 1)
    for i, (text, colour) in enumerate(legend):
        ly = by0 + 5 + line_h * i + line_h // 2
        cv2.line(img, (bx0 + 8, ly), (bx0 + 36, ly), colour, 2, cv2.LINE_AA)
        _text(img, text, (bx0 + 42, ly + 5), 0.5)

    # Title and axis labels (the y label is drawn on a strip and rotated).
    tw, th = _text_size(title, 0.65, 1)
    _text(img, title, (max(5, (width - tw) // 2), top - 18), 0.65, 1)
    xl = "False positive rate (good pixels)"
    tw, th = _text_size(xl, 0.55)
    _text(img, xl, ((x0 + x1 - tw) // 2, height - 20), 0.55)
    yl = "True positive rate (defect pixels)"
    tw, th = _text_size(yl, 0.55)
    strip = np.full((th + 10, tw + 4, 3), 255, dtype=np.uint8)
    _text(strip, yl, (2, th + 3), 0.55)
    rotated = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    rh, rw = rotated.shape[:2]
    ry = max(0, (y0 + y1 - rh) // 2)
    rh = min(rh, height - ry)
    img[ry : ry + rh, 8 : 8 + rw] = rotated[:rh]

    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")


def write_evaluation(
    ev: Evaluation, out_dir: Path, name: str, extra: Mapping[str, object] | None = None
) -> None:
    """Write ``out_dir/metrics.json`` (indent 2, with ``extra`` keys) and ``out_dir/roc.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {**ev.to_metrics_json(), **(extra or {})}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    plot_roc({name: ev.roc}, out_dir / "roc.png", f"Pixel ROC: {name}")


def plot_froc(
    points: Sequence[Mapping[str, float | None]],
    path: Path,
    title: str,
    *,
    operating: Mapping[str, float | None] | None = None,
    size: tuple[int, int] = (800, 600),
) -> None:
    """Defects found against false alarms per defect-free image (an FROC curve).

    ``points`` hold ``false_alarms_per_image``, ``region_recall`` and ``image_recall``; the
    x axis runs to the larger of 2 and the curve's reach (capped at 20); ``operating`` (the
    calibrated threshold's point) is drawn as a ring.
    """
    width, height = size
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 80, 30, 50, 70
    x0, x1, y0, y1 = left, width - right, height - bottom, top
    fa = [p["false_alarms_per_image"] for p in points if p["false_alarms_per_image"] is not None]
    x_max = float(min(20.0, max(2.0, *(fa or [0.0]))))
    x_max = math.ceil(x_max)

    def px(f: float, r: float) -> tuple[int, int]:
        fx = min(f, x_max) / x_max
        return round(x0 + fx * (x1 - x0)), round(y0 - r * (y0 - y1))

    for v in np.linspace(0.0, 1.0, 6):
        gy = round(y0 - v * (y0 - y1))
        cv2.line(img, (x0, gy), (x1, gy), (230, 230, 230), 1)
        label = f"{v:.1f}"
        tw, th = _text_size(label, 0.45)
        _text(img, label, (x0 - 10 - tw, gy + th // 2), 0.45)
    for k in range(x_max + 1):
        if x_max > 10 and k % 2:
            continue
        gx = round(x0 + k / x_max * (x1 - x0))
        cv2.line(img, (gx, y1), (gx, y0), (230, 230, 230), 1)
        label = str(k)
        tw, th = _text_size(label, 0.45)
        _text(img, label, (gx - tw // 2, y0 + 10 + th), 0.45)
    cv2.rectangle(img, (x0, y1), (x1, y0), _BLACK, 1)
    legend = []
    for i, key in enumerate(("region_recall", "image_recall")):
        pts = sorted(
            (float(p["false_alarms_per_image"]), float(p[key]))  # type: ignore[arg-type]
            for p in points
            if p.get(key) is not None and p["false_alarms_per_image"] is not None
        )
        if not pts:
            continue
        colour = _COLOURS_BGR[i]
        arr = np.array([px(f, r) for f, r in pts], dtype=np.int32)
        cv2.polylines(img, [arr.reshape(-1, 1, 2)], False, colour, 2, cv2.LINE_AA)
        legend.append((key.replace("_", " "), colour))
        if operating is not None and operating.get(key) is not None:
            f = operating.get("false_alarms_per_image") or 0.0
            cv2.circle(img, px(float(f), float(operating[key] or 0.0)), 7, colour, 2, cv2.LINE_AA)
    for i, (text, colour) in enumerate(legend):
        ly = y1 + 20 + 22 * i
        cv2.line(img, (x1 - 200, ly), (x1 - 172, ly), colour, 2, cv2.LINE_AA)
        _text(img, text, (x1 - 166, ly + 5), 0.5)
    if operating is not None:
        _text(img, "o calibrated threshold", (x1 - 200, y1 + 20 + 22 * len(legend) + 5), 0.5)
    tw, _ = _text_size(title, 0.65)
    _text(img, title, (max(5, (width - tw) // 2), top - 18), 0.65)
    xl = "False alarms per defect-free image (published regions)"
    tw, _ = _text_size(xl, 0.55)
    _text(img, xl, ((x0 + x1 - tw) // 2, height - 20), 0.55)
    yl = "Defects found"
    tw, th = _text_size(yl, 0.55)
    strip = np.full((th + 10, tw + 4, 3), 255, dtype=np.uint8)
    _text(strip, yl, (2, th + 3), 0.55)
    rotated = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    rh, rw = rotated.shape[:2]
    ry = max(0, (y0 + y1 - rh) // 2)
    img[ry : ry + rh, 8 : 8 + rw] = rotated[: height - ry]
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")
