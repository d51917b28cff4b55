"""Tile jobs through the engine: batches that fill across frames and cameras.

A batch goes to the engine when it holds ``inspection.max_batch`` tiles, or when its oldest
waiting job has waited ``inspection.max_wait_ms`` (and at shutdown). A job's tiles may be split
over several batches; a job goes on to the post thread, in order, once all its tiles are back.

An engine error (or a NaN/infinite reconstruction) is counted and logged, and every job of the
failed batch carries the error on: the post thread abandons its segment and the tiler restarts
the web after it, so the daemon keeps running.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from linescan.backends import Backend
from linescan.errors import EngineError
from linescan.lines import TileJob
from linescan.log import get_logger
from linescan.metrics import Metrics
from linescan.stages.flow import Flow
from linescan.stages.items import STOP, InferResult, JobQueue, ResultQueue, Stop, TileWork

F32 = npt.NDArray[np.float32]
log = get_logger("linescan.service")  # one logger name for all of the daemon's records


@dataclass
class PendingJob:
    """A tile job whose tiles are (partly) waiting for the engine."""

    camera: str
    job: TileJob
    parts: list[F32] = field(default_factory=list)  # reconstructions so far, in tile order
    tiles_done: int = 0
    arrived: float = 0.0  # time.monotonic() when its tiles began to wait

    @property
    def complete(self) -> bool:
        return self.tiles_done >= self.job.n_tiles


class Inference:
    """The inference thread: the job queue to the result queue."""

    def __init__(
        self,
        backend: Backend,
        channels: int,
        max_batch: int,
        max_wait_ms: float,
        metrics: Metrics,
        flow: Flow,
        jobs: JobQueue,
        results: ResultQueue,
        heartbeat: Callable[[], None],
    ) -> None:
        self.backend = backend
        self.channels = channels  # of the reconstruction (zeros stand in after an engine error)
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.metrics = metrics
        self.flow = flow
        self.jobs = jobs
        self.results = results
        self.heartbeat = heartbeat  # the watchdog's sign of life, once a loop

    def run(self) -> None:
        max_batch = self.max_batch
        max_wait = self.max_wait
        pending: deque[PendingJob] = deque()
        waiting_tiles = 0
        stop = False

        def deadline() -> float:
            # The oldest waiting tile's: a batch that ran does not restart the others' wait.
            return next(p.arrived for p in pending if not p.complete) + max_wait

        while True:
            self.heartbeat()
            timeout = 0.1
            if waiting_tiles:
                timeout = max(0.0, deadline() - time.monotonic())
            item: TileWork | Stop | None = None
            if not stop:
                try:
                    item = self.jobs.get(timeout=timeout) if timeout > 0 else self.jobs.get_nowait()
                except queue.Empty:
                    item = None
            if item is STOP:
                stop = True
            elif item is not None:
                pending.append(PendingJob(item.camera, item.job, arrived=time.monotonic()))
                waiting_tiles += item.job.n_tiles
            flush = stop or (waiting_tiles and time.monotonic() >= deadline())
            while waiting_tiles >= max_batch or (flush and waiting_tiles):
                waiting_tiles -= self._run_batch(pending, max_batch)
            while pending and pending[0].complete:
                done = pending.popleft()
                job = done.job
                recon = np.concatenate(done.parts) if done.parts else None
                result = InferResult(job, done.camera, recon, job.engine_error)
                self.flow.put(self.results, result, force=True)
            self.metrics.queue_depth.labels("inference").set(self.jobs.qsize())
            if stop and not pending:
                self.flow.put(self.results, STOP, force=True)
                return

    def _run_batch(self, pending: deque[PendingJob], max_batch: int) -> int:
        """Run the next ``max_batch`` waiting tiles, in job order; returns how many ran."""
        chunks: list[F32] = []
        owners: list[tuple[PendingJob, int]] = []
        room = max_batch
        for entry in pending:
            job = entry.job
            done = entry.tiles_done
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
            recon = np.zeros((len(batch), self.channels, *batch.shape[2:]), np.float32)
            error = str(exc)
        self.metrics.stage_seconds.labels("infer").observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.tiles_inferred_total.inc(len(batch))
        k = 0
        for entry, take in owners:
            entry.parts.append(recon[k : k + take])
            entry.tiles_done += take
            if error is not None:
                entry.job.engine_error = error
            k += take
        return len(batch)
