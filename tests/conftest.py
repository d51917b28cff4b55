"""Shared fixtures: a small synthetic woven dataset and tiny trained model bundles.

Everything is made under pytest's temporary directories: the suite never reads shared data.
Trained bundles are session-scoped (a few seconds each, trained once per run) and must be
treated as read-only; a test that changes a bundle copies it first (``bundle_copy``).
Training runs in fp32 so that the models are the same on every CPU (bf16 autocast is only
chosen where the CPU has native bf16).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings as hypothesis_settings

from linescan.backends.torch_cpu import TorchBackend
from linescan.calibrate import calibrate, store
from linescan.data.images import test_samples, training_images, write_grey
from linescan.data.synthetic import EdgedWeb, write_synthetic_dataset
from linescan.model.bundle import Bundle, load_bundle
from linescan.preprocess import InputSpec
from linescan.train import TrainConfig, TrainResult, train

# Property tests draw the same examples on every run ("derandomize"), so CI is reproducible:
# a run is red because of the change, never because of the draw. `HYPOTHESIS_PROFILE=explore`
# draws fresh examples (and more of them) to look for new failures, e.g. before a release.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
hypothesis_settings.register_profile("explore", print_blob=True, max_examples=400)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ConfigFactory = Callable[..., TrainConfig]


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run torch on one thread for the session, and restore the setting after.

    The models here are tiny, so threads gain little; on shared cores they lose a lot: with
    other jobs running, two intra-op threads trained a tiny model 20x slower than one (their
    spin-waits fight for the cores). One thread also makes timings predictable.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class Trained:
    """A tiny trained bundle (read-only), its dataset and the training result."""

    path: Path
    data: Path
    result: TrainResult

    def load(self) -> Bundle:
        return load_bundle(self.path)

    def backend(self) -> TorchBackend:
        return TorchBackend(self.load(), precision="fp32")


def tiny_config(data: Path, out: Path, **changes: Any) -> TrainConfig:
    """A training configuration small enough for a test: seconds, not minutes."""
    base: dict[str, Any] = {
        "data": data,
        "out": out,
        "loss": "ssim",
        "latent": 16,
        "patch": 32,
        "patches": 1024,
        "epochs": 3,
        "batch": 32,
        "lr": 1e-3,
        "input": InputSpec(downscale=2),
        "precision": "fp32",
        "holdout": 0.0,
        "checkpoint_every": 0,
        "seed": 0,
    }
    base.update(changes)
    return TrainConfig(**base)


@pytest.fixture
def train_config() -> ConfigFactory:
    """``train_config(data, out, **changes)``: the tiny training configuration."""
    return tiny_config


@pytest.fixture(scope="session")
def woven_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MVTec-layout woven dataset: 6 train, 2 good test and 4 defective 256x256 images."""
    root = tmp_path_factory.mktemp("woven") / "woven"
    return write_synthetic_dataset(root, "woven", 6, 2, 4, (256, 256), seed=0)


def _train_calibrated(data: Path, out: Path, **changes: Any) -> Trained:
    result = train(tiny_config(data, out, **changes), log=io.StringIO())
    bundle = load_bundle(out)
    good = training_images(data) + [s.image for s in test_samples(data) if s.mask is None]
    cal = calibrate(good, bundle.meta, TorchBackend(bundle, precision="fp32"))
    store(out, cal)
    return Trained(out, data, result)


@pytest.fixture(scope="session")
def ssim_model(tmp_path_factory: pytest.TempPathFactory, woven_data: Path) -> Trained:
    """SSIM autoencoder, patch 32, d = 16, 1/2 down-scaling, calibrated (max-opened rule)."""
    out = tmp_path_factory.mktemp("models") / "ssim_half"
    return _train_calibrated(woven_data, out)


@pytest.fixture(scope="session")
def ssim_model_full(tmp_path_factory: pytest.TempPathFactory, woven_data: Path) -> Trained:
    """The same at full resolution (no down-scaling), fewer crops: for the streaming tests."""
    out = tmp_path_factory.mktemp("models") / "ssim_full"
    return _train_calibrated(woven_data, out, input=InputSpec(downscale=1), patches=512)


# A web narrower than the camera's view, wandering sideways (EdgedWeb): the model of
# ``edged_model`` is trained on 12 stretches of it and calibrated, with the default rule, on 12
# other stretches; tests inspect yet other stretches (from line EDGED_TEST_LINE on).
EDGED_WIDTH = 384
EDGED_WEB = {"width": EDGED_WIDTH, "seed": 5, "edge": 64, "wander": 16.0, "period": 1100}
EDGED_TEST_LINE = 4000


@pytest.fixture(scope="session")
def edged_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(training images, calibration images) of the wandering web, 256 lines each."""
    root = tmp_path_factory.mktemp("edged")
    web = EdgedWeb(**EDGED_WEB)  # type: ignore[arg-type]
    for k in range(12):
        write_grey(root / "train" / "good" / f"{k:03d}.png", web.lines(k * 256, 256))
        write_grey(root / "calibration" / f"{k:03d}.png", web.lines(8000 + k * 256, 256))
    return root, root / "calibration"


@pytest.fixture(scope="session")
def edged_model(tmp_path_factory: pytest.TempPathFactory, edged_data: tuple[Path, Path]) -> Trained:
    """An SSIM autoencoder of the wandering web (patch 32, d = 32, 1/2 scale), its statistics
    learned by training, calibrated by ``calibrate``'s defaults (false-alarm budget, residual
    chosen by evidence, statistics refreshed) on the calibration stretches."""
    data, calibration = edged_data
    out = tmp_path_factory.mktemp("models") / "edged"
    result = train(
        tiny_config(data, out, latent=32, patches=2048, epochs=4, patience=0), log=io.StringIO()
    )
    bundle = load_bundle(out)
    cal = calibrate(training_images(calibration), bundle.meta, TorchBackend(bundle, "fp32"))
    store(out, cal)
    return Trained(out, data, result)


@pytest.fixture
def bundle_copy(tmp_path: Path, ssim_model: Trained) -> Path:
    """A private, writable copy of the session's SSIM bundle."""
    dst = tmp_path / "bundle"
    shutil.copytree(ssim_model.path, dst)
    return dst
