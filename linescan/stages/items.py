"""What travels on the daemon's queues: one typed item per hop, and the stop sentinel.

    receiver ──ReceivedFrame──▶ tiler ──TileWork──▶ inference ──InferResult──▶ post

Every queue is bounded (``[queues]`` in the config). At shutdown, or when a thread fails, each
stage passes ``STOP`` down its output queue after its last item, so the next stage drains what
is queued and stops in turn.
"""

from __future__ import annotations

import contextlib
import enum
import queue
from dataclasses import dataclass
from typing import Final, TypeAlias

import numpy as np
import numpy.typing as npt

from linescan.config import QueuesConfig
from linescan.ingest import Frame
from linescan.lines import TileJob

F32 = npt.NDArray[np.float32]


class Stop(enum.Enum):
    """The type of the stop sentinel: an enum of one member, so that mypy tells it from an item."""

    STOP = "stop"


STOP: Final = Stop.STOP  # passed down the queues at shutdown


@dataclass(frozen=True)
class ReceivedFrame:
    """A validated frame with its absolute line and whether the web broke before it."""

    frame: Frame
    line: int
    break_before: str | None  # why the segment must restart before this frame, if it must


@dataclass(frozen=True)
class TileWork:
    """One tile job of a camera's band, on its way to the engine."""

    camera: str
    job: TileJob


@dataclass(frozen=True)
class InferResult:
    """A tile job back from the engine: its reconstruction, or the engine's error."""

    job: TileJob
    camera: str
    recon: F32 | None  # None: the job carried no tiles (only model rows)
    error: str | None = None


FrameQueue: TypeAlias = "queue.Queue[ReceivedFrame | Stop]"
JobQueue: TypeAlias = "queue.Queue[TileWork | Stop]"
ResultQueue: TypeAlias = "queue.Queue[InferResult | Stop]"


@dataclass(frozen=True)
class Queues:
    """The three bounded queues between the four threads, by the names the metrics use."""

    frames: FrameQueue  # receiver -> tiler ("ingest")
    jobs: JobQueue  # tiler -> inference: tile rows for the engine ("inference")
    results: ResultQueue  # inference -> post: reconstructed rows ("publish")

    @classmethod
    def bounded(cls, sizes: QueuesConfig) -> Queues:
        return cls(
            queue.Queue(sizes.ingest), queue.Queue(sizes.inference), queue.Queue(sizes.publish)
        )

    def depths(self) -> dict[str, int]:
        """Items waiting in each queue, as status messages report them."""
        return {
            "ingest": self.frames.qsize(),
            "inference": self.jobs.qsize(),
            "publish": self.results.qsize(),
        }

    def wake_all(self) -> None:
        """Put ``STOP`` in every queue with room, without waiting: whoever waits on one wakes."""
        for put in (self.frames.put_nowait, self.jobs.put_nowait, self.results.put_nowait):
            with contextlib.suppress(queue.Full):
                put(STOP)
