"""Lines to tile jobs: a ``Band`` per camera (``lines.py``), and where the web breaks.

A dropped frame, a gap in the frame ``seq``, a camera restart, an engine failure or a width
change breaks the web: the current segment is closed (its last tile row is edge-aligned, its
open regions are published) and a new one starts; nothing is stitched across a hole. A frame
flagged ``end`` closes its segment after its lines. Every break is named in the next status
message.
"""

from __future__ import annotations

import time

from linescan.lines import Band, FrameInfo, TileJob
from linescan.metrics import Metrics
from linescan.model.bundle import BundleMeta
from linescan.stages.flow import Flow
from linescan.stages.items import STOP, FrameQueue, JobQueue, TileWork
from linescan.stages.state import Accounting
from linescan.tiling import TileGrid


class Tiler:
    """The tiler thread: the frame queue to the job queue. Blocks on its queues by design."""

    def __init__(
        self,
        meta: BundleMeta,
        grid: TileGrid,
        metrics: Metrics,
        accounting: Accounting,
        flow: Flow,
        frames: FrameQueue,
        jobs: JobQueue,
        keep_raw: bool = False,
    ) -> None:
        self.meta = meta
        self.grid = grid
        self.metrics = metrics
        self.accounting = accounting
        self.flow = flow
        self.frames = frames
        self.jobs = jobs
        self.keep_raw = keep_raw  # hand the camera lines on, for pictures of defects
        self._segment_counter = 0  # segment ids, unique across cameras

    def run(self) -> None:
        bands: dict[str, Band] = {}
        band: Band | None
        while True:
            item = self.frames.get()
            self.metrics.queue_depth.labels("ingest").set(self.frames.qsize())
            if item is STOP:
                for cam, band in bands.items():
                    self._send_jobs(cam, band.end())
                self.flow.put(self.jobs, STOP, force=True)
                return
            t0 = time.perf_counter()
            f = item.frame
            cam = f.camera
            band = bands.get(cam)
            brk = item.break_before
            if band is not None and brk is None and item.line != band.line0 + band.raw_lines:
                brk = "dropped"  # the receiver dropped frames: a hole in the web
            if (
                band is not None
                and brk is None
                and self.accounting.take_failed_segment(band.segment)
            ):
                brk = "engine"  # inspection restarts after an engine failure
            if band is not None and (brk is not None or band.raw_width != f.width):
                self._send_jobs(cam, band.end())
                self.accounting.note_break(cam, item.line, brk or "width")
                band = None
            if band is None:
                self._segment_counter += 1
                self.metrics.segments_total.inc()
                self.accounting.count_segment()
                band = Band(
                    self._segment_counter,
                    self.meta.input,
                    self.grid,
                    f.width,
                    item.line,
                    keep_raw=self.keep_raw,
                )
                bands[cam] = band
            info = FrameInfo(cam, f.seq, item.line, f.height, f.t_capture_ns, f.t_receive_ns)
            jobs = band.push(f.pixels, info)
            if f.end:
                jobs += band.end()
                del bands[cam]
                self.accounting.note_break(cam, item.line + f.height, "end")
            self.metrics.stage_seconds.labels("band").observe(time.perf_counter() - t0)
            self._send_jobs(cam, jobs)

    def _send_jobs(self, camera: str, jobs: list[TileJob]) -> None:
        for job in jobs:
            self.flow.put(self.jobs, TileWork(camera, job), force=True)
        self.metrics.queue_depth.labels("inference").set(self.jobs.qsize())
