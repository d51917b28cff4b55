"""Tests for linescan.publish: the event wire format over real loopback PUB/SUB sockets."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq
from prometheus_client import CollectorRegistry

from linescan.metrics import Metrics
from linescan.publish import EventPublisher, encode_event

Context = zmq.Context[zmq.Socket[bytes]]


@pytest.fixture
def context() -> Iterator[Context]:
    ctx: Context = zmq.Context()
    yield ctx
    ctx.term()


@pytest.fixture
def publisher(context: Context) -> Iterator[EventPublisher]:
    pub = EventPublisher("tcp://127.0.0.1:*", sndhwm=1000, context=context, linger_ms=0)
    yield pub
    pub.close()


@pytest.fixture
def subscriber(context: Context, publisher: EventPublisher) -> Iterator[zmq.Socket[bytes]]:
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(publisher.endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    yield sub
    sub.close()


def receive(sub: zmq.Socket[bytes], timeout_ms: int = 5000) -> tuple[str, dict[str, Any]]:
    if not sub.poll(timeout_ms):
        pytest.fail("no event arrived")
    topic, body = sub.recv_multipart()
    decoded: dict[str, Any] = json.loads(body)
    return topic.decode(), decoded


def join(publisher: EventPublisher, sub: zmq.Socket[bytes]) -> dict[str, Any]:
    """Publish status messages until the subscriber hears one (the PUB/SUB slow joiner)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        publisher.publish("status", {"joining": True})
        if sub.poll(100):
            topic, body = receive(sub)
            # Drain the other join messages already in flight.
            while sub.poll(200):
                topic, body = receive(sub)
            assert topic == "status"
            return body
    pytest.fail("subscriber never joined")


def test_defects_are_numbered_in_order(
    publisher: EventPublisher, subscriber: zmq.Socket[bytes]
) -> None:
    """Defect events carry v=1, consecutive seq from 0, t_publish_ns and the payload."""
    join(publisher, subscriber)
    before = time.time_ns()
    seqs = [publisher.publish("defect", {"camera": "cam0", "area": i}) for i in range(5)]
    assert seqs == [0, 1, 2, 3, 4]
    for expected in range(5):
        topic, body = receive(subscriber)
        assert topic == "defect"
        assert body["v"] == 1
        assert body["seq"] == expected
        assert body["area"] == expected
        assert body["camera"] == "cam0"
        assert before <= body["t_publish_ns"] <= time.time_ns()
        assert "status_seq" not in body
    assert publisher.next_seq == 5


def test_status_reports_last_defect_seq(
    publisher: EventPublisher, subscriber: zmq.Socket[bytes]
) -> None:
    """Status messages carry their own status_seq and the last defect seq (null before any)."""
    first = join(publisher, subscriber)
    assert first["last_seq"] is None
    publisher.publish("defect", {})
    publisher.publish("defect", {})
    status_seq = publisher.publish("status", {"lines": 10})
    receive(subscriber)
    receive(subscriber)
    topic, body = receive(subscriber)
    assert topic == "status"
    assert body["v"] == 1
    assert body["status_seq"] == status_seq > first["status_seq"]
    assert body["last_seq"] == 1
    assert body["lines"] == 10
    assert "seq" not in body


def test_next_seq_continues_a_persisted_counter(context: Context) -> None:
    """A publisher constructed with next_seq=100 numbers its first defect 100."""
    with EventPublisher("tcp://127.0.0.1:*", 10, context=context, linger_ms=0, next_seq=100) as pub:
        sub = context.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.connect(pub.endpoint)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            assert join(pub, sub)["last_seq"] == 99
            assert pub.publish("defect", {}) == 100
            assert receive(sub)[1]["seq"] == 100
        finally:
            sub.close()


def test_topic_prefix_filters(context: Context, publisher: EventPublisher) -> None:
    """A subscriber to 'defect' receives defects and no status messages."""
    sub = context.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(publisher.endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"defect")
        deadline = time.monotonic() + 10
        while not sub.poll(100):
            if time.monotonic() > deadline:
                pytest.fail("subscriber never joined")
            publisher.publish("status", {})
            publisher.publish("defect", {"probe": True})
        topic, _ = receive(sub)
        assert topic == "defect"
        while sub.poll(200):
            assert receive(sub)[0] == "defect"
    finally:
        sub.close()


def test_numpy_values_are_serialised(
    publisher: EventPublisher, subscriber: zmq.Socket[bytes]
) -> None:
    """NumPy scalars and arrays in a payload are sent as plain JSON numbers and lists."""
    join(publisher, subscriber)
    publisher.publish(
        "defect",
        {"peak": np.float32(0.5), "area": np.int64(7), "box": np.array([1, 2, 3, 4])},
    )
    _, body = receive(subscriber)
    assert (body["peak"], body["area"], body["box"]) == (0.5, 7, [1, 2, 3, 4])


def test_bad_events_are_refused_without_a_gap(context: Context) -> None:
    """Unknown topics, reserved keys and NaN raise ValueError and consume no seq."""
    with EventPublisher("tcp://127.0.0.1:*", 10, context=context, linger_ms=0) as pub:
        with pytest.raises(ValueError, match="topic"):
            pub.publish("alarm", {})
        with pytest.raises(ValueError, match="seq"):
            pub.publish("defect", {"seq": 5})
        with pytest.raises(ValueError, match="Out of range float"):
            pub.publish("defect", {"peak": math.nan})
        assert pub.publish("defect", {}) == 0
        assert pub.next_seq == 1


def test_publish_many_journals_once_before_sending(context: Context) -> None:
    """The defect events of one call are numbered in order, journaled in one call (one
    transaction) with the exact bodies sent, and only then sent; a bad payload anywhere in
    the batch refuses the whole batch without consuming a seq or journaling anything."""
    calls: list[list[tuple[int, str, int, str]]] = []
    with EventPublisher(
        "tcp://127.0.0.1:*", 100, context=context, linger_ms=0, journal=calls.append
    ) as pub:
        sub = context.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.connect(pub.endpoint)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            join(pub, sub)
            with pytest.raises(ValueError, match="Out of range float"):
                pub.publish_many("defect", [{"peak": 0.5}, {"peak": math.nan}])
            assert calls == []
            assert pub.publish_many("defect", [{"n": i} for i in range(3)]) == [0, 1, 2]
            assert pub.publish("defect", {"n": 3}) == 3
            sent = [receive(sub)[1] for _ in range(4)]
        finally:
            sub.close()
    assert [[row[0] for row in call] for call in calls] == [[0, 1, 2], [3]]
    journaled = [json.loads(row[3]) for call in calls for row in call]
    assert journaled == sent
    assert [b["n"] for b in sent] == [0, 1, 2, 3]


def test_published_events_are_counted(context: Context) -> None:
    """events_published_total counts messages by topic."""
    metrics = Metrics(CollectorRegistry(), process=False)
    with EventPublisher("tcp://127.0.0.1:*", 10, metrics, context=context, linger_ms=0) as pub:
        pub.publish("defect", {})
        pub.publish("status", {})
        pub.publish("status", {})
    registry = metrics.registry
    get = registry.get_sample_value
    assert get("linescan_events_published_total", {"topic": "defect"}) == 1
    assert get("linescan_events_published_total", {"topic": "status"}) == 2


def test_close_is_idempotent_and_final(context: Context) -> None:
    """close() may be called twice; publishing after it raises."""
    pub = EventPublisher("tcp://127.0.0.1:*", 10, context=context, linger_ms=0)
    pub.close()
    pub.close()
    with pytest.raises(RuntimeError, match="closed"):
        pub.publish("status", {})


def test_bind_failure_raises_and_closes(context: Context) -> None:
    """Binding an invalid endpoint raises ZMQError and leaves no socket behind."""
    with pytest.raises(zmq.ZMQError):
        EventPublisher("tcp://256.0.0.1:1", 10, context=context, linger_ms=0)


def test_encode_event_is_two_frames() -> None:
    """encode_event gives [topic, compact UTF-8 JSON]."""
    assert encode_event("status", {"v": 1, "x": "é"}) == [
        b"status",
        '{"v":1,"x":"é"}'.encode(),
    ]
