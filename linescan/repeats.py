"""Repeating defects: the same mark at the same place across the web, at a constant period down it.

A damaged or dirty roller marks the web once a turn: defects at about the same cross-web
position, one roller circumference apart. Until the roller is changed every further metre is
scrap, so the operator must hear of it from the third mark on, not from a shift report.

``RepeatFinder`` looks at every defect event of a camera as it is published (centre of its box,
camera pixels; web lines are absolute, so a series runs across segment breaks):

* a defect that continues an active series (centre within ``x_tolerance_px`` of the series',
  ``k`` periods after its last defect, ``1 <= k <= 1 + max_missing``, within
  ``period_tolerance_lines + period_tolerance x period``) joins it;
* otherwise, a defect that ends a chain of ``min_count`` defects with one period (each
  ``period`` after the previous, within the tolerances, all at the same place across the web,
  ``min_period_lines <= period <= max_period_lines``) starts a series; the shortest such
  period wins.

Either way the event carries ``repeat = {period_lines, period_m, count, first_seq}`` (the mean
period so far, the defects in the series, the ``seq`` of its first). A series ends when
``max_missing + 1`` periods pass without its mark. Status messages list the active series,
with the ``seqs`` of their newest 64 defects (the first two included, published before anyone
knew they would repeat). Pure logic, no I/O; the post thread owns it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from linescan.config import RepeatsConfig
from linescan.segment import Region

__all__ = ["RepeatFinder", "Series"]

HISTORY: int = 4096  # defects remembered per camera to start series from
MEMBERS: int = 64  # the newest seqs of a series that status messages list


@dataclass
class Series:
    """One repeating defect of one camera."""

    camera: str
    x: float  # centre across the web, camera pixels (mean of its defects)
    first_line: float
    last_line: float
    spans: int  # periods from the first defect to the last (missed ones included)
    count: int  # defects in the series
    first_seq: int
    last_seq: int
    members: deque[int] = field(default_factory=lambda: deque(maxlen=MEMBERS))

    @property
    def period(self) -> float:
        return (self.last_line - self.first_line) / self.spans

    def repeat(self, lines_per_metre: float) -> dict[str, Any]:
        """The ``repeat`` key of an event in this series."""
        period = round(self.period)
        return {
            "period_lines": period,
            "period_m": period / lines_per_metre,
            "count": self.count,
            "first_seq": self.first_seq,
        }

    def describe(self, lines_per_metre: float) -> dict[str, Any]:
        """The series in a status message."""
        return {
            "camera": self.camera,
            "x_px": round(self.x),
            **self.repeat(lines_per_metre),
            "last_seq": self.last_seq,
            "last_line": round(self.last_line),
            "seqs": list(self.members),
        }


@dataclass
class _Seen:
    seq: int
    line: float
    x: float
    series: Series | None = None  # a series it belongs to: never seeds another one


class RepeatFinder:
    """Finds repeating defects among the events of each camera. Not thread-safe."""

    def __init__(self, config: RepeatsConfig, lines_per_metre: float) -> None:
        self.config = config
        self.lines_per_metre = lines_per_metre
        self._history: dict[str, deque[_Seen]] = {}
        self._series: dict[str, list[Series]] = {}

    def tolerance(self, period: float) -> float:
        c = self.config
        return c.period_tolerance_lines + c.period_tolerance * period

    def observe(self, camera: str, seq: int, region: Region) -> dict[str, Any] | None:
        """Take the defect event ``seq``; its ``repeat`` key when it belongs to a series."""
        line = (region.line_start + region.line_end) / 2.0
        x = (region.x_start + region.x_end) / 2.0
        history = self._history.setdefault(camera, deque(maxlen=HISTORY))
        if history and line < history[-1].line - self.config.max_period_lines:
            # the web's line numbers went back a long way: a restarted camera, another roll
            history.clear()
            self._series.pop(camera, None)
        self._expire(camera, line)
        seen = _Seen(seq, line, x)
        found = self._extend(camera, seq, line, x) or self._start(camera, seen)
        seen.series = found
        history.append(seen)
        self._forget(history, line)
        return None if found is None else found.repeat(self.lines_per_metre)

    def active(self, now: dict[str, int] | None = None) -> list[Series]:
        """The active series of every camera; ``now`` (camera -> the newest line inspected)
        ends those whose mark is overdue."""
        for camera, line in (now or {}).items():
            self._expire(camera, float(line))
        return [s for series in self._series.values() for s in series]

    def describe(self, now: dict[str, int] | None = None) -> list[dict[str, Any]]:
        return [s.describe(self.lines_per_metre) for s in self.active(now)]

    # ---------------------------------------------------------------- internals

    def _extend(self, camera: str, seq: int, line: float, x: float) -> Series | None:
        c = self.config
        best: tuple[float, Series, int] | None = None
        for s in self._series.get(camera, []):
            if abs(x - s.x) > c.x_tolerance_px:
                continue
            period = s.period
            k = round((line - s.last_line) / period)
            if not 1 <= k <= 1 + c.max_missing:
                continue
            error = abs(line - s.last_line - k * period)
            if error <= self.tolerance(period) and (best is None or error < best[0]):
                best = (error, s, k)
        if best is None:
            return None
        _, s, k = best
        s.x = (s.x * s.count + x) / (s.count + 1)
        s.count += 1
        s.spans += k
        s.last_line = line
        s.last_seq = seq
        s.members.append(seq)
        return s

    def _start(self, camera: str, new: _Seen) -> Series | None:
        c = self.config
        seq, line, x = new.seq, new.line, new.x
        # marks of a series (active or ended) never start another: a roller that marked every
        # 600 lines and missed a few must not come back as a series of 2400
        near = [
            h
            for h in self._history.get(camera, ())
            if h.series is None and abs(h.x - x) <= c.x_tolerance_px
        ]
        for prev in reversed(near):  # the shortest period first
            period = line - prev.line
            if period < c.min_period_lines:
                continue
            if period > c.max_period_lines:
                break
            chain = [prev]
            while len(chain) < c.min_count - 1:
                want = chain[-1].line - period
                tol = self.tolerance(period)
                match = [h for h in near if abs(h.line - want) <= tol and h.seq < chain[-1].seq]
                if not match:
                    break
                chain.append(min(match, key=lambda h: abs(h.line - want)))
            if len(chain) < c.min_count - 1:
                continue
            first = chain[-1]
            s = Series(
                camera=camera,
                x=(sum(h.x for h in chain) + x) / (len(chain) + 1),
                first_line=first.line,
                last_line=line,
                spans=len(chain),
                count=len(chain) + 1,
                first_seq=first.seq,
                last_seq=seq,
            )
            s.members.extend([*(h.seq for h in reversed(chain)), seq])
            self._series.setdefault(camera, []).append(s)
            for h in chain:
                h.series = s
            return s
        return None

    def _expire(self, camera: str, line: float) -> None:
        series = self._series.get(camera)
        if not series:
            return
        keep = [
            s
            for s in series
            if line
            <= s.last_line + (1 + self.config.max_missing) * s.period + self.tolerance(s.period)
        ]
        self._series[camera] = keep

    def _forget(self, history: deque[_Seen], line: float) -> None:
        c = self.config
        horizon = (c.min_count - 1) * c.max_period_lines * (1 + c.period_tolerance)
        horizon += c.period_tolerance_lines * c.min_count
        while history and history[0].line < line - horizon:
            history.popleft()
