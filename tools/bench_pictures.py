#!/usr/bin/env python3
"""What keeping defect pictures costs the daemon: pictures off and on, side by side, one run.

    .venv/bin/python tools/bench_pictures.py [--rounds 3] [--lines 8192] [--width 4096]
                                             [--defects 32] [--model BUNDLE] [--json FILE]

Runs the real daemon (the bundled model unless ``--model``, ZeroMQ on loopback, the engine's
thread plan as ``linescan serve`` sets it) on the simulator's woven web with ``--defects``
planted defects, as fast as it accepts frames (``queues.overload = "block"``), alternately with
``[pictures] enabled = false`` and ``true``, ``--rounds`` times each, so that a machine whose
load drifts (shared cores) drifts under both alike. For each run: lines/s from the first frame
sent to the last one inspected, the post thread's time in the tracker (``stitch``: with
pictures on it includes recording score rows), the post thread's time for crops (keeping
lines, noting regions, cutting windows: timed around the cropper's calls), the picture
thread's time (drawing and storing PNGs, its own thread), the rings' memory and the pictures'
bytes. Prints a table (medians) and writes JSON with every run.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from linescan.threads import configure_threads  # noqa: E402

PLAN = configure_threads(None)  # as `linescan serve` does, before torch is imported

from linescan import crops  # noqa: E402
from linescan.backends import create_backend  # noqa: E402
from linescan.config import Config  # noqa: E402
from linescan.demo import default_bundle_path  # noqa: E402
from linescan.model.bundle import load_bundle  # noqa: E402
from linescan.service import Daemon  # noqa: E402
from linescan.simulate import send_web, synthetic_source  # noqa: E402


class CropClock:
    """Time spent in the cropper's calls on the post thread (patched in for the bench only)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.peak_bytes = 0
        self._originals: dict[str, Callable[..., Any]] = {}

    def install(self) -> None:
        for name in ("add_lines", "want", "due", "scoring"):
            original = getattr(crops.Cropper, name)
            self._originals[name] = original
            setattr(crops.Cropper, name, self._timed(original))
        original_display = crops.display_scores
        self._originals["display_scores"] = original_display
        crops.display_scores = self._timed(original_display)  # type: ignore[assignment]

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                if args and isinstance(args[0], crops.Cropper):
                    self.peak_bytes = max(self.peak_bytes, args[0].nbytes())

        return run


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_run(
    bundle: Path, backend: Any, pictures: bool, lines: int, width: int, defects: int, seed: int
) -> dict[str, Any]:
    meta = load_bundle(bundle).meta
    config = Config().with_overrides(
        {
            "model": {"bundle": bundle.absolute()},
            "frames": {"endpoint": f"tcp://127.0.0.1:{_port()}"},
            "events": {"endpoint": f"tcp://127.0.0.1:{_port()}", "status_interval_s": 0.05},
            "metrics": {"enabled": False},
            "queues": {"overload": "block"},
            "journal": {"enabled": False},
            "pictures": {"enabled": pictures},
        }
    )
    source = synthetic_source(width, lines, defects, seed=seed)
    frames = -(-lines // 256)
    done = threading.Event()
    events: list[dict[str, Any]] = []

    def on_event(topic: str, body: dict[str, Any]) -> None:
        if topic == "defect":
            events.append(body)
        elif body["frames_received"] >= frames and (
            body["frames_inspected"] + body["frames_dropped"] >= body["frames_received"]
        ):
            done.set()

    clock = CropClock()
    daemon = Daemon(config, meta, backend, on_event=on_event)
    daemon.start()
    if pictures:
        clock.install()
    try:
        t0 = time.perf_counter()
        send_web(daemon.frames_endpoint, source, frame_height=256, line_rate_hz=0.0)
        if not done.wait(300):
            raise RuntimeError("the daemon did not inspect every frame within 300 s")
        seconds = time.perf_counter() - t0
    finally:
        daemon.stop()
        daemon.join(60)
        for name, fn in clock._originals.items():
            if name == "display_scores":
                crops.display_scores = fn  # type: ignore[assignment]
            else:
                setattr(crops.Cropper, name, fn)
    get = daemon.registry.get_sample_value
    return {
        "pictures": pictures,
        "lines": lines,
        "seconds": seconds,
        "lines_per_s": lines / seconds,
        "defects": len(events),
        "pictures_stored": get("linescan_pictures_total", {"result": "stored"}) or 0.0,
        "picture_bytes": get("linescan_picture_bytes_total") or 0.0,
        "stitch_s": get("linescan_stage_seconds_sum", {"stage": "stitch"}) or 0.0,
        "crop_s": clock.seconds,
        "picture_thread_s": get("linescan_stage_seconds_sum", {"stage": "picture"}) or 0.0,
        "ring_bytes_peak": clock.peak_bytes,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lines", type=int, default=8192)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--defects", type=int, default=32)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    bundle = a.model or default_bundle_path()
    b = load_bundle(bundle)
    backend = create_backend(b, "torch", "auto", None, batch=64)
    print(f"model {b.meta.model_id} ({backend.name}, {backend.precision}), {a.width} px, "
          f"{a.lines} lines, {a.defects} defects planted, torch threads {PLAN.torch_intra}",
          flush=True)  # fmt: skip
    runs: list[dict[str, Any]] = []
    for r in range(a.rounds):
        for pictures in (False, True) if r % 2 == 0 else (True, False):
            run = one_run(bundle, backend, pictures, a.lines, a.width, a.defects, seed=r)
            runs.append(run)
            print(f"  round {r + 1} pictures {'on ' if pictures else 'off'}: "
                  f"{run['lines_per_s']:.0f} lines/s, {run['defects']} defects, "
                  f"stitch {run['stitch_s']:.2f} s, crops {run['crop_s'] * 1e3:.1f} ms, "
                  f"picture thread {run['picture_thread_s'] * 1e3:.1f} ms", flush=True)  # fmt: skip

    def med(pictures: bool, key: str) -> float:
        return statistics.median(float(x[key]) for x in runs if x["pictures"] is pictures)

    off, on = med(False, "lines_per_s"), med(True, "lines_per_s")
    print("\n| | pictures off | pictures on |")
    print("|---|---|---|")
    print(f"| lines/s (median of {a.rounds}) | {off:.0f} | {on:.0f} ({(on / off - 1):+.1%}) |")
    print(f"| post thread in the tracker (stitch) | {med(False, 'stitch_s'):.2f} s | "
          f"{med(True, 'stitch_s'):.2f} s |")  # fmt: skip
    print(f"| post thread for crops | - | {med(True, 'crop_s') * 1e3:.1f} ms |")
    print(f"| picture thread (draw + store) | - | {med(True, 'picture_thread_s') * 1e3:.1f} ms "
          f"for {med(True, 'pictures_stored'):.0f} pictures |")  # fmt: skip
    pics = max(1.0, med(True, "pictures_stored"))
    print(f"| picture size (mean) | - | {med(True, 'picture_bytes') / pics / 1024:.1f} KiB |")
    print(f"| rings' memory (peak) | - | {med(True, 'ring_bytes_peak') / 2**20:.1f} MiB |")
    if a.json is not None:
        a.json.write_text(json.dumps({"runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
