"""Counting detections exactly as the daemon publishes them: false alarms and defects found.

A threshold is judged by two numbers a line engineer cares about: how many false alarms it
raises on defect-free web (per image, per megapixel, per metre), and how many real defects it
finds. Both are counted here the way the daemon would publish them: the score thresholded, the
opening applied, 8-connected regions, regions under ``min_area_px`` camera pixels dropped.

* A **false alarm** is a published region on a defect-free image.
* A ground-truth **region** (an 8-connected part of a defect mask at the model's scale) is
  **found** when a published region overlaps it (shares a pixel); a defect **image** is found
  when any of its regions is.

The opening commutes with thresholding, so one grey-level opening of the score per image
serves every threshold. Only pixels whose opened score reaches ``floor`` (below any threshold
asked about) are kept, as a sparse list: a calibration over thousands of images holds a few
percent of their pixels, and counting at a threshold labels just those.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
AreaFn = Callable[[int], int]  # model-pixel area -> camera-pixel area


@dataclass(frozen=True)
class SparseMap:
    """The opened score of one image, kept where it reaches ``floor``."""

    shape: tuple[int, int]  # model scale
    camera_px: int  # pixels of the camera image
    index: I32  # flat indices of the kept pixels
    values: F32
    gt: I32 | None = None  # ground-truth region label of each kept pixel (0: none)
    gt_regions: int = 0  # regions in the image's ground truth
    gt_kinds: tuple[str, ...] = ()  # kind of each ground-truth region (label i -> [i - 1])

    @staticmethod
    def build(
        opened: F32,
        floor: float,
        camera_px: int,
        gt_labels: I32 | None = None,
        gt_regions: int = 0,
        gt_kinds: Sequence[str] = (),
    ) -> SparseMap:
        flat = opened.ravel()
        index = np.flatnonzero(flat >= np.float32(floor)).astype(np.int32)
        gt = None if gt_labels is None else gt_labels.ravel()[index].astype(np.int32)
        return SparseMap(
            (int(opened.shape[0]), int(opened.shape[1])),
            camera_px,
            index,
            flat[index].astype(np.float32),
            gt,
            gt_regions,
            tuple(gt_kinds),
        )

    @property
    def defective(self) -> bool:
        return self.gt is not None

    def regions(self, threshold: float, area: AreaFn, min_area_px: int) -> tuple[int, I32]:
        """(published regions, ground-truth labels they overlap) at ``threshold``."""
        keep = self.values >= np.float32(threshold)
        if not keep.any():
            return 0, np.empty(0, np.int32)
        h, w = self.shape
        idx = self.index[keep]
        flagged = np.zeros(h * w, dtype=np.uint8)
        flagged[idx] = 1
        n, labels, stats, _ = cv2.connectedComponentsWithStats(
            flagged.reshape(h, w), connectivity=8, ltype=cv2.CV_32S
        )
        comp = labels.ravel()[idx]
        if min_area_px > 0:
            areas = stats[:, cv2.CC_STAT_AREA]
            ok = np.array([i > 0 and area(int(areas[i])) >= min_area_px for i in range(n)])
            published = int(ok.sum())
            sel = ok[comp]
        else:
            published = n - 1
            sel = np.ones(comp.size, dtype=bool)
        if self.gt is None:
            return published, np.empty(0, np.int32)
        gt = self.gt[keep][sel]
        hit: I32 = np.unique(gt[gt > 0]).astype(np.int32)
        return published, hit


@dataclass(frozen=True)
class Counts:
    """What every threshold does on a set of images (arrays aligned with ``thresholds``)."""

    thresholds: npt.NDArray[np.float64]
    alarms: npt.NDArray[np.float64]  # published regions on the defect-free images
    alarmed_images: npt.NDArray[np.float64]  # defect-free images with any
    good_images: int
    good_mpx: float  # camera megapixels of defect-free images
    regions_found: npt.NDArray[np.float64]
    regions: int
    images_found: npt.NDArray[np.float64]
    defect_images: int
    by_kind: dict[str, tuple[npt.NDArray[np.float64], int]]  # kind -> (found, total)

    def alarms_per_image(self) -> npt.NDArray[np.float64]:
        out: npt.NDArray[np.float64] = self.alarms / max(self.good_images, 1)
        return out

    def alarms_per_mpx(self) -> npt.NDArray[np.float64]:
        out: npt.NDArray[np.float64] = self.alarms / max(self.good_mpx, 1e-12)
        return out

    def region_recall(self) -> npt.NDArray[np.float64] | None:
        return None if not self.regions else self.regions_found / self.regions

    def image_recall(self) -> npt.NDArray[np.float64] | None:
        return None if not self.defect_images else self.images_found / self.defect_images

    def kind_recall(self) -> dict[str, npt.NDArray[np.float64]]:
        return {k: f / n for k, (f, n) in self.by_kind.items() if n}


def count(
    maps: Sequence[SparseMap],
    thresholds: Sequence[float],
    area: AreaFn,
    min_area_px: int = 0,
) -> Counts:
    """False alarms on the defect-free maps and defects found on the others, per threshold."""
    ts = np.asarray(sorted(thresholds), dtype=np.float64)
    k = ts.size
    alarms = np.zeros(k)
    alarmed = np.zeros(k)
    found = np.zeros(k)
    images_found = np.zeros(k)
    kinds = sorted({kind for m in maps for kind in m.gt_kinds})
    by_kind = {kind: np.zeros(k) for kind in kinds}
    totals = dict.fromkeys(kinds, 0)
    goods = [m for m in maps if not m.defective]
    bads = [m for m in maps if m.defective]
    for m in bads:
        for kind in m.gt_kinds:
            totals[kind] += 1
    for m in maps:
        for i, t in enumerate(ts):
            n, hit = m.regions(float(t), area, min_area_px)
            if m.defective:
                found[i] += hit.size
                images_found[i] += hit.size > 0
                for label in hit.tolist():
                    if m.gt_kinds:
                        by_kind[m.gt_kinds[label - 1]][i] += 1
            else:
                alarms[i] += n
                alarmed[i] += n > 0
    return Counts(
        thresholds=ts,
        alarms=alarms,
        alarmed_images=alarmed,
        good_images=len(goods),
        good_mpx=sum(m.camera_px for m in goods) / 1e6,
        regions_found=found,
        regions=sum(m.gt_regions for m in bads),
        images_found=images_found,
        defect_images=len(bads),
        by_kind={kind: (by_kind[kind], totals[kind]) for kind in kinds},
    )


@dataclass(frozen=True)
class BudgetThreshold:
    """The lowest threshold expected to stay within a false-alarm budget, and how it was found."""

    threshold: float
    expected_alarms_per_mpx: float
    extrapolated: bool
    fit: tuple[float, float] | None  # log(alarms) = a + b * threshold, over the tail


TAIL_START = 20  # the fitted tail starts where fewer alarms than this remain


def budget_threshold(counts: Counts, budget_per_mpx: float) -> BudgetThreshold:
    """The lowest threshold whose false alarms per Mpx of defect-free web stay within budget.

    Where the calibration images hold enough web to observe the budget (at least one alarm
    allowed on them), it is counted: the lowest threshold with at most the budget there and at
    every higher threshold. Where they do not (a budget of one alarm in 100 Mpx, calibrated on
    10 Mpx), the tail is extrapolated: the alarm count of a residual's upper tail falls
    roughly exponentially with the threshold, so log(alarms) is fitted linearly over the
    observed tail (its last decline: from the last threshold with ``TAIL_START`` alarms or
    more, or the one with the most, upwards; weighted by the counts) and
    solved for the budget, never below the lowest threshold that raised no alarm at all and
    never further above it than the tail is long. Without a tail to fit (fewer than three
    thresholds with alarms), that zero-alarm threshold with a 10 % margin is taken.
    """
    ts, alarms, mpx = counts.thresholds, counts.alarms, max(counts.good_mpx, 1e-12)
    allowed = budget_per_mpx * mpx
    # lowest threshold with at most `allowed` alarms here and above
    best = float(ts[-1])
    for t, a in zip(ts[::-1], alarms[::-1], strict=True):
        if a > allowed:
            break
        best = float(t)
    if allowed >= 1.0:
        i = int(np.searchsorted(ts, best))
        return BudgetThreshold(best, float(alarms[i] / mpx), False, None)
    zero = best  # with allowed < 1: the lowest threshold with no alarm here and above
    # The tail: from the threshold with the most alarms upwards (below it regions merge, and
    # their count falls again), the points that still raise at least one.
    peak = int(np.argmax(alarms))
    # ... and only its last decline: from the last threshold with TAIL_START or more alarms
    # (the bulk below can plateau or even rise while regions fragment)
    many = np.flatnonzero(alarms[peak:] >= TAIL_START)
    start = peak + (int(many[-1]) if many.size else 0)
    tail = np.zeros(alarms.size, dtype=bool)
    tail[start:] = alarms[start:] >= 1
    fallback = BudgetThreshold(zero * 1.1 if zero > 0 else zero, 0.0, True, None)
    if np.count_nonzero(tail) < 3:
        return fallback
    x, y, w = ts[tail], np.log(alarms[tail]), alarms[tail]
    b, a = np.polyfit(x, y, 1, w=np.sqrt(w))
    if not b < 0 or not math.isfinite(a):
        return fallback
    t_star = (math.log(allowed) - a) / b if allowed > 0 else math.inf
    # Never below the zero-alarm threshold; never more than twice as far above the tail's
    # start as the zero-alarm threshold is (a shallow fit must not push it out of sight).
    cap = zero + (zero - float(x[0])) if zero > float(x[0]) else zero * 1.5
    t = min(max(zero, t_star), cap) if math.isfinite(t_star) else cap
    expected = math.exp(a + b * t) / mpx
    return BudgetThreshold(float(t), float(expected), True, (float(a), float(b)))
