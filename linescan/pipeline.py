"""Offline inspection of one whole image: pure functions, no I/O.

image -> model input (normalise, down-scale) -> tiles on the grid -> batches -> backend
-> overlap-averaged reconstruction -> residual -> score (normalised, on the web only) ->
threshold -> opening -> regions (boxes in the original image's pixels).

This is also the oracle for the daemon: for any split of a web into frames, the daemon's
events must equal ``inspect_image``'s regions on the whole web (``tests/test_streaming.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from linescan.backends import Backend
from linescan.errors import DataError
from linescan.model.bundle import BundleMeta
from linescan.preprocess import InputSpec
from linescan.residual import COMPONENTS, residual_components
from linescan.score import Scoring, score_image
from linescan.segment import Component, Region, components, open_mask, threshold_mask
from linescan.tiling import TileGrid, accumulate, cut_tiles
from linescan.web import Edges

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


class Reconstruction(NamedTuple):
    model_input: F32  # (H, W) normalised, down-scaled
    reconstruction: F32  # (C, H, W) overlap-averaged
    residual: F32  # (H, W) the raw residual (the first component of the bundle's kind)
    score: F32  # (H, W) what is thresholded: the normalised residual, 0 off the web
    edges: list[tuple[int, int, Edges]]  # the web's edges, as (row start, row end, edges)


class InspectionResult(NamedTuple):
    model_input: F32
    reconstruction: F32
    residual: F32
    score: F32
    mask: U8  # (H, W) 0/1 at model scale, after the opening
    regions: list[Region]  # in original image pixels
    threshold: float


@dataclass(frozen=True)
class Settings:
    """What may differ from the bundle's defaults at inspection time."""

    threshold: float | None = None
    stride: int | None = None
    max_batch: int = 64
    min_area_px: int = 0
    opening: int | None = None  # disk diameter in model pixels; None: the bundle's
    web_columns: tuple[int | None, int | None] | None = None  # camera pixels; None: detected


def scoring_for(meta: BundleMeta, settings: Settings = Settings()) -> Scoring:
    """The bundle's scoring, with the web columns of ``settings`` (camera -> model pixels)."""
    return meta.scoring(model_columns(settings.web_columns, meta.input))


def model_columns(
    columns: tuple[int | None, int | None] | None, spec: InputSpec
) -> tuple[int | None, int | None] | None:
    """Fixed web columns in camera pixels -> model pixels (first web column, one past the last)."""
    if columns is None:
        return None
    n = spec.downscale
    left, right = columns
    return (None if left is None else -(-left // n), None if right is None else right // n)


def opening_for(meta: BundleMeta, settings: Settings = Settings()) -> int:
    return settings.opening if settings.opening is not None else meta.opening


def infer_tiles(backend: Backend, tiles: F32, max_batch: int) -> F32:
    outs = [backend.infer(tiles[i : i + max_batch]) for i in range(0, len(tiles), max_batch)]
    out: F32 = np.concatenate(outs, axis=0)
    return out


def reconstruct(
    pixels: npt.NDArray[np.generic],
    meta: BundleMeta,
    backend: Backend,
    settings: Settings = Settings(),
) -> Reconstruction:
    """Input, reconstruction and residual of one image at the model's scale."""
    if pixels.ndim != 2:
        raise DataError(f"expected a 2-D grey image, got shape {pixels.shape}")
    x = meta.input.to_model(pixels)
    h, w = x.shape
    if h < meta.patch or w < meta.patch:
        raise DataError(
            f"image of {pixels.shape[1]}x{pixels.shape[0]} px is {w}x{h} at the model's scale, "
            f"smaller than one {meta.patch}x{meta.patch} patch"
        )
    grid = TileGrid(meta.patch, settings.stride or meta.stride)
    ys, xs = grid.positions(h), grid.positions(w)
    # Groups of whole tile rows: the tiles and reconstructions held at once stay a few batches
    # (not the whole frame), and the sums are taken in the same order as the daemon's.
    acc = np.zeros((meta.channels, h, w), dtype=np.float32)
    count = np.zeros((h, w), dtype=np.float32)
    rows_per_group = max(1, (4 * settings.max_batch) // len(xs))
    for i in range(0, len(ys), rows_per_group):
        group = ys[i : i + rows_per_group]
        tiles = cut_tiles(x, group, xs, meta.patch)
        accumulate(acc, count, infer_tiles(backend, tiles, settings.max_batch), group, xs)
    recon: F32 = acc / count
    comps = residual_components(meta.residual, x, recon, meta.ssim, meta.vae_sigma)
    score, edges = score_image(scoring_for(meta, settings), comps, x)
    return Reconstruction(x, recon, comps[COMPONENTS[meta.residual][0]], score, edges)


def component_to_region(comp: Component, spec: InputSpec, height: int, width: int) -> Region:
    """A model-scale component -> a Region in original pixels (``height`` x ``width``)."""
    y0, y1, x0, x1 = spec.box_to_original(comp.y0, comp.y1, comp.x0, comp.x1, height, width)
    return Region(
        line_start=y0,
        line_end=y1,
        x_start=x0,
        x_end=x1,
        area_px=spec.area_to_original(comp.area, height, width),
        score_max=comp.score_max,
        score_mean=comp.score_sum / comp.area,
    )


def segment(
    score: F32,
    threshold: float,
    spec: InputSpec,
    height: int,
    width: int,
    min_area_px: int = 0,
    opening: int = 4,
) -> tuple[U8, list[Region]]:
    """Threshold, open, label: the opened mask and its regions in original pixels."""
    mask = open_mask(threshold_mask(score, threshold), opening)
    regions = [component_to_region(c, spec, height, width) for c, _ in components(mask, score)]
    return mask, [r for r in regions if r.area_px >= min_area_px]


def inspect_image(
    pixels: npt.NDArray[np.generic],
    meta: BundleMeta,
    backend: Backend,
    settings: Settings = Settings(),
) -> InspectionResult:
    threshold = settings.threshold if settings.threshold is not None else meta.threshold
    if threshold is None:
        raise DataError(
            f"model {meta.name} has no threshold: run `linescan calibrate` on defect-free "
            "images or pass a threshold"
        )
    rec = reconstruct(pixels, meta, backend, settings)
    h, w = pixels.shape
    mask, regions = segment(
        rec.score, threshold, meta.input, h, w, settings.min_area_px, opening_for(meta, settings)
    )
    return InspectionResult(
        rec.model_input, rec.reconstruction, rec.residual, rec.score, mask, regions, threshold
    )
