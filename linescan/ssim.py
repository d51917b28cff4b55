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


def _blur_cv(img: F32, kernel: F32) -> F32:
    out: F32 = cv2.sepFilter2D(img, cv2.CV_32F, kernel, kernel, borderType=cv2.BORDER_REFLECT)
    return out


def _moments_cv(x: F32, y: F32, params: SSIMParams) -> tuple[F32, F32, F32, F32, F32]:
    """Windowed mu_x, mu_y, var_x, var_y, cov_xy of two float32 images."""
    k = params.kernel().astype(np.float32)
    # Centre the data first: the variances are differences of large, nearly equal numbers
    # (E[x^2] - E[x]^2), and centring near 0 keeps float32 well inside the 1e-4 budget.
    shift = np.float32(0.5 * params.data_range)
    xc = x - shift
    yc = y - shift
    mx = _blur_cv(xc, k)
    my = _blur_cv(yc, k)
    vx = _blur_cv(xc * xc, k) - mx * mx
    vy = _blur_cv(yc * yc, k) - my * my
    cxy = _blur_cv(xc * yc, k) - mx * my
    return mx + shift, my + shift, vx, vy, cxy


def ssim_map(x: npt.ArrayLike, y: npt.ArrayLike, params: SSIMParams = SSIMParams()) -> F32:
    """SSIM map of two 2-D images with values in [0, data_range], as float32."""
    xf, yf = _as_f32_pair(x, y)
    mx, my, vx, vy, cxy = _moments_cv(xf, yf, params)
    c1 = np.float32(params.c1)
    c2 = np.float32(params.c2)
    num = (2 * mx * my + c1) * (2 * cxy + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    out: F32 = (num / den).astype(np.float32, copy=False)
    return out


def ssim_components(
    x: npt.ArrayLike, y: npt.ArrayLike, params: SSIMParams = SSIMParams()
) -> SSIMMaps:
    """SSIM with its luminance, contrast and structure maps (the paper's Figure 3)."""
    xf, yf = _as_f32_pair(x, y)
    mx, my, vx, vy, cxy = _moments_cv(xf, yf, params)
    c1 = np.float32(params.c1)
    c2 = np.float32(params.c2)
    sx = np.sqrt(np.maximum(vx, 0))
    sy = np.sqrt(np.maximum(vy, 0))
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
    shift = 0.5 * params.data_range
    xc = x.to(dtype) - shift
    yc = y.to(dtype) - shift
    mx = _blur_torch(xc, bh, bw)
    my = _blur_torch(yc, bh, bw)
    vx = _blur_torch(xc * xc, bh, bw) - mx * mx
    vy = _blur_torch(yc * yc, bh, bw) - my * my
    cxy = _blur_torch(xc * yc, bh, bw) - mx * my
    mx = mx + shift
    my = my + shift
    c1, c2 = params.c1, params.c2
    num = (2 * mx * my + c1) * (2 * cxy + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    return num / den
