"""A durable journal of defect events: nothing published is lost, ``seq`` survives restarts.

Why: PUB never blocks inspection, so a subscriber that is down, slow or still connecting misses
events, and a daemon that restarts would start its event ``seq`` at 0 again. The journal fixes
both. The post thread writes every defect event here *before* it is sent (see
``EventPublisher(journal=...)``), so

- a subscriber that missed events asks the daemon's replay endpoint (``replay.py``) for every
  event from a ``seq`` on and gets the exact bodies that were published;
- after a restart the publisher continues at :meth:`EventJournal.next_seq` (the largest
  journaled ``seq`` + 1), so ``seq`` never repeats: an event journaled just before a crash,
  and perhaps never sent, keeps its number and is replayable.

Storage: one SQLite file (standard library ``sqlite3``) in WAL mode with ``synchronous=FULL``:
each event is a committed row, fsynced before it is sent, so neither a killed process nor a
power cut loses or corrupts it. The events found in one stitched tile row are committed
together (one transaction, one fsync: :meth:`EventJournal.append_many`), so a burst of defects
costs one disk flush per tile row, not one per event. Readers (the replay endpoint) never
block the writer. The table is
``events(seq INTEGER PRIMARY KEY, topic TEXT, t_publish_ns INTEGER, body TEXT)``, ``body``
being the JSON exactly as sent. The journal is bounded by count (``max_events``) and age
(``max_age_s``): older rows are pruned every few hundred appends, but the newest row is always
kept, so ``next_seq`` survives any pruning.

Only defect events are journaled: they are the ones a subscriber must not miss and the only
ones with a persistent counter. Status messages are periodic snapshots of running totals.

A journal that cannot be written (disk full, I/O error) must not stop inspection: the daemon
counts the failure (``linescan_journal_errors_total``), logs it and still publishes. A file
that fails SQLite's integrity check at start-up is moved aside (``*.corrupt-<time>``) and a new
one is started, with an error in the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from linescan.errors import LinescanError
from linescan.log import RateLimitedLogger, get_logger

__all__ = [
    "EventJournal",
    "JournalError",
    "JournaledEvent",
    "default_journal_path",
    "read_journal",
]

log = get_logger("linescan.journal")

SCHEMA_VERSION: Final = 1
PRUNE_EVERY: Final = 256  # appends between two pruning passes
JournalRow = tuple[int, str, int, str]
"""``(seq, topic, t_publish_ns, body_json)``: one event as journaled."""
MAX_PAGE: Final = 1000  # most events one ``since`` call returns

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    t_publish_ns INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_time ON events (t_publish_ns);
"""


class JournalError(LinescanError):
    """The journal file cannot be opened or used."""


@dataclass(frozen=True)
class JournaledEvent:
    seq: int
    topic: str
    t_publish_ns: int
    body: str  # the JSON text exactly as published

    def decoded(self) -> dict[str, Any]:
        value = json.loads(self.body)
        if not isinstance(value, dict):  # pragma: no cover - we only ever write objects
            raise JournalError(f"journaled event {self.seq} is not a JSON object")
        return value


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    # isolation_level=None: autocommit, each INSERT is its own durable transaction.
    # check_same_thread=False: each connection is used under its own lock by one thread at a time.
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA busy_timeout = 10000")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        conn.close()
        raise JournalError(f"{path}: SQLite refused WAL mode (got {mode!r})")
    conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    return conn


class EventJournal:
    """The journal file at ``path`` (created with its directory if missing).

    ``append`` is called by one thread (the publisher's); ``since``/``bounds`` may be called
    from any other thread at the same time (a separate read connection; WAL readers never block
    the writer). ``clock_ns`` is for tests of the age bound.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_events: int = 100_000,
        max_age_s: float = 7 * 86400.0,
        synchronous: Literal["normal", "full"] = "full",
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if max_events < 1:
            raise ValueError("max_events must be >= 1")
        if max_age_s <= 0:
            raise ValueError("max_age_s must be > 0")
        self.path = Path(path)
        self.max_events = max_events
        self.max_age_s = max_age_s
        self._clock_ns = clock_ns
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        self._appends = 0
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._w = self._open_checked(synchronous)
            self._w.executescript(_SCHEMA)
            self._w.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._r = _connect(self.path, synchronous)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot open the event journal {self.path}: {exc}") from exc
        self._next_seq = self._max_seq() + 1
        self.prune()

    def _open_checked(self, synchronous: str) -> sqlite3.Connection:
        """Open the file; one that SQLite finds corrupt is moved aside and started afresh."""
        try:
            conn = _connect(self.path, synchronous)
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
            if result == "ok":
                return conn
            conn.close()
            why = str(result)[:200]
        except sqlite3.DatabaseError as exc:  # "file is not a database" and friends
            why = str(exc)
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                src.replace(Path(f"{aside}{suffix}"))
        log.error(
            "event journal is corrupt: moved aside, starting a new one; event seq restarts at 0",
            path=str(self.path),
            moved_to=str(aside),
            check=why,
        )
        return _connect(self.path, synchronous)

    # ------------------------------------------------------------------ writing

    def append(self, seq: int, topic: str, t_publish_ns: int, body: str) -> None:
        """Store one event durably (committed and fsynced when this returns).

        Raises ``JournalError`` when the row cannot be written, or when ``seq`` is not above
        every journaled one (a counter that went backwards would make replays ambiguous).
        """
        self.append_many([(seq, topic, t_publish_ns, body)])

    def append_many(self, rows: Sequence[JournalRow]) -> None:
        """Store events durably in one transaction: all of them, or (``JournalError``) none."""
        if not rows:
            return
        with self._wlock:
            if self._closed:
                raise JournalError("the event journal is closed")
            seqs = [r[0] for r in rows]
            try:
                self._w.execute("BEGIN IMMEDIATE")
                try:
                    self._w.executemany(
                        "INSERT INTO events (seq, topic, t_publish_ns, body) VALUES (?, ?, ?, ?)",
                        rows,
                    )
                    self._w.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self._w.execute("ROLLBACK")
                    raise
            except sqlite3.IntegrityError as exc:
                raise JournalError(f"event seq {seqs} is already journaled") from exc
            except sqlite3.Error as exc:
                raise JournalError(f"cannot write events {seqs} to {self.path}: {exc}") from exc
            self._next_seq = max(self._next_seq, max(seqs) + 1)
            before = self._appends
            self._appends += len(rows)
            due = self._appends // PRUNE_EVERY > before // PRUNE_EVERY
        if due:
            self.prune()

    def prune(self) -> int:
        """Delete events beyond the count and age bounds (never the newest); returns how many."""
        with self._wlock:
            if self._closed:
                return 0
            newest = self._next_seq - 1
            oldest_time = self._clock_ns() - int(self.max_age_s * 1e9)
            try:
                cur = self._w.execute(
                    "DELETE FROM events WHERE seq < ? AND (seq <= ? OR t_publish_ns < ?)",
                    (newest, newest - self.max_events, oldest_time),
                )
            except sqlite3.Error as exc:
                log.error("cannot prune the event journal", path=str(self.path), error=str(exc))
                return 0
            return cur.rowcount if cur.rowcount > 0 else 0

    # ------------------------------------------------------------------ reading

    def next_seq(self) -> int:
        """The ``seq`` the next event gets: the largest journaled ``seq`` + 1 (0 when empty)."""
        with self._wlock:
            return self._next_seq

    def _max_seq(self) -> int:
        row = self._w.execute("SELECT MAX(seq) FROM events").fetchone()
        return -1 if row is None or row[0] is None else int(row[0])

    def bounds(self) -> tuple[int | None, int | None]:
        """(oldest, newest) journaled ``seq``, or (None, None) when empty."""
        with self._rlock:
            self._check_open()
            row = self._r.execute("SELECT MIN(seq), MAX(seq) FROM events").fetchone()
        if row is None or row[0] is None:
            return None, None
        return int(row[0]), int(row[1])

    def since(self, seq: int, limit: int = MAX_PAGE) -> list[JournaledEvent]:
        """Journaled events with ``seq`` >= the given one, oldest first, at most ``limit``."""
        limit = max(1, min(limit, MAX_PAGE))
        with self._rlock:
            self._check_open()
            rows = self._r.execute(
                "SELECT seq, topic, t_publish_ns, body FROM events WHERE seq >= ? "
                "ORDER BY seq LIMIT ?",
                (max(seq, 0), limit),
            ).fetchall()
        return [JournaledEvent(int(s), str(t), int(ts), str(b)) for s, t, ts, b in rows]

    def count(self) -> int:
        with self._rlock:
            self._check_open()
            return int(self._r.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def integrity_check(self) -> str:
        """SQLite's full ``PRAGMA integrity_check``: "ok" for a sound file."""
        with self._rlock:
            self._check_open()
            return str(self._r.execute("PRAGMA integrity_check").fetchone()[0])

    def _check_open(self) -> None:
        if self._closed:
            raise JournalError("the event journal is closed")

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close; idempotent."""
        with self._wlock, self._rlock:
            if self._closed:
                return
            self._closed = True
            self._r.close()
            with contextlib.suppress(sqlite3.Error):  # a busy reader elsewhere: harmless
                self._w.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._w.close()

    def __enter__(self) -> EventJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the daemon's hook

    def recorder(self, on_result: Callable[[bool], None] | None = None) -> JournalHook:
        """The ``journal=`` callable for ``EventPublisher``: appends, never raises.

        A failed write is logged (rate-limited) and reported through ``on_result(False)``;
        the event is still published, so inspection never stops for a full disk.
        """
        return JournalHook(self, on_result)


class JournalHook:
    """``(rows) -> None`` for ``EventPublisher(journal=...)``: one transaction per call."""

    def __init__(self, journal: EventJournal, on_result: Callable[[bool], None] | None) -> None:
        self.journal = journal
        self._on_result = on_result
        self._throttled = RateLimitedLogger(log, interval_s=10.0)

    def __call__(self, rows: Sequence[JournalRow]) -> None:
        try:
            self.journal.append_many(rows)
        except JournalError as exc:
            self._throttled.error(
                "journal-write",
                "events not journaled; they are still published",
                seqs=[r[0] for r in rows],
                error=str(exc),
            )
            self._report(False, len(rows))
            return
        self._report(True, len(rows))

    def _report(self, ok: bool, n: int) -> None:
        if self._on_result is not None:
            for _ in range(n):
                self._on_result(ok)


def default_journal_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """``$STATE_DIRECTORY/journal.sqlite`` (systemd's ``StateDirectory=``), or None."""
    env = os.environ if environ is None else environ
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(state) / "journal.sqlite" if state else None


def read_journal(path: Path, since: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    """Every journaled event body with ``seq`` >= ``since`` from a journal file, oldest first.

    For ``linescan events --journal FILE``: reads a file another process may be writing (WAL
    lets it). Raises JournalError when the file is missing or not a journal.
    """
    path = Path(path)
    if not path.is_file():
        raise JournalError(f"no event journal at {path}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    except sqlite3.Error as exc:
        raise JournalError(f"cannot open the event journal {path}: {exc}") from exc
    try:
        query = "SELECT body FROM events WHERE seq >= ? ORDER BY seq"
        params: tuple[int, ...] = (max(since, 0),)
        if limit is not None:
            query += " LIMIT ?"
            params += (limit,)
        rows = conn.execute(query, params).fetchall()
    except sqlite3.Error as exc:
        raise JournalError(f"{path} is not a linescan event journal: {exc}") from exc
    finally:
        conn.close()
    out: list[dict[str, Any]] = []
    for (body,) in rows:
        value = json.loads(body)
        if isinstance(value, dict):
            out.append(value)
    return out
