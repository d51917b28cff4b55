"""Tests of linescan.train: the loop, its determinism and resumption, inputs and every loss.

Budgets are tiny (patch 32, d = 16, a few hundred crops, 1-3 epochs, fp32) and every run is
seeded, so the assertions are about behaviour, not about luck.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from linescan.backends.torch_cpu import TorchBackend
from linescan.data.images import read_grey, training_images, write_grey
from linescan.data.synthetic import WovenWeb
from linescan.errors import DataError, ModelError
from linescan.evaluate import pixel_roc
from linescan.evaluation_run import residual_maps
from linescan.model.autoencoder import FeatureExtractor, VariationalAutoencoder
from linescan.model.bundle import build_module, load_bundle
from linescan.preprocess import InputSpec
from linescan.ssim import ssim_torch
from linescan.train import (
    CHECKPOINT,
    crop_positions,
    gather,
    load_feature_extractor,
    split_holdout,
    train,
)

if TYPE_CHECKING:
    from conftest import ConfigFactory, Trained

QUICK = {"patches": 128, "epochs": 1}


def _run(cfg_factory: ConfigFactory, data: Path, out: Path, **kw: object) -> str:
    """Train quietly; returns the weights' sha256."""
    return train(cfg_factory(data, out, **kw), log=io.StringIO()).meta.weights_sha256


def test_training_reduces_the_loss(ssim_model: Trained) -> None:
    """The trained model's SSIM loss on training crops is far below the fresh model's."""
    bundle = ssim_model.load()
    images = [bundle.meta.input.to_model(read_grey(p)) for p in training_images(ssim_model.data)]
    pos = crop_positions(images, 256, 32, seed=123)
    x = gather(images, pos, 32)
    torch.manual_seed(0)  # the same initialisation training started from
    fresh = build_module(bundle.meta).eval()
    with torch.no_grad():
        before = 1.0 - ssim_torch(x, fresh(x)).mean().item()
        after = 1.0 - ssim_torch(x, bundle.module(x)).mean().item()
    assert after < before - 0.2, (before, after)
    assert ssim_model.result.final_loss < before - 0.2
    assert ssim_model.result.meta.training["final_loss"] == ssim_model.result.final_loss


def test_trained_ssim_model_finds_planted_defects(ssim_model: Trained) -> None:
    """On the woven test set the tiny SSIM model's pixel AUROC is well above chance."""
    meta = ssim_model.load().meta
    scores, masks = residual_maps(ssim_model.data, meta, ssim_model.backend())
    auc = pixel_roc(scores, masks).auc
    assert auc > 0.6, auc  # measured ~0.85-0.9; chance is 0.5


def test_same_seed_same_weights_and_different_seed_different_weights(
    tmp_path: Path, woven_data: Path, train_config: ConfigFactory
) -> None:
    """Training is deterministic for a seed: the weights files are byte-identical; another
    seed gives other weights."""
    a = _run(train_config, woven_data, tmp_path / "a", seed=1, **QUICK)
    b = _run(train_config, woven_data, tmp_path / "b", seed=1, **QUICK)
    c = _run(train_config, woven_data, tmp_path / "c", seed=2, **QUICK)
    assert a == b
    assert a != c


def test_resume_continues_to_the_same_result(
    tmp_path: Path, woven_data: Path, train_config: ConfigFactory
) -> None:
    """Training 2 epochs, then resuming to 3 from the checkpoint, gives the same weights as
    training 3 epochs straight."""
    kw: dict[str, object] = {"patches": 128, "seed": 4, "checkpoint_every": 1}
    _run(train_config, woven_data, tmp_path / "first", epochs=2, **kw)
    assert (tmp_path / "first" / CHECKPOINT).is_file()
    shutil.copytree(tmp_path / "first", tmp_path / "resumed")
    log = io.StringIO()
    resumed = train(
        train_config(woven_data, tmp_path / "resumed", epochs=3, resume=True, **kw), log=log
    ).meta.weights_sha256
    assert "resumed from" in log.getvalue()
    straight = _run(train_config, woven_data, tmp_path / "straight", epochs=3, **kw)
    assert resumed == straight


def test_checkpoint_is_plain_tensors(
    tmp_path: Path, woven_data: Path, train_config: ConfigFactory
) -> None:
    """Checkpoints hold tensors and numbers only: torch.load(weights_only=True) reads them."""
    _run(train_config, woven_data, tmp_path / "m", checkpoint_every=1, **QUICK)
    state = torch.load(tmp_path / "m" / CHECKPOINT, weights_only=True)
    assert state["epoch"] == 1
    assert set(state) == {"model", "optimizer", "epoch", "loss", "stopping"}
    assert isinstance(state["loss"], float)


def test_resume_without_checkpoint_is_refused(
    tmp_path: Path, woven_data: Path, train_config: ConfigFactory
) -> None:
    """--resume with no checkpoint says where it looked."""
    with pytest.raises(ModelError, match=r"no checkpoint at .*last\.pt"):
        _run(train_config, woven_data, tmp_path / "m", resume=True, **QUICK)


def test_sixteen_bit_images_train_and_record_their_depth(
    tmp_path: Path, train_config: ConfigFactory
) -> None:
    """16-bit images train; the bundle records bit depth 16 (and an explicit 12 if given), and
    the same pixel values scaled by 257 train the same model as 8-bit ones."""
    web = WovenWeb(128, seed=5)
    d8, d16 = tmp_path / "d8", tmp_path / "d16"
    for k in range(3):
        img = web.lines(k * 96, 96)
        write_grey(d8 / f"{k}.png", img)
        write_grey(d16 / f"{k}.png", img.astype(np.uint16) * 257)
    kw: dict[str, object] = {"input": InputSpec(), "patches": 64, "epochs": 1}
    r16 = train(train_config(d16, tmp_path / "m16", **kw), log=io.StringIO())
    assert r16.meta.input.bit_depth == 16
    assert load_bundle(tmp_path / "m16").meta.input.bit_depth == 16
    r8 = train(train_config(d8, tmp_path / "m8", **kw), log=io.StringIO())
    assert r8.meta.input.bit_depth == 8
    assert r16.final_loss == pytest.approx(r8.final_loss, rel=1e-3)
    r12 = train(train_config(d16, tmp_path / "m12", bit_depth=12, **kw), log=io.StringIO())
    assert r12.meta.input.bit_depth == 12


def test_image_smaller_than_a_patch_names_the_file(
    tmp_path: Path, train_config: ConfigFactory
) -> None:
    """A training image smaller than one patch (at the model's scale) is a DataError that
    names the file."""
    web = WovenWeb(100, seed=1)
    write_grey(tmp_path / "data" / "big.png", web.lines(0, 100))
    write_grey(tmp_path / "data" / "tiny_one.png", web.lines(0, 60))  # 30 rows at 1/2
    with pytest.raises(DataError, match=r"tiny_one\.png.*smaller than one 32x32 patch"):
        _run(train_config, tmp_path / "data", tmp_path / "m", **QUICK)


def test_mixed_bit_depths_are_refused(tmp_path: Path, train_config: ConfigFactory) -> None:
    """A training folder mixing 8- and 16-bit images is refused."""
    web = WovenWeb(64, seed=1)
    write_grey(tmp_path / "data" / "a.png", web.lines(0, 64))
    write_grey(tmp_path / "data" / "b.png", web.lines(0, 64).astype(np.uint16))
    with pytest.raises(DataError, match="mix bit depths"):
        _run(train_config, tmp_path / "data", tmp_path / "m", input=InputSpec(), **QUICK)


@pytest.fixture
def fm_weights(tmp_path: Path) -> Path:
    """A fixed, randomly initialised AlexNet conv1-conv3 in torchvision's key names."""
    torch.manual_seed(42)
    fe = FeatureExtractor()
    names = {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6"}
    state = {}
    for k, v in fe.state_dict().items():
        layer, rest = k.split(".", 1)
        state[f"{names[layer]}.{rest}"] = v
    state["classifier.1.weight"] = torch.zeros(2, 2)  # other AlexNet keys are ignored
    path = tmp_path / "alexnet_conv.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("loss", "residual"), [("ssim", "ssim"), ("l2", "l2"), ("vae", "vae"), ("fm", "l2")]
)
def test_each_loss_trains_a_loadable_bundle(
    tmp_path: Path,
    woven_data: Path,
    train_config: ConfigFactory,
    fm_weights: Path,
    loss: str,
    residual: str,
) -> None:
    """Every loss trains one tiny epoch into a bundle that loads, with the matching residual,
    and whose backend returns one reconstruction per tile (N = 6 posterior decodes for a VAE)."""
    out = tmp_path / loss
    result = train(
        train_config(
            woven_data, out, loss=loss, fm_weights=fm_weights if loss == "fm" else None, **QUICK
        ),
        log=io.StringIO(),
    )
    assert np.isfinite(result.final_loss)
    bundle = load_bundle(out)
    assert bundle.meta.loss == loss
    assert bundle.meta.residual == residual
    tiles = np.random.default_rng(0).random((2, 1, 32, 32)).astype(np.float32)
    recon = TorchBackend(bundle, precision="fp32").infer(tiles)
    if loss == "vae":
        assert isinstance(bundle.module, VariationalAutoencoder)
        assert recon.shape == (2, 6, 32, 32)
        assert bundle.meta.vae_sigma != 0.1  # measured at the end of training
        assert 1e-3 <= bundle.meta.vae_sigma < 1.0
    else:
        assert recon.shape == (2, 1, 32, 32)


def test_feature_matching_needs_a_weights_file(
    tmp_path: Path, woven_data: Path, train_config: ConfigFactory
) -> None:
    """--loss fm without --fm-weights says what is needed (nothing is downloaded)."""
    with pytest.raises(ModelError, match="--fm-weights"):
        _run(train_config, woven_data, tmp_path / "m", loss="fm", **QUICK)


def test_feature_extractor_weights_are_validated(tmp_path: Path, fm_weights: Path) -> None:
    """The extractor loads torchvision-named weights exactly, and refuses files without them."""
    fe = load_feature_extractor(fm_weights)
    torch.manual_seed(42)
    expected = FeatureExtractor()
    assert torch.equal(fe.conv2.weight, expected.conv2.weight)
    assert not any(p.requires_grad for p in fe.parameters())  # fixed during training
    bad = tmp_path / "bad.pt"
    torch.save({"features.0.weight": torch.zeros(3)}, bad)
    with pytest.raises(ModelError, match="do not hold AlexNet conv1-conv3"):
        load_feature_extractor(bad)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="cannot read"):
        load_feature_extractor(garbage)


def test_progress_is_reported(
    tmp_path: Path, woven_data: Path, train_config: ConfigFactory
) -> None:
    """Training reports the epoch, the loss and an ETA on its log stream."""
    log = io.StringIO()
    train(train_config(woven_data, tmp_path / "m", **QUICK), log=log)
    text = log.getvalue()
    assert "epoch 1/1" in text
    assert "loss" in text
    assert "ETA" in text


def test_holdout_split_is_disjoint_and_seeded() -> None:
    """10 % of the images (at least one, from 5 images on) are kept out of training, the
    same ones for the same seed; fewer than 5 images keep none."""
    paths = [Path(f"{i:02d}.png") for i in range(20)]
    train_a, hold_a = split_holdout(paths, 0.1, seed=0)
    train_b, hold_b = split_holdout(paths, 0.1, seed=0)
    assert (train_a, hold_a) == (train_b, hold_b)
    assert len(hold_a) == 2
    assert sorted(train_a + hold_a) == paths
    assert not set(train_a) & set(hold_a)
    assert split_holdout(paths[:5], 0.1, seed=0)[1] != []
    assert split_holdout(paths[:4], 0.1, seed=0) == (paths[:4], [])
    assert split_holdout(paths, 0.0, seed=0) == (paths, [])


def test_crop_positions_lie_inside_the_images() -> None:
    """Crops are drawn from every image in proportion to its size and never leave it."""
    images = [np.zeros((40, 300), np.float32), np.zeros((32, 32), np.float32)]
    pos = crop_positions(images, 2000, 32, seed=0)
    assert pos.shape == (2000, 3)
    for i, y, x in pos:
        h, w = images[i].shape
        assert 0 <= y <= h - 32
        assert 0 <= x <= w - 32
    share = float(np.mean(pos[:, 0] == 1))
    assert share < 0.02  # the 32x32 image has 1 position against 9 * 269
    np.testing.assert_array_equal(pos, crop_positions(images, 2000, 32, seed=0))


def test_cuda_device_without_cuda_is_refused(
    tmp_path: Path, woven_data: Path, train_config: ConfigFactory
) -> None:
    """Asking for a CUDA device on a machine without one is a clear ModelError."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelError, match="CUDA is not available"):
        _run(train_config, woven_data, tmp_path / "m", device="cuda", **QUICK)


def test_resume_of_a_finished_run_keeps_its_loss(
    tmp_path: Path, woven_data: Path, train_config: ConfigFactory
) -> None:
    """Resuming a run that already reached its epochs trains nothing and keeps the last loss."""
    log = io.StringIO()
    first = train(train_config(woven_data, tmp_path / "m", checkpoint_every=1, **QUICK), log=log)
    again = train(train_config(woven_data, tmp_path / "m", resume=True, **QUICK), log=log)
    assert again.final_loss == pytest.approx(first.final_loss)
    assert again.meta.training["final_loss"] == pytest.approx(first.final_loss)


def test_small_patch_gets_a_stride_that_fits(
    tmp_path: Path, woven_data: Path, train_config: ConfigFactory
) -> None:
    """A 16-px patch model gets stride 16 (not 30 > patch) and its bundle loads."""
    res = train(train_config(woven_data, tmp_path / "m", patch=16, **QUICK), log=io.StringIO())
    assert res.meta.stride == 16
    assert load_bundle(res.bundle).meta.stride == 16


def test_training_stops_when_the_held_out_loss_stops_improving(
    tmp_path: Path, woven_data: Path, train_config: ConfigFactory
) -> None:
    """With a patience of one epoch and an improvement no run can make (50 %), training stops
    after its second epoch, says why, and records it; --epochs is only the maximum."""
    log = io.StringIO()
    res = train(
        train_config(
            woven_data, tmp_path / "m", patches=256, epochs=10, patience=1, min_improvement=0.5
        ),
        log=log,
    )
    assert res.epochs == 2
    assert "held-out loss has not improved by 50 % for 1 epochs" in res.stopped
    assert "held-out" in log.getvalue()
    assert f"stopped after epoch 2: {res.stopped}" in log.getvalue()
    assert res.meta.training["epochs"] == 2
    assert res.meta.training["max_epochs"] == 10
    assert res.meta.training["best_epoch"] == res.best_epoch in (1, 2)
    assert res.meta.training["held_out_loss"] > 0


def test_a_time_budget_ends_training(
    tmp_path: Path, woven_data: Path, train_config: ConfigFactory
) -> None:
    """A time budget that one epoch already spends ends training after that epoch."""
    res = train(
        train_config(woven_data, tmp_path / "m", patches=128, epochs=10, time_budget_s=1e-3),
        log=io.StringIO(),
    )
    assert res.epochs == 1
    assert "time budget" in res.stopped


def test_the_best_held_out_weights_are_kept(
    tmp_path: Path, woven_data: Path, train_config: ConfigFactory
) -> None:
    """The bundle holds the weights of the epoch with the best held-out loss: a run of three
    epochs whose best was epoch k saves what a run of k epochs saves."""
    kw = {"patches": 256, "patience": 0, "checkpoint_every": 0}
    three = train(train_config(woven_data, tmp_path / "a", epochs=3, **kw), log=io.StringIO())
    k = three.best_epoch
    assert 1 <= k <= 3
    shorter = train(train_config(woven_data, tmp_path / "b", epochs=k, **kw), log=io.StringIO())
    assert three.meta.weights_sha256 == shorter.meta.weights_sha256


def test_training_learns_the_score_statistics(ssim_model: Trained) -> None:
    """Every trained bundle carries score statistics for the SSIM, combined and L2 residuals,
    learned on its training images at the model's width."""
    meta = ssim_model.load().meta
    assert meta.score is not None
    assert set(meta.score.columns) == {"dssim", "absdiff", "sqdiff"}
    assert meta.score.width == 128  # 256-px images at 1/2 scale


def test_the_patch_fits_the_images() -> None:
    """auto: the paper's 128 where the images hold two patches on their smaller side, else the
    largest of 64 and 32 that does (AITEX at 1/2 scale, 128 rows: 64), so that crops vary in
    height and the model does not learn one vertical phase of the texture."""
    from linescan.train import choose_patch

    assert choose_patch([np.zeros((512, 512), np.float32)]) == 128
    assert choose_patch([np.zeros((128, 2048), np.float32)]) == 64
    assert choose_patch([np.zeros((100, 300), np.float32), np.zeros((300, 300), np.float32)]) == 32
    assert choose_patch([np.zeros((40, 40), np.float32)]) == 32  # one patch, no two
    with pytest.raises(DataError, match="smaller than a 16-px patch"):
        choose_patch([np.zeros((8, 100), np.float32)])


def test_auto_patch_is_recorded(
    tmp_path: Path, woven_data: Path, train_config: ConfigFactory
) -> None:
    """patch 0 (the CLI's auto) trains with the chosen patch and says so."""
    log = io.StringIO()
    res = train(train_config(woven_data, tmp_path / "m", patch=0, **QUICK), log=log)
    assert res.meta.patch == 64  # 256-px images at 1/2 scale: 128 px
    assert "patch 64 (the images are 128 px" in log.getvalue()


def test_resuming_with_another_network_is_refused_with_a_message(
    tmp_path: Path, woven_data: Path, train_config: ConfigFactory
) -> None:
    """A checkpoint resumed with another latent size: a message naming the options, not a
    torch traceback."""
    _run(train_config, woven_data, tmp_path / "m", checkpoint_every=1, **QUICK)
    again = train_config(woven_data, tmp_path / "m", latent=8, resume=True, patches=128, epochs=2)
    with pytest.raises(ModelError, match="pass the --latent and --patch it was trained with"):
        train(again, log=io.StringIO())
