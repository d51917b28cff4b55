"""Tests of linescan.model.bundle: save, load, validate, refuse corrupt or unsafe bundles."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from linescan.errors import ModelError
from linescan.model.autoencoder import Autoencoder, VariationalAutoencoder
from linescan.model.bundle import (
    META_FILE,
    WEIGHTS_FILE,
    BundleMeta,
    load_bundle,
    read_meta,
    save_bundle,
    sha256_file,
    update_meta,
)
from linescan.preprocess import InputSpec
from linescan.ssim import SSIMParams

Json = dict[str, Any]


def _meta(**kw: Any) -> BundleMeta:
    base: dict[str, Any] = {
        "loss": "ssim",
        "latent": 8,
        "patch": 32,
        "residual": "ssim",
        "input": InputSpec(downscale=2),
        "ssim": SSIMParams(window=7, gaussian=False),
        "threshold": 0.25,
        "training": {"seed": 3, "command": "linescan train --data x"},
        "name": "tiny",
    }
    base.update(kw)
    return BundleMeta(**base)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Autoencoder, BundleMeta]:
    torch.manual_seed(0)
    model = Autoencoder(32, 8).eval()
    path = tmp_path / "bundle"
    meta = save_bundle(path, model, _meta())
    return path, model, meta


def _edit_json(path: Path, change: Callable[[Json], None]) -> None:
    doc = json.loads((path / META_FILE).read_text())
    change(doc)
    (path / META_FILE).write_text(json.dumps(doc))


def _fix_checksum(path: Path) -> None:
    digest = sha256_file(path / WEIGHTS_FILE)

    def set_sha(doc: Json) -> None:
        doc["weights"]["sha256"] = digest

    _edit_json(path, set_sha)


def test_round_trip_gives_identical_outputs_and_metadata(
    saved: tuple[Path, Autoencoder, BundleMeta],
) -> None:
    """A saved bundle loads into a model with identical outputs and identical metadata."""
    path, model, meta = saved
    bundle = load_bundle(path)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(bundle.module(x), model(x))
    assert bundle.meta == meta
    assert bundle.meta.weights_sha256 == sha256_file(path / WEIGHTS_FILE)
    assert bundle.meta.input == InputSpec(downscale=2)
    assert bundle.meta.ssim == SSIMParams(window=7, gaussian=False)
    assert bundle.meta.threshold == 0.25
    assert bundle.meta.training["seed"] == 3
    assert not bundle.module.training  # loaded in eval mode


def test_metadata_documents_the_model(saved: tuple[Path, Autoencoder, BundleMeta]) -> None:
    """bundle.json holds architecture, d, patch, loss, SSIM parameters, input scaling and
    normalisation, threshold, training summary and the weights' checksum."""
    path, _, meta = saved
    doc = json.loads((path / META_FILE).read_text())
    assert doc["model"]["architecture"] == "bergmann2018-table1"
    assert doc["model"]["latent"] == 8
    assert doc["model"]["patch"] == 32
    assert doc["model"]["loss"] == "ssim"
    assert doc["ssim"]["window"] == 7
    assert doc["ssim"]["k1"] == 0.01
    assert doc["input"]["downscale"] == 2
    assert "normalisation" in doc["input"]
    assert doc["inspection"]["threshold"] == 0.25
    assert doc["training"]["command"].startswith("linescan train")
    assert doc["weights"]["sha256"] == meta.weights_sha256
    assert doc["created"]


def test_vae_round_trip(tmp_path: Path) -> None:
    """A VAE bundle loads back as a VAE with the same weights."""
    torch.manual_seed(0)
    vae = VariationalAutoencoder(32, 4).eval()
    save_bundle(tmp_path / "v", vae, _meta(loss="vae", latent=4, residual="vae", vae_sigma=0.05))
    bundle = load_bundle(tmp_path / "v")
    assert isinstance(bundle.module, VariationalAutoencoder)
    assert bundle.meta.channels == 6
    assert bundle.meta.vae_sigma == 0.05
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(bundle.module.encode(x)[0], vae.encode(x)[0])


def test_update_meta_changes_only_what_is_asked(
    saved: tuple[Path, Autoencoder, BundleMeta],
) -> None:
    """update_meta stores a new threshold and calibration; the bundle still loads."""
    path, _, meta = saved
    new = update_meta(path, threshold=0.5, calibration={"rule": "quantile"})
    loaded = load_bundle(path).meta
    assert loaded.threshold == 0.5
    assert loaded.calibration == {"rule": "quantile"}
    assert loaded == new
    assert loaded.latent == meta.latent
    assert loaded.weights_sha256 == meta.weights_sha256


def _set(*keys: str, value: Any) -> Callable[[Json], None]:
    def change(doc: Json) -> None:
        d = doc
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return change


def _delete(*keys: str) -> Callable[[Json], None]:
    def change(doc: Json) -> None:
        d = doc
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]

    return change


CORRUPTIONS = [
    (_set("format", value="something-else"), "not a linescan bundle"),
    (_set("format_version", value=99), "format version 99 is not supported"),
    (_delete("model", "latent"), "missing field 'latent'"),
    (_delete("ssim"), "missing field 'ssim'"),
    (_delete("weights", "sha256"), "missing field 'sha256'"),
    (_set("model", "latent", value="16"), "field 'latent' has the wrong type"),
    (_set("model", "patch", value=32.0), "field 'patch' has the wrong type"),
    (_set("ssim", "gaussian", value=1), "field 'gaussian' has the wrong type"),
    (_set("model", "latent", value=True), "field 'latent' has the wrong type"),
    (_set("model", "loss", value="mse"), "unknown loss 'mse'"),
    (_set("model", "residual", value="abs"), "unknown residual 'abs'"),
    (_set("model", "architecture", value="resnet"), "unknown architecture 'resnet'"),
    (_set("model", "patch", value=40), "inconsistent model"),
    (_set("inspection", "stride", value=0), "inconsistent model"),
    (_set("ssim", "window", value=10), "window must be a positive odd number"),
    (_set("input", "bit_depth", value=20), "bit_depth"),
    (_set("input", "resize", value=[256]), "resize"),
    (_set("inspection", "threshold", value="high"), "threshold must be a number"),
]


@pytest.mark.parametrize(("change", "message"), CORRUPTIONS, ids=[m for _, m in CORRUPTIONS])
def test_corrupt_metadata_is_refused_saying_what_is_wrong(
    saved: tuple[Path, Autoencoder, BundleMeta], change: Callable[[Json], None], message: str
) -> None:
    """Each kind of bad bundle.json is refused with a ModelError that names the problem."""
    path, _, _ = saved
    _edit_json(path, change)
    with pytest.raises(ModelError, match=message):
        load_bundle(path)


def test_invalid_json_is_refused(saved: tuple[Path, Autoencoder, BundleMeta]) -> None:
    """bundle.json that is not JSON is refused as corrupt, naming the file."""
    path, _, _ = saved
    (path / META_FILE).write_text('{"format": "linescan-bundle", ')
    with pytest.raises(ModelError, match=r"bundle\.json is corrupt \(not valid JSON\)"):
        load_bundle(path)


def test_json_that_is_not_an_object_is_refused(
    saved: tuple[Path, Autoencoder, BundleMeta],
) -> None:
    """bundle.json holding a list instead of an object is refused."""
    path, _, _ = saved
    (path / META_FILE).write_text("[1, 2]")
    with pytest.raises(ModelError, match="not a JSON object"):
        read_meta(path)


def test_binary_garbage_metadata_is_refused(saved: tuple[Path, Autoencoder, BundleMeta]) -> None:
    """A bundle.json of non-UTF-8 bytes is refused as corrupt (not a UnicodeDecodeError)."""
    path, _, _ = saved
    (path / META_FILE).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ModelError, match="corrupt"):
        load_bundle(path)


def test_truncated_weights_are_refused_by_checksum(
    saved: tuple[Path, Autoencoder, BundleMeta],
) -> None:
    """A truncated weights.pt fails the checksum check, and the message says so."""
    path, _, _ = saved
    w = path / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelError, match="does not match the checksum"):
        load_bundle(path)


def test_tampered_weights_are_refused_by_checksum(
    saved: tuple[Path, Autoencoder, BundleMeta],
) -> None:
    """A single flipped byte in weights.pt is caught by the checksum."""
    path, _, _ = saved
    w = path / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum"):
        load_bundle(path)


def test_truncated_weights_with_matching_checksum_are_refused_as_unreadable(
    saved: tuple[Path, Autoencoder, BundleMeta],
) -> None:
    """Even when the checksum was updated, a truncated file is refused as unreadable."""
    path, _, _ = saved
    w = path / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:100])
    _fix_checksum(path)
    with pytest.raises(ModelError, match=r"cannot read weights\.pt"):
        load_bundle(path)


def test_mismatched_architecture_is_refused(saved: tuple[Path, Autoencoder, BundleMeta]) -> None:
    """Weights that do not fit the architecture in bundle.json are refused by name."""
    path, _, _ = saved
    _edit_json(path, _set("model", "latent", value=16))
    _fix_checksum(path)  # the checksum is right: only the shapes can catch it
    with pytest.raises(ModelError, match=r"do not fit the architecture.*latent=16"):
        load_bundle(path)


def test_weights_of_another_model_are_refused(
    saved: tuple[Path, Autoencoder, BundleMeta], tmp_path: Path
) -> None:
    """A weights file of a VAE in an AE bundle (checksum updated) is refused."""
    path, _, _ = saved
    torch.save(VariationalAutoencoder(32, 8).state_dict(), path / WEIGHTS_FILE)
    _fix_checksum(path)
    with pytest.raises(ModelError, match="do not fit the architecture"):
        load_bundle(path)


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        (WEIGHTS_FILE, "weights file weights.pt is missing"),
        (META_FILE, "bundle.json is missing"),
    ],
)
def test_missing_files_are_refused(
    saved: tuple[Path, Autoencoder, BundleMeta], missing: str, message: str
) -> None:
    """A bundle without its weights or metadata is refused, naming the missing file."""
    path, _, _ = saved
    (path / missing).unlink()
    with pytest.raises(ModelError, match=message):
        load_bundle(path)


def test_missing_bundle_directory_is_refused(tmp_path: Path) -> None:
    """A bundle path that does not exist is a ModelError, not a FileNotFoundError."""
    with pytest.raises(ModelError, match="does not exist"):
        load_bundle(tmp_path / "nope")


class _Booby:
    """Unpickling this calls os.mkdir(target): proof that arbitrary code ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.target),))


def test_pickled_objects_are_never_unpickled(
    saved: tuple[Path, Autoencoder, BundleMeta], tmp_path: Path
) -> None:
    """A weights.pt holding a pickled arbitrary object (with a correct checksum) is refused and
    the object's code does not run: torch.load is called with weights_only=True."""
    path, model, _ = saved
    proof = tmp_path / "code-ran"
    state: dict[str, Any] = dict(model.state_dict())
    state["payload"] = _Booby(proof)
    torch.save(state, path / WEIGHTS_FILE)
    _fix_checksum(path)
    with pytest.raises(ModelError, match=r"cannot read weights\.pt"):
        load_bundle(path)
    assert not proof.exists()


def test_non_tensor_containers_are_refused(saved: tuple[Path, Autoencoder, BundleMeta]) -> None:
    """A weights.pt that is a plain container but not a state_dict of tensors is refused."""
    path, _, _ = saved
    torch.save([torch.zeros(1)], path / WEIGHTS_FILE)
    _fix_checksum(path)
    with pytest.raises(ModelError, match="not a plain state_dict"):
        load_bundle(path)
