"""The OpenVINO engine: export into the bundle, INT8 by NNCF with its accuracy check, the
backend's checks and cache, ``auto`` precision, and the daemon's events equal to the offline
regions with the INT8 engine (fixed batches).

Runs on a tiny trained model (``conftest.ssim_model``); skips, saying why, where the
``openvino`` extra is not installed, except the test of what a user without it sees.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
import time
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import zmq
from prometheus_client import CollectorRegistry

from linescan.backends import create_backend
from linescan.cli import main
from linescan.config import Config
from linescan.data.images import training_images
from linescan.data.synthetic import Defect, WovenWeb, plant_defects
from linescan.errors import EngineError, ModelError
from linescan.ingest import encode_frame
from linescan.model.bundle import load_bundle, read_meta, sha256_file, update_meta
from linescan.pipeline import inspect_image, reconstruct
from linescan.service import Daemon

if TYPE_CHECKING:
    from conftest import Trained

needs_openvino = pytest.mark.skipif(
    find_spec("openvino") is None or find_spec("nncf") is None,
    reason="OpenVINO and NNCF are not installed (pip install 'linescan[openvino]')",
)
BATCH = 16


@pytest.fixture(autouse=True)
def _engine_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled models go to a temporary engine cache, never into the checkout's engines/."""
    monkeypatch.setenv("LINESCAN_ENGINES", str(tmp_path_factory.mktemp("engines")))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, ssim_model: Trained) -> tuple[Path, Any]:
    """A copy of the tiny SSIM bundle with its OpenVINO FP32 and INT8 exports (a loose bound:
    this test is about the mechanics; the refusal has its own test)."""
    if find_spec("openvino") is None or find_spec("nncf") is None:
        pytest.skip("OpenVINO and NNCF are not installed (pip install 'linescan[openvino]')")
    from linescan.openvino_export import Bound, export_openvino

    path = tmp_path_factory.mktemp("ov") / "bundle"
    shutil.copytree(ssim_model.path, path)
    report = export_openvino(
        path,
        int8=True,
        data=ssim_model.data,
        tiles=64,
        bound=Bound(1.0, 1.0),
        threads=1,
        batch=BATCH,
    )
    return path, report


# ----------------------------------------------------------------------------- export


@needs_openvino
def test_export_records_the_files_the_data_and_the_check(
    exported: tuple[Path, Any], ssim_model: Trained
) -> None:
    """bundle.json names both IRs with their checksums and weights, the calibration tiles'
    images, seed and checksum (reproducible from the images), and the accuracy check."""
    from linescan.openvino_export import calibration_tiles, split_images

    path, report = exported
    rec = read_meta(path).openvino
    assert rec is not None
    weights = read_meta(path).weights_sha256
    for name in ("fp32", "int8"):
        xml = path / rec[name]["xml"]
        assert rec[name]["xml_sha256"] == sha256_file(xml)
        assert rec[name]["bin_sha256"] == sha256_file(xml.with_suffix(".bin"))
        assert rec[name]["weights_sha256"] == weights
    cal = rec["int8"]["calibration"]
    calib, held = split_images(training_images(ssim_model.data))
    assert [i["file"] for i in cal["images"]] == [p.name for p in calib]
    assert cal["held_out"] == [p.name for p in held]
    assert cal["held_out_separate"] is True
    tiles, again = calibration_tiles(calib, load_bundle(path).meta, 64, 0)
    assert again["sha256"] == cal["sha256"] == hashlib.sha256(tiles.tobytes()).hexdigest()
    assert cal["tiles"] == len(tiles) == 64
    acc = rec["accuracy"]
    assert acc["threshold"] == read_meta(path).threshold
    assert acc["bound"] == {"auroc_loss": 1.0, "recall_loss": 1.0}
    for name in report.accuracy:
        assert 0.0 <= acc[name]["auroc"] <= 1.0
        assert acc[name]["defects"] > 0
        assert acc[name]["accepted"] is True
    assert acc["fp32"]["defects"] == acc["int8"]["defects"]
    assert rec["speed"]["int8"] > 0
    assert 0 < acc["int8_max_abs_diff"] < 0.5  # really quantized, still a reconstruction


@needs_openvino
def test_int8_beyond_the_bound_is_refused(
    tmp_path: Path, ssim_model: Trained, capsys: pytest.CaptureFixture[str]
) -> None:
    """`linescan export --int8` with a bound no engine can meet (AUROC above FP32's by 1):
    exit 1, the numbers and the reason printed, no INT8 file, the refusal recorded, and the
    FP32 IR still there."""
    path = tmp_path / "bundle"
    shutil.copytree(ssim_model.path, path)
    code = main(
        [
            *("export", "--model", str(path), "--int8", "--data", str(ssim_model.data)),
            *("--max-auroc-loss", "-1", "--calibration-tiles", "64", "--threads", "1"),
            *("--batch", str(BATCH)),
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "refused int8: AUROC" in out
    assert "INT8 not written" in out
    rec = read_meta(path).openvino
    assert rec is not None
    assert "int8" not in rec
    assert "AUROC" in rec["int8_refused"]["why"]
    assert rec["accuracy"]["int8"]["accepted"] is False
    assert not (path / "openvino" / "model.int8.xml").exists()
    assert (path / "openvino" / "model.xml").exists()
    with pytest.raises(ModelError, match="no INT8 export"):
        create_backend(load_bundle(path), "openvino", "int8", threads=1, batch=BATCH)


# ----------------------------------------------------------------------------- backend


@needs_openvino
def test_engines_agree_with_torch(exported: tuple[Path, Any]) -> None:
    """OpenVINO FP32 equals torch FP32 to 1e-5; INT8 is close but not the same numbers."""
    path, _ = exported
    bundle = load_bundle(path)
    p = bundle.meta.patch
    x = np.random.default_rng(1).random((BATCH + 5, 1, p, p), dtype=np.float32)
    ref = create_backend(bundle, "torch", "fp32", threads=1, batch=BATCH).infer(x)
    fp32 = create_backend(bundle, "openvino", "fp32", threads=1, batch=BATCH)
    int8 = create_backend(bundle, "openvino", "int8", threads=1, batch=BATCH)
    assert (fp32.name, fp32.precision, int8.precision) == ("openvino", "fp32", "int8")
    assert np.abs(fp32.infer(x) - ref).max() < 1e-5
    d = np.abs(int8.infer(x) - ref).max()
    assert 0 < d < 0.5


@needs_openvino
def test_a_damaged_or_stale_export_is_refused(exported: tuple[Path, Any], tmp_path: Path) -> None:
    """A changed .bin fails its checksum; an IR recorded for other weights is stale; either
    way a ModelError naming the command that rebuilds it."""
    path = tmp_path / "bundle"
    shutil.copytree(exported[0], path)
    bin_file = path / "openvino" / "model.int8.bin"
    data = bytearray(bin_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    bin_file.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"does not match the checksum.*--openvino --int8"):
        create_backend(load_bundle(path), "openvino", "int8", threads=1, batch=BATCH)
    rec = read_meta(path).openvino
    assert rec is not None
    rec["fp32"]["weights_sha256"] = "0" * 64
    update_meta(path, openvino=rec)
    with pytest.raises(ModelError, match="exported from other weights"):
        create_backend(load_bundle(path), "openvino", "fp32", threads=1, batch=BATCH)


@needs_openvino
def test_auto_picks_the_fastest_checked_engine(exported: tuple[Path, Any], tmp_path: Path) -> None:
    """auto: the fastest precision whose accuracy check passed with the bundle's current
    threshold; after a recalibration the INT8 check no longer counts."""
    from linescan.backends.openvino_cpu import choose_precision

    path = tmp_path / "bundle"
    shutil.copytree(exported[0], path)
    rec = read_meta(path).openvino
    assert rec is not None
    rec["speed"].update({"fp32": 100.0, "bf16": 200.0, "int8": 300.0})
    update_meta(path, openvino=rec)
    assert choose_precision(load_bundle(path), native_bf16=False)[0] == "int8"
    assert choose_precision(load_bundle(path), native_bf16=True)[0] == "int8"
    rec["speed"]["bf16"] = 400.0
    update_meta(path, openvino=rec)
    bf16_checked = "bf16" in rec["accuracy"]
    want = "bf16" if not bf16_checked or rec["accuracy"]["bf16"]["accepted"] else "int8"
    assert choose_precision(load_bundle(path), native_bf16=True)[0] == want
    threshold = read_meta(path).threshold
    assert threshold is not None
    update_meta(path, threshold=threshold * 1.5)  # recalibrated since the export
    assert choose_precision(load_bundle(path), native_bf16=False)[0] == "fp32"


@needs_openvino
def test_compiled_models_are_cached(exported: tuple[Path, Any], tmp_path: Path) -> None:
    """The compiled model is cached under ENGINES/openvino; a second load uses the cache."""
    from linescan.backends.openvino_cpu import OpenVinoBackend

    bundle = load_bundle(exported[0])
    engines = tmp_path / "engines"
    OpenVinoBackend(bundle, "int8", threads=1, max_batch=BATCH, engines_dir=engines).close()
    blobs = sorted((engines / "openvino").glob("*.blob"))
    assert blobs, list((engines / "openvino").iterdir())
    stamp = [b.stat().st_mtime_ns for b in blobs]
    OpenVinoBackend(bundle, "int8", threads=1, max_batch=BATCH, engines_dir=engines).close()
    assert [b.stat().st_mtime_ns for b in sorted((engines / "openvino").glob("*.blob"))] == stamp


@needs_openvino
def test_without_an_export_fp32_is_converted_at_start(ssim_model: Trained) -> None:
    """A bundle never exported still runs on OpenVINO in fp32 (converted from the weights)."""
    bundle = load_bundle(ssim_model.path)
    assert bundle.meta.openvino is None
    b = create_backend(bundle, "openvino", "fp32", threads=1, batch=BATCH)
    p = bundle.meta.patch
    x = np.random.default_rng(2).random((BATCH, 1, p, p), dtype=np.float32)
    ref = create_backend(bundle, "torch", "fp32", threads=1, batch=BATCH).infer(x)
    assert np.abs(b.infer(x) - ref).max() < 1e-5


def test_without_the_extra_the_error_names_it(
    ssim_model: Trained, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No OpenVINO installed: create_backend and `linescan export --openvino` fail with one
    line naming pip install 'linescan[openvino]' (runs everywhere: the import is blocked)."""
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(EngineError, match=r"pip install 'linescan\[openvino\]'"):
        create_backend(load_bundle(ssim_model.path), "openvino", "fp32", threads=1)
    assert main(["export", "--model", str(ssim_model.path), "--openvino"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "pip install 'linescan[openvino]'" in err


# ----------------------------------------------------------------------------- streaming

WIDTH, LINES = 160, 600
DEFECTS = [
    Defect("hole", line=60, x=30, height=14, width=18),
    Defect("broken_thread", line=250, x=90, height=90, width=5),
    Defect("stain", line=480, x=20, height=30, width=40),
]


@needs_openvino
@pytest.mark.slow
def test_streamed_events_equal_offline_regions_with_int8(exported: tuple[Path, Any]) -> None:
    """The daemon on the INT8 engine (fixed batches): for two splits of a web into frames, its
    events equal inspect_image's regions on the whole web with the same engine, boxes and
    areas exactly, scores to 1e-6."""
    path, _ = exported
    bundle = load_bundle(path)
    web = WovenWeb(WIDTH, 3).lines(0, LINES)
    plant_defects(web, 0, DEFECTS)
    backend = create_backend(bundle, "openvino", "int8", threads=1, batch=BATCH)
    score = reconstruct(web, bundle.meta, backend).score
    meta = replace(bundle.meta, threshold=float(np.quantile(score, 0.995)))  # many regions
    offline = inspect_image(web, meta, backend).regions
    assert len(offline) >= 3
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        for seed in (0, 1):
            rng = random.Random(seed)
            heights: list[int] = []
            while sum(heights) < LINES:
                heights.append(min(rng.randint(1, 200), LINES - sum(heights)))
            events = _stream(ctx, meta, backend, web, heights)
            key = ("line_start", "line_end", "x_start", "x_end", "area_px")
            got = sorted(events, key=lambda e: tuple(e[k] for k in key))
            want = sorted((r.to_dict() for r in offline), key=lambda r: tuple(r[k] for k in key))
            assert [tuple(e[k] for k in key) for e in got] == [
                tuple(r[k] for k in key) for r in want
            ]
            for e, r in zip(got, want, strict=True):
                assert e["score_max"] == pytest.approx(r["score_max"], abs=1e-6)
                assert e["score_mean"] == pytest.approx(r["score_mean"], abs=1e-6)
    finally:
        ctx.destroy(linger=0)


def _stream(
    ctx: zmq.Context[zmq.Socket[bytes]], meta: Any, backend: Any, web: Any, heights: list[int]
) -> list[dict[str, Any]]:
    cfg = Config.model_validate(
        {
            "frames": {"endpoint": "tcp://127.0.0.1:*"},
            "events": {"endpoint": "tcp://127.0.0.1:*", "status_interval_s": 0.1},
            "metrics": {"enabled": False},
            "inspection": {"max_batch": BATCH, "max_wait_ms": 2.0},
            "queues": {"overload": "block", "ingest": 256},
        }
    )
    events: list[dict[str, Any]] = []
    d = Daemon(
        cfg,
        meta,
        backend,
        CollectorRegistry(),
        ctx,
        on_event=lambda t, b: events.append(b) if t == "defect" else None,
    )
    d.start()
    sock = ctx.socket(zmq.PUSH)
    try:
        sock.connect(d.frames_endpoint)
        pos = 0
        for i, h in enumerate(heights):
            last = i == len(heights) - 1
            sock.send_multipart(encode_frame("cam0", i, web[pos : pos + h], end=last))
            pos += h
        deadline = time.monotonic() + 60
        while d.totals.frames_inspected < len(heights) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert d.totals.frames_inspected == len(heights)
    finally:
        sock.close(linger=1000)
        d.stop()
        assert d.join(30)
    assert json.dumps(events)  # plain JSON, as published
    return events
