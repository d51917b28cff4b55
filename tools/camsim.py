"""Line-scan camera simulator: sends a web to a linescan daemon as camera frames over ZeroMQ.

A thin command-line shell around ``linescan.simulate``: a synthetic woven web with defects
planted at random (reproducible from ``--seed``) or image files stacked top to bottom into one
web, cut into frames of ``--frame-height`` lines and sent at ``--line-rate`` lines per second
in the daemon's frame wire format (``linescan.ingest``). The last frame carries ``end``.

Output, one JSON object per line on stdout: first every planted defect (its box in absolute
web coordinates, ends exclusive, as defect events report them), then the send statistics.

Usage:

    # a 2048-px web of 24,000 lines with 8 defects, at 3000 lines/s, to a local daemon
    python tools/camsim.py --endpoint tcp://127.0.0.1:5555 --width 2048 --lines 24000 \\
        --frame-height 256 --line-rate 3000 --defects 8 --seed 7

    # image files stacked into one web, as fast as the daemon takes them
    python tools/camsim.py --images roll1.png roll2.png --line-rate 0

    # bind instead of connect (the daemon's [frames] bind = false connects to us)
    python tools/camsim.py --bind --endpoint tcp://*:5555
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import zmq

from linescan.errors import LinescanError
from linescan.simulate import WebSource, image_source, send_web, synthetic_source


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="camsim", description="Send a synthetic or image web to linescan as camera frames."
    )
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="daemon frame endpoint")
    ap.add_argument("--width", type=int, default=2048, help="pixels per line (synthetic web)")
    ap.add_argument("--lines", type=int, default=24_000, help="web length (synthetic web)")
    ap.add_argument("--frame-height", type=int, default=256, help="lines per frame")
    ap.add_argument(
        "--line-rate", type=float, default=3000.0, help="lines per second (0: as fast as taken)"
    )
    ap.add_argument("--defects", type=int, default=8, help="defects to plant (synthetic web)")
    ap.add_argument("--seed", type=int, default=7, help="web texture and defect positions")
    ap.add_argument(
        "--images",
        type=Path,
        nargs="+",
        default=None,
        metavar="FILE",
        help="stack these images (one width) into the web instead of a synthetic one",
    )
    ap.add_argument("--camera", default="cam0", help="camera name in the frame headers")
    ap.add_argument("--first-seq", type=int, default=0, help="seq of the first frame")
    ap.add_argument("--bind", action="store_true", help="bind the endpoint instead of connecting")
    return ap


def make_source(a: argparse.Namespace) -> WebSource:
    if a.images:
        return image_source(a.images)
    return synthetic_source(a.width, a.lines, a.defects, seed=a.seed)


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.frame_height < 1 or a.line_rate < 0:
        print("camsim: --frame-height must be >= 1 and --line-rate >= 0", file=sys.stderr)
        return 2
    try:
        source = make_source(a)
    except (LinescanError, OSError, ValueError) as exc:
        print(f"camsim: {exc}", file=sys.stderr)
        return 2
    for d in source.defects:
        box = {"line_start": d.line, "line_end": d.line_end, "x_start": d.x, "x_end": d.x_end}
        print(json.dumps({"planted": d.kind, **box}), flush=True)
    # Our own context: terminating it waits (up to the socket's linger) until the last frames
    # are on the wire, so exiting right after sending loses nothing.
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        stats = send_web(
            a.endpoint,
            source,
            frame_height=a.frame_height,
            line_rate_hz=a.line_rate,
            camera=a.camera,
            first_seq=a.first_seq,
            bind=a.bind,
            context=ctx,
        )
    except KeyboardInterrupt:
        print("camsim: interrupted", file=sys.stderr)
        return 130
    finally:
        ctx.term()
    print(
        json.dumps(
            {
                "sent_frames": stats.frames,
                "sent_lines": stats.lines,
                "width": source.width,
                "seconds": round(stats.seconds, 3),
                "lines_per_s": round(stats.lines / max(stats.seconds, 1e-9), 1),
                "late_s": round(stats.late_s, 3),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
