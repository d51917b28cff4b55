"""Pictures of defects, drawn and kept: the PNG of a crop, where it is stored, the thread that
draws it.

``render`` draws a ``Crop`` (``crops.py``) as one PNG: the camera pixels around the region with
the region outlined in red, and beside it the score map of the same window (a colour map from
0 to twice the threshold: the threshold is the middle of the scale, green; grey where the
score is not known yet) with the region outlined in white. Each half is ``pictures.size_px``
on its longer side, so a picture is at most ``2 x size_px + 4`` by ``size_px`` pixels (tens of
kilobytes).

Where pictures live:

* with a journal: beside it, in ``<journal>.pictures.sqlite`` (``pictures_path``), one row per
  picture, pruned with the journal (a picture whose event the journal has pruned goes too), in
  a file of its own so that writing pictures never holds the journal's write lock (the post
  thread's events wait for nothing but their own fsync). The same file records how much web
  each segment inspected (``rolls``), for the report's defects per metre.
* without one: the newest ``pictures.keep`` in memory.

``PictureWriter`` is the thread between them: the post thread hands it crops without waiting
(a full queue skips the picture and counts it: never the event), it draws and stores them; a
request for a picture still being drawn waits for it (briefly).
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Final, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from linescan.crops import Crop
from linescan.errors import LinescanError
from linescan.log import RateLimitedLogger, get_logger
from linescan.metrics import Metrics
from linescan.render import to_display

U8 = npt.NDArray[np.uint8]
log = get_logger("linescan.pictures")

__all__ = [
    "MemoryPictures",
    "PictureError",
    "PictureStore",
    "PictureWriter",
    "Roll",
    "SqlitePictures",
    "pictures_path",
    "read_pictures",
    "render",
]

GAP_PX: Final = 4  # between the two halves of a picture
PRUNE_EVERY: Final = 64  # pictures between two pruning passes


class PictureError(LinescanError):
    """The picture store cannot be opened or read."""


# -------------------------------------------------------------------- drawing


def render(crop: Crop, size_px: int) -> bytes:
    """The PNG of ``crop``: camera pixels (region in red) | score map (region in white)."""
    a, b, c, d = crop.window
    scale = size_px / max(b - a, d - c)
    out_h, out_w = max(1, round((b - a) * scale)), max(1, round((d - c) * scale))
    grey = to_display(crop.pixels, crop.bit_depth)
    left = cv2.cvtColor(_fit(grey, out_w, out_h, smooth=True), cv2.COLOR_GRAY2BGR)
    # rows with no score known (yet): grey, never the colour map's "nothing here" blue
    right = np.full((out_h, out_w, 3), 96, np.uint8)
    scored_h = min(out_h, round(crop.scored_lines * scale))
    if crop.scores is not None and scored_h > 0:
        heat = _fit(crop.scores, out_w, scored_h, smooth=False)
        right[:scored_h] = cv2.applyColorMap(heat, cv2.COLORMAP_JET)
    else:
        cv2.putText(right, "no score", (4, out_h // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (230, 230, 230), 1, cv2.LINE_AA)  # fmt: skip
    r = crop.region
    # one pixel outside the region, so the outline never hides its edge
    x0 = round((r.x_start - c) * scale) - 2
    x1 = round((r.x_end - c) * scale) + 1
    y0 = round((r.line_start - a) * scale) - 2
    y1 = round((r.line_end - a) * scale) + 1
    thick = 1 if size_px < 256 else 2
    cv2.rectangle(left, (x0, y0), (x1, y1), (0, 0, 255), thick)
    cv2.rectangle(right, (x0, y0), (x1, y1), (255, 255, 255), thick)
    canvas = np.full((out_h, 2 * out_w + GAP_PX, 3), 32, np.uint8)
    canvas[:, :out_w] = left
    canvas[:, out_w + GAP_PX :] = right
    ok, buf = cv2.imencode(".png", canvas, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 BGR image
        raise PictureError("PNG encoding failed")
    return bytes(buf.tobytes())


def _fit(image: U8, width: int, height: int, smooth: bool) -> U8:
    if image.shape[0] == height and image.shape[1] == width:
        return np.ascontiguousarray(image)
    shrink = image.shape[0] > height or image.shape[1] > width
    interp = cv2.INTER_AREA if smooth and shrink else cv2.INTER_NEAREST
    out: U8 = cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=interp)
    return out


# -------------------------------------------------------------------- storing


@dataclass(frozen=True)
class Roll:
    """How much web one segment of one camera inspected (for defects per metre)."""

    run: int  # the daemon's start time, ns: segment numbers restart with the daemon
    camera: str
    segment: int
    line_start: int
    line_end: int  # one past the last line received
    width_px: int  # camera pixels per line
    web_px: int | None  # the web's width where its edges are tracked
    lines_per_metre: float
    pixels_per_metre: float
    t_first_ns: int
    t_last_ns: int

    @property
    def metres(self) -> float:
        return (self.line_end - self.line_start) / self.lines_per_metre

    @property
    def square_metres(self) -> float:
        return self.metres * (self.web_px or self.width_px) / self.pixels_per_metre


class PictureStore(Protocol):
    """Where pictures (and roll lengths) are kept; thread-safe."""

    def put(self, seq: int, camera: str, png: bytes) -> None: ...

    def get(self, seq: int) -> bytes | None: ...

    def put_roll(self, roll: Roll) -> None: ...

    def prune(self, oldest_seq: int | None) -> None: ...

    def close(self) -> None: ...


class MemoryPictures:
    """The newest ``keep`` pictures in memory (no journal)."""

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.keep = keep
        self._lock = threading.Lock()
        self._pictures: OrderedDict[int, bytes] = OrderedDict()
        self._rolls: dict[tuple[int, str, int], Roll] = {}

    def put(self, seq: int, camera: str, png: bytes) -> None:
        with self._lock:
            self._pictures[seq] = png
            self._pictures.move_to_end(seq)
            while len(self._pictures) > self.keep:
                self._pictures.popitem(last=False)

    def get(self, seq: int) -> bytes | None:
        with self._lock:
            return self._pictures.get(seq)

    def put_roll(self, roll: Roll) -> None:
        with self._lock:
            self._rolls[(roll.run, roll.camera, roll.segment)] = roll
            while len(self._rolls) > self.keep:
                self._rolls.pop(next(iter(self._rolls)))

    def rolls(self) -> list[Roll]:
        with self._lock:
            return list(self._rolls.values())

    def prune(self, oldest_seq: int | None) -> None:
        pass  # bounded by count as it goes

    def close(self) -> None:
        pass


def pictures_path(journal: Path) -> Path:
    """Where the pictures of the journal at ``journal`` are: ``journal.pictures.sqlite``."""
    stem = journal.stem if journal.suffix == ".sqlite" else journal.name
    return journal.with_name(f"{stem}.pictures.sqlite")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS pictures (
    seq INTEGER PRIMARY KEY,
    camera TEXT NOT NULL,
    t_ns INTEGER NOT NULL,
    png BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS rolls (
    run INTEGER NOT NULL,
    camera TEXT NOT NULL,
    segment INTEGER NOT NULL,
    line_start INTEGER NOT NULL,
    line_end INTEGER NOT NULL,
    width_px INTEGER NOT NULL,
    web_px INTEGER,
    lines_per_metre REAL NOT NULL,
    pixels_per_metre REAL NOT NULL,
    t_first_ns INTEGER NOT NULL,
    t_last_ns INTEGER NOT NULL,
    PRIMARY KEY (run, camera, segment)
);
"""
_ROLL_COLUMNS = ", ".join(f.name for f in fields(Roll))


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA journal_mode = WAL")
    # A picture lost to a power cut is a picture, not an event: no fsync per commit.
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


class SqlitePictures:
    """Pictures and roll lengths in an SQLite file beside the journal (``pictures_path``).

    ``next_seq`` is the journal's: pictures at or above it belong to a journal that is gone
    (moved aside as corrupt) and are deleted at start. ``max_age_s`` bounds the roll records
    as the journal's age bound does its events.
    """

    def __init__(self, path: Path, next_seq: int = 0, max_age_s: float = 7 * 86400.0) -> None:
        self.path = Path(path)
        self.max_age_s = max_age_s
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._w = _connect(self.path)
            self._w.executescript(_SCHEMA)
            self._w.execute("DELETE FROM pictures WHERE seq >= ?", (next_seq,))
            self._r = _connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise PictureError(f"cannot open the picture store {self.path}: {exc}") from exc

    def put(self, seq: int, camera: str, png: bytes) -> None:
        with self._wlock:
            if self._closed:
                return
            self._w.execute(
                "INSERT OR REPLACE INTO pictures (seq, camera, t_ns, png) VALUES (?, ?, ?, ?)",
                (seq, camera, time.time_ns(), png),
            )

    def get(self, seq: int) -> bytes | None:
        with self._rlock:
            if self._closed:
                return None
            row = self._r.execute("SELECT png FROM pictures WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else bytes(row[0])

    def put_roll(self, roll: Roll) -> None:
        marks = ", ".join("?" for _ in fields(Roll))
        with self._wlock:
            if self._closed:
                return
            self._w.execute(
                f"INSERT OR REPLACE INTO rolls ({_ROLL_COLUMNS}) VALUES ({marks})", astuple(roll)
            )

    def prune(self, oldest_seq: int | None) -> None:
        """Drop pictures of events the journal no longer holds, and old roll records."""
        oldest_time = time.time_ns() - int(self.max_age_s * 1e9)
        with self._wlock:
            if self._closed:
                return
            if oldest_seq is not None:
                self._w.execute("DELETE FROM pictures WHERE seq < ?", (oldest_seq,))
            self._w.execute("DELETE FROM rolls WHERE t_last_ns < ?", (oldest_time,))

    def count(self) -> int:
        with self._rlock:
            return int(self._r.execute("SELECT COUNT(*) FROM pictures").fetchone()[0])

    def close(self) -> None:
        with self._wlock, self._rlock:
            if self._closed:
                return
            self._closed = True
            self._r.close()
            with contextlib.suppress(sqlite3.Error):
                self._w.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._w.close()


def read_pictures(path: Path) -> tuple[dict[int, bytes], list[Roll]]:
    """Every picture and roll record in a picture store file (read-only; for the report)."""
    if not Path(path).is_file():
        raise PictureError(f"no picture store at {path}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    except sqlite3.Error as exc:
        raise PictureError(f"cannot open the picture store {path}: {exc}") from exc
    try:
        pictures = {int(s): bytes(p) for s, p in conn.execute("SELECT seq, png FROM pictures")}
        rolls = [Roll(*row) for row in conn.execute(f"SELECT {_ROLL_COLUMNS} FROM rolls")]
    except sqlite3.Error as exc:
        raise PictureError(f"{path} is not a linescan picture store: {exc}") from exc
    finally:
        conn.close()
    return pictures, rolls


# -------------------------------------------------------------------- the thread


_STOP: Final = object()


@dataclass(frozen=True)
class _Draw:
    seq: int
    crop: Crop


class PictureWriter:
    """The thread that draws crops and stores them, and records roll lengths.

    ``oldest_seq`` (the journal's oldest event) is asked every ``prune_every`` pictures, and
    the store pruned to it.
    """

    def __init__(
        self,
        store: PictureStore,
        size_px: int,
        queue_size: int,
        metrics: Metrics,
        oldest_seq: Callable[[], int | None] | None = None,
        prune_every: int = PRUNE_EVERY,
    ) -> None:
        self.store = store
        self.prune_every = prune_every
        self.size_px = size_px
        self.metrics = metrics
        self._oldest_seq = oldest_seq
        self._queue: queue.Queue[_Draw | Roll | object] = queue.Queue(queue_size)
        self._pending: set[int] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stored = 0
        self._throttled = RateLimitedLogger(log, interval_s=10.0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="linescan-pictures", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def expect(self, seq: int) -> None:
        """A picture of event ``seq`` is coming (``submit`` or ``cancel`` follows): a request
        for it waits meanwhile."""
        with self._cond:
            self._pending.add(seq)

    def cancel(self, seq: int) -> None:
        """No picture of event ``seq`` is coming after all."""
        with self._cond:
            self._pending.discard(seq)
            self._cond.notify_all()

    def submit(self, seq: int, crop: Crop) -> bool:
        """Queue a crop to draw as the picture of event ``seq``; False (counted) when full."""
        with self._cond:
            self._pending.add(seq)
        try:
            self._queue.put_nowait(_Draw(seq, crop))
        except queue.Full:
            with self._cond:
                self._pending.discard(seq)
                self._cond.notify_all()
            self.metrics.pictures_total.labels("skipped").inc()
            return False
        return True

    def roll(self, roll: Roll) -> None:
        """Record a roll length (skipped when the queue is full: the next status has it)."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(roll)

    def get(self, seq: int, wait_s: float = 2.0) -> bytes | None:
        """The picture of event ``seq``, waiting up to ``wait_s`` while it is being drawn."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while seq in self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        return self.store.get(seq)

    def stop(self, timeout: float = 10.0) -> None:
        """Draw what is queued, then stop."""
        if self._thread is None:
            return
        while self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                if isinstance(item, Roll):
                    self.store.put_roll(item)
                elif isinstance(item, _Draw):
                    self._picture(item.seq, item.crop)
            except Exception as exc:  # a picture must never stop inspection: count, say so
                self.metrics.pictures_total.labels("error").inc()
                self._throttled.error("picture", "picture not stored", error=repr(exc))

    def _picture(self, seq: int, crop: Crop) -> None:
        try:
            t0 = time.perf_counter()
            png = render(crop, self.size_px)
            self.store.put(seq, crop.camera, png)
            self.metrics.stage_seconds.labels("picture").observe(time.perf_counter() - t0)
            self.metrics.pictures_total.labels("stored").inc()
            self.metrics.picture_bytes_total.inc(len(png))
        finally:
            with self._cond:
                self._pending.discard(seq)
                self._cond.notify_all()
        self._stored += 1
        if self._oldest_seq is not None and self._stored % self.prune_every == 0:
            self.store.prune(self._oldest_seq())
