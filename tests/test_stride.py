"""``inspection.stride = "auto"``: the smallest stride this machine keeps up with.

The choice is a pure function of a measured engine speed (``choose_stride``), tested as a
property; the daemon test measures a real backend whose cost per tile is known (a flat-web
model that takes 2 ms a tile), so a faster line must give a coarser stride on any machine.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from linescan.config import Config, ConfigError, load_config
from linescan.model.bundle import BundleMeta
from linescan.preprocess import InputSpec
from linescan.service import Daemon
from linescan.stride import (
    candidate_strides,
    choose_stride,
    lines_per_s,
    measure_tiles_per_s,
    tiles_per_line,
)
from linescan.tiling import TileGrid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fuzz

Context = zmq.Context[zmq.Socket[bytes]]


def meta(patch: int = 128, stride: int = 30, downscale: int = 2) -> BundleMeta:
    return BundleMeta(
        loss="ssim",
        latent=16,
        patch=patch,
        residual="ssim",
        input=InputSpec(downscale=downscale),
        stride=stride,
        threshold=0.5,
        name="m",
        weights_sha256="0" * 64,
    )


# ----------------------------------------------------------------------------- the choice


def test_candidates_are_the_bundle_stride_and_coarser_divisors_of_the_tile() -> None:
    """Candidates: the bundle's stride, then strides that divide the tile, up to the tile."""
    assert candidate_strides(128, 30) == [30, 32, 64, 128]
    assert candidate_strides(128, 64) == [64, 128]
    assert candidate_strides(32, 16) == [16, 32]
    assert candidate_strides(128, 128) == [128]


@given(
    stride=st.integers(1, 64),
    downscale=st.sampled_from([1, 2, 4]),
    width=st.integers(64 * 4, 5000),
    rows=st.integers(2, 40),
)
@settings(max_examples=60, deadline=None, derandomize=True)
def test_tiles_per_line_counts_the_tiles_the_grid_cuts(
    stride: int, downscale: int, width: int, rows: int
) -> None:
    """tiles_per_line x camera lines = the tiles a TileGrid cuts from that many lines (the
    regular rows of a long web: one row per stride model lines)."""
    m = meta(64, stride, downscale)
    grid = TileGrid(64, stride)
    model_w = m.input.model_shape(1, width)[1]
    per_row = len(grid.positions(model_w))
    n_tiles = per_row * rows
    camera_lines = rows * stride * downscale
    assert tiles_per_line(m, stride, width) * camera_lines == pytest.approx(n_tiles)


@given(
    tiles_per_s=st.floats(10, 1e5),
    rate_a=st.floats(1, 1e6),
    rate_b=st.floats(1, 1e6),
    width=st.integers(256, 16384),
    headroom=st.floats(1, 3),
)
@settings(max_examples=200, deadline=None, derandomize=True)
def test_the_smallest_stride_that_keeps_up_and_coarser_for_faster_lines(
    tiles_per_s: float, rate_a: float, rate_b: float, width: int, headroom: float
) -> None:
    """The choice sustains headroom x the line rate, the next finer candidate does not (it is
    the smallest that does), none-keeps-up takes the coarsest, and a faster line never gets a
    finer stride."""
    m = meta()
    lo, hi = sorted((rate_a, rate_b))
    a = choose_stride(m, tiles_per_s, lo, width, headroom)
    b = choose_stride(m, tiles_per_s, hi, width, headroom)
    assert a.stride <= b.stride
    cands = candidate_strides(m.patch, m.stride)
    for c in (a, b):
        rate = lines_per_s(tiles_per_s, m, c.stride, width)
        assert c.sustainable_lines_per_s == rate
        if c.keeps_up:
            assert rate >= headroom * c.line_rate_hz
            finer = [s for s in cands if s < c.stride]
            if finer:
                assert lines_per_s(tiles_per_s, m, finer[-1], width) < headroom * c.line_rate_hz
        else:
            assert c.stride == cands[-1]
            assert all(r < headroom * c.line_rate_hz for _, r in c.sustainable)


def test_the_reference_machine_numbers() -> None:
    """The issue's arithmetic: at 1/2 scale, 4096 px (2048 model px: 65 tiles a row at stride
    30, 31 at 64), stride 30 costs 1.08 tiles a line, 64 costs 0.24; 2,000 tiles/s keeps up
    with 1,850 lines/s at 30 and 8,260 at 64."""
    m = meta()
    assert tiles_per_line(m, 30, 4096) == pytest.approx(65 / 60)
    assert tiles_per_line(m, 64, 4096) == pytest.approx(31 / 128)
    assert lines_per_s(2000.0, m, 30, 4096) == pytest.approx(1846.15, abs=0.01)
    c = choose_stride(m, 2000.0, 4000.0, 4096, 1.3)
    assert (c.stride, c.keeps_up) == (64, True)
    assert "stride 64 keeps up with 4000 lines/s" in c.describe()
    c = choose_stride(m, 2000.0, 1000.0, 4096, 1.3)
    assert c.stride == 30
    c = choose_stride(m, 2000.0, 1e6, 4096, 1.3)
    assert (c.stride, c.keeps_up) == (128, False)
    assert "frames will be dropped" in c.describe()


def test_measure_tiles_per_s_runs_whole_batches() -> None:
    """The measurement calls the engine on whole batches of the configured size and comes out
    near the known speed of a backend that sleeps 2 ms a tile."""
    sizes: list[int] = []
    slow = fuzz.flat_backend(per_tile_s=0.002)

    class Counting:
        name, precision = "counting", "fp32"

        def infer(self, batch: Any) -> Any:
            sizes.append(len(batch))
            return slow.infer(batch)

        def close(self) -> None:
            return None

    t = measure_tiles_per_s(Counting(), 32, 16, seconds=0.3)
    assert set(sizes) == {16}
    assert 250 <= t <= 500  # 500 at most; sleeping overshoots a little, a busy machine more


def test_auto_needs_the_line_rate_and_width(tmp_path: Path) -> None:
    """stride = "auto" without line_rate_hz or line_width_px is a config error naming them."""
    path = tmp_path / "c.toml"
    path.write_text('[inspection]\nstride = "auto"\nline_rate_hz = 1000.0\n')
    with pytest.raises(ConfigError, match="line_width_px"):
        load_config(path)
    path.write_text('[inspection]\nstride = "auto"\nline_rate_hz = 1000.0\nline_width_px = 2048\n')
    assert load_config(path).inspection.stride == "auto"


# ----------------------------------------------------------------------------- the daemon


@pytest.fixture(scope="module")
def context() -> Iterator[Context]:
    ctx: Context = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def run_daemon(context: Context, line_rate_hz: float) -> tuple[Daemon, list[dict[str, Any]], Any]:
    """A daemon with stride = "auto" on a backend of 2 ms a tile (about 500 tiles/s); a web
    with one defect through it; its statuses, defect events and start-up log."""
    cfg = Config.model_validate(
        {
            "frames": {"endpoint": "tcp://127.0.0.1:*"},
            "events": {"endpoint": "tcp://127.0.0.1:*", "status_interval_s": 0.1},
            "metrics": {"enabled": False},
            "inspection": {
                "stride": "auto",
                "line_rate_hz": line_rate_hz,
                "line_width_px": 128,
                "max_batch": 16,
                "max_wait_ms": 5.0,
            },
            "queues": {"overload": "block"},
        }
    )
    events: list[dict[str, Any]] = []
    d = Daemon(
        cfg,
        fuzz.flat_meta(),
        fuzz.flat_backend(per_tile_s=0.002),
        CollectorRegistry(),
        context,
        on_event=lambda t, b: events.append({"topic": t, **b}),
    )
    with capture_logs() as logs:
        d.start()
    try:
        planner = fuzz.Planner(random.Random(0), 128, fuzz.PATCH, "cam0")
        frames = [planner.valid(defect=i == 3) for i in range(8)] + [planner.valid(end=True)]
        fuzz.send(d.frames_endpoint, frames, context)
        deadline = time.monotonic() + 30
        while d.totals.frames_inspected < len(frames) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        d.stop()
        assert d.join(30)
    return d, events, logs


def test_a_faster_line_gets_a_coarser_stride(context: Context) -> None:
    """The flat model (32-px tiles, bundle stride 16) measured at start: a 100 lines/s line
    keeps the bundle's stride 16; a 1,500 lines/s line gets stride 32 (at stride 16 it would
    need about 850 tiles/s with its headroom, more than this engine's 500 at best; stride 32
    needs 250). The choice is in the log, the status messages and the metrics, and the daemon
    inspects at it (the defect is found)."""
    slow, slow_events, slow_logs = run_daemon(context, 100.0)
    fast, fast_events, fast_logs = run_daemon(context, 1500.0)
    assert slow.grid.stride == 16
    assert fast.grid.stride == 32
    for d, events, logs, stride in (
        (slow, slow_events, slow_logs, 16),
        (fast, fast_events, fast_logs, 32),
    ):
        chosen = [r for r in logs if r["event"] == "stride chosen"]
        assert len(chosen) == 1
        assert chosen[0]["stride"] == stride
        assert chosen[0]["keeps_up"] is True
        statuses = [e for e in events if e["topic"] == "status"]
        assert statuses
        for s in statuses:
            assert s["inspection"]["stride"] == stride
            assert s["inspection"]["auto"] is True
            assert s["inspection"]["line_rate_hz"] in (100.0, 1500.0)
        assert d.registry.get_sample_value("linescan_stride_px") == stride
        tps = d.registry.get_sample_value("linescan_engine_tiles_per_second")
        assert tps is not None
        assert 100 < tps <= 500
        assert [e for e in events if e["topic"] == "defect"], "the planted defect was not found"
        assert statuses[-1]["frames_inspected"] == 9
    assert any(r["event"].startswith("stride differs") for r in fast_logs)
    assert not any(r["event"].startswith("stride differs") for r in slow_logs)


def test_a_fixed_stride_is_reported_too(context: Context) -> None:
    """Without "auto" the status and the metric still say which stride is in use."""
    cfg = Config.model_validate(
        {
            "frames": {"endpoint": "tcp://127.0.0.1:*"},
            "events": {"endpoint": "tcp://127.0.0.1:*"},
            "metrics": {"enabled": False},
            "inspection": {"stride": 32},
        }
    )
    d = Daemon(cfg, fuzz.flat_meta(), fuzz.flat_backend(), CollectorRegistry(), context)
    d.start()
    d.stop()
    assert d.join(30)
    assert d.inspection_status() == {"stride": 32, "auto": False}
    assert d.registry.get_sample_value("linescan_stride_px") == 32
