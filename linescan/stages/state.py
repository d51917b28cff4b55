"""The counts several stages write: running totals, not-inspected ranges, web breaks, and the
segments an engine failure broke. One lock guards them all.

Accounting is exact: every valid frame received ends as inspected (its lines reached the
tracker) or dropped (overload, or lines of a segment too short to hold one tile, or an engine
failure), and every malformed message is rejected by reason. Status messages carry the running
totals so a subscriber can tell "no defects" from "no data".

Who writes what: the receiver counts frames received, rejected, dropped (overload) and sequence
gaps; the tiler counts segments and notes web breaks; the post thread counts frames inspected or
dropped (short segment, engine failure) and defects, marks the segments the engine failed on,
and takes the totals for each status message.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Totals:
    """Running counts for status messages; written by several threads under one lock."""

    frames_received: int = 0
    frames_rejected: int = 0
    frames_dropped: int = 0
    frames_inspected: int = 0
    lines_received: int = 0
    lines_inspected: int = 0
    lines_dropped: int = 0
    defects: int = 0
    segments: int = 0
    gaps: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    not_inspected: list[dict[str, Any]] = field(default_factory=list)  # since last status
    breaks: list[dict[str, Any]] = field(default_factory=list)  # since last status


class Accounting:
    """The daemon's ``Totals`` and failed segments, shared by its threads; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.totals = Totals()  # read without the lock for logs and tests; written under it
        self._failed_segments: set[int] = set()  # engine failures: the tiler restarts these

    def count_received(self, lines: int) -> None:
        with self._lock:
            self.totals.frames_received += 1
            self.totals.lines_received += lines

    def count_rejected(self, reason: str) -> None:
        with self._lock:
            self.totals.frames_rejected += 1
            self.totals.rejected_by_reason[reason] = (
                self.totals.rejected_by_reason.get(reason, 0) + 1
            )

    def count_gap(self) -> None:
        with self._lock:
            self.totals.gaps += 1

    def count_segment(self) -> None:
        with self._lock:
            self.totals.segments += 1

    def count_inspected(self, lines: int) -> None:
        with self._lock:
            self.totals.frames_inspected += 1
            self.totals.lines_inspected += lines

    def count_dropped(self, lines: int) -> None:
        with self._lock:
            self.totals.frames_dropped += 1
            self.totals.lines_dropped += lines

    def count_defects(self, n: int) -> None:
        with self._lock:
            self.totals.defects += n

    def note_not_inspected(
        self, camera: str, start: int, end: int, why: str, seq: int | None = None
    ) -> None:
        """Name web lines that were not inspected, for the next status message."""
        rec: dict[str, Any] = {"camera": camera, "line_start": start, "line_end": end, "why": why}
        if seq is not None:
            rec["seq"] = seq
        with self._lock:
            self.totals.not_inspected.append(rec)

    def note_break(self, camera: str, line: int, why: str) -> None:
        """A web segment ended at ``line``, for the next status message."""
        with self._lock:
            self.totals.breaks.append({"camera": camera, "line": line, "why": why})

    def fail_segment(self, segment: int) -> None:
        """The engine failed on ``segment``: the tiler restarts the web after it."""
        with self._lock:
            self._failed_segments.add(segment)

    def take_failed_segment(self, segment: int) -> bool:
        """True once (then forgotten) if the engine failed on ``segment``."""
        with self._lock:
            if segment in self._failed_segments:
                self._failed_segments.discard(segment)
                return True
            return False

    def take_for_status(self) -> Totals:
        """A copy of the totals for a status message; the not-inspected ranges and breaks start
        over (a status message names those since the previous one)."""
        with self._lock:
            t = self.totals
            copy = dataclasses.replace(t, rejected_by_reason=dict(t.rejected_by_reason))
            t.not_inspected = []
            t.breaks = []
        return copy
