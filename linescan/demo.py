"""``linescan demo``: the daemon on its built-in defaults, fed by the built-in simulator.

It starts the real daemon (ZeroMQ sockets on loopback, metrics endpoint, the bundled default
model from ``engines/default``), subscribes to its events like any client would, sends a
synthetic woven web with defects planted at known positions, prints the events as they come,
and ends with a summary: planted vs found, lines/s, latency p50/p99. The live page (defect
pictures, roll map, rates) is served on the metrics port while it runs; its address is printed
first, and ``hold`` keeps it up after the summary until Ctrl-C.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from linescan.backends import Backend, create_backend
from linescan.config import Config
from linescan.data.synthetic import Defect
from linescan.errors import ModelError
from linescan.listen import LossTracker, listen
from linescan.live import page_url
from linescan.metrics import MetricsServer
from linescan.model.bundle import BundleMeta, load_bundle
from linescan.service import Daemon
from linescan.simulate import send_web, synthetic_source
from linescan.stride import choose_stride, lines_per_s, measure_tiles_per_s

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "engines" / "default"


def default_bundle_path() -> Path:
    if not (DEFAULT_BUNDLE / "bundle.json").is_file():
        raise ModelError(
            f"the bundled default model is missing ({DEFAULT_BUNDLE}); run linescan from a "
            "clone of the repository or pass --model BUNDLE"
        )
    return DEFAULT_BUNDLE


@dataclass
class DemoResult:
    planted: list[Defect]
    events: list[dict[str, Any]] = field(default_factory=list)
    final_status: dict[str, Any] | None = None
    lines: int = 0
    seconds: float = 0.0
    loss: LossTracker | None = None

    def found(self) -> list[Defect]:
        return [d for d in self.planted if any(_overlaps(d, e) for e in self.events)]

    def false_alarms(self) -> list[dict[str, Any]]:
        return [e for e in self.events if not any(_overlaps(d, e) for d in self.planted)]

    def latency_ms(self, q: float) -> float | None:
        lat = [e["latency_ms"] for e in self.events if e.get("latency_ms") is not None]
        return float(np.quantile(lat, q)) if lat else None


def _overlaps(d: Defect, e: dict[str, Any]) -> bool:
    return bool(
        e["line_start"] < d.line_end
        and d.line < e["line_end"]
        and e["x_start"] < d.x_end
        and d.x < e["x_end"]
    )


AUTO_LOAD = 0.6  # the simulated line runs at this share of the measured capacity
MAX_AUTO_SECONDS = 60.0  # with the measured rate, the demo's web is cut to send within this


def measure_capacity(backend: Backend, meta: BundleMeta, config: Config, width: int) -> float:
    """Camera lines per second the engine keeps up with at this width (model time only).

    The demo runs on whatever machine it is tried on, a quiet workstation or a busy CI box, so
    it measures instead of assuming, and paces its simulated camera below that.
    """
    tiles_per_s = measure_tiles_per_s(backend, meta.patch, config.inspection.max_batch, 1.5)
    setting = config.inspection.stride
    if setting == "auto":  # the daemon picks for its line rate; the demo's own line follows
        setting = choose_stride(
            meta,
            tiles_per_s,
            config.inspection.line_rate_hz or 1.0,
            width,
            config.inspection.stride_headroom,
        ).stride
    return lines_per_s(tiles_per_s, meta, setting or meta.stride, width)


def run_demo(
    config: Config,
    bundle: Path | None = None,
    lines: int = 24_000,
    width: int = 2048,
    frame_height: int = 256,
    defects: int = 8,
    line_rate_hz: float | None = None,
    seed: int = 7,
    out: TextIO = sys.stdout,
    hold: bool = False,
) -> DemoResult:
    b = load_bundle(bundle or config.model.bundle or default_bundle_path())
    backend = create_backend(
        b,
        config.engine.backend,
        config.engine.precision,
        config.engine.threads,
        batch=config.inspection.max_batch,
        device=config.engine.device,
    )
    if line_rate_hz is None:
        capacity = measure_capacity(backend, b.meta, config, width)
        line_rate_hz = max(100.0, round(AUTO_LOAD * capacity, -2))
        out.write(
            f"measured capacity about {capacity:.0f} lines/s at {width} px; the simulated "
            f"camera runs at {line_rate_hz:.0f} lines/s ({AUTO_LOAD:.0%}; --line-rate to change)\n"
        )
        if lines / line_rate_hz > MAX_AUTO_SECONDS:
            lines = max(4000, int(line_rate_hz * MAX_AUTO_SECONDS))
            out.write(f"a busy machine: the web is shortened to {lines} lines\n")
    if line_rate_hz <= 0 and config.queues.overload != "block":
        # "as fast as the daemon takes them": let ZeroMQ push back on the sender instead of
        # dropping frames (the daemon's default policy for a live line)
        config = config.with_overrides({"queues": {"overload": "block"}})
    events: list[dict[str, Any]] = []
    done = threading.Event()  # the subscriber has stopped
    sent = threading.Event()  # every frame sent was inspected or dropped
    daemon = Daemon(config, b.meta, backend)
    server = None
    if config.metrics.enabled:
        server = MetricsServer(
            daemon.registry,
            config.metrics.host,
            config.metrics.port,
            lambda: daemon.ready,
            app=daemon.view if config.metrics.page else None,
        )
        server.start()
        if config.metrics.page:
            out.write(f"live page: {page_url(config.metrics.host, server.port)}\n")
            out.flush()
    out.write(
        f"linescan demo: model {b.meta.model_id} ({backend.name}, {backend.precision}); "
        "warming up...\n"
    )
    daemon.start()
    source = synthetic_source(width, lines, defects, seed=seed)
    res = DemoResult(list(source.defects))
    final: dict[str, Any] = {}

    def on_event(topic: str, body: dict[str, Any]) -> bool:
        if topic == "defect":
            events.append(body)
            lat = body.get("latency_ms")
            out.write(
                f"  defect #{body['seq']}: lines {body['line_start']}-{body['line_end']} "
                f"x {body['x_start']}-{body['x_end']} area {body['area_px']} px "
                f"score {body['score_max']:.3f} ({body['position_m']:.2f} m"
                + (f", {lat:.0f} ms after capture)\n" if lat is not None else ")\n")
            )
            out.flush()
        elif topic == "status" and body.get("final"):
            # The daemon's last word: every event it will publish came before it.
            final.update(body)
            return True
        elif (
            topic == "status"
            and body.get("lines_received", 0) >= lines
            and (
                body["frames_inspected"] + body["frames_dropped"] >= body["frames_received"]
                and body["queues"]["ingest"] == 0
            )
        ):
            # Every frame reached the tracker, but the events of the segment's last tile rows
            # may still be on their way (a frame counts as inspected with its first tile row):
            # stop the daemon and keep listening until its final status.
            sent.set()
        return False

    subscribed = threading.Event()
    tracker_box: list[LossTracker] = []

    def subscriber() -> None:
        tracker_box.append(
            listen(daemon.events_endpoint, on_event, timeout_s=60.0, ready=subscribed.set)
        )
        done.set()

    sub = threading.Thread(target=subscriber, name="demo-subscriber", daemon=True)
    sub.start()
    subscribed.wait(5)
    time.sleep(0.3)  # PUB/SUB: let the subscription reach the daemon before the first event
    rate = f"{line_rate_hz:.0f} lines/s" if line_rate_hz > 0 else "full speed"
    out.write(
        f"sending {lines} lines of {width} px woven web at {rate} "
        f"in frames of {frame_height} lines, {len(source.defects)} defects planted\n"
    )
    t0 = time.monotonic()
    send_web(daemon.frames_endpoint, source, frame_height, line_rate_hz)
    deadline = time.monotonic() + 120
    while not sent.wait(0.1) and not done.is_set() and time.monotonic() < deadline:
        pass  # until every frame is accounted for, or the subscriber gave up
    complete = sent.is_set()
    res.seconds = time.monotonic() - t0
    daemon.stop()
    done.wait(30)  # the final status, published once everything held is published
    daemon.join(30)
    res.events = events
    res.final_status = (final or None) if complete else None
    res.lines = int(final.get("lines_inspected", 0)) if final else 0
    res.loss = tracker_box[0] if tracker_box else None
    _summary(res, out)
    if server is not None:
        # Ctrl-C may come at any moment from here on (the line below invites it): the page
        # server is stopped whatever happens, and the interrupt ends the hold, not the demo.
        try:
            if hold and config.metrics.page:
                out.write(
                    f"the live page stays up at {page_url(config.metrics.host, server.port)} "
                    "until Ctrl-C\n"
                )
                out.flush()
                threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
    return res


def _summary(res: DemoResult, out: TextIO) -> None:
    found = res.found()
    p50, p99 = res.latency_ms(0.5), res.latency_ms(0.99)
    st = res.final_status or {}
    out.write("\nsummary\n")
    out.write(f"  planted defects     {len(res.planted)}\n")
    out.write(f"  found               {len(found)} of {len(res.planted)}\n")
    out.write(f"  false alarms        {len(res.false_alarms())}\n")
    for d in res.planted:
        mark = "found " if d in found else "MISSED"
        out.write(f"    {mark} {d.kind:<14} lines {d.line}-{d.line_end} x {d.x}-{d.x_end}\n")
    out.write(
        f"  lines inspected     {res.lines} in {res.seconds:.1f} s "
        f"({res.lines / max(res.seconds, 1e-9):.0f} lines/s)\n"
    )
    out.write(
        f"  frames              received {st.get('frames_received')}, inspected "
        f"{st.get('frames_inspected')}, dropped {st.get('frames_dropped')}, rejected "
        f"{st.get('frames_rejected')}\n"
    )
    if p50 is not None and p99 is not None:
        out.write(f"  latency (capture to event)  p50 {p50:.0f} ms  p99 {p99:.0f} ms\n")
    if res.loss is not None:
        out.write(f"  events lost         {res.loss.lost_defects}\n")
    out.flush()
