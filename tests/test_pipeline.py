"""Tests of the offline pipeline (linescan.pipeline) and the pieces it chains: residual maps
(linescan.residual) and threshold, opening and regions (linescan.segment).

Backends here are plain functions (``FunctionBackend``), so that the expected residual and
regions are known exactly: the identity reconstructs perfectly; a clipping backend "erases" a
bright blob and reproduces everything else.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from linescan.backends import FunctionBackend
from linescan.errors import DataError
from linescan.evaluate import OPENING_KERNEL, open_segmentation
from linescan.model.bundle import BundleMeta
from linescan.pipeline import Settings, infer_tiles, inspect_image, reconstruct
from linescan.preprocess import InputSpec
from linescan.residual import compute_residual, halo, vae_residual
from linescan.segment import (
    DISK,
    components,
    grey_open,
    label_components,
    open_mask,
    threshold_mask,
)
from linescan.ssim import SSIMParams, ssim_map

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

CLIP = 0.5  # the eraser's ceiling: the background stays below it, the blob above
BLOB = (101, 119, 61, 83)  # y0, y1, x0, x1 in original pixels (odd edges on purpose)


def _meta(spec: InputSpec = InputSpec(), residual: str = "ssim", **kw: object) -> BundleMeta:
    return BundleMeta(
        loss="ssim",
        latent=8,
        patch=32,
        residual=residual,  # type: ignore[arg-type]
        input=spec,
        stride=kw.pop("stride", 13),  # type: ignore[arg-type]
        threshold=kw.pop("threshold", 0.1),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def _identity() -> FunctionBackend:
    return FunctionBackend(lambda b: b.copy(), "identity")


def _eraser() -> FunctionBackend:
    return FunctionBackend(lambda b: np.minimum(b, np.float32(CLIP)), "eraser")


def _image(h: int = 190, w: int = 230, blob: tuple[int, int, int, int] | None = BLOB) -> U8:
    """A smooth background in 60..100 (below CLIP) with a bright blob of 240."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    bg = 80 + 20 * np.sin(yy / 9.0) * np.cos(xx / 13.0)
    img = np.rint(bg).astype(np.uint8)
    if blob is not None:
        y0, y1, x0, x1 = blob
        img[y0:y1, x0:x1] = 240
    return img


# ------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("residual", ["ssim", "l2"])
@pytest.mark.parametrize("spec", [InputSpec(), InputSpec(downscale=2)], ids=["1x", "half"])
def test_perfect_reconstruction_gives_zero_residual_and_no_regions(
    residual: str, spec: InputSpec
) -> None:
    """With the identity as the model, the stitched reconstruction is the input, the residual
    is ~0 everywhere and nothing is found, even at a tiny threshold."""
    img = _image()
    meta = _meta(spec, residual, threshold=1e-3)
    res = inspect_image(img, meta, _identity())
    np.testing.assert_allclose(res.reconstruction[0], res.model_input, atol=1e-6)
    assert res.residual.shape == spec.model_shape(*img.shape)
    assert float(np.abs(res.residual).max()) < 1e-5
    assert res.regions == []
    assert res.mask.sum() == 0


@pytest.mark.parametrize(
    "spec",
    [InputSpec(), InputSpec(downscale=2), InputSpec(downscale=3), InputSpec(resize=(96, 70))],
    ids=["1x", "half", "third", "resize"],
)
def test_erased_blob_is_one_region_in_original_coordinates(spec: InputSpec) -> None:
    """A blob the model cannot reconstruct becomes exactly one region whose box, in the original
    image's pixels, contains the blob and is not much larger (SSIM spreads by its window)."""
    img = _image()
    meta = _meta(spec, "ssim")
    res = inspect_image(img, meta, _eraser())
    assert len(res.regions) == 1, res.regions
    r = res.regions[0]
    y0, y1, x0, x1 = BLOB
    assert r.line_start <= y0
    assert r.line_end >= y1
    assert r.x_start <= x0
    assert r.x_end >= x1
    h, w = img.shape
    sy, sx = h / res.residual.shape[0], w / res.residual.shape[1]
    grow = halo(meta.residual, meta.ssim) + 1  # the window's spread + a partly covered pixel
    assert r.line_start >= y0 - grow * sy - 1
    assert r.line_end <= y1 + grow * sy + 1
    assert r.x_start >= x0 - grow * sx - 1
    assert r.x_end <= x1 + grow * sx + 1
    assert 0 <= r.line_start < r.line_end <= h
    assert 0 <= r.x_start < r.x_end <= w


def test_l2_region_is_exactly_the_blob_at_full_scale() -> None:
    """With the per-pixel L2 residual and no scaling, the region's box is exactly the blob's."""
    res = inspect_image(_image(), _meta(InputSpec(), "l2"), _eraser())
    (r,) = res.regions
    assert (r.line_start, r.line_end, r.x_start, r.x_end) == BLOB


def test_l2_region_at_half_scale_is_the_blob_on_the_block_grid() -> None:
    """At 1/2 scale the L2 region is the blob widened to whole 2x2 blocks, in original pixels:
    model pixels half covered by the blob are flagged too (at a low threshold)."""
    res = inspect_image(_image(), _meta(InputSpec(downscale=2), "l2", threshold=1e-3), _eraser())
    (r,) = res.regions
    assert (r.line_start, r.line_end, r.x_start, r.x_end) == (100, 120, 60, 84)


def test_region_statistics_match_the_mask_and_residual() -> None:
    """area_px, score_max and score_mean are the region's pixel count (in original pixels) and
    the maximum and mean residual over its model pixels."""
    spec = InputSpec(downscale=2)
    res = inspect_image(_image(), _meta(spec, "ssim"), _eraser())
    (r,) = res.regions
    region_px = res.mask.astype(bool)
    assert r.area_px == int(region_px.sum()) * 4
    assert r.score_max == pytest.approx(float(res.residual[region_px].max()))
    assert r.score_mean == pytest.approx(float(res.residual[region_px].astype(np.float64).mean()))
    assert r.score_max >= res.threshold


def test_threshold_and_min_area_settings_override_the_bundle() -> None:
    """Settings.threshold replaces the bundle's threshold; min_area_px drops smaller regions."""
    img = _image()
    meta = _meta(InputSpec(), "l2", threshold=None)
    res = inspect_image(img, meta, _eraser(), Settings(threshold=0.05))
    assert res.threshold == 0.05
    assert len(res.regions) == 1
    above = inspect_image(img, meta, _eraser(), Settings(threshold=10.0))
    assert above.regions == []
    blob_area = (BLOB[1] - BLOB[0]) * (BLOB[3] - BLOB[2])
    big_only = inspect_image(img, meta, _eraser(), Settings(threshold=0.05, min_area_px=blob_area))
    assert big_only.regions == []


def test_missing_threshold_is_a_data_error() -> None:
    """Inspecting with a bundle that has no threshold (and none given) says to calibrate."""
    meta = _meta(threshold=None)
    with pytest.raises(DataError, match=r"no threshold.*calibrate"):
        inspect_image(_image(), meta, _identity())


@pytest.mark.parametrize(
    ("spec", "shape"),
    [(InputSpec(), (31, 200)), (InputSpec(downscale=2), (200, 62)), (InputSpec(), (20, 20))],
)
def test_image_smaller_than_a_patch_is_a_data_error(
    spec: InputSpec, shape: tuple[int, int]
) -> None:
    """An image smaller than one patch at the model's scale is refused, naming its size."""
    img = np.zeros(shape, np.uint8)
    h, w = shape
    with pytest.raises(DataError, match=rf"image of {w}x{h} px .*smaller than one 32x32 patch"):
        inspect_image(img, _meta(spec), _identity())


def test_colour_or_stacked_input_is_a_data_error() -> None:
    """The pipeline takes 2-D grey images only."""
    with pytest.raises(DataError, match="2-D grey"):
        reconstruct(np.zeros((64, 64, 3), np.uint8), _meta(), _identity())


def test_batches_never_exceed_max_batch_and_do_not_change_the_result() -> None:
    """Tiles reach the backend in batches of at most max_batch, in grid order, and the
    reconstruction does not depend on the batch size for a batch-invariant model."""
    sizes: list[int] = []

    def record(b: F32) -> F32:
        sizes.append(len(b))
        return np.minimum(b, np.float32(CLIP))

    img = _image()
    meta = _meta()
    a = reconstruct(img, meta, FunctionBackend(record), Settings(max_batch=7))
    assert max(sizes) <= 7
    n_tiles = sum(sizes)
    sizes.clear()
    b = reconstruct(img, meta, FunctionBackend(record), Settings(max_batch=1000))
    assert sizes == [n_tiles]
    np.testing.assert_array_equal(a.reconstruction, b.reconstruction)
    tiles = np.random.default_rng(0).random((10, 1, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(infer_tiles(_identity(), tiles, 3), tiles)


def test_stride_setting_changes_the_grid() -> None:
    """Settings.stride overrides the bundle's stride (more tiles for a smaller stride)."""
    counts: dict[int, int] = {}

    def make(stride: int) -> FunctionBackend:
        def count(b: F32) -> F32:
            counts[stride] = counts.get(stride, 0) + len(b)
            return b

        return FunctionBackend(count)

    img = _image(100, 100, None)
    reconstruct(img, _meta(stride=30), make(30))
    reconstruct(img, _meta(stride=30), make(8), Settings(stride=8))
    assert counts[30] == 4 * 4  # 0, 30, 60, 68 on each axis
    assert counts[8] == 10 * 10  # 0, 8, ..., 64, 68


def test_sixteen_bit_images_are_normalised_by_the_bundle() -> None:
    """A 16-bit image with a 16-bit model finds the same region as the 8-bit image scaled up."""
    img8 = _image()
    img16 = img8.astype(np.uint16) * 257
    r8 = inspect_image(img8, _meta(InputSpec(bit_depth=8), "l2"), _eraser()).regions
    r16 = inspect_image(img16, _meta(InputSpec(bit_depth=16), "l2"), _eraser()).regions
    assert [(r.line_start, r.line_end, r.x_start, r.x_end) for r in r16] == [
        (r.line_start, r.line_end, r.x_start, r.x_end) for r in r8
    ]


# ------------------------------------------------------------------------------- residual


def test_residual_kinds() -> None:
    """ssim = 1 - SSIM map; l2 = squared difference; unknown kinds and 2-D recons are refused."""
    rng = np.random.default_rng(0)
    x = rng.random((40, 40)).astype(np.float32)
    r = rng.random((1, 40, 40)).astype(np.float32)
    p = SSIMParams()
    np.testing.assert_array_equal(compute_residual("ssim", x, r, p), 1.0 - ssim_map(x, r[0], p))
    np.testing.assert_array_equal(compute_residual("l2", x, r, p), (x - r[0]) ** 2)
    with pytest.raises(ValueError, match="unknown residual kind"):
        compute_residual("l1", x, r, p)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        compute_residual("l2", x, r[0], p)


def test_vae_residual_is_the_negative_log_reconstruction_probability() -> None:
    """vae = -log mean_n exp(-(x - r_n)^2 / (2 sigma^2)): 0 for perfect decodes, equal to the
    naive formula for moderate errors, finite (no underflow) for huge ones."""
    rng = np.random.default_rng(1)
    x = rng.random((8, 9)).astype(np.float32)
    perfect = np.repeat(x[None], 6, axis=0)
    np.testing.assert_allclose(vae_residual(x, perfect, 0.1), 0.0, atol=1e-6)
    samples = (x[None] + rng.normal(0, 0.05, (6, 8, 9))).astype(np.float32)
    sigma = 0.1
    naive = -np.log(np.mean(np.exp(-((x[None] - samples) ** 2) / (2 * sigma**2)), axis=0))
    np.testing.assert_allclose(vae_residual(x, samples, sigma), naive, rtol=1e-4, atol=1e-5)
    far = np.full((6, 8, 9), 50.0, np.float32)
    out = vae_residual(x, far, 1e-3)
    assert np.isfinite(out).all()
    assert float(out.min()) > 1e6
    # worse decodes score higher
    assert (vae_residual(x, samples * 1.5, sigma).mean()) > vae_residual(x, samples, sigma).mean()


def test_halo_is_the_ssim_radius() -> None:
    """A residual row depends on K // 2 rows on each side for SSIM and none for L2 or VAE."""
    assert halo("ssim", SSIMParams(window=11)) == 5
    assert halo("ssim", SSIMParams(window=7)) == 3
    assert halo("l2", SSIMParams()) == 0
    assert halo("vae", SSIMParams()) == 0


# ------------------------------------------------------------------------------- segment


def _opened_regions(mask: U8) -> list[tuple[int, int, int, int]]:
    opened = open_mask(mask)
    return [(c.y0, c.y1, c.x0, c.x1) for c, _ in components(opened, opened.astype(np.float32))]


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 2), (2, 1), (2, 2), (1, 8), (2, 9), (3, 3)])
def test_opening_removes_specks_and_thin_lines(h: int, w: int) -> None:
    """The opening with the disk of diameter 4 removes 1-3 px wide specks and lines."""
    mask = np.zeros((20, 20), np.uint8)
    mask[8 : 8 + h, 6 : 6 + w] = 1
    assert open_mask(mask).sum() == 0


def test_opening_keeps_a_six_pixel_blob_with_its_box() -> None:
    """A 6x6 blob survives the opening with its bounding box (only its corners are cut)."""
    mask = np.zeros((20, 20), np.uint8)
    mask[5:11, 7:13] = 1
    mask[15, 15] = 1  # and a speck, which goes
    opened = open_mask(mask)
    assert _opened_regions(mask) == [(5, 11, 7, 13)]
    assert 36 - 4 <= int(opened.sum()) <= 36
    assert np.all(opened <= mask)  # an opening never adds pixels


def test_opening_keeps_blobs_at_the_image_border() -> None:
    """A blob touching the image edge is not eaten by the border handling."""
    mask = np.zeros((12, 12), np.uint8)
    mask[:5, :5] = 1
    mask[8:, 8:] = 1
    assert _opened_regions(mask) == [(0, 5, 0, 5), (8, 12, 8, 12)]


def test_inspection_opens_with_the_evaluation_kernel() -> None:
    """Inspection and evaluation open with the same 4x4 structuring element and the same
    anchors, so a figure from ``linescan evaluate`` describes what the daemon flags."""
    assert DISK.shape == (4, 4)
    np.testing.assert_array_equal(DISK, OPENING_KERNEL)
    rng = np.random.default_rng(0)
    seg = rng.random((40, 40)) < 0.6
    np.testing.assert_array_equal(open_mask(seg.astype(np.uint8)) != 0, open_segmentation(seg))


@settings(max_examples=150, deadline=None)
@given(
    residual=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 30), st.integers(1, 30)),
        elements=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]),
    ),
    threshold=st.sampled_from([0.05, 0.1, 0.25, 0.3, 0.5, 0.75, 0.9, 1.0]),
)
def test_opening_commutes_with_thresholding(residual: F32, threshold: float) -> None:
    """open(residual >= t) == (grey_open(residual) >= t), thresholds equal to values included."""
    lhs = open_mask(threshold_mask(residual, threshold))
    rhs = threshold_mask(grey_open(residual), threshold)
    np.testing.assert_array_equal(lhs, rhs)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), q=st.floats(0.0, 1.0))
def test_opening_commutes_with_thresholding_on_continuous_residuals(seed: int, q: float) -> None:
    """The same on random continuous residuals, at thresholds taken from the data."""
    rng = np.random.default_rng(seed)
    residual = rng.random((25, 33)).astype(np.float32) ** 3
    t = float(np.quantile(residual, q))
    lhs = open_mask(threshold_mask(residual, t))
    np.testing.assert_array_equal(lhs, threshold_mask(grey_open(residual), t))
    np.testing.assert_array_equal(open_mask(lhs), lhs)  # idempotent


def test_components_are_eight_connected_with_statistics() -> None:
    """Diagonal neighbours are one region; boxes are end-exclusive and offset by y_origin;
    scores are the max and the sum of the residual; touching the last row is reported."""
    mask = np.zeros((6, 8), np.uint8)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = 1  # a diagonal line
    mask[4:6, 6:8] = 1  # touches the last row
    residual = np.arange(48, dtype=np.float32).reshape(6, 8) / 100
    labels, found = label_components(mask, residual, y_origin=100)
    assert len(found) == 2
    (diag, diag_bottom), (corner, corner_bottom) = sorted(found, key=lambda f: f[0].x0)
    assert (diag.y0, diag.y1, diag.x0, diag.x1, diag.area) == (101, 104, 1, 4, 3)
    assert diag.score_max == pytest.approx(float(residual[3, 3]))
    assert diag.score_sum == pytest.approx(float(residual[1, 1] + residual[2, 2] + residual[3, 3]))
    assert not diag_bottom
    assert (corner.y0, corner.y1, corner.x0, corner.x1, corner.area) == (104, 106, 6, 8, 4)
    assert corner_bottom
    assert labels.shape == mask.shape


def test_segment_respects_the_threshold_boundary() -> None:
    """A pixel exactly at the threshold counts as defective (residual >= threshold)."""
    r = np.zeros((10, 10), np.float32)
    r[2:8, 2:8] = 0.5
    assert threshold_mask(r, 0.5).sum() == 36
    assert threshold_mask(r, float(np.nextafter(np.float32(0.5), np.float32(1)))).sum() == 0


def test_inspection_mask_is_the_opened_threshold_mask() -> None:
    """inspect_image's mask equals open(residual >= threshold) on its own residual."""
    meta = replace(_meta(InputSpec(downscale=2), "ssim"), threshold=0.05)
    res = inspect_image(_image(), meta, _eraser())
    np.testing.assert_array_equal(res.mask, open_mask(threshold_mask(res.residual, 0.05)))
