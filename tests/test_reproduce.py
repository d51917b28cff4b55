"""tools/reproduce.py in --quick mode: the toy only, tiny budgets, everything under tmp_path.

Checks that one command trains the variants, scores the cross terms and the no-model yardstick,
writes JSON per run, the report and the figures, skips finished runs on a second invocation,
continues an interrupted training from its checkpoint, and keeps the hand-written analysis
when the report is re-rendered. It never reads the shared datasets.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import cv2
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "tools" / "reproduce.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study(reproduce: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One quick study (the tool sets torch to 1 thread: restored afterwards)."""
    threads = torch.get_num_threads()
    work = tmp_path_factory.mktemp("study")
    try:
        assert reproduce.main(["--quick", "--work", str(work)]) == 0
        yield work
    finally:
        torch.set_num_threads(threads)


def _json(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_text())


@pytest.mark.slow
def test_quick_study_scores_variants_cross_terms_and_yardstick(study: Path) -> None:
    l2 = _json(study / "toy" / "l2" / "result.json")
    ssim = _json(study / "toy" / "ssim" / "result.json")
    vae = _json(study / "toy" / "vae" / "result.json")
    yard = _json(study / "toy" / "yardstick" / "result.json")
    assert set(l2["evals"]) == {"l2", "ssim"}  # own residual and the cross term
    assert set(ssim["evals"]) == {"ssim", "l2"}
    assert set(vae["evals"]) == {"vae"}
    assert set(yard["evals"]) == {"l2", "ssim"}
    for doc in (l2, ssim, vae, yard):
        for ev in doc["evals"].values():
            assert 0.0 <= ev["pixel_auroc"] <= 1.0
            assert 0.0 <= ev["pro_auc_30"] <= 1.0
            assert set(ev["overlap_by_fpr"]) >= {"0.05"}
    assert l2["train"]["command"].startswith("linescan train --data ")
    assert "--loss l2" in l2["train"]["command"]
    assert "--residual ssim" in l2["evals"]["ssim"]["command"]
    # Only the toy: the quick mode never touches shared data.
    collected = _json(study / "collected.json")
    assert set(collected["datasets"]) == {"toy"}
    assert "/work/shared" not in (study / "results.md").read_text()


@pytest.mark.slow
def test_quick_study_writes_report_and_small_figures(study: Path) -> None:
    report = (study / "results.md").read_text()
    assert "| toy | yardstick: blur, no model | L2 |" in report
    assert "| toy | L2 AE | SSIM (cross) |" in report
    assert "| toy | SSIM AE | L2 (cross) |" in report
    assert "0.688" in report
    assert "0.966" in report
    assert "## Reduced Table II sweep" in report
    assert "sweep-d16-k11-p32" in report
    figures = study / "figures"
    names = {"fig3_toy.png", "fig6_roc_toy.png", "fig6_roc_toy_cross.png", "fig7_overlap.png"}
    assert names <= {p.name for p in figures.iterdir()}
    for name in names:
        path = figures / name
        assert path.stat().st_size < 200_000
        assert cv2.imread(str(path)) is not None


@pytest.mark.slow
def test_second_run_skips_finished_runs_and_resumes_training(
    reproduce: ModuleType, study: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    threads = torch.get_num_threads()
    try:
        before = (study / "toy" / "ssim" / "train.json").stat().st_mtime_ns
        # Interrupt the L2 run after its training: no bundle, no result, the checkpoint stays.
        (study / "toy" / "l2" / "result.json").unlink()
        (study / "toy" / "l2" / "train.json").unlink()
        (study / "toy" / "l2" / "bundle" / "bundle.json").unlink()
        capsys.readouterr()
        assert reproduce.main(["--quick", "--work", str(study)]) == 0
        out = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    assert "toy/ssim: done earlier, skipped" in out
    assert (study / "toy" / "ssim" / "train.json").stat().st_mtime_ns == before
    assert "toy/l2: training" in out
    assert "resumed" in out
    assert _json(study / "toy" / "l2" / "train.json")["resumed"] is True
    assert set(_json(study / "toy" / "l2" / "result.json")["evals"]) == {"l2", "ssim"}


@pytest.mark.slow
def test_report_only_keeps_the_written_analysis(reproduce: ModuleType, study: Path) -> None:
    report = study / "results.md"
    text = report.read_text()
    marked = text.replace(
        reproduce.ANALYSIS_START + "\n",
        reproduce.ANALYSIS_START + "\nSSIM wins here because of the contrast term.\n",
    )
    report.write_text(marked)
    threads = torch.get_num_threads()
    try:
        assert reproduce.main(["--quick", "--work", str(study), "--report-only"]) == 0
    finally:
        torch.set_num_threads(threads)
    again = report.read_text()
    assert "SSIM wins here because of the contrast term." in again
    assert again.count(reproduce.ANALYSIS_START) == 1


def test_default_geometry_follows_the_stated_rule(reproduce: ModuleType) -> None:
    # MVTec grid 1024x1024 -> 1/4 (the paper's 256x256), patch 128.
    assert reproduce.default_geometry(1024, 1024)[:2] == (4, 128)
    # An AITEX web 4096x256 -> 1/2 (2048x128), patch 64: two tile rows, not one.
    assert reproduce.default_geometry(256, 4096)[:2] == (2, 64)
    # Small images are not down-scaled and get a patch that fits twice.
    assert reproduce.default_geometry(200, 300)[:2] == (1, 64)
