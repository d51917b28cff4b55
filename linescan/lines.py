"""The rolling band of lines: camera frames of any height in, rows of tiles out.

The web is one endless image. Tiles sit on a fixed grid in absolute model-row coordinates
(rows at 0, stride, 2*stride, ... from the start of the segment), so the way the web is cut into
frames never moves a tile. A ``Band`` turns raw camera lines into model rows (normalised; n
camera lines become one model row for a 1/n down-scaling model), and emits a ``TileJob`` for
every tile row as soon as its lines are all there. When the segment ends (a gap in the frame
sequence, an ``end`` flag, a width change or shutdown) it emits the edge-aligned last row, exactly
as the offline pipeline places the last tile of an image.

Every job also carries the model rows that arrived since the previous job, so the tracker on
the other side of the inference queue (``tracker.py``) keeps its own copy of the input and no
state is shared between threads. A band made with ``keep_raw`` also hands on the camera lines
themselves (``TileJob.raw``: references to the received frames' read-only pixels, no copy),
for the pictures of defects (``crops.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from linescan.preprocess import InputSpec, block_mean
from linescan.tiling import TileGrid, cut_tiles

F32 = npt.NDArray[np.float32]
RawBlock = tuple[int, npt.NDArray[np.generic]]
"""(absolute web line of the first line, camera lines as received): a frame's pixels."""


@dataclass(frozen=True)
class FrameInfo:
    """What the publisher needs to know about a frame whose lines a job completes."""

    camera: str
    seq: int
    line_start: int  # absolute web line of the frame's first line
    lines: int
    t_capture_ns: int | None
    t_receive_ns: int


@dataclass
class TileJob:
    segment: int
    y: int | None  # model row of this tile row; None for a job that only carries rows
    tiles: F32 | None  # (len(xs), 1, p, p)
    rows_start: int  # model row of new_rows[0]
    new_rows: F32  # model input rows that arrived since the previous job
    m_rows: int  # model rows known when the job was made
    raw_lines: int  # camera lines of the segment so far
    end: bool = False  # the segment ends with this job
    frames: list[FrameInfo] = field(default_factory=list)
    line0: int = 0  # absolute web line of the segment's first line
    raw_width: int = 0  # camera pixels per line
    engine_error: str | None = None  # set by the inference stage when the engine failed
    raw: list[RawBlock] = field(default_factory=list)  # camera lines since the previous job

    @property
    def n_tiles(self) -> int:
        return 0 if self.tiles is None else len(self.tiles)


class Band:
    """One segment's input side. Not thread-safe: one thread feeds it."""

    def __init__(
        self,
        segment: int,
        spec: InputSpec,
        grid: TileGrid,
        raw_width: int,
        line0: int = 0,
        keep_raw: bool = False,
    ) -> None:
        if not spec.streamable:
            raise ValueError("a model with a fixed resize cannot inspect a stream; use --scale")
        self.segment = segment
        self.spec = spec
        self.grid = grid
        self.n = spec.downscale
        self.raw_width = raw_width
        self.line0 = line0
        self.width = spec.model_shape(1, raw_width)[1]
        self.xs = grid.positions(self.width)  # raises if the web is narrower than a tile
        self._rows = np.empty((0, self.width), dtype=np.float32)  # model rows [origin, m)
        self._origin = 0
        self._m = 0  # model rows made
        self._sent = 0  # model rows handed to the tracker
        self._pending = np.empty((0, raw_width), dtype=np.float32)  # < n raw lines
        self._raw = 0
        self._next_y = 0  # next regular tile row
        self._frames: list[FrameInfo] = []
        self._keep_raw = keep_raw
        self._raw_blocks: list[RawBlock] = []
        self.ended = False

    @property
    def raw_lines(self) -> int:
        return self._raw

    def push(self, pixels: npt.NDArray[np.generic], info: FrameInfo | None = None) -> list[TileJob]:
        """Add a block of camera lines; returns the tile rows they complete (maybe none)."""
        if self.ended:
            raise RuntimeError("push after the segment ended")
        if pixels.ndim != 2 or pixels.shape[1] != self.raw_width:
            raise ValueError(
                f"frame width {pixels.shape} does not match the band's {self.raw_width}"
            )
        if info is not None:
            self._frames.append(info)
        if self._keep_raw:
            self._raw_blocks.append((self.line0 + self._raw, pixels))
        x = self.spec.normalise(pixels)
        self._raw += x.shape[0]
        if self.n > 1:
            x = np.concatenate([self._pending, x]) if len(self._pending) else x
            whole = (x.shape[0] // self.n) * self.n
            self._pending = x[whole:]
            x = block_mean(x[:whole], self.n) if whole else x[:0, : self.width]
        self._append(x)
        return self._jobs(end=False)

    def end(self) -> list[TileJob]:
        """The segment ends: the last, partly filled group of lines and the edge tile row."""
        if self.ended:
            return []
        if self.n > 1 and len(self._pending):
            self._append(block_mean(self._pending, self.n))  # pads by repeating the last line
            self._pending = self._pending[:0]
        self.ended = True
        return self._jobs(end=True)

    def _append(self, rows: F32) -> None:
        if len(rows):
            self._rows = np.concatenate([self._rows, rows]) if len(self._rows) else rows.copy()
            self._m += len(rows)

    def _jobs(self, end: bool) -> list[TileJob]:
        p, s = self.grid.tile, self.grid.stride
        ys: list[int] = []
        while self._next_y + p <= self._m:
            ys.append(self._next_y)
            self._next_y += s
        if end and self._m >= p:
            last_regular = self._next_y - s
            if last_regular + p != self._m:
                ys.append(self._m - p)
        jobs = [self._job(y, end=False) for y in ys]
        if not jobs or end:
            jobs.append(self._job(None, end=end))
        if end and len(jobs) >= 2 and jobs[-1].y is None:
            # the edge row and the end marker travel together: merge into the last job
            last = jobs.pop()
            jobs[-1].end = True
            jobs[-1].frames.extend(last.frames)
            jobs[-1].raw.extend(last.raw)
            jobs[-1].new_rows = np.concatenate([jobs[-1].new_rows, last.new_rows])
        self._trim()
        return jobs

    def _job(self, y: int | None, end: bool) -> TileJob:
        tiles = None
        if y is not None:
            tiles = cut_tiles(self._rows, [y - self._origin], self.xs, self.grid.tile)
        new = self._rows[self._sent - self._origin : self._m - self._origin].copy()
        job = TileJob(
            segment=self.segment,
            y=y,
            tiles=tiles,
            rows_start=self._sent,
            new_rows=new,
            m_rows=self._m,
            raw_lines=self._raw,
            end=end,
            frames=self._frames,
            line0=self.line0,
            raw_width=self.raw_width,
            raw=self._raw_blocks,
        )
        self._sent = self._m
        self._frames = []
        self._raw_blocks = []
        return job

    def _trim(self) -> None:
        # the edge-aligned row, if the segment ends now or later, starts at or after m - p
        keep_from = max(0, min(self._next_y, self._m - self.grid.tile))
        if self.ended:
            keep_from = self._m
        drop = keep_from - self._origin
        if drop > 0:
            self._rows = self._rows[drop:]
            self._origin = keep_from
