"""One definition of SSIM, shared by the training loss and the inspection residual.

SSIM(p, q) = l * c * s (Wang et al. 2004, with alpha = beta = gamma = 1), from windowed moments:

    l = (2 mu_p mu_q + C1) / (mu_p^2 + mu_q^2 + C1)
    c = (2 sigma_p sigma_q + C2) / (sigma_p^2 + sigma_q^2 + C2)
    s = (sigma_pq + C2/2) / (sigma_p sigma_q + C2/2)
    l * c * s = (2 mu_p mu_q + C1)(2 sigma_pq + C2)
                / ((mu_p^2 + mu_q^2 + C1)(sigma_p^2 + sigma_q^2 + C2))

Constants: the paper writes "c1 = 0.01, c2 = 0.03". Those are Wang et al.'s K1 and K2, not the
stabilisers themselves: C1 = (K1 L)^2 and C2 = (K2 L)^2 for the data range L. We use that reading
because it is the one every SSIM implementation (and scikit-image, our oracle) uses; reading them
as C1 = 0.01 directly would make the contrast term almost blind on dark, low-contrast webs.

Window: K x K (K = 11), a Gaussian with sigma 1.5 truncated at radius (K - 1) / 2 and normalised,
or a uniform box. Moments are population moments (no N/(N-1) correction), as
``use_sample_covariance=False`` in scikit-image.

Border: the image is extended by half-sample symmetric reflection (``d c b a | a b c d``), the
same as scipy.ndimage's ``reflect`` and OpenCV's ``BORDER_REFLECT``. Training (torch) and
inspection (OpenCV) use the same border, so the loss optimises exactly what is inspected.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import cv2
import numpy as np
import numpy.typing as npt
import torch

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class SSIMParams:
    """Window and constants of SSIM. Stored in every model bundle."""

    window: int = 11
    sigma: float = 1.5
    gaussian: bool = True
    k1: float = 0.01
    k2: float = 0.03
    data_range: float = 1.0

    def __post_init__(self) -> None:
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"SSIM window must be a positive odd number, got {self.window}")
        if self.gaussian and self.sigma <= 0:
            raise ValueError(f"SSIM sigma must be > 0, got {self.sigma}")

    @property
    def c1(self) -> float:
        return (self.k1 * self.data_range) ** 2

    @property
    def c2(self) -> float:
        return (self.k2 * self.data_range) ** 2

    @property
    def radius(self) -> int:
        """Rows (and columns) of context the window needs on each side of a pixel."""
        return self.window // 2

    def kernel(self) -> npt.NDArray[np.float64]:
        """The normalised 1-D window; the 2-D window is its outer product."""
        r = self.radius
        if not self.gaussian:
            return np.full(self.window, 1.0 / self.window)
        x = np.arange(-r, r + 1, dtype=np.float64)
        k = np.exp(-0.5 * (x / self.sigma) ** 2)
        out: npt.NDArray[np.float64] = k / k.sum()
        return out

    def to_dict(self) -> dict[str, float | int | bool]:
        return {
            "window": self.window,
            "sigma": self.sigma,
            "gaussian": self.gaussian,
            "k1": self.k1,
            "k2": self.k2,
            "data_range": self.data_range,
        }


class SSIMMaps(NamedTuple):
    """The SSIM map and its luminance, contrast and structure factors (same shape as input)."""

    ssim: F32
    luminance: F32
    contrast: F32
    structure: F32


def _reflect_index(i: int, n: int) -> int:
    """Half-sample symmetric reflection of index i into [0, n)."""
    period = 2 * n
    i %= period
    return i if i < n else period - 1 - i


@lru_cache(maxsize=64)
def blur_matrix(n: int, params: SSIMParams) -> npt.NDArray[np.float64]:
    """An n x n matrix B with (B @ v) = the window applied along v with reflected borders.

    Folding the border into the matrix makes the torch blur two matrix products, which on a
    CPU is several times faster than a grouped convolution and has exactly the OpenCV border.
    """
    k = params.kernel()
    r = params.radius
    m = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for t in range(-r, r + 1):
            m[i, _reflect_index(i + t, n)] += k[t + r]
    return m


# --------------------------------------------------------------------------- CPU (inspection)


def _moments_cv(x: F32, y: F32, params: SSIMParams) -> tuple[F32, F32, F32, F32, F32]:
    """Windowed mu_x, mu_y, var_x, var_y, cov_xy of two float32 images.

    The five moments separately, for :func:`ssim_components` (Figure 3 needs each factor);
    :func:`ssim_map` needs only four blurs (see the fast path below). The covariance comes
    from the variance of d = x - y, as in the fast path, so that l * c * s and ``ssim_map``
    agree where SSIM is sensitive (flat windows), and with the same blur.
    """
    krow, k = _kernels(params)

    def blur(img: F32) -> F32:
        rows = cv2.filter2D(img, cv2.CV_32F, krow, borderType=cv2.BORDER_REFLECT)
        out: F32 = cv2.sepFilter2D(rows, cv2.CV_32F, _ONE, k, borderType=cv2.BORDER_REFLECT)
        return out

    # Centre the data first: the variances are differences of large, nearly equal numbers
    # (E[x^2] - E[x]^2), and centring near 0 keeps float32 well inside the 1e-4 budget.
    shift = np.float32(0.5 * params.data_range)
    xc = x - shift
    yc = y - shift
    d = x - y
    mx = blur(xc)
    my = blur(yc)
    # Variances are >= 0; float32 leaves flat windows at +-1e-8, and a negative one would
    # push the contrast factor above its bound of 1 by up to 1e-4. The covariance is taken
    # from the clamped values, so that c * s stays (2 cov + C2) / (var_x + var_y + C2).
    vx = np.maximum(blur(xc * xc) - mx * mx, np.float32(0))
    vy = np.maximum(blur(yc * yc) - my * my, np.float32(0))
    md = mx - my
    q = blur(d * d) - md * md
    cxy = (vx + vy - q) * np.float32(0.5)
    return mx + shift, my + shift, vx, vy, cxy


# The fast path. SSIM only needs four windowed quantities, not five: with centred data
# xc = x - L/2, yc = y - L/2 and d = x - y,
#
#     mu_x - mu_y            = E[d]                      (= mx - my)
#     var_x + var_y          = E[xc^2 + yc^2] - mx^2 - my^2  =: V
#     var_x + var_y - 2 cov  = E[d^2] - E[d]^2            =: Q   (the variance of d)
#     2 mu_x mu_y + C1       =: A;   mu_x^2 + mu_y^2 + C1 = A + E[d]^2
#
# so SSIM = A (V - Q + C2) / ((A + E[d]^2) (V + C2)): four blurs (xc, yc, xc^2 + yc^2, d^2)
# instead of five. Precision: an error in V cancels between numerator and denominator where Q
# is small, and Q comes from the small numbers d wherever input and reconstruction agree. On
# nearly flat dark or bright webs the five float32 moments missed scikit-image by 1.5e-4; this
# form stays within 1e-6 there. Centring by the fixed L/2, not by a per-image mean: a band of
# rows must see the same numbers as the whole image.
#
# The work runs in strips of rows, each with its ``radius`` rows of context, so that the
# intermediate planes stay in cache (one pass over RAM in, one out, instead of ~25 passes over
# whole-frame temporaries). A pixel's arithmetic does not depend on the strip it falls in, nor
# on the image's height: the filters see the same rows in the same order, the image's own
# border is reflected by OpenCV exactly as for the whole image, and everything else is
# element-wise float32 +, -, *, / in numpy (exact IEEE, no fused multiply-add whose use could
# differ between a SIMD body and a scalar tail). The streaming tracker relies on this: SSIM of
# a band of rows with its halo equals the whole image's rows, bit for bit.
#
# The blur is a ``cv2.filter2D`` row pass (about twice as fast as the row half of
# ``cv2.sepFilter2D`` in this OpenCV) and a ``cv2.sepFilter2D`` column pass: its symmetric
# column filter adds mirrored rows before multiplying, fewer roundings than ``filter2D``'s
# 11 products, and that keeps flat windows at different grey levels (where Q is a difference of
# two numbers near the squared offset) inside 1e-4 of scikit-image; with a ``filter2D`` column
# pass about 1.5 % of such windows missed by up to 1.4e-4.

_STRIP_BYTES = 1 << 18
"""Target size of one strip plane: 64 rows of a 4096-wide frame (measured best on AVX-512)."""

_MIN_STRIP_ROWS = 32
_MAX_STRIP_ROWS = 256

_workers = 1
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_scratch = threading.local()


def set_workers(n: int) -> None:
    """Compute SSIM strips on ``n`` threads (1: in the calling thread, the default).

    Set by :func:`linescan.threads.configure_threads`, which also sets OpenCV to one thread
    so that the two never nest. With more than one worker, strips run on a small pool owned
    by this module (created on first use); the result is bit-identical for any ``n``.
    """
    global _workers, _pool
    if n < 1:
        raise ValueError(f"SSIM workers must be >= 1, got {n}")
    with _pool_lock:
        if _pool is not None and n != _workers:
            _pool.shutdown(wait=True)
            _pool = None
        _workers = n


def get_workers() -> int:
    """Threads :func:`ssim_map` uses for its strips (see :func:`set_workers`)."""
    return _workers


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_workers, thread_name_prefix="ssim")
        return _pool


def _strip_rows(width: int) -> int:
    rows = _STRIP_BYTES // (4 * max(width, 1))
    return max(_MIN_STRIP_ROWS, min(_MAX_STRIP_ROWS, rows))


def _scratch_planes(n: int, width: int) -> tuple[F32, F32]:
    """Two (4, n, width) float32 scratch blocks, reused per thread.

    Reused rather than allocated per call: a fresh multi-megabyte array costs a page fault per
    4 KiB on first touch, which is a visible share of a frame's SSIM.
    """
    size = 4 * n * width
    a: F32 | None = getattr(_scratch, "a", None)
    b: F32 | None = getattr(_scratch, "b", None)
    if a is None or b is None or a.size < size:
        a = np.empty(size, dtype=np.float32)
        b = np.empty(size, dtype=np.float32)
        _scratch.a, _scratch.b = a, b
    return a[:size].reshape(4, n, width), b[:size].reshape(4, n, width)


_ONE = np.ones(1, dtype=np.float32)


@lru_cache(maxsize=16)
def _kernels(params: SSIMParams) -> tuple[F32, F32]:
    """The window as a 1 x K row kernel (``filter2D``) and a plain 1-D kernel (``sepFilter2D``)."""
    k = params.kernel().astype(np.float32)
    return np.ascontiguousarray(k[None, :]), k


def window_kernels(params: SSIMParams) -> tuple[F32, F32]:
    """The SSIM window's row kernel (1 x K, for ``cv2.filter2D``) and column kernel (K)."""
    return _kernels(params)


def _ssim_strip(
    x: F32, y: F32, out: F32, start: int, stop: int, params: SSIMParams, residual: bool
) -> None:
    """SSIM (or 1 - SSIM) of rows [start, stop) of x and y into the same rows of ``out``."""
    h, w = x.shape
    r = params.radius
    top = max(0, start - r)
    bottom = min(h, stop + r)
    n = bottom - top
    keep = slice(start - top, stop - top)
    rows = stop - start
    krow, kcol = _kernels(params)
    half = np.float32(0.5 * params.data_range)
    c1 = np.float32(params.c1)
    c2 = np.float32(params.c2)
    src, blur = _scratch_planes(n, w)
    xs, ys = x[top:bottom], y[top:bottom]
    # planes: xc, yc, xc^2 + yc^2, d^2
    np.subtract(xs, half, out=src[0])
    np.subtract(ys, half, out=src[1])
    np.multiply(src[:2], src[:2], out=blur[:2])
    np.add(blur[0], blur[1], out=src[2])
    np.subtract(xs, ys, out=blur[0])
    np.multiply(blur[0], blur[0], out=src[3])
    # Rows are filtered independently, so the four planes go through in one call; columns
    # plane by plane (a plane at the image's edge has no context rows: OpenCV reflects there).
    cv2.filter2D(
        src.reshape(4 * n, w), cv2.CV_32F, krow, dst=blur.reshape(4 * n, w),
        borderType=cv2.BORDER_REFLECT,
    )  # fmt: skip
    for i in range(4):
        cv2.sepFilter2D(blur[i], cv2.CV_32F, _ONE, kcol, dst=src[i], borderType=cv2.BORDER_REFLECT)
    mx, my, e1, edd = src[:, keep]
    md, v, q, t = blur[:, :rows]
    np.subtract(mx, my, out=md)  # E[d]
    np.multiply(md, md, out=v)  # E[d]^2
    np.subtract(edd, v, out=q)  # Q = var(d)
    np.multiply(mx, mx, out=t)
    np.subtract(e1, t, out=e1)
    np.multiply(my, my, out=t)
    np.subtract(e1, t, out=e1)  # V = var_x + var_y
    np.add(e1, c2, out=e1)  # V + C2
    np.subtract(e1, q, out=q)  # V - Q + C2 = 2 cov + C2
    np.add(mx, half, out=mx)  # mu_x
    np.add(my, half, out=my)  # mu_y
    np.multiply(mx, my, out=t)
    np.add(t, t, out=t)
    np.add(t, c1, out=t)  # A = 2 mu_x mu_y + C1
    np.add(t, v, out=v)  # A + E[d]^2 = mu_x^2 + mu_y^2 + C1
    o = out[start:stop]
    np.multiply(t, q, out=o)
    np.multiply(v, e1, out=v)
    np.divide(o, v, out=o)
    if residual:
        np.subtract(np.float32(1.0), o, out=o)


def _ssim_fast(x: F32, y: F32, params: SSIMParams, residual: bool) -> F32:
    h, w = x.shape
    out = np.empty((h, w), dtype=np.float32)
    step = _strip_rows(w)
    starts = range(0, h, step)
    if _workers > 1 and len(starts) > 1:
        pool = _get_pool()
        futures = [
            pool.submit(_ssim_strip, x, y, out, a, min(a + step, h), params, residual)
            for a in starts
        ]
        for f in futures:
            f.result()
    else:
        for a in starts:
            _ssim_strip(x, y, out, a, min(a + step, h), params, residual)
    return out


def ssim_map(x: npt.ArrayLike, y: npt.ArrayLike, params: SSIMParams = SSIMParams()) -> F32:
    """SSIM map of two 2-D images with values in [0, data_range], as float32."""
    xf, yf = _as_f32_pair(x, y)
    return _ssim_fast(xf, yf, params, residual=False)


def dssim_map(x: npt.ArrayLike, y: npt.ArrayLike, params: SSIMParams = SSIMParams()) -> F32:
    """``1 - ssim_map(x, y)``, bit for bit, without a second pass over the frame."""
    xf, yf = _as_f32_pair(x, y)
    return _ssim_fast(xf, yf, params, residual=True)


def ssim_components(
    x: npt.ArrayLike, y: npt.ArrayLike, params: SSIMParams = SSIMParams()
) -> SSIMMaps:
    """SSIM with its luminance, contrast and structure maps (the paper's Figure 3)."""
    xf, yf = _as_f32_pair(x, y)
    mx, my, vx, vy, cxy = _moments_cv(xf, yf, params)
    c1 = np.float32(params.c1)
    c2 = np.float32(params.c2)
    sx = np.sqrt(vx)  # _moments_cv's variances are clamped at 0
    sy = np.sqrt(vy)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    con = (2 * sx * sy + c2) / (vx + vy + c2)
    st = (cxy + c2 / 2) / (sx * sy + c2 / 2)
    full = ssim_map(xf, yf, params)
    return SSIMMaps(full, lum.astype(np.float32), con.astype(np.float32), st.astype(np.float32))


def _as_f32_pair(x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[F32, F32]:
    xf = np.ascontiguousarray(x, dtype=np.float32)
    yf = np.ascontiguousarray(y, dtype=np.float32)
    if xf.ndim != 2 or xf.shape != yf.shape:
        raise ValueError(f"SSIM needs two 2-D images of one shape, got {xf.shape} and {yf.shape}")
    return xf, yf


# --------------------------------------------------------------------------- torch (training)


def _blur_torch(t: torch.Tensor, bh: torch.Tensor, bw: torch.Tensor) -> torch.Tensor:
    # (..., H, W): rows then columns, each a matrix product with the border folded in.
    return bh @ t @ bw.transpose(0, 1)


def ssim_torch(x: torch.Tensor, y: torch.Tensor, params: SSIMParams = SSIMParams()) -> torch.Tensor:
    """Differentiable SSIM map of two (..., H, W) tensors, same definition as :func:`ssim_map`."""
    if x.shape != y.shape:
        raise ValueError(
            f"SSIM needs tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    h, w = x.shape[-2], x.shape[-1]
    dtype = torch.float32
    bh = torch.from_numpy(blur_matrix(h, params)).to(device=x.device, dtype=dtype)
    bw = torch.from_numpy(blur_matrix(w, params)).to(device=x.device, dtype=dtype)
    # Centred on each image's own mean (the moments are shift-invariant; the window weights
    # sum to 1): E[x^2] - E[x]^2 then cancels far less in float32, e.g. on a near-saturated
    # web, where centring on data_range / 2 left errors of 1e-4. Detached: in exact arithmetic
    # the shift changes nothing, so it must not add a gradient path either.
    x32, y32 = x.to(dtype), y.to(dtype)
    sx = x32.mean(dim=(-2, -1), keepdim=True).detach()
    sy = y32.mean(dim=(-2, -1), keepdim=True).detach()
    xc = x32 - sx
    yc = y32 - sy
    mx = _blur_torch(xc, bh, bw)
    my = _blur_torch(yc, bh, bw)
    vx = _blur_torch(xc * xc, bh, bw) - mx * mx
    vy = _blur_torch(yc * yc, bh, bw) - my * my
    cxy = _blur_torch(xc * yc, bh, bw) - mx * my
    mx = mx + sx
    my = my + sy
    c1, c2 = params.c1, params.c2
    num = (2 * mx * my + c1) * (2 * cxy + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    return num / den
