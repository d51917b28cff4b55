"""Tiles on a fixed grid, and overlap-averaged stitching.

A ``TileGrid`` places tiles at 0, stride, 2*stride, ... along an axis and, where the last regular
tile does not reach the end, one more tile aligned to the edge (stride 128 for 128-pixel tiles
would leave seams; the paper uses 30). The grid is frozen and the functions are pure: nothing is
remembered between ``tile`` and ``stitch`` (unlike tilers that keep sizes on ``self``).

In the daemon the rows of the grid sit at absolute web-line coordinates, so the way the web is
cut into camera frames never moves a tile; see ``lines.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TileGrid:
    tile: int = 128
    stride: int = 30

    def __post_init__(self) -> None:
        if self.tile < 1:
            raise ValueError(f"tile size must be >= 1, got {self.tile}")
        if not 1 <= self.stride <= self.tile:
            raise ValueError(f"stride must be in 1..tile ({self.tile}), got {self.stride}")

    def positions(self, length: int) -> list[int]:
        """Start offsets of the tiles along an axis of ``length`` pixels, edge tile included."""
        if length < self.tile:
            raise ValueError(
                f"an axis of {length} pixels is shorter than one {self.tile}-pixel tile"
            )
        pos = list(range(0, length - self.tile + 1, self.stride))
        if pos[-1] != length - self.tile:
            pos.append(length - self.tile)
        return pos

    def regular_rows_upto(self, lines: int) -> list[int]:
        """Regular (non-edge) row offsets whose tiles fit entirely within ``lines`` lines."""
        if lines < self.tile:
            return []
        return list(range(0, lines - self.tile + 1, self.stride))

    def coords(self, height: int, width: int) -> list[tuple[int, int]]:
        """(y, x) of every tile of a ``height`` x ``width`` image, row by row."""
        xs = self.positions(width)
        return [(y, x) for y in self.positions(height) for x in xs]


def cut_tiles(image: F32, ys: list[int], xs: list[int], tile: int) -> F32:
    """(len(ys) * len(xs), 1, tile, tile) tiles of a 2-D image, row-major."""
    out = np.empty((len(ys) * len(xs), 1, tile, tile), dtype=np.float32)
    i = 0
    for y in ys:
        for x in xs:
            out[i, 0] = image[y : y + tile, x : x + tile]
            i += 1
    return out


def accumulate(
    acc: F32, count: F32, recon: F32, ys: list[int], xs: list[int], y_origin: int = 0
) -> None:
    """Add reconstructed tiles into an (C, H, W) sum and an (H, W) count, in place.

    ``recon`` is (len(ys) * len(xs), C, tile, tile) row-major, as ``cut_tiles`` made them;
    ``y_origin`` is the absolute row of ``acc``'s first row (the daemon's band starts late).
    The sum is always taken in the same order (tile rows top to bottom, tiles left to right),
    so the streaming daemon and the offline pipeline add the same numbers in the same order.

    The count gets one row of column coverage per tile row instead of a 1 per tile: counts are
    small whole numbers, exact in float32 in any order, so the result is identical and half of
    the per-tile Python work goes away.
    """
    tile = recon.shape[-1]
    cover = np.zeros(count.shape[1], dtype=np.float32)
    for x in xs:
        cover[x : x + tile] += 1.0
    i = 0
    for y in ys:
        r = y - y_origin
        band = acc[:, r : r + tile]
        for x in xs:
            view = band[:, :, x : x + tile]
            np.add(view, recon[i], out=view)
            i += 1
        count[r : r + tile] += cover


def stitch(recon: F32, ys: list[int], xs: list[int], height: int, width: int) -> F32:
    """Average overlapping tiles (row-major over ``ys`` x ``xs``) into a (C, H, W) image."""
    acc = np.zeros((recon.shape[1], height, width), dtype=np.float32)
    count = np.zeros((height, width), dtype=np.float32)
    accumulate(acc, count, recon, ys, xs)
    if not np.all(count > 0):
        raise ValueError("the tiles do not cover the image")
    out: F32 = acc / count
    return out
