"""Tests of linescan.calibrate: thresholds from defect-free images, stored in the bundle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from linescan.backends import FunctionBackend
from linescan.backends.torch_cpu import TorchBackend
from linescan.calibrate import calibrate
from linescan.data.images import read_grey, test_samples, training_images, write_grey
from linescan.errors import DataError
from linescan.model.bundle import BundleMeta, load_bundle, update_meta
from linescan.pipeline import Settings, inspect_image, reconstruct
from linescan.preprocess import InputSpec

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
