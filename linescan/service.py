"""The daemon: camera frames in over ZeroMQ, defect events out, four threads, bounded queues.

    receiver ──frames──▶ tiler ──tile jobs──▶ inference ──(job, recon)──▶ post
    (ZeroMQ PULL/SUB,    (Band per camera:    (batches fill across        (Tracker per camera:
     validate, number     lines -> tile rows)  frames: max_batch tiles     stitch, residual, mask,
     lines, overload)                          or max_wait)                regions -> events; PUB)

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
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import zmq
from prometheus_client import CollectorRegistry

from linescan.backends import Backend
from linescan.config import Config
from linescan.errors import ConfigError, EngineError, FrameError
from linescan.ingest import Frame, FrameLimits, parse_frame
from linescan.journal import EventJournal
from linescan.lines import Band, FrameInfo, TileJob
from linescan.log import RateLimitedLogger, get_logger
from linescan.metrics import Metrics
from linescan.model.bundle import BundleMeta
from linescan.publish import EventPublisher
from linescan.replay import ReplayServer
from linescan.security import AuthMonitor, CurveSetup, curve_from_config
from linescan.segment import Region
from linescan.tiling import TileGrid
from linescan.tracker import ResidualFn, Tracker

F32 = npt.NDArray[np.float32]
_STOP = object()  # sentinel passed down the queues at shutdown
MAX_CAMERAS = 16  # distinct camera names: bounds memory and metric label cardinality
REORDER_WINDOW = 16  # a seq at most this far back is out of order; further, a camera restart
STALL_S = 15.0  # a thread that has not looped for this long is hung (the watchdog stops)
log = get_logger("linescan.service")


@dataclass
class Totals:
    """Running counts for status messages; written by several threads under one lock."""

    frames_received: int = 0
    frames_rejected: int = 0
    frames_dropped: int = 0
    frames_inspected: int = 0
    lines_received: int = 0
    lines_inspected: int = 0
    lines_dropped: int = 0
    defects: int = 0
    segments: int = 0
    gaps: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    not_inspected: list[dict[str, Any]] = field(default_factory=list)  # since last status
    breaks: list[dict[str, Any]] = field(default_factory=list)  # since last status


@dataclass
class _Camera:
    """The receiver's view of one camera: sequence and line numbering."""

    next_seq: int | None = None
    next_line: int = 0
    width: int | None = None
    last_height: int = 0


@dataclass
class _Frame:
    """A validated frame with its absolute line and whether the web broke before it."""

    frame: Frame
    line: int
    break_before: str | None  # why the segment must restart before this frame, if it must


@dataclass
class _Result:
    job: TileJob
    camera: str
    recon: F32 | None
    error: str | None = None


class Daemon:
    def __init__(
        self,
        config: Config,
        meta: BundleMeta,
        backend: Backend,
        registry: CollectorRegistry | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
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
        stride = config.inspection.stride or meta.stride
        if stride > meta.patch:
            raise ConfigError(
                f"inspection.stride = {stride} is larger than the model's {meta.patch}-px tiles: "
                "parts of the web would never be inspected"
            )
        self.grid = TileGrid(meta.patch, stride)
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
        self.ctx = context or zmq.Context.instance()
        self.limits = FrameLimits.from_config(config.frames)
        q = config.queues
        self.q_frames: queue.Queue[Any] = queue.Queue(q.ingest)
        self.q_jobs: queue.Queue[Any] = queue.Queue(q.inference)  # tile rows for the engine
        self.q_results: queue.Queue[Any] = queue.Queue(q.publish)  # reconstructed rows
        self.totals = Totals()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._cameras: dict[str, _Camera] = {}
        self._segment_counter = 0
        self._throttled = RateLimitedLogger(log, interval_s=10.0)
        self._on_event = on_event
        self._frames_seen: dict[str, deque[FrameInfo]] = {}  # post thread only
        self._uncounted: dict[str, list[FrameInfo]] = {}  # post thread only
        self._not_final: dict[str, deque[FrameInfo]] = {}  # post thread only
        self._residual_cache: tuple[ResidualFn | None] | None = None  # post thread only
        # last loop time of the threads that poll (inference, post): a stuck one stops the
        # watchdog; the receiver and tiler block on I/O and queues by design
        self._beats: dict[str, float] = {}
        self._failed_segments: set[int] = set()  # engine failures: the tiler restarts these
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

    # ------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        """Bind sockets, warm the engine up, start the threads; returns when ready."""
        try:
            self._open_journal_and_security()
            self.publisher = EventPublisher(
                self.config.events.endpoint,
                self.config.events.sndhwm,
                self.metrics,
                context=self.ctx,
                next_seq=0 if self.journal is None else self.journal.next_seq(),
                journal=None if self.journal is None else self.journal.recorder(self._journaled),
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
        except BaseException:
            if self.publisher is not None:
                self.publisher.close()
            self._close_extras()
            raise
        self._warm_up()
        for name, target in (
            ("receiver", self._receiver),
            ("tiler", self._tiler),
            ("inference", self._inference),
            ("post", self._post),
        ):
            t = threading.Thread(target=self._guard(target), name=f"linescan-{name}", daemon=True)
            if name in ("inference", "post"):
                self._beat(name)
            t.start()
            self._threads.append(t)
        self._ready.set()
        self.metrics.ready.set(1)
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

    def stop(self) -> None:
        """Stop taking frames; finish, publish what is held (see ``join``)."""
        self._not_ready()
        self._stopping.set()

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
            not self._errors
            and all(t.is_alive() for t in self._threads)
            and all(now - beat < STALL_S for beat in self._beats.values())
            and (self.replay is None or self.replay.alive())
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

    def _journaled(self, ok: bool) -> None:
        (self.metrics.events_journaled_total if ok else self.metrics.journal_errors_total).inc()

    def _close_extras(self) -> None:
        """Close the replay endpoint, the journal and the ZAP handler; idempotent."""
        if self.replay is not None:
            self.replay.stop()
        if self.journal is not None:
            self.journal.close()
        if self._auth_monitor is not None:
            self._auth_monitor.stop()
        self._curve.stop()

    @property
    def errors(self) -> list[BaseException]:
        return list(self._errors)

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # a dead thread must be loud and stop the daemon
                self._errors.append(exc)
                self._not_ready()
                log.exception("thread failed", thread=threading.current_thread().name)
                self._stopping.set()
                self._unblock_all()

        return run

    def _unblock_all(self) -> None:
        for q in (self.q_frames, self.q_jobs, self.q_results):
            with contextlib.suppress(queue.Full):
                q.put_nowait(_STOP)

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

    def _warm_up(self) -> None:
        p = self.meta.patch
        for n in (1, self.config.inspection.max_batch):
            self.backend.infer(np.zeros((n, 1, p, p), dtype=np.float32))

    # ------------------------------------------------------------------ receiver

    def _receiver(self) -> None:
        sock = self._frames_sock
        if sock is None:
            raise RuntimeError("frames socket not open")
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                if not poller.poll(100):
                    continue
                parts = sock.recv_multipart(copy=False)
                t_recv = time.time_ns()
                t0 = time.perf_counter()
                self._receive_one(parts, t_recv)
                self.metrics.stage_seconds.labels("ingest").observe(time.perf_counter() - t0)
            # Frames ZeroMQ already accepted from the camera are ours: take them in (inspected,
            # or dropped and counted by the policy) rather than closing the socket on them.
            while not self._errors:
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._receive_one(parts, time.time_ns())
        finally:
            sock.close(linger=0)
            self._put(self.q_frames, _STOP, force=True)

    def _receive_one(self, parts: list[Any], t_recv: int) -> None:
        try:
            frame = parse_frame(
                parts, self.limits, t_recv, default_camera=self.config.inspection.camera
            )
            self._check_geometry(frame)
            if frame.camera not in self._cameras and len(self._cameras) >= MAX_CAMERAS:
                raise FrameError("camera", f"more than {MAX_CAMERAS} cameras on one daemon")
        except FrameError as exc:
            self._reject(exc.reason, exc.detail)
            return
        cam_name = frame.camera
        cam = self._cameras.setdefault(cam_name, _Camera())
        brk: str | None = None
        expected = cam.next_seq
        if expected is not None and frame.seq < expected:
            duplicate = frame.seq == expected - 1
            if expected - frame.seq > REORDER_WINDOW:
                # a camera (or frame grabber) that restarted counts from 0 again: a new web
                # segment, not thousands of "out of order" frames until its counter catches up.
                # A short step back is a duplicate or a reordered frame: rejected.
                brk = "restart"
                expected = cam.next_seq = None
                cam.width = None
            else:
                what = "duplicate" if duplicate else "out of order"
                self._reject("sequence", f"{what} seq {frame.seq} (expected {expected})")
                return
        if brk is None and expected is None:
            brk = "start"
        elif brk is None and expected is not None and frame.seq != expected:
            brk = "gap"
            missing = frame.seq - expected
            with self._lock:
                self.totals.gaps += 1
            self.metrics.sequence_gaps_total.inc()
            est = (
                frame.line if frame.line is not None else cam.next_line + missing * cam.last_height
            )
            self._note_not_inspected(
                cam_name, cam.next_line, est, f"sequence gap: {missing} frame(s) lost upstream"
            )
        elif cam.width is not None and frame.width != cam.width:
            brk = "width"
        line = (
            frame.line
            if frame.line is not None
            else (
                cam.next_line + (frame.seq - cam.next_seq) * cam.last_height
                if cam.next_seq is not None
                else cam.next_line  # first frame (0) or a restarted camera: keep counting
            )
        )
        cam.next_seq = frame.seq + 1
        cam.next_line = line + frame.height
        cam.last_height = frame.height
        cam.width = frame.width
        self.metrics.frames_received_total.labels(cam_name).inc()
        with self._lock:
            self.totals.frames_received += 1
            self.totals.lines_received += frame.height
        item = _Frame(frame, line, brk)
        policy = self.config.queues.overload
        if policy == "block":
            self._put(self.q_frames, item, force=True)
        else:
            try:
                self.q_frames.put_nowait(item)
            except queue.Full:
                if policy == "drop-oldest":
                    with contextlib.suppress(queue.Empty):
                        old = self.q_frames.get_nowait()
                        if isinstance(old, _Frame):
                            self._drop(old, "overload")
                    try:
                        self.q_frames.put_nowait(item)
                    except queue.Full:
                        self._drop(item, "overload")
                else:
                    self._drop(item, "overload")
        # A dropped frame leaves a hole in the line numbers; the tiler sees it and restarts
        # the segment there (see _tiler), so nothing is ever stitched across it.
        self.metrics.queue_depth.labels("ingest").set(self.q_frames.qsize())

    def _check_geometry(self, frame: Frame) -> None:
        bits = self.meta.input.bit_depth
        if (frame.dtype == "uint8") != (bits <= 8):
            raise FrameError(
                "dtype",
                f"{frame.dtype} frames, but model {self.meta.name} was trained on {bits}-bit "
                "images (its normalisation would be wrong)",
            )
        mw = self.meta.input.model_shape(1, frame.width)[1]
        if mw < self.meta.patch:
            raise FrameError(
                "dims",
                f"width {frame.width} is {mw} px at the model's scale, narrower than one "
                f"{self.meta.patch}-px tile",
            )

    def _reject(self, reason: str, detail: str) -> None:
        self.metrics.frames_rejected_total.labels(reason).inc()
        with self._lock:
            self.totals.frames_rejected += 1
            self.totals.rejected_by_reason[reason] = (
                self.totals.rejected_by_reason.get(reason, 0) + 1
            )
        self._throttled.warning(f"reject:{reason}", "frame rejected", reason=reason, detail=detail)

    def _drop(self, item: _Frame, reason: str) -> None:
        f = item.frame
        self.metrics.frames_dropped_total.labels(reason).inc()
        self.metrics.lines_dropped_total.inc(f.height)
        with self._lock:
            self.totals.frames_dropped += 1
            self.totals.lines_dropped += f.height
        self._note_not_inspected(
            f.camera, item.line, item.line + f.height, f"dropped: {reason}", seq=f.seq
        )
        self._throttled.warning(f"drop:{reason}", "frame dropped", reason=reason, seq=f.seq)

    def _note_not_inspected(
        self, camera: str, start: int, end: int, why: str, seq: int | None = None
    ) -> None:
        rec: dict[str, Any] = {"camera": camera, "line_start": start, "line_end": end, "why": why}
        if seq is not None:
            rec["seq"] = seq
        with self._lock:
            self.totals.not_inspected.append(rec)

    def _put(self, q: queue.Queue[Any], item: Any, force: bool = False) -> bool:
        """Put, waking up regularly; with ``force`` it waits even while stopping."""
        while True:
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                if self._errors or (self._stopping.is_set() and not force):
                    return False

    # ------------------------------------------------------------------ tiler

    def _tiler(self) -> None:
        bands: dict[str, Band] = {}
        band: Band | None
        while True:
            item = self.q_frames.get()
            self.metrics.queue_depth.labels("ingest").set(self.q_frames.qsize())
            if item is _STOP:
                for cam, band in bands.items():
                    self._send_jobs(cam, band.end())
                self._put(self.q_jobs, _STOP, force=True)
                return
            t0 = time.perf_counter()
            f: Frame = item.frame
            cam = f.camera
            band = bands.get(cam)
            brk = item.break_before
            if band is not None and brk is None and item.line != band.line0 + band.raw_lines:
                brk = "dropped"  # the receiver dropped frames: a hole in the web
            if band is not None and brk is None:
                with self._lock:
                    if band.segment in self._failed_segments:
                        self._failed_segments.discard(band.segment)
                        brk = "engine"  # inspection restarts after an engine failure
            if band is not None and (brk is not None or band.raw_width != f.width):
                self._send_jobs(cam, band.end())
                self._note_break(cam, item.line, brk or "width")
                band = None
            if band is None:
                self._segment_counter += 1
                self.metrics.segments_total.inc()
                with self._lock:
                    self.totals.segments += 1
                band = Band(self._segment_counter, self.meta.input, self.grid, f.width, item.line)
                bands[cam] = band
            info = FrameInfo(cam, f.seq, item.line, f.height, f.t_capture_ns, f.t_receive_ns)
            jobs = band.push(f.pixels, info)
            if f.end:
                jobs += band.end()
                del bands[cam]
                self._note_break(cam, item.line + f.height, "end")
            self.metrics.stage_seconds.labels("band").observe(time.perf_counter() - t0)
            self._send_jobs(cam, jobs)

    def _note_break(self, camera: str, line: int, why: str) -> None:
        with self._lock:
            self.totals.breaks.append({"camera": camera, "line": line, "why": why})

    def _send_jobs(self, camera: str, jobs: list[TileJob]) -> None:
        for job in jobs:
            self._put(self.q_jobs, (camera, job), force=True)
        self.metrics.queue_depth.labels("inference").set(self.q_jobs.qsize())

    # ------------------------------------------------------------------ inference

    def _inference(self) -> None:
        max_batch = self.config.inspection.max_batch
        max_wait = self.config.inspection.max_wait_ms / 1000.0
        pending: deque[list[Any]] = deque()  # [camera, job, parts, tiles_done]
        waiting_tiles = 0
        oldest = 0.0
        stop = False
        while True:
            self._beat("inference")
            timeout = 0.1
            if waiting_tiles:
                timeout = max(0.0, oldest + max_wait - time.monotonic())
            item: Any = None
            if not stop:
                try:
                    item = (
                        self.q_jobs.get(timeout=timeout)
                        if timeout > 0
                        else self.q_jobs.get_nowait()
                    )
                except queue.Empty:
                    item = None
            if item is _STOP:
                stop = True
            elif item is not None:
                cam, job = item
                if not pending or waiting_tiles == 0:
                    oldest = time.monotonic()
                pending.append([cam, job, [], 0])
                waiting_tiles += job.n_tiles
            flush = stop or (waiting_tiles and time.monotonic() >= oldest + max_wait)
            while waiting_tiles >= max_batch or (flush and waiting_tiles):
                waiting_tiles -= self._run_batch(pending, max_batch)
                oldest = time.monotonic()
            while pending and pending[0][3] >= pending[0][1].n_tiles:
                cam, job, parts, _ = pending.popleft()
                recon = np.concatenate(parts) if parts else None
                self._put(self.q_results, _Result(job, cam, recon, job.engine_error), force=True)
            self.metrics.queue_depth.labels("inference").set(self.q_jobs.qsize())
            if stop and not pending:
                self._put(self.q_results, _STOP, force=True)
                return

    def _run_batch(self, pending: deque[list[Any]], max_batch: int) -> int:
        chunks: list[F32] = []
        owners: list[tuple[list[Any], int]] = []
        room = max_batch
        for entry in pending:
            job: TileJob = entry[1]
            done = entry[3]
            left = job.n_tiles - done
            if left <= 0:
                continue
            take = min(left, room)
            if job.tiles is None:
                continue
            chunks.append(job.tiles[done : done + take])
            owners.append((entry, take))
            room -= take
            if room == 0:
                break
        batch = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        t0 = time.perf_counter()
        try:
            recon = self.backend.infer(batch)
            if not np.isfinite(recon).all():
                raise EngineError("the engine returned NaN or infinite reconstructions")
            error = None
        except EngineError as exc:
            self.metrics.engine_errors_total.inc()
            log.error("inference failed", error=str(exc))
            recon = np.zeros((len(batch), self.meta.channels, *batch.shape[2:]), np.float32)
            error = str(exc)
        self.metrics.stage_seconds.labels("infer").observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.tiles_inferred_total.inc(len(batch))
        k = 0
        for entry, take in owners:
            entry[2].append(recon[k : k + take])
            entry[3] += take
            if error is not None:
                entry[1].engine_error = error
            k += take
        return len(batch)

    # ------------------------------------------------------------------ post

    def _post(self) -> None:
        trackers: dict[str, Tracker] = {}
        broken: dict[int, str] = {}  # segments abandoned after an engine failure, and why
        interval = self.config.events.status_interval_s
        next_status = time.monotonic() + interval
        while True:
            try:
                item = self.q_results.get(timeout=min(0.1, interval))
            except queue.Empty:
                item = None
            self._beat("post")
            if item is _STOP:
                self._publish_status(final=True)
                return
            if item is not None:
                self._post_one(item, trackers, broken)
            if time.monotonic() >= next_status:
                self._publish_status(final=False)
                next_status = time.monotonic() + interval

    def _post_one(self, res: _Result, trackers: dict[str, Tracker], broken: dict[int, str]) -> None:
        job, cam = res.job, res.camera
        tr = trackers.get(cam)
        if tr is None or tr.segment != job.segment:
            tr = Tracker(
                job.segment,
                self.meta.input,
                self.grid,
                self.meta.input.model_shape(1, job.raw_width)[1],
                job.raw_width,
                self.meta.channels,
                self.meta.residual,
                self.meta.ssim,
                self.threshold,
                self.meta.vae_sigma,
                line0=job.line0,
                residual_fn=self._residual_fn(),
            )
            trackers[cam] = tr
        if res.error is not None and job.segment not in broken:
            broken[job.segment] = res.error
            with self._lock:
                self._failed_segments.add(job.segment)  # the tiler restarts the web after it
        frames = job.frames
        if job.segment in broken:
            # the segment's later jobs ran fine (res.error is None): name the failure that broke it
            why = f"engine error: {broken[job.segment]}"
            for fi in [*self._uncounted.pop(cam, []), *frames]:
                self._count_frame(fi, inspected=False, why=why)
            if job.end:
                trackers.pop(cam, None)
                del broken[job.segment]  # its last job: nothing more will come for it
            return
        t0 = time.perf_counter()
        regions = tr.consume(job, res.recon)
        self.metrics.stage_seconds.labels("stitch").observe(time.perf_counter() - t0)
        self._frames_seen.setdefault(cam, deque(maxlen=4096)).extend(frames)
        self._observe_final(cam, tr, frames)
        # A frame counts as inspected once its segment has held a whole tile row (before that
        # it is not yet known whether the segment will be long enough to inspect at all).
        waiting = self._uncounted.setdefault(cam, [])
        waiting.extend(frames)
        if tr.tiles_stitched > 0:
            for fi in waiting:
                self._count_frame(fi, inspected=True)
            waiting.clear()
        elif job.end:
            why = f"segment of {tr.raw_lines} lines is shorter than one tile"
            for fi in waiting:
                self._count_frame(fi, inspected=False, why=why, reason="short")
            waiting.clear()
        found = [r for r in regions if r.area_px >= self.config.inspection.min_area_px]
        if found:
            self._publish_defects(cam, job.segment, found)
        if job.end:
            trackers.pop(cam, None)

    def _observe_final(self, cam: str, tr: Tracker, frames: list[FrameInfo]) -> None:
        """Frame latency: capture (or receipt) until every line of the frame is final."""
        waiting = self._not_final.setdefault(cam, deque())
        waiting.extend(frames)
        final_line = (
            tr.line0 + tr.raw_lines if tr.ended else tr.line0 + tr.mask_final * tr.spec.downscale
        )
        now = time.time_ns()
        while waiting and (
            waiting[0].line_start + waiting[0].lines <= final_line
            or waiting[0].line_start < tr.line0  # a frame of an earlier segment
        ):
            fi = waiting.popleft()
            t_ref = fi.t_capture_ns if fi.t_capture_ns is not None else fi.t_receive_ns
            self.metrics.frame_latency_seconds.observe(max(0, now - t_ref) / 1e9)

    def _residual_fn(self) -> ResidualFn | None:
        """The fused CUDA SSIM kernel when the engine runs on a GPU; None: the CPU residual.

        Made on first use in the post thread (a CudaResidual is not thread-safe) and kept.
        """
        if self._residual_cache is not None:
            return self._residual_cache[0]
        fn: ResidualFn | None = None
        device = self.config.engine.device
        if device.startswith("cuda") and self.meta.residual == "ssim":
            try:
                from linescan.backends.cuda_residual import CudaResidual

                index = int(device.split(":")[1]) if ":" in device else 0
                cuda = CudaResidual(self.meta.ssim, device=index)

                def gpu(x: F32, rec: F32) -> F32:
                    return cuda.residual(x, rec[0])

                fn = gpu
                log.info("residual on the GPU", kernel="ssim_residual.cu", device=device)
            except (ImportError, EngineError) as exc:
                log.warning("CUDA residual unavailable, using the CPU", error=str(exc))
        self._residual_cache = (fn,)
        return fn

    def _count_frame(
        self, fi: FrameInfo, inspected: bool, why: str = "", reason: str = "engine"
    ) -> None:
        with self._lock:
            if inspected:
                self.totals.frames_inspected += 1
                self.totals.lines_inspected += fi.lines
            else:
                self.totals.frames_dropped += 1
                self.totals.lines_dropped += fi.lines
        if inspected:
            self.metrics.lines_inspected_total.inc(fi.lines)
        else:
            self.metrics.frames_dropped_total.labels(reason).inc()
            self.metrics.lines_dropped_total.inc(fi.lines)
            self._note_not_inspected(fi.camera, fi.line_start, fi.line_start + fi.lines, why)

    def _frame_of_line(self, camera: str, line: int) -> FrameInfo | None:
        for fi in reversed(self._frames_seen.get(camera, ())):
            if fi.line_start <= line < fi.line_start + fi.lines:
                return fi
        return None

    def _publish_defects(self, camera: str, segment: int, regions: list[Region]) -> None:
        """The events of one stitched tile row: journaled together (one fsync), then sent."""
        if self.publisher is None:
            raise RuntimeError("publisher not started")
        payloads = []
        latencies: list[float | None] = []
        now = time.time_ns()
        for r in regions:
            fi = self._frame_of_line(camera, r.line_end - 1)
            t_cap = None if fi is None else fi.t_capture_ns
            t_ref = t_cap if t_cap is not None else (None if fi is None else fi.t_receive_ns)
            latency_ms = None if t_ref is None else (now - t_ref) / 1e6
            latencies.append(latency_ms)
            payloads.append(
                {
                    "camera": camera,
                    "segment": segment,
                    **r.to_dict(),
                    "position_m": r.line_start / self.config.inspection.lines_per_metre,
                    "threshold": self.threshold,
                    "model": self.meta.model_id,
                    "t_capture_ns": t_cap,
                    "t_receive_ns": None if fi is None else fi.t_receive_ns,
                    "latency_ms": latency_ms,
                }
            )
        t0 = time.perf_counter()
        seqs = self.publisher.publish_many("defect", payloads)
        self.metrics.stage_seconds.labels("publish").observe(time.perf_counter() - t0)
        for latency_ms in latencies:
            if latency_ms is not None:
                self.metrics.latency_seconds.observe(latency_ms / 1000.0)
        self.metrics.defects_total.labels(camera).inc(len(seqs))
        with self._lock:
            self.totals.defects += len(seqs)
        if self._on_event is not None:
            for seq, payload in zip(seqs, payloads, strict=True):
                self._on_event("defect", {"seq": seq, **payload})

    def _publish_status(self, final: bool) -> None:
        if self.publisher is None:
            return
        with self._lock:
            t = self.totals
            payload = {
                "final": final,
                "frames_received": t.frames_received,
                "frames_inspected": t.frames_inspected,
                "frames_dropped": t.frames_dropped,
                "frames_rejected": t.frames_rejected,
                "rejected_by_reason": dict(t.rejected_by_reason),
                "lines_received": t.lines_received,
                "lines_inspected": t.lines_inspected,
                "lines_dropped": t.lines_dropped,
                "defects": t.defects,
                "segments": t.segments,
                "sequence_gaps": t.gaps,
                "auth_failures": 0 if self._auth_monitor is None else self._auth_monitor.total(),
                "disconnects": 0 if self._auth_monitor is None else self._auth_monitor.disconnects,
                "not_inspected": t.not_inspected,
                "breaks": t.breaks,
                "queues": {
                    "ingest": self.q_frames.qsize(),
                    "inference": self.q_jobs.qsize(),
                    "publish": self.q_results.qsize(),
                },
            }
            t.not_inspected = []
            t.breaks = []
        self.publisher.publish("status", payload)
        if self._on_event is not None:
            self._on_event("status", payload)
