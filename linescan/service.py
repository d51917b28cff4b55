"""The daemon: camera frames in over ZeroMQ, defect events out, four threads, bounded queues.

    receiver ──frames──▶ tiler ──tile jobs──▶ inference ──(job, recon)──▶ post
    (ZeroMQ PULL/SUB,    (Band per camera:    (batches fill across        (Tracker per camera:
     validate, number     lines -> tile rows)  frames: max_batch tiles     stitch, residual, mask,
     lines, overload)                          or max_wait)                regions -> events; PUB)

One module a stage (``linescan/stages/``): ``receive.py`` (receiver), ``tile.py`` (tiler),
``infer.py`` (inference), ``post.py`` and ``event.py`` (post). What travels between them is typed
(``items.py``); the counts several of them write live in one ``Accounting`` (``state.py``). This
module only runs them: it opens the sockets, the journal and the replay endpoint, warms the
engine up, starts and stops the threads and watches them.

Every queue is bounded. When the tiler falls behind, the receiver applies the configured
overload policy (drop whole frames at ingest, counted, and every dropped line range is named
in the next status message). A dropped frame, a gap in the frame ``seq`` or a width change
breaks the web: the current segment is closed (its last tile row is edge-aligned, its open
regions are published) and a new one starts; nothing is stitched across a hole.

Accounting is exact: every valid frame received ends as inspected (its lines reached the
tracker) or dropped (overload, or lines of a segment too short to hold one tile, or an engine
failure), and every malformed message is rejected by reason. Status messages carry the running
totals so a subscriber can tell "no defects" from "no data".

Shutdown (SIGTERM/SIGINT): the receiver stops taking frames, every segment is ended, the queues
drain, the remaining events and a final status are published, and ``run`` returns.

With ``[journal]`` configured, every defect event is written to the durable journal
(``journal.py``) just before it is sent, ``seq`` continues from the journal after a restart, and
a fifth thread answers replay requests (``replay.py``). With CurveZMQ keys configured the frame
socket admits authorised cameras only and counts refused handshakes (``security.py``).

What the operator sees: a picture thread draws every defect's crop (``crops.py``,
``pictures.py``) into a store beside the journal (or in memory); ``view`` (``live.py``) is
the live page the metrics server serves, fed with every event as published and every status.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import zmq
from prometheus_client import CollectorRegistry

from linescan.backends import Backend
from linescan.config import Config
from linescan.crops import Cropper
from linescan.errors import ConfigError, EngineError
from linescan.ingest import FrameLimits
from linescan.journal import EventJournal, JournalRow
from linescan.live import LiveView, is_loopback, read_token
from linescan.log import get_logger
from linescan.metrics import Metrics
from linescan.model.bundle import BundleMeta
from linescan.pictures import (
    MemoryPictures,
    PictureStore,
    PictureWriter,
    SqlitePictures,
    pictures_path,
)
from linescan.publish import EventPublisher
from linescan.replay import ReplayServer
from linescan.security import AuthMonitor, CurveSetup, curve_from_config
from linescan.stages.event import EventSender, OnEvent
from linescan.stages.flow import Flow
from linescan.stages.infer import Inference
from linescan.stages.items import FrameQueue, JobQueue, Queues, ResultQueue
from linescan.stages.post import Post
from linescan.stages.receive import MAX_CAMERAS, REORDER_WINDOW, Receiver
from linescan.stages.state import Accounting, Totals
from linescan.stages.tile import Tiler
from linescan.stride import StrideChoice, choose_stride, measure_tiles_per_s
from linescan.tiling import TileGrid

# MAX_CAMERAS, REORDER_WINDOW and Totals moved to linescan.stages; still importable from here.
__all__ = ["MAX_CAMERAS", "REORDER_WINDOW", "STALL_S", "Daemon", "Totals"]

STALL_S = 15.0  # a thread that has not looped for this long is hung (the watchdog stops)
log = get_logger("linescan.service")


class Daemon:
    def __init__(
        self,
        config: Config,
        meta: BundleMeta,
        backend: Backend,
        registry: CollectorRegistry | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        on_event: OnEvent | None = None,
    ) -> None:
        if not meta.input.streamable:
            raise EngineError(
                f"model {meta.name} was trained with a fixed --resize; the daemon needs a "
                "model trained with --scale (a fixed size means nothing on an endless web)"
            )
        threshold = config.model.threshold or meta.threshold
        if threshold is None:
            raise EngineError(
                f"model {meta.name} has no threshold: run `linescan calibrate` on defect-free "
                "images, or set model.threshold in the config"
            )
        self.config = config
        self.meta = meta
        self.backend = backend
        self.threshold = float(threshold)
        setting = config.inspection.stride
        stride = meta.stride if setting is None or setting == "auto" else setting
        if stride > meta.patch:
            raise ConfigError(
                f"inspection.stride = {stride} is larger than the model's {meta.patch}-px tiles: "
                "parts of the web would never be inspected"
            )
        # stride = "auto": the bundle's until start() has measured the engine (stride.py)
        self.grid = TileGrid(meta.patch, stride)
        self.stride_choice: StrideChoice | None = None
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.metrics.set_model_info(
            model=meta.model_id,
            loss=meta.loss,
            latent=meta.latent,
            patch=meta.patch,
            precision=backend.precision,
            backend=backend.name,
        )
        self.metrics.lines_per_metre.set(config.inspection.lines_per_metre)
        self.ctx = context or zmq.Context.instance()
        self.limits = FrameLimits.from_config(config.frames)
        self.queues = Queues.bounded(config.queues)
        self.accounting = Accounting()  # the counts the stages share
        self._flow = Flow()  # stopping and failure, as the stages see them
        self._ready = threading.Event()
        self._threads: list[threading.Thread] = []
        self._on_event = on_event
        # last loop time of the threads that poll (inference, post): a stuck one stops the
        # watchdog; the receiver and tiler block on I/O and queues by design
        self._beats: dict[str, float] = {}
        self.publisher: EventPublisher | None = None
        self.frames_endpoint = config.frames.endpoint
        self.events_endpoint = config.events.endpoint
        self._frames_sock: zmq.Socket[bytes] | None = None
        # Durable event journal and its replay endpoint (journal.py, replay.py); CurveZMQ
        # (security.py). Opened in start(), closed in join().
        self.journal: EventJournal | None = None
        self.replay: ReplayServer | None = None
        self.replay_endpoint: str | None = None
        self._curve = CurveSetup()
        self._auth_monitor: AuthMonitor | None = None
        # What the operator sees (live.py, pictures.py): the page exists from here on, so a
        # metrics server made before start() can serve it; its journal and pictures come with
        # start().
        mc = config.metrics
        self.view = LiveView(
            model=meta.model_id,
            lines_per_metre=config.inspection.lines_per_metre,
            pixels_per_metre=config.inspection.pixels_per_metre,
            ready=lambda: self.ready,
            metrics=self.metrics,
            keep=config.pictures.keep,
            token=None if mc.token_file is None else read_token(mc.token_file),
        )
        self.picture_store: PictureStore | None = None
        self.picture_writer: PictureWriter | None = None

    # ------------------------------------------------------------------ the queues and counts

    @property
    def q_frames(self) -> FrameQueue:
        return self.queues.frames

    @property
    def q_jobs(self) -> JobQueue:
        return self.queues.jobs  # tile rows for the engine

    @property
    def q_results(self) -> ResultQueue:
        return self.queues.results  # reconstructed rows

    @property
    def totals(self) -> Totals:
        return self.accounting.totals

    # ------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        """Bind sockets, warm the engine up, start the threads; returns when ready."""
        try:
            self._open_journal_and_security()
            self._open_pictures()
            recorder = None if self.journal is None else self.journal.recorder(self._journaled)
            view = self.view

            def journal_and_view(rows: list[JournalRow]) -> None:
                if recorder is not None:
                    recorder(rows)
                view.record(rows)

            self.publisher = EventPublisher(
                self.config.events.endpoint,
                self.config.events.sndhwm,
                self.metrics,
                context=self.ctx,
                next_seq=0 if self.journal is None else self.journal.next_seq(),
                journal=journal_and_view,
                configure=self._curve.events,
            )
            self.events_endpoint = self.publisher.endpoint
            if self.journal is not None:
                self.replay = ReplayServer(
                    self.journal,
                    self.config.journal.replay_endpoint,
                    self.ctx,
                    self.metrics,
                    configure=self._curve.events,
                )
                self.replay.start()
                self.replay_endpoint = self.replay.endpoint
            self._frames_sock = self._open_frames_socket()
            self._warm_up()
            if self.config.inspection.stride == "auto":
                self._choose_stride()
        except BaseException:
            # Nothing stays bound or open: a supervisor's restart can bind the same ports.
            if self._frames_sock is not None:
                self._frames_sock.close(linger=0)
                self._frames_sock = None
            if self.publisher is not None:
                self.publisher.close()
            self._close_extras()
            raise
        self.metrics.stride_px.set(self.grid.stride)
        for name, target in self._stages(self._frames_sock, self.publisher):
            t = threading.Thread(target=self._guard(target), name=f"linescan-{name}", daemon=True)
            if name in ("inference", "post"):
                self._beat(name)
            t.start()
            self._threads.append(t)
        self._ready.set()
        self.metrics.ready.set(1)
        mc = self.config.metrics
        if mc.enabled and mc.page and self.view.token is None and not is_loopback(mc.host):
            log.warning(
                "the live page shows pictures of the product to anyone who reaches "
                f"{mc.listen}: set metrics.token_file, or listen on 127.0.0.1",
                listen=mc.listen,
            )
        log.info(
            "ready",
            frames=self.frames_endpoint,
            events=self.events_endpoint,
            model=self.meta.model_id,
            backend=self.backend.name,
            precision=self.backend.precision,
            threshold=self.threshold,
            stride=self.grid.stride,
        )

    def _stages(
        self, sock: zmq.Socket[bytes], publisher: EventPublisher
    ) -> list[tuple[str, Callable[[], None]]]:
        """The four stages, wired to the queues, in data-path order: (thread name, its loop)."""
        q, acc, flow = self.queues, self.accounting, self._flow
        cfg, meta, metrics = self.config, self.meta, self.metrics
        receiver = Receiver(sock, cfg, meta, self.limits, metrics, acc, flow, q.frames)
        pictures_on = cfg.pictures.enabled
        tiler = Tiler(meta, self.grid, metrics, acc, flow, q.frames, q.jobs, keep_raw=pictures_on)
        inference = Inference(
            self.backend,
            meta.channels,
            cfg.inspection.max_batch,
            cfg.inspection.max_wait_ms,
            metrics,
            flow,
            q.jobs,
            q.results,
            heartbeat=lambda: self._beat("inference"),
        )
        events = EventSender(
            publisher,
            cfg,
            meta,
            self.threshold,
            metrics,
            acc,
            q,
            self._auth_monitor,
            self._on_event,
            pictures=self.picture_writer,
            view=self.view,
            inspection=self.inspection_status(),
        )
        cropper = Cropper(cfg.pictures, meta.input, self.threshold) if pictures_on else None
        post = Post(
            cfg,
            meta,
            self.grid,
            self.threshold,
            metrics,
            acc,
            q.results,
            events,
            heartbeat=lambda: self._beat("post"),
            cropper=cropper,
        )
        return [
            ("receiver", receiver.run),
            ("tiler", tiler.run),
            ("inference", inference.run),
            ("post", post.run),
        ]

    def stop(self) -> None:
        """Stop taking frames; finish, publish what is held (see ``join``)."""
        self._not_ready()
        self._flow.stopping.set()

    def _not_ready(self) -> None:
        self._ready.clear()
        self.metrics.ready.set(0)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the threads to drain; True when all finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(left)
        done = not any(t.is_alive() for t in self._threads)
        if done and self.publisher is not None:
            self.publisher.close()
        if done:
            self._close_extras()
        return done

    def alive(self) -> bool:
        """True while every thread runs and none is stuck (the watchdog pings only then)."""
        now = time.monotonic()
        return (
            not self._flow.errors
            and all(t.is_alive() for t in self._threads)
            and all(now - beat < STALL_S for beat in self._beats.values())
            and (self.replay is None or self.replay.alive())
            and (self.picture_writer is None or self.picture_writer.alive())
        )

    def _beat(self, name: str) -> None:
        self._beats[name] = time.monotonic()

    def _open_journal_and_security(self) -> None:
        self._curve = curve_from_config(self.config.frames, self.config.events, self.ctx)
        jc = self.config.journal
        if jc.enabled and jc.path is not None:
            self.journal = EventJournal(
                jc.path,
                max_events=jc.max_events,
                max_age_s=jc.max_age_s,
                synchronous=jc.synchronous,
            )

    def _open_pictures(self) -> None:
        """The picture store (beside the journal, or in memory) and the thread that draws."""
        pc, journal = self.config.pictures, self.journal
        store: PictureStore
        if journal is not None:
            store = SqlitePictures(
                pictures_path(journal.path),
                next_seq=journal.next_seq(),
                max_age_s=self.config.journal.max_age_s,
            )
        else:
            store = MemoryPictures(pc.keep)
        self.picture_store = store
        oldest = None if journal is None else (lambda: journal.bounds()[0])
        self.picture_writer = PictureWriter(store, pc.size_px, pc.queue, self.metrics, oldest)
        self.picture_writer.start()
        self.view.journal = journal
        self.view.pictures = self.picture_writer

    def _journaled(self, ok: bool) -> None:
        (self.metrics.events_journaled_total if ok else self.metrics.journal_errors_total).inc()

    def _close_extras(self) -> None:
        """Close the replay endpoint, the pictures, the journal and the ZAP handler;
        idempotent."""
        if self.replay is not None:
            self.replay.stop()
        if self.picture_writer is not None:
            self.picture_writer.stop()  # draws what is queued first
        if self.picture_store is not None:
            self.picture_store.close()
        if self.journal is not None:
            self.journal.close()
        if self._auth_monitor is not None:
            self._auth_monitor.stop()
        self._curve.stop()

    @property
    def errors(self) -> list[BaseException]:
        return list(self._flow.errors)

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # a dead thread must be loud and stop the daemon
                self._flow.errors.append(exc)
                self._not_ready()
                log.exception("thread failed", thread=threading.current_thread().name)
                self._flow.stopping.set()
                self._unblock_all()

        return run

    def _unblock_all(self) -> None:
        self.queues.wake_all()

    def _open_frames_socket(self) -> zmq.Socket[bytes]:
        fc = self.config.frames
        kind = zmq.PULL if fc.socket == "pull" else zmq.SUB
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.RCVHWM, fc.rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        # the largest acceptable frame plus its header: bigger messages are refused by ZeroMQ
        sock.setsockopt(zmq.MAXMSGSIZE, fc.max_bytes + 65536)
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        if self._curve.frames is not None:
            self._curve.frames(sock)
        # Always: besides refused handshakes it counts dropped connections, the only trace
        # ZeroMQ leaves of a message over MAXMSGSIZE.
        self._auth_monitor = AuthMonitor(
            sock, "frames", self.metrics, disconnects=True, auth=self._curve.frames is not None
        )
        try:
            if fc.bind:
                sock.bind(fc.endpoint)
                last = sock.getsockopt(zmq.LAST_ENDPOINT)
                self.frames_endpoint = last.decode() if isinstance(last, bytes) else str(last)
            else:
                sock.connect(fc.endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        return sock

    def _choose_stride(self) -> None:
        """``inspection.stride = "auto"``: measure the engine, take the smallest stride that
        keeps up with the line (``stride.py``); say so in the log and the metrics."""
        ic = self.config.inspection
        if ic.line_rate_hz is None or ic.line_width_px is None:  # pragma: no cover - config
            raise ConfigError('stride = "auto" needs line_rate_hz and line_width_px')
        tiles_per_s = measure_tiles_per_s(self.backend, self.meta.patch, ic.max_batch)
        choice = choose_stride(
            self.meta, tiles_per_s, ic.line_rate_hz, ic.line_width_px, ic.stride_headroom
        )
        self.stride_choice = choice
        self.grid = TileGrid(self.meta.patch, choice.stride)
        self.metrics.engine_tiles_per_second.set(tiles_per_s)
        self.metrics.sustainable_lines_per_second.set(choice.sustainable_lines_per_s)
        say = log.info if choice.keeps_up else log.error
        say(
            "stride chosen",
            stride=choice.stride,
            bundle_stride=choice.bundle_stride,
            keeps_up=choice.keeps_up,
            detail=choice.describe(),
        )
        if choice.stride != choice.bundle_stride:
            log.warning(
                "stride differs from the bundle's: its threshold was calibrated at stride "
                f"{choice.bundle_stride}; stride {choice.stride} finds less (README: stride)",
                stride=choice.stride,
            )

    def inspection_status(self) -> dict[str, object]:
        """The stride in use and, with ``stride = "auto"``, why (for status messages)."""
        if self.stride_choice is not None:
            return self.stride_choice.as_dict()
        return {"stride": self.grid.stride, "auto": False}

    def _warm_up(self) -> None:
        p = self.meta.patch
        for n in (1, self.config.inspection.max_batch):
            self.backend.infer(np.zeros((n, 1, p, p), dtype=np.float32))
