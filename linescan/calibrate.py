"""Calibration on defect-free images: score statistics, residual choice and threshold.

What a line engineer asks of a threshold is "how many real defects does it catch at the false-
alarm rate my line tolerates". Calibration answers that from defect-free images alone:

1. **Statistics.** The score's per-column, per-edge and per-row statistics (``score.py``) are
   learned from the images (``statistics="refresh"``, the default of ``linescan calibrate``;
   training learns them from its own images and calibrates on held-out ones with
   ``statistics="keep"``). Statistics fitted to an image make that image look tamer than a
   new one would, and the threshold would follow: so when they are learned here, every image
   is scored with statistics learned *without* it (``FOLDS``-fold cross-fitting), and only
   the stored statistics are learned from all of them.
2. **Evidence.** Every image is scored as is (false alarms) and, in ``plants`` copies, with
   synthetic defects of several kinds planted into it (``data/plants.py``): spots, thin lines
   along and across the web, pasted patches of the same material, smudges, smooth patches.
   Counted exactly as the daemon publishes (``detection.py``). With ``defects`` (labelled
   images, MVTec layout) the real defects are counted too. Images the model was trained on
   are left out of this evidence when at least ``MIN_JUDGED`` others are given (they look
   tamer than new material: on MVTec grid a threshold judged on them raised 80 false alarms
   per new good image); they still teach the statistics. With fewer new images, a threshold
   judged on them alone is a guess from one or two images' tails (on AITEX fabric_01, one
   held-out image gave a threshold that raised 43 false alarms per new good image; on MVTec
   grid, two gave one that found nothing), so all images are judged and the summary warns
   that the count flatters the model.
3. **Threshold**, by ``rule``:

   * ``budget`` (default): the lowest threshold at which the defect-free images raise at most
     ``budget_per_mpx`` false alarms per megapixel of web (``linescan calibrate
     --alarms-per-metre`` converts from metres with ``lines_per_metre``). A budget below what
     the images can show (one alarm in 100 Mpx, calibrated on 10 Mpx) is met by extrapolating
     the alarm count's exponential tail (``detection.budget_threshold``), never below the
     lowest threshold that raised no alarm at all.
   * ``max-opened``: the lowest threshold at which no image raises anything, times ``margin``
     (the rule before budgets; it promises silence on these images at any cost in sensitivity).
   * ``quantile``: a pixel quantile of the score (a pixel false-positive rate).
   * ``alarm-rate``: like ``budget`` but counted only, never extrapolated.
4. **Residual** (``residual="auto"``): each candidate residual (``ssim``, ``l2`` and the
   ``combined`` maximum of normalised SSIM and smoothed absolute difference) gets its own
   threshold by the rule, and the one that finds the most synthetic defects (mean over kinds)
   there wins. The table says plainly which kinds of defect the chosen score cannot see:
   those it finds rarely at the chosen threshold, and those it ranks below chance (scores
   lower than defect-free web: defects smoother than a stochastic texture, under a blurry
   reconstruction).

Everything is stored in ``bundle.json`` under ``inspection.calibration``: the rule, the
budget, the threshold and whether it was extrapolated, the candidates, the recall per kind,
and the trade-off table (``operating_points``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from linescan.backends import Backend
from linescan.data.images import TestSample, read_grey, read_mask
from linescan.data.plants import PLANT_KINDS, plant
from linescan.detection import BudgetThreshold, Counts, SparseMap, budget_threshold, count
from linescan.errors import DataError
from linescan.model.bundle import BundleMeta, save_score, update_meta
from linescan.pipeline import Settings, opening_for, reconstruct, scoring_for
from linescan.residual import COMPONENTS, Component, ResidualKind, residual_components
from linescan.score import ScoreModel, Scoring, learn_score, score_image
from linescan.segment import grey_open

Rule = Literal["budget", "max-opened", "quantile", "alarm-rate"]
RULES: tuple[Rule, ...] = ("budget", "max-opened", "quantile", "alarm-rate")
DEFAULT_BUDGET_PER_MPX = 0.05
GRID_POINTS = 48
MAX_IMAGES = 200  # calibration images beyond this are thinned evenly (memory, time)
POOR_RECALL = 0.2  # a kind found less often than this at the chosen threshold is "not seen"
MIN_JUDGED = 4  # fewer unseen images than this: false alarms are judged on all of them
FOLDS = 4  # cross-fitting folds when the statistics are learned from the calibration images
F32 = npt.NDArray[np.float32]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Calibration:
    threshold: float
    record: dict[str, Any]
    residual: ResidualKind  # the residual the threshold belongs to
    score: ScoreModel | None  # statistics learned here (None: the bundle's are kept)


@dataclass
class _Image:
    """One image's model input and residual components (kept for every candidate residual)."""

    x: F32
    comps: dict[Component, F32]
    shape: tuple[int, int]  # the camera image's (height, width)
    gt: npt.NDArray[np.int32] | None = None  # ground-truth labels at model scale
    gt_regions: int = 0
    gt_kinds: tuple[str, ...] = ()
    fold: int = -1  # cross-fitting fold of the calibration image (-1: scored by all statistics)


def candidates(meta: BundleMeta, residual: str | None, have_stats: bool) -> list[ResidualKind]:
    """The residuals calibration chooses from."""
    if meta.variant == "vae":
        return ["vae"]
    if residual is None or residual == "keep":
        return [meta.residual]
    if residual == "auto":
        return ["ssim", "combined", "l2"] if have_stats else [meta.residual]
    if residual not in COMPONENTS or residual == "vae":
        raise ValueError(f"unknown residual {residual!r}; expected auto, ssim, l2 or combined")
    if residual == "combined" and not have_stats:
        raise ValueError("the combined residual needs score statistics")
    return [residual]


def calibrate(
    paths: Sequence[Path],
    meta: BundleMeta,
    backend: Backend,
    rule: Rule = "budget",
    margin: float = 1.1,
    quantile: float = 0.999,
    settings: Settings = Settings(),
    *,
    budget_per_mpx: float = DEFAULT_BUDGET_PER_MPX,
    max_alarms_per_mpx: float = 0.1,
    defects: Sequence[TestSample] = (),
    plants: int = 2,
    residual: str | None = "auto",
    statistics: Literal["refresh", "keep"] = "refresh",
    lines_per_metre: float | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    judge: Literal["unseen", "all"] = "unseen",
) -> Calibration:
    """Statistics, residual and threshold from defect-free images (see the module doc).

    ``judge="unseen"`` counts false alarms (and plants synthetic defects) only on the images
    the model was not trained on, when there are at least ``MIN_JUDGED`` of them
    (``train.trained_on``); ``"all"`` on all.
    """
    if not paths:
        raise DataError("calibration needs at least one defect-free image")
    if rule not in RULES:
        raise ValueError(f"unknown calibration rule {rule!r}; expected one of {RULES}")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    for name, v in (("budget_per_mpx", budget_per_mpx), ("max_alarms_per_mpx", max_alarms_per_mpx)):
        if not v >= 0 or not math.isfinite(v):
            raise ValueError(f"{name} must be >= 0, got {v}")
    if plants < 0:
        raise ValueError(f"plants must be >= 0, got {plants}")
    say = progress or (lambda _msg: None)
    used = list(paths)
    if len(used) > MAX_IMAGES:
        used = [used[round(i * (len(used) - 1) / (MAX_IMAGES - 1))] for i in range(MAX_IMAGES)]
    vae = meta.variant == "vae"
    needed: list[Component] = ["vae"] if vae else ["dssim", "absdiff", "sqdiff"]
    say(f"reconstructing {len(used)} defect-free image(s)")
    goods = [_reconstruct(read_grey(p), meta, backend, settings, needed) for p in used]
    # Images the model was trained on look tamer than new material: their false alarms are
    # no evidence for the threshold. Judged on the others, when there are enough of them.
    from linescan.train import trained_on

    seen = trained_on(meta.training, used) if judge == "unseen" else [False] * len(used)
    judged = [i for i, s in enumerate(seen) if not s]
    if len(judged) < MIN_JUDGED:
        judged = list(range(len(used)))
    model = meta.score
    learned: ScoreModel | None = None
    folds: list[ScoreModel | None] = []
    if statistics == "refresh" or model is None:
        say("learning the score statistics")
        learned = learn_score(
            [g.x for g in goods],
            [g.comps for g in goods],
            learned={
                "images": len(used),
                "source": "calibrate",
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        model = learned
        k = min(FOLDS, len(goods))
        if k >= 2:
            for i, g in enumerate(goods):
                g.fold = i % k
            for f in range(k):
                rest = [g for g in goods if g.fold != f]
                folds.append(learn_score([g.x for g in rest], [g.comps for g in rest]))
    kinds = candidates(meta, residual, model is not None)
    fixed = scoring_for(meta, settings).fixed_columns

    def scorer(kind: ResidualKind) -> Callable[[_Image], Scoring]:
        whole = Scoring(kind, model, fixed)
        by_fold = [Scoring(kind, m, fixed) for m in folds]
        return lambda img: by_fold[img.fold] if img.fold >= 0 and by_fold else whole

    scorings = {k: scorer(k) for k in kinds}
    opening = opening_for(meta, settings)
    planted: list[_Image] = []
    if plants:
        say(f"planting synthetic defects into {plants} cop(ies) of each image")
        for i in judged:
            p, g = used[i], goods[i]
            pixels = read_grey(p)
            for c in range(plants):
                rng = np.random.default_rng([seed, i, c])
                scoring = scorings[kinds[0]](g)
                planted.append(_planted(pixels, g, rng, meta, backend, settings, needed, scoring))
    labelled: list[_Image] = []
    for d in defects:
        if d.mask is not None:
            labelled.append(_labelled(d, meta, backend, settings, needed))
    say("counting alarms and defects found at every threshold")
    results = {
        k: _evaluate(
            k,
            scorings[k],
            [goods[i] for i in judged],
            planted,
            labelled,
            opening,
            meta,
            settings,
            rule,
            margin,
            quantile,
            budget_per_mpx,
            max_alarms_per_mpx,
            leavable=[seen[i] for i in judged] if any(seen[i] for i in judged) else None,
        )
        for k in kinds
    }
    chosen = max(kinds, key=lambda k: (results[k]["expected_recall"] or 0.0, -kinds.index(k)))
    res = results[chosen]
    threshold = float(res["threshold"])
    per_metre = None
    if lines_per_metre:
        per_metre = lines_per_metre * goods[0].shape[1] / 1e6  # Mpx per metre of web
    record: dict[str, Any] = {
        "rule": rule,
        "budget_per_mpx": budget_per_mpx if rule == "budget" else None,
        "budget_per_metre": (
            budget_per_mpx * per_metre if rule == "budget" and per_metre is not None else None
        ),
        "lines_per_metre": lines_per_metre,
        "margin": margin if rule == "max-opened" else None,
        "quantile": quantile,
        "max_alarms_per_mpx": max_alarms_per_mpx if rule == "alarm-rate" else None,
        "threshold": threshold,
        "extrapolated": res["extrapolated"],
        "outliers": [{"image": str(used[judged[i]]), "score": v} for i, v in res["left_out"]],
        "judged_images": len(judged),
        "trained_on_images": sum(seen),
        "judged_on_training_images": any(seen[i] for i in judged),
        "unseen_images": len(seen) - sum(seen),
        "expected_alarms_per_mpx": res["expected_alarms_per_mpx"],
        "residual": chosen,
        "residual_choice": residual or "keep",
        "statistics": "learned here" if learned is not None else "kept from the bundle",
        "score": Scoring(chosen, model, fixed).describe(goods[0].x.shape[1]),
        "cross_fitted_folds": len(folds),
        "opening_disk_diameter": opening,
        "images": len(paths),
        "images_used": len(used),
        "good_mpx": res["good_mpx"],
        "plants_per_image": plants,
        "planted": res["planted"],
        "defect_images": len(labelled),
        "expected_recall": res["expected_recall"],
        "kinds": res["kinds"],  # recall at the threshold; auroc: peak vs defect-free windows
        "not_seen": [k for k, v in res["kinds"].items() if v["verdict"] != "seen"],
        "candidates": {
            k: {
                "threshold": r["threshold"],
                "expected_recall": r["expected_recall"],
                "extrapolated": r["extrapolated"],
                "kinds": {kk: vv["recall"] for kk, vv in r["kinds"].items()},
            }
            for k, r in results.items()
        },
        "opened_max": res["opened_max"],
        "pixel_quantile_value": res["quantile_value"],
        "stride": settings.stride or meta.stride,
        "min_area_px": settings.min_area_px,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": [str(p) for p in paths[:50]],
        "operating_points": res["points"],
    }
    return Calibration(threshold, record, chosen, learned)


# -------------------------------------------------------------------- per image


def _reconstruct(
    pixels: npt.NDArray[np.generic],
    meta: BundleMeta,
    backend: Backend,
    settings: Settings,
    needed: Sequence[Component],
) -> _Image:
    rec = reconstruct(pixels, meta, backend, settings)
    comps: dict[Component, F32] = {}
    for kind in ("ssim", "combined", "l2", "vae"):
        if all(c in comps for c in COMPONENTS[kind]) or not any(
            c in needed for c in COMPONENTS[kind]
        ):
            continue
        got = residual_components(
            kind, rec.model_input, rec.reconstruction, meta.ssim, meta.vae_sigma
        )
        comps.update({c: v for c, v in got.items() if c in needed})
    return _Image(rec.model_input, comps, (int(pixels.shape[0]), int(pixels.shape[1])))


def _model_labels(labels: npt.NDArray[np.int32], n: int, meta: BundleMeta) -> npt.NDArray[np.int32]:
    """Camera-pixel region labels 1..n -> model scale: a model pixel is in region i when any
    camera pixel it covers is (the model's own down-scaling of each region's mask)."""
    out = np.zeros(meta.input.model_shape(*labels.shape), dtype=np.int32)
    for i in range(1, n + 1):
        out[meta.input.to_model((labels == i).astype(np.uint8)) > 0] = i
    return out


def _planted(
    pixels: npt.NDArray[np.generic],
    good: _Image,
    rng: np.random.Generator,
    meta: BundleMeta,
    backend: Backend,
    settings: Settings,
    needed: Sequence[Component],
    scoring: Scoring,
) -> _Image:
    """The image with one synthetic defect of each kind, on the web."""
    _, runs = score_image(scoring, good.comps, good.x)
    n = meta.input.downscale
    lefts = [e.left for _, _, e in runs if e.left is not None]
    rights = [e.right for _, _, e in runs if e.right is not None]
    margin = 8 * n
    lo = max(lefts) * n + margin if lefts else 0
    hi = min(rights) * n - margin if rights else pixels.shape[1]
    max_value = float(2**meta.input.bit_depth - 1)
    img, placed, labels = plant(pixels, rng, PLANT_KINDS, (lo, hi), max_value)
    out = _reconstruct(img, meta, backend, settings, needed)
    out.gt = _model_labels(labels, len(placed), meta)
    out.gt_regions = len(placed)
    out.gt_kinds = tuple(p.kind for p in placed)
    out.fold = good.fold  # scored by the statistics learned without its own image
    return out


def _labelled(
    sample: TestSample,
    meta: BundleMeta,
    backend: Backend,
    settings: Settings,
    needed: Sequence[Component],
) -> _Image:
    import cv2

    if sample.mask is None:  # pragma: no cover - callers filter
        raise ValueError("a labelled sample needs a mask")
    pixels = read_grey(sample.image)
    mask = read_mask(sample.mask)
    if mask.shape != pixels.shape:
        raise DataError(
            f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]}, its image "
            f"{sample.image} is {pixels.shape[1]}x{pixels.shape[0]}"
        )
    out = _reconstruct(pixels, meta, backend, settings, needed)
    small = meta.input.to_model(mask.astype(np.uint8)) > 0
    n, labels = cv2.connectedComponents(small.astype(np.uint8), connectivity=8)
    out.gt = labels.astype(np.int32)
    out.gt_regions = int(n - 1)
    return out


# -------------------------------------------------------------------- counting


def _evaluate(
    kind: ResidualKind,
    scoring: Callable[[_Image], Scoring],
    goods: Sequence[_Image],
    planted: Sequence[_Image],
    labelled: Sequence[_Image],
    opening: int,
    meta: BundleMeta,
    settings: Settings,
    rule: Rule,
    margin: float,
    quantile: float,
    budget_per_mpx: float,
    max_alarms_per_mpx: float,
    leavable: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Thresholds, counts and the rule's threshold for one candidate residual.

    ``leavable``: which of ``goods`` may be left out of the false-alarm count as flawed (all
    by default). Where images the model was trained on are judged beside new ones, only the
    trained ones: a new image stands out because it is new (leaving it out would judge on
    the training images alone), a trained one that stands out has a flaw.
    """
    good_scores: list[F32] = []
    good_open: list[F32] = []
    rng = np.random.default_rng(0)
    sample: list[F32] = []
    for g in goods:
        s, _ = score_image(scoring(g), g.comps, g.x)
        good_scores.append(s)
        good_open.append(grey_open(s, opening))
        flat = s.ravel()
        sample.append(flat if flat.size <= 100_000 else rng.choice(flat, 100_000, replace=False))
    pooled = np.concatenate(sample)
    q_value = float(np.quantile(pooled, quantile))
    opened_max = [float(o.max()) for o in good_open]
    top = max(opened_max)
    floor = float(np.quantile(pooled, 0.99))
    floor = min(floor, q_value, top)
    maps = [
        SparseMap.build(o, floor, g.shape[0] * g.shape[1])
        for o, g in zip(good_open, goods, strict=True)
    ]
    plant_maps = []
    ranks: dict[str, list[float]] = {}  # per kind: P(plant peak > a good window's peak)
    window_rng = np.random.default_rng(1)
    for p in planted:
        s, _ = score_image(scoring(p), p.comps, p.x)
        opened = grey_open(s, opening)
        maps.append(
            SparseMap.build(opened, floor, p.shape[0] * p.shape[1], p.gt, p.gt_regions, p.gt_kinds)
        )
        plant_maps.append(maps[-1])
        if p.gt is not None:
            for i, k in enumerate(p.gt_kinds, start=1):
                rank = _peak_rank(opened, p.gt == i, good_open, window_rng)
                if rank is not None:
                    ranks.setdefault(k, []).append(rank)
    real = []
    for d in labelled:
        s, _ = score_image(scoring(d), d.comps, d.x)
        px = d.shape[0] * d.shape[1]
        real.append(SparseMap.build(grey_open(s, opening), floor, px, d.gt, d.gt_regions))
    hi = max([top, *(float(m.values.max()) for m in maps + real if m.values.size)]) * 1.05
    hi = max(hi, floor * 1.5, floor + 1e-6)
    rule_values = {
        f"max-opened x{margin:g}": top * margin,
        "max-opened x1": float(np.nextafter(np.float32(top), np.float32(np.inf))),
        f"quantile {quantile:g}": q_value,
    }
    # Dense where the alarms die out (the budget's tail is fitted there), sparse above.
    knee = min(max(top * 1.3, floor * 1.01), hi)
    grid = set(np.linspace(floor, knee, GRID_POINTS).tolist()) | set(rule_values.values())
    if hi > knee:
        spread = np.geomspace if knee > 0 else np.linspace
        grid |= set(spread(knee, hi, 12).tolist())
    thresholds = sorted(t for t in grid if t >= floor)

    def area(a: int) -> int:
        return meta.input.area_to_original(a, *goods[0].shape)

    synth = count(maps, thresholds, area, settings.min_area_px)
    reals = count(maps[: len(goods)] + real, thresholds, area, settings.min_area_px)
    budget = budget_threshold(synth, budget_per_mpx)
    left_out: list[int] = []
    if rule == "budget":
        budget, left_out = _leave_out_outliers(
            maps[: len(goods)], maps[len(goods) :], thresholds, area, settings, budget_per_mpx,
            budget, leavable,
        )  # fmt: skip
    alarm_rate = _alarm_rate(synth, max_alarms_per_mpx)
    rule_values[f"budget {budget_per_mpx:g}/Mpx"] = budget.threshold
    rule_values[f"alarm-rate {max_alarms_per_mpx:g}/Mpx"] = alarm_rate
    chosen = {
        "budget": budget.threshold,
        "max-opened": top * margin,
        "quantile": q_value,
        "alarm-rate": alarm_rate,
    }[rule]
    if chosen not in thresholds:  # an extrapolated budget lies between grid points
        thresholds = sorted({*thresholds, chosen, *rule_values.values()})
        synth = count(maps, thresholds, area, settings.min_area_px)
        reals = count(maps[: len(goods)] + real, thresholds, area, settings.min_area_px)
    idx = thresholds.index(chosen)
    kind_recall = synth.kind_recall()
    kinds: dict[str, dict[str, Any]] = {}
    for k, rec in kind_recall.items():
        auc = float(np.mean(ranks[k])) if ranks.get(k) else None
        r = float(rec[idx])
        verdict = "seen"
        if auc is not None and auc < 0.5:
            verdict = "ranked below chance"
        elif r < POOR_RECALL:
            verdict = "rarely found"
        kinds[k] = {"recall": r, "auroc": auc, "verdict": verdict, "planted": synth.by_kind[k][1]}
    expected = float(np.mean([v["recall"] for v in kinds.values()])) if kinds else None
    names: dict[float, list[str]] = {}
    for name, value in rule_values.items():
        names.setdefault(value, []).append(name)
    points = []
    for i, t in enumerate(thresholds):
        rr, ir = reals.region_recall(), reals.image_recall()
        points.append(
            {
                "threshold": float(t),
                "rules": names.get(float(t), []),
                "alarms_per_image": float(synth.alarms_per_image()[i]),
                "alarms_per_mpx": float(synth.alarms_per_mpx()[i]),
                "clean_images": float(1 - synth.alarmed_images[i] / max(synth.good_images, 1)),
                "synthetic_recall": (
                    float(np.mean([v[i] for v in kind_recall.values()])) if kind_recall else None
                ),
                "defect_images_found": None if ir is None else float(ir[i]),
                "defect_regions_found": None if rr is None else float(rr[i]),
            }
        )
    return {
        "threshold": chosen,
        "extrapolated": budget.extrapolated if rule == "budget" else False,
        "expected_alarms_per_mpx": (
            budget.expected_alarms_per_mpx
            if rule == "budget"
            else float(synth.alarms_per_mpx()[idx])
        ),
        "expected_recall": expected,
        "left_out": [(i, float(maps[i].values.max())) for i in left_out],
        "kinds": kinds,
        "planted": len(plant_maps) and sum(m.gt_regions for m in plant_maps),
        "good_mpx": synth.good_mpx,
        "opened_max": {
            "min": min(opened_max),
            "median": float(np.median(opened_max)),
            "max": top,
        },
        "quantile_value": q_value,
        "points": points,
        "counts": synth,
    }


MAX_LEFT_OUT = 0.1  # share of the calibration images that may be left out as outliers
OUTLIER_FACTOR = 1.5  # ... when their highest region scores this far above the threshold


def _leave_out_outliers(
    goods: Sequence[SparseMap],
    others: Sequence[SparseMap],
    thresholds: Sequence[float],
    area: Callable[[int], int],
    settings: Settings,
    budget_per_mpx: float,
    budget: BudgetThreshold,
    leavable: Sequence[bool] | None = None,
) -> tuple[BudgetThreshold, list[int]]:
    """Leave out "defect-free" images with a flaw: an image whose highest region scores at
    least ``OUTLIER_FACTOR`` times the budget threshold of the other images is left out of the
    false-alarm count (and named in the record), worst first, at most ``MAX_LEFT_OUT`` of the
    images (none of fewer than ten), and only those ``leavable`` allows. One flawed image must
    not blind the model; many are not outliers but the material."""
    peaks = [float(m.values.max()) if m.values.size else -math.inf for m in goods]
    left: list[int] = []
    worst = sorted(range(len(goods)), key=lambda i: -peaks[i])[: int(MAX_LEFT_OUT * len(goods))]
    for j in worst:
        if leavable is not None and not leavable[j]:
            break  # the worst that may not be left out sets the threshold anyway
        keep = [m for i, m in enumerate(goods) if i not in (*left, j)]
        trial = budget_threshold(
            count([*keep, *others], thresholds, area, settings.min_area_px), budget_per_mpx
        )
        if peaks[j] < OUTLIER_FACTOR * trial.threshold or trial.threshold >= budget.threshold:
            break
        left.append(j)
        budget = trial
    return budget, left


def _alarm_rate(counts: Counts, target: float) -> float:
    """The lowest threshold with at most ``target`` alarms per Mpx there and at every higher
    threshold (region counts need not fall monotonically: one region can split in two)."""
    ts, per = counts.thresholds, counts.alarms_per_mpx()
    best = float(ts[-1])
    for t, a in zip(ts[::-1], per[::-1], strict=True):
        if a > target:
            break
        best = float(t)
    return best


def _peak_rank(
    opened: F32,
    region: npt.NDArray[np.bool_],
    goods: Sequence[F32],
    rng: np.random.Generator,
    windows: int = 32,
) -> float | None:
    """How a planted defect ranks against defect-free web: the share of same-sized windows of
    the defect-free images whose highest opened score is below the defect's (ties half).

    Region against window, not pixel against pixel: SSIM marks a flat spot's rim, not its
    inside, and a detector is judged by whether its peak stands out. 0.5 is chance.
    """
    ys, xs = np.nonzero(region)
    if ys.size == 0:
        return None
    pad = 2  # the residual's response reaches past the defect's own pixels
    h, w = opened.shape
    y0, y1 = max(0, int(ys.min()) - pad), min(h, int(ys.max()) + 1 + pad)
    x0, x1 = max(0, int(xs.min()) - pad), min(w, int(xs.max()) + 1 + pad)
    peak = float(opened[y0:y1, x0:x1].max())
    bh, bw = y1 - y0, x1 - x0
    wins = []
    for _ in range(windows):
        g = goods[int(rng.integers(len(goods)))]
        if g.shape[0] < bh or g.shape[1] < bw:
            continue
        gy = int(rng.integers(0, g.shape[0] - bh + 1))
        gx = int(rng.integers(0, g.shape[1] - bw + 1))
        wins.append(float(g[gy : gy + bh, gx : gx + bw].max()))
    if not wins:
        return None
    arr = np.asarray(wins)
    return float((np.sum(arr < peak) + 0.5 * np.sum(arr == peak)) / arr.size)


# -------------------------------------------------------------------- reports


def format_points(points: Sequence[dict[str, Any]], chosen: float) -> str:
    """The trade-off table ``linescan calibrate`` prints (from the record's dicts)."""
    has_defects = any(p.get("defect_images_found") is not None for p in points)
    has_synth = any(p.get("synthetic_recall") is not None for p in points)
    head = ["threshold", "alarms/image", "alarms/Mpx", "clean images"]
    if has_synth:
        head += ["synthetic found"]
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
        keys = (["synthetic_recall"] if has_synth else []) + (
            ["defect_images_found", "defect_regions_found"] if has_defects else []
        )
        for key in keys:
            v = p.get(key)
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


def format_kinds(record: dict[str, Any]) -> str:
    """What the chosen threshold finds, kind by kind, and what it cannot see."""
    kinds = record.get("kinds") or {}
    lines = [
        f"synthetic defects found at threshold {record['threshold']:.4g} "
        f"({record['residual']} score), {record['plants_per_image']} planted cop(ies) per image:"
        if kinds
        else "no synthetic defects were planted (--plants 0)"
    ]
    for k, v in kinds.items():
        auc = "-" if v["auroc"] is None else f"{v['auroc']:.2f}"
        note = "" if v["verdict"] == "seen" else f"  <- {v['verdict']}"
        lines.append(f"  {k:<14} {100 * v['recall']:5.0f} % of {v['planted']:<4} AUROC {auc}{note}")
    if record.get("not_seen"):
        lines.append(
            "this model cannot see: " + ", ".join(record["not_seen"]) + " (at this threshold; "
            "see README: Thresholds)"
        )
    trained, judged = record.get("trained_on_images") or 0, record.get("judged_images") or 0
    unseen = record.get("unseen_images") or 0
    if trained and record.get("judged_on_training_images"):
        few = (
            f"only {unseen} calibration image(s) are new to the model, too few to judge a "
            f"threshold on (at least {MIN_JUDGED}), so false alarms were counted on all {judged}, "
            f"including the {trained} it was trained on"
            if unseen
            else "every calibration image trained the model"
        )
        lines.append(
            f"{few}: their residuals are lower than on new material, so expect more false "
            f"alarms than counted here. Calibrate on at least {MIN_JUDGED} defect-free images "
            "it has not seen (new material from the line)."
        )
    elif trained:
        lines.append(
            f"false alarms judged on the {judged} image(s) the model has not seen; the {trained} "
            "it was trained on (they look tamer than new material) only taught the statistics"
        )
    for o in record.get("outliers") or []:
        lines.append(
            f"left out of the threshold: {Path(o['image']).name}, whose highest region scores "
            f"{o['score']:.3g}, far above the rest of the defect-free images. A flaw in a 'good' "
            "image? Look at it, and remove it from the calibration images if so."
        )
    cands = record.get("candidates") or {}
    if len(cands) > 1:
        lines.append(
            "residuals compared (expected recall at each one's own threshold): "
            + ", ".join(f"{k} {100 * (v['expected_recall'] or 0):.0f} %" for k, v in cands.items())
            + f"; chosen: {record['residual']}"
        )
    return "\n".join(lines)


def store(path: Path, cal: Calibration) -> BundleMeta:
    """Write a calibration into a bundle: residual, threshold, record and new statistics."""
    changes: dict[str, Any] = {
        "residual": cal.residual,
        "threshold": cal.threshold,
        "calibration": cal.record,
    }
    if cal.score is not None:
        return save_score(path, cal.score, **changes)
    return update_meta(path, **changes)
