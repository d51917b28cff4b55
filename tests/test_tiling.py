"""Tests of linescan.tiling: the fixed tile grid and overlap-averaged stitching."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linescan.tiling import TileGrid, accumulate, cut_tiles, stitch

PROPERTY = settings(max_examples=200, deadline=None)


@st.composite
def grids(draw: st.DrawFn) -> tuple[TileGrid, int]:
    tile = draw(st.integers(1, 160))
    stride = draw(st.integers(1, tile))
    length = draw(st.integers(tile, 1200))
    return TileGrid(tile, stride), length


@PROPERTY
@given(grids())
def test_positions_are_regular_then_edge_aligned_and_cover_everything(
    case: tuple[TileGrid, int],
) -> None:
    """Tiles start at 0, stride, 2*stride, ...; the last one ends exactly at the edge; together
    they cover every pixel and no tile leaves the axis."""
    grid, length = case
    pos = grid.positions(length)
    assert pos[0] == 0
    assert pos[-1] == length - grid.tile
    assert all(0 <= p <= length - grid.tile for p in pos)
    assert pos == sorted(set(pos))  # strictly increasing, no duplicate tile
    regular = pos[:-1] if len(pos) > 1 and pos[-1] % grid.stride else pos
    assert regular == [k * grid.stride for k in range(len(regular))]
    gaps = np.diff(pos)
    assert np.all(gaps <= grid.stride)  # so no pixel is skipped
    covered = np.zeros(length, bool)
    for p in pos:
        covered[p : p + grid.tile] = True
    assert covered.all()


@PROPERTY
@given(grids())
def test_positions_are_exactly_the_needed_ones(case: tuple[TileGrid, int]) -> None:
    """There is one more tile than the regular ones only when the regular ones miss the edge."""
    grid, length = case
    n_regular = (length - grid.tile) // grid.stride + 1
    pos = grid.positions(length)
    fits = (length - grid.tile) % grid.stride == 0
    assert len(pos) == n_regular + (0 if fits else 1)


def test_positions_for_the_paper_grid() -> None:
    """128-px tiles with stride 30 over 256 px: 0, 30, 60, 90, 120 and the edge tile at 128."""
    assert TileGrid(128, 30).positions(256) == [0, 30, 60, 90, 120, 128]
    assert TileGrid(128, 30).positions(128) == [0]
    assert TileGrid(128, 128).positions(384) == [0, 128, 256]


def test_axis_shorter_than_a_tile_raises() -> None:
    """An axis shorter than one tile is a ValueError naming both sizes."""
    with pytest.raises(ValueError, match=r"31 pixels is shorter than one 32-pixel tile"):
        TileGrid(32, 30).positions(31)


@pytest.mark.parametrize(("tile", "stride"), [(0, 1), (32, 0), (32, 33), (-1, 1)])
def test_invalid_grids_raise(tile: int, stride: int) -> None:
    """A tile below 1 or a stride outside 1..tile is refused."""
    with pytest.raises(ValueError, match=r"tile|stride"):
        TileGrid(tile, stride)


def test_coords_are_row_major() -> None:
    """coords lists every (y, x), rows top to bottom, tiles left to right."""
    grid = TileGrid(4, 3)
    ys, xs = grid.positions(9), grid.positions(7)
    assert ys == [0, 3, 5]
    assert xs == [0, 3]
    assert grid.coords(9, 7) == [(y, x) for y in ys for x in xs]


def test_regular_rows_upto() -> None:
    """Regular rows whose tiles lie entirely within the lines seen so far."""
    grid = TileGrid(10, 4)
    assert grid.regular_rows_upto(9) == []
    assert grid.regular_rows_upto(10) == [0]
    assert grid.regular_rows_upto(21) == [0, 4, 8]


def test_cut_tiles_takes_the_right_pixels() -> None:
    """cut_tiles returns (n, 1, t, t) windows at the grid positions, row-major."""
    img = np.arange(10 * 12, dtype=np.float32).reshape(10, 12)
    tiles = cut_tiles(img, [0, 6], [0, 5, 8], 4)
    assert tiles.shape == (6, 1, 4, 4)
    assert tiles.dtype == np.float32
    np.testing.assert_array_equal(tiles[4, 0], img[6:10, 5:9])
    np.testing.assert_array_equal(tiles[2, 0], img[0:4, 8:12])


@PROPERTY
@given(
    h=st.integers(8, 90),
    w=st.integers(8, 90),
    tile=st.integers(1, 8),
    stride_frac=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_stitching_identical_tiles_reproduces_the_image(
    h: int, w: int, tile: int, stride_frac: float, seed: int
) -> None:
    """Cutting an image into tiles and stitching them back gives the image: exactly for values
    whose sums are exact in float32 (multiples of 1/256), to within float32 rounding of the
    overlap average for any values."""
    stride = max(1, round(tile * stride_frac))
    grid = TileGrid(tile, stride)
    ys, xs = grid.positions(h), grid.positions(w)
    rng = np.random.default_rng(seed)
    dyadic = (rng.integers(0, 257, (h, w)) / 256.0).astype(np.float32)
    out = stitch(cut_tiles(dyadic, ys, xs, tile), ys, xs, h, w)
    assert out.shape == (1, h, w)
    np.testing.assert_array_equal(out[0], dyadic)
    anything = rng.random((h, w)).astype(np.float32)
    out = stitch(cut_tiles(anything, ys, xs, tile), ys, xs, h, w)
    # k overlapping copies summed in float32: at most ~k/2 ulp off (k <= 64 here)
    np.testing.assert_allclose(out[0], anything, rtol=2e-6 * tile * tile, atol=0)


def test_stitch_averages_overlaps() -> None:
    """Where tiles overlap, the stitched value is the mean of the tiles covering the pixel."""
    ys, xs = [0, 2], [0]
    recon = np.stack([np.full((1, 4, 4), 1.0), np.full((1, 4, 4), 3.0)]).astype(np.float32)
    out = stitch(recon, ys, xs, 6, 4)[0]
    np.testing.assert_array_equal(out[:2], 1.0)
    np.testing.assert_array_equal(out[2:4], 2.0)
    np.testing.assert_array_equal(out[4:], 3.0)


def test_stitch_keeps_channels() -> None:
    """Multi-channel reconstructions (the VAE's N decodes) are stitched channel by channel."""
    ys, xs = [0, 4], [0, 4]
    recon = np.zeros((4, 3, 8, 8), np.float32)
    for c in range(3):
        recon[:, c] = c
    out = stitch(recon, ys, xs, 12, 12)
    assert out.shape == (3, 12, 12)
    for c in range(3):
        np.testing.assert_array_equal(out[c], c)


def test_stitch_refuses_tiles_that_do_not_cover_the_image() -> None:
    """Stitching tiles that leave pixels uncovered is an error, not a division by zero."""
    recon = np.ones((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="do not cover"):
        stitch(recon, [0], [0], 5, 4)


def test_accumulate_with_origin_equals_the_whole_image() -> None:
    """Accumulating tile rows into a band that starts at a later row (y_origin) gives the
    same sums as accumulating into the whole image."""
    rng = np.random.default_rng(0)
    grid = TileGrid(6, 4)
    ys, xs = grid.positions(20), grid.positions(10)
    recon = rng.random((len(ys) * len(xs), 1, 6, 6)).astype(np.float32)
    acc = np.zeros((1, 20, 10), np.float32)
    cnt = np.zeros((20, 10), np.float32)
    accumulate(acc, cnt, recon, ys, xs)
    assert ys == [0, 4, 8, 12, 14]
    # a band holding rows 8..19 gets the tile rows from 8 on; rows 10.. are touched by no
    # earlier tile (those at 0 and 4 end at row 9), so they must equal the whole image's
    band = np.zeros((1, 12, 10), np.float32)
    band_cnt = np.zeros((12, 10), np.float32)
    accumulate(band, band_cnt, recon[2 * len(xs) :], ys[2:], xs, y_origin=8)
    np.testing.assert_array_equal(band[:, 2:], acc[:, 10:])
    np.testing.assert_array_equal(band_cnt[2:], cnt[10:])
    # rows 8, 9: only the tile row at 8 (so the column overlaps of one row: xs = 0, 4)
    np.testing.assert_array_equal(band_cnt[:2], np.tile([1, 1, 1, 1, 2, 2, 1, 1, 1, 1], (2, 1)))
