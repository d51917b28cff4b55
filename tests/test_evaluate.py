"""Tests of linescan.evaluate: pixel ROC, FPR threshold, region overlap, PRO, plot and files."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from skimage.measure import label as sk_label
from skimage.morphology import opening as sk_opening
from sklearn.metrics import roc_auc_score, roc_curve

from linescan.evaluate import (
    MAX_ROC_POINTS,
    OPENING_KERNEL,
    Roc,
    evaluate_maps,
    open_segmentation,
    overlap_quantiles,
    pixel_roc,
    plot_roc,
    pro_auc,
    pro_curve,
    region_overlaps,
    threshold_at_fpr,
    write_evaluation,
)

Maps = list[np.ndarray]

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tied_maps(draw: st.DrawFn) -> tuple[Maps, Maps]:
    """1-3 small images with integer-valued scores (many ties) and random masks."""
    n = draw(st.integers(1, 3))
    scores: Maps = []
    masks: Maps = []
    for _ in range(n):
        shape = draw(st.tuples(st.integers(1, 7), st.integers(1, 7)))
        scores.append(draw(hnp.arrays(np.float32, shape, elements=st.integers(0, 4).map(float))))
        masks.append(draw(hnp.arrays(np.bool_, shape)))
    flat = np.concatenate([m.ravel() for m in masks])
    assume(flat.any() and not flat.all())
    return scores, masks


def _flat(scores: Maps, masks: Maps) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.concatenate([np.asarray(s, dtype=np.float32).ravel() for s in scores]),
        np.concatenate([m.ravel() for m in masks]),
    )


def _random_maps(seed: int, n: int = 3, shape: tuple[int, int] = (24, 20)) -> tuple[Maps, Maps]:
    """Continuous scores, higher on blob-shaped defect regions, some images defect-free."""
    rng = np.random.default_rng(seed)
    scores: Maps = []
    masks: Maps = []
    for i in range(n):
        mask = np.zeros(shape, dtype=bool)
        if i % 3 != 2:
            for _ in range(rng.integers(1, 4)):
                r, c = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
                h, w = rng.integers(1, 6, size=2)
                mask[r : r + h, c : c + w] = True
        score = rng.random(shape) + 0.6 * mask * rng.random(shape)
        scores.append(score)
        masks.append(mask)
    return scores, masks


# ------------------------------------------------------------------------------- pixel ROC


@PROPERTY
@given(tied_maps())
def test_roc_matches_sklearn_with_ties(data: tuple[Maps, Maps]) -> None:
    """With many tied scores, AUC equals roc_auc_score and the curve equals roc_curve."""
    scores, masks = data
    roc = pixel_roc(scores, masks)
    s, y = _flat(scores, masks)
    assert roc.auc == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_array_equal(roc.fpr, fpr)
    np.testing.assert_array_equal(roc.tpr, tpr)
    np.testing.assert_array_equal(roc.thresholds, thr)


def test_roc_matches_sklearn_on_continuous_scores() -> None:
    """On continuous float64 scores, AUC equals roc_auc_score within 1e-6."""
    rng = np.random.default_rng(7)
    scores = [rng.normal(size=(40, 50)) for _ in range(4)]
    masks = [rng.random((40, 50)) < 0.1 for _ in range(4)]
    for s, m in zip(scores, masks, strict=True):
        s[m] += 1.0
    roc = pixel_roc(scores, masks)
    y = np.concatenate([m.ravel() for m in masks])
    s64 = np.concatenate([s.ravel() for s in scores])
    assert roc.auc == pytest.approx(roc_auc_score(y, s64), abs=1e-6)
    assert roc.auc == pytest.approx(roc_auc_score(y, s64.astype(np.float32)), abs=1e-12)
    assert np.all(np.diff(roc.thresholds) < 0)
    assert roc.thresholds[0] == np.inf
    assert (roc.fpr[0], roc.tpr[0], roc.fpr[-1], roc.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_perfect_and_inverted_scores_give_one_and_zero() -> None:
    """Scores that separate the classes give AUC 1; the same scores negated give AUC 0."""
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:5, 3:8] = True
    score = np.where(mask, 2.0, 1.0) + np.linspace(0, 0.5, 100).reshape(10, 10)
    assert pixel_roc([score], [mask]).auc == 1.0
    assert pixel_roc([-score], [mask]).auc == 0.0
    assert pro_auc([-score], [mask]) == 0.0


def test_errors_name_the_problem() -> None:
    """No defect pixels, no good pixels, a shape mismatch (naming the image) or NaN raise."""
    good = np.zeros((4, 4), dtype=bool)
    score = np.ones((4, 4))
    with pytest.raises(ValueError, match="no defect pixels"):
        pixel_roc([score, score], [good, good])
    with pytest.raises(ValueError, match="no good pixels"):
        pixel_roc([score], [~good])
    with pytest.raises(ValueError, match="image 1"):
        pixel_roc([score, np.ones((4, 5))], [good, good])
    with pytest.raises(ValueError, match="2 score maps but 1 masks"):
        pixel_roc([score, score], [good])
    with pytest.raises(ValueError, match="score map 0 contains NaN"):
        pixel_roc([np.full((4, 4), np.nan)], [good])
    with pytest.raises(ValueError, match="no defect pixels"):
        pro_auc([score], [good])


# ------------------------------------------------------------------------- FPR threshold


@PROPERTY
@given(tied_maps(), st.floats(0.0, 1.0))
def test_threshold_at_fpr_rule(data: tuple[Maps, Maps], target: float) -> None:
    """The threshold's FPR is <= target, and the next lower distinct score's FPR is > target."""
    scores, masks = data
    roc = pixel_roc(scores, masks)
    t = threshold_at_fpr(roc, target)
    s, y = _flat(scores, masks)
    good = s[~y]
    assert np.count_nonzero(good >= t) / good.size <= target
    lower = s[s < t]
    if lower.size:
        assert np.count_nonzero(good >= lower.max()) / good.size > target
    else:
        assert t == s.min()
    assert threshold_at_fpr(scores, target, masks=masks) == t


def test_threshold_at_fpr_edges() -> None:
    """FPR 0 flags no good pixel, FPR 1 flags everything, out-of-range targets raise."""
    mask = np.array([[True, False, False, False]])
    score = np.array([[3.0, 1.0, 2.0, 4.0]])
    roc = pixel_roc([score], [mask])
    assert threshold_at_fpr(roc, 0.0) == np.inf  # the top score is a good pixel
    assert threshold_at_fpr(roc, 1 / 3) == 3.0  # 4 flagged, and 3 adds a defect pixel only
    assert threshold_at_fpr(roc, 1.0) == 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        threshold_at_fpr(roc, 1.5)
    with pytest.raises(ValueError, match="masks="):
        threshold_at_fpr([score], 0.1)


# ------------------------------------------------------------------------ region overlap


def test_region_overlap_of_half_covered_square() -> None:
    """A 10x10 region with its left half flagged has overlap 0.5; an untouched one 0."""
    mask = np.zeros((30, 30), dtype=bool)
    mask[5:15, 5:15] = True
    mask[20:25, 20:25] = True
    score = np.zeros((30, 30))
    score[5:15, 5:10] = 1.0
    overlaps = region_overlaps([score], [mask], threshold=0.5)
    np.testing.assert_array_equal(overlaps, [0.5, 0.0])
    # The opening keeps the 10 x 5 half except its 4 corner pixels: the diameter-4 disk has
    # no corners, so no placement of it covers a rectangle's corner.
    opened = region_overlaps([score], [mask], threshold=0.5, opening=True)
    assert opened[0] == pytest.approx((50 - 4) / 100)


def test_regions_are_8_connected_and_per_image() -> None:
    """Diagonal neighbours form one region; images are labelled separately, in order."""
    diag = np.eye(4, dtype=bool)
    two = np.zeros((4, 4), dtype=bool)
    two[0, 0] = two[3, 3] = True
    score = np.eye(4)
    score[0, 0] = 0.0
    overlaps = region_overlaps([score, score], [diag, two], threshold=0.5)
    np.testing.assert_array_equal(overlaps, [0.75, 0.0, 1.0])
    assert region_overlaps([score], [np.zeros((4, 4), dtype=bool)], 0.5).size == 0


def test_opening_removes_thin_strokes() -> None:
    """A 2-pixel-wide flagged stroke inside a region survives without opening only."""
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:18, 2:18] = True
    score = np.zeros((20, 20))
    score[:, 9:11] = 1.0
    assert region_overlaps([score], [mask], 0.5)[0] == pytest.approx(32 / 256)
    assert region_overlaps([score], [mask], 0.5, opening=True)[0] == 0.0


def test_open_segmentation_is_a_true_opening() -> None:
    """The opening is anti-extensive, idempotent and equals scikit-image's opening."""
    rng = np.random.default_rng(3)
    seg = np.zeros((60, 60), dtype=bool)
    seg[4:-4, 4:-4] = rng.random((52, 52)) < 0.7  # empty margin: border rules agree
    opened = open_segmentation(seg)
    assert not (opened & ~seg).any()
    np.testing.assert_array_equal(open_segmentation(opened), opened)
    np.testing.assert_array_equal(opened, sk_opening(seg, OPENING_KERNEL.astype(bool)))


def test_overlap_quantiles() -> None:
    """Quantiles are keyed q25/q50/q75 and interpolate linearly; empty input raises."""
    q = overlap_quantiles(np.array([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert q == {"q25": 0.25, "q50": 0.5, "q75": 0.75}
    with pytest.raises(ValueError, match="no region overlaps"):
        overlap_quantiles(np.empty(0))


# ----------------------------------------------------------------------------------- PRO


def _brute_pro_auc(scores: Maps, masks: Maps, max_fpr: float) -> float:
    """PRO-AUC by definition: every threshold, every region, one at a time."""
    s32 = [np.asarray(s, dtype=np.float32) for s in scores]
    region_masks = []
    for i, m in enumerate(masks):
        labels = sk_label(m, connectivity=2)
        region_masks += [(i, labels == k) for k in range(1, labels.max() + 1)]
    n_good = sum(int((~m).sum()) for m in masks)
    values = np.unique(np.concatenate([s.ravel() for s in s32]))
    points = []
    for t in [np.inf, *values[::-1].tolist()]:
        fp = sum(int(((s >= t) & ~m).sum()) for s, m in zip(s32, masks, strict=True))
        overlaps = [(s32[i] >= t)[r].mean() for i, r in region_masks]
        points.append((fp / n_good, float(np.mean(overlaps))))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < max_fpr:
            y_end = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            area += (max_fpr - x0) * (y0 + y_end) / 2
            break
        else:
            break
    return area / max_fpr


@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pro_auc_matches_brute_force(seed: int, max_fpr: float) -> None:
    """On small random data the PRO-AUC equals the by-definition computation within 1e-6."""
    scores, masks = _random_maps(seed)
    assert pro_auc(scores, masks, max_fpr) == pytest.approx(
        _brute_pro_auc(scores, masks, max_fpr), abs=1e-6
    )


@PROPERTY
@given(tied_maps(), st.sampled_from([0.3, 0.1, 1.0]))
def test_pro_auc_matches_brute_force_with_ties(data: tuple[Maps, Maps], max_fpr: float) -> None:
    """With tied integer scores the PRO-AUC equals the by-definition computation within 1e-6."""
    scores, masks = data
    assert pro_auc(scores, masks, max_fpr) == pytest.approx(
        _brute_pro_auc(scores, masks, max_fpr), abs=1e-6
    )


def test_pro_of_perfect_detector_is_one() -> None:
    """Scores higher on every defect pixel than on every good pixel give PRO-AUC 1.0."""
    scores, masks = _random_maps(5)
    perfect = [np.where(m, 2.0 + s, s) for s, m in zip(scores, masks, strict=True)]
    assert pro_auc(perfect, masks) == pytest.approx(1.0, abs=1e-12)


def test_pro_curve_shape_and_thinning() -> None:
    """The curve runs from (0, 0) to FPR max_fpr; thinning keeps the ends and the AUC."""
    scores, masks = _random_maps(4, n=4, shape=(40, 40))
    full = pro_curve(scores, masks, max_fpr=0.3)
    assert (full.fpr[0], full.pro[0]) == (0.0, 0.0)
    assert full.fpr[-1] == pytest.approx(0.3)
    assert np.all(np.diff(full.fpr) >= 0)
    assert np.all(np.diff(full.pro) >= 0)
    thin = pro_curve(scores, masks, max_fpr=0.3, n_thresholds=20)
    assert thin.fpr.size <= 20 < full.fpr.size
    assert thin.auc == full.auc
    assert thin.fpr[-1] == full.fpr[-1]
    assert thin.pro[-1] == full.pro[-1]
    with pytest.raises(ValueError, match="max_fpr"):
        pro_curve(scores, masks, max_fpr=0.0)


# -------------------------------------------------------------------- evaluation, files


def test_evaluate_maps_is_consistent_with_the_parts() -> None:
    """evaluate_maps reports the same numbers as the individual functions."""
    scores, masks = _random_maps(6, n=5)
    ev = evaluate_maps(scores, masks, fpr_for_overlap=0.05, max_fpr=0.3)
    roc = pixel_roc(scores, masks)
    assert ev.pixel_auroc == roc.auc
    assert ev.pro_auc == pro_auc(scores, masks, 0.3)
    t = threshold_at_fpr(roc, 0.05)
    overlaps = region_overlaps(scores, masks, t)
    summary = ev.region_overlap_at_fpr
    assert summary["threshold"] == t
    assert summary["regions"] == overlaps.size
    assert summary["q50"] == pytest.approx(float(np.median(overlaps)))
    assert ev.n_images == 5
    assert ev.n_defect_pixels + ev.n_good_pixels == 5 * 24 * 20


def test_metrics_json_has_the_required_keys(tmp_path: Path) -> None:
    """metrics.json holds exactly the agreed keys, and roc_points has <= 512 points."""
    rng = np.random.default_rng(8)
    masks = [rng.random((64, 64)) < 0.2 for _ in range(3)]
    scores = [rng.random((64, 64)) + 0.3 * m for m in masks]
    ev = evaluate_maps(scores, masks)
    write_evaluation(ev, tmp_path / "out", "ssim")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics) == {
        "pixel_auroc",
        "pro_auc_30",
        "region_overlap_at_fpr",
        "n_images",
        "n_defect_pixels",
        "n_good_pixels",
        "roc_points",
    }
    assert {"fpr", "threshold", "q25", "q50", "q75", "regions"} <= set(
        metrics["region_overlap_at_fpr"]
    )
    assert metrics["region_overlap_at_fpr"]["fpr"] == 0.05
    points = metrics["roc_points"]
    assert ev.roc.fpr.size > MAX_ROC_POINTS
    assert 2 <= len(points["fpr"]) == len(points["tpr"]) <= MAX_ROC_POINTS
    assert (points["fpr"][0], points["tpr"][0], points["threshold"][0]) == (0.0, 0.0, None)
    assert (points["fpr"][-1], points["tpr"][-1]) == (1.0, 1.0)
    assert cv2.imread(str(tmp_path / "out" / "roc.png")) is not None


def test_plot_roc_writes_a_readable_png(tmp_path: Path) -> None:
    """plot_roc writes an 800x600 PNG on white with coloured curves."""
    scores, masks = _random_maps(9)
    roc = pixel_roc(scores, masks)
    inverted = pixel_roc([-s for s in scores], masks)
    path = tmp_path / "roc.png"
    plot_roc({"ssim": roc, "l2": inverted}, path, "Pixel ROC")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None
    assert img.shape == (600, 800, 3)
    assert (img[5, 5] == 255).all()
    b, g, r = (img[..., k].astype(int) for k in range(3))
    assert ((r - b > 100) & (r - g > 100)).sum() > 200  # the first (red) curve is drawn
    with pytest.raises(ValueError, match="at least one curve"):
        plot_roc({}, path, "empty")
    assert isinstance(roc, Roc)


# --------------------------------------------------------------------------------------------
# The operating point, counted as the daemon publishes


def test_the_operating_point_counts_what_inspection_publishes(
    ssim_model: Any, tmp_path: Path
) -> None:
    """``run_evaluation``'s operating point, at the bundle's threshold and at a lower one: the
    false alarms per good test image are ``inspect_image``'s regions on them; a ground-truth
    region is found when a published region's mask touches it; a defect image when any is.
    The FROC holds the same point and froc.png is written."""
    from linescan.data.images import read_grey, read_mask, test_samples
    from linescan.evaluation_run import run_evaluation
    from linescan.pipeline import Settings, inspect_image
    from linescan.preprocess import upscale_to

    bundle = ssim_model.load()
    backend = ssim_model.backend()
    meta = bundle.meta
    assert meta.threshold is not None
    for threshold in (meta.threshold, 0.7 * meta.threshold):
        out = tmp_path / f"eval{threshold:.3f}"
        doc = run_evaluation(
            ssim_model.data, meta, backend, out, settings=Settings(threshold=threshold)
        )
        op = doc["operating_point"]
        assert set(op) >= {
            "threshold", "false_alarms_per_image", "false_alarms_per_mpx", "region_recall",
            "image_recall", "good_images", "defect_images", "defect_regions",
        }  # fmt: skip
        samples = test_samples(ssim_model.data)
        goods = [s for s in samples if s.mask is None]
        bads = [s for s in samples if s.mask is not None]
        settings = Settings(threshold=threshold)
        alarms = sum(
            len(inspect_image(read_grey(s.image), meta, backend, settings).regions) for s in goods
        )
        assert op["false_alarms_per_image"] == pytest.approx(alarms / len(goods))
        px = sum(read_grey(s.image).size for s in goods) / 1e6
        assert op["false_alarms_per_mpx"] == pytest.approx(alarms / px)
        found_images = 0
        found_regions = 0
        regions = 0
        for s in bads:
            assert s.mask is not None
            res = inspect_image(read_grey(s.image), meta, backend, settings)
            gt = read_mask(s.mask)
            small = meta.input.to_model(gt.astype(np.uint8)) > 0
            n, labels = cv2.connectedComponents(small.astype(np.uint8), connectivity=8)
            hit = np.unique(labels[(res.mask > 0) & (labels > 0)])
            regions += n - 1
            found_regions += hit.size
            found_images += hit.size > 0
            assert (
                upscale_to(res.mask.astype(np.float32), *gt.shape, meta.input, True).shape
                == gt.shape
            )
        assert op["defect_regions"] == regions
        assert op["region_recall"] == pytest.approx(found_regions / regions)
        assert op["image_recall"] == pytest.approx(found_images / len(bads))
        metrics = json.loads((out / "metrics.json").read_text())
        assert op in metrics["froc"]
        recalls = [p["region_recall"] for p in metrics["froc"]]
        assert recalls == sorted(recalls, reverse=True)
        assert cv2.imread(str(out / "froc.png")) is not None
