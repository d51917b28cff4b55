"""Reconstructions to regions: a ``Tracker`` per camera (``tracker.py``), frame accounting.

The post thread stitches each job's reconstruction into its segment's tracker, which turns
final rows into residual, mask and regions; regions of at least ``inspection.min_area_px``
become defect events (``event.py``). It also decides what became of every frame:

* inspected, once its segment has held a whole tile row (before that it is not yet known
  whether the segment will be long enough to inspect at all);
* dropped, when its segment ended shorter than one tile, or when the engine failed on its
  segment (the rest of that segment is abandoned; the tiler restarts the web after it).

Frame latency is observed when every line of a frame is final. A status message goes out every
``events.status_interval_s``, and a final one at shutdown.

With the engine on a CUDA device and an SSIM-based residual, 1 - SSIM runs on the GPU (the fused
kernel in ``backends/ssim_residual.cu``), in this thread; the score (``score.py``) is the same
arithmetic on either.

The web's edges each tracker follows (``web.py``) go into every status message (``web``) and
the ``linescan_web_edge_px`` gauge; where each camera's segment is, into ``cameras``.

With ``[pictures]`` on, a ``Cropper`` (``crops.py``) keeps each camera's recent lines (from
the jobs) and score rows (recorded by the tracker's scoring), and cuts a crop around every
region found once the rows around it are there, for its picture.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from linescan.config import Config
from linescan.crops import Cropper
from linescan.errors import EngineError
from linescan.lines import FrameInfo
from linescan.log import get_logger
from linescan.metrics import Metrics
from linescan.model.bundle import BundleMeta
from linescan.pipeline import model_columns
from linescan.residual import COMPONENTS
from linescan.segment import PAPER_DIAMETER
from linescan.stages.event import EventSender
from linescan.stages.items import STOP, InferResult, ResultQueue
from linescan.stages.state import Accounting
from linescan.tiling import TileGrid
from linescan.tracker import ResidualFn, Tracker

F32 = npt.NDArray[np.float32]
log = get_logger("linescan.service")  # one logger name for all of the daemon's records


class Post:
    """The post thread: the result queue to defect and status events. Not thread-safe: all of
    its state belongs to the one thread that runs it."""

    def __init__(
        self,
        config: Config,
        meta: BundleMeta,
        grid: TileGrid,
        threshold: float,
        metrics: Metrics,
        accounting: Accounting,
        results: ResultQueue,
        events: EventSender,
        heartbeat: Callable[[], None],
        cropper: Cropper | None = None,
    ) -> None:
        self.config = config
        self.meta = meta
        self.grid = grid
        self.threshold = threshold
        self.metrics = metrics
        self.accounting = accounting
        self.results = results
        self.events = events
        self.heartbeat = heartbeat  # the watchdog's sign of life, once a loop
        self._trackers: dict[str, Tracker] = {}
        self._broken: dict[int, str] = {}  # segments abandoned after an engine failure, and why
        self._frames_seen: dict[str, deque[FrameInfo]] = {}  # recent frames, for event latency
        self._uncounted: dict[str, list[FrameInfo]] = {}  # not yet known inspected or dropped
        self._not_final: dict[str, deque[FrameInfo]] = {}  # frames with lines not yet final
        self._residual_cache: tuple[ResidualFn | None] | None = None
        ins = config.inspection
        columns = None
        if ins.web_left_px is not None or ins.web_right_px is not None:
            columns = model_columns((ins.web_left_px, ins.web_right_px), meta.input)
        self.scoring = meta.scoring(columns)
        if ins.opening_px == "paper":
            self.opening = PAPER_DIAMETER
        elif ins.opening_px is not None:
            self.opening = max(1, round(ins.opening_px / meta.input.downscale))
        else:
            self.opening = meta.opening
        self._described: set[tuple[str, int]] = set()
        self.web: dict[str, dict[str, int | None]] = {}  # camera -> its web edges, camera px
        self.cameras: dict[str, dict[str, int]] = {}  # camera -> where its segment is
        self.cropper = cropper  # pictures of defects: recent lines and scores per camera

    def run(self) -> None:
        interval = self.config.events.status_interval_s
        next_status = time.monotonic() + interval
        while True:
            try:
                item = self.results.get(timeout=min(0.1, interval))
            except queue.Empty:
                item = None
            self.heartbeat()
            if item is STOP:
                for cam in [] if self.cropper is None else self.cropper.cameras():
                    self._pictures(cam, ended=True)  # every crop still owed
                self.events.status(final=True, web=self.web, cameras=self.cameras)
                return
            if item is not None:
                self._post_one(item)
            if time.monotonic() >= next_status:
                self.events.status(final=False, web=self.web, cameras=self.cameras)
                next_status = time.monotonic() + interval

    def _post_one(self, res: InferResult) -> None:
        job, cam = res.job, res.camera
        trackers, broken = self._trackers, self._broken
        tr = trackers.get(cam)
        if tr is None or tr.segment != job.segment:
            scoring = self.scoring
            if self.cropper is not None:
                self._pictures(cam, ended=True)  # the crops the old segment still owes
                scoring = self.cropper.scoring(cam, job.segment, job.line0, scoring)
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
                scoring=scoring,
                opening=self.opening,
            )
            trackers[cam] = tr
            if (cam, tr.width) not in self._described:
                self._described.add((cam, tr.width))
                log.info(
                    "scoring",
                    camera=cam,
                    score=self.scoring.describe(tr.width),
                    threshold=self.threshold,
                    opening_model_px=self.opening,
                )
        if res.error is not None and job.segment not in broken:
            broken[job.segment] = res.error
            self.accounting.fail_segment(job.segment)  # the tiler restarts the web after it
        frames = job.frames
        if job.segment in broken:
            # the segment's later jobs ran fine (res.error is None): name the failure that broke it
            why = f"engine error: {broken[job.segment]}"
            for fi in [*self._uncounted.pop(cam, []), *frames]:
                self._count_frame(fi, inspected=False, why=why)
            if job.end:
                self._pictures(cam, ended=True)
                trackers.pop(cam, None)
                del broken[job.segment]  # its last job: nothing more will come for it
            return
        if self.cropper is not None:
            self.cropper.add_lines(cam, job.raw)
        t0 = time.perf_counter()
        regions = tr.consume(job, res.recon)
        self.metrics.stage_seconds.labels("stitch").observe(time.perf_counter() - t0)
        self._note_edges(cam, tr)
        self.cameras[cam] = {
            "segment": tr.segment,
            "line_start": tr.line0,
            "line": tr.line0 + tr.raw_lines,
            "width_px": tr.raw_width,
        }
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
            pictures = self.cropper is not None
            seqs = self.events.defects(cam, job.segment, found, self._frame_of_line, pictures)
            if self.cropper is not None:
                for seq, region in zip(seqs, found, strict=True):
                    self.cropper.want(cam, seq, region)
        self._pictures(cam, ended=tr.ended)
        if job.end:
            trackers.pop(cam, None)

    def _pictures(self, cam: str, ended: bool) -> None:
        """The crops of ``cam`` whose rows are there (all of them once its segment ended)."""
        if self.cropper is not None:
            for seq, crop in self.cropper.due(cam, ended):
                self.events.picture(seq, crop)

    def _note_edges(self, cam: str, tr: Tracker) -> None:
        """The web's edges for the status message and the metric (camera pixels)."""
        if not tr.edges.active:
            return
        n = self.meta.input.downscale
        e = tr.latest_edges
        edges: dict[str, int | None] = {
            "left_px": None if e.left is None else e.left * n,
            "right_px": None if e.right is None else min(e.right * n, tr.raw_width),
            "line": tr.line0 + tr.x.end * n,
        }
        self.web[cam] = edges
        for side in ("left", "right"):
            v = edges[f"{side}_px"]
            if v is not None:
                self.metrics.web_edge_px.labels(cam, side).set(v)

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
        if device.startswith("cuda") and "dssim" in COMPONENTS[self.meta.residual]:
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
        if inspected:
            self.accounting.count_inspected(fi.lines)
            self.metrics.lines_inspected_total.inc(fi.lines)
        else:
            self.accounting.count_dropped(fi.lines)
            self.metrics.frames_dropped_total.labels(reason).inc()
            self.metrics.lines_dropped_total.inc(fi.lines)
            self.accounting.note_not_inspected(
                fi.camera, fi.line_start, fi.line_start + fi.lines, why
            )

    def _frame_of_line(self, camera: str, line: int) -> FrameInfo | None:
        for fi in reversed(self._frames_seen.get(camera, ())):
            if fi.line_start <= line < fi.line_start + fi.lines:
                return fi
        return None
