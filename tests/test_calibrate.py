"""Tests of linescan.calibrate: statistics, residual choice and threshold from defect-free
images, synthetic defects, and what is stored in the bundle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pytest

from linescan.backends import FunctionBackend
from linescan.backends.torch_cpu import TorchBackend
from linescan.calibrate import (
    MIN_JUDGED,
    Calibration,
    calibrate,
    format_kinds,
    format_points,
    store,
)
from linescan.data.images import (
    TestSample,
    read_grey,
    read_mask,
    test_samples,
    training_images,
    write_grey,
)
from linescan.data.plants import PLANT_KINDS
from linescan.errors import DataError
from linescan.model.bundle import BundleMeta, load_bundle
from linescan.pipeline import Settings, inspect_image, reconstruct
from linescan.preprocess import InputSpec, upscale_to

if TYPE_CHECKING:
    from conftest import Trained


def _good_images(trained: Trained) -> list[Path]:
    return training_images(trained.data) + [
        s.image for s in test_samples(trained.data) if s.mask is None
    ]


@pytest.fixture(scope="module")
def good(ssim_model: Trained) -> list[Path]:
    return _good_images(ssim_model)


def _backend(trained: Trained) -> TorchBackend:
    return TorchBackend(trained.load(), precision="fp32")


def test_max_opened_threshold_keeps_every_good_image_clean(
    ssim_model: Trained, good: list[Path]
) -> None:
    """At the max-opened threshold no calibration image shows a region; at 0.9x the
    unmargined value at least one does (so the threshold is tight, not just high)."""
    bundle = ssim_model.load()
    backend = _backend(ssim_model)
    cal = calibrate(
        good, bundle.meta, backend, rule="max-opened", residual="keep", plants=0,
        statistics="keep", judge="all",
    )  # fmt: skip
    meta = bundle.meta
    base = cal.record["opened_max"]["max"]
    assert cal.threshold == pytest.approx(1.1 * base)
    for p in good:
        res = inspect_image(read_grey(p), meta, backend, Settings(threshold=base * 1.0001))
        assert res.regions == [], p
    flagged = [
        p
        for p in good
        if inspect_image(read_grey(p), meta, backend, Settings(threshold=0.9 * base)).regions
    ]
    assert flagged


def test_quantile_rule_returns_the_score_quantile(ssim_model: Trained, good: list[Path]) -> None:
    """The quantile rule's threshold is that quantile of all good score pixels."""
    bundle = ssim_model.load()
    backend = _backend(ssim_model)
    cal = calibrate(
        good, bundle.meta, backend, rule="quantile", quantile=0.99, residual="keep",
        statistics="keep", judge="all",
    )  # fmt: skip
    meta = bundle.meta
    pixels = np.concatenate([reconstruct(read_grey(p), meta, backend).score.ravel() for p in good])
    assert cal.threshold == pytest.approx(float(np.quantile(pixels, 0.99)), rel=1e-6)
    assert float(np.mean(pixels >= cal.threshold)) == pytest.approx(0.01, abs=2e-3)
    assert cal.record["rule"] == "quantile"
    assert cal.record["margin"] is None


def test_calibration_is_stored_in_the_bundle(bundle_copy: Path, good: list[Path]) -> None:
    """``store`` writes the residual, threshold, record and statistics; the reloaded bundle
    inspects with them."""
    bundle = load_bundle(bundle_copy)
    cal = calibrate(good[:3], bundle.meta, TorchBackend(bundle, precision="fp32"))
    assert cal.score is not None  # learned from these images (the default)
    store(bundle_copy, cal)
    again = load_bundle(bundle_copy)
    assert again.meta.threshold == cal.threshold
    assert again.meta.residual == cal.residual
    assert again.meta.calibration is not None
    assert again.meta.calibration["rule"] == "budget"
    assert again.meta.calibration["images"] == 3
    assert again.meta.calibration["files"] == [str(p) for p in good[:3]]
    assert again.meta.weights_sha256 == bundle.meta.weights_sha256
    assert again.meta.score is not None
    assert again.meta.score.learned["images"] == 3
    np.testing.assert_array_equal(
        again.meta.score.columns["dssim"].center, cal.score.columns["dssim"].center
    )
    res = inspect_image(read_grey(good[0]), again.meta, TorchBackend(again, precision="fp32"))
    assert res.threshold == cal.threshold


def test_keep_statistics_keeps_the_bundles(bundle_copy: Path, good: list[Path]) -> None:
    """With statistics="keep" nothing new is learned and the bundle's statistics stay."""
    bundle = load_bundle(bundle_copy)
    assert bundle.meta.score is not None
    cal = calibrate(
        good[:2], bundle.meta, TorchBackend(bundle, precision="fp32"), statistics="keep"
    )
    assert cal.score is None
    store(bundle_copy, cal)
    assert load_bundle(bundle_copy).meta.score_sha256 == bundle.meta.score_sha256


def test_calibration_uses_the_given_stride(tmp_path: Path) -> None:
    """The stride in Settings is used and recorded."""
    img = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    write_grey(tmp_path / "a.png", img)
    seen: list[int] = []

    def count(b: np.ndarray) -> np.ndarray:
        seen.append(len(b))
        return b * np.float32(0.9)

    meta = BundleMeta(loss="l2", latent=4, patch=32, residual="l2", input=InputSpec())
    cal = calibrate(
        [tmp_path / "a.png"], meta, FunctionBackend(count), settings=Settings(stride=8), plants=0
    )
    assert sum(seen) == 5 * 5  # 0, 8, 16, 24, 32 on each axis
    assert cal.record["stride"] == 8
    cal30 = calibrate([tmp_path / "a.png"], replace(meta, stride=30), FunctionBackend(count))
    assert cal30.record["stride"] == 30


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"paths": []}, DataError, "at least one"),
        ({"rule": "median"}, ValueError, "unknown calibration rule"),
        ({"quantile": 0.0}, ValueError, "quantile"),
        ({"quantile": 1.5}, ValueError, "quantile"),
        ({"margin": 0.0}, ValueError, "margin"),
        ({"max_alarms_per_mpx": -0.5}, ValueError, "max_alarms_per_mpx"),
        ({"budget_per_mpx": float("nan")}, ValueError, "budget_per_mpx"),
        ({"plants": -1}, ValueError, "plants"),
        ({"residual": "psnr"}, ValueError, "unknown residual"),
    ],
)
def test_bad_arguments_raise(
    tmp_path: Path, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    """No images, an unknown rule or residual, or out-of-range numbers raise, naming them."""
    write_grey(tmp_path / "a.png", np.zeros((40, 40), np.uint8))
    meta = BundleMeta(loss="l2", latent=4, patch=32, residual="l2")
    args: dict[str, object] = {
        "paths": [tmp_path / "a.png"],
        "meta": meta,
        "backend": FunctionBackend(lambda b: b),
    }
    args.update(kwargs)
    with pytest.raises(error, match=message):
        calibrate(**args)  # type: ignore[arg-type]


def test_unreadable_calibration_image_names_the_file(tmp_path: Path) -> None:
    """A missing calibration image is a DataError naming it."""
    meta = BundleMeta(loss="l2", latent=4, patch=32, residual="l2")
    with pytest.raises(DataError, match=r"gone\.png"):
        calibrate([tmp_path / "gone.png"], meta, FunctionBackend(lambda b: b))


# --------------------------------------------------------------------------- operating points


@pytest.fixture(scope="module")
def traded(ssim_model: Trained, good: list[Path]) -> tuple[Calibration, list[TestSample]]:
    """A calibration of the bundle's own residual and statistics with the dataset's labelled
    defect images."""
    bundle = ssim_model.load()
    defects = [s for s in test_samples(ssim_model.data) if s.mask is not None]
    cal = calibrate(
        good, bundle.meta, _backend(ssim_model), defects=defects, residual="keep",
        statistics="keep", judge="all",
    )  # fmt: skip
    return cal, defects


def test_operating_points_count_what_inspection_reports(
    ssim_model: Trained, good: list[Path], traded: tuple[Calibration, list[TestSample]]
) -> None:
    """At every threshold of the table, the false alarms per image are exactly the regions
    ``inspect_image`` reports on the defect-free images, and the defect images found are
    those whose inspection mask touches the ground truth (the oracle: the real pipeline)."""
    cal, defects = traded
    meta = ssim_model.load().meta
    backend = _backend(ssim_model)
    points = cal.record["operating_points"]
    assert len(points) >= 10
    assert [p["threshold"] for p in points] == sorted(p["threshold"] for p in points)
    for p in points[:: max(1, len(points) // 6)]:
        settings = Settings(threshold=p["threshold"])
        regions = [len(inspect_image(read_grey(g), meta, backend, settings).regions) for g in good]
        assert p["alarms_per_image"] == pytest.approx(sum(regions) / len(good))
        assert p["clean_images"] == pytest.approx(sum(r == 0 for r in regions) / len(good))
        found = 0
        for d in defects:
            assert d.mask is not None
            res = inspect_image(read_grey(d.image), meta, backend, settings)
            full = upscale_to(
                res.mask.astype(np.float32), *read_mask(d.mask).shape, meta.input, True
            )
            found += bool(((full > 0) & read_mask(d.mask)).any())
        assert p["defect_images_found"] == pytest.approx(found / len(defects))


def test_operating_points_trade_alarms_for_defects(
    traded: tuple[Calibration, list[TestSample]],
) -> None:
    """The table spans the trade-off: the lowest threshold raises alarms, the max-opened one
    none, and lowering the threshold never loses a defect image or a synthetic defect."""
    cal, _ = traded
    points = cal.record["operating_points"]
    assert points[0]["alarms_per_image"] > 0
    exact = next(p for p in points if "max-opened x1" in p["rules"])
    assert exact["alarms_per_image"] == 0  # just above the largest opened value: clean
    below = [p for p in points if p["threshold"] < exact["threshold"]]
    assert below[-1]["alarms_per_image"] > 0  # and just below it, not
    for key in ("defect_images_found", "synthetic_recall"):
        found = [p[key] for p in points]
        assert found == sorted(found, reverse=True), key
        assert found[0] >= 0.7, key
        assert found[-1] < found[0], key


def test_learned_statistics_score_each_image_without_itself(
    ssim_model: Trained, good: list[Path]
) -> None:
    """When calibration learns the statistics, each image's alarms are counted with statistics
    learned from the other images (cross-fitting): the table equals that count, done by hand
    with ``inspect_image``; the stored statistics are learned from all of them."""
    from linescan.score import learn_score

    bundle = ssim_model.load()
    backend = _backend(ssim_model)
    pair = good[:2]
    cal = calibrate(pair, bundle.meta, backend, residual="ssim", plants=0, rule="max-opened")
    assert cal.record["cross_fitted_folds"] == 2
    assert cal.score is not None
    assert cal.score.learned["images"] == 2

    def stats_of(path: Path) -> object:
        rec = reconstruct(read_grey(path), replace(bundle.meta, residual="combined"), backend)
        from linescan.residual import residual_components

        comps = residual_components(
            "combined", rec.model_input, rec.reconstruction, bundle.meta.ssim
        )
        comps.update(
            residual_components("l2", rec.model_input, rec.reconstruction, bundle.meta.ssim)
        )
        return learn_score([rec.model_input], [comps])

    for p in cal.record["operating_points"][::5]:
        alarms = 0
        for img, other in ((pair[0], pair[1]), (pair[1], pair[0])):
            meta = replace(bundle.meta, residual="ssim", score=stats_of(other))  # type: ignore[arg-type]
            settings = Settings(threshold=p["threshold"])
            alarms += len(inspect_image(read_grey(img), meta, backend, settings).regions)
        assert p["alarms_per_image"] == pytest.approx(alarms / 2)


def test_budget_rule_keeps_the_budget_on_the_calibration_images(
    ssim_model: Trained, good: list[Path]
) -> None:
    """With a budget the images can show, the chosen threshold raises at most that many alarms
    per Mpx there and at every higher threshold, and the next lower one raises more; a budget
    below what they can show is extrapolated above the lowest threshold with no alarm."""
    bundle = ssim_model.load()
    backend = _backend(ssim_model)
    mpx = sum(read_grey(p).size for p in good) / 1e6
    loose_budget = 3.0 / mpx  # three alarms on these images
    loose = calibrate(
        good, bundle.meta, backend, budget_per_mpx=loose_budget, residual="keep", judge="all"
    )
    points = loose.record["operating_points"]
    assert not loose.record["extrapolated"]
    assert all(
        p["alarms_per_mpx"] <= loose_budget + 1e-9
        for p in points
        if p["threshold"] >= loose.threshold
    )
    below = [p for p in points if p["threshold"] < loose.threshold]
    assert below
    assert below[-1]["alarms_per_mpx"] > loose_budget
    strict = calibrate(
        good, bundle.meta, backend, budget_per_mpx=0.01 / mpx, residual="keep", judge="all"
    )
    assert strict.record["extrapolated"]
    assert strict.threshold >= strict.record["opened_max"]["max"]
    assert strict.threshold > loose.threshold


def test_synthetic_defects_are_counted_per_kind(
    traded: tuple[Calibration, list[TestSample]],
) -> None:
    """Every kind is planted on every image copy and reported with its recall and AUROC; the
    expected recall is their mean; the table prints them."""
    cal, _ = traded
    kinds = cal.record["kinds"]
    assert set(kinds) == set(PLANT_KINDS)
    for v in kinds.values():
        assert v["planted"] >= 8  # 2 copies of 8 images, most kinds fit every time
        assert 0.0 <= v["recall"] <= 1.0
        assert v["auroc"] is not None
    assert cal.record["expected_recall"] == pytest.approx(
        np.mean([v["recall"] for v in kinds.values()])
    )
    text = format_kinds(cal.record)
    assert all(k in text for k in PLANT_KINDS)


def test_auto_residual_picks_the_candidate_that_finds_most(
    ssim_model: Trained, good: list[Path]
) -> None:
    """residual="auto" compares ssim, combined and l2, each at its own threshold, and keeps
    the one with the highest expected recall."""
    bundle = ssim_model.load()
    cal = calibrate(good, bundle.meta, _backend(ssim_model), residual="auto")
    cands = cal.record["candidates"]
    assert set(cands) == {"ssim", "combined", "l2"}
    best = max(v["expected_recall"] for v in cands.values())
    assert cands[cal.residual]["expected_recall"] == best
    assert cal.threshold == cands[cal.residual]["threshold"]


def _blurred_texture(seed: int, size: int = 192) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)), (0, 0), 1.2)
    return np.clip(128 + 40 * noise / noise.std(), 0, 255).astype(np.uint8)


def test_a_blurry_reconstruction_cannot_see_smooth_patches(tmp_path: Path) -> None:
    """On a stochastic texture, a reconstruction that is a blur of the input scores smooth
    patches *below* the material (they look like the reconstruction): calibration says that
    kind is ranked below chance instead of folding it into one optimistic number."""
    paths = []
    for i in range(4):
        write_grey(tmp_path / f"{i}.png", _blurred_texture(i))
        paths.append(tmp_path / f"{i}.png")

    def blur(b: np.ndarray) -> np.ndarray:
        return np.stack([cv2.GaussianBlur(t[0], (0, 0), 2.0)[None] for t in b]).astype(np.float32)

    meta = BundleMeta(loss="ssim", latent=4, patch=32, residual="ssim")
    cal = calibrate(paths, meta, FunctionBackend(blur), plants=3, residual="combined")
    smooth = cal.record["kinds"]["smooth_patch"]
    assert smooth["auroc"] < 0.5
    assert smooth["verdict"] == "ranked below chance"
    assert "smooth_patch" in cal.record["not_seen"]
    assert cal.record["kinds"]["line_along"]["verdict"] == "seen"  # the blur cannot hide those
    assert cal.record["kinds"]["dark_spot"]["auroc"] > 0.9  # peaks above the texture's
    assert "cannot see: " in format_kinds(cal.record)


def test_a_perfect_reconstruction_calibrates(tmp_path: Path) -> None:
    """A model that reconstructs the good images exactly (residual 0 everywhere) still gets a
    threshold and a table, not a crash on an empty range."""
    write_grey(tmp_path / "a.png", (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64))
    meta = BundleMeta(loss="l2", latent=4, patch=32, residual="l2")
    cal = calibrate([tmp_path / "a.png"], meta, FunctionBackend(lambda b: b), residual="keep")
    assert np.isfinite(cal.threshold)
    points = cal.record["operating_points"]
    assert points
    assert all(p["alarms_per_image"] == 0 for p in points if p["threshold"] > 0)


def test_min_area_filters_alarms(ssim_model: Trained, good: list[Path]) -> None:
    """Regions under min_area_px are not alarms (as the daemon does not publish them)."""
    bundle = ssim_model.load()
    backend = _backend(ssim_model)
    kw: dict[str, object] = {"residual": "ssim", "rule": "max-opened", "plants": 0, "judge": "all"}
    every = calibrate(good, bundle.meta, backend, **kw).record["operating_points"]  # type: ignore[arg-type]
    big = calibrate(
        good,
        bundle.meta,
        backend,
        settings=Settings(min_area_px=10_000),
        **kw,  # type: ignore[arg-type]
    ).record["operating_points"]
    assert [p["threshold"] for p in big] == [p["threshold"] for p in every]
    assert sum(p["alarms_per_image"] for p in big) < sum(p["alarms_per_image"] for p in every)
    assert all(
        b["alarms_per_image"] <= e["alarms_per_image"] for b, e in zip(big, every, strict=True)
    )


def test_format_points_marks_the_choice(traded: tuple[Calibration, list[TestSample]]) -> None:
    cal, _ = traded
    text = format_points(cal.record["operating_points"], cal.threshold)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["threshold", "alarms/image"]
    assert "defect images found" in lines[0]
    assert "synthetic found" in lines[0]
    assert sum("<- chosen" in line for line in lines) == 1
    assert any("quantile 0.999" in line for line in lines)


def test_a_flawed_good_image_is_left_out_and_named(ssim_model: Trained, tmp_path: Path) -> None:
    """Among ten "defect-free" images, one with a blatant hole is left out of the false-alarm
    count (it would otherwise set the threshold above every real defect) and named; the
    threshold is the one the nine clean images give."""
    from linescan.data.synthetic import Defect, plant_defects, write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "ten", "woven", 10, 0, 0, (256, 256), seed=0)
    paths = training_images(root)
    flawed = read_grey(paths[4])
    plant_defects(flawed, 0, [Defect("hole", 100, 100, 20, 20)])
    write_grey(paths[4], flawed)
    bundle = ssim_model.load()
    kw: dict[str, object] = {"residual": "keep", "statistics": "keep", "plants": 0, "judge": "all"}
    cal = calibrate(paths, bundle.meta, _backend(ssim_model), **kw)  # type: ignore[arg-type]
    assert [o["image"] for o in cal.record["outliers"]] == [str(paths[4])]
    assert cal.record["outliers"][0]["score"] > 1.5 * cal.threshold
    clean = calibrate(paths[:4] + paths[5:], bundle.meta, _backend(ssim_model), **kw)  # type: ignore[arg-type]
    assert cal.threshold == pytest.approx(clean.threshold, rel=0.05)  # grids differ a little
    assert clean.record["outliers"] == []
    assert "left out of the threshold: 004.png" in format_kinds(cal.record)


def test_false_alarms_are_judged_on_images_the_model_has_not_seen(
    ssim_model: Trained, good: list[Path], tmp_path: Path
) -> None:
    """The model trained on the dataset's train/good images: given four images it has not seen
    too (its two test/good ones and mirror images of them: the same material, new pixels),
    false alarms are counted (and defects planted) on those four only, and the summary says so.
    With only two new images (too few to judge a threshold on) every image is judged and the
    summary warns that the count flatters the model; given only training images, likewise."""
    bundle = ssim_model.load()
    train_imgs = training_images(ssim_model.data)
    new = good[len(train_imgs) :]
    assert len(new) == 2
    assert MIN_JUDGED == 4
    mirrored = []
    for k, p in enumerate(new):
        mirrored.append(tmp_path / f"mirror{k}.png")
        write_grey(mirrored[-1], read_grey(p)[::-1, ::-1].copy())
    cal = calibrate(good + mirrored, bundle.meta, _backend(ssim_model), residual="keep", plants=1)
    assert cal.record["judged_images"] == 4
    assert cal.record["trained_on_images"] == len(train_imgs)
    assert not cal.record["judged_on_training_images"]
    assert cal.record["good_mpx"] == pytest.approx(4 * 256 * 256 / 1e6)
    assert "judged on the 4 image(s) the model has not seen" in format_kinds(cal.record)
    few = calibrate(good, bundle.meta, _backend(ssim_model), residual="keep", plants=0)
    assert few.record["judged_images"] == len(good)
    assert few.record["judged_on_training_images"]
    assert "only 2 calibration image(s) are new to the model" in format_kinds(few.record)
    only = calibrate(train_imgs, bundle.meta, _backend(ssim_model), residual="keep", plants=0)
    assert only.record["judged_on_training_images"]
    assert "every calibration image trained the model" in format_kinds(only.record)


def test_a_new_image_judged_beside_training_images_is_never_left_out_as_flawed() -> None:
    """Twenty defect-free score maps, one with a peak far above the rest. Left out as a flaw
    (and the threshold falls below its peak) when any image may be; kept (it sets the
    threshold) when it is the one new image among training images, which stands out because
    it is new."""
    from linescan.calibrate import _leave_out_outliers
    from linescan.detection import SparseMap, budget_threshold, count

    rng = np.random.default_rng(3)
    maps = []
    for i in range(20):
        s = rng.uniform(0.0, 1.0, (64, 64)).astype(np.float32)
        s[10 + i, 20] = 2.0 + 0.01 * i  # each image's highest alarm: about 2
        if i == 7:
            s[40:44, 40:44] = 9.0  # the outlier
        maps.append(SparseMap.build(s, 0.5, s.size))
    thresholds = np.linspace(0.5, 10.0, 200).tolist()
    settings = Settings()
    budget = 1.0  # alarms per Mpx: below one alarm in these 0.08 Mpx, so extrapolated

    def area(a: int) -> int:
        return a

    full = budget_threshold(count(maps, thresholds, area, settings.min_area_px), budget)
    assert full.threshold > 9.0
    left, out = _leave_out_outliers(maps, [], thresholds, area, settings, budget, full)
    assert out == [7]
    assert left.threshold < 9.0
    leavable = [i != 7 for i in range(20)]
    kept, none = _leave_out_outliers(maps, [], thresholds, area, settings, budget, full, leavable)
    assert none == []
    assert kept.threshold == full.threshold
