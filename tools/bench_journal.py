#!/usr/bin/env python3
"""Event journal throughput: one fsync per event against one per tile row, side by side.

    .venv/bin/python tools/bench_journal.py [--dir runs/bench-journal] [--seconds 3]

The daemon journals every defect event before it sends it (``linescan.journal``). With
``synchronous = "full"`` each commit waits for the disk, so a burst of defects (a damaged
stretch of web) is bounded by the disk's flush rate. Events found in one stitched tile row are
committed together (``EventJournal.append_many``); this prints events/s for batches of 1 (one
transaction per event, as before), 4, 16 and 64, for ``full`` and ``normal``, on a real file
in ``--dir`` (not /tmp, which may be a RAM disk where fsync costs nothing). Each row is
measured for ``--seconds`` of wall time with the same event body (~600 bytes, a real event).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from linescan.journal import EventJournal  # noqa: E402

BODY = json.dumps(
    {
        "v": 1,
        "camera": "cam0",
        "segment": 3,
        "line_start": 120_344,
        "line_end": 120_391,
        "x_start": 1_812,
        "x_end": 1_870,
        "box": [120_344, 1_812, 120_391, 1_870],
        "area_px": 1_734,
        "peak": 0.81,
        "mean": 0.44,
        "position_m": 12.0344,
        "threshold": 0.2385,
        "model": "woven-default@3f2a9c1d0b7e",
        "t_capture_ns": 1_764_000_000_000_000_000,
        "t_receive_ns": 1_764_000_000_002_000_000,
        "latency_ms": 212.5,
        "t_publish_ns": 1_764_000_000_214_000_000,
    }
)


def rate(path: Path, synchronous: str, batch: int, seconds: float) -> float:
    """Events per second appending batches of ``batch`` for about ``seconds``."""
    if path.exists():
        path.unlink()
    for extra in ("-wal", "-shm"):
        Path(str(path) + extra).unlink(missing_ok=True)
    seq = 0
    with EventJournal(path, synchronous=synchronous) as j:  # type: ignore[arg-type]
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            j.append_many([(s, "defect", 0, BODY) for s in range(seq, seq + batch)])
            seq += batch
        elapsed = time.perf_counter() - t0
    return seq / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=ROOT / "runs" / "bench-journal")
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    path = a.dir / "journal.sqlite"
    rows = []
    try:
        for synchronous in ("full", "normal"):
            base = None
            for batch in (1, 4, 16, 64):
                r = rate(path, synchronous, batch, a.seconds)
                base = base or r
                rows.append((synchronous, batch, r, r / base))
    finally:
        shutil.rmtree(a.dir, ignore_errors=True)
    print("| synchronous | events per transaction | events/s | vs 1 per transaction |")
    print("|---|---|---|---|")
    for synchronous, batch, r, ratio in rows:
        print(f"| {synchronous} | {batch} | {r:,.0f} | {ratio:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
