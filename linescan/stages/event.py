"""Events out: defect and status payloads, published (and journaled) by ``publish.py``.

A defect event names its camera, segment, region (``segment.py``), position on the web, the
threshold and model that found it, and its latency from capture (or receipt) of the frame
holding its last line. The events of one stitched tile row are journaled together (one fsync),
then sent.

A defect event also names its picture (``image``: ``/defects/SEQ.png`` on the HTTP port, null
when pictures are off; the crop follows when the rows around the region are there, see
``crops.py``) and, from the third defect of a repeating series on, ``repeat`` (``repeats.py``).

A status message carries the running totals (``state.py``) so a subscriber can tell "no
defects" from "no data", the web lines not inspected and the web breaks since the previous
status, refused handshakes and dropped connections on the frame socket, and the queue depths;
each camera's segment, its first line, the line it has reached and its width (``cameras``);
and the active repeating series (``repeats``). The last one, at shutdown, says
``"final": true``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from linescan.config import Config
from linescan.crops import Crop
from linescan.lines import FrameInfo
from linescan.live import LiveView
from linescan.log import get_logger
from linescan.metrics import Metrics
from linescan.model.bundle import BundleMeta
from linescan.pictures import PictureWriter, Roll
from linescan.publish import EventPublisher
from linescan.repeats import RepeatFinder
from linescan.security import AuthMonitor
from linescan.segment import Region
from linescan.stages.items import Queues
from linescan.stages.state import Accounting

log = get_logger("linescan.service")

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
        pictures: PictureWriter | None = None,
        view: LiveView | None = None,
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
        self.pictures = pictures
        self.view = view
        lpm = config.inspection.lines_per_metre
        self.repeats = RepeatFinder(config.repeats, lpm) if config.repeats.enabled else None
        self.run_ns = time.time_ns()  # names this daemon's segments in the roll records
        self._first_seen: dict[tuple[str, int], int] = {}  # (camera, segment) -> first status
        self.inspection = dict(inspection or {})  # the stride in use, and why

    def defects(
        self,
        camera: str,
        segment: int,
        regions: list[Region],
        frame_of_line: FrameOfLine,
        pictures: bool = False,
    ) -> list[int]:
        """The events of one stitched tile row: journaled together (one fsync), then sent;
        returns their ``seq``.

        With ``pictures`` each event names its picture (``/defects/SEQ.png``: this thread alone
        publishes defects, so the next ``seq`` is known), and the picture thread expects it
        before the event is sent: a client that asks for a picture at once waits for it
        rather than missing it. ``picture`` delivers the crop.
        """
        payloads: list[dict[str, Any]] = []
        latencies: list[float | None] = []
        now = time.time_ns()
        base = self.publisher.next_seq
        images: list[str | None] = [None] * len(regions)
        if pictures and self.pictures is not None:
            for i in range(len(regions)):
                self.pictures.expect(base + i)
                images[i] = f"/defects/{base + i}.png"
        for r, image in zip(regions, images, strict=True):
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
                    "image": image,
                }
            )
        if self.repeats is not None:
            # in web order, so that a series is seen as it runs down the web
            for i in sorted(range(len(regions)), key=lambda i: regions[i].line_start):
                repeat = self.repeats.observe(camera, base + i, regions[i])
                if repeat is not None:
                    payloads[i]["repeat"] = repeat
                    self.metrics.repeating_defects_total.labels(camera).inc()
        t0 = time.perf_counter()
        seqs = self.publisher.publish_many("defect", payloads)
        if seqs and seqs[0] != base:  # pragma: no cover - only this thread publishes defects
            log.error("defect seq not as expected: pictures are misnamed", want=base, got=seqs)
        self.metrics.stage_seconds.labels("publish").observe(time.perf_counter() - t0)
        for latency_ms in latencies:
            if latency_ms is not None:
                self.metrics.latency_seconds.observe(latency_ms / 1000.0)
        self.metrics.defects_total.labels(camera).inc(len(seqs))
        self.accounting.count_defects(len(seqs))
        if self.on_event is not None:
            for seq, payload in zip(seqs, payloads, strict=True):
                self.on_event("defect", {"seq": seq, **payload})
        return seqs

    def picture(self, seq: int, crop: Crop | None) -> None:
        """The crop of event ``seq`` to the picture thread; None: its lines were gone."""
        if self.pictures is None:
            return
        if crop is None:
            self.pictures.cancel(seq)
            self.metrics.pictures_total.labels("missing").inc()
        else:
            self.pictures.submit(seq, crop)  # a full queue skips it (counted)

    def status(
        self,
        final: bool,
        web: dict[str, dict[str, int | None]] | None = None,
        cameras: dict[str, dict[str, int]] | None = None,
    ) -> None:
        """The running totals; the not-inspected ranges and breaks since the last status; the
        web's edges per camera (camera pixels) where they are tracked; where each camera's
        segment is (``cameras``) and the active repeating series."""
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
            "cameras": dict(cameras or {}),
            "repeats": self._repeats(cameras or {}),
            "inspection": self.inspection,
        }
        status_seq = self.publisher.publish("status", payload)
        if self.view is not None:
            self.view.status({"status_seq": status_seq, "t_publish_ns": time.time_ns(), **payload})
        if self.pictures is not None:
            for roll in self._rolls(cameras or {}, web or {}):
                self.pictures.roll(roll)
        if self.on_event is not None:
            self.on_event("status", payload)

    def _repeats(self, cameras: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
        if self.repeats is None:
            return []
        now = {cam: info["line"] for cam, info in cameras.items()}
        active = self.repeats.describe(now)
        counts = dict.fromkeys(cameras, 0)
        for series in active:
            counts[series["camera"]] = counts.get(series["camera"], 0) + 1
        for cam, n in counts.items():
            self.metrics.repeating_series.labels(cam).set(n)
        return active

    def _rolls(
        self, cameras: dict[str, dict[str, int]], web: dict[str, dict[str, int | None]]
    ) -> list[Roll]:
        """How far each camera's segment has come, for the report's defects per metre."""
        ins = self.config.inspection
        now = time.time_ns()
        out = []
        for cam, info in cameras.items():
            first = self._first_seen.setdefault((cam, info["segment"]), now)
            edges = web.get(cam) or {}
            left, right = edges.get("left_px"), edges.get("right_px")
            web_px = None
            if left is not None or right is not None:
                web_px = int((right if right is not None else info["width_px"]) - (left or 0))
            out.append(
                Roll(
                    run=self.run_ns,
                    camera=cam,
                    segment=info["segment"],
                    line_start=info["line_start"],
                    line_end=info["line"],
                    width_px=info["width_px"],
                    web_px=web_px,
                    lines_per_metre=ins.lines_per_metre,
                    pixels_per_metre=ins.pixels_per_metre or ins.lines_per_metre,
                    t_first_ns=first,
                    t_last_ns=now,
                )
            )
        if len(self._first_seen) > 4096:  # segments long gone: forget the oldest
            for key in list(self._first_seen)[:2048]:
                del self._first_seen[key]
        return out
