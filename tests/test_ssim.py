"""Tests of linescan.ssim: one SSIM for training (torch) and inspection (OpenCV).

The oracle is scikit-image's ``structural_similarity`` with the paper's settings (Gaussian
window, sigma 1.5, population moments, data range 1); both implementations must match it
within 1e-4 away from a 5-pixel border (issue 2).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.ndimage import correlate1d
from skimage.metrics import structural_similarity

from linescan.ssim import SSIMParams, blur_matrix, ssim_components, ssim_map, ssim_torch

F64 = npt.NDArray[np.float64]
BORDER = 5
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _skimage(x: F64, y: F64, **kw: object) -> F64:
    args: dict[str, object] = {
        "gaussian_weights": True,
        "sigma": 1.5,
        "use_sample_covariance": False,
        "data_range": 1.0,
        "full": True,
    }
    args.update(kw)
    _, full = structural_similarity(x, y, **args)  # type: ignore[arg-type]
    return np.asarray(full, dtype=np.float64)


def _inner(a: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    return a[BORDER:-BORDER, BORDER:-BORDER]


@st.composite
def image_pairs(draw: st.DrawFn) -> tuple[F64, F64]:
    """Two images of one shape (16..200 a side) in [0, 1]: noise, flat regions, saturation."""
    h = draw(st.integers(16, 200))
    w = draw(st.integers(16, 200))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["noise", "related", "flat_patches", "constant", "saturated"]))
    x = rng.random((h, w))
    if kind == "noise":
        y = rng.random((h, w))
    elif kind == "related":
        y = np.clip(x + rng.normal(0.0, 0.1, (h, w)), 0.0, 1.0)
    elif kind == "flat_patches":
        y = x.copy()
        # constant blocks in one or both images (zero variance: only C1, C2 keep SSIM defined)
        y[: h // 2, : w // 3] = draw(st.floats(0.0, 1.0))
        x[h // 3 :, w // 2 :] = draw(st.floats(0.0, 1.0))
    elif kind == "constant":
        x = np.full((h, w), draw(st.floats(0.0, 1.0)))
        y = np.full((h, w), draw(st.floats(0.0, 1.0)))
        y[h // 2, w // 2] = rng.random()
    else:
        x = np.where(x > 0.5, 1.0, 0.0)
        y = np.clip(rng.normal(0.9, 0.3, (h, w)), 0.0, 1.0)
    return x, y


@PROPERTY
@given(image_pairs())
def test_cpu_ssim_matches_skimage(pair: tuple[F64, F64]) -> None:
    """ssim_map equals skimage's SSIM map within 1e-4 away from a 5-pixel border."""
    x, y = pair
    ours = ssim_map(x, y)
    assert ours.dtype == np.float32
    assert ours.shape == x.shape
    np.testing.assert_allclose(_inner(ours), _inner(_skimage(x, y)), rtol=0, atol=1e-4)


@PROPERTY
@given(image_pairs())
def test_torch_ssim_matches_skimage(pair: tuple[F64, F64]) -> None:
    """ssim_torch equals skimage's SSIM map within 1e-4 away from a 5-pixel border."""
    x, y = pair
    ours = ssim_torch(torch.from_numpy(x).float(), torch.from_numpy(y).float()).numpy()
    np.testing.assert_allclose(_inner(ours), _inner(_skimage(x, y)), rtol=0, atol=1e-4)


def test_torch_and_cpu_agree_on_batches_including_the_border() -> None:
    """The training loss (torch, batched) and the inspection residual (OpenCV) are one
    definition: they agree everywhere, borders included, on every image of a batch."""
    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 40, 57)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1).astype(np.float32)
    batched = ssim_torch(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    for i in range(3):
        np.testing.assert_allclose(batched[i, 0], ssim_map(x[i, 0], y[i, 0]), atol=2e-5)


def test_tall_and_wide_images_match_skimage() -> None:
    """Large images (computed in strips or blocks, if the implementation does that) match
    skimage everywhere away from the border, including where strips meet."""
    rng = np.random.default_rng(11)
    for shape in [(700, 64), (40, 1500)]:
        x = rng.random(shape)
        y = np.clip(x + rng.normal(0.0, 0.15, shape), 0.0, 1.0)
        y[300:320] = 0.5  # a flat band across a likely strip boundary
        expected = _inner(_skimage(x, y))
        np.testing.assert_allclose(_inner(ssim_map(x, y)), expected, atol=1e-4)
        t = ssim_torch(torch.from_numpy(x).float(), torch.from_numpy(y).float()).numpy()
        np.testing.assert_allclose(_inner(t), expected, atol=1e-4)


def test_rows_of_a_band_equal_the_whole_image() -> None:
    """SSIM of a band of rows with its halo equals the whole image's rows bit for bit (the
    streaming tracker relies on it)."""
    rng = np.random.default_rng(12)
    x = rng.random((600, 90)).astype(np.float32)
    y = rng.random((600, 90)).astype(np.float32)
    whole = ssim_map(x, y)
    r = SSIMParams().radius
    for a, b in [(0, 37), (37, 301), (301, 600)]:
        lo, hi = max(0, a - r), min(600, b + r)
        band = ssim_map(x[lo:hi], y[lo:hi])
        np.testing.assert_array_equal(band[a - lo : b - lo], whole[a:b])


@pytest.mark.parametrize("window", [3, 7, 11, 15, 19])
def test_uniform_window_matches_skimage(window: int) -> None:
    """The uniform-window option equals skimage(gaussian_weights=False, win_size=K)."""
    rng = np.random.default_rng(window)
    x = rng.random((64, 75))
    y = np.clip(0.6 * x + 0.4 * rng.random((64, 75)), 0, 1)
    x[:20, :20] = 0.25  # a flat region
    params = SSIMParams(window=window, gaussian=False)
    expected = _inner(_skimage(x, y, gaussian_weights=False, win_size=window))
    np.testing.assert_allclose(_inner(ssim_map(x, y, params)), expected, atol=1e-4)
    t = ssim_torch(torch.from_numpy(x).float(), torch.from_numpy(y).float(), params).numpy()
    np.testing.assert_allclose(_inner(t), expected, atol=1e-4)


def test_gaussian_window_follows_k_and_sigma() -> None:
    """Window and sigma are parameters: K=9, sigma=1 equals skimage's sigma=1 (its 9-tap
    window), and differs clearly from the default K=11, sigma=1.5."""
    rng = np.random.default_rng(3)
    x, y = rng.random((50, 50)), rng.random((50, 50))
    p9 = SSIMParams(window=9, sigma=1.0)
    # skimage truncates its Gaussian at 3.5 sigma: radius int(3.5 * 1.0 + 0.5) = 4, 9 taps
    expected = _skimage(x, y, sigma=1.0)
    np.testing.assert_allclose(_inner(ssim_map(x, y, p9)), _inner(expected), atol=1e-4)
    assert np.abs(ssim_map(x, y, p9) - ssim_map(x, y)).max() > 1e-2


@PROPERTY
@given(image_pairs())
def test_luminance_contrast_structure_multiply_to_ssim(pair: tuple[F64, F64]) -> None:
    """l * c * s equals the SSIM map, and each factor lies in its theoretical range (within
    the float32 budget of 1e-4: flat windows have variances of +-1e-8, not exactly 0)."""
    x, y = pair
    maps = ssim_components(x, y)
    np.testing.assert_allclose(
        maps.luminance * maps.contrast * maps.structure, maps.ssim, atol=1e-4
    )
    np.testing.assert_array_equal(maps.ssim, ssim_map(x, y))
    assert np.all(maps.luminance <= 1 + 1e-4)
    assert np.all(maps.luminance >= 0)
    assert np.all(maps.contrast <= 1 + 1e-4)
    assert np.all(maps.contrast > 0)
    assert np.all(np.abs(maps.structure) <= 1 + 1e-3)


def test_components_follow_their_formulas() -> None:
    """l, c and s are the paper's formulas on windowed population moments (checked against
    an independent scipy computation with the same reflected border)."""
    rng = np.random.default_rng(7)
    x = rng.random((45, 38))
    y = np.clip(0.5 * x + 0.5 * rng.random((45, 38)) ** 2, 0, 1)
    p = SSIMParams()
    k = p.kernel()

    def blur(a: F64) -> F64:
        return correlate1d(correlate1d(a, k, axis=0, mode="reflect"), k, axis=1, mode="reflect")

    mx, my = blur(x), blur(y)
    vx, vy = blur(x * x) - mx**2, blur(y * y) - my**2
    cxy = blur(x * y) - mx * my
    sx, sy = np.sqrt(np.maximum(vx, 0)), np.sqrt(np.maximum(vy, 0))
    c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2
    maps = ssim_components(x, y)
    np.testing.assert_allclose(maps.luminance, (2 * mx * my + c1) / (mx**2 + my**2 + c1), atol=1e-5)
    np.testing.assert_allclose(maps.contrast, (2 * sx * sy + c2) / (vx + vy + c2), atol=1e-4)
    np.testing.assert_allclose(maps.structure, (cxy + c2 / 2) / (sx * sy + c2 / 2), atol=1e-3)


def test_identical_images_have_ssim_one() -> None:
    """SSIM of an image with itself is 1 everywhere (both implementations)."""
    x = np.random.default_rng(1).random((30, 41)).astype(np.float32)
    np.testing.assert_allclose(ssim_map(x, x), 1.0, atol=1e-5)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(ssim_torch(t, t).numpy(), 1.0, atol=1e-5)


def test_constants_are_wang_k1_k2_times_data_range() -> None:
    """C1 = (0.01 L)^2 and C2 = (0.03 L)^2 with L the data range."""
    assert SSIMParams().c1 == pytest.approx(1e-4)
    assert SSIMParams().c2 == pytest.approx(9e-4)
    assert SSIMParams(data_range=255).c1 == pytest.approx((0.01 * 255) ** 2)
    assert SSIMParams(data_range=255).c2 == pytest.approx((0.03 * 255) ** 2)


def test_gaussian_kernel_is_normalised_and_truncated() -> None:
    """The 1-D window has K taps, sums to 1, is symmetric and has the given sigma's shape."""
    k = SSIMParams(window=11, sigma=1.5).kernel()
    assert k.shape == (11,)
    assert k.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(k, k[::-1])
    assert k[5] / k[6] == pytest.approx(np.exp(0.5 / 1.5**2))
    np.testing.assert_allclose(SSIMParams(window=5, gaussian=False).kernel(), 0.2)


def test_blur_matrix_applies_window_with_reflected_border() -> None:
    """blur_matrix(n) @ v equals the window correlated with v under half-sample reflection."""
    p = SSIMParams(window=7, sigma=1.2)
    v = np.random.default_rng(0).random(9)
    expected = correlate1d(v, p.kernel(), mode="reflect")
    np.testing.assert_allclose(blur_matrix(9, p) @ v, expected, atol=1e-12)
    # a signal shorter than the window still reflects correctly (window wider than the image)
    w = np.random.default_rng(1).random(3)
    np.testing.assert_allclose(
        blur_matrix(3, p) @ w, correlate1d(w, p.kernel(), mode="reflect"), atol=1e-12
    )


def test_ssim_torch_is_differentiable_and_descent_raises_ssim() -> None:
    """The gradient of mean SSIM matches a finite difference, and one descent step on the
    loss 1 - SSIM increases SSIM."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((2, 1, 32, 32)).astype(np.float32))
    y0 = torch.from_numpy(rng.random((2, 1, 32, 32)).astype(np.float32))
    y = y0.clone().requires_grad_(True)
    loss = 1.0 - ssim_torch(x, y).mean()
    loss.backward()  # type: ignore[no-untyped-call]
    grad = y.grad
    assert grad is not None
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    # directional derivative along the gradient vs a central finite difference
    d = grad / grad.norm()
    eps = 1e-2
    with torch.no_grad():
        fd = (
            (1.0 - ssim_torch(x, y0 + eps * d).mean()) - (1.0 - ssim_torch(x, y0 - eps * d).mean())
        ) / (2 * eps)
    analytic = (grad * d).sum()
    assert float(fd) == pytest.approx(float(analytic), rel=2e-2)
    with torch.no_grad():
        before = ssim_torch(x, y0).mean()
        after = ssim_torch(x, y0 - 50.0 * grad).mean()
    assert after > before + 1e-3


def test_ssim_torch_gradient_reaches_both_inputs() -> None:
    """Gradients flow to both arguments (the reconstruction is the one that is trained)."""
    a = torch.rand(1, 1, 20, 20, requires_grad=True)
    b = torch.rand(1, 1, 20, 20, requires_grad=True)
    ssim_torch(a, b).sum().backward()  # type: ignore[no-untyped-call]
    assert a.grad is not None
    assert b.grad is not None
    assert a.grad.abs().sum() > 0
    assert b.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window": 0},
        {"window": -3},
        {"window": 4},
        {"window": 10, "gaussian": False},
        {"sigma": 0.0},
        {"sigma": -1.0},
    ],
)
def test_invalid_windows_raise(kwargs: dict[str, object]) -> None:
    """An even, zero or negative window, or a non-positive Gaussian sigma, is refused."""
    with pytest.raises(ValueError, match=r"window|sigma"):
        SSIMParams(**kwargs)  # type: ignore[arg-type]


def test_mismatched_shapes_raise() -> None:
    """Images of different shapes, or not 2-D, are refused by both implementations."""
    with pytest.raises(ValueError, match="one shape"):
        ssim_map(np.zeros((10, 10)), np.zeros((10, 11)))
    with pytest.raises(ValueError, match="2-D"):
        ssim_map(np.zeros((2, 10, 10)), np.zeros((2, 10, 10)))
    with pytest.raises(ValueError, match="one shape"):
        ssim_torch(torch.zeros(1, 10, 10), torch.zeros(1, 10, 12))
