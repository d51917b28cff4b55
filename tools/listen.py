"""Event listener: prints or records a linescan daemon's events and detects lost ones.

A thin command-line shell around ``linescan.listen``: subscribes to the daemon's event
endpoint, prints every event as one JSON line (``{"topic": ..., **body}``) on stdout,
optionally appends them to a file, and checks the sequence numbers with ``LossTracker``
(a jump in a defect ``seq``, or a status ``last_seq`` ahead of the last defect seen, is a lost
defect event). On Ctrl-C, or after ``--timeout`` seconds without an event, it prints a loss
summary on stderr and exits 1 if defect events were lost, else 0.

Usage:

    python tools/listen.py --endpoint tcp://127.0.0.1:5556
    python tools/listen.py --topic defect --record events.jsonl --quiet
    python tools/listen.py --timeout 10        # stop after 10 idle seconds
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq

from linescan.listen import LossTracker, listen


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="listen", description="Print or record linescan events; detect lost events."
    )
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:5556", help="daemon event endpoint")
    ap.add_argument(
        "--topic",
        action="append",
        choices=["defect", "status"],
        default=None,
        help="subscribe to this topic (repeat for both; default: both)",
    )
    ap.add_argument("--record", type=Path, default=None, help="append events as JSON lines")
    ap.add_argument(
        "--timeout", type=float, default=None, help="stop after this many seconds without events"
    )
    ap.add_argument("--quiet", action="store_true", help="do not print events")
    return ap


def summary(tracker: LossTracker, defects: int, statuses: int) -> str:
    gaps = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in tracker.gaps) or "none"
    return (
        f"received {defects} defect and {statuses} status events; lost {tracker.lost_defects} "
        f"defect event(s) (missing seq: {gaps}) and {tracker.lost_status} status message(s)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    topics = tuple(a.topic) if a.topic else ("defect", "status")
    # listen() keeps its own tracker; this one survives a Ctrl-C for the summary
    tracker = LossTracker()
    counts = {"defect": 0, "status": 0}
    record = a.record.open("a", encoding="utf-8") if a.record else None

    def on_event(topic: str, body: dict[str, Any]) -> bool:
        tracker.feed(topic, body)
        counts[topic] = counts.get(topic, 0) + 1
        line = json.dumps({"topic": topic, **body}, separators=(",", ":"))
        if not a.quiet:
            print(line, flush=True)
        if record is not None:
            record.write(line + "\n")
            record.flush()
        return False

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        listen(a.endpoint, on_event, topics, timeout_s=a.timeout, context=ctx)
    except KeyboardInterrupt:
        pass
    finally:
        ctx.term()
        if record is not None:
            record.close()
    print(summary(tracker, counts["defect"], counts["status"]), file=sys.stderr)
    return 1 if tracker.lost_defects else 0


if __name__ == "__main__":
    sys.exit(main())
