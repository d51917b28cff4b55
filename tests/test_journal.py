"""Tests for the durable event journal, the replay endpoint and the gapless subscriber."""

from __future__ import annotations

import json
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from prometheus_client import CollectorRegistry

from linescan.cli import _journal_default, main
from linescan.config import Config
from linescan.errors import LinescanError
from linescan.ingest import encode_frame
from linescan.journal import EventJournal, JournalError, default_journal_path, read_journal
from linescan.metrics import Metrics
from linescan.replay import FollowStats, ReplayError, ReplayServer, _Follower, fetch, follow
from linescan.service import Daemon

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fuzz

Context = zmq.Context[zmq.Socket[bytes]]


@pytest.fixture
def context() -> Iterator[Context]:
    ctx: Context = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)  # never hangs on a socket a failed test left open


def body(seq: int, **extra: Any) -> str:
    return json.dumps({"v": 1, "seq": seq, "camera": "cam0", **extra})


def fill(j: EventJournal, seqs: range, t_ns: int = 0) -> None:
    for s in seqs:
        j.append(s, "defect", t_ns or time.time_ns(), body(s))


# ----------------------------------------------------------------------------- the journal


def test_append_since_bounds(tmp_path: Path) -> None:
    """Events come back oldest first from a seq on, exactly as written, at most `limit`."""
    with EventJournal(tmp_path / "j.sqlite") as j:
        assert (j.next_seq(), j.bounds(), j.since(0)) == (0, (None, None), [])
        fill(j, range(10))
        got = j.since(3)
        assert [e.seq for e in got] == list(range(3, 10))
        assert [e.body for e in got] == [body(s) for s in range(3, 10)]
        assert got[0].decoded() == json.loads(body(3))
        assert [e.seq for e in j.since(3, limit=2)] == [3, 4]
        assert j.bounds() == (0, 9)
        assert j.count() == 10
        assert j.integrity_check() == "ok"


def test_file_is_wal_and_fsynced(tmp_path: Path) -> None:
    """The file is in WAL mode with synchronous=FULL (durable before an event is sent)."""
    path = tmp_path / "j.sqlite"
    with EventJournal(path) as j:
        fill(j, range(3))
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert [r[0] for r in conn.execute("SELECT seq FROM events")] == [0, 1, 2]
        finally:
            conn.close()
        assert j._w.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_batch_is_one_transaction(tmp_path: Path) -> None:
    """append_many stores all of its rows or none: a batch holding a seq that is already
    there leaves the journal as it was, and the next good batch continues normally."""
    with EventJournal(tmp_path / "j.sqlite") as j:
        j.append_many([(s, "defect", 0, body(s)) for s in range(3)])
        with pytest.raises(JournalError, match="already journaled"):
            j.append_many([(3, "defect", 0, body(3)), (2, "defect", 0, body(2))])
        assert [e.seq for e in j.since(0)] == [0, 1, 2]
        assert j.next_seq() == 3
        j.append_many([(3, "defect", 0, body(3)), (4, "defect", 0, body(4))])
        assert [e.seq for e in j.since(0)] == [0, 1, 2, 3, 4]
        j.append_many([])
        assert j.count() == 5


def test_batches_are_pruned_like_single_appends(tmp_path: Path) -> None:
    """Pruning runs when a batch crosses a multiple of PRUNE_EVERY, not only on exact hits."""
    with EventJournal(tmp_path / "j.sqlite", max_events=10) as j:
        for start in range(0, 300, 7):  # batches of 7 never land exactly on 256
            j.append_many([(s, "defect", 0, body(s)) for s in range(start, start + 7)])
        assert j.count() < 300
        assert j.next_seq() == 301


def test_next_seq_survives_reopening(tmp_path: Path) -> None:
    """A reopened journal continues at the largest journaled seq + 1."""
    path = tmp_path / "state" / "j.sqlite"  # the directory is created
    with EventJournal(path) as j:
        fill(j, range(5, 12))
    with EventJournal(path) as j:
        assert j.next_seq() == 12
        assert [e.seq for e in j.since(0)] == list(range(5, 12))


def test_a_seq_is_never_journaled_twice(tmp_path: Path) -> None:
    """Appending a seq that is already there is refused (a counter must never go back)."""
    with EventJournal(tmp_path / "j.sqlite") as j:
        fill(j, range(3))
        with pytest.raises(JournalError, match="already journaled"):
            j.append(1, "defect", 0, body(1))
        assert j.next_seq() == 3


def test_count_bound_keeps_the_newest(tmp_path: Path) -> None:
    """Past max_events the oldest events are pruned."""
    with EventJournal(tmp_path / "j.sqlite", max_events=5) as j:
        fill(j, range(20))
        assert j.prune() == 15
        assert [e.seq for e in j.since(0)] == list(range(15, 20))
        assert j.next_seq() == 20


def test_age_bound_never_prunes_the_newest(tmp_path: Path) -> None:
    """Events older than max_age_s are pruned, except the newest: next_seq survives."""
    now = [10**18]
    path = tmp_path / "j.sqlite"
    with EventJournal(path, max_age_s=60, clock_ns=lambda: now[0]) as j:
        fill(j, range(4), t_ns=now[0] - 120 * 10**9)
        j.append(4, "defect", now[0] - 61 * 10**9, body(4))
        assert j.prune() == 4
        assert [e.seq for e in j.since(0)] == [4]
        now[0] += 3600 * 10**9
        assert j.prune() == 0
    with EventJournal(path, max_age_s=60, clock_ns=lambda: now[0]) as j:
        assert j.next_seq() == 5


def test_appends_prune_as_they_go(tmp_path: Path) -> None:
    """Appending alone keeps the journal within max_events (pruned every few hundred)."""
    with EventJournal(tmp_path / "j.sqlite", max_events=10, synchronous="normal") as j:
        fill(j, range(300))
        assert j.count() <= 10 + 256


def test_a_corrupt_file_is_moved_aside(tmp_path: Path) -> None:
    """A file that is not a sound SQLite database is set aside, and a new journal starts."""
    path = tmp_path / "j.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with EventJournal(path) as j:
        assert j.next_seq() == 0
        fill(j, range(2))
    aside = list(tmp_path.glob("j.sqlite.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes().startswith(b"this is not a database")


def test_the_hook_never_raises(tmp_path: Path) -> None:
    """A failed write is reported through on_result and swallowed: the event still goes out."""
    results: list[bool] = []
    j = EventJournal(tmp_path / "j.sqlite")
    hook = j.recorder(results.append)
    hook([(0, "defect", 1, body(0))])
    hook([(0, "defect", 1, body(0))])  # duplicate seq: an error
    hook([(1, "defect", 1, body(1)), (2, "defect", 1, body(2))])  # one result per event
    j.close()
    hook([(3, "defect", 1, body(3))])  # closed: an error
    assert results == [True, False, True, True, False]


def test_read_journal_while_the_daemon_writes(tmp_path: Path) -> None:
    """`read_journal` reads a journal another connection is writing (WAL readers)."""
    path = tmp_path / "j.sqlite"
    with EventJournal(path) as j:
        fill(j, range(6))
        assert [e["seq"] for e in read_journal(path, since=2)] == [2, 3, 4, 5]
        assert [e["seq"] for e in read_journal(path, since=2, limit=1)] == [2]
    with pytest.raises(JournalError, match="no event journal"):
        read_journal(tmp_path / "missing.sqlite")
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE x (a)").connection.close()
    with pytest.raises(JournalError, match="not a linescan event journal"):
        read_journal(other)


def test_default_journal_path() -> None:
    """serve's default: $STATE_DIRECTORY/journal.sqlite (the first of several), else none."""
    assert default_journal_path({"STATE_DIRECTORY": "/var/lib/linescan:/x"}) == Path(
        "/var/lib/linescan/journal.sqlite"
    )
    assert default_journal_path({}) is None


def test_serve_fills_in_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`serve` journals under STATE_DIRECTORY unless the config sets a path or disables it."""

    class Log:
        def __init__(self) -> None:
            self.warnings: list[str] = []

        def warning(self, event: str, **_: Any) -> None:
            self.warnings.append(event)

    log = Log()
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    assert _journal_default(Config(), log).journal.path == tmp_path / "journal.sqlite"
    own = Config.model_validate({"journal": {"path": "/srv/j.sqlite"}})
    assert _journal_default(own, log).journal.path == Path("/srv/j.sqlite")
    off = Config.model_validate({"journal": {"enabled": False}})
    assert _journal_default(off, log).journal.path is None
    monkeypatch.delenv("STATE_DIRECTORY")
    assert _journal_default(Config(), log).journal.path is None
    assert len(log.warnings) == 2


# ----------------------------------------------------------------------------- replay


def test_replay_endpoint_protocol(tmp_path: Path, context: Context) -> None:
    """REQ {"since", "limit"} -> the journaled bodies, next_seq, bounds; bad requests get an
    error and the endpoint keeps serving."""
    metrics = Metrics(CollectorRegistry(), process=False)
    j = EventJournal(tmp_path / "j.sqlite")
    fill(j, range(5))
    server = ReplayServer(j, "tcp://127.0.0.1:*", context, metrics)
    server.start()
    try:
        page = fetch(server.endpoint, 2, 2, context=context)
        assert [e["seq"] for e in page.events] == [2, 3]
        assert (page.next_seq, page.first_seq, page.last_seq) == (4, 0, 4)
        empty = fetch(server.endpoint, 9, context=context)
        assert (empty.events, empty.next_seq) == ([], 9)
        req = context.socket(zmq.REQ)
        req.connect(server.endpoint)
        for bad in (b"\xff", b"[1]", b'{"since": -1}', b'{"limit": 0}', b'{"since": true}'):
            req.send(bad)
            assert req.poll(5000)
            assert "error" in json.loads(req.recv())
        req.close(linger=0)
        with pytest.raises(ReplayError, match="limit"):
            fetch(server.endpoint, 0, 5000, context=context)
        assert server.alive()
        get = metrics.registry.get_sample_value
        assert get("linescan_replay_requests_total", {"result": "ok"}) == 2
        assert get("linescan_replay_requests_total", {"result": "error"}) == 6
        assert get("linescan_events_replayed_total") == 2
    finally:
        server.stop()
        j.close()
    assert not server.alive()


def test_fetch_times_out_without_a_server(context: Context) -> None:
    """A replay request to nobody fails after its timeout instead of hanging."""
    with pytest.raises(ReplayError, match="no reply"):
        fetch(f"tcp://127.0.0.1:{free_port()}", 0, timeout_s=0.2, context=context)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_follower_fills_gaps_in_order() -> None:
    """Live events after a jump are preceded by the missing ones from the journal; repeats are
    dropped; a status whose last_seq is ahead triggers a fill; a hole the journal lacks is
    reported as lost."""
    journal = {s: {"seq": s} for s in range(12) if s != 9}
    calls: list[tuple[int, int | None]] = []

    def replay(start: int, until: int | None) -> list[dict[str, Any]]:
        calls.append((start, until))
        end = until if until is not None else 12
        return [journal[s] for s in range(start, end) if s in journal]

    got: list[int] = []
    stats = FollowStats()
    f = _Follower(replay, lambda t, b: got.append(b["seq"]) if t == "defect" else None, 2, stats)
    f.fill(None)  # the catch-up: 2..8, 10, 11 (9 was pruned)
    assert got == [2, 3, 4, 5, 6, 7, 8, 10, 11]
    assert stats.lost == [(9, 9)]
    f.live("defect", {"seq": 11})  # seen in the replay already
    assert stats.duplicates == 1
    journal.update({12: {"seq": 12}, 13: {"seq": 13}})
    f.live("defect", {"seq": 14})  # 12 and 13 missed live: filled from the journal first
    assert got[-3:] == [12, 13, 14]
    journal[15] = {"seq": 15}
    f.live("status", {"last_seq": 15})  # 15 announced, never seen live
    assert got[-1] == 15
    assert (stats.live, stats.replayed, stats.next_seq) == (1, 12, 16)
    assert calls[1:] == [(12, 14), (15, 16)]


# ----------------------------------------------------------------------------- in the daemon


def daemon_config(journal: Path, **journal_keys: Any) -> Config:
    return Config.model_validate(
        {
            "frames": {"endpoint": "tcp://127.0.0.1:*"},
            "events": {"endpoint": "tcp://127.0.0.1:*", "status_interval_s": 0.1},
            "metrics": {"enabled": False},
            "inspection": {"stride": fuzz.STRIDE, "max_wait_ms": 5.0},
            "queues": {"overload": "block"},
            "journal": {"path": str(journal), "replay_endpoint": "tcp://127.0.0.1:*"},
        }
    )


def feed(endpoint: str, context: Context, first_seq: int, n: int, width: int = 128) -> None:
    """n frames of a flat web, a defect in each, ending the segment."""
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.connect(endpoint)
    for i in range(n):
        px = fuzz.web_frame(fuzz.PATCH, width, (8, 40, 16, 16))
        line = (first_seq + i) * fuzz.PATCH
        push.send_multipart(encode_frame("cam0", first_seq + i, px, line=line, end=i == n - 1))
    push.close()


def run_daemon(
    journal: Path, context: Context, first_seq: int, n: int
) -> tuple[list[dict[str, Any]], list[bytes], Daemon]:
    """A daemon with a journal inspects n frames; its events via on_event and a real SUB."""
    events: list[dict[str, Any]] = []
    d = Daemon(
        daemon_config(journal),
        fuzz.flat_meta(),
        fuzz.flat_backend(),
        CollectorRegistry(),
        context,
        on_event=lambda t, b: events.append(b) if t == "defect" else None,
    )
    d.start()
    sub = context.socket(zmq.SUB)
    wire: list[bytes] = []
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"defect")
        sub.connect(d.events_endpoint)
        time.sleep(0.3)  # the subscription reaches the PUB socket
        feed(d.frames_endpoint, context, first_seq, n)
        deadline = time.monotonic() + 30
        while len(events) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        while sub.poll(500):
            wire.append(sub.recv_multipart()[1])
    finally:
        sub.close(linger=0)
        d.stop()
        assert d.join(30)
    return events, wire, d


def test_daemon_journals_every_event_and_seq_survives_restart(
    tmp_path: Path, context: Context
) -> None:
    """Every defect event is journaled byte for byte as sent; a new daemon on the same journal
    continues seq where the last one stopped."""
    path = tmp_path / "journal.sqlite"
    first, wire, d = run_daemon(path, context, 0, 4)
    assert [e["seq"] for e in first] == [0, 1, 2, 3]
    assert [e.body.encode() for e in EventJournal(path).since(0)] == wire
    assert d.metrics.registry.get_sample_value("linescan_events_journaled_total") == 4
    second, _, _ = run_daemon(path, context, 100, 3)
    assert [e["seq"] for e in second] == [4, 5, 6]
    with EventJournal(path) as j:
        assert [e.seq for e in j.since(0)] == list(range(7))
        assert j.integrity_check() == "ok"


def test_a_subscriber_that_was_down_catches_up(tmp_path: Path, context: Context) -> None:
    """follow(since=0) against a running daemon delivers the events published before it
    subscribed (from the journal) and then the live ones, in order, each once."""
    events: list[dict[str, Any]] = []
    d = Daemon(
        daemon_config(tmp_path / "j.sqlite"),
        fuzz.flat_meta(),
        fuzz.flat_backend(),
        CollectorRegistry(),
        context,
        on_event=lambda t, b: events.append(b) if t == "defect" else None,
    )
    d.start()
    got: list[dict[str, Any]] = []
    stats: FollowStats | None = None
    try:
        feed(d.frames_endpoint, context, 0, 3)  # nobody listens
        deadline = time.monotonic() + 30
        while len(events) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert d.replay_endpoint is not None
        replay_endpoint = d.replay_endpoint

        def on_event(topic: str, body: dict[str, Any]) -> bool:
            got.append(body)
            return len(got) >= 6

        def later() -> None:
            time.sleep(0.5)
            feed(d.frames_endpoint, context, 3, 3)  # now live

        t = threading.Thread(target=later)
        t.start()
        stats = follow(
            d.events_endpoint,
            replay_endpoint,
            on_event,
            since=0,
            topics=("defect",),
            timeout_s=20,
            context=context,
        )
        t.join()
    finally:
        d.stop()
        assert d.join(30)
    assert [b["seq"] for b in got] == list(range(6))
    assert stats is not None
    assert stats.replayed >= 3
    assert stats.lost == []
    for mine, theirs in zip(got, events, strict=True):
        assert {k: mine[k] for k in theirs} == theirs


def test_events_cli_replays(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`linescan events --journal FILE --since N` prints the journaled events from N."""
    path = tmp_path / "j.sqlite"
    with EventJournal(path) as j:
        fill(j, range(5))
    assert main(["events", "--journal", str(path), "--since", "3"]) == 0
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert [(e["topic"], e["seq"]) for e in lines] == [("defect", 3), ("defect", 4)]
    assert "replayed 2" in out.err


def test_events_cli_replay_endpoint(
    tmp_path: Path, context: Context, capsys: pytest.CaptureFixture[str]
) -> None:
    """`linescan events --since N --replay-only` asks the daemon's replay endpoint."""
    with EventJournal(tmp_path / "j.sqlite") as j:
        fill(j, range(3))
        server = ReplayServer(j, "tcp://127.0.0.1:*", zmq.Context.instance())
        server.start()
        try:
            code = main(["events", "--since", "1", "--replay", server.endpoint, "--replay-only"])
        finally:
            server.stop()
    assert code == 0
    assert [json.loads(x)["seq"] for x in capsys.readouterr().out.splitlines()] == [1, 2]


def test_journal_errors_are_linescan_errors() -> None:
    """CLI users get one line, not a traceback."""
    assert issubclass(JournalError, LinescanError)
    assert issubclass(ReplayError, LinescanError)
