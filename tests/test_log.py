"""Tests for linescan.log: format selection and rate-limited logging."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from linescan.log import RateLimitedLogger, configure_logging, get_logger, use_json


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def reset_logging() -> Iterator[None]:
    """Leave structlog and the root logger as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


class Recorder:
    """A stand-in logger recording (level, event, fields)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def record(event: str, **fields: Any) -> None:
            self.records.append((level, event, fields))

        return record


@pytest.mark.parametrize(
    ("format", "stream", "env", "expected"),
    [
        ("json", Tty(), {}, True),
        ("console", io.StringIO(), {"JOURNAL_STREAM": "8:1"}, False),
        ("auto", Tty(), {}, False),
        ("auto", io.StringIO(), {}, True),
        ("auto", Tty(), {"JOURNAL_STREAM": "8:1234"}, True),
        ("auto", Tty(), {"INVOCATION_ID": "abc"}, True),
    ],
)
def test_format_selection(
    format: str, stream: io.StringIO, env: dict[str, str], expected: bool
) -> None:
    """auto means JSON under systemd or off a terminal, console text on a terminal."""
    assert use_json(format, stream, env) is expected


def test_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """In JSON mode each record, ours or the stdlib's, is one JSON object per line."""
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream, environ={})
    get_logger().info("frame rejected", reason="dims")
    get_logger().debug("hidden")
    logging.getLogger("tensorrt").warning("builder: %s", "slow")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["frame rejected", "builder: slow"]
    assert lines[0]["reason"] == "dims"
    assert lines[0]["level"] == "info"
    assert lines[1]["logger"] == "tensorrt"
    assert all("timestamp" in line for line in lines)


def test_exceptions_are_logged_without_locals() -> None:
    """JSON tracebacks carry frames but never local variables."""
    stream = io.StringIO()
    configure_logging("json", stream=stream, environ={})
    secret = "KEYMATERIAL"
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger().exception("failed")
    assert secret not in stream.getvalue()
    record = json.loads(stream.getvalue())
    assert record["exception"][0]["exc_type"] == "RuntimeError"


def test_console_on_a_terminal() -> None:
    """On a terminal the output is readable text, not JSON."""
    stream = Tty()
    configure_logging("auto", "debug", stream=stream, environ={"NO_COLOR": "1"})
    get_logger().debug("started", port=9108)
    text = stream.getvalue()
    assert "started" in text
    assert "port=9108" in text
    assert not text.startswith("{")


def test_bad_level_is_refused() -> None:
    """An unknown level raises ValueError."""
    with pytest.raises(ValueError, match="level"):
        configure_logging("json", "loud", stream=io.StringIO())


def test_rate_limited_first_then_once_per_interval() -> None:
    """The first call logs, repeats within the interval are counted, the next record says so."""
    now = [0.0]
    recorder = Recorder()
    limited = RateLimitedLogger(recorder, interval_s=10, clock=lambda: now[0])
    assert limited.warning("dims", "frame rejected", camera="a") is True
    for _ in range(5):
        now[0] += 1
        assert limited.warning("dims", "frame rejected", camera="a") is False
    assert limited.warning("size", "frame rejected") is True  # another key is independent
    now[0] = 10.0
    assert limited.warning("dims", "frame rejected", camera="b") is True
    assert recorder.records == [
        ("warning", "frame rejected", {"key": "dims", "camera": "a"}),
        ("warning", "frame rejected", {"key": "size"}),
        ("warning", "frame rejected", {"key": "dims", "camera": "b", "suppressed": 5}),
    ]


def test_flush_reports_pending_counts() -> None:
    """flush() reports keys that went quiet with suppressed calls, once."""
    now = [0.0]
    recorder = Recorder()
    limited = RateLimitedLogger(recorder, interval_s=10, clock=lambda: now[0])
    limited.error("gap", "sequence gap")
    limited.error("gap", "sequence gap", missing=3)
    assert limited.flush() == 1
    assert limited.flush() == 0
    assert recorder.records[-1] == (
        "error",
        "sequence gap",
        {"key": "gap", "suppressed": 1, "missing": 3},
    )


def test_key_memory_is_bounded() -> None:
    """Past max_keys the oldest keys are forgotten (and log again as new)."""
    recorder = Recorder()
    limited = RateLimitedLogger(recorder, interval_s=100, max_keys=2, clock=lambda: 0.0)
    for key in ("a", "b", "c", "a"):
        limited.info(key, "x")
    assert [fields["key"] for _, _, fields in recorder.records] == ["a", "b", "c", "a"]
