"""Synthetic images with known ground truth, for tests, demos and a first end-to-end check.

Why: the test suite must not depend on downloaded datasets (a user's clone has none), yet it
needs textures with defects whose exact pixels are known. Two generators:

- The paper's toy example (Bergmann et al. 2018, Figure 3): checkerboards of various scales and
  orientations for training; a checkerboard with grey strokes and dots for testing. Small enough
  to train on a laptop; it is where L2 and SSIM residuals visibly differ.
- A woven fabric web, the product's real use: an endless plain weave seen by a line-scan camera.
  ``WovenWeb.lines(start, count)`` is a *pure function of the absolute line index and column*
  (hashed noise, no stateful RNG), and so is ``plant_defects``. Rendering lines [0, N) in any
  split of blocks therefore gives bit-identical pixels to rendering them at once, which is
  exactly the oracle the streaming daemon needs: streaming output must equal offline output.

Bit-exactness across splits relies on every per-pixel computation being elementwise IEEE
arithmetic (``+ - * /``, floor, comparisons), which numpy rounds the same way whatever the array
length or SIMD path. Transcendental functions (exp, cos) may take different SIMD and scalar code
paths for different block lengths, so the web and the defects are built from polynomials only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, TypeAlias

import cv2
import numpy as np
import numpy.typing as npt

from linescan.data.images import IMAGE_SUFFIXES, write_grey
from linescan.errors import DataError

U8: TypeAlias = npt.NDArray[np.uint8]
F64: TypeAlias = npt.NDArray[np.float64]
Mask: TypeAlias = npt.NDArray[np.bool_]
Size: TypeAlias = int | tuple[int, int]

__all__ = [
    "DEFECT_KINDS",
    "Defect",
    "EdgedWeb",
    "ToyScene",
    "WovenWeb",
    "checkerboard",
    "plant_defects",
    "random_defects",
    "toy_test_image",
    "toy_test_scene",
    "toy_train_images",
    "write_synthetic_dataset",
]

# ---------------------------------------------------------------------------------------------
# The paper's toy example
# ---------------------------------------------------------------------------------------------

_DARK = 40.0
_BRIGHT = 215.0
_EDGE_HALF_WIDTH = 0.75  # px: the anti-aliased ramp across an edge is ~1.5 px wide
_TOY_PERIODS = (8.0, 32.0)


def _hw(size: Size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {size}")
    return int(h), int(w)


def checkerboard(
    size: Size,
    period: float,
    angle_deg: float,
    phase: tuple[float, float] = (0.0, 0.0),
    rng: np.random.Generator | None = None,
    noise: float = 2.0,
) -> U8:
    """A checkerboard of squares of side ``period`` px rotated by ``angle_deg``, values ~40/~215.

    ``size`` is an int (square) or (height, width). Edges are anti-aliased over ~1.5 px (a real
    camera never sees a step edge). ``phase`` shifts the pattern (px, along the rotated axes).
    With ``rng``, Gaussian sensor noise of standard deviation ``noise`` is added.
    """
    if period <= 0:
        raise ValueError(f"checkerboard period must be > 0, got {period}")
    h, w = _hw(size)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy -= (h - 1) / 2.0
    xx -= (w - 1) / 2.0
    t = np.deg2rad(angle_deg)
    c, s = np.cos(t), np.sin(t)
    u = xx * c + yy * s + phase[0]
    v = -xx * s + yy * c + phase[1]

    def soft_square(a: F64) -> F64:
        # Signed distance to the nearest edge (+ inside even cells, - inside odd), clipped to a
        # ramp: a square wave with anti-aliased edges.
        cell = np.floor(a / period)
        sign = 1.0 - 2.0 * np.mod(cell, 2.0)
        dist = np.abs(a - period * np.round(a / period))
        out: F64 = np.clip(sign * dist / _EDGE_HALF_WIDTH, -1.0, 1.0)
        return out

    g = soft_square(u) * soft_square(v)
    img = (_DARK + _BRIGHT) / 2.0 + (_BRIGHT - _DARK) / 2.0 * g
    if rng is not None and noise > 0:
        img = img + rng.normal(0.0, noise, size=img.shape)
    out: U8 = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def _random_board(size: Size, rng: np.random.Generator) -> U8:
    period = float(rng.uniform(*_TOY_PERIODS))
    angle = float(rng.uniform(0.0, 90.0))  # a checkerboard is symmetric under 90° rotation
    phase = (float(rng.uniform(0.0, 2 * period)), float(rng.uniform(0.0, 2 * period)))
    return checkerboard(size, period, angle, phase, rng)


def toy_train_images(n: int, size: Size, seed: int) -> list[U8]:
    """``n`` defect-free checkerboards, square side 8..32 px, random orientation and phase."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    return [_random_board(size, rng) for _ in range(n)]


class ToyScene(NamedTuple):
    """A toy test image, the defect-free board under it, and the defect mask."""

    clean: U8
    image: U8
    mask: Mask


def toy_test_scene(size: Size, seed: int) -> ToyScene:
    """A checkerboard with grey strokes (thick lines) and dots (filled discs) drawn onto it.

    Defects have a uniform grey of ~128 (the mean of the board, so that a per-pixel L2 residual
    is no larger on them than on a blurred edge: the paper's point). Not anti-aliased, so the
    mask is exactly the set of pixels that were painted.
    """
    h, w = _hw(size)
    rng = np.random.default_rng(seed)
    clean = _random_board((h, w), rng)
    image = clean.copy()
    mask = np.zeros((h, w), np.bool_)
    scale = min(h, w) / 128.0
    n_strokes = int(rng.integers(2, 4))
    n_dots = int(rng.integers(3, 6))
    for k in range(n_strokes + n_dots):
        layer = np.zeros((h, w), np.uint8)
        if k < n_strokes:
            length = rng.uniform(0.2, 0.45) * min(h, w)
            angle = rng.uniform(0.0, np.pi)
            cx, cy = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
            dx, dy = 0.5 * length * np.cos(angle), 0.5 * length * np.sin(angle)
            p0 = (round(cx - dx), round(cy - dy))
            p1 = (round(cx + dx), round(cy + dy))
            thickness = max(2, round(rng.uniform(3.0, 6.0) * scale))
            cv2.line(layer, p0, p1, 255, thickness, cv2.LINE_8)
        else:
            radius = max(2, round(rng.uniform(2.5, 6.0) * scale))
            centre = (int(rng.integers(radius, w - radius)), int(rng.integers(radius, h - radius)))
            cv2.circle(layer, centre, radius, 255, -1, cv2.LINE_8)
        grey = int(rng.integers(112, 145))
        painted = layer > 0
        image[painted] = grey
        mask |= painted
    return ToyScene(clean=clean, image=image, mask=mask)


def toy_test_image(size: Size, seed: int) -> tuple[U8, Mask]:
    """The paper's toy test image and its defect mask (see ``toy_test_scene``)."""
    scene = toy_test_scene(size, seed)
    return scene.image, scene.mask


# ---------------------------------------------------------------------------------------------
# Position hashing: pseudo-random numbers as a pure function of integer coordinates
# ---------------------------------------------------------------------------------------------

_M64 = (1 << 64) - 1
_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xC2B2AE3D27D4EB4F)
_K3 = np.uint64(0x165667B19E3779F9)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_INV_2_32 = 1.0 / 4294967296.0


def _as_u64(a: npt.ArrayLike) -> npt.NDArray[np.uint64]:
    arr = np.asarray(a)
    # Reinterpret (two's complement) rather than convert, so negative ints hash fine.
    return np.atleast_1d(arr.astype(np.int64)).view(np.uint64)


def _hash(a: npt.ArrayLike, b: npt.ArrayLike, key: int) -> npt.NDArray[np.uint64]:
    """SplitMix64-style mix of two integer coordinate arrays (broadcast) and a 64-bit key.

    All arithmetic is on uint64 *arrays* (never numpy scalars), where overflow wraps silently.
    """
    ua, ub = _as_u64(a), _as_u64(b)
    k = np.full(1, key & _M64, dtype=np.uint64)
    x = ua * _K1 + ub * _K2 + (k ^ _K3)
    x ^= x >> np.uint64(30)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    out: npt.NDArray[np.uint64] = x
    return out


def _uniform_pair(h: npt.NDArray[np.uint64]) -> tuple[F64, F64]:
    """Two independent uniforms in [0, 1) from the high and low 32 bits of a hash."""
    hi = (h >> np.uint64(32)).astype(np.float64) * _INV_2_32
    lo = (h & np.uint64(0xFFFFFFFF)).astype(np.float64) * _INV_2_32
    return hi, lo


def _key(seed: int, tag: int) -> int:
    # Distinct streams per (seed, purpose); Python ints, so no numpy scalar overflow warnings.
    return (seed * 0x2545F4914F6CDD1D + tag * 0x9E3779B97F4A7C15) & _M64


def _smoothstep(t: F64) -> F64:
    t = np.clip(t, 0.0, 1.0)
    out: F64 = t * t * (3.0 - 2.0 * t)
    return out


def _bump(f: F64) -> F64:
    """Thread cross-section: 0 at the edges of a thread, 1 at its centre (f in [0, 1))."""
    out: F64 = 4.0 * f * (1.0 - f)
    return out


# Mean of the weave profile over a cell, for uniformly distributed f: E[bump] = 2/3.
_LIFT = 0.6  # how bright a thread stays where it dives under the crossing thread
_WEAVE_MEAN = (2.0 / 3.0) * (_LIFT + (1.0 - _LIFT) * 2.0 / 3.0)

# ---------------------------------------------------------------------------------------------
# Woven web
# ---------------------------------------------------------------------------------------------


class WovenWeb:
    """An endless plain-weave fabric web as a line-scan camera sees it.

    Lines run across the web (``width`` columns); the line index grows along the web. Warp
    threads run along the web (vertical in the image) with period ``thread_period`` px, weft
    threads across it with period ``weft_period`` (default: the same). In a plain weave warp
    and weft alternate on top at every crossing. Each thread has its own mild brightness
    offset (``thread_jitter``), and every pixel fine noise (``noise``, standard deviation),
    all hashed from absolute (line, column, seed): the web is a pure function of position.
    """

    def __init__(
        self,
        width: int,
        seed: int,
        thread_period: float = 8.0,
        *,
        weft_period: float | None = None,
        mean: float = 120.0,
        contrast: float = 70.0,
        thread_jitter: float = 6.0,
        noise: float = 3.0,
    ) -> None:
        if width < 1:
            raise ValueError(f"web width must be >= 1, got {width}")
        if thread_period < 2.0 or (weft_period is not None and weft_period < 2.0):
            raise ValueError("thread periods must be >= 2 px")
        self.width = int(width)
        self.seed = int(seed)
        self.thread_period = float(thread_period)
        self.weft_period = float(thread_period if weft_period is None else weft_period)
        self.mean = float(mean)
        self.contrast = float(contrast)
        self.thread_jitter = float(thread_jitter)
        self.noise = float(noise)
        # Everything that depends on the column only is fixed for the web: compute it once.
        cols = np.arange(self.width, dtype=np.int64)
        fx = (cols + 0.5) / self.thread_period
        self._warp_idx = np.floor(fx).astype(np.int64)
        self._warp_prof = _bump(fx - self._warp_idx)
        u, _ = _uniform_pair(_hash(self._warp_idx, 0, _key(self.seed, 1)))
        self._warp_off = (2.0 * u - 1.0) * self.thread_jitter

    def __repr__(self) -> str:
        return (
            f"WovenWeb(width={self.width}, seed={self.seed}, thread_period={self.thread_period}, "
            f"weft_period={self.weft_period})"
        )

    def lines(self, start: int, count: int) -> U8:
        """Web lines ``[start, start + count)`` as a (count, width) uint8 array.

        A pure function of the absolute line index: any split into blocks, concatenated,
        equals rendering all lines at once, bit for bit.
        """
        if start < 0 or count < 0:
            raise ValueError(f"lines need start >= 0 and count >= 0, got {start}, {count}")
        rows = np.arange(start, start + count, dtype=np.int64)[:, None]
        fy = (rows + 0.5) / self.weft_period
        weft_idx = np.floor(fy).astype(np.int64)
        weft_prof = _bump(fy - weft_idx)
        u, _ = _uniform_pair(_hash(weft_idx, 0, _key(self.seed, 2)))
        weft_off = (2.0 * u - 1.0) * self.thread_jitter

        warp_prof = self._warp_prof[None, :]
        warp_on_top = ((self._warp_idx[None, :] + weft_idx) & 1) == 0
        warp_v = warp_prof * (_LIFT + (1.0 - _LIFT) * weft_prof)
        weft_v = weft_prof * (_LIFT + (1.0 - _LIFT) * warp_prof)
        v = np.where(warp_on_top, warp_v, weft_v)
        off = np.where(warp_on_top, self._warp_off[None, :], weft_off)

        # Fine noise: sum of two uniforms (triangular, standard deviation 1 after scaling).
        n1, n2 = _uniform_pair(_hash(rows, np.arange(self.width)[None, :], _key(self.seed, 3)))
        fine = (n1 + n2 - 1.0) * (self.noise * 6.0**0.5)

        img = self.mean + self.contrast * (v - _WEAVE_MEAN) + off + fine
        out: U8 = np.clip(np.rint(img), 0.0, 255.0).astype(np.uint8)
        return np.ascontiguousarray(out.reshape(count, self.width))


class EdgedWeb:
    """A woven web narrower than the camera's view, with a wandering left edge.

    What a line-scan camera over a real web sees (the AITEX fabrics: a bright backlight beyond
    the web's edge, a bright selvage line along it): columns left of the edge show the
    backlight (``background`` grey, near saturation, with fine noise), then a ``selvage`` of
    a few bright pixels, then the weave of ``WovenWeb``. The edge's column at line y is
    ``edge + shift(y)``: a slow wander of ``wander`` px (a triangle wave of period ``period``
    lines) plus any ``steps`` ((line, dx): from that line on, the web sits dx px further right,
    reached over ``ramp`` lines). Like ``WovenWeb``, a pure function of (line, column): any
    split into frames gives the same pixels.
    """

    def __init__(
        self,
        width: int,
        seed: int,
        edge: int,
        *,
        wander: float = 4.0,
        period: int = 2000,
        steps: Sequence[tuple[int, int]] = (),
        ramp: int = 200,
        background: float = 238.0,
        selvage: int = 3,
        **weave: float,
    ) -> None:
        if not 0 < edge < width:
            raise ValueError(f"the edge must lie inside the view (0 < {edge} < {width})")
        self.width = int(width)
        self.seed = int(seed)
        self.edge = int(edge)
        self.wander = float(wander)
        self.period = int(period)
        self.steps = tuple((int(a), int(b)) for a, b in steps)
        self.ramp = max(1, int(ramp))
        self.background = float(background)
        self.selvage = int(selvage)
        self.web = WovenWeb(width, seed, **weave)

    def shift(self, rows: npt.NDArray[np.int64]) -> F64:
        """The edge's offset from ``edge`` at each line (float px)."""
        phase = (rows % self.period) / self.period
        tri = 4.0 * np.abs(phase - 0.5) - 1.0  # -1..1, piecewise linear
        out: F64 = self.wander * tri
        for line, dx in self.steps:
            out = out + dx * np.clip((rows - line) / self.ramp, 0.0, 1.0)
        return out

    def edge_at(self, line: int) -> int:
        """The first web column at ``line``."""
        return int(np.floor(self.edge + self.shift(np.array([line]))[0]))

    def lines(self, start: int, count: int) -> U8:
        if start < 0 or count < 0:
            raise ValueError(f"lines need start >= 0 and count >= 0, got {start}, {count}")
        weave = self.web.lines(start, count).astype(np.float64)
        rows = np.arange(start, start + count, dtype=np.int64)[:, None]
        cols = np.arange(self.width, dtype=np.int64)[None, :]
        left = np.floor(self.edge + self.shift(rows))  # (count, 1)
        n1, n2 = _uniform_pair(_hash(rows, cols, _key(self.seed, 11)))
        light = self.background + (n1 + n2 - 1.0) * 6.0
        selv = 215.0 + (n1 - 0.5) * 10.0
        img = np.where(cols < left, light, np.where(cols < left + self.selvage, selv, weave))
        out: U8 = np.clip(np.rint(img), 0.0, 255.0).astype(np.uint8)
        return np.ascontiguousarray(out)


# ---------------------------------------------------------------------------------------------
# Planted defects
# ---------------------------------------------------------------------------------------------

DEFECT_KINDS = ("hole", "stain", "broken_thread", "knot")


@dataclass(frozen=True)
class Defect:
    """A defect's kind and bounding box in absolute web coordinates (ends exclusive).

    Lines ``[line, line + height)``, columns ``[x, x + width)``. ``broken_thread`` fills its box
    (make it thin: the thread runs along the longer side); the other kinds are ellipses
    inscribed in it.
    """

    kind: str
    line: int
    x: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.kind not in DEFECT_KINDS:
            raise ValueError(f"unknown defect kind {self.kind!r}; known: {DEFECT_KINDS}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"defect box must be at least 1x1, got {self.height}x{self.width}")
        if self.line < 0 or self.x < 0:
            raise ValueError(f"defect box must start at line, x >= 0, got {self.line}, {self.x}")

    @property
    def line_end(self) -> int:
        return self.line + self.height

    @property
    def x_end(self) -> int:
        return self.x + self.width

    def _key(self) -> int:
        # Defects carry no seed: their texture and polarity are hashed from their own box.
        return (
            self.line * 0x9E3779B1
            + self.x * 0x85EBCA77
            + self.height * 0xC2B2AE3D
            + self.width * 0x27D4EB2F
            + DEFECT_KINDS.index(self.kind) * 0x165667B1
        ) & _M64


def _ellipse_r2(defect: Defect, rows: F64, cols: F64) -> F64:
    """Squared normalised radius of pixel centres in the ellipse inscribed in the box."""
    cy = defect.line + defect.height / 2.0
    cx = defect.x + defect.width / 2.0
    ry = defect.height / 2.0
    rx = defect.width / 2.0
    dy = (rows + 0.5 - cy) / ry
    dx = (cols + 0.5 - cx) / rx
    out: F64 = dy * dy + dx * dx
    return out


def _render_defect(
    defect: Defect, patch: F64, rows: npt.NDArray[np.int64], cols: npt.NDArray[np.int64]
) -> tuple[F64, Mask]:
    """New pixel values and mask for the part of ``defect`` on the grid ``rows`` x ``cols``."""
    key = defect._key()
    r = rows.astype(np.float64)[:, None]
    c = cols.astype(np.float64)[None, :]
    u1, u2 = _uniform_pair(_hash(rows[:, None], cols[None, :], key))
    grain = u1 + u2 - 1.0  # triangular in (-1, 1)
    if defect.kind == "hole":
        # Backing light is blocked by nothing: a dark, almost flat ellipse with a ~1 px rim.
        r2 = _ellipse_r2(defect, r, c)
        alpha = _smoothstep((1.0 - r2) / 0.3)
        target = 22.0 + 6.0 * grain
        return patch + alpha * (target - patch), alpha >= 0.5
    if defect.kind == "stain":
        # Oil or dirt: shifts the brightness smoothly, keeps the weave visible.
        polarity = -1.0 if (key >> 7) & 1 == 0 else 1.0
        r2 = _ellipse_r2(defect, r, c)
        alpha = _smoothstep((1.0 - r2) / 0.6)
        return patch + alpha * polarity * 45.0, alpha >= 0.5
    if defect.kind == "knot":
        # A lump of fibre standing above the weave: bright, with a coarse grain of its own.
        r2 = _ellipse_r2(defect, r, c)
        alpha = _smoothstep((1.0 - r2) / 0.5)
        target = 235.0 + 12.0 * grain
        return patch + alpha * (target - patch), alpha >= 0.5
    # broken_thread: the thread is missing, the gap shows the dark backing with only a faint
    # trace of the weave.
    shape = np.broadcast_shapes(r.shape, c.shape)
    target = 35.0 + 0.2 * (patch - 120.0) + 4.0 * grain
    return np.broadcast_to(target, shape).astype(np.float64), np.ones(shape, np.bool_)


def plant_defects(web_lines: U8, start_line: int, defects: Sequence[Defect]) -> Mask:
    """Draw ``defects`` into the block ``web_lines`` (in place) and return its defect mask.

    ``web_lines`` holds absolute lines ``[start_line, start_line + len(web_lines))``. Defects
    outside the block are skipped, those straddling it drawn in part. Each defect is a pure
    function of absolute coordinates and of the web pixel under it, so any split of the web
    into blocks gives the same pixels and mask as one block. Defects are drawn in list order.
    """
    if web_lines.ndim != 2 or web_lines.dtype != np.uint8:
        raise ValueError(f"web_lines must be 2-D uint8, got {web_lines.dtype} {web_lines.shape}")
    n, width = web_lines.shape
    mask = np.zeros((n, width), np.bool_)
    for d in defects:
        y0, y1 = max(d.line, start_line), min(d.line_end, start_line + n)
        x0, x1 = d.x, min(d.x_end, width)
        if y0 >= y1 or x0 >= x1:
            continue
        rows = np.arange(y0, y1, dtype=np.int64)
        cols = np.arange(x0, x1, dtype=np.int64)
        sl = (slice(y0 - start_line, y1 - start_line), slice(x0, x1))
        patch = web_lines[sl].astype(np.float64)
        values, m = _render_defect(d, patch, rows, cols)
        web_lines[sl] = np.clip(np.rint(values), 0.0, 255.0).astype(np.uint8)
        mask[sl] |= m
    return mask


def random_defects(
    rng: np.random.Generator,
    width: int,
    line_start: int,
    line_end: int,
    count: int,
    min_size: int = 6,
    max_size: int = 40,
    kinds: Sequence[str] = DEFECT_KINDS,
    thread_width: tuple[int, int] = (2, 4),
) -> list[Defect]:
    """``count`` random defects in lines [line_start, line_end), sorted along the web.

    Boxes are ``min_size``..``max_size`` px (a broken thread is ``thread_width`` px thin, 2..4
    by default: note that a model working at 1/n scale with the paper's diameter-4 opening
    cannot see threads thinner than about 4n px), lie inside the
    web's width, and are at least ``2 * max_size`` lines apart (gap between boxes), so each
    defect is its own region whatever the tiling. Raises ``ValueError`` if they do not fit.
    """
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    if count < 0 or not kinds:
        raise ValueError("count must be >= 0 and kinds non-empty")
    if width < max_size:
        raise ValueError(f"web width {width} is smaller than max_size {max_size}")
    for k in kinds:
        if k not in DEFECT_KINDS:
            raise ValueError(f"unknown defect kind {k!r}; known: {DEFECT_KINDS}")
    if count == 0:
        return []
    shapes: list[tuple[str, int, int]] = []
    for _ in range(count):
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "broken_thread":
            length = int(rng.integers(min_size, max_size + 1))
            thin = int(rng.integers(thread_width[0], thread_width[1] + 1))
            h, w = (length, thin) if rng.random() < 0.5 else (thin, length)
        elif kind == "knot":
            hi = max(min_size, min_size + (max_size - min_size) // 3)
            h = int(rng.integers(min_size, hi + 1))
            w = int(rng.integers(min_size, hi + 1))
        else:
            h = int(rng.integers(min_size, max_size + 1))
            w = int(rng.integers(min_size, max_size + 1))
        shapes.append((kind, h, w))
    gap = 2 * max_size
    need = sum(h for _, h, _ in shapes) + gap * (count - 1)
    slack = (line_end - line_start) - need
    if slack < 0:
        raise ValueError(
            f"{count} defects of up to {max_size} px, {gap} lines apart, do not fit in lines "
            f"[{line_start}, {line_end})"
        )
    # Split the slack into count + 1 random non-negative parts: before, between, after.
    cuts = np.sort(rng.integers(0, slack + 1, size=count))
    extra = np.diff(np.concatenate([[0], cuts]))
    defects: list[Defect] = []
    y = line_start
    for (kind, h, w), e in zip(shapes, extra, strict=True):
        y += int(e)
        x = int(rng.integers(0, width - w + 1))
        defects.append(Defect(kind=kind, line=y, x=x, height=h, width=w))
        y += h + gap
    return defects


# ---------------------------------------------------------------------------------------------
# Datasets on disk
# ---------------------------------------------------------------------------------------------


def write_synthetic_dataset(
    root: Path,
    kind: Literal["toy", "woven"],
    n_train: int,
    n_test_good: int,
    n_test_defect: int,
    size: tuple[int, int],
    seed: int,
) -> Path:
    """Write an MVTec-AD layout dataset of synthetic images under ``root`` and return ``root``.

    ``train/good``, ``test/good``, ``test/defect`` and ``ground_truth/defect/<stem>_mask.png``
    (255 = defect); ``size`` is (height, width). ``toy``: checkerboards, the test defects are the
    paper's strokes and dots. ``woven``: consecutive stretches of one ``WovenWeb``, each test
    defect image holding 1-2 planted defects. ``root`` must not exist or be empty, so that no
    stale file from an earlier, larger dataset can slip in.
    """
    root = Path(root)
    if kind not in ("toy", "woven"):
        raise ValueError(f"kind must be 'toy' or 'woven', got {kind!r}")
    if min(n_train, n_test_good, n_test_defect) < 0:
        raise ValueError("image counts must be >= 0")
    h, w = _hw(size)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root}: exists and is not an empty folder; refusing to write into it")
    ext = IMAGE_SUFFIXES[0]  # .png: lossless, so masks and pixels read back exactly
    seeds = np.random.SeedSequence(seed).generate_state(4)
    train_dir = root / "train" / "good"
    good_dir = root / "test" / "good"
    defect_dir = root / "test" / "defect"
    gt_dir = root / "ground_truth" / "defect"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for d in (train_dir, good_dir):
            d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{root}: cannot create dataset folders ({exc})") from exc

    def name(k: int) -> str:
        return f"{k:03d}"

    if kind == "toy":
        for k, img in enumerate(toy_train_images(n_train, (h, w), int(seeds[0]))):
            write_grey(train_dir / f"{name(k)}{ext}", img)
        for k, img in enumerate(toy_train_images(n_test_good, (h, w), int(seeds[1]))):
            write_grey(good_dir / f"{name(k)}{ext}", img)
        for k in range(n_test_defect):
            img, mask = toy_test_image((h, w), int(seeds[2]) + k)
            write_grey(defect_dir / f"{name(k)}{ext}", img)
            write_grey(gt_dir / f"{name(k)}_mask{ext}", mask.astype(np.uint8) * 255)
        return root

    web = WovenWeb(w, int(seeds[0]))
    rng = np.random.default_rng(int(seeds[1]))
    line = 0
    for k in range(n_train):
        write_grey(train_dir / f"{name(k)}{ext}", web.lines(line, h))
        line += h
    for k in range(n_test_good):
        write_grey(good_dir / f"{name(k)}{ext}", web.lines(line, h))
        line += h
    max_size = max(2, min(40, h // 4, w // 2))
    min_size = min(6, max_size)
    for k in range(n_test_defect):
        block = web.lines(line, h)
        count = 2 if h >= 4 * max_size and rng.random() < 0.5 else 1
        defects = random_defects(rng, w, line, line + h, count, min_size, max_size)
        mask = plant_defects(block, line, defects)
        write_grey(defect_dir / f"{name(k)}{ext}", block)
        write_grey(gt_dir / f"{name(k)}_mask{ext}", mask.astype(np.uint8) * 255)
        line += h
    return root
