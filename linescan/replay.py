"""Replaying journaled events: a REQ/REP endpoint on the daemon, and a subscriber without gaps.

Protocol, version 1 (JSON over ZeroMQ REQ/REP, one request and one reply, both one frame)
--------------------------------------------------------------------------------------
Request::

    {"since": 42, "limit": 500}     since: first event seq wanted (>= 0); limit: 1..1000
                                    (default 1000)

Reply::

    {"v": 1, "topic": "defect", "events": [...], "next_seq": 45, "first_seq": 0, "last_seq": 44}

``events`` are the journaled defect event bodies, exactly as they were published, oldest first,
with ``seq`` >= ``since``. ``next_seq`` is the ``seq`` to ask for next (one past the last event
returned, or ``since`` when none). ``first_seq``/``last_seq`` are the oldest and newest events
the journal holds (null when empty): ``since < first_seq`` means older events were pruned.
A malformed request gets ``{"v": 1, "error": "..."}``. The endpoint is ``journal.replay_endpoint``
(default ``tcp://127.0.0.1:5557``) and is bound only when the journal is enabled.

A subscriber that never misses an event (:func:`follow`): subscribe to the live events, ask
the replay endpoint for everything from the ``seq`` it wants, then read live; whenever a live
defect's ``seq`` jumps, or a status message's ``last_seq`` is ahead of the last defect it has,
fetch the missing ``seq`` range from the journal before going on. Duplicates (an event seen in
the replay and live) are dropped by ``seq``. This covers a subscriber that was down, the
slow-joiner window of a fresh subscription, the PUB high-water mark, and daemon restarts (the
daemon continues ``seq`` from its journal).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import zmq

from linescan.errors import LinescanError
from linescan.journal import MAX_PAGE, EventJournal, JournalError
from linescan.log import RateLimitedLogger, get_logger

if TYPE_CHECKING:
    from linescan.metrics import Metrics

__all__ = [
    "REPLAY_VERSION",
    "EventSource",
    "FollowStats",
    "ReplayError",
    "ReplayPage",
    "ReplayServer",
    "fetch",
    "fetch_all",
    "follow",
    "follow_many",
]

REPLAY_VERSION: Final = 1
MAX_REQUEST_BYTES: Final = 4096
log = get_logger("linescan.replay")

Context = zmq.Context[zmq.Socket[bytes]]
SocketSetup = Callable[[zmq.Socket[bytes]], None]


class ReplayError(LinescanError):
    """The replay endpoint did not answer, or answered with an error."""


# --------------------------------------------------------------------------- server


def _answer(journal: EventJournal, raw: bytes) -> tuple[dict[str, Any], int]:
    """The reply to one request, and how many events it carries."""
    try:
        req = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {"v": REPLAY_VERSION, "error": "request is not UTF-8 JSON"}, 0
    if not isinstance(req, dict):
        return {"v": REPLAY_VERSION, "error": "request must be a JSON object"}, 0
    since = req.get("since", 0)
    limit = req.get("limit", MAX_PAGE)
    for key, value, low, high in (
        ("since", since, 0, 2**63 - 1),
        ("limit", limit, 1, MAX_PAGE),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return {"v": REPLAY_VERSION, "error": f"{key} must be an integer in {low}..{high}"}, 0
    events = journal.since(since, limit)
    first, last = journal.bounds()
    reply = {
        "v": REPLAY_VERSION,
        "topic": "defect",
        "events": [e.decoded() for e in events],
        "next_seq": events[-1].seq + 1 if events else since,
        "first_seq": first,
        "last_seq": last,
    }
    return reply, len(events)


class ReplayServer:
    """The REP endpoint over a journal, served from its own thread.

    ``start`` binds (errors surface to the caller) and starts the thread; ``stop`` ends it.
    ``configure`` sets socket options (CURVE) before the bind.
    """

    def __init__(
        self,
        journal: EventJournal,
        endpoint: str,
        context: Context | None = None,
        metrics: Metrics | None = None,
        configure: SocketSetup | None = None,
    ) -> None:
        self.journal = journal
        self.endpoint = endpoint
        self._ctx = context or zmq.Context.instance()
        self._metrics = metrics
        self._configure = configure
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._throttled = RateLimitedLogger(log, interval_s=10.0)
        self.error: BaseException | None = None

    def start(self) -> None:
        sock = self._ctx.socket(zmq.REP)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
            sock.setsockopt(zmq.SNDHWM, 16)
            if self._configure is not None:
                self._configure(sock)
            sock.bind(self.endpoint)
            last = sock.getsockopt(zmq.LAST_ENDPOINT)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self.endpoint = last.decode() if isinstance(last, bytes) else str(last)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name="linescan-replay", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        sock = self._sock
        if sock is None:  # pragma: no cover - start() sets it
            return
        try:
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                parts = sock.recv_multipart()
                try:
                    reply, n = _answer(self.journal, parts[0] if parts else b"")
                except JournalError as exc:
                    reply, n = {"v": REPLAY_VERSION, "error": str(exc)}, 0
                if self._metrics is not None:
                    result = "error" if "error" in reply else "ok"
                    self._metrics.replay_requests_total.labels(result).inc()
                    self._metrics.events_replayed_total.inc(n)
                if "error" in reply:
                    self._throttled.warning(
                        "replay-bad", "bad replay request", error=reply["error"]
                    )
                sock.send(json.dumps(reply, separators=(",", ":")).encode("utf-8"))
        except BaseException as exc:  # a dead replay thread must be visible (alive() is False)
            self.error = exc
            log.exception("replay endpoint failed")
        finally:
            sock.close(linger=0)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket; idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class ReplayPage:
    events: list[dict[str, Any]]
    next_seq: int
    first_seq: int | None
    last_seq: int | None


def fetch(
    endpoint: str,
    since: int,
    limit: int = MAX_PAGE,
    *,
    timeout_s: float = 5.0,
    context: Context | None = None,
    configure: SocketSetup | None = None,
) -> ReplayPage:
    """One replay request. A fresh REQ socket each time, so a daemon that died mid-request
    (or restarted) never leaves the client stuck. Raises ReplayError."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        if configure is not None:
            configure(sock)
        sock.connect(endpoint)
        sock.send(json.dumps({"since": since, "limit": limit}).encode())
        if not sock.poll(int(timeout_s * 1000)):
            raise ReplayError(f"no reply from the replay endpoint {endpoint} in {timeout_s:g} s")
        raw = sock.recv()
    finally:
        sock.close(linger=0)
    try:
        reply = json.loads(raw)
    except ValueError as exc:
        raise ReplayError(f"replay endpoint {endpoint} sent invalid JSON") from exc
    if not isinstance(reply, dict):
        raise ReplayError(f"replay endpoint {endpoint} sent a {type(reply).__name__}")
    if "error" in reply:
        raise ReplayError(f"replay endpoint {endpoint}: {reply['error']}")
    return ReplayPage(
        events=list(reply["events"]),
        next_seq=int(reply["next_seq"]),
        first_seq=reply.get("first_seq"),
        last_seq=reply.get("last_seq"),
    )


def fetch_all(
    endpoint: str,
    since: int,
    until: int | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Every journaled event from ``since`` (up to, not including, ``until``), page by page."""
    out: list[dict[str, Any]] = []
    seq = since
    while until is None or seq < until:
        page = fetch(endpoint, seq, **kwargs)
        if not page.events:
            break
        for body in page.events:
            if until is not None and int(body["seq"]) >= until:
                return out
            out.append(body)
        seq = page.next_seq
    return out


@dataclass
class FollowStats:
    """What :func:`follow` delivered and from where."""

    live: int = 0  # defect events delivered as they were published
    replayed: int = 0  # defect events delivered from the journal
    duplicates: int = 0  # live events already delivered from the journal
    status: int = 0
    lost: list[tuple[int, int]] = field(default_factory=list)  # ranges not in the journal either
    replay_errors: int = 0
    next_seq: int | None = None  # the next defect seq expected

    @property
    def lost_events(self) -> int:
        return sum(b - a + 1 for a, b in self.lost)


REPLAY_RETRY_S = (0.2, 1.0, 3.0)  # pauses between replay attempts before a gap counts as lost


class _Follower:
    def __init__(
        self,
        replay: Callable[[int, int | None], list[dict[str, Any]]] | None,
        on_event: Callable[[str, dict[str, Any]], bool | None],
        since: int | None,
        stats: FollowStats | None = None,
    ) -> None:
        self.replay = replay  # None: live only (a gap is counted as lost, never filled)
        self.on_event = on_event
        self.stats = stats if stats is not None else FollowStats()
        self.stats.next_seq = since

    def fill(self, until: int | None) -> bool:
        """Deliver journaled events from next_seq up to ``until``; True to stop."""
        start = self.stats.next_seq
        if self.replay is None or start is None or (until is not None and start >= until):
            return False
        events: list[dict[str, Any]] | None = None
        for pause in (*REPLAY_RETRY_S, None):
            try:
                events = self.replay(start, until)
                break
            except ReplayError as exc:
                # a daemon restarting or busy: try again before writing the gap off as lost
                self.stats.replay_errors += 1
                log.warning("replay failed", error=str(exc), retry_in_s=pause)
                if pause is not None:
                    time.sleep(pause)
        if events is None:
            return False
        for body in events:
            seq = int(body["seq"])
            expected = self.stats.next_seq if self.stats.next_seq is not None else seq
            if seq < expected:
                continue
            if seq > expected:
                self.stats.lost.append((expected, seq - 1))
            self.stats.next_seq = seq + 1
            self.stats.replayed += 1
            if self.on_event("defect", body):
                return True
        return False

    def live(self, topic: str, body: dict[str, Any]) -> bool:
        """Handle one live event; True to stop."""
        st = self.stats
        if topic == "defect":
            seq = int(body["seq"])
            if st.next_seq is not None and seq < st.next_seq:
                st.duplicates += 1
                return False
            if st.next_seq is not None and seq > st.next_seq:
                if self.fill(seq):
                    return True
                if st.next_seq is not None and seq > st.next_seq:
                    st.lost.append((st.next_seq, seq - 1))
            st.next_seq = seq + 1
            st.live += 1
            return bool(self.on_event(topic, body))
        if topic == "status":
            announced = body.get("last_seq")
            if (
                isinstance(announced, int)
                and st.next_seq is not None
                and announced >= st.next_seq
                and self.fill(announced + 1)
            ):
                return True
            st.status += 1
            return bool(self.on_event(topic, body))
        return bool(self.on_event(topic, body))


@dataclass(frozen=True)
class EventSource:
    """One daemon to follow: a name to tag its events with, its event (PUB) endpoint, its
    replay (REP) endpoint (None: live only, gaps are counted but cannot be filled) and the
    socket setup (CurveZMQ) for both."""

    name: str
    events: str
    replay: str | None = None
    configure: SocketSetup | None = None


def follow(
    events_endpoint: str,
    replay_endpoint: str,
    on_event: Callable[[str, dict[str, Any]], bool | None],
    since: int | None = 0,
    *,
    topics: tuple[str, ...] = ("defect", "status"),
    timeout_s: float | None = None,
    context: Context | None = None,
    configure: SocketSetup | None = None,
    should_stop: Callable[[], bool] | None = None,
    replay_timeout_s: float = 2.0,
    stats: FollowStats | None = None,
) -> FollowStats:
    """Deliver every defect event from ``since`` on, in ``seq`` order, without gaps, then live.

    ``on_event(topic, body)`` returning True stops; so does ``timeout_s`` without any event or
    ``should_stop()``. ``since=None``: start with the first live event (gaps after it are still
    filled from the journal). ``topics`` says which events reach ``on_event`` (defect events
    are always subscribed to: finding gaps needs them). Returns what was delivered, and any
    ``seq`` ranges the journal no longer had; pass ``stats`` to watch them while it runs.
    """
    source = EventSource("daemon", events_endpoint, replay_endpoint, configure)
    out = follow_many(
        [source],
        lambda _source, topic, body: on_event(topic, body),
        since,
        topics=topics,
        timeout_s=timeout_s,
        context=context,
        should_stop=should_stop,
        replay_timeout_s=replay_timeout_s,
        stats=None if stats is None else {source.name: stats},
    )
    return out[source.name]


def follow_many(
    sources: Sequence[EventSource],
    on_event: Callable[[str, str, dict[str, Any]], bool | None],
    since: int | Mapping[str, int | None] | None = 0,
    *,
    topics: tuple[str, ...] = ("defect", "status"),
    timeout_s: float | None = None,
    context: Context | None = None,
    should_stop: Callable[[], bool] | None = None,
    replay_timeout_s: float = 2.0,
    stats: Mapping[str, FollowStats] | None = None,
) -> dict[str, FollowStats]:
    """:func:`follow` for several daemons at once, from one thread.

    Each source's defect ``seq`` is its own daemon's: gaps are found and filled from that
    daemon's journal, source by source, and ``on_event(source_name, topic, body)`` sees every
    source's events in its ``seq`` order (sources interleave as their events arrive).
    ``since`` is one ``seq`` for all sources or a ``{name: seq}`` mapping (a missing name:
    None). Returns each source's :class:`FollowStats` by name. Source names must be unique.
    """
    names = [s.name for s in sources]
    if not sources or len(set(names)) != len(names):
        raise ValueError(f"follow_many needs sources with unique names, got {names}")
    ctx = context or zmq.Context.instance()
    stopped = False

    def follower(src: EventSource) -> _Follower:
        def deliver(topic: str, body: dict[str, Any]) -> bool | None:
            return on_event(src.name, topic, body) if topic in topics else None

        def replay(start: int, until: int | None) -> list[dict[str, Any]]:
            if src.replay is None:  # pragma: no cover - not passed to the follower then
                raise ReplayError(f"{src.name}: no replay endpoint")
            return fetch_all(
                src.replay,
                start,
                until,
                timeout_s=replay_timeout_s,
                context=ctx,
                configure=src.configure,
            )

        first = since.get(src.name) if isinstance(since, Mapping) else since
        own = None if stats is None else stats.get(src.name)
        return _Follower(None if src.replay is None else replay, deliver, first, own)

    followers = {s.name: follower(s) for s in sources}
    socks: dict[zmq.Socket[bytes], str] = {}
    poller = zmq.Poller()
    try:
        for src in sources:
            sock = ctx.socket(zmq.SUB)
            socks[sock] = src.name
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            if src.configure is not None:
                src.configure(sock)
            for t in {"defect", *topics}:
                sock.setsockopt(zmq.SUBSCRIBE, t.encode())
            sock.connect(src.events)
            poller.register(sock, zmq.POLLIN)
        for f in followers.values():
            if f.stats.next_seq is not None and f.fill(None):
                stopped = True
                break
        last = time.monotonic()
        while not stopped and (should_stop is None or not should_stop()):
            ready = dict(poller.poll(100))
            if not ready:
                if timeout_s is not None and time.monotonic() - last > timeout_s:
                    break
                continue
            last = time.monotonic()
            for sock in ready:
                topic_b, body_b = sock.recv_multipart()[:2]
                body = json.loads(body_b)
                name = socks[sock]
                topic = topic_b.decode("ascii", "replace")
                if isinstance(body, dict) and followers[name].live(topic, body):
                    stopped = True
                    break
    finally:
        for sock in socks:
            sock.close(linger=0)
    return {name: f.stats for name, f in followers.items()}
