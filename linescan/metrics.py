"""Every Prometheus metric the daemon exports, declared once, and the HTTP server for them.

Why one class: a metric declared in the module that uses it ends up declared twice, named
inconsistently, or registered in the global registry where tests trip over each other. Here
every metric is an attribute of :class:`Metrics`, which registers into the
``CollectorRegistry`` it is given; names carry the ``linescan_`` prefix and their unit
(``_seconds``, ``_total``, ``_bytes``). Label values that are known up front are initialised,
so a rate over a counter that never moved reads 0 rather than "no data".

:class:`MetricsServer` serves ``/metrics``, ``/healthz`` (the process answers) and ``/readyz``
(the model is loaded and the sockets are up: 200, else 503) from a daemon thread, and hands
every other GET to an optional ``app`` (the live page, ``live.py``).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final
from urllib.parse import urlsplit

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from linescan.ingest import REJECT_REASONS
from linescan.log import get_logger

# Rejections decided by the daemon rather than the wire format: a duplicate or out-of-order
# seq, or one camera too many.
DAEMON_REJECT_REASONS = ("sequence", "camera")

__all__ = [
    "AUTH_FAILURE_REASONS",
    "DROP_REASONS",
    "EVENT_TOPICS",
    "HTTP_AUTH_REASONS",
    "PICTURE_RESULTS",
    "QUEUES",
    "STAGES",
    "App",
    "AppResponse",
    "Metrics",
    "MetricsServer",
]

STAGES: Final = (
    "ingest", "band", "infer", "stitch", "residual", "segment", "publish", "picture",
)  # fmt: skip
QUEUES: Final = ("ingest", "inference", "publish")
EVENT_TOPICS: Final = ("defect", "status")
DROP_REASONS: Final = ("overload", "shutdown", "engine", "short")
# Why a CurveZMQ handshake was refused (security.py): key not authorised, wrong protocol or
# server key, anything else.
AUTH_FAILURE_REASONS: Final = ("key", "protocol", "other")
# What became of a defect's picture (pictures.py): stored; skipped (the drawing queue was full);
# missing (its camera lines were no longer held); error (drawing or storing failed).
PICTURE_RESULTS: Final = ("stored", "skipped", "missing", "error")
# Requests to the live page refused for their token (live.py): none given, or a wrong one.
HTTP_AUTH_REASONS: Final = ("missing", "wrong")

# Tiles per batch: powers of two up to well past the default max_batch of 64.
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Stage durations: 100 us (a band copy) to 10 s (a stalled engine).
_STAGE_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
# End-to-end latency: 1 ms to 30 s.
_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class Metrics:
    """The daemon's metrics, registered in ``registry`` (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry, *, process: bool = True) -> None:
        """``process``: also export ``process_*`` (memory, CPU, file descriptors) on Linux."""
        self.registry = registry
        # Full names, not namespace=: `grep linescan_frames_dropped_total` finds the declaration.
        self.frames_received_total = Counter(
            "linescan_frames_received_total",
            "Valid frames received, by camera.",
            ["camera"],
            registry=registry,
        )
        self.frames_rejected_total = Counter(
            "linescan_frames_rejected_total",
            "Malformed frames rejected, by reason.",
            ["reason"],
            registry=registry,
        )
        self.frames_dropped_total = Counter(
            "linescan_frames_dropped_total",
            "Valid frames dropped without inspection (overload policy, shutdown), by reason.",
            ["reason"],
            registry=registry,
        )
        self.lines_inspected_total = Counter(
            "linescan_lines_inspected_total", "Web lines fully inspected.", registry=registry
        )
        self.lines_dropped_total = Counter(
            "linescan_lines_dropped_total",
            "Web lines received but not inspected (dropped frames).",
            registry=registry,
        )
        self.tiles_inferred_total = Counter(
            "linescan_tiles_inferred_total",
            "Tiles run through the inference engine.",
            registry=registry,
        )
        self.batch_size = Histogram(
            "linescan_batch_size",
            "Tiles per inference batch.",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "linescan_stage_seconds",
            "Time spent per pipeline stage, per call.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=registry,
        )
        self.latency_seconds = Histogram(
            "linescan_latency_seconds",
            "Time from frame capture (or receipt, without a capture time) to event publication.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.frame_latency_seconds = Histogram(
            "linescan_frame_latency_seconds",
            "Time from frame capture (or receipt) until all of its lines are inspected: their "
            "residual, mask and closed regions final, defect or not.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "linescan_queue_depth",
            "Items waiting in each bounded queue.",
            ["queue"],
            registry=registry,
        )
        self.defects_total = Counter(
            "linescan_defects_total", "Defects found, by camera.", ["camera"], registry=registry
        )
        self.lines_per_metre = Gauge(
            "linescan_lines_per_metre",
            "Web lines per metre of web (inspection.lines_per_metre): turns line rates into "
            "metres on a dashboard.",
            registry=registry,
        )
        self.repeating_defects_total = Counter(
            "linescan_repeating_defects_total",
            "Defect events in a repeating series (same place across the web, constant period "
            "down it: a damaged roller), from the series' third defect on, by camera.",
            ["camera"],
            registry=registry,
        )
        self.repeating_series = Gauge(
            "linescan_repeating_series",
            "Repeating defect series active now (their mark still recurs), by camera.",
            ["camera"],
            registry=registry,
        )
        self.pictures_total = Counter(
            "linescan_pictures_total",
            "Pictures of defects, by result: stored, skipped (drawing queue full), missing "
            "(camera lines no longer held), error.",
            ["result"],
            registry=registry,
        )
        self.picture_bytes_total = Counter(
            "linescan_picture_bytes_total",
            'Bytes of defect pictures (PNG) stored: over pictures_total{result="stored"}, '
            "the mean size, for sizing the disk.",
            registry=registry,
        )
        self.http_auth_failures_total = Counter(
            "linescan_http_auth_failures_total",
            "Requests for the live page, its API or pictures refused for their token, by "
            "reason: missing or wrong.",
            ["reason"],
            registry=registry,
        )
        self.web_edge_px = Gauge(
            "linescan_web_edge_px",
            "Where the web's edge is (camera pixel column; left: its first column, right: one "
            "past its last), by camera and side, in the latest block of lines: operators watch "
            "the web wander. Absent while no edge is tracked.",
            ["camera", "side"],
            registry=registry,
        )
        self.events_published_total = Counter(
            "linescan_events_published_total",
            "Messages published, by topic.",
            ["topic"],
            registry=registry,
        )
        self.segments_total = Counter(
            "linescan_segments_total",
            "Web segments started (at start, after a gap or an end).",
            registry=registry,
        )
        self.sequence_gaps_total = Counter(
            "linescan_sequence_gaps_total",
            "Jumps in frame sequence numbers (frames lost upstream).",
            registry=registry,
        )
        self.stride_px = Gauge(
            "linescan_stride_px",
            'Tile stride in use, in model pixels (inspection.stride; chosen at start when "auto").',
            registry=registry,
        )
        self.engine_tiles_per_second = Gauge(
            "linescan_engine_tiles_per_second",
            'Tiles per second the engine ran at start, measured for stride = "auto" (0 without).',
            registry=registry,
        )
        self.sustainable_lines_per_second = Gauge(
            "linescan_sustainable_lines_per_second",
            "Camera lines per second the chosen stride keeps up with (model time; measured for "
            'stride = "auto", 0 without).',
            registry=registry,
        )
        self.model_info = Info(
            "linescan_model", "The model bundle and engine in use.", registry=registry
        )
        self.ready = Gauge(
            "linescan_ready", "1 when the daemon is ready to inspect frames.", registry=registry
        )
        self.engine_errors_total = Counter(
            "linescan_engine_errors_total", "Inference backend failures.", registry=registry
        )
        self.disconnects_total = Counter(
            "linescan_disconnects_total",
            "Sender connections that ended, by socket: closed by the sender, a network fault, or "
            "a message over frames.max_bytes, which ZeroMQ refuses by dropping the connection.",
            ["socket"],
            registry=registry,
        )
        self.auth_failures_total = Counter(
            "linescan_auth_failures_total",
            "Connections refused by CurveZMQ (unauthorised key, plain TCP, wrong server key), "
            "by socket and reason.",
            ["socket", "reason"],
            registry=registry,
        )
        self.events_journaled_total = Counter(
            "linescan_events_journaled_total",
            "Defect events written to the durable event journal.",
            registry=registry,
        )
        self.journal_errors_total = Counter(
            "linescan_journal_errors_total",
            "Defect events that could not be journaled (still published).",
            registry=registry,
        )
        self.replay_requests_total = Counter(
            "linescan_replay_requests_total",
            "Requests to the event replay endpoint, by result.",
            ["result"],
            registry=registry,
        )
        self.events_replayed_total = Counter(
            "linescan_events_replayed_total",
            "Journaled events sent by the replay endpoint.",
            registry=registry,
        )

        for reason in (*REJECT_REASONS, *DAEMON_REJECT_REASONS):
            self.frames_rejected_total.labels(reason)
        for reason in DROP_REASONS:
            self.frames_dropped_total.labels(reason)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for queue in QUEUES:
            self.queue_depth.labels(queue)
        for topic in EVENT_TOPICS:
            self.events_published_total.labels(topic)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures_total.labels("frames", reason)
        self.disconnects_total.labels("frames")
        for result in PICTURE_RESULTS:
            self.pictures_total.labels(result)
        for reason in HTTP_AUTH_REASONS:
            self.http_auth_failures_total.labels(reason)
        for result in ("ok", "error"):
            self.replay_requests_total.labels(result)
        if process:
            ProcessCollector(registry=registry)

    def set_model_info(
        self, *, model: str, loss: str, latent: int, patch: int, precision: str, backend: str
    ) -> None:
        """Publish ``linescan_model_info{model, loss, latent, patch, precision, backend} 1``."""
        self.model_info.info(
            {
                "model": model,
                "loss": loss,
                "latent": str(latent),
                "patch": str(patch),
                "precision": precision,
                "backend": backend,
            }
        )


@dataclass(frozen=True)
class AppResponse:
    """What an ``App`` answers: status, body, content type and any further headers."""

    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


App = Callable[[str, Message], AppResponse | None]
"""(request target with its query, request headers) -> the answer, or None: not found."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Don't linger on a restart: the old daemon's socket in TIME_WAIT must not block the port.
    allow_reuse_address = True


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` over HTTP, from a daemon thread.

    ``port`` 0 binds a free port (tests); :attr:`port` tells which once started.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        ready: Callable[[], bool],
        app: App | None = None,
    ) -> None:
        self._registry = registry
        self._app = app
        self._host = host
        self._requested_port = port
        self._ready = ready
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the kernel's choice when constructed with 0)."""
        if self._server is None:
            raise RuntimeError("MetricsServer is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in a daemon thread. Raises OSError if the address is taken."""
        if self._server is not None:
            return
        handler = _make_handler(self._registry, self._ready, self._app)
        server_class = type(
            "_BoundServer",
            (_Server,),
            {"address_family": _family(self._host)},
        )
        self._server = server_class((self._host, self._requested_port), handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="metrics-http",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _make_handler(
    registry: CollectorRegistry, ready: Callable[[], bool], app: App | None = None
) -> type[BaseHTTPRequestHandler]:
    log = get_logger("linescan.metrics")

    class Handler(BaseHTTPRequestHandler):
        # A client that connects and never sends must not hold a thread forever.
        timeout = 10
        server_version = "linescan"
        sys_version = ""

        def do_GET(self) -> None:
            self._respond(head=False)

        def do_HEAD(self) -> None:
            self._respond(head=True)

        def _respond(self, *, head: bool) -> None:
            path = urlsplit(self.path).path
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept") or "")
                self._send(200, encoder(registry), content_type, head)
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8", head)
            elif path == "/readyz":
                try:
                    is_ready = bool(ready())
                except Exception as exc:  # a probe that raises means "not ready", and says why
                    log.warning("readiness check failed", error=repr(exc))
                    is_ready = False
                body = b"ready\n" if is_ready else b"not ready\n"
                self._send(200 if is_ready else 503, body, "text/plain; charset=utf-8", head)
            else:
                answer = None if app is None else app(self.path, self.headers)
                if answer is None:
                    self._send(404, b"not found\n", "text/plain; charset=utf-8", head)
                else:
                    self._send(
                        answer.status, answer.body, answer.content_type, head, answer.headers
                    )

        def _send(
            self,
            code: int,
            body: bytes,
            content_type: str,
            head: bool,
            headers: tuple[tuple[str, str], ...] = (),
        ) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            # Scrapes every 15 s would fill the journal; errors still reach log_error.
            pass

        def log_error(self, format: str, *args: object) -> None:
            log.debug("metrics http error", message=format % args)

    return Handler
