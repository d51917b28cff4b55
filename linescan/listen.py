"""An event subscriber: prints or records defect and status events and checks for loss.

Loss detection follows the event wire format (``publish.py``): defect events carry ``seq``
(+1 per event), status messages carry ``status_seq`` and ``last_seq``. A jump in ``seq``, or a
status whose ``last_seq`` is ahead of the last defect seen, means defect events were lost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq


@dataclass
class LossTracker:
    """Feeds on events in arrival order; counts the defect events that never arrived."""

    last_seq: int | None = None
    last_status_seq: int | None = None
    lost_defects: int = 0
    lost_status: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)  # (first missing, last missing)

    def feed(self, topic: str, body: dict[str, Any]) -> None:
        if topic == "defect":
            seq = int(body["seq"])
            if self.last_seq is not None and seq > self.last_seq + 1:
                self._gap(self.last_seq + 1, seq - 1)
            self.last_seq = seq if self.last_seq is None else max(self.last_seq, seq)
        elif topic == "status":
            sseq = int(body["status_seq"])
            if self.last_status_seq is not None and sseq > self.last_status_seq + 1:
                self.lost_status += sseq - self.last_status_seq - 1
            self.last_status_seq = sseq
            announced = body.get("last_seq")
            if announced is not None:
                have = -1 if self.last_seq is None else self.last_seq
                if announced > have:
                    # a subscriber that joined late never saw the first events: not a loss
                    start = have + 1 if self.last_seq is not None else announced + 1
                    if start <= announced:
                        self._gap(start, announced)
                    self.last_seq = announced

    def _gap(self, first: int, last: int) -> None:
        self.gaps.append((first, last))
        self.lost_defects += last - first + 1


def listen(
    endpoint: str,
    on_event: Callable[[str, dict[str, Any]], bool | None],
    topics: tuple[str, ...] = ("defect", "status"),
    timeout_s: float | None = None,
    context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ready: Callable[[], None] | None = None,
) -> LossTracker:
    """Subscribe and call ``on_event(topic, body)`` for each event until it returns True,
    or until ``timeout_s`` passes without an event."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    for t in topics:
        sock.setsockopt(zmq.SUBSCRIBE, t.encode())
    sock.connect(endpoint)
    if ready is not None:
        ready()
    tracker = LossTracker()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    last = time.monotonic()
    try:
        while True:
            if not poller.poll(100):
                if timeout_s is not None and time.monotonic() - last > timeout_s:
                    return tracker
                continue
            last = time.monotonic()
            topic_b, body_b = sock.recv_multipart()
            topic = topic_b.decode("ascii", "replace")
            body = json.loads(body_b)
            tracker.feed(topic, body)
            if on_event(topic, body):
                return tracker
    finally:
        sock.close()
