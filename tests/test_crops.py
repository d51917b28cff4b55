"""Tests for linescan.crops: the rings of recent lines and scores, and the crop around a region."""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt
import pytest

from linescan.config import PicturesConfig
from linescan.crops import Cropper, RecordingScoring, RowRing, display_scores
from linescan.preprocess import InputSpec
from linescan.score import Scoring
from linescan.segment import Region
from linescan.web import Edges

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


def blocks_of(
    image: npt.NDArray[np.generic], cuts: list[int], first: int = 0
) -> list[tuple[int, npt.NDArray[np.generic]]]:
    edges = [0, *cuts, len(image)]
    return [(first + a, image[a:b]) for a, b in itertools.pairwise(edges) if b > a]


# --------------------------------------------------------------------------- the ring


def test_a_ring_cut_equals_slicing_the_whole_stream() -> None:
    """Rows and columns cut across block boundaries, thinned by any step, equal a slice of the
    stream with the same step counted from the window's corner."""
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 255, (500, 40), dtype=np.uint8)
    for trial in range(20):
        cuts = sorted(rng.choice(np.arange(1, 500), size=rng.integers(0, 12), replace=False))
        ring = RowRing(10_000)
        for first, rows in blocks_of(stream, [int(c) for c in cuts], first=1000):
            ring.add(first, rows)
        a, b = sorted(int(v) for v in rng.integers(1000, 1500, 2))
        c, d = sorted(int(v) for v in rng.integers(0, 40, 2))
        step = int(rng.integers(1, 6))
        got = ring.cut(a, b + 1, c, d + 1, step)
        want = stream[a - 1000 : b + 1 - 1000 : step, c : d + 1 : step]
        assert got is not None, trial
        np.testing.assert_array_equal(got, want)


def test_a_ring_keeps_at_least_its_rows_and_at_most_one_block_more() -> None:
    """Old blocks leave once the newer ones hold max_rows; the ring never shrinks below it."""
    ring = RowRing(300)
    for k in range(10):
        ring.add(k * 100, np.full((100, 8), k, np.uint8))
        held = ring.end - ring.start
        assert min(300, (k + 1) * 100) <= held <= 400
    assert ring.end == 1000
    assert ring.cut(0, 100, 0, 8) is None  # long gone
    got = ring.cut(950, 1000, 0, 8)
    assert got is not None
    assert (got == 9).all()


def test_a_break_in_the_stream_starts_the_ring_afresh() -> None:
    """A block that does not continue the last (a gap in the web) drops what was held."""
    ring = RowRing(1000)
    ring.add(0, np.zeros((100, 4), np.uint8))
    ring.add(150, np.ones((50, 4), np.uint8))
    assert (ring.start, ring.end) == (150, 200)
    assert ring.cut(0, 100, 0, 4) is None


def test_the_ring_holds_references_not_copies() -> None:
    """Frames are read-only views of the received messages: the ring adds no copy of them."""
    frame = np.arange(64, dtype=np.uint8).reshape(8, 8)
    frame.flags.writeable = False
    ring = RowRing(100)
    ring.add(0, frame)
    assert ring.nbytes == frame.nbytes
    assert np.shares_memory(ring._blocks[0][1], frame)


# --------------------------------------------------------------------------- scores


def test_display_scores_put_the_threshold_mid_scale() -> None:
    """0 -> 0, threshold -> 128, twice the threshold and above -> 255; off-web, negative and
    NaN scores -> 0."""
    t = 0.5
    got = display_scores(np.array([[0.0, 0.5, 1.0, 7.0, -3.0, np.nan]], np.float32), t)
    assert got.tolist() == [[0, 128, 255, 255, 0, 0]]


def test_recording_scoring_scores_as_the_bundle_and_tells_every_block() -> None:
    """The wrapper returns exactly the wrapped scoring's rows and hands each block to its sink."""
    base = Scoring("l2")
    seen: list[tuple[int, F32]] = []
    rec = RecordingScoring.wrap(base, lambda row0, rows: seen.append((row0, rows)))
    comps = {"sqdiff": np.random.default_rng(1).random((6, 10), dtype=np.float32)}
    runs = [(20, 26, Edges(None, None))]
    out = rec.score(comps, runs, 20, None)
    np.testing.assert_array_equal(out, base.score(comps, runs, 20, None))
    assert [r for r, _ in seen] == [20]
    assert seen[0][1] is out
    assert rec.kind == base.kind
    assert rec.describe(10) == base.describe(10)


# --------------------------------------------------------------------------- crops


def web_with_square(lines: int, width: int, box: tuple[int, int, int, int]) -> U8:
    rng = np.random.default_rng(2)
    web = rng.integers(100, 140, (lines, width), dtype=np.uint8)
    a, b, c, d = box
    web[a:b, c:d] = 10
    return web


def feed(cropper: Cropper, web: U8, line0: int, frame: int, threshold: float, n: int) -> None:
    """Lines in frames, and score rows that mark the square (1 where dark, else 0), in blocks."""
    scoring = cropper.scoring("cam0", 1, line0, Scoring("l2"))
    cropper.add_lines("cam0", blocks_of(web, list(range(frame, len(web), frame)), first=line0))
    model = (web.reshape(len(web) // n, n, -1, n).mean(axis=(1, 3)) < 60).astype(np.float32)
    for row0 in range(0, len(model), 7):
        rows = model[row0 : row0 + 7] * (4 * threshold)
        scoring.score({"sqdiff": rows}, [(row0, row0 + len(rows), Edges(None, None))], row0, None)


@pytest.mark.parametrize("n", [1, 2])
def test_the_crop_shows_the_region_in_both_halves(n: int) -> None:
    """Camera pixels and score rows of the same window, the region inside with its margin."""
    spec = InputSpec(downscale=n)
    t = 0.3
    cropper = Cropper(PicturesConfig(margin_px=24), spec, t)
    box = (1000 + 300, 1000 + 330, 120, 150)
    web = web_with_square(800, 256, (300, 330, 120, 150))
    feed(cropper, web, 1000, 100, t, n)
    region = Region(box[0], box[1], box[2], box[3], 900, 1.0, 1.0)
    crop = cropper.crop("cam0", region)
    assert crop is not None
    a, b, c, d = crop.window
    if n == 1:  # the region and 24 px each way (>= 64 px square)
        assert (a, b, c, d) == (1276, 1354, 96, 174)
    assert a <= box[0] - 24
    assert b >= box[1] + 24
    assert c <= box[2] - 24
    assert d >= box[3] + 24
    assert (a - 1000) % n == 0
    assert (b - 1000) % n == 0
    assert c % n == 0
    assert d % n == 0
    assert crop.step == 1
    np.testing.assert_array_equal(crop.pixels, web[a - 1000 : b - 1000, c:d])
    assert crop.scores is not None
    assert crop.scored_lines == b - a
    assert crop.scores.shape == ((b - a) // n, (d - c) // n)
    hot = np.argwhere(crop.scores == 255)
    assert hot.min(axis=0).tolist() == [(box[0] - a) // n, (box[2] - c) // n]
    assert hot.max(axis=0).tolist() == [(box[1] - a) // n - 1, (box[3] - c) // n - 1]


def test_a_big_region_is_thinned_to_twice_the_picture_size() -> None:
    """A region larger than the picture is cut every step-th pixel: bounded copy, whole view."""
    cropper = Cropper(PicturesConfig(size_px=64, ring_lines=4096), InputSpec(), 0.3)
    web = web_with_square(3000, 1024, (100, 2600, 10, 1000))
    feed(cropper, web, 0, 256, 0.3, 1)
    crop = cropper.crop("cam0", Region(100, 2600, 10, 1000, 1, 1.0, 1.0))
    assert crop is not None
    assert crop.step > 1
    assert max(crop.pixels.shape) <= 2 * 64 + 1
    assert crop.scores is not None
    assert max(crop.scores.shape) <= 2 * 64 + 1


def test_a_crop_waits_for_the_scores_under_the_region() -> None:
    """``due`` hands a wanted crop over only once score rows reach the window's end (or the
    segment ended), so both halves show the whole window."""
    t = 0.3
    cropper = Cropper(PicturesConfig(margin_px=24), InputSpec(), t)
    web = web_with_square(600, 128, (200, 220, 50, 70))
    scoring = cropper.scoring("cam0", 1, 0, Scoring("l2"))
    cropper.add_lines("cam0", [(0, web)])
    mask = (web < 60).astype(np.float32) * (4 * t)
    scoring.score({"sqdiff": mask[:230]}, [(0, 230, Edges(None, None))], 0, None)
    cropper.want("cam0", 7, Region(200, 220, 50, 70, 400, 1.0, 1.0))
    assert cropper.due("cam0") == []  # rows 230..256 of the window are not scored yet
    scoring.score({"sqdiff": mask[230:300]}, [(230, 300, Edges(None, None))], 230, None)
    [(seq, crop)] = cropper.due("cam0")
    assert seq == 7
    assert crop is not None
    assert crop.scored_lines == crop.window[1] - crop.window[0]
    cropper.want("cam0", 8, Region(280, 290, 50, 70, 100, 1.0, 1.0))
    [(seq, crop)] = cropper.due("cam0", ended=True)  # the segment is over: what there is
    assert seq == 8
    assert crop is not None
    assert crop.scored_lines < crop.window[1] - crop.window[0]


def test_no_crop_once_the_lines_are_gone() -> None:
    """A region whose lines left the ring gets no crop (its picture is counted missing)."""
    cropper = Cropper(PicturesConfig(ring_lines=256), InputSpec(), 0.3)
    web = web_with_square(2000, 64, (10, 20, 10, 20))
    feed(cropper, web, 0, 100, 0.3, 1)
    assert cropper.crop("cam0", Region(10, 20, 10, 20, 100, 1.0, 1.0)) is None
    assert cropper.crop("cam9", Region(10, 20, 10, 20, 100, 1.0, 1.0)) is None
    assert cropper.nbytes() <= (256 + 100) * 64 * 2
