"""End-to-end tests of the ``linescan`` command: train -> calibrate -> inspect -> evaluate.

The real command runs in a subprocess (``python -m linescan.cli``), on a tiny synthetic woven
dataset made in a temporary folder, with one torch thread (the test machines share their
cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from linescan.cli import _scale_arg, main
from linescan.data.images import write_grey
from linescan.data.synthetic import Defect, WovenWeb, plant_defects
from linescan.model.bundle import META_FILE, load_bundle

HOLE = Defect("hole", line=90, x=100, height=24, width=24)


def _linescan(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "linescan.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"linescan {args[0]} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def trained_cli(tmp_path_factory: pytest.TempPathFactory, woven_data: Path) -> Path:
    """A bundle made by ``linescan train`` (which calibrates on its held-out image)."""
    out = tmp_path_factory.mktemp("cli") / "model"
    proc = _linescan(
        "train", "--data", woven_data, "--out", out, "--scale", "1/2", "--patch", "32",
        "--latent", "16", "--patches", "1024", "--epochs", "3", "--batch", "32",
        "--lr", "1e-3", "--precision", "fp32", "--seed", "0",
    )  # fmt: skip
    assert "saved" in proc.stdout
    assert "threshold" in proc.stdout  # calibrated on the held-out image
    assert "alarms/image" in proc.stdout  # with the trade-off table
    assert "budget 0.05/Mpx  <- chosen" in proc.stdout  # the default rule
    assert "synthetic defects found at threshold" in proc.stdout  # what it finds, kind by kind
    assert "held-out" in proc.stderr  # the progress line shows the held-out loss
    return out


def test_train_writes_a_calibrated_bundle(trained_cli: Path) -> None:
    """``linescan train`` writes a loadable bundle with the flags' settings, the command line
    and a threshold from its held-out images."""
    meta = load_bundle(trained_cli).meta
    assert (meta.patch, meta.latent, meta.loss) == (32, 16, "ssim")
    assert meta.residual in ("ssim", "combined", "l2")  # chosen by calibration's evidence
    assert meta.score is not None  # statistics learned at the end of training
    assert meta.score.learned["source"] == "training"
    assert meta.opening == 2  # 4 camera pixels at 1/2 scale
    assert meta.input.downscale == 2
    assert meta.threshold is not None
    assert meta.calibration is not None
    assert meta.calibration["images"] == 1
    assert meta.training["epochs"] == 3
    assert "--scale 1/2" in meta.training["command"]


@pytest.fixture(scope="module")
def calibrated_cli(trained_cli: Path, woven_data: Path) -> Path:
    proc = _linescan(
        "calibrate", "--model", trained_cli, "--data", woven_data, "--precision", "fp32", "--json"
    )
    doc = json.loads(proc.stdout)
    assert doc["rule"] == "budget"
    assert doc["images"] == 6  # train/good of the dataset
    assert doc["operating_points"]
    assert load_bundle(trained_cli).meta.threshold == doc["threshold"]
    return trained_cli


def test_calibrate_prints_the_trade_off(trained_cli: Path, woven_data: Path) -> None:
    """Without --json, `linescan calibrate` prints the trade-off table (with the labelled
    defect images of --defects) and where the threshold went; --dry-run stores nothing."""
    before = load_bundle(trained_cli).meta.threshold
    proc = _linescan(
        "calibrate", "--model", trained_cli, "--data", woven_data, "--defects", woven_data,
        "--rule", "alarm-rate", "--max-alarms-per-mpx", "5", "--precision", "fp32", "--dry-run",
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    assert "defect images found" in lines[0]
    assert sum("<- chosen" in line for line in lines) == 1
    assert "alarm-rate 5/Mpx  <- chosen" in proc.stdout
    assert "4 labelled defect image(s)" in proc.stdout
    assert "printed only (--dry-run)" in proc.stdout
    assert load_bundle(trained_cli).meta.threshold == before


def test_inspect_writes_pictures_and_finds_the_planted_defect(
    calibrated_cli: Path, tmp_path: Path
) -> None:
    """``linescan inspect`` writes mask, heat map, overlay and a regions JSON per image, and
    the planted hole is inside a reported region (boxes in original pixels)."""
    img = WovenWeb(256, seed=99).lines(0, 200)
    plant_defects(img, 0, [HOLE])
    path = tmp_path / "web.png"
    write_grey(path, img)
    out = tmp_path / "out"
    proc = _linescan(
        "inspect", "--model", calibrated_cli, path, "--out", out, "--precision", "fp32"
    )
    assert "defect region" in proc.stdout
    mask = cv2.imread(str(out / "web_mask.png"), cv2.IMREAD_UNCHANGED)
    heat = cv2.imread(str(out / "web_residual.png"), cv2.IMREAD_UNCHANGED)
    over = cv2.imread(str(out / "web_overlay.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (200, 256)
    assert set(np.unique(mask)) <= {0, 255}
    assert heat.shape == (200, 256, 3)
    assert over.shape == (200, 256, 3)
    doc = json.loads((out / "web_regions.json").read_text())
    assert (doc["width"], doc["height"]) == (256, 200)
    assert doc["threshold"] == load_bundle(calibrated_cli).meta.threshold
    hits = [
        r
        for r in doc["regions"]
        if r["line_start"] <= HOLE.line + HOLE.height // 2 < r["line_end"]
        and r["x_start"] <= HOLE.x + HOLE.width // 2 < r["x_end"]
    ]
    assert hits, doc["regions"]
    # the defect is in the saved mask and outlined in red in the overlay
    assert mask[HOLE.line + 12, HOLE.x + 12] == 255
    red = (over[..., 2] > 200) & (over[..., 1] < 50) & (over[..., 0] < 50)
    assert red[HOLE.line - 15 : HOLE.line_end + 15, HOLE.x - 15 : HOLE.x_end + 15].any()


def test_evaluate_writes_metrics_and_roc(
    calibrated_cli: Path, woven_data: Path, tmp_path: Path
) -> None:
    """``linescan evaluate`` writes metrics.json with AUROC, PRO-AUC and region overlaps, and
    roc.png; the tiny model scores above chance."""
    out = tmp_path / "eval"
    _linescan("evaluate", "--model", calibrated_cli, "--data", woven_data, "--out", out,
              "--precision", "fp32")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"pixel_auroc", "pro_auc_30", "region_overlap_at_fpr"} <= set(metrics)
    assert 0.6 < metrics["pixel_auroc"] <= 1.0
    assert 0.0 <= metrics["pro_auc_30"] <= 1.0
    assert {"q25", "q50", "q75"} <= set(metrics["region_overlap_at_fpr"])
    roc = cv2.imread(str(out / "roc.png"))
    assert roc is not None
    assert roc.shape[0] > 100


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], command: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"linescan {command}: error: ")
    return lines[0]


def test_missing_data_dir_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing dataset folder prints one error line naming it and exits 2 (in-process: an
    uncaught exception would fail this test as surely as a traceback in a console)."""
    code = main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    proc = subprocess.CompletedProcess[str](["linescan"], code, "", err)
    line = _assert_one_line_error(proc, "train")
    assert "nowhere" in line
    assert not (tmp_path / "m").exists()


def test_corrupt_bundle_is_one_line_and_exit_2(calibrated_cli: Path, tmp_path: Path) -> None:
    """A corrupt bundle prints one error line saying what is wrong and exits 2."""
    bad = tmp_path / "bad"
    shutil.copytree(calibrated_cli, bad)
    (bad / META_FILE).write_text("{ not json")
    img = tmp_path / "x.png"
    write_grey(img, WovenWeb(128, seed=1).lines(0, 128))
    proc = _linescan("inspect", "--model", bad, img, "--out", tmp_path / "o", check=False)
    line = _assert_one_line_error(proc, "inspect")
    assert "not valid JSON" in line


@pytest.mark.parametrize(("text", "factor"), [("1/2", 2), ("0.25", 4), ("1", 1), ("1/4", 4)])
def test_scale_accepts_reciprocal_integers(text: str, factor: int) -> None:
    """--scale takes 1/n as a fraction or a decimal and gives the block factor n."""
    assert _scale_arg(text) == factor


@pytest.mark.parametrize("text", ["0.3", "0", "2", "-0.5", "abc", "1/0", "2/3"])
def test_scale_rejects_other_factors(text: str) -> None:
    """Factors that are not 1/n for a whole n (or not in (0, 1]) are rejected."""
    with pytest.raises(argparse.ArgumentTypeError, match="--scale"):
        _scale_arg(text)


def test_scale_rejection_reaches_the_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``linescan train --scale 0.3`` exits 2 with a usage error naming the rule."""
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--scale", "0.3"])
    assert exc.value.code == 2
    assert "--scale must be 1/n" in capsys.readouterr().err
