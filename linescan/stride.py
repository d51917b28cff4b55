"""The tile stride that keeps up with the line: ``inspection.stride = "auto"``.

The model is the daemon's cost (stitching, residual and segmentation add a few per cent), and
the tiles it runs per camera line fall with the square of the stride: at 1/2 scale on a
4096-pixel web, stride 30 runs 1.1 tiles a line, stride 64 0.25 (each model pixel is covered by
about (128/30)^2 = 18 tiles at stride 30, 4 at 64). So the stride is the lever that lets one
machine keep up with a faster line, at a price in detection quality that ``tools/bench.py``'s
stride rows measure (``--stride-quality``: pixel AUROC, defects found and false alarms at the
calibrated threshold, per stride).

``stride = "auto"`` with ``line_rate_hz`` (camera lines per second into this daemon, all its
cameras together) and ``line_width_px`` (pixels per line) has the daemon measure its engine at
start (whole batches, as it will run them) and pick the smallest candidate stride whose
sustainable line rate is at least ``stride_headroom`` times the line rate. Candidates are the
bundle's own stride (its threshold was calibrated there) and the coarser strides that divide
the tile (p/4, p/2, p for 128-pixel tiles), so the grid stays aligned to the tile. If even the
tile itself is too slow, the coarsest is taken and the log says the line cannot be kept up
with: frames will be dropped, counted and named, as under any overload.

Pure functions (``choose_stride``) over a measured engine speed (``measure_tiles_per_s``), so
the choice is tested without timing luck.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from linescan.backends import Backend
from linescan.model.bundle import BundleMeta
from linescan.tiling import TileGrid

__all__ = [
    "StrideChoice",
    "candidate_strides",
    "choose_stride",
    "lines_per_s",
    "measure_tiles_per_s",
    "tiles_per_line",
]


def candidate_strides(patch: int, bundle_stride: int) -> list[int]:
    """The bundle's stride, and every coarser stride that divides the tile, ascending."""
    coarser = {d for d in range(bundle_stride + 1, patch + 1) if patch % d == 0}
    return sorted({min(bundle_stride, patch), *coarser})


def tiles_per_line(meta: BundleMeta, stride: int, width_px: int) -> float:
    """Tiles the engine runs per camera line of ``width_px`` pixels at ``stride`` (model px):
    one tile row per ``stride`` model lines, edge tile included."""
    model_width = meta.input.model_shape(1, width_px)[1]
    per_row = len(TileGrid(meta.patch, stride).positions(model_width))
    return per_row / (stride * meta.input.downscale)


def lines_per_s(tiles_per_s: float, meta: BundleMeta, stride: int, width_px: int) -> float:
    """Camera lines per second an engine of ``tiles_per_s`` keeps up with (model time only)."""
    return tiles_per_s / tiles_per_line(meta, stride, width_px)


def measure_tiles_per_s(
    backend: Backend, patch: int, batch: int, seconds: float = 1.0, max_calls: int = 30
) -> float:
    """Tiles per second of ``backend`` on whole batches of ``batch`` tiles (the median call,
    after two warm-up calls), measured for about ``seconds``."""
    tiles = np.random.default_rng(0).random((batch, 1, patch, patch), np.float32)
    for _ in range(2):  # the first calls pick and compile kernels
        backend.infer(tiles)
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while not times or (time.perf_counter() < t_end and len(times) < max_calls):
        t0 = time.perf_counter()
        backend.infer(tiles)
        times.append(time.perf_counter() - t0)
    return batch / max(float(np.median(times)), 1e-9)


@dataclass(frozen=True)
class StrideChoice:
    """What ``stride = "auto"`` chose, and why."""

    stride: int
    bundle_stride: int
    tiles_per_s: float
    line_rate_hz: float
    width_px: int
    headroom: float
    sustainable: tuple[tuple[int, float], ...]  # (stride, camera lines/s) per candidate
    keeps_up: bool

    @property
    def sustainable_lines_per_s(self) -> float:
        """Camera lines per second the chosen stride keeps up with (model time only)."""
        return dict(self.sustainable)[self.stride]

    def describe(self) -> str:
        """One line for the log and the systemd status."""
        rates = ", ".join(f"{s}: {v:.0f}" for s, v in self.sustainable)
        verdict = (
            f"stride {self.stride} keeps up with {self.line_rate_hz:g} lines/s "
            f"x {self.headroom:g} headroom"
            if self.keeps_up
            else f"no stride keeps up with {self.line_rate_hz:g} lines/s x {self.headroom:g} "
            f"headroom: stride {self.stride}, the coarsest, and frames will be dropped"
        )
        return (
            f"{verdict} (engine {self.tiles_per_s:.0f} tiles/s; lines/s by stride at "
            f"{self.width_px} px: {rates}; bundle stride {self.bundle_stride})"
        )

    def as_dict(self) -> dict[str, object]:
        """For status messages."""
        return {
            "stride": self.stride,
            "auto": True,
            "bundle_stride": self.bundle_stride,
            "line_rate_hz": self.line_rate_hz,
            "line_width_px": self.width_px,
            "headroom": self.headroom,
            "tiles_per_s": round(self.tiles_per_s, 1),
            "sustainable_lines_per_s": round(self.sustainable_lines_per_s, 1),
            "keeps_up": self.keeps_up,
        }


def choose_stride(
    meta: BundleMeta,
    tiles_per_s: float,
    line_rate_hz: float,
    width_px: int,
    headroom: float = 1.3,
) -> StrideChoice:
    """The smallest candidate stride that sustains ``headroom`` x ``line_rate_hz`` camera
    lines per second of ``width_px`` pixels on an engine of ``tiles_per_s``; the coarsest
    candidate (``keeps_up`` False) when none does."""
    if tiles_per_s <= 0 or line_rate_hz <= 0 or headroom < 1 or width_px < 1:
        raise ValueError(
            "choose_stride needs tiles_per_s > 0, line_rate_hz > 0, headroom >= 1, width_px >= 1"
        )
    strides = candidate_strides(meta.patch, meta.stride)
    rates = tuple((s, lines_per_s(tiles_per_s, meta, s, width_px)) for s in strides)
    need = headroom * line_rate_hz
    fits = [s for s, rate in rates if rate >= need]
    return StrideChoice(
        stride=fits[0] if fits else strides[-1],
        bundle_stride=meta.stride,
        tiles_per_s=tiles_per_s,
        line_rate_hz=line_rate_hz,
        width_px=width_px,
        headroom=headroom,
        sustainable=rates,
        keeps_up=bool(fits),
    )
