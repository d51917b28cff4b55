"""The streaming back half: stitch -> residual -> score -> mask -> regions, one segment at a time.

Fed the tile rows of a ``Band`` (after inference), in order, it produces exactly the regions
the offline pipeline finds on the whole segment (``tests/test_streaming.py`` checks it for
random splits of a web into frames). How rows become final:

* reconstruction: after the regular tile row at y is stitched, rows below min(y + stride,
  m_rows - patch) get no more tiles (later regular rows start lower, and the segment's
  edge-aligned row starts at or below m_rows - patch). At the segment's end every row is final.
* residual: a residual row needs ``halo`` (5 for an 11-window SSIM) final rows below it; it is
  computed on a chunk with that halo on both sides and only the centre is kept, so the
  OpenCV filters do the same arithmetic as on the whole image.
* score: element-wise from the residual row, its column, the web's edges in its block of rows
  (``web.EdgeTracker``, fed the input rows as they arrive: a block's edges are known long
  before its residual rows are final) and its distance from the segment's ends. The last rows
  of a segment are final only at its end, when its length is known.
* mask: the opening needs ``open_halo(d)`` rows on each side (3 for the paper's disk),
  handled the same way.
* regions: 8-connected components of the final mask rows. One that touches the last final
  row may continue and stays open; the others are closed, emitted once and erased, and rows
  above every open component are dropped.

Memory stays bounded by the tile height plus the tallest open region.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from linescan.lines import TileJob
from linescan.preprocess import InputSpec
from linescan.residual import DssimFn, ResidualKind, halo, residual_components
from linescan.score import Scoring
from linescan.segment import (
    PAPER_DIAMETER,
    Component,
    Region,
    label_components,
    open_halo,
    open_mask,
    threshold_mask,
)
from linescan.ssim import SSIMParams
from linescan.tiling import TileGrid, accumulate
from linescan.web import Edges

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
# (input (H, W), reconstruction (C, H, W)) -> 1 - SSIM: another engine with the same definition
ResidualFn = Callable[[F32, F32], F32]


class Rows:
    """A growing block of rows with an absolute origin; old rows can be dropped."""

    def __init__(self, width: int, channels: int | None = None, fill: float = 0.0) -> None:
        self.channels = channels
        shape = (0, width) if channels is None else (channels, 0, width)
        self.data: F32 = np.zeros(shape, dtype=np.float32)
        self.origin = 0
        self.fill = fill

    @property
    def end(self) -> int:
        axis = 0 if self.channels is None else 1
        return self.origin + int(self.data.shape[axis])

    def extend_to(self, end: int) -> None:
        """Grow (filled with ``fill``) so that absolute rows up to ``end`` exist."""
        extra = end - self.end
        if extra <= 0:
            return
        if self.channels is None:
            pad = np.full((extra, self.data.shape[1]), self.fill, dtype=self.data.dtype)
            self.data = np.concatenate([self.data, pad])
        else:
            pad = np.full((self.channels, extra, self.data.shape[2]), self.fill, self.data.dtype)
            self.data = np.concatenate([self.data, pad], axis=1)

    def append(self, rows: npt.NDArray[np.generic]) -> None:
        self.data = np.concatenate([self.data, rows.astype(self.data.dtype, copy=False)])

    def view(self, start: int, end: int) -> F32:
        a, b = start - self.origin, end - self.origin
        return self.data[a:b] if self.channels is None else self.data[:, a:b]

    def drop_before(self, row: int) -> None:
        k = row - self.origin
        if k > 0:
            self.data = self.data[k:] if self.channels is None else self.data[:, k:]
            self.origin = row


class Tracker:
    """One segment's output side. Not thread-safe: one thread feeds it."""

    def __init__(
        self,
        segment: int,
        spec: InputSpec,
        grid: TileGrid,
        width: int,
        raw_width: int,
        channels: int,
        residual: ResidualKind,
        ssim: SSIMParams,
        threshold: float,
        vae_sigma: float = 0.1,
        line0: int = 0,
        xs: list[int] | None = None,
        residual_fn: ResidualFn | None = None,
        scoring: Scoring | None = None,
        opening: int = PAPER_DIAMETER,
    ) -> None:
        self.segment = segment
        self.spec = spec
        self.grid = grid
        self.width = width
        self.raw_width = raw_width
        self.kind = residual
        self.ssim = ssim
        self.threshold = float(threshold)
        self.vae_sigma = vae_sigma
        self.line0 = line0
        self.xs = xs if xs is not None else grid.positions(width)
        self.halo = halo(residual, ssim)
        # another 1 - SSIM engine with the same definition (the fused CUDA kernel) may stand in
        self.residual_fn = residual_fn
        self._dssim: DssimFn | None = None
        if residual_fn is not None:
            fn = residual_fn
            self._dssim = lambda x, r: fn(x, r[None])
        self.scoring = scoring if scoring is not None else Scoring(residual)
        self.opening = opening
        self.open_halo = open_halo(opening)
        self.edges = self.scoring.edge_tracker(width)
        self.x = Rows(width)  # model input rows
        self.acc = Rows(width, channels)  # reconstruction sums
        self.cnt = Rows(width)  # tile counts
        self.res = Rows(width)  # final score rows (the normalised residual)
        self.mask = Rows(width)  # final opened mask rows (0/1 as float32)
        self.recon_final = 0  # rows [0, recon_final) of the reconstruction are final
        self.res_final = 0
        self.mask_final = 0
        self.ended = False
        self.raw_lines = 0
        self.tiles_stitched = 0
        self.too_short = False  # the segment ended with fewer rows than one tile
        self._last_y: int | None = None  # the last regular tile row stitched

    def consume(self, job: TileJob, recon: F32 | None) -> list[Region]:
        """Stitch one job's reconstructed tile row; returns the regions it closes."""
        if self.ended:
            raise RuntimeError("consume after the segment ended")
        if len(job.new_rows):
            if job.rows_start != self.x.end:
                raise RuntimeError(f"rows out of order: got {job.rows_start}, have {self.x.end}")
            self.x.append(job.new_rows)
            self.edges.push(job.new_rows)
        self.raw_lines = job.raw_lines
        p, s = self.grid.tile, self.grid.stride
        if job.y is not None:
            if recon is None:
                raise RuntimeError("a tile row without reconstructions")
            self.acc.extend_to(job.y + p)
            self.cnt.extend_to(job.y + p)
            acc = self.acc.data
            cnt = self.cnt.data
            if not isinstance(acc, np.ndarray) or not isinstance(cnt, np.ndarray):
                raise TypeError("internal: row buffers must be arrays")
            accumulate(acc, cnt, recon, [job.y], self.xs, y_origin=self.acc.origin)
            self.tiles_stitched += len(recon)
            if not job.end:
                self._last_y = job.y
        if self._last_y is not None and not job.end:
            # rows above the next regular tile row and above the earliest possible edge row
            # get no more tiles (a row-only job can move this too: m_rows grew)
            self.recon_final = max(self.recon_final, min(self._last_y + s, job.m_rows - p))
        if job.end:
            self.ended = True
            self.edges.finish()
            if self.x.end >= p:
                self.recon_final = self.x.end
            else:
                self.too_short = True
        return self._advance()

    # ------------------------------------------------------------------ internals

    @property
    def latest_edges(self) -> Edges:
        """The web's edges in the latest block of rows (model pixels)."""
        return self.edges.latest

    def _advance(self) -> list[Region]:
        end = self.ended
        h = self.halo
        # score rows [res_final, new_res) from reconstruction rows with a halo
        new_res = self.recon_final if end else self.recon_final - h
        if not end:  # never reached in practice: a block's rows arrive a tile ahead
            new_res = min(new_res, self.edges.ready_rows())
        if new_res > self.res_final:
            a = max(0, self.res_final - h)
            b = self.recon_final
            x = self.x.view(a, b)
            rec = self.acc.view(a, b) / self.cnt.view(a, b)[None]
            rec32 = rec.astype(np.float32)
            comps = residual_components(
                self.kind, x, rec32, self.ssim, self.vae_sigma, dssim=self._dssim
            )
            keep = slice(self.res_final - a, new_res - a)
            score = self.scoring.score(
                {k: v[keep] for k, v in comps.items()},
                self.edges.edges_for(self.res_final, new_res),
                self.res_final,
                self.x.end if end else None,
            )
            self.res.append(score)
            self.res_final = new_res
            self.edges.drop_before(self.res_final)
        # mask rows from score rows with the opening's halo
        oh = self.open_halo
        new_mask = self.res_final if end else self.res_final - oh
        if new_mask > self.mask_final:
            a = max(0, self.mask_final - oh)
            chunk = self.res.view(a, self.res_final)
            opened = open_mask(threshold_mask(chunk, self.threshold), self.opening)
            self.mask.append(opened[self.mask_final - a : new_mask - a])
            self.mask_final = new_mask
        regions = self._regions(end)
        self._trim()
        return regions

    def _regions(self, end: bool) -> list[Region]:
        origin = self.mask.origin
        if self.mask_final <= origin:
            return []
        m = self.mask.view(origin, self.mask_final)
        r = self.res.view(origin, self.mask_final)
        labels, found = label_components(m.astype(np.uint8), r.astype(np.float32), origin)
        out: list[Region] = []
        open_top = self.mask_final
        for i, (comp, touches_bottom) in enumerate(found, start=1):
            if touches_bottom and not end:
                open_top = min(open_top, comp.y0)
                continue
            out.append(self._to_region(comp))
            # erase it, so that it is not reported again while its rows are kept
            a, b = comp.y0 - origin, comp.y1 - origin
            box = labels[a:b, comp.x0 : comp.x1] == i
            m[a:b, comp.x0 : comp.x1][box] = 0
        self.mask.drop_before(open_top)
        self.res.drop_before(min(open_top, self.mask_final - self.open_halo))
        return out

    def _to_region(self, comp: Component) -> Region:
        n = self.spec.downscale
        height = self.raw_lines
        y0, y1, x0, x1 = self.spec.box_to_original(
            comp.y0, comp.y1, comp.x0, comp.x1, height, self.raw_width
        )
        return Region(
            line_start=self.line0 + y0,
            line_end=self.line0 + y1,
            x_start=x0,
            x_end=x1,
            area_px=comp.area * n * n if self.spec.resize is None else comp.area,
            score_max=comp.score_max,
            score_mean=comp.score_sum / comp.area,
        )

    def _trim(self) -> None:
        h = self.halo
        keep_recon = max(0, self.res_final - h)
        self.x.drop_before(keep_recon)
        self.acc.drop_before(min(keep_recon, self.acc.end))
        self.cnt.drop_before(min(keep_recon, self.cnt.end))
