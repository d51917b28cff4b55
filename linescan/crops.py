"""Pictures of defects, the post thread's half: recent camera lines and score rows, and the crop
of both around a region.

The tracker keeps only the rows it still needs, so the post thread keeps its own bounded rings
per camera:

* camera lines: the frames' pixels as received (``TileJob.raw``, references to the read-only
  message buffers, never copied), the newest ``pictures.ring_lines`` lines and at most one
  frame more. Memory: ``ring_lines x width x bytes per pixel`` per camera (16 MiB for 4096
  lines of a 4096-pixel 8-bit camera).
* score rows: every score row the tracker computes, recorded on its way through
  ``RecordingScoring`` (the bundle's ``Scoring`` with a hook after ``score``), stored as 8-bit
  display values (0 .. 2 x threshold, the threshold mid-scale), ``ring_lines / n`` rows of the
  model's width: at most a quarter of the camera lines' memory for a 1/2-scale model.

When a region closes its event goes out at once, and the cropper notes it (:meth:`Cropper.want`).
The window around it (the region plus a margin, aligned to model pixels) is cut once the lines
and score rows under it are there (a tile row or so later; at once when the segment ends, or
when its lines are about to leave the ring): :meth:`Cropper.due` cuts it out of both rings,
thinned to at most twice the picture size, and copies it: a few kilobytes, microseconds.
Drawing and encoding the PNG happen in another thread (``pictures.py``), so the events never
wait for a picture.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from linescan.config import PicturesConfig
from linescan.lines import RawBlock
from linescan.preprocess import InputSpec
from linescan.residual import Component
from linescan.score import Scoring
from linescan.segment import Region
from linescan.web import Edges

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
Array = npt.NDArray[np.generic]
ScoreSink = Callable[[int, F32], None]  # (first model row, score rows)

__all__ = ["Crop", "Cropper", "RecordingScoring", "RowRing", "display_scores"]


class RowRing:
    """The newest rows of a 2-D stream, as blocks (first row, rows) with no copy.

    Keeps at least ``max_rows`` rows (when that many came) and at most one block more. A block
    that does not continue the last one (a break in the stream) starts the ring afresh.
    """

    def __init__(self, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.max_rows = max_rows
        self._blocks: deque[tuple[int, Array]] = deque()
        self._rows = 0

    @property
    def start(self) -> int:
        return self._blocks[0][0] if self._blocks else 0

    @property
    def end(self) -> int:
        if not self._blocks:
            return 0
        first, block = self._blocks[-1]
        return first + len(block)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for _, b in self._blocks)

    def clear(self) -> None:
        self._blocks.clear()
        self._rows = 0

    def add(self, first: int, rows: Array) -> None:
        if len(rows) == 0:
            return
        if self._blocks and first != self.end:
            self.clear()
        self._blocks.append((first, rows))
        self._rows += len(rows)
        while self._rows - len(self._blocks[0][1]) >= self.max_rows:
            self._rows -= len(self._blocks.popleft()[1])

    def cut(self, a: int, b: int, c: int, d: int, step: int = 1) -> Array | None:
        """Rows [a, b) and columns [c, d) of what is held, every ``step``-th row and column
        counted from (a, c); a copy. None when none of those rows is held."""
        a, b = max(a, self.start), min(b, self.end)
        if a >= b or c >= d:
            return None
        parts: list[Array] = []
        for first, block in self._blocks:
            lo, hi = max(a, first), min(b, first + len(block))
            if lo >= hi:
                continue
            lo += (-(lo - a)) % step  # the first row of the thinned grid in this block
            if lo < hi:
                parts.append(block[lo - first : hi - first : step, c:d:step])
        if not parts:
            return None
        out: Array = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
        return out


def display_scores(score: F32, threshold: float) -> U8:
    """Scores as 8-bit display values: 0 .. 2 x threshold onto 0 .. 255 (the threshold at 128);
    off-web, negative and NaN scores are 0. Every score row passes here: OpenCV's saturating
    conversion does it in one pass (4x NumPy's clip and cast)."""
    top = 2.0 * threshold if threshold > 0 else 1.0
    out: U8 = cv2.convertScaleAbs(np.fmax(score, np.float32(0.0)), alpha=255.0 / top)
    return out


@dataclass(frozen=True, eq=False)
class RecordingScoring(Scoring):
    """The bundle's ``Scoring``, telling ``sink`` every block of score rows it computes.

    The tracker (``tracker.py``) drops score rows as soon as their regions are closed; this
    hook is how the pictures see them without the tracker knowing.
    """

    sink: ScoreSink | None = None

    @classmethod
    def wrap(cls, base: Scoring, sink: ScoreSink) -> RecordingScoring:
        values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        return cls(**values, sink=sink)

    def score(
        self,
        comps: Mapping[Component, F32],
        runs: Sequence[tuple[int, int, Edges]],
        row0: int,
        total_rows: int | None,
    ) -> F32:
        out = super().score(comps, runs, row0, total_rows)
        if self.sink is not None:
            self.sink(row0, out)
        return out


@dataclass(frozen=True)
class Crop:
    """Camera pixels and score around one region, ready to draw (``pictures.render``).

    ``window`` is (first line, end line, first column, end column) in camera pixels; ``pixels``
    holds every ``step``-th line and column of it, ``scores`` (8-bit display values, or None)
    the model pixels of its first ``scored_lines`` lines (the rest is not scored yet).
    """

    camera: str
    region: Region
    window: tuple[int, int, int, int]
    step: int
    pixels: Array
    scores: U8 | None
    scored_lines: int
    bit_depth: int


class _Camera:
    def __init__(self, lines: int, score_rows: int) -> None:
        self.lines = RowRing(lines)
        self.scores = RowRing(score_rows)
        self.segment: int | None = None
        self.line0 = 0
        self.pending: list[tuple[int, Region, int]] = []  # (seq, region, window's last line)


class Cropper:
    """The rings of every camera and the crops cut from them. Post thread only."""

    def __init__(self, config: PicturesConfig, spec: InputSpec, threshold: float) -> None:
        self.config = config
        self.spec = spec
        self.n = spec.downscale
        self.threshold = threshold
        self._cameras: dict[str, _Camera] = {}

    def _camera(self, camera: str) -> _Camera:
        cam = self._cameras.get(camera)
        if cam is None:
            lines = self.config.ring_lines
            cam = _Camera(lines, math.ceil(lines / self.n))
            self._cameras[camera] = cam
        return cam

    def cameras(self) -> list[str]:
        return list(self._cameras)

    def nbytes(self) -> int:
        """Memory the rings hold now (camera lines and score rows, all cameras)."""
        return sum(c.lines.nbytes + c.scores.nbytes for c in self._cameras.values())

    def add_lines(self, camera: str, blocks: Sequence[RawBlock]) -> None:
        ring = self._camera(camera).lines
        for first, pixels in blocks:
            ring.add(first, pixels)

    def want(self, camera: str, seq: int, region: Region) -> None:
        """Cut a crop for event ``seq`` once the rows around ``region`` are there (``due``)."""
        cam = self._camera(camera)
        _, last, _, _ = self._window(cam, region)
        cam.pending.append((seq, region, last))

    def due(self, camera: str, ended: bool = False) -> list[tuple[int, Crop | None]]:
        """The crops whose lines and scores are all there, or will not get better: the segment
        ``ended``, or their lines are about to leave the ring. None: the lines are gone."""
        cam = self._cameras.get(camera)
        if cam is None or not cam.pending:
            return []
        scored = cam.line0 + cam.scores.end * self.n
        soon_gone = cam.lines.end - (cam.lines.max_rows * 3) // 4
        out: list[tuple[int, Crop | None]] = []
        keep: list[tuple[int, Region, int]] = []
        for seq, region, last in cam.pending:
            ready = min(scored, cam.lines.end) >= last
            if ended or ready or region.line_start <= soon_gone:
                out.append((seq, self.crop(camera, region)))
            else:
                keep.append((seq, region, last))
        cam.pending = keep
        return out

    def scoring(self, camera: str, segment: int, line0: int, base: Scoring) -> Scoring:
        """The scoring for a new tracker of ``camera``'s ``segment``: records its score rows.
        Take the old segment's crops first (``due(camera, ended=True)``)."""
        cam = self._camera(camera)
        cam.segment, cam.line0 = segment, line0
        cam.scores.clear()
        ring, threshold = cam.scores, self.threshold

        def sink(row0: int, rows: F32) -> None:
            ring.add(row0, display_scores(rows, threshold))

        return RecordingScoring.wrap(base, sink)

    def _window(self, cam: _Camera, region: Region) -> tuple[int, int, int, int]:
        """The region plus a margin (at least 64 camera pixels each way), on model pixels of
        the segment and within the web (not yet clipped to the lines held)."""
        n = self.n
        h = region.line_end - region.line_start
        w = region.x_end - region.x_start
        margin = max(self.config.margin_px, max(h, w) // 4)
        a, b = _at_least(region.line_start - margin, region.line_end + margin, 64)
        c, d = _at_least(region.x_start - margin, region.x_end + margin, 64)
        a = max(a, cam.line0)
        a = cam.line0 + -(-(a - cam.line0) // n) * n
        b = cam.line0 + -(-(b - cam.line0) // n) * n
        c = max(0, (c // n) * n)
        d = min(_width(cam), -(-d // n) * n)
        return a, b, c, d

    def crop(self, camera: str, region: Region) -> Crop | None:
        """The window around ``region`` from the rings, now; None when its lines are gone.

        Lines not held are left out of the window; score rows not known (yet) are
        ``scored_lines`` short of its end.
        """
        cam = self._cameras.get(camera)
        if cam is None:
            return None
        n = self.n
        a, b, c, d = self._window(cam, region)
        if cam.lines.start > a:
            a = cam.line0 + -(-(cam.lines.start - cam.line0) // n) * n
        b = min(b, cam.lines.end)
        if a >= b or c >= d or region.line_end <= a or region.line_start >= b:
            return None
        step = max(1, math.ceil(max(b - a, d - c) / (2 * self.config.size_px)))
        pixels = cam.lines.cut(a, b, c, d, step)
        if pixels is None:
            return None
        scores, scored_lines = None, 0
        ra, rb = (a - cam.line0) // n, min(-(-(b - cam.line0) // n), cam.scores.end)
        if cam.segment is not None and region.line_end <= cam.line0 + cam.scores.end * n:
            ca, cb = c // n, -(-d // n)
            sstep = max(1, math.ceil(max(rb - ra, cb - ca) / (2 * self.config.size_px)))
            cut = cam.scores.cut(ra, rb, ca, cb, sstep)
            if cut is not None and len(cut) == len(range(ra, rb, sstep)):
                scores = cut.astype(np.uint8, copy=False)
                scored_lines = min((rb - ra) * n, b - a)
        return Crop(
            camera=camera,
            region=region,
            window=(a, b, c, d),
            step=step,
            pixels=pixels,
            scores=scores,
            scored_lines=scored_lines,
            bit_depth=self.spec.bit_depth,
        )


def _at_least(lo: int, hi: int, size: int) -> tuple[int, int]:
    short = size - (hi - lo)
    if short <= 0:
        return lo, hi
    return lo - short // 2, hi + short - short // 2


def _width(cam: _Camera) -> int:
    blocks = cam.lines._blocks
    return int(blocks[-1][1].shape[1]) if blocks else 0
