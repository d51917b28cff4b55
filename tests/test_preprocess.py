"""Tests of linescan.preprocess: normalisation, down-scaling and coordinates back to the image."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linescan.preprocess import InputSpec, block_mean, upscale_to

PROPERTY = settings(max_examples=100, deadline=None)


def _naive_block_mean(x: np.ndarray, n: int) -> np.ndarray:
    h, w = x.shape
    hp, wp = math.ceil(h / n) * n, math.ceil(w / n) * n
    padded = np.pad(x.astype(np.float64), ((0, hp - h), (0, wp - w)), mode="edge")
    return padded.reshape(hp // n, n, wp // n, n).mean(axis=(1, 3))


@PROPERTY
@given(
    h=st.integers(1, 60),
    w=st.integers(1, 60),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_block_mean_matches_a_naive_reshape_mean(h: int, w: int, n: int, seed: int) -> None:
    """block_mean equals the mean of every n x n block of the edge-padded image."""
    x = np.random.default_rng(seed).random((h, w)).astype(np.float32)
    out = block_mean(x, n)
    assert out.dtype == np.float32
    assert out.shape == (math.ceil(h / n), math.ceil(w / n))
    np.testing.assert_allclose(out, _naive_block_mean(x, n), rtol=0, atol=2e-7)


def test_block_mean_of_one_is_the_image() -> None:
    """downscale 1 leaves the image as it is."""
    x = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    assert block_mean(x, 1) is x


def test_block_mean_is_exact_on_a_split_of_rows() -> None:
    """Computing block means on a split of the rows at a multiple of n gives the same bits as
    on the whole image (what the streaming band relies on)."""
    x = np.random.default_rng(1).random((40, 33)).astype(np.float32)
    whole = block_mean(x, 4)
    parts = np.concatenate([block_mean(x[:12], 4), block_mean(x[12:28], 4), block_mean(x[28:], 4)])
    np.testing.assert_array_equal(parts, whole)


@pytest.mark.parametrize(
    ("bit_depth", "dtype", "top"),
    [(8, np.uint8, 255), (16, np.uint16, 65535), (12, np.uint16, 4095), (10, np.uint16, 1023)],
)
def test_normalise_maps_full_scale_to_one(bit_depth: int, dtype: type, top: int) -> None:
    """A pixel value v becomes v / (2**bit_depth - 1): 0 -> 0 and full scale -> 1."""
    spec = InputSpec(bit_depth=bit_depth)
    px = np.array([[0, top // 2, top]], dtype=dtype)
    out = spec.normalise(px)
    assert out.dtype == np.float32
    assert out[0, 0] == 0.0
    assert out[0, 2] == pytest.approx(1.0, abs=1e-6)
    assert out[0, 1] == pytest.approx((top // 2) / top, abs=1e-6)


def test_no_max_heuristic_in_normalisation() -> None:
    """A dark 16-bit image is not stretched: normalisation never looks at the data."""
    spec = InputSpec(bit_depth=16)
    px = np.full((4, 4), 1000, np.uint16)
    np.testing.assert_allclose(spec.normalise(px), 1000 / 65535, rtol=1e-6)


@pytest.mark.parametrize(
    ("spec", "h", "w", "expected"),
    [
        (InputSpec(), 100, 37, (100, 37)),
        (InputSpec(downscale=2), 101, 37, (51, 19)),
        (InputSpec(downscale=4), 256, 4096, (64, 1024)),
        (InputSpec(resize=(256, 128)), 1000, 700, (128, 256)),
    ],
)
def test_model_shape(spec: InputSpec, h: int, w: int, expected: tuple[int, int]) -> None:
    """model_shape is ceil(size / n) for a 1/n scale and (height, width) of a resize."""
    assert spec.model_shape(h, w) == expected
    assert spec.to_model(np.zeros((h, w), np.uint8)).shape == expected


@PROPERTY
@given(
    n=st.integers(1, 5),
    h=st.integers(1, 80),
    w=st.integers(1, 80),
    data=st.data(),
)
def test_box_to_original_for_downscale_covers_the_source_pixels(
    n: int, h: int, w: int, data: st.DataObject
) -> None:
    """A model-pixel box maps to exactly the original pixels whose blocks it holds, clipped."""
    spec = InputSpec(downscale=n)
    mh, mw = spec.model_shape(h, w)
    y0 = data.draw(st.integers(0, mh - 1))
    y1 = data.draw(st.integers(y0 + 1, mh))
    x0 = data.draw(st.integers(0, mw - 1))
    x1 = data.draw(st.integers(x0 + 1, mw))
    oy0, oy1, ox0, ox1 = spec.box_to_original(y0, y1, x0, x1, h, w)
    rows = [r for r in range(h) if y0 <= r // n < y1]
    cols = [c for c in range(w) if x0 <= c // n < x1]
    assert (oy0, oy1) == (rows[0], rows[-1] + 1)
    assert (ox0, ox1) == (cols[0], cols[-1] + 1)
    assert spec.area_to_original((y1 - y0) * (x1 - x0), h, w) == (y1 - y0) * (x1 - x0) * n * n


@PROPERTY
@given(
    h=st.integers(16, 500),
    w=st.integers(16, 500),
    rh=st.integers(8, 128),
    rw=st.integers(8, 128),
    data=st.data(),
)
def test_box_to_original_for_resize_contains_the_scaled_box(
    h: int, w: int, rh: int, rw: int, data: st.DataObject
) -> None:
    """For a resize model, the original box contains the model box scaled to the image, stays
    inside the image, and the whole model image maps to the whole image."""
    spec = InputSpec(resize=(rw, rh))
    y0 = data.draw(st.integers(0, rh - 1))
    y1 = data.draw(st.integers(y0 + 1, rh))
    x0 = data.draw(st.integers(0, rw - 1))
    x1 = data.draw(st.integers(x0 + 1, rw))
    oy0, oy1, ox0, ox1 = spec.box_to_original(y0, y1, x0, x1, h, w)
    sy, sx = h / rh, w / rw
    assert oy0 <= y0 * sy + 1e-9
    assert oy1 >= min(y1 * sy, h) - 1e-9
    assert ox0 <= x0 * sx + 1e-9
    assert ox1 >= min(x1 * sx, w) - 1e-9
    assert 0 <= oy0 < oy1 <= h
    assert 0 <= ox0 < ox1 <= w
    assert spec.box_to_original(0, rh, 0, rw, h, w) == (0, h, 0, w)


def test_resize_uses_area_interpolation() -> None:
    """A 2:1 resize of a fixed size equals the 2x2 block mean (area interpolation)."""
    x = np.random.default_rng(0).integers(0, 256, (64, 48)).astype(np.uint8)
    spec = InputSpec(resize=(24, 32))
    np.testing.assert_allclose(spec.to_model(x), block_mean(spec.normalise(x), 2), atol=1e-6)


def test_upscale_to_nearest_repeats_blocks() -> None:
    """A mask at 1/n scale goes back to the original size by repeating each pixel n x n."""
    spec = InputSpec(downscale=3)
    small = np.array([[0, 1], [1, 0]], np.float32)
    big = upscale_to(small, 5, 6, spec, nearest=True)
    assert big.shape == (5, 6)
    np.testing.assert_array_equal(big[:3, :3], 0)
    np.testing.assert_array_equal(big[:3, 3:], 1)
    np.testing.assert_array_equal(big[3:, :3], 1)
    assert upscale_to(small, 6, 6, spec, nearest=False).shape == (6, 6)
    resized = upscale_to(small, 7, 9, InputSpec(resize=(2, 2)), nearest=True)
    assert resized.shape == (7, 9)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bit_depth": 0},
        {"bit_depth": 17},
        {"downscale": 0},
        {"resize": (0, 10)},
        {"resize": (256, 256), "downscale": 2},
    ],
)
def test_invalid_specs_raise(kwargs: dict[str, object]) -> None:
    """Out-of-range bit depths, scales and sizes, or both a resize and a scale, are refused."""
    with pytest.raises(ValueError, match=r"bit_depth|downscale|resize"):
        InputSpec(**kwargs)  # type: ignore[arg-type]


def test_only_scaled_specs_stream() -> None:
    """A fixed resize cannot stream; a 1/n scale can."""
    assert InputSpec(downscale=2).streamable
    assert not InputSpec(resize=(256, 256)).streamable
