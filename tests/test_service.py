"""The daemon end to end: real ZeroMQ sockets on loopback, real HTTP scrapes, real processes.

Models. Training a model that finds defects takes longer than this file's whole budget, and
training is not what these tests are about, so they use two *untrained* bundles, built in
milliseconds and run by the real torch engine in fp32:

* ``detector``: the Table I autoencoder with its last layer scaled to almost nothing and its
  bias set to the web's mean grey. It "reconstructs" every tile as a nearly flat grey, so its
  L2 residual is high exactly where the web leaves its normal grey range: holes, knots, stains
  and threads at least 4 px wide are found, the plain weave stays far below the threshold
  (measured: < 0.012 against a threshold of 0.025). Its output still depends (a little) on the
  input through the whole network, so every conv of the engine runs for real.
* ``random``: the same network as initialised (He init), with the SSIM residual and a
  threshold set to a high quantile of its residual on the test web. Its "defects" are
  arbitrary blobs, which is what the streaming-equals-offline property needs: many regions of
  every shape, crossing frame boundaries, on the 11-line SSIM halo path.

Engines are made as ``linescan serve`` makes them (``create_backend``: fp32, wrapped in
``FixedBatch`` so every network call has the same number of tiles). Without that wrapper the
bits would depend on how the daemon happened to fill its batches: measured here with torch's
CPU engine in fp32, a tile inferred in a batch of exactly one differs by up to ~5e-8 from the
same tile in any larger batch (batches of 2..64 agreed bit for bit, whatever their
composition), while bf16 gave identical bits for every batch size. With it, streamed events
equal the offline regions exactly; the comparison still allows 1e-6 on scores, as specified.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from viewkit import Subscriber

from linescan.backends import Backend, FunctionBackend, create_backend
from linescan.config import Config
from linescan.data.synthetic import Defect, WovenWeb, plant_defects
from linescan.errors import ConfigError, EngineError
from linescan.ingest import encode_frame
from linescan.metrics import MetricsServer
from linescan.model.bundle import BundleMeta, build_module, load_bundle, save_bundle
from linescan.pipeline import inspect_image, reconstruct
from linescan.preprocess import InputSpec
from linescan.segment import Region, grey_open
from linescan.service import Daemon
from linescan.simulate import send_web, synthetic_source

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DETECTOR_THRESHOLD = 0.025
Body = dict[str, Any]
U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


# --------------------------------------------------------------------------- models


def _save_untrained(path: Path, meta: BundleMeta, flat: bool) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = build_module(meta)
    if flat:
        last = [m for m in module.modules() if isinstance(m, torch.nn.ConvTranspose2d)][-1]
        assert last.bias is not None
        with torch.no_grad():
            last.weight.mul_(0.02)
            last.bias.fill_(0.47)  # the woven web's mean grey, normalised
    save_bundle(path, module, meta)
    return path


@pytest.fixture(scope="module", autouse=True)
def _torch_threads() -> Iterator[None]:
    """One intra-op thread (two cores are shared with others); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The flat-grey L2 bundle at full resolution, threshold stored in the bundle."""
    meta = BundleMeta(
        loss="l2", latent=8, patch=32, residual="l2", name="detector",
        threshold=DETECTOR_THRESHOLD,
    )  # fmt: skip
    return _save_untrained(tmp_path_factory.mktemp("models") / "detector", meta, flat=True)


@pytest.fixture(scope="module")
def detector_half(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same at 1/2 down-scaling."""
    meta = BundleMeta(
        loss="l2", latent=8, patch=32, residual="l2", input=InputSpec(downscale=2),
        name="detector-half", threshold=DETECTOR_THRESHOLD,
    )  # fmt: skip
    return _save_untrained(tmp_path_factory.mktemp("models") / "detector_half", meta, flat=True)


@pytest.fixture(scope="module")
def random_ssim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The He-initialised network with the SSIM residual (threshold set per web)."""
    meta = BundleMeta(loss="ssim", latent=16, patch=32, residual="ssim", name="random")
    return _save_untrained(tmp_path_factory.mktemp("models") / "random", meta, flat=False)


def torch_backend(bundle: Path, batch: int = 64) -> Backend:
    """The torch CPU engine in fp32, in fixed batches of ``batch`` tiles, as the daemon's."""
    return create_backend(load_bundle(bundle), "torch", "fp32", threads=1, batch=batch)


class Stall:
    """A deliberately slow engine: after ``stall()``, every batch sleeps until ``release()``.
    Deterministic overload: while it sleeps the daemon's queues fill up."""

    def __init__(self, inner: Backend) -> None:
        self._stalled = threading.Event()
        self._released = threading.Event()

        def infer(batch: F32) -> F32:
            while self._stalled.is_set() and not self._released.is_set():
                time.sleep(0.005)
            return inner.infer(batch)

        self.backend = FunctionBackend(infer, name=f"stalled({inner.name})")

    def stall(self) -> None:
        self._stalled.set()

    def release(self) -> None:
        self._released.set()


# --------------------------------------------------------------------------- webs


def woven(width: int, lines: int, defects: list[Defect], seed: int = 3) -> U8:
    web = WovenWeb(width, seed).lines(0, lines)
    plant_defects(web, 0, defects)
    return web


def overlaps(d: Defect, e: Body | Region) -> bool:
    box = e if isinstance(e, dict) else e.to_dict()
    return bool(
        box["line_start"] < d.line_end
        and d.line < box["line_end"]
        and box["x_start"] < d.x_end
        and d.x < box["x_end"]
    )


BOX = ("line_start", "line_end", "x_start", "x_end", "area_px")


def box(e: Body | Region, line_offset: int = 0) -> tuple[int, ...]:
    d = e if isinstance(e, dict) else e.to_dict()
    values = [int(d[k]) for k in BOX]
    return (values[0] - line_offset, values[1] - line_offset, *values[2:])


def assert_events_equal_regions(
    events: list[Body], regions: list[Region], line_offset: int = 0
) -> None:
    """Boxes and areas exactly, scores within 1e-6."""
    got = sorted(events, key=lambda e: box(e, line_offset))
    want = sorted(regions, key=box)
    assert [box(e, line_offset) for e in got] == [box(r) for r in want]
    for e, r in zip(got, want, strict=True):
        assert e["score_max"] == pytest.approx(r.score_max, abs=1e-6)
        assert e["score_mean"] == pytest.approx(r.score_mean, abs=1e-6)


# --------------------------------------------------------------------------- plumbing


def make_config(**sections: dict[str, Any]) -> Config:
    """Defaults on ephemeral loopback ports, fast status messages, one engine thread, and an
    ingest queue that holds every frame a test sends at once (only test 4 drops frames)."""
    base: dict[str, dict[str, Any]] = {
        "frames": {"endpoint": "tcp://127.0.0.1:*"},
        "events": {"endpoint": "tcp://127.0.0.1:*", "status_interval_s": 0.05},
        "metrics": {"listen": "127.0.0.1:0"},
        "engine": {"precision": "fp32", "threads": 1},
        "queues": {"ingest": 64},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return Config().with_overrides(base)


@dataclass
class Running:
    daemon: Daemon
    sub: Subscriber
    metrics_url: str
    _push: list[zmq.Socket[bytes]] = field(default_factory=list)

    def push(self) -> zmq.Socket[bytes]:
        """A camera's PUSH socket connected to the daemon (closed with the daemon)."""
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(self.daemon.frames_endpoint)
        self._push.append(sock)
        return sock

    def stop(self) -> Body:
        """Stop the daemon; returns its final status message."""
        self.daemon.stop()
        final = self.sub.final()
        assert self.daemon.join(30), "daemon threads did not finish"
        assert not self.daemon.errors
        return final


@contextlib.contextmanager
def running(config: Config, meta: BundleMeta, backend: Backend) -> Iterator[Running]:
    """A started daemon with its metrics endpoint and a joined subscriber."""
    daemon = Daemon(config, meta, backend)
    server = MetricsServer(daemon.registry, config.metrics.host, 0, lambda: daemon.ready)
    server.start()
    run: Running | None = None
    try:
        daemon.start()
        run = Running(daemon, Subscriber(daemon.events_endpoint), f"http://127.0.0.1:{server.port}")
        run.sub.joined()
        yield run
    finally:
        daemon.stop()
        daemon.join(30)
        if run is not None:
            run.sub.close()
            for sock in run._push:
                sock.close()
        server.stop()


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    status, text = http_get(url + "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on loopback (all held open while choosing)."""
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)
        ]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def send_frames(
    sock: zmq.Socket[bytes],
    web: U8,
    heights: list[int],
    camera: str = "cam0",
    first_seq: int = 0,
    first_line: int | None = None,
    end: bool = True,
) -> int:
    """Send ``web`` cut into frames of ``heights``; returns the next seq."""
    seq, pos = first_seq, 0
    for i, h in enumerate(heights):
        line = first_line if i == 0 else None
        last = i == len(heights) - 1
        msg = encode_frame(camera, seq, web[pos : pos + h], line=line, end=end and last)
        sock.send_multipart(msg)
        seq, pos = seq + 1, pos + h
    assert pos == len(web)
    return seq


# --------------------------------------------------------------------------- 1. end to end


def test_simulator_to_subscriber_finds_the_planted_defects(detector: Path) -> None:
    """Simulator -> daemon -> subscriber: every planted defect found where it was planted,
    nothing else reported, no event lost, and the final accounting is exact."""
    bundle = load_bundle(detector)
    lines, width = 1500, 256
    source = synthetic_source(width, lines, defects=4, seed=1)
    assert {d.kind for d in source.defects} >= {"knot", "stain", "broken_thread"}
    config = make_config()
    with running(config, bundle.meta, torch_backend(detector)) as run:
        stats = send_web(run.daemon.frames_endpoint, source, frame_height=100)
        assert stats.lines == lines
        run.sub.drained(stats.frames)
        final = run.stop()
    sub = run.sub
    events = sub.defects
    for d in source.defects:
        assert any(overlaps(d, e) for e in events), f"planted {d} not found in {events}"
    for e in events:
        assert any(overlaps(d, e) for d in source.defects), f"false alarm {e}"
        assert e["camera"] == "cam0"
        assert e["model"] == bundle.meta.model_id
        assert e["threshold"] == DETECTOR_THRESHOLD
        assert e["position_m"] == pytest.approx(e["line_start"] / 1000.0)
        assert e["latency_ms"] is not None
        assert e["latency_ms"] >= 0
        assert e["t_capture_ns"] <= e["t_publish_ns"]
    assert sub.loss is not None
    assert sub.loss.lost_defects == 0
    assert sub.loss.lost_status == 0
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert final["last_seq"] == len(events) - 1
    assert final["frames_received"] == stats.frames == 15
    assert final["frames_received"] == final["frames_inspected"] + final["frames_dropped"]
    assert final["frames_dropped"] == 0
    assert final["frames_rejected"] == 0
    assert final["lines_inspected"] == final["lines_received"] == lines
    assert final["defects"] == len(events)
    assert final["segments"] == 1
    assert final["sequence_gaps"] == 0
    assert sub.merged("not_inspected") == []
    assert sub.merged("breaks") == [{"camera": "cam0", "line": lines, "why": "end"}]


# --------------------------------------------------------------------------- 2. property

PROP_LINES, PROP_WIDTH = 700, 160
PROP_DEFECTS = [
    Defect("hole", line=40, x=20, height=14, width=18),
    Defect("knot", line=150, x=100, height=12, width=12),
    Defect("broken_thread", line=260, x=60, height=90, width=5),  # across many frames
    Defect("stain", line=470, x=10, height=30, width=40),
    Defect("hole", line=PROP_LINES - 12, x=120, height=12, width=16),  # in the last lines
]


@dataclass(frozen=True)
class Case:
    meta: BundleMeta
    backend: Backend
    offline: list[Region]


@pytest.fixture(scope="module")
def prop_web() -> U8:
    return woven(PROP_WIDTH, PROP_LINES, PROP_DEFECTS)


@pytest.fixture(scope="module")
def prop_cases(prop_web: U8, random_ssim: Path, detector_half: Path) -> dict[str, Case]:
    """SSIM residual at full scale and L2 at 1/2 scale, with the offline regions of the web."""
    rnd = torch_backend(random_ssim, batch=16)
    meta = load_bundle(random_ssim).meta
    g = grey_open(reconstruct(prop_web, meta, rnd).residual)
    meta = replace(meta, threshold=float(np.quantile(g, 0.995)))
    half = torch_backend(detector_half, batch=16)
    half_meta = load_bundle(detector_half).meta
    cases = {
        name: Case(m, backend, inspect_image(prop_web, m, backend).regions)
        for name, m, backend in (("ssim-full", meta, rnd), ("l2-half", half_meta, half))
    }
    assert len(cases["ssim-full"].offline) >= 10  # many regions of every shape
    found = [d for d in PROP_DEFECTS if any(overlaps(d, r) for r in cases["l2-half"].offline)]
    assert len(found) >= 3
    return cases


@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_streamed_events_equal_offline_regions_for_any_frame_split(
    prop_cases: dict[str, Case], prop_web: U8, data: st.DataObject
) -> None:
    """For any split of a web into frames of 1..300 lines sent to the daemon, the defect events
    equal inspect_image's regions on the whole web (boxes and areas exactly, scores to 1e-6)."""
    case = prop_cases[data.draw(st.sampled_from(sorted(prop_cases)), label="case")]
    heights: list[int] = []
    while sum(heights) < PROP_LINES:
        heights.append(min(data.draw(st.integers(1, 300)), PROP_LINES - sum(heights)))
    # anywhere on the web's absolute line axis, with any first seq
    first_line = data.draw(st.integers(0, 10**9), label="first_line")
    first_seq = data.draw(st.integers(0, 10**9), label="first_seq")
    config = make_config(
        # every frame waits its turn: a drop would (rightly) restart the segment
        queues={"overload": "block"},
        inspection={"max_batch": 16, "max_wait_ms": 2.0},
    )
    with running(config, case.meta, case.backend) as run:
        send_frames(run.push(), prop_web, heights, first_seq=first_seq, first_line=first_line)
        run.sub.drained(len(heights))
        final = run.stop()
    assert final["frames_received"] == final["frames_inspected"] == len(heights)
    assert final["lines_inspected"] == PROP_LINES
    assert final["segments"] == 1
    assert run.sub.loss is not None
    assert run.sub.loss.lost_defects == 0
    assert_events_equal_regions(run.sub.defects, case.offline, line_offset=first_line)


# --------------------------------------------------------------------------- 3. malformed


def _header(**fields: Any) -> bytes:
    base: Body = {"v": 1, "camera": "cam0", "seq": 7, "height": 4, "width": 128, "dtype": "uint8"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


def test_malformed_frames_are_counted_by_reason_and_inspection_goes_on(detector: Path) -> None:
    """Each kind of malformed message is rejected and counted under its reason (status message
    and /metrics), and the next valid frame is inspected: the defect planted in it is found."""
    width = 128
    knot = Defect("knot", line=100, x=50, height=16, width=14)
    web = woven(width, 160, [knot])
    malformed: dict[str, list[bytes]] = {
        "parts": [_header(), b"\0" * 4 * width, b"extra"],
        "json": [b'{"v": 1, "seq": ', b"\0" * 4 * width],
        "version": [_header(v=2), b"\0" * 4 * width],
        "field": [_header(seq=None), b"\0" * 4 * width],
        "dtype": [_header(dtype="float32"), b"\0" * 4 * width],
        "dims": [_header(height=10**9), b"\0" * 16],
        "size": [_header(height=4), b"\0" * (4 * width - 1)],
        "sequence": encode_frame("cam0", 0, web[:4]),  # a duplicate of the first frame
    }
    with running(make_config(), load_bundle(detector).meta, torch_backend(detector)) as run:
        sock = run.push()
        sock.send_multipart(encode_frame("cam0", 0, web[:64], line=0))
        for parts in malformed.values():
            sock.send_multipart(parts)
        sock.send_multipart(encode_frame("cam0", 1, web[64:], end=True))
        status = run.sub.until(
            lambda s: s["frames_rejected"] == len(malformed) and s["frames_inspected"] == 2
        )
        metrics = scrape(run.metrics_url)
        final = run.stop()
    expected = dict.fromkeys(malformed, 1)
    assert status["rejected_by_reason"] == expected
    assert final["rejected_by_reason"] == expected
    for reason in malformed:
        key = ("linescan_frames_rejected_total", (("reason", reason),))
        assert metrics[key] == 1.0, reason
    assert metrics[("linescan_frames_received_total", (("camera", "cam0"),))] == 2.0
    assert final["frames_received"] == final["frames_inspected"] == 2
    assert final["lines_inspected"] == 160
    assert final["segments"] == 1
    assert final["sequence_gaps"] == 0
    events = run.sub.defects
    assert events, "the defect in the frame after the malformed ones was not found"
    assert all(overlaps(knot, e) for e in events)


# --------------------------------------------------------------------------- 4. overload


def test_overload_drops_whole_frames_and_reports_every_hole(detector: Path) -> None:
    """drop-newest with a one-frame ingest queue and a stalled engine: a burst of frames is
    dropped and counted, every dropped line range is named in a status message, the segment
    restarts after the hole, and received == inspected + dropped exactly."""
    burst, more, h, width = 30, 3, 40, 128
    web = woven(width, (burst + more) * h, [])
    config = make_config(
        queues={"overload": "drop-newest", "ingest": 1, "inference": 1},
        inspection={"max_batch": 8, "max_wait_ms": 0.0},
    )
    engine = Stall(torch_backend(detector))
    with running(config, load_bundle(detector).meta, engine.backend) as run:
        sock = run.push()
        engine.stall()
        try:
            # while the engine is stalled the queues fill up and the rest of the burst is dropped
            send_frames(sock, web[: burst * h], [h] * burst, end=False)
            run.sub.until(lambda s: s["frames_received"] == burst)
        finally:
            engine.release()
        run.sub.drained(burst)
        for seq in range(burst, burst + more):  # one at a time, each has room: inspected
            last = seq == burst + more - 1
            sock.send_multipart(encode_frame("cam0", seq, web[seq * h : seq * h + h], end=last))
            run.sub.drained(seq + 1)
        metrics = scrape(run.metrics_url)
        final = run.stop()
    sub = run.sub
    dropped = final["frames_dropped"]
    # the stalled daemon holds at most ~11 frames (1 in the engine, <= 8 in the job queue, 1 in
    # the tiler, 1 in the ingest queue): the rest of the burst is dropped
    assert dropped >= burst - 12, "the stalled daemon should have dropped most of the burst"
    assert final["frames_received"] == burst + more
    assert final["frames_received"] == final["frames_inspected"] + dropped
    assert final["lines_received"] == final["lines_inspected"] + final["lines_dropped"]
    assert final["lines_dropped"] == dropped * h
    assert metrics[("linescan_frames_dropped_total", (("reason", "overload"),))] == dropped
    holes = [r for r in sub.merged("not_inspected") if r["why"] == "dropped: overload"]
    assert len(holes) == dropped
    dropped_seqs = {r["seq"] for r in holes}
    assert len(dropped_seqs) == dropped
    assert dropped_seqs <= set(range(1, burst))  # the first frame and those sent later got in
    for r in holes:
        assert (r["line_start"], r["line_end"]) == (r["seq"] * h, r["seq"] * h + h), r
    # each run of accepted frames is one segment: the web restarts after every hole
    accepted = [seq for seq in range(burst + more) if seq not in dropped_seqs]
    starts = [seq for seq in accepted if seq > accepted[0] and seq - 1 in dropped_seqs]
    restarts = [b for b in sub.merged("breaks") if b["why"] == "dropped"]
    assert [b["line"] for b in restarts] == [seq * h for seq in starts]
    assert starts  # a frame after the burst was inspected, so at least one restart
    assert final["segments"] == 1 + len(starts)
    assert final["lines_inspected"] == len(accepted) * h


# --------------------------------------------------------------------------- 5. sequence gap


def test_a_sequence_gap_starts_a_new_segment_and_nothing_is_stitched_across_it(
    detector: Path,
) -> None:
    """Frame 5 of 10 never arrives: the gap is counted, its lines are reported as not
    inspected, a second segment starts after it, and no region spans the hole."""
    h, width = 50, 128
    thread = Defect("broken_thread", line=200, x=60, height=140, width=6)  # lines 200..340
    web = woven(width, 10 * h, [thread])
    with running(make_config(), load_bundle(detector).meta, torch_backend(detector)) as run:
        sock = run.push()
        for seq in range(10):
            if seq != 5:
                last = seq == 9
                sock.send_multipart(encode_frame("cam0", seq, web[seq * h : seq * h + h], end=last))
        run.sub.drained(9)
        final = run.stop()
    sub = run.sub
    assert final["sequence_gaps"] == 1
    assert final["segments"] == 2
    assert final["frames_received"] == final["frames_inspected"] == 9
    assert final["lines_inspected"] == 9 * h
    gaps = [r for r in sub.merged("not_inspected") if r["why"].startswith("sequence gap")]
    assert [(r["line_start"], r["line_end"]) for r in gaps] == [(5 * h, 6 * h)]
    assert {"camera": "cam0", "line": 6 * h, "why": "gap"} in sub.merged("breaks")
    events = sub.defects
    for e in events:
        assert e["line_end"] <= 5 * h or e["line_start"] >= 6 * h, f"stitched across: {e}"
    before = [e for e in events if e["line_end"] <= 5 * h]
    after = [e for e in events if e["line_start"] >= 6 * h]
    assert any(overlaps(thread, e) for e in before)
    assert any(overlaps(thread, e) for e in after)
    assert {e["segment"] for e in before}.isdisjoint({e["segment"] for e in after})


def test_an_engine_failure_drops_its_segment_and_names_the_error(detector: Path) -> None:
    """A batch that fails in the engine abandons its segment: the frames of it still in flight
    are dropped (reason engine) and reported with the engine's error; the web restarts after
    them (a new segment, if frames of it were still coming) and later frames are inspected
    again; the accounting stays exact."""
    h, width = 40, 128
    knot = Defect("knot", line=500, x=50, height=14, width=14)
    web = woven(width, 20 * h, [knot])
    inner = torch_backend(detector)
    calls = {"done": 0, "fail": -1}

    def flaky(batch: F32) -> F32:
        calls["done"] += 1
        if calls["done"] == calls["fail"]:
            raise EngineError("device lost")
        return inner.infer(batch)

    config = make_config(inspection={"max_batch": 4, "max_wait_ms": 0.0})
    with running(config, load_bundle(detector).meta, FunctionBackend(flaky)) as run:
        calls["fail"] = calls["done"] + 3  # the third batch of the first web (after warm-up)
        sock = run.push()
        send_frames(sock, web[: 10 * h], [h] * 10)
        run.sub.drained(10)  # the first segment ends before the second starts
        send_frames(sock, web[10 * h :], [h] * 10, first_seq=10, first_line=10 * h)
        run.sub.drained(20)
        metrics = scrape(run.metrics_url)
        final = run.stop()
    sub = run.sub
    dropped = final["frames_dropped"]
    assert 0 < dropped < 10
    assert final["frames_received"] == final["frames_inspected"] + dropped == 20
    assert final["lines_received"] == final["lines_inspected"] + final["lines_dropped"]
    assert metrics[("linescan_frames_dropped_total", (("reason", "engine"),))] == dropped
    assert metrics[("linescan_engine_errors_total", ())] == 1
    lost = [r for r in sub.merged("not_inspected") if r["why"].startswith("engine error")]
    assert len(lost) == dropped
    assert {r["why"] for r in lost} == {"engine error: device lost"}
    assert all(r["line_end"] <= 10 * h for r in lost)
    assert any(overlaps(knot, e) for e in sub.defects), "the next segment was not inspected"
    # 2, or 3 when the tiler still had frames of the first web after the failure was known
    assert final["segments"] in (2, 3)


# --------------------------------------------------------------------------- 6. SIGTERM


def _serve_config(tmp_path: Path, bundle: Path, frames: int, events: int, metrics: int) -> Path:
    path = tmp_path / "linescan.toml"
    path.write_text(
        f"""
[model]
bundle = "{bundle}"

[frames]
endpoint = "tcp://127.0.0.1:{frames}"

[events]
endpoint = "tcp://127.0.0.1:{events}"
status_interval_s = 0.1

[metrics]
listen = "127.0.0.1:{metrics}"

[engine]
precision = "fp32"
threads = 1

[queues]
ingest = 64

[log]
format = "json"
level = "info"
"""
    )
    return path


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            if http_get(url + "/readyz")[0] == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"serve never became ready:\n{log.read_text()[-3000:]}")


def _start_serve(config: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`linescan serve --config CONFIG` in a child process, its output into ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "linescan.cli", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _env() -> dict[str, str]:
    """The test's environment, minus what would make a child act as a systemd service."""
    systemd = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "STATE_DIRECTORY"}
    env = {k: v for k, v in os.environ.items() if k not in systemd}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_sigterm_publishes_the_events_of_every_accepted_frame(
    tmp_path: Path, detector: Path
) -> None:
    """`linescan serve` under SIGTERM with frames in flight: the defects held at the end of the
    web are published, the events equal the offline regions, and the process exits 0; while it
    runs it serves /healthz and /metrics with linescan_ metrics named with their units."""
    ports = free_ports(3)
    config = _serve_config(tmp_path, detector, *ports)
    frames_ep, events_ep = (f"tcp://127.0.0.1:{p}" for p in ports[:2])
    url = f"http://127.0.0.1:{ports[2]}"
    lines, width = 1200, 256
    planted = [
        Defect("hole", line=300, x=40, height=20, width=24),
        Defect("knot", line=1130, x=200, height=16, width=14),
        Defect("hole", line=1180, x=100, height=18, width=30),  # ends 2 lines before the web
    ]
    web = woven(width, lines, planted)
    offline = inspect_image(web, load_bundle(detector).meta, torch_backend(detector)).regions
    assert all(any(overlaps(d, r) for r in offline) for d in planted)
    log = tmp_path / "serve.log"
    proc = _start_serve(config, log, _env())
    sub: Subscriber | None = None
    sock: zmq.Socket[bytes] | None = None
    try:
        _wait_ready(url, proc, log)
        assert http_get(url + "/healthz") == (200, "ok\n")
        sub = Subscriber(events_ep)
        sub.joined()
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(frames_ep)
        # no `end` flag: the last tile rows wait in the band for lines that never come
        send_frames(sock, web, [100] * 12, end=False)
        sub.until(lambda s: s["frames_received"] == 12)
        status, text = http_get(url + "/metrics")
        proc.send_signal(signal.SIGTERM)
        final = sub.final()
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if sock is not None:
            sock.close()
        if sub is not None:
            sub.close()
    assert rc == 0, log.read_text()[-3000:]
    assert_events_equal_regions(sub.defects, offline)
    assert all(any(overlaps(d, e) for e in sub.defects) for d in planted)
    assert sub.loss is not None
    assert sub.loss.lost_defects == 0
    assert final["frames_received"] == final["frames_inspected"] == 12
    assert final["lines_inspected"] == lines
    assert final["last_seq"] == len(sub.defects) - 1
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ours = {name: fam.type for name, fam in families.items() if name.startswith("linescan_")}
    for name, kind in {
        "linescan_frames_received": "counter",
        "linescan_lines_inspected": "counter",
        "linescan_tiles_inferred": "counter",
        "linescan_stage_seconds": "histogram",
        "linescan_latency_seconds": "histogram",
    }.items():
        assert ours.get(name) == kind, (name, sorted(ours))
    # units in names: counters end in _total on the wire, durations are in seconds
    for name, kind in ours.items():
        fam = families[name]
        if kind == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), name
        if kind == "histogram":
            assert name.endswith(("_seconds", "_size")), name
    assert "stopped" in log.read_text()


# --------------------------------------------------------------------------- 7. check-config


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "linescan.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        check=False,
    )


def test_check_config_prints_every_error_with_its_location(tmp_path: Path) -> None:
    """`linescan check-config` lists every error of a bad file as FILE:LINE: key: message and
    exits non-zero; the shipped deploy/linescan.toml passes."""
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "[frames]\n"
        'endpoint = "tcp://127.0.0.1:99999"\n'
        'rcvhwm = "64"\n'
        "\n"
        "[inspection]\n"
        "strid = 30\n"
        "\n"
        "[queues]\n"
        'overload = "drop-everything"\n'
        "\n"
        "[bogus]\n"
        "x = 1\n"
    )
    res = _cli("check-config", str(bad))
    assert res.returncode != 0
    out = res.stdout.splitlines()
    for line, key in (
        (2, "frames.endpoint"),
        (3, "frames.rcvhwm"),
        (6, "inspection.strid"),
        (9, "queues.overload"),
        (11, "bogus"),
    ):
        assert any(o.startswith(f"{bad}:{line}: {key}:") for o in out), (line, key, out)
    assert any("did you mean 'stride'" in o for o in out), out
    assert "5 error(s)" in res.stderr

    res = _cli("check-config", str(ROOT / "deploy" / "linescan.toml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith(": ok")


# --------------------------------------------------------------------------- 8. demo


def test_demo_runs_and_prints_a_summary(detector: Path, tmp_path: Path) -> None:
    """`linescan demo` with a tiny bundle on free ports prints its events and a summary, and
    exits 0 exactly when the final status arrived and at least one defect was found."""
    ports = free_ports(3)
    config = tmp_path / "demo.toml"
    config.write_text('[engine]\nthreads = 1\nprecision = "fp32"\n')  # two shared cores
    res = _cli(
        "demo", "--config", str(config), "--model", str(detector),
        "--lines", "3000", "--width", "512", "--defects", "2", "--line-rate", "0",
        "--frames", f"tcp://127.0.0.1:{ports[0]}", "--events", f"tcp://127.0.0.1:{ports[1]}",
        "--metrics", f"127.0.0.1:{ports[2]}",
    )  # fmt: skip
    out = res.stdout
    assert "sending 3000 lines of 512 px" in out, out + res.stderr
    summary = out[out.index("\nsummary\n") :]
    for label in (
        "planted defects     2",
        "found ",
        "false alarms",
        "lines inspected",
        "frames              received",
        "events lost         0",
    ):
        assert label in summary, (label, summary)
    found = int(summary.split("found", 1)[1].split()[0])
    frames = summary.split("frames              received", 1)[1].split(",")[0].strip()
    assert frames != "None", "the demo ended without a final status"
    assert res.returncode == (0 if found > 0 else 1), out + res.stderr


# --------------------------------------------------------------------------- tools


def test_camsim_and_listen_tools_against_a_daemon(detector: Path, tmp_path: Path) -> None:
    """tools/camsim.py prints the planted defects and feeds the daemon; tools/listen.py records
    the same events as any subscriber, stops when idle and reports no loss."""
    record = tmp_path / "events.jsonl"
    with running(make_config(), load_bundle(detector).meta, torch_backend(detector)) as run:
        listener = subprocess.Popen(
            [sys.executable, str(ROOT / "tools" / "listen.py"), "--endpoint",
             run.daemon.events_endpoint, "--record", str(record), "--timeout", "1", "--quiet"],
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not (record.exists() and '"topic":"status"' in record.read_text()):
                assert listener.poll() is None, "the listener exited before joining"
                assert time.monotonic() < deadline, "the listener never joined"
                time.sleep(0.05)
            cam = subprocess.run(
                [sys.executable, str(ROOT / "tools" / "camsim.py"), "--endpoint",
                 run.daemon.frames_endpoint, "--width", "256", "--lines", "900", "--defects", "2",
                 "--seed", "2", "--frame-height", "64", "--line-rate", "0"],
                capture_output=True, text=True, timeout=60, env=_env(), check=False,
            )  # fmt: skip
            assert cam.returncode == 0, cam.stderr
            run.sub.drained(15)
            run.stop()
            _, err = listener.communicate(timeout=30)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.communicate()
    lines = [json.loads(x) for x in cam.stdout.splitlines()]
    planted = synthetic_source(256, 900, 2, seed=2).defects
    assert lines[:2] == [
        {"planted": d.kind, "line_start": d.line, "line_end": d.line_end,
         "x_start": d.x, "x_end": d.x_end}
        for d in planted
    ]  # fmt: skip
    assert lines[2]["sent_frames"] == 15
    assert lines[2]["sent_lines"] == 900
    assert listener.returncode == 0, err
    assert "lost 0 defect event(s)" in err
    recorded = [json.loads(x) for x in record.read_text().splitlines()]
    defects = [e for e in recorded if e["topic"] == "defect"]
    assert [e["seq"] for e in defects] == [e["seq"] for e in run.sub.defects]
    assert all(any(overlaps(d, e) for e in defects) for d in planted)
    assert recorded[-1]["topic"] == "status"
    assert recorded[-1]["final"]


# --------------------------------------------------------------------------- review follow-ups


def test_a_restarted_camera_starts_a_new_segment_instead_of_being_shut_out(
    detector: Path,
) -> None:
    """A camera that restarts (seq back to 0) is a new web segment, not thousands of
    out-of-order rejections; a small step back is still rejected as out of order."""
    h, width = 50, 128
    knot = Defect("knot", line=120, x=50, height=14, width=14)
    web = woven(width, 6 * h, [knot])
    with running(make_config(), load_bundle(detector).meta, torch_backend(detector)) as run:
        sock = run.push()
        send_frames(sock, web, [h] * 6, first_seq=100, end=False)  # seq 100..105
        run.sub.drained(6)
        sock.send_multipart(encode_frame("cam0", 103, web[:h]))  # out of order: rejected
        send_frames(sock, web, [h] * 6, first_seq=0)  # the camera restarted
        run.sub.drained(12)
        final = run.stop()
    assert final["rejected_by_reason"] == {"sequence": 1}
    assert final["frames_inspected"] == 12
    assert final["segments"] == 2
    assert {"camera": "cam0", "line": 6 * h, "why": "restart"} in run.sub.merged("breaks")
    assert sum(overlaps(knot, e) for e in run.sub.defects) == 1  # the first web only
    assert any(e["line_start"] >= 6 * h for e in run.sub.defects), "restarted web not inspected"


def test_frames_of_another_bit_depth_than_the_model_are_rejected(detector: Path) -> None:
    """uint16 frames into an 8-bit model would be normalised wrongly: rejected as dtype."""
    web = woven(128, 200, []).astype(np.uint16) * 257
    with running(make_config(), load_bundle(detector).meta, torch_backend(detector)) as run:
        run.push().send_multipart(encode_frame("cam0", 0, web, end=True))
        status = run.sub.until(lambda s: s["frames_rejected"] >= 1)
        run.stop()
    assert status["rejected_by_reason"] == {"dtype": 1}
    assert status["frames_received"] == 0


def test_the_daemon_uses_the_bundles_stride_and_refuses_one_larger_than_a_tile(
    detector: Path,
) -> None:
    """No inspection.stride: the bundle's; a stride larger than the tile is a config error."""
    meta = load_bundle(detector).meta
    daemon = Daemon(make_config(), meta, torch_backend(detector))
    assert daemon.grid.stride == meta.stride
    with pytest.raises(ConfigError, match="larger than the model"):
        Daemon(make_config(inspection={"stride": meta.patch + 1}), meta, torch_backend(detector))


def test_a_nan_from_the_engine_is_an_engine_error_and_inspection_resumes(detector: Path) -> None:
    """Non-finite reconstructions are an engine failure (never a defect score that cannot be
    published); the tiler restarts the web after it, so later frames are inspected again."""
    h, width = 40, 128
    knot = Defect("knot", line=560, x=50, height=14, width=14)
    web = woven(width, 20 * h, [knot])
    inner = torch_backend(detector)
    calls = {"done": 0, "fail": -1}

    def poisoned(batch: F32) -> F32:
        calls["done"] += 1
        out = inner.infer(batch)
        if calls["done"] == calls["fail"]:
            out[0, 0, 0, 0] = np.nan
        return out

    config = make_config(inspection={"max_batch": 4, "max_wait_ms": 0.0})
    with running(config, load_bundle(detector).meta, FunctionBackend(poisoned)) as run:
        calls["fail"] = calls["done"] + 3
        sock = run.push()
        for i in range(20):  # one endless web, paced so the failure lands early
            sock.send_multipart(encode_frame("cam0", i, web[i * h : (i + 1) * h], end=i == 19))
            time.sleep(0.02)
        run.sub.drained(20)
        final = run.stop()
    assert final["frames_received"] == final["frames_inspected"] + final["frames_dropped"] == 20
    assert 0 < final["frames_dropped"] < 20
    assert final["segments"] >= 2, "the web was not restarted after the failure"
    assert any(b["why"] == "engine" for b in run.sub.merged("breaks"))
    assert any(overlaps(knot, e) for e in run.sub.defects), "inspection did not resume"


def test_frame_latency_is_measured_on_a_web_without_defects(detector: Path) -> None:
    """A defect-free web still yields end-to-end latency: one observation per frame whose
    lines all became final (capture to inspected), none negative."""
    h, width = 50, 128
    web = woven(width, 8 * h, [])
    with running(make_config(), load_bundle(detector).meta, torch_backend(detector)) as run:
        send_frames(run.push(), web, [h] * 8)
        run.sub.drained(8)
        final = run.stop()
        metrics = scrape(run.metrics_url)
    assert final["defects"] == 0
    assert metrics[("linescan_frame_latency_seconds_count", ())] == 8
    assert metrics[("linescan_frame_latency_seconds_sum", ())] >= 0


def test_serve_speaks_to_systemd(tmp_path: Path, detector: Path) -> None:
    """`linescan serve` under a real $NOTIFY_SOCKET (standing in for systemd): the start
    timeout is extended and a status line set while the model loads, READY=1 follows once it
    inspects, the watchdog is petted, and SIGTERM announces STOPPING=1 before a clean exit."""
    ports = free_ports(3)
    config = _serve_config(tmp_path, detector, *ports)
    with tempfile.TemporaryDirectory(prefix="ls-") as directory:  # AF_UNIX: short paths
        path = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
            systemd.bind(path)
            systemd.settimeout(60)
            env = {
                **_env(),
                "NOTIFY_SOCKET": path,
                "WATCHDOG_USEC": "400000",  # pet every 0.2 s
                "STATE_DIRECTORY": str(tmp_path / "state"),
            }
            log = tmp_path / "serve.log"
            proc = _start_serve(config, log, env)
            try:
                seen: list[bytes] = []
                while b"READY=1" not in seen:
                    seen.append(systemd.recv(4096))
                while seen[-1] != b"WATCHDOG=1":
                    seen.append(systemd.recv(4096))
                proc.send_signal(signal.SIGTERM)
                while seen[-1] != b"STOPPING=1":
                    seen.append(systemd.recv(4096))
                rc = proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert rc == 0, log.read_text()[-3000:]
    assert seen[0].startswith(b"EXTEND_TIMEOUT_USEC=30000000\nSTATUS=loading detector on torch")
    ready = seen.index(b"READY=1")
    assert all(m.startswith(b"EXTEND_TIMEOUT_USEC=") for m in seen[:ready])
    assert seen[ready + 1].startswith(b"STATUS=inspecting frames from tcp://")


# --------------------------------------------------------------------------- a real-looking web


def _disk(web: U8, line: int, x: int, radius: int, grey: int) -> Defect:
    """A flat disk of ``grey`` (a hole, a speck of dirt, a bright fleck); its bounding box."""
    yy, xx = np.mgrid[0 : 2 * radius + 1, 0 : 2 * radius + 1]
    inside = (yy - radius) ** 2 + (xx - radius) ** 2 <= radius * radius
    web[line : line + 2 * radius + 1, x : x + 2 * radius + 1][inside] = grey
    return Defect("hole", line, x, 2 * radius + 1, 2 * radius + 1)


def _bar(web: U8, line: int, x: int, height: int, width: int, grey: int) -> Defect:
    """A flat scratch or line of ``height`` x ``width`` pixels."""
    web[line : line + height, x : x + width] = grey
    return Defect("broken_thread", line, x, height, width)


def test_a_wandering_web_with_planted_defects_through_the_daemon(edged_model: Any) -> None:
    """A web that wanders 32 px sideways past a bright backlight, with five blatant defects
    (dark spots of grey 8 and 10 and a bright one of 250, radius 5-7 px; a 6 x 60 px dark
    scratch just inside the web's edge; a 4 x 100 px bright line across the web), inspected
    by the real daemon with the model's default calibration: every defect is an event, nothing
    else is (not the web's first lines, not its edge), and the status messages and the
    metrics say where the web's edge is."""
    from conftest import EDGED_TEST_LINE, EDGED_WEB, EDGED_WIDTH

    from linescan.data.synthetic import EdgedWeb

    web_def = EdgedWeb(**EDGED_WEB)
    start, lines = EDGED_TEST_LINE, 1600
    web = web_def.lines(start, lines)

    def edge(line: int) -> int:
        return web_def.edge_at(start + line)

    planted = [
        _disk(web, 150, 200, 6, 8),
        _disk(web, 420, edge(420) + 60, 5, 10),
        _disk(web, 700, 300, 7, 250),
        _bar(web, 950, edge(950) + 8, 60, 6, 12),
        _bar(web, 1300, 150, 4, 100, 250),
    ]
    bundle = load_bundle(edged_model.path)
    meta = bundle.meta
    assert meta.calibration is not None and meta.calibration["rule"] == "budget"  # noqa: PT018
    heights = list(np.random.default_rng(4).integers(40, 300, size=40))
    cut = [int(h) for h in np.cumsum(heights) if h < lines]
    sizes = list(np.diff([0, *cut, lines]))
    with running(make_config(), meta, torch_backend(edged_model.path)) as run:
        send_frames(run.push(), web, [int(h) for h in sizes])
        run.sub.drained(len(sizes))
        final = run.stop()
        metrics = scrape(run.metrics_url)
    events = run.sub.defects
    for d in planted:
        assert any(overlaps(d, e) for e in events), f"{d} not found in {events}"
    # A defect disturbs the reconstruction of the tiles around it (64 camera px at this
    # scale): a second region within half a tile of it is the same defect, not a false alarm.
    near = [replace(d, line=max(0, d.line - 32), x=max(0, d.x - 32), height=d.height + 64,
                    width=d.width + 64) for d in planted]  # fmt: skip
    for e in events:
        assert any(overlaps(d, e) for d in near), f"false alarm {e}"
    assert final["frames_inspected"] == len(sizes)
    webs = [s["web"]["cam0"] for s in run.sub.statuses if s["web"].get("cam0")]
    assert webs, "no status message named the web's edges"
    lefts = {w["left_px"] for w in webs}
    assert min(lefts) >= EDGED_WEB["edge"] - 20
    assert max(lefts) <= EDGED_WEB["edge"] + 40
    assert all(w["right_px"] is None for w in webs)
    assert webs[-1]["line"] == lines
    edge_px = metrics[("linescan_web_edge_px", (("camera", "cam0"), ("side", "left")))]
    assert abs(edge_px - edge(lines - 1)) <= 12
    assert web.shape[1] == EDGED_WIDTH
