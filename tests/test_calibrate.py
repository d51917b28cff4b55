"""Tests of linescan.calibrate: thresholds from defect-free images, stored in the bundle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from linescan.backends import FunctionBackend
from linescan.backends.torch_cpu import TorchBackend
from linescan.calibrate import Calibration, calibrate, format_points
from linescan.data.images import (
    TestSample,
    read_grey,
    read_mask,
    test_samples,
    training_images,
    write_grey,
)
from linescan.errors import DataError
from linescan.model.bundle import BundleMeta, load_bundle, update_meta
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


def test_max_opened_threshold_keeps_every_good_image_clean(
    ssim_model: Trained, good: list[Path]
) -> None:
    """At the max-opened threshold no calibration image shows a region; at 0.9x the
    unmargined value at least one does (so the threshold is tight, not just high)."""
    bundle = ssim_model.load()
    backend = TorchBackend(bundle, precision="fp32")
    cal = calibrate(good, bundle.meta, backend, rule="max-opened", margin=1.1)
    base = cal.record["opened_max"]["max"]
    assert cal.threshold == pytest.approx(1.1 * base)
    for p in good:
        res = inspect_image(read_grey(p), bundle.meta, backend, Settings(threshold=cal.threshold))
        assert res.regions == [], p
    # margin 1: the exact value still raises no alarm ...
    for p in good:
        res = inspect_image(read_grey(p), bundle.meta, backend, Settings(threshold=base * 1.0001))
        assert res.regions == [], p
    # ... and just below it, some image does
    flagged = [
        p
        for p in good
        if inspect_image(read_grey(p), bundle.meta, backend, Settings(threshold=0.9 * base)).regions
    ]
    assert flagged


def test_quantile_rule_returns_the_pixel_quantile(ssim_model: Trained, good: list[Path]) -> None:
    """The quantile rule's threshold is that quantile of all good residual pixels."""
    bundle = ssim_model.load()
    backend = TorchBackend(bundle, precision="fp32")
    cal = calibrate(good, bundle.meta, backend, rule="quantile", quantile=0.99)
    pixels = np.concatenate(
        [reconstruct(read_grey(p), bundle.meta, backend).residual.ravel() for p in good]
    )
    assert cal.threshold == pytest.approx(float(np.quantile(pixels, 0.99)), rel=1e-6)
    assert float(np.mean(pixels >= cal.threshold)) == pytest.approx(0.01, abs=2e-3)
    assert cal.record["rule"] == "quantile"
    assert cal.record["margin"] is None


def test_calibration_is_stored_in_the_bundle(bundle_copy: Path, good: list[Path]) -> None:
    """update_meta stores the threshold and its record; the reloaded bundle inspects with it."""
    bundle = load_bundle(bundle_copy)
    cal = calibrate(good[:3], bundle.meta, TorchBackend(bundle, precision="fp32"))
    update_meta(bundle_copy, threshold=cal.threshold, calibration=cal.record)
    again = load_bundle(bundle_copy)
    assert again.meta.threshold == cal.threshold
    assert again.meta.calibration is not None
    assert again.meta.calibration["rule"] == "max-opened"
    assert again.meta.calibration["images"] == 3
    assert again.meta.calibration["files"] == [str(p) for p in good[:3]]
    assert again.meta.weights_sha256 == bundle.meta.weights_sha256
    res = inspect_image(read_grey(good[0]), again.meta, TorchBackend(again, precision="fp32"))
    assert res.threshold == cal.threshold


def test_calibration_uses_the_given_stride(tmp_path: Path) -> None:
    """The stride in Settings is used and recorded."""
    img = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    write_grey(tmp_path / "a.png", img)
    seen: list[int] = []

    def count(b: np.ndarray) -> np.ndarray:
        seen.append(len(b))
        return b * np.float32(0.9)

    meta = BundleMeta(loss="l2", latent=4, patch=32, residual="l2", input=InputSpec())
    cal = calibrate([tmp_path / "a.png"], meta, FunctionBackend(count), settings=Settings(stride=8))
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
        ({"quantile": 1.0}, ValueError, "quantile"),
        ({"quantile": 1.5}, ValueError, "quantile"),
        ({"margin": 0.0}, ValueError, "margin"),
        ({"margin": -1.0}, ValueError, "margin"),
        ({"max_alarms_per_mpx": -0.5}, ValueError, "max_alarms_per_mpx"),
        ({"max_alarms_per_mpx": float("nan")}, ValueError, "max_alarms_per_mpx"),
    ],
)
def test_bad_arguments_raise(
    tmp_path: Path, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    """No images, an unknown rule, a quantile outside (0, 1) or a non-positive margin raise."""
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
    """A max-opened calibration with the dataset's labelled defect images."""
    bundle = ssim_model.load()
    defects = [s for s in test_samples(ssim_model.data) if s.mask is not None]
    cal = calibrate(good, bundle.meta, TorchBackend(bundle, precision="fp32"), defects=defects)
    return cal, defects


def test_operating_points_count_what_inspection_reports(
    ssim_model: Trained, good: list[Path], traded: tuple[Calibration, list[TestSample]]
) -> None:
    """At every threshold of the table, the false alarms per image are exactly the regions
    ``inspect_image`` reports on the defect-free images, and the defect images found are
    those whose inspection mask touches the ground truth (the oracle: the real pipeline)."""
    cal, defects = traded
    bundle = ssim_model.load()
    backend = TorchBackend(bundle, precision="fp32")
    points = cal.record["operating_points"]
    assert len(points) >= 10
    assert [p["threshold"] for p in points] == sorted(p["threshold"] for p in points)
    for p in points[:: max(1, len(points) // 6)]:
        settings = Settings(threshold=p["threshold"])
        regions = [
            len(inspect_image(read_grey(g), bundle.meta, backend, settings).regions) for g in good
        ]
        assert p["alarms_per_image"] == pytest.approx(sum(regions) / len(good))
        assert p["clean_images"] == pytest.approx(sum(r == 0 for r in regions) / len(good))
        found = 0
        for d in defects:
            assert d.mask is not None
            res = inspect_image(read_grey(d.image), bundle.meta, backend, settings)
            full = upscale_to(
                res.mask.astype(np.float32), *read_mask(d.mask).shape, bundle.meta.input, True
            )
            found += bool(((full > 0) & read_mask(d.mask)).any())
        assert p["defect_images_found"] == pytest.approx(found / len(defects))


def test_operating_points_trade_alarms_for_defects(
    traded: tuple[Calibration, list[TestSample]],
) -> None:
    """The table spans the trade-off: the chosen (max-opened) threshold is clean, the lowest
    threshold raises alarms, and lowering the threshold never loses a defect image."""
    cal, _ = traded
    points = cal.record["operating_points"]
    chosen = next(p for p in points if p["threshold"] == cal.threshold)
    assert chosen["rules"] == ["max-opened x1.1"]
    assert chosen["alarms_per_image"] == 0
    assert chosen["clean_images"] == 1
    assert points[0]["alarms_per_image"] > 0
    found = [p["defect_images_found"] for p in points]
    assert found == sorted(found, reverse=True)
    assert found[0] >= 0.75 > found[-1]  # most planted defects show below the clean range
    exact = next(p for p in points if "max-opened x1" in p["rules"])
    assert exact["alarms_per_image"] == 0  # just above the largest opened value: clean
    below = [p for p in points if p["threshold"] < exact["threshold"]]
    assert below[-1]["alarms_per_image"] > 0  # and just below it, not


def test_alarm_rate_rule(ssim_model: Trained, good: list[Path]) -> None:
    """alarm-rate picks the lowest threshold of the table whose false-alarm rate, and every
    higher one's, is within the target; a looser target gives a lower threshold."""
    bundle = ssim_model.load()
    backend = TorchBackend(bundle, precision="fp32")
    loose = calibrate(good, bundle.meta, backend, rule="alarm-rate", max_alarms_per_mpx=200.0)
    strict = calibrate(good, bundle.meta, backend, rule="alarm-rate", max_alarms_per_mpx=0.0)
    assert loose.threshold < strict.threshold
    for cal, target in ((loose, 200.0), (strict, 0.0)):
        points = cal.record["operating_points"]
        assert cal.record["max_alarms_per_mpx"] == target
        above = [p for p in points if p["threshold"] >= cal.threshold]
        assert all(p["alarms_per_mpx"] <= target for p in above)
        below = [p for p in points if p["threshold"] < cal.threshold]
        assert not below or below[-1]["alarms_per_mpx"] > target
    # no alarm at all allowed: the max-opened threshold without margin
    assert strict.threshold == pytest.approx(strict.record["opened_max"]["max"], rel=1e-6)


def test_opened_maps_over_the_memory_budget_are_recomputed(
    monkeypatch: pytest.MonkeyPatch, ssim_model: Trained, good: list[Path]
) -> None:
    """With no memory for opened maps they are recomputed: the same table."""
    import linescan.calibrate as cal_mod

    bundle = ssim_model.load()
    backend = TorchBackend(bundle, precision="fp32")
    defects = [s for s in test_samples(ssim_model.data) if s.mask is not None]
    kept = calibrate(good, bundle.meta, backend, defects=defects).record["operating_points"]
    monkeypatch.setattr(cal_mod, "KEEP_BYTES", 0)
    again = calibrate(good, bundle.meta, backend, defects=defects).record["operating_points"]
    assert again == kept
    assert kept[0]["defect_images_found"] is not None


def test_a_perfect_reconstruction_calibrates(tmp_path: Path) -> None:
    """A model that reconstructs the good images exactly (residual 0 everywhere) still gets a
    threshold and a table, not a crash on an empty range."""
    write_grey(tmp_path / "a.png", (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64))
    meta = BundleMeta(loss="l2", latent=4, patch=32, residual="l2")
    cal = calibrate([tmp_path / "a.png"], meta, FunctionBackend(lambda b: b))
    assert cal.record["opened_max"]["max"] == 0.0
    assert cal.threshold == 0.0
    points = cal.record["operating_points"]
    assert points
    assert all(p["alarms_per_image"] == 0 for p in points if p["threshold"] > 0)


def test_min_area_filters_alarms(ssim_model: Trained, good: list[Path]) -> None:
    """Regions under --min-area are not alarms (as the daemon does not publish them)."""
    bundle = ssim_model.load()
    backend = TorchBackend(bundle, precision="fp32")
    every = calibrate(good, bundle.meta, backend).record["operating_points"]
    big = calibrate(good, bundle.meta, backend, settings=Settings(min_area_px=10_000)).record[
        "operating_points"
    ]
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
    assert sum("<- chosen" in line for line in lines) == 1
    assert any("quantile 0.999" in line for line in lines)
