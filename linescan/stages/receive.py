"""Frames in: the ZeroMQ frame socket, validation, sequence and line numbering, overload.

The receiver thread validates every message (``ingest.py``; a malformed one is rejected and
counted by reason), numbers each camera's lines and notices where the web breaks: a camera's
first frame, a gap in the frame ``seq`` (lines lost upstream, named in the next status message),
a camera that restarted counting, a width change. The break travels with the frame; the tiler
(``tile.py``) closes the segment there, so nothing is stitched across a hole.

When the tiler falls behind, the configured overload policy (``queues.overload``) applies: drop
whole frames at ingest (the newest or the oldest queued), counted, and every dropped line range
is named in the next status message; or block, and let ZeroMQ push back.
"""

from __future__ import annotations

import contextlib
import queue
import time
from dataclasses import dataclass
from typing import Any

import zmq

from linescan.config import Config
from linescan.errors import FrameError
from linescan.ingest import Frame, FrameLimits, parse_frame
from linescan.log import RateLimitedLogger, get_logger
from linescan.metrics import Metrics
from linescan.model.bundle import BundleMeta
from linescan.stages.flow import Flow
from linescan.stages.items import STOP, FrameQueue, ReceivedFrame
from linescan.stages.state import Accounting

MAX_CAMERAS = 16  # distinct camera names: bounds memory and metric label cardinality
REORDER_WINDOW = 16  # a seq at most this far back is out of order; further, a camera restart
log = get_logger("linescan.service")  # one logger name for all of the daemon's records


@dataclass
class CameraSequence:
    """The receiver's view of one camera: sequence and line numbering."""

    next_seq: int | None = None
    next_line: int = 0
    width: int | None = None
    last_height: int = 0


class Receiver:
    """The receiver thread: the frame socket to the frame queue. Closes the socket when done."""

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        config: Config,
        meta: BundleMeta,
        limits: FrameLimits,
        metrics: Metrics,
        accounting: Accounting,
        flow: Flow,
        frames: FrameQueue,
    ) -> None:
        self.sock = sock
        self.config = config
        self.meta = meta
        self.limits = limits
        self.metrics = metrics
        self.accounting = accounting
        self.flow = flow
        self.frames = frames
        self._cameras: dict[str, CameraSequence] = {}
        self._throttled = RateLimitedLogger(log, interval_s=10.0)

    def run(self) -> None:
        sock = self.sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self.flow.stopping.is_set():
                if not poller.poll(100):
                    continue
                parts = sock.recv_multipart(copy=False)
                t_recv = time.time_ns()
                t0 = time.perf_counter()
                self._receive_one(parts, t_recv)
                self.metrics.stage_seconds.labels("ingest").observe(time.perf_counter() - t0)
            # Frames ZeroMQ already accepted from the camera are ours: take them in (inspected,
            # or dropped and counted by the policy) rather than closing the socket on them.
            while not self.flow.failed:
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._receive_one(parts, time.time_ns())
        finally:
            sock.close(linger=0)
            self.flow.put(self.frames, STOP, force=True)

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
        cam = self._cameras.setdefault(cam_name, CameraSequence())
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
            self.accounting.count_gap()
            self.metrics.sequence_gaps_total.inc()
            est = (
                frame.line if frame.line is not None else cam.next_line + missing * cam.last_height
            )
            self.accounting.note_not_inspected(
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
        self.accounting.count_received(frame.height)
        self._enqueue(ReceivedFrame(frame, line, brk))
        # A dropped frame leaves a hole in the line numbers; the tiler sees it and restarts
        # the segment there (see tile.py), so nothing is ever stitched across it.
        self.metrics.queue_depth.labels("ingest").set(self.frames.qsize())

    def _enqueue(self, item: ReceivedFrame) -> None:
        """Queue a frame for the tiler, under the overload policy."""
        policy = self.config.queues.overload
        if policy == "block":
            self.flow.put(self.frames, item, force=True)
            return
        try:
            self.frames.put_nowait(item)
        except queue.Full:
            if policy == "drop-oldest":
                with contextlib.suppress(queue.Empty):
                    old = self.frames.get_nowait()
                    if not isinstance(old, ReceivedFrame):
                        # STOP (a stage failed and woke the others): it stays, the frame goes
                        with contextlib.suppress(queue.Full):  # wake_all put another
                            self.frames.put_nowait(old)
                        self._drop(item, "overload")
                        return
                    self._drop(old, "overload")
                try:
                    self.frames.put_nowait(item)
                except queue.Full:
                    self._drop(item, "overload")
            else:
                self._drop(item, "overload")

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
        self.accounting.count_rejected(reason)
        self._throttled.warning(f"reject:{reason}", "frame rejected", reason=reason, detail=detail)

    def _drop(self, item: ReceivedFrame, reason: str) -> None:
        f = item.frame
        self.metrics.frames_dropped_total.labels(reason).inc()
        self.metrics.lines_dropped_total.inc(f.height)
        self.accounting.count_dropped(f.height)
        self.accounting.note_not_inspected(
            f.camera, item.line, item.line + f.height, f"dropped: {reason}", seq=f.seq
        )
        self._throttled.warning(f"drop:{reason}", "frame dropped", reason=reason, seq=f.seq)
