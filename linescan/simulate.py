"""A line-scan camera simulator: frames over ZeroMQ at a set line rate, with planted defects.

It feeds the daemon exactly as a camera or frame grabber would (``ingest.py``'s wire format),
from a synthetic woven web (``data.synthetic.WovenWeb`` with defects planted at known positions)
or from image files stacked into one web. The positions of planted defects are known up front,
so the demo and the end-to-end tests can say "planted N, found M".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import zmq

from linescan.data.images import read_grey
from linescan.data.synthetic import Defect, WovenWeb, plant_defects, random_defects
from linescan.ingest import encode_frame


@dataclass(frozen=True)
class WebSource:
    """Where the simulator's lines come from: a function of (start, count)."""

    width: int
    total_lines: int
    render: Callable[[int, int], npt.NDArray[np.generic]]
    defects: tuple[Defect, ...] = ()


def synthetic_source(
    width: int,
    total_lines: int,
    defects: int,
    seed: int = 0,
    min_size: int = 10,
    max_size: int = 40,
    margin: int = 200,
    thread_width: tuple[int, int] = (8, 12),
) -> WebSource:
    """A woven web with ``defects`` planted at random, well separated positions.

    Broken threads are ``thread_width`` px wide: about one thread of the weave (the default
    model works at 1/2 scale, where its opening erases anything under ~8 camera pixels).
    """
    web = WovenWeb(width, seed)
    rng = np.random.default_rng(seed + 1)
    planted: list[Defect] = []
    if defects:
        planted = random_defects(
            rng,
            width,
            margin,
            max(margin + 1, total_lines - margin),
            defects,
            min_size,
            max_size,
            thread_width=thread_width,
        )

    def render(start: int, count: int) -> npt.NDArray[np.generic]:
        block = web.lines(start, count)
        plant_defects(block, start, planted)
        return block

    return WebSource(width, total_lines, render, tuple(planted))


def image_source(paths: Sequence[Path], repeat: int = 1) -> WebSource:
    """Images stacked top to bottom (all of one width) into one web, repeated."""
    imgs = [read_grey(p) for p in paths]
    widths = {i.shape[1] for i in imgs}
    if len(widths) != 1:
        raise ValueError(f"images must share one width to form a web, got widths {sorted(widths)}")
    web = np.concatenate(imgs * repeat, axis=0)

    def render(start: int, count: int) -> npt.NDArray[np.generic]:
        return web[start : start + count]

    return WebSource(web.shape[1], web.shape[0], render)


def frames(source: WebSource, frame_height: int) -> Iterator[tuple[int, npt.NDArray[np.generic]]]:
    """(first line, pixels) blocks of ``frame_height`` lines (the last may be shorter)."""
    for start in range(0, source.total_lines, frame_height):
        count = min(frame_height, source.total_lines - start)
        yield start, source.render(start, count)


@dataclass
class SendStats:
    frames: int = 0
    lines: int = 0
    seconds: float = 0.0
    late_s: float = 0.0  # how far the sender fell behind the line rate at worst


def send_web(
    endpoint: str,
    source: WebSource,
    frame_height: int = 256,
    line_rate_hz: float = 0.0,
    camera: str = "cam0",
    first_seq: int = 0,
    end: bool = True,
    bind: bool = False,
    context: zmq.Context[zmq.Socket[bytes]] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SendStats:
    """Send the whole web as frames, paced at ``line_rate_hz`` (0: as fast as accepted).

    PUSH connects to the daemon's PULL (the default), or binds when ``bind`` is set.
    The last frame carries ``end`` so the daemon closes the segment and publishes its tail.
    """
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.setsockopt(zmq.SNDHWM, 16)
    if bind:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    stats = SendStats()
    t0 = time.monotonic()
    try:
        seq = first_seq
        for start, block in frames(source, frame_height):
            if should_stop is not None and should_stop():
                break
            if line_rate_hz > 0:
                due = t0 + start / line_rate_hz
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
                else:
                    stats.late_s = max(stats.late_s, now - due)
            last = start + len(block) >= source.total_lines
            msg = encode_frame(
                camera, seq, block, t_capture_ns=time.time_ns(), line=start, end=end and last
            )
            sock.send_multipart(msg, copy=False)
            seq += 1
            stats.frames += 1
            stats.lines += len(block)
    finally:
        stats.seconds = time.monotonic() - t0
        sock.close()
    return stats
