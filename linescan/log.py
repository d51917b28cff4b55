"""Structured logging: JSON lines for machines, readable text for people, no floods.

Why: under systemd the journal (and whatever ships it on) wants one parseable record per line
with the event's fields intact; a person at a terminal wants colour and alignment. The choice
is made once, at start-up, by :func:`configure_logging`.

Logs go to stderr, not stdout, so commands that print results (``linescan inspect``,
``check-config``) keep a clean stdout; under systemd both reach the journal anyway.

A daemon fed by a misbehaving camera can fail the same way thousands of times a second.
:class:`RateLimitedLogger` logs the first occurrence of a key, then at most one record per
interval carrying ``suppressed=N`` for the ones it swallowed, so the problem is visible without
drowning the journal (the exact counts live in Prometheus).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Literal, TextIO

import structlog

__all__ = [
    "LEVELS",
    "RateLimitedLogger",
    "configure_logging",
    "get_logger",
    "log_throttled",
    "use_json",
]

LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

LogLevel = Literal["debug", "info", "warning", "error", "critical"]


def use_json(format: str, stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``format`` resolves to JSON lines for ``stream`` in this environment.

    ``auto`` means JSON under systemd (``JOURNAL_STREAM`` or ``INVOCATION_ID`` set) or when the
    stream is not a terminal; readable console text on a terminal.
    """
    if format == "json":
        return True
    if format == "console":
        return False
    if format != "auto":
        raise ValueError(f"log format must be auto, json or console, not {format!r}")
    env = os.environ if environ is None else environ
    if env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"):
        return True
    isatty = getattr(stream, "isatty", None)
    return not (callable(isatty) and isatty())


def configure_logging(
    format: str = "auto",
    level: str = "info",
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Configure structlog, and route the standard library's ``logging`` through it.

    Libraries that log through ``logging`` (and backends that map their own loggers to it, like
    TensorRT's) come out in the same format. Safe to call again (tests, ``--log-format``).
    """
    number = LEVELS.get(level.lower())
    if number is None:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    out = sys.stderr if stream is None else stream
    json_lines = use_json(format, out, environ)

    shared: list[structlog.typing.Processor] = [
        _name_field,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if json_lines:
        # Tracebacks as data, without local variables: locals can hold frames of pixels or
        # key material, neither of which belongs in a journal.
        shared += [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        ]
        renderer = structlog.processors.JSONRenderer()
    else:
        env = os.environ if environ is None else environ
        renderer = structlog.dev.ConsoleRenderer(colors=_colors_ok(out, env))

    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(number)


def _colors_ok(stream: TextIO, environ: Mapping[str, str]) -> bool:
    # https://no-color.org: any NO_COLOR value turns colour off.
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty()) and "NO_COLOR" not in environ


def get_logger(name: str = "linescan", **initial: Any) -> Any:
    """A structlog logger carrying ``logger=name`` and any ``initial`` fields.

    It stays lazy: modules create their loggers at import, before ``configure_logging`` runs,
    and each record still takes the format and level configured when it is logged. (Binding
    here, with ``.bind()``, would freeze the default console format into those loggers.)
    ``logger`` is a parameter name of structlog's own, so the name travels as ``logger_name``
    and ``_name_field`` renames it.
    """
    return structlog.get_logger(name, logger_name=name, **initial)


def _name_field(_logger: Any, _method: str, event: Any) -> Any:
    if "logger_name" in event:
        event["logger"] = event.pop("logger_name")
    return event


class RateLimitedLogger:
    """Log the first event per key at once, then at most one per ``interval_s``.

    Each record after the first carries ``suppressed=N``: how many calls for that key were
    swallowed since the last record. :meth:`flush` reports keys that went quiet with swallowed
    calls pending (call it at shutdown or with the status heartbeat). Thread-safe. At most
    ``max_keys`` keys are remembered (least recently logged forgotten first) so a stream of
    distinct keys cannot grow memory.
    """

    def __init__(
        self,
        logger: Any = None,
        *,
        interval_s: float = 10.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._logger = logger
        self._interval_s = interval_s
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [time of last record, calls suppressed since, last event, last level, fields]
        self._state: OrderedDict[str, list[Any]] = OrderedDict()

    def _target(self) -> Any:
        return self._logger if self._logger is not None else get_logger()

    def log(self, key: str, event: str, *, level: LogLevel = "warning", **fields: Any) -> bool:
        """Log ``event`` unless ``key`` was logged less than ``interval_s`` ago; True if logged."""
        now = self._clock()
        with self._lock:
            state = self._state.get(key)
            if state is not None and now - state[0] < self._interval_s:
                state[1] += 1
                state[2:] = [event, level, fields]
                return False
            suppressed = 0 if state is None else state[1]
            self._state[key] = [now, 0, event, level, fields]
            self._state.move_to_end(key)
            while len(self._state) > self._max_keys:
                self._state.popitem(last=False)
        if suppressed:
            fields = {**fields, "suppressed": suppressed}
        getattr(self._target(), level)(event, key=key, **fields)
        return True

    def debug(self, key: str, event: str, **fields: Any) -> bool:
        """:meth:`log` at debug level."""
        return self.log(key, event, level="debug", **fields)

    def info(self, key: str, event: str, **fields: Any) -> bool:
        """:meth:`log` at info level."""
        return self.log(key, event, level="info", **fields)

    def warning(self, key: str, event: str, **fields: Any) -> bool:
        """:meth:`log` at warning level."""
        return self.log(key, event, level="warning", **fields)

    def error(self, key: str, event: str, **fields: Any) -> bool:
        """:meth:`log` at error level."""
        return self.log(key, event, level="error", **fields)

    def flush(self) -> int:
        """Log the last suppressed event of every key with a pending count; returns how many."""
        now = self._clock()
        pending: list[tuple[str, str, str, dict[str, Any], int]] = []
        with self._lock:
            for key, state in self._state.items():
                if state[1]:
                    pending.append((key, state[2], state[3], state[4], state[1]))
                    state[0], state[1] = now, 0
        for key, event, level, fields, count in pending:
            getattr(self._target(), level)(event, key=key, suppressed=count, **fields)
        return len(pending)


_default = RateLimitedLogger()


def log_throttled(key: str, event: str, *, level: LogLevel = "warning", **fields: Any) -> bool:
    """Log through a process-wide :class:`RateLimitedLogger` (10 s per key); True if logged."""
    return _default.log(key, event, level=level, **fields)
