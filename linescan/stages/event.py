"""Events out: defect and status payloads, published (and journaled) by ``publish.py``.

A defect event names its camera, segment, region (``segment.py``), position on the web, the
threshold and model that found it, and its latency from capture (or receipt) of the frame
holding its last line. The events of one stitched tile row are journaled together (one fsync),
then sent.

A status message carries the running totals (``state.py``) so a subscriber can tell "no
defects" from "no data", the web lines not inspected and the web breaks since the previous
status, refused handshakes and dropped connections on the frame socket, and the queue depths.
The last one, at shutdown, says ``"final": true``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from linescan.config import Config
from linescan.lines import FrameInfo
from linescan.metrics import Metrics
from linescan.model.bundle import BundleMeta
from linescan.publish import EventPublisher
from linescan.security import AuthMonitor
from linescan.segment import Region
from linescan.stages.items import Queues
from linescan.stages.state import Accounting

OnEvent = Callable[[str, dict[str, Any]], None]  # (topic, payload), after each event is sent
FrameOfLine = Callable[[str, int], FrameInfo | None]  # (camera, web line) -> its frame


class EventSender:
    """Builds and publishes the events; called from the post thread only."""

    def __init__(
        self,
        publisher: EventPublisher,
        config: Config,
        meta: BundleMeta,
        threshold: float,
        metrics: Metrics,
        accounting: Accounting,
        queues: Queues,
        auth_monitor: AuthMonitor | None,
        on_event: OnEvent | None,
        inspection: dict[str, object] | None = None,
    ) -> None:
        self.publisher = publisher
        self.config = config
        self.meta = meta
        self.threshold = threshold
        self.metrics = metrics
        self.accounting = accounting
        self.queues = queues
        self.auth_monitor = auth_monitor
        self.on_event = on_event
        self.inspection = dict(inspection or {})  # the stride in use, and why

    def defects(
        self, camera: str, segment: int, regions: list[Region], frame_of_line: FrameOfLine
    ) -> None:
        """The events of one stitched tile row: journaled together (one fsync), then sent."""
        payloads = []
        latencies: list[float | None] = []
        now = time.time_ns()
        for r in regions:
            fi = frame_of_line(camera, r.line_end - 1)
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
        self.accounting.count_defects(len(seqs))
        if self.on_event is not None:
            for seq, payload in zip(seqs, payloads, strict=True):
                self.on_event("defect", {"seq": seq, **payload})

    def status(self, final: bool, web: dict[str, dict[str, int | None]] | None = None) -> None:
        """The running totals; the not-inspected ranges and breaks since the last status; the
        web's edges per camera (camera pixels) where they are tracked."""
        auth = self.auth_monitor
        queues = self.queues.depths()
        t = self.accounting.take_for_status()
        payload: dict[str, Any] = {
            "final": final,
            "frames_received": t.frames_received,
            "frames_inspected": t.frames_inspected,
            "frames_dropped": t.frames_dropped,
            "frames_rejected": t.frames_rejected,
            "rejected_by_reason": t.rejected_by_reason,
            "lines_received": t.lines_received,
            "lines_inspected": t.lines_inspected,
            "lines_dropped": t.lines_dropped,
            "defects": t.defects,
            "segments": t.segments,
            "sequence_gaps": t.gaps,
            "auth_failures": 0 if auth is None else auth.total(),
            "disconnects": 0 if auth is None else auth.disconnects,
            "not_inspected": t.not_inspected,
            "breaks": t.breaks,
            "queues": queues,
            "web": dict(web or {}),
            "inspection": self.inspection,
        }
        self.publisher.publish("status", payload)
        if self.on_event is not None:
            self.on_event("status", payload)
