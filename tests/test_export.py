"""Tests of linescan.export and the onnxruntime backend: the ONNX every GPU engine builds from."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the onnx extra is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import onnx

from linescan.backends import create_backend
from linescan.backends.onnx_cpu import OnnxBackend, checked_onnx_path
from linescan.backends.torch_cpu import TorchBackend
from linescan.errors import ModelError
from linescan.export import INPUT_NAME, OUTPUT_NAME, export_onnx, verify_onnx
from linescan.model.bundle import (
    ONNX_FILE,
    ONNX_FP16_FILE,
    BundleMeta,
    build_module,
    load_bundle,
    read_meta,
    save_bundle,
    sha256_file,
)

PATCH = 32


def make_bundle(path: Path, loss: str) -> Path:
    """A freshly initialised (untrained) tiny bundle: export does not care about training."""
    residual = "vae" if loss == "vae" else "ssim"
    meta = BundleMeta(loss=loss, latent=8, patch=PATCH, residual=residual)  # type: ignore[arg-type]
    save_bundle(path, build_module(meta), meta)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An autoencoder and a VAE bundle, each exported once for the whole module."""
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for loss in ("ssim", "vae"):
        bundle = make_bundle(root / loss, loss)
        export_onnx(bundle)
        out[loss] = bundle
    return out


def tiles(b: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((b, 1, PATCH, PATCH), dtype=np.float32)


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- export


def test_export_records_checksum_and_dynamic_batch(exported: dict[str, Path]) -> None:
    """model.onnx is in the bundle, its sha256 is recorded, and its batch axis is symbolic."""
    bundle = exported["ssim"]
    path = bundle / ONNX_FILE
    assert read_meta(bundle).onnx_sha256 == sha256_file(path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == INPUT_NAME
    assert out.name == OUTPUT_NAME
    in_dims = inp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param  # symbolic, not a fixed size
    assert [d.dim_value for d in in_dims[1:]] == [1, PATCH, PATCH]


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_torch(exported: dict[str, Path], batch: int) -> None:
    """The exported autoencoder equals torch (fp32) within 1e-4 for any batch size."""
    bundle = load_bundle(exported["ssim"])
    x = tiles(batch)
    want = TorchBackend(bundle, precision="fp32").infer(x)
    got = OnnxBackend(bundle, threads=1).infer(x)
    assert got.shape == (batch, 1, PATCH, PATCH)
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_torch_vae(exported: dict[str, Path], batch: int) -> None:
    """The exported VAE decodes the same fixed N posterior draws as the torch backend."""
    bundle = load_bundle(exported["vae"])
    x = tiles(batch, seed=2)
    want = TorchBackend(bundle, precision="fp32").infer(x)
    got = OnnxBackend(bundle, threads=1).infer(x)
    assert got.shape == (batch, bundle.meta.vae_samples, PATCH, PATCH)
    assert np.abs(got - want).max() <= 1e-4


def test_verify_onnx_reports_a_small_difference(exported: dict[str, Path]) -> None:
    """verify_onnx returns the max difference over batches of 1 and 5."""
    assert 0.0 <= verify_onnx(exported["ssim"]) <= 1e-4


# --------------------------------------------------------------------------- FP16 export


FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


@pytest.mark.parametrize("loss", ["ssim", "vae"])
def test_fp16_export_is_fp16_inside_fp32_outside(exported: dict[str, Path], loss: str) -> None:
    """model.fp16.onnx: recorded, FP16 weights, FP32 tensors at the boundary, dynamic batch.

    This is the graph a strongly typed TensorRT (11, or 10 with the flag) builds an FP16
    engine from; an FP32 boundary keeps the backend's host buffers and the daemon unchanged.
    """
    path = exported[loss] / ONNX_FP16_FILE
    assert read_meta(exported[loss]).onnx_fp16_sha256 == sha256_file(path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    weights = {init.data_type for init in model.graph.initializer if len(init.dims) == 4}
    assert weights == {FLOAT16}
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.type.tensor_type.elem_type == FLOAT
    assert out.type.tensor_type.elem_type == FLOAT
    assert inp.type.tensor_type.shape.dim[0].dim_param
    producers = {o: n for n in model.graph.node for o in n.output}
    assert any(n.op_type == "Cast" and inp.name in n.input for n in model.graph.node)
    last = producers[out.name]
    while last.op_type == "Identity":
        last = producers[last.input[0]]
    assert last.op_type == "Cast"


@pytest.mark.parametrize("loss", ["ssim", "vae"])
def test_fp16_export_runs_close_to_torch_fp32(exported: dict[str, Path], loss: str) -> None:
    """onnxruntime on the FP16 export is within FP16 rounding of torch FP32, but not equal
    (it really computes in FP16), for batches of 1 and 5."""
    diff = verify_onnx(exported[loss], precision="fp16")
    assert 1e-6 < diff <= 1e-2
    backend = OnnxBackend(load_bundle(exported[loss]), threads=1, precision="fp16")
    assert backend.infer(tiles(2)).dtype == np.float32
    backend.close()


def test_fp16_export_tampered_or_missing_is_refused(
    exported: dict[str, Path], tmp_path: Path
) -> None:
    """The FP16 file has its own checksum: tampering with it, or a bundle exported before
    FP16 exports existed (no record), is refused with the command that fixes it."""
    bundle_dir = copy_bundle(exported["ssim"], tmp_path / "b")
    bundle = load_bundle(bundle_dir)
    assert checked_onnx_path(bundle, fp16=True) == bundle_dir / ONNX_FP16_FILE
    with (bundle_dir / ONNX_FP16_FILE).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match=r"does not match.*linescan export --model"):
        checked_onnx_path(bundle, fp16=True)
    assert checked_onnx_path(bundle) == bundle_dir / ONNX_FILE  # the FP32 file is still fine
    from linescan.model.bundle import update_meta

    update_meta(bundle_dir, onnx_fp16_sha256=None)
    with pytest.raises(ModelError, match=r"not recorded.*linescan export --model"):
        checked_onnx_path(bundle, fp16=True)


def test_a_failed_export_leaves_the_previous_pair(
    exported: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both files are traced before either replaces its predecessor: an FP16 trace that fails
    leaves the old model.onnx and model.fp16.onnx, still matching bundle.json, and no
    temporary files behind."""
    import linescan.export as export_mod

    bundle_dir = copy_bundle(exported["ssim"], tmp_path / "b")
    before = {n: sha256_file(bundle_dir / n) for n in (ONNX_FILE, ONNX_FP16_FILE)}
    meta = read_meta(bundle_dir)

    def broken(self: object, x: object) -> object:
        raise RuntimeError("trace failed")

    monkeypatch.setattr(export_mod.HalfPrecision, "forward", broken)
    with pytest.raises(ModelError, match="trace failed"):
        export_onnx(bundle_dir)
    assert {n: sha256_file(bundle_dir / n) for n in before} == before
    after = read_meta(bundle_dir)
    assert (after.onnx_sha256, after.onnx_fp16_sha256) == (meta.onnx_sha256, meta.onnx_fp16_sha256)
    assert not [p for p in bundle_dir.iterdir() if p.name.endswith(".tmp")]
    assert checked_onnx_path(load_bundle(bundle_dir), fp16=True)


def test_tensorrt_builds_from_the_export_of_its_precision(
    exported: dict[str, Path], tmp_path: Path
) -> None:
    """The TensorRT build picks model.fp16.onnx (and its checksum, the engine key's) for
    FP16 and model.onnx for FP32; a bundle exported before FP16 exports existed still starts
    with precision auto (in FP32), while an explicit fp16 is refused with the fix."""
    from linescan.backends.tensorrt import choose_onnx

    bundle_dir = copy_bundle(exported["ssim"], tmp_path / "b")
    bundle = load_bundle(bundle_dir)
    meta = read_meta(bundle_dir)
    assert choose_onnx(bundle, "auto", True) == (
        True, bundle_dir / ONNX_FP16_FILE, meta.onnx_fp16_sha256
    )  # fmt: skip
    assert choose_onnx(bundle, "fp32", False) == (False, bundle_dir / ONNX_FILE, meta.onnx_sha256)
    from linescan.model.bundle import update_meta

    update_meta(bundle_dir, onnx_fp16_sha256=None)  # as exported by an older linescan
    assert choose_onnx(bundle, "auto", True) == (False, bundle_dir / ONNX_FILE, meta.onnx_sha256)
    with pytest.raises(ModelError, match=r"not recorded.*linescan export --model"):
        choose_onnx(bundle, "fp16", True)


def test_fp16_record_survives_other_metadata_changes(
    exported: dict[str, Path], tmp_path: Path
) -> None:
    """bundle.json round-trips the FP16 record (e.g. through a re-calibration)."""
    bundle_dir = copy_bundle(exported["ssim"], tmp_path / "b")
    from linescan.model.bundle import update_meta

    before = read_meta(bundle_dir)
    update_meta(bundle_dir, threshold=0.5)
    after = read_meta(bundle_dir)
    assert after.onnx_fp16_sha256 == before.onnx_fp16_sha256 is not None
    assert after.onnx_sha256 == before.onnx_sha256


def test_create_backend_selects_onnxruntime(exported: dict[str, Path]) -> None:
    """The config name 'onnxruntime' gives the ONNX backend, with the bundle's output shape."""
    backend = create_backend(load_bundle(exported["ssim"]), "onnxruntime", threads=1)
    assert backend.name == "onnxruntime"
    assert backend.infer(tiles(3)).shape == (3, 1, PATCH, PATCH)
    backend.close()


# --------------------------------------------------------------------------- refusals


def test_tampered_onnx_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    """A model.onnx whose sha256 differs from bundle.json is refused, naming the fix."""
    bundle_dir = copy_bundle(exported["ssim"], tmp_path / "b")
    with (bundle_dir / ONNX_FILE).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match=r"linescan export --model"):
        OnnxBackend(load_bundle(bundle_dir))


def test_unrecorded_onnx_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    """An export never recorded in bundle.json (e.g. retrained since) is refused."""
    bundle_dir = copy_bundle(exported["ssim"], tmp_path / "b")
    from linescan.model.bundle import update_meta

    update_meta(bundle_dir, onnx_sha256=None)
    with pytest.raises(ModelError, match=r"not recorded.*linescan export --model"):
        OnnxBackend(load_bundle(bundle_dir))


def test_missing_onnx_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    """A bundle without model.onnx says to export it."""
    bundle_dir = copy_bundle(exported["ssim"], tmp_path / "b")
    (bundle_dir / ONNX_FILE).unlink()
    with pytest.raises(ModelError, match=r"no model.onnx.*linescan export --model"):
        OnnxBackend(load_bundle(bundle_dir))


# --------------------------------------------------------------------------- CLI


def test_cli_export(tmp_path: Path) -> None:
    """`linescan export --model B` writes and verifies the export, and prints the difference."""
    bundle = make_bundle(tmp_path / "cli", "ssim")
    run = subprocess.run(
        [sys.executable, "-m", "linescan.cli", "export", "--model", str(bundle)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "onnxruntime fp32 export vs torch fp32" in run.stdout
    assert "onnxruntime fp16 export vs torch fp32" in run.stdout
    assert read_meta(bundle).onnx_sha256 == sha256_file(bundle / ONNX_FILE)
    assert read_meta(bundle).onnx_fp16_sha256 == sha256_file(bundle / ONNX_FP16_FILE)
