"""Streaming equals offline: Band + Tracker on any split of a web give inspect_image's regions.

This is the property that makes the daemon trustworthy (method.md, section 6): a web cut into
camera frames of any heights must yield exactly the regions the offline pipeline finds on the
whole web, with real tiny trained models (1/1 and 1/2 down-scaling) and planted defects.

The engine is wrapped in ``TileMemo``: each distinct tile is inferred once and replayed.
PyTorch's CPU convolutions (fp32 and bf16 alike) give results that differ in the last bits
with the batch size (measured: up to ~5e-8 in fp32, ~2e-5 in bf16), and the daemon's
batches fill across frames, so without the wrapper the scores would differ in the last bits
for reasons that have nothing to do with the band and tracker under test. The wrapper also
proves that the band cuts exactly the offline tiles: streaming never misses the memo.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linescan.backends import Backend
from linescan.data.synthetic import Defect, WovenWeb, plant_defects
from linescan.lines import Band, TileJob
from linescan.model.bundle import BundleMeta
from linescan.pipeline import inspect_image
from linescan.preprocess import InputSpec
from linescan.residual import halo
from linescan.segment import Region
from linescan.tiling import TileGrid
from linescan.tracker import Tracker

if TYPE_CHECKING:
    from conftest import Trained

WEB_LINES = 700
WEB_WIDTH = 256  # the training images' width: per-column statistics apply
DEFECTS = [
    Defect("hole", line=40, x=20, height=14, width=18),
    Defect("knot", line=150, x=100, height=12, width=12),
    # straddles many possible frame boundaries and the edge-aligned tile row
    Defect("broken_thread", line=260, x=60, height=90, width=3),
    Defect("stain", line=470, x=10, height=30, width=40),
    Defect("hole", line=WEB_LINES - 12, x=120, height=12, width=16),  # at the very end
]

PROPERTY = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class TileMemo:
    """A batch-invariant backend: every distinct tile is inferred once, then replayed."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = f"memo({inner.name})"
        self.precision = inner.precision
        self.cache: dict[bytes, npt.NDArray[np.float32]] = {}
        self.misses = 0

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        keys = [tile.tobytes() for tile in batch]
        new = {k: i for i, k in enumerate(keys) if k not in self.cache}
        if new:
            recon = self.inner.infer(batch[list(new.values())])
            for k, r in zip(new, recon, strict=True):
                self.cache[k] = r
            self.misses += len(new)
        return np.stack([self.cache[k] for k in keys])

    def close(self) -> None:
        self.inner.close()


def _web(seed: int = 3) -> npt.NDArray[np.uint8]:
    lines = WovenWeb(WEB_WIDTH, seed).lines(0, WEB_LINES)
    plant_defects(lines, 0, DEFECTS)
    return lines


def _key(r: Region) -> tuple[int, int, int, int]:
    return (r.line_start, r.x_start, r.line_end, r.x_end)


def _stream(
    web: npt.NDArray[np.uint8], heights: list[int], meta: BundleMeta, backend: Backend
) -> tuple[list[Region], Tracker, Band]:
    if meta.threshold is None:
        raise AssertionError("the test model needs a threshold")
    grid = TileGrid(meta.patch, meta.stride)
    band = Band(0, meta.input, grid, web.shape[1])
    tracker = Tracker(
        segment=0,
        spec=meta.input,
        grid=grid,
        width=band.width,
        raw_width=web.shape[1],
        channels=meta.channels,
        residual=meta.residual,
        ssim=meta.ssim,
        threshold=meta.threshold,
        vae_sigma=meta.vae_sigma,
        scoring=meta.scoring(),
        opening=meta.opening,
    )

    def feed(jobs: list[TileJob]) -> list[Region]:
        out: list[Region] = []
        for job in jobs:
            out += tracker.consume(job, None if job.tiles is None else backend.infer(job.tiles))
        return out

    got: list[Region] = []
    pos = 0
    for h in heights:
        got += feed(band.push(web[pos : pos + h]))
        pos += h
    assert pos == web.shape[0]
    got += feed(band.end())
    return got, tracker, band


def _split(draw: st.DrawFn, total: int) -> list[int]:
    heights: list[int] = []
    left = total
    while left > 0:
        h = min(draw(st.integers(1, 300)), left)
        heights.append(h)
        left -= h
    return heights


def _with_low_threshold(trained: Trained) -> BundleMeta:
    """The model's meta with a threshold that gives several regions on the web."""
    meta = trained.load().meta
    assert meta.threshold is not None
    return replace(meta, threshold=0.6 * meta.threshold)


@pytest.fixture(scope="module")
def web() -> npt.NDArray[np.uint8]:
    return _web()


@pytest.fixture(scope="module", params=["half", "full"], ids=["downscale2", "downscale1"])
def streaming_case(
    request: pytest.FixtureRequest,
    ssim_model: Trained,
    ssim_model_full: Trained,
    web: npt.NDArray[np.uint8],
) -> tuple[BundleMeta, TileMemo, list[Region]]:
    trained = ssim_model if request.param == "half" else ssim_model_full
    meta = _with_low_threshold(trained)
    backend = TileMemo(trained.backend())
    offline = inspect_image(web, meta, backend).regions
    return meta, backend, offline


def test_offline_oracle_is_not_vacuous(
    streaming_case: tuple[BundleMeta, TileMemo, list[Region]],
) -> None:
    """The offline regions on the test web include several regions, planted defects among them."""
    meta, _, offline = streaming_case
    assert len(offline) >= 3
    hit = [
        d
        for d in DEFECTS
        if any(
            r.line_start < d.line_end
            and d.line < r.line_end
            and r.x_start < d.x_end
            and d.x < r.x_end
            for r in offline
        )
    ]
    assert len(hit) >= 3, (meta.input, offline)


@PROPERTY
@given(data=st.data())
def test_stream_equals_offline_for_any_frame_split(
    streaming_case: tuple[BundleMeta, TileMemo, list[Region]],
    web: npt.NDArray[np.uint8],
    data: st.DataObject,
) -> None:
    """For any split of the web into frames of 1..300 lines, the streamed regions equal
    inspect_image's regions on the whole web, field for field (scores included)."""
    meta, backend, offline = streaming_case
    heights = _split(data.draw, WEB_LINES)
    misses = backend.misses
    got, tracker, _ = _stream(web, heights, meta, backend)
    assert tracker.ended
    assert backend.misses == misses, "the band cut a tile the offline pipeline did not"
    assert sorted(got, key=_key) == sorted(offline, key=_key)
    assert len(got) == len(set(got)), "a region was reported twice"


def test_stream_equals_offline_with_a_dense_grid(ssim_model: Trained) -> None:
    """With a stride far below the patch (many overlaps) and single-line frames mixed with big
    ones, streaming still equals offline."""
    web = _web(seed=11)[:333]
    meta = replace(_with_low_threshold(ssim_model), stride=7)
    backend = TileMemo(ssim_model.backend())
    offline = inspect_image(web, meta, backend).regions
    assert offline
    rng = np.random.default_rng(5)
    heights: list[int] = []
    while sum(heights) < len(web):
        heights.append(int(rng.choice([1, 1, 2, 3, 57, 120])))
    heights[-1] -= sum(heights) - len(web)
    got, _, _ = _stream(web, heights, meta, backend)
    assert sorted(got, key=_key) == sorted(offline, key=_key)


def test_web_narrower_than_a_tile_is_refused_at_band_creation() -> None:
    """A web narrower than one tile at the model's scale raises ValueError at Band creation."""
    grid = TileGrid(32, 30)
    with pytest.raises(ValueError, match="shorter than one 32-pixel tile"):
        Band(0, InputSpec(downscale=2), grid, raw_width=62)  # 31 model columns
    Band(0, InputSpec(downscale=2), grid, raw_width=63)  # 32: fits (last column repeated)


def test_band_refuses_a_fixed_resize_model() -> None:
    """A model with a fixed resize cannot stream: the band says so."""
    with pytest.raises(ValueError, match="resize"):
        Band(0, InputSpec(resize=(64, 64)), TileGrid(32, 30), raw_width=200)


def test_tracker_memory_stays_bounded(ssim_model: Trained) -> None:
    """On a long defect-free web the tracker's and band's row buffers never exceed one tile
    plus one stride plus the residual halo on both sides, however long the web runs."""
    meta = ssim_model.load().meta
    assert meta.threshold is not None
    backend = ssim_model.backend()
    web = WovenWeb(WEB_WIDTH, seed=21).lines(0, 3000)  # defect-free
    grid = TileGrid(meta.patch, meta.stride)
    band = Band(0, meta.input, grid, WEB_WIDTH)
    tracker = Tracker(
        segment=0,
        spec=meta.input,
        grid=grid,
        width=band.width,
        raw_width=WEB_WIDTH,
        channels=1,
        residual=meta.residual,
        ssim=meta.ssim,
        threshold=meta.threshold * 1.5,
        scoring=meta.scoring(),
        opening=meta.opening,
    )
    # Input rows wait until the residual halo below them is final, and rows become final one
    # stride at a time (when the next tile row arrives): patch + stride + 2 * halo at most.
    bound = meta.patch + meta.stride + 2 * halo(meta.residual, meta.ssim)
    rng = np.random.default_rng(0)
    pos = 0
    worst: list[int] = []
    regions: list[Region] = []
    while pos < len(web):
        h = int(rng.integers(1, 40))
        for job in band.push(web[pos : pos + h]):
            tiles = None if job.tiles is None else backend.infer(job.tiles)
            regions += tracker.consume(job, tiles)
        pos += h
        sizes = [
            tracker.x.data.shape[0],
            tracker.acc.data.shape[1],
            tracker.cnt.data.shape[0],
            tracker.res.data.shape[0],
            tracker.mask.data.shape[0],
            band._rows.shape[0],
        ]
        worst.append(max(sizes))
    assert regions == []
    assert tracker.recon_final > 1400  # it really went down the web
    assert max(worst) <= bound, max(worst)
    half = len(worst) // 2
    assert max(worst[half:]) <= max(worst[:half])  # no growth with the web's length


@pytest.fixture(scope="module")
def edged_case(
    edged_model: Trained,
) -> tuple[BundleMeta, TileMemo, list[Region], npt.NDArray[np.uint8]]:
    """A wandering web with a backlight beyond its edge and planted defects (some at the edge),
    the edged model at 0.6 of its threshold (so that its edge zone, its columns and its first
    and last rows all raise regions), and the offline regions."""
    from conftest import EDGED_TEST_LINE, EDGED_WEB

    from linescan.data.synthetic import EdgedWeb

    web_def = EdgedWeb(**EDGED_WEB)  # type: ignore[arg-type]
    web = web_def.lines(EDGED_TEST_LINE, 900)
    plant_defects(
        web,
        0,
        [
            Defect("hole", 100, web_def.edge_at(EDGED_TEST_LINE + 100) - 4, 12, 12),
            Defect("knot", 400, 250, 12, 12),
            Defect("broken_thread", 600, 150, 90, 4),
        ],
    )
    meta = _with_low_threshold(edged_model)
    assert meta.score is not None
    assert meta.score.edges is not None
    assert meta.scoring().per_column(meta.input.model_shape(1, web.shape[1])[1])
    backend = TileMemo(edged_model.backend())
    offline = inspect_image(web, meta, backend).regions
    assert len(offline) >= 4
    return meta, backend, offline, web


@PROPERTY
@given(data=st.data())
def test_stream_equals_offline_with_edges_columns_and_rows(
    edged_case: tuple[BundleMeta, TileMemo, list[Region], npt.NDArray[np.uint8]],
    data: st.DataObject,
) -> None:
    """With every layer of the score at work (per-column statistics, the tracked edge and its
    zone, the segment's first and last rows), any split of the web into frames gives the
    offline regions exactly, scores included."""
    meta, backend, offline, web = edged_case
    heights = _split(data.draw, web.shape[0])
    got, tracker, _ = _stream(web, heights, meta, backend)
    assert tracker.ended
    assert sorted(got, key=_key) == sorted(offline, key=_key)
