"""Where the web is: its edges in each band of lines.

A line-scan camera sees past the web's edges (a bright backlight, a roller, the machine frame),
and the web wanders sideways during a run. Whatever lies beyond an edge is not product, and an
autoencoder's residual there (on a saturated backlight 1 - SSIM sits near 1 everywhere; on a
roller it is texture the model never had to learn well) is no evidence of a defect. So the
score (``score.py``) is computed on the web only: columns beyond an edge are not scored, the
columns around an edge are scored against statistics of the edge itself (a cut selvage stays
findable), and the rest against their own column's statistics.

How an edge is found. In each block of ``block_rows`` model rows, two profiles across the web:
the mean grey value of each column, and its texture (the mean absolute difference between
vertically adjacent pixels, which does not respond to the edge's own step). An edge is where
both change most from a window of ``window`` columns on one side to the same window on the other:
the strength of column c is ``|Δmean(c)| / σ_mean + |Δtexture(c)| / σ_texture``, σ being the
profiles' typical (median) change on the training images. ``learn_edges`` looks for a left edge
(web to its right) in the left half of the training images and a right edge in the right half,
and keeps a side only when nearly every training block shows a step there far above the noise:
a web that fills the field of view (or any texture without edges) has none and is scored
everywhere. At inspection, each block's strongest step inside the learned search range is its
raw estimate (kept only when it is at least half as strong as the weakest training edge), and
the edge used is the median of the last ``SMOOTH`` raw estimates: a local bite out of the edge
(a cut selvage, a hole at the edge) does not drag the edge with it and stays a defect, while a
web that wanders sideways is followed within a few blocks.

Streaming equals offline: the estimate for a block depends only on that block's rows and on the
blocks before it in the same segment, and is made when the block's rows are all there (a
segment's last, partial block at the segment's end), so any split of the web into frames gives
the same edges. ``EdgeTracker`` is used by both the offline pipeline and the daemon's tracker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from linescan.errors import ModelError

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Side = Literal["left", "right"]
SIDES: tuple[Side, ...] = ("left", "right")

BLOCK_ROWS = 16  # model rows per edge estimate
WINDOW = 12  # model columns compared on each side of a candidate edge
SMOOTH = 3  # the edge is the median of this many last raw estimates
MIN_RATIO = 25.0  # a training step must be this many times the profile's median strength
MIN_SHARE = 0.8  # ... in at least this share of the training blocks
MIN_BLOCK_ROWS = BLOCK_ROWS // 2  # blocks with fewer rows (a segment's tail) keep the estimate


@dataclass(frozen=True)
class EdgeModel:
    """What training learned about the web's edges (model pixels, model rows)."""

    sides: tuple[Side, ...]
    search: dict[Side, tuple[int, int]]  # inclusive column range searched for each edge
    seen: dict[Side, tuple[int, int]]  # range of the edge on the training images
    noise: tuple[float, float]  # typical |Δmean| and |Δtexture|
    min_strength: float  # weaker steps are not edges
    width: int  # model columns of the training images
    window: int = WINDOW
    block_rows: int = BLOCK_ROWS

    def to_json(self) -> dict[str, Any]:
        return {
            "sides": list(self.sides),
            "search": {s: list(v) for s, v in self.search.items()},
            "seen": {s: list(v) for s, v in self.seen.items()},
            "noise": list(self.noise),
            "min_strength": self.min_strength,
            "width": self.width,
            "window": self.window,
            "block_rows": self.block_rows,
        }

    @staticmethod
    def from_json(d: dict[str, Any], where: str) -> EdgeModel:
        try:
            sides: tuple[Side, ...] = tuple(s for s in SIDES if s in d["sides"])
            if len(sides) != len(d["sides"]):
                raise ValueError(f"unknown edge side in {d['sides']}")
            return EdgeModel(
                sides=sides,
                search={s: (int(d["search"][s][0]), int(d["search"][s][1])) for s in sides},
                seen={s: (int(d["seen"][s][0]), int(d["seen"][s][1])) for s in sides},
                noise=(float(d["noise"][0]), float(d["noise"][1])),
                min_strength=float(d["min_strength"]),
                width=int(d["width"]),
                window=int(d["window"]),
                block_rows=int(d["block_rows"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelError(f"{where}: score.edges is malformed ({exc})") from exc


@dataclass(frozen=True)
class Edges:
    """The web's edges in one block of rows: first web column from the left (``left``) and
    one past the last from the right (``right``), model pixels; None where there is none."""

    left: int | None
    right: int | None


NO_EDGES = Edges(None, None)


def profiles(rows: F32) -> tuple[F64, F64]:
    """Column mean and column texture of a block of model rows (float64)."""
    mean: F64 = rows.mean(axis=0, dtype=np.float64)
    if rows.shape[0] > 1:
        tex: F64 = np.abs(np.diff(rows, axis=0)).mean(axis=0, dtype=np.float64)
    else:
        tex = np.zeros(rows.shape[1], dtype=np.float64)
    return mean, tex


def _steps(profile: F64, window: int) -> F64:
    """Δ(c) = mean of profile[c, c + w) - mean of profile[c - w, c), for c in [w, W - w]."""
    cs = np.concatenate(([0.0], np.cumsum(profile)))
    c = np.arange(window, profile.size - window + 1)
    out: F64 = ((cs[c + window] - cs[c]) - (cs[c] - cs[c - window])) / window
    return out


def strength(rows: F32, noise: tuple[float, float], window: int) -> F64:
    """Edge strength of every column c in [window, W - window] (index 0 is column ``window``)."""
    mean, tex = profiles(rows)
    out: F64 = np.abs(_steps(mean, window)) / max(noise[0], 1e-9) + np.abs(
        _steps(tex, window)
    ) / max(noise[1], 1e-9)
    return out


def _half(side: Side, width: int, window: int) -> tuple[int, int]:
    """Columns where an edge of ``side`` is looked for: its half of the field of view."""
    if side == "left":
        return window, width // 2
    return width // 2, width - window


def learn_edges(images: Sequence[F32], block_rows: int = BLOCK_ROWS) -> EdgeModel | None:
    """The web's edges on defect-free training images (model scale), or None when there are
    none to track (a texture without edges, or a web that fills the field of view)."""
    widths = {x.shape[1] for x in images}
    if len(widths) != 1:
        return None  # images of several widths: no fixed camera geometry to learn
    width = widths.pop()
    if width < 8 * WINDOW:
        return None
    blocks = [
        x[i : i + block_rows]
        for x in images
        for i in range(0, x.shape[0] - block_rows + 1, block_rows)
    ]
    if not blocks:
        return None
    # Noise: the typical change of each profile between neighbouring windows.
    dm, dt = [], []
    for b in blocks:
        mean, tex = profiles(b)
        dm.append(np.median(np.abs(_steps(mean, WINDOW))))
        dt.append(np.median(np.abs(_steps(tex, WINDOW))))
    noise = (max(float(np.median(dm)), 1e-6), max(float(np.median(dt)), 1e-6))
    sides: list[Side] = []
    search: dict[Side, tuple[int, int]] = {}
    seen: dict[Side, tuple[int, int]] = {}
    peaks: list[float] = []
    for side in SIDES:
        lo, hi = _half(side, width, WINDOW)
        found: list[int] = []
        strong: list[float] = []
        for b in blocks:
            s = strength(b, noise, WINDOW)
            part = s[lo - WINDOW : hi - WINDOW + 1]
            k = int(np.argmax(part))
            if part[k] >= MIN_RATIO * max(float(np.median(s)), 1e-9):
                found.append(lo + k)
                strong.append(float(part[k]))
        if len(found) < MIN_SHARE * len(blocks):
            continue
        a, z = int(np.min(found)), int(np.max(found))
        slack = max(4 * WINDOW, width // 16)
        sides.append(side)
        seen[side] = (a, z)
        search[side] = (max(lo, a - slack), min(hi, z + slack))
        peaks.append(float(np.quantile(strong, 0.02)))
    if not sides:
        return None
    return EdgeModel(
        sides=tuple(sides),
        search=search,
        seen=seen,
        noise=noise,
        min_strength=0.5 * min(peaks),
        width=width,
        block_rows=block_rows,
    )


def raw_edges(model: EdgeModel, rows: F32) -> dict[Side, int | None]:
    """The strongest step in each side's search range, or None when none is strong enough."""
    s = strength(rows, model.noise, model.window)
    out: dict[Side, int | None] = {}
    for side in model.sides:
        lo, hi = model.search[side]
        part = s[lo - model.window : hi - model.window + 1]
        if part.size == 0:
            out[side] = None
            continue
        k = int(np.argmax(part))
        out[side] = lo + k if part[k] >= model.min_strength else None
    return out


class EdgeTracker:
    """One segment's edges, block by block; fed the segment's model rows in order.

    ``fixed`` (model columns, from the config's ``web_columns``) replaces detection.
    """

    def __init__(
        self,
        model: EdgeModel | None,
        width: int,
        fixed: tuple[int | None, int | None] | None = None,
    ) -> None:
        self.model = model if model is not None and model.width == width else None
        self.width = width
        self.fixed = None if fixed is None else Edges(*fixed)
        self.block_rows = self.model.block_rows if self.model is not None else BLOCK_ROWS
        self._pending: list[F32] = []
        self._pending_rows = 0
        self._rows = 0  # rows pushed
        self._blocks: dict[int, Edges] = {}  # block index -> edges
        self._first_block = 0  # blocks below this were dropped
        self._recent: dict[Side, list[int]] = {s: [] for s in SIDES}
        self._initial = self._start_edges()
        self.latest: Edges = self._initial
        self.finished = False

    @property
    def active(self) -> bool:
        """Whether edges restrict the score at all."""
        return self.fixed is not None or self.model is not None

    def _start_edges(self) -> Edges:
        if self.fixed is not None:
            return self.fixed
        if self.model is None:
            return NO_EDGES
        mid = {s: (a + b) // 2 for s, (a, b) in self.model.seen.items()}
        return Edges(mid.get("left"), mid.get("right"))

    def push(self, rows: F32) -> None:
        """The next model rows of the segment."""
        if self.finished:
            raise RuntimeError("push after the segment's edges were finished")
        if rows.shape[0] == 0:
            return
        self._rows += rows.shape[0]
        if self.fixed is not None or self.model is None:
            return  # nothing to detect: every block has the same edges
        self._pending.append(rows)
        self._pending_rows += rows.shape[0]
        while self._pending_rows >= self.block_rows:
            block = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._estimate(block[: self.block_rows])
            rest = block[self.block_rows :]
            self._pending = [rest] if rest.shape[0] else []
            self._pending_rows = rest.shape[0]

    def finish(self) -> None:
        """The segment ended: its last, partial block gets its edges too."""
        if self.finished:
            return
        if self._pending_rows and self.model is not None and self.fixed is None:
            block = np.concatenate(self._pending)
            self._estimate(block)
        self._pending, self._pending_rows = [], 0
        self.finished = True

    def _estimate(self, block: F32) -> None:
        if self.model is None:  # pragma: no cover - callers check
            raise RuntimeError("no edge model")
        index = len(self._blocks) + self._first_block
        if block.shape[0] >= MIN_BLOCK_ROWS:
            for side, e in raw_edges(self.model, block).items():
                if e is not None:
                    recent = self._recent[side]
                    recent.append(e)
                    del recent[:-SMOOTH]
        left = self._smoothed("left")
        right = self._smoothed("right")
        self.latest = Edges(left, right)
        self._blocks[index] = self.latest

    def _smoothed(self, side: Side) -> int | None:
        recent = self._recent[side]
        if recent:
            return int(np.median(recent))
        return getattr(self._initial, side)  # type: ignore[no-any-return]

    def ready_rows(self) -> int:
        """Rows whose edges are known."""
        if self.fixed is not None or self.model is None or self.finished:
            return self._rows
        return (len(self._blocks) + self._first_block) * self.block_rows

    def edges_for(self, start: int, end: int) -> list[tuple[int, int, Edges]]:
        """(row start, row end, edges) runs covering rows [start, end) of the segment."""
        if end > self.ready_rows():
            raise RuntimeError(f"edges of rows up to {end} asked, known up to {self.ready_rows()}")
        if self.fixed is not None or self.model is None:
            return [(start, end, self.latest if self.fixed is None else self.fixed)]
        out = []
        b = self.block_rows
        row = start
        while row < end:
            k = row // b
            stop = min(end, (k + 1) * b)
            out.append((row, stop, self._blocks[k]))
            row = stop
        return out

    def drop_before(self, row: int) -> None:
        """Forget the edges of blocks that end at or before ``row``."""
        k = row // self.block_rows
        while self._first_block < k and self._first_block in self._blocks:
            del self._blocks[self._first_block]
            self._first_block += 1
