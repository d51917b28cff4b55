"""The web's edges (linescan.web), the score (linescan.score) and counting detections
(linescan.detection): units with known answers, and a trained model of a wandering web."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linescan.backends.torch_cpu import TorchBackend
from linescan.data.synthetic import Defect, EdgedWeb, WovenWeb, plant_defects
from linescan.detection import Counts, budget_threshold
from linescan.errors import ModelError
from linescan.model.bundle import load_bundle
from linescan.pipeline import Settings, inspect_image, reconstruct
from linescan.preprocess import InputSpec
from linescan.score import ScoreModel, Scoring, Stats, learn_score, score_from_bytes, score_to_bytes
from linescan.web import EdgeTracker, learn_edges

if TYPE_CHECKING:
    from conftest import Trained

from conftest import EDGED_TEST_LINE, EDGED_WEB

F32 = npt.NDArray[np.float32]
HALF = InputSpec(downscale=2)


def _model_rows(web: EdgedWeb | WovenWeb, start: int, count: int) -> F32:
    return HALF.to_model(web.lines(start, count))


# --------------------------------------------------------------------------- edges


def test_edges_are_learned_where_the_web_ends_and_nowhere_else() -> None:
    """A web with a backlight on its left has a left edge, found where it is; a web that
    fills the view has none (every column is web)."""
    web = EdgedWeb(384, 1, 80, wander=6.0)
    model = learn_edges([_model_rows(web, k * 256, 256) for k in range(6)])
    assert model is not None
    assert model.sides == ("left",)
    lo, hi = model.seen["left"]
    # the edge at 80 +- 6 camera px is 40 +- 3 model px, then a 1.5-px selvage
    assert 37 <= lo <= hi <= 46
    plain = WovenWeb(384, 1)
    assert learn_edges([_model_rows(plain, k * 256, 256) for k in range(6)]) is None


def test_the_tracker_follows_a_web_that_moves_sideways() -> None:
    """A 40-px step of the web is followed within a few blocks; a dark spot at the edge does
    not pull the edge along (the edge is a median of recent blocks)."""
    train = EdgedWeb(384, 1, 80, wander=6.0)
    model = learn_edges([_model_rows(train, k * 256, 256) for k in range(6)])
    assert model is not None
    moving = EdgedWeb(384, 1, 80, wander=0.0, steps=[(1000, 40)], ramp=1)
    rows = _model_rows(moving, 0, 2000)
    tr = EdgeTracker(model, rows.shape[1])
    tr.push(rows)
    tr.finish()
    runs = tr.edges_for(0, rows.shape[0])
    before = [e.left for a, _, e in runs if a < 450]
    after = [e.left for a, _, e in runs if a >= 560]
    assert set(before) <= {40, 41}
    assert set(after) <= {60, 61}
    # a 12-line bite out of the edge changes no block's edge
    bitten = moving.lines(0, 2000)
    plant_defects(bitten, 0, [Defect("hole", 300, 76, 12, 14)])
    tr2 = EdgeTracker(model, rows.shape[1])
    tr2.push(HALF.to_model(bitten))
    tr2.finish()
    assert [e for *_, e in tr2.edges_for(0, rows.shape[0])] == [e for *_, e in runs]


@settings(max_examples=20, deadline=None)
@given(cuts=st.lists(st.integers(1, 120), min_size=1, max_size=30))
def test_edges_do_not_depend_on_how_the_rows_arrive(cuts: list[int]) -> None:
    """The edges of every block are the same for any split of the rows into pushes."""
    train = EdgedWeb(256, 2, 60, wander=10.0, period=700)
    model = learn_edges([_model_rows(train, k * 128, 128) for k in range(6)])
    assert model is not None
    rows = _model_rows(train, 5000, 700)
    whole = EdgeTracker(model, rows.shape[1])
    whole.push(rows)
    whole.finish()
    parts = EdgeTracker(model, rows.shape[1])
    pos = 0
    for c in cuts:
        parts.push(rows[pos : pos + c])
        pos += c
    parts.push(rows[pos:])
    parts.finish()
    assert parts.edges_for(0, rows.shape[0]) == whole.edges_for(0, rows.shape[0])


def test_fixed_columns_replace_detection() -> None:
    """Configured web columns are the edges of every block; no detection happens."""
    tr = EdgeTracker(None, 100, fixed=(10, 90))
    tr.push(np.zeros((40, 100), np.float32))
    assert tr.active
    assert [(a, b, e.left, e.right) for a, b, e in tr.edges_for(0, 40)] == [(0, 40, 10, 90)]


# --------------------------------------------------------------------------- score


def _toy_model(width: int = 8) -> ScoreModel:
    center = np.linspace(0.1, 0.2, width).astype(np.float32)
    scale = np.full(width, 0.05, np.float32)
    return ScoreModel(
        width=width,
        columns={"dssim": Stats(center, scale), "absdiff": Stats(center * 0.5, scale * 2)},
        whole={"dssim": (0.15, 0.2), "absdiff": (0.07, 0.17)},
    )


def test_the_score_is_the_residual_normalised_by_its_column() -> None:
    """Per column: (residual - centre) / spread; ``combined`` takes the larger component."""
    m = _toy_model()
    r = np.full((3, 8), 0.3, np.float32)
    a = np.full((3, 8), 0.1, np.float32)
    ssim = Scoring("ssim", m).score({"dssim": r}, [(0, 3, _no_edges())], 0, 3)
    want = (0.3 - m.columns["dssim"].center) / m.columns["dssim"].scale
    np.testing.assert_allclose(ssim[1], want, rtol=1e-6)
    comb = Scoring("combined", m).score({"dssim": r, "absdiff": a}, [(0, 3, _no_edges())], 0, 3)
    other = (0.1 - m.columns["absdiff"].center) / m.columns["absdiff"].scale
    np.testing.assert_allclose(comb[1], np.maximum(want, other), rtol=1e-6)


def _no_edges():  # type: ignore[no-untyped-def]
    from linescan.web import NO_EDGES

    return NO_EDGES


def test_another_width_falls_back_to_whole_image_statistics_and_says_so() -> None:
    m = _toy_model(width=64)
    sc = Scoring("ssim", m)
    assert "per-column" in sc.describe(64)
    text = sc.describe(100)
    assert "whole-image statistics" in text
    assert "differs from the training width 64" in text
    r = np.full((2, 100), 0.35, np.float32)
    out = sc.score({"dssim": r}, [(0, 2, _no_edges())], 0, 2)
    assert out[0, 50] == pytest.approx((0.35 - 0.15) / 0.05)


def test_statistics_round_trip_and_refuse_damage() -> None:
    """The statistics survive ``score.npz`` bit for bit; a malformed record is refused."""
    m = _toy_model()
    data = score_to_bytes(m)
    again = score_from_bytes(data, m.to_json(), "test")
    np.testing.assert_array_equal(again.columns["dssim"].center, m.columns["dssim"].center)
    bad = m.to_json() | {"width": 9}
    with pytest.raises(ModelError, match="expected"):
        score_from_bytes(data, bad, "test")
    with pytest.raises(ModelError, match="unreadable"):
        score_from_bytes(b"not a zip", m.to_json(), "test")


def test_a_corrupt_statistics_file_is_refused_with_a_message(
    edged_model: Trained, tmp_path: Path
) -> None:
    dst = tmp_path / "b"
    shutil.copytree(edged_model.path, dst)
    (dst / "score.npz").write_bytes((dst / "score.npz").read_bytes()[:-10])
    with pytest.raises(ModelError, match=r"score\.npz does not match the checksum"):
        load_bundle(dst)
    (dst / "score.npz").unlink()
    with pytest.raises(ModelError, match=r"score\.npz is missing"):
        load_bundle(dst)


def test_the_combined_residual_needs_statistics() -> None:
    with pytest.raises(ModelError, match="needs score statistics"):
        Scoring("combined", None)


def test_segment_end_rows_are_never_scored_higher(edged_model: Trained) -> None:
    """The rows layer only ever lowers a score (centre >= 0, spread >= 1)."""
    m = edged_model.load().meta.score
    assert m is not None
    assert m.rows
    for st_ in m.rows.values():
        assert (st_.center >= 0).all()
        assert (st_.scale >= 1).all()


# --------------------------------------------------------------------------- detection


def test_an_exponential_tail_is_extrapolated_to_the_budget() -> None:
    """Alarms that fall as 1000 * exp(-4 t) on 10 Mpx: a budget of 0.01 per Mpx (0.1 alarms
    on these images, below what they can show) lands where the tail says, t = ln(1e4) / 4;
    a budget they can show (5 per Mpx) is counted, not extrapolated."""
    ts = np.linspace(0.0, 3.0, 61)
    alarms = np.floor(1000 * np.exp(-4 * ts))
    c = Counts(ts, alarms, np.minimum(alarms, 10), 10, 10.0, np.zeros(61), 0, np.zeros(61), 0, {})
    got = budget_threshold(c, 0.01)
    assert got.extrapolated
    assert got.threshold == pytest.approx(math.log(1e4) / 4, rel=0.05)
    counted = budget_threshold(c, 5.0)
    assert not counted.extrapolated
    assert alarms[list(ts).index(counted.threshold)] <= 50
    assert alarms[list(ts).index(counted.threshold) - 1] > 50


# --------------------------------------------------------------------------- a trained web


def test_a_trained_web_model_tracks_its_edge(edged_model: Trained) -> None:
    """Training found the web's left edge; calibration stored a budget threshold."""
    meta = edged_model.load().meta
    assert meta.score is not None
    assert meta.score.edges is not None
    assert meta.score.edges.sides == ("left",)
    assert meta.calibration is not None
    assert meta.calibration["rule"] == "budget"
    assert meta.calibration["cross_fitted_folds"] == 4


def test_a_web_moving_sideways_raises_no_alarm(edged_model: Trained) -> None:
    """The web sweeps 32 px sideways and back; no alarm, while scoring the same web against
    fixed columns (no edge tracking) would alarm where the edge wandered."""
    b = edged_model.load()
    backend = TorchBackend(b, precision="fp32")
    web = EdgedWeb(**EDGED_WEB).lines(EDGED_TEST_LINE, 1600)  # type: ignore[arg-type]
    assert inspect_image(web, b.meta, backend).regions == []
    assert b.meta.score is not None
    untracked = replace(b.meta, score=replace(b.meta.score, edges=None, zones={}))
    assert inspect_image(web, untracked, backend).regions != []


def test_a_spot_at_the_web_edge_is_found(edged_model: Trained) -> None:
    """A dark spot bitten out of the edge (half on the selvage, half on the weave) and a thin
    scratch just inside it are found; nothing else is reported."""
    b = edged_model.load()
    backend = TorchBackend(b, precision="fp32")
    web_def = EdgedWeb(**EDGED_WEB)  # type: ignore[arg-type]
    web = web_def.lines(EDGED_TEST_LINE, 800)
    spot = Defect("hole", 300, web_def.edge_at(EDGED_TEST_LINE + 300) - 3, 12, 12)
    scratch = Defect("broken_thread", 550, web_def.edge_at(EDGED_TEST_LINE + 550) + 10, 60, 4)
    plant_defects(web, 0, [spot, scratch])
    regions = inspect_image(web, b.meta, backend).regions
    for d in (spot, scratch):
        assert any(
            r.line_start < d.line_end
            and d.line < r.line_end
            and r.x_start < d.x_end
            and d.x < r.x_end
            for r in regions
        ), (d, regions)
    assert len(regions) == 2, regions


def test_learn_score_refuses_nothing_to_learn() -> None:
    with pytest.raises(ValueError, match="at least one"):
        learn_score([], [])


def test_reconstruct_scores_off_the_web_as_zero(edged_model: Trained) -> None:
    """Beyond the web (and its edge zone) the score is 0, whatever the residual there."""
    b = edged_model.load()
    web = EdgedWeb(**EDGED_WEB).lines(EDGED_TEST_LINE, 256)  # type: ignore[arg-type]
    rec = reconstruct(web, b.meta, TorchBackend(b, "fp32"), Settings())
    left = min(e.left for *_, e in rec.edges if e.left is not None)
    assert left > 20
    assert (rec.score[:, : left - 8] == 0).all()
    assert (rec.residual[:, : left - 8] > 0).any()


def test_fixed_web_columns_score_nothing_outside_them(edged_model: Trained) -> None:
    """With [inspection] web columns configured, every pixel outside them scores 0 and the
    edges are the configured ones."""
    b = edged_model.load()
    web = EdgedWeb(**EDGED_WEB).lines(EDGED_TEST_LINE, 256)  # type: ignore[arg-type]
    rec = reconstruct(web, b.meta, TorchBackend(b, "fp32"), Settings(web_columns=(120, 360)))
    assert {(e.left, e.right) for *_, e in rec.edges} == {(60, 180)}
    assert (rec.score[:, :60] == 0).all()
    assert (rec.score[:, 180:] == 0).all()
    assert (rec.score[:, 60:180] != 0).any()
