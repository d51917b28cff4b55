"""Defect and status events out over ZeroMQ PUB, sequence-numbered so loss is detectable.

Why PUB and sequence numbers: any number of consumers (line PLC bridge, HMI, recorder) can
subscribe without the daemon knowing them, and a slow one can never stall inspection: past the
send high-water mark PUB drops messages for that subscriber. Dropping silently would make "lost
event" look like "no defect", so every message carries counters a subscriber checks.

Wire format, version 1
----------------------
Each message is two ZeroMQ frames, ``[topic, body]``: ``topic`` is the ASCII ``defect`` or
``status`` (subscribe to one or both by prefix), ``body`` a UTF-8 JSON object with at least::

    v             1 (the wire-format version; a change in meaning of any key needs v = 2)
    t_publish_ns  wall-clock time of sending, ns since the Unix epoch

``defect`` messages add ``seq``: one counter for defect events, +1 per event, never reset
while the daemon runs (and, with the event journal, across restarts). A subscriber that sees
``seq`` jump from 41 to 44 lost events 42 and 43, and can replay them (``replay.py``).

``status`` messages add ``status_seq`` (their own counter, +1 per status message) and
``last_seq``: the ``seq`` of the most recent defect event published (null before the first).
Status messages flow every ``status_interval_s`` even on a perfect web, so a subscriber that
last saw defect 41 and receives ``last_seq = 43`` knows it lost defects without waiting for the
next one, and a gap in ``status_seq`` shows lost status messages. Status and defect events have
separate counters so that "one status message lost" is never mistaken for "defect lost".

The rest of each body (camera, segment, line range, positions, scores, queue depths, drops,
gaps) is the caller's payload, documented with the modules that build it.

Threads: one thread publishes (ZeroMQ sockets are not thread-safe). A lock makes a mistaken
second caller safe rather than corrupting, but the daemon gives publishing to one thread.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import zmq

if TYPE_CHECKING:
    from linescan.metrics import Metrics

__all__ = ["RESERVED_KEYS", "TOPICS", "WIRE_VERSION", "EventPublisher", "encode_event"]

WIRE_VERSION: Final = 1
TOPICS: Final = ("defect", "status")
RESERVED_KEYS: Final = frozenset({"v", "seq", "status_seq", "last_seq", "t_publish_ns"})


def _json_default(value: object) -> object:
    # Events are built from NumPy results; their scalars are not JSON types by themselves.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_event(topic: str, body: Mapping[str, Any]) -> list[bytes]:
    """The ``[topic, JSON]`` frames for a complete body. Raises ValueError for NaN/inf."""
    # allow_nan=False: NaN is not JSON, and a NaN score must fail loudly, not parse as garbage.
    data = json.dumps(
        body, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    )
    return [topic.encode("ascii"), data.encode("utf-8")]


class EventPublisher:
    """A bound PUB socket that numbers and sends defect and status events.

    ``next_seq`` is the ``seq`` the first defect event gets (a restart that persisted its
    counter passes it back in). ``linger_ms`` bounds how long :meth:`close` waits to flush.
    ``journal(rows)`` is called with the ``(seq, topic, t_publish_ns, body_json)`` rows of the
    defect events of one call after they are numbered and encoded and before any is sent (the
    durable journal's hook: one transaction per call, see :meth:`publish_many`). ``configure``
    sets socket options (CurveZMQ) before the bind.
    """

    def __init__(
        self,
        endpoint: str,
        sndhwm: int,
        metrics: Metrics | None = None,
        *,
        next_seq: int = 0,
        linger_ms: int = 1000,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        journal: Callable[[list[tuple[int, str, int, str]]], None] | None = None,
        configure: Callable[[zmq.Socket[bytes]], None] | None = None,
    ) -> None:
        if next_seq < 0:
            raise ValueError("next_seq must be >= 0")
        self._metrics = metrics
        self._lock = threading.Lock()
        self._next_seq = next_seq
        self._next_status_seq = 0
        self._linger_ms = linger_ms
        self._journal = journal
        ctx = context if context is not None else zmq.Context.instance()
        self._socket: zmq.Socket[bytes] | None = ctx.socket(zmq.PUB)
        try:
            self._socket.setsockopt(zmq.SNDHWM, sndhwm)
            self._socket.setsockopt(zmq.LINGER, linger_ms)
            if configure is not None:
                configure(self._socket)  # e.g. CurveZMQ server keys (security.py)
            self._socket.bind(endpoint)
            last = self._socket.getsockopt(zmq.LAST_ENDPOINT)
        except zmq.ZMQError:
            self._socket.close(linger=0)
            self._socket = None
            raise
        self.endpoint: str = last.decode() if isinstance(last, bytes) else str(last)
        """The bound endpoint, with the port the kernel chose for ``tcp://HOST:*``."""

    @property
    def next_seq(self) -> int:
        """The ``seq`` the next defect event will carry (persist this across restarts)."""
        return self._next_seq

    def publish(self, topic: str, payload: Mapping[str, Any]) -> int:
        """Number, stamp and send one event; returns its ``seq`` (defect) or ``status_seq``.

        Never blocks: past the high-water mark PUB drops, and subscribers see the gap.
        Raises ValueError for an unknown topic, a payload using a reserved key, or NaN/inf.
        """
        return self.publish_many(topic, [payload])[0]

    def publish_many(self, topic: str, payloads: Sequence[Mapping[str, Any]]) -> list[int]:
        """Number, stamp and send several events of one topic, journaled together.

        All of them are encoded before any is journaled or sent, so a payload that fails
        (ValueError, as for :meth:`publish`) leaves no gap in the numbering; the defect events
        are journaled in one call (one transaction, one fsync) before the first is sent.
        """
        if topic not in TOPICS:
            raise ValueError(f"topic must be one of {TOPICS}, not {topic!r}")
        for payload in payloads:
            clash = RESERVED_KEYS.intersection(payload)
            if clash:
                raise ValueError(
                    f"payload must not set {sorted(clash)}: the publisher assigns them"
                )
        if not payloads:
            return []
        numbers: list[int] = []
        with self._lock:
            if self._socket is None:
                raise RuntimeError("EventPublisher is closed")
            messages: list[list[bytes]] = []
            rows: list[tuple[int, str, int, str]] = []
            for i, payload in enumerate(payloads):
                body: dict[str, Any] = {"v": WIRE_VERSION}
                if topic == "defect":
                    number = self._next_seq + i
                    body["seq"] = number
                else:
                    number = self._next_status_seq + i
                    body["status_seq"] = number
                    body["last_seq"] = self._next_seq - 1 if self._next_seq > 0 else None
                body.update(payload)
                body["t_publish_ns"] = time.time_ns()
                parts = encode_event(topic, body)
                messages.append(parts)
                numbers.append(number)
                rows.append((number, topic, body["t_publish_ns"], parts[1].decode("utf-8")))
            if topic == "defect" and self._journal is not None:
                # Durable before they are sent: a crash between the two leaves replayable
                # events whose seqs are never reused (journal.py).
                self._journal(rows)
            # Counters move once every body encodes (a bad payload leaves no gap that
            # subscribers would read as a lost message) and before any send: a send that fails
            # leaves a gap the journal can fill, never a journaled seq given out again.
            if topic == "defect":
                self._next_seq += len(messages)
            else:
                self._next_status_seq += len(messages)
            for parts in messages:
                self._socket.send_multipart(parts)
        if self._metrics is not None:
            self._metrics.events_published_total.labels(topic).inc(len(numbers))
        return numbers

    def close(self) -> None:
        """Close the socket, waiting up to ``linger_ms`` for queued events; idempotent."""
        with self._lock:
            if self._socket is not None:
                self._socket.close(linger=self._linger_ms)
                self._socket = None

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
