#!/usr/bin/env python
"""Fuzz the daemon's frame socket: malformed frames between valid ones, over a real PUSH socket.

Every malformed message has a known expected rejection reason (``ingest.py``'s reasons plus the
daemon's ``sequence`` and narrow-width ``dims``): random bytes, wrong part counts, truncated,
binary and oversized headers, unknown versions and dtypes, missing and mistyped fields,
negative and absurd dimensions (refused before anything is allocated), payloads too short or
too long, duplicate and out-of-order ``seq``, and frames "corrupted in transit" whose ``seq`` is
lost (the next valid frame then shows a sequence gap). Valid frames of a flat web, some with a
planted dark square, go in between. Afterwards the daemon's status counters must match
exactly: every malformed message rejected with its reason, every valid frame inspected, every
planted defect found, one sequence gap (and one not-inspected line range) per lost run.

    .venv/bin/python tools/fuzz.py --seconds 30              # an in-process daemon
    .venv/bin/python tools/fuzz.py --frames tcp://127.0.0.1:5555 --events tcp://127.0.0.1:5556

Against a running daemon it uses a camera name of its own and compares counter deltas; that
daemon must run a model that sees a flat grey web as defect-free (``flat_bundle`` below makes
one) and at least ``--width`` wide. Payloads larger than ``frames.max_bytes`` + 64 KiB are not
sent: ZeroMQ itself refuses those by closing the connection (see tests/test_reliability.py).

The flat-web model helpers here (``flat_meta``, ``flat_backend``, ``flat_bundle``) are shared
with ``tools/soak.py`` and the tests.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zmq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from linescan.backends import FunctionBackend  # noqa: E402
from linescan.errors import FrameError  # noqa: E402
from linescan.ingest import MAX_HEADER_BYTES, FrameLimits, encode_frame, parse_frame  # noqa: E402
from linescan.model.bundle import BundleMeta  # noqa: E402
from linescan.preprocess import InputSpec  # noqa: E402
from linescan.service import REORDER_WINDOW  # noqa: E402

LEVEL = 128  # grey level of the flat web
PATCH = 32
STRIDE = 16
F32 = npt.NDArray[np.float32]

# ----------------------------------------------------------------------------- the flat web


def flat_meta(threshold: float = 0.5, patch: int = PATCH, stride: int = STRIDE) -> BundleMeta:
    """Metadata of a model that "reconstructs" every tile as flat grey: a planted dark square
    is the only thing it cannot explain."""
    return BundleMeta(
        loss="ssim",
        latent=16,
        patch=patch,
        residual="ssim",
        input=InputSpec(downscale=1),
        stride=stride,
        threshold=threshold,
        name="flat",
        weights_sha256="0" * 64,
    )


def flat_backend(delay_s: float = 0.0, per_tile_s: float = 0.0) -> FunctionBackend:
    """The flat model as a function; ``delay_s`` per batch and ``per_tile_s`` per tile make
    it as slow as a test needs (to overload the daemon on purpose)."""

    def fn(batch: F32) -> F32:
        if delay_s or per_tile_s:
            time.sleep(delay_s + per_tile_s * len(batch))
        return np.full_like(batch, LEVEL / 255.0)

    return FunctionBackend(fn, name="flat")


def flat_bundle(path: Path, patch: int = PATCH, latent: int = 16, threshold: float = 0.5) -> Path:
    """A real model bundle (``linescan serve --model``) whose network outputs flat grey:
    zero weights and the last layer's bias at the grey level. No training needed."""
    import torch

    from linescan.model.autoencoder import Autoencoder
    from linescan.model.bundle import save_bundle, update_meta

    module = Autoencoder(patch, latent)
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
        last = [m for m in module.modules() if isinstance(m, torch.nn.ConvTranspose2d)][-1]
        if last.bias is None:  # pragma: no cover - the architecture has biases
            raise RuntimeError("the last layer has no bias")
        last.bias.fill_(LEVEL / 255.0)
    meta = flat_meta(threshold, patch)
    save_bundle(path, module, meta)
    update_meta(path, threshold=threshold)
    return path


def web_frame(
    height: int, width: int, defect: tuple[int, int, int, int] | None = None
) -> npt.NDArray[np.uint8]:
    """Flat grey lines; ``defect`` = (row, x, rows, cols) is painted black."""
    px = np.full((height, width), LEVEL, np.uint8)
    if defect is not None:
        r, x, h, w = defect
        px[r : r + h, x : x + w] = 0
    return px


# ----------------------------------------------------------------------------- messages


@dataclass
class Message:
    kind: str
    parts: list[bytes]
    expect: str | None  # the reject reason; None for a valid frame
    seq: int | None = None
    lines: tuple[int, int] | None = None  # absolute lines [start, end) of a (lost) frame
    consumes_seq: bool = False  # its seq is lost: the next valid frame follows a gap
    defect: tuple[int, int, int, int] | None = None  # (line0, x0, line1, x1), absolute


def oracle(parts: list[bytes], limits: FrameLimits) -> str | None:
    """What ``parse_frame`` says about a message: its reject reason, or None if it parses."""
    try:
        parse_frame(parts, limits, 0)
    except FrameError as exc:
        return exc.reason
    return None


class Planner:
    """Builds valid frames of one camera and malformed messages with known reasons."""

    def __init__(
        self,
        rng: random.Random,
        width: int = 128,
        height: int = PATCH,
        camera: str = "cam0",
        limits: FrameLimits | None = None,
        first_seq: int = 0,
        first_line: int = 0,
    ) -> None:
        self.rng = rng
        self.width = width
        self.height = height
        self.camera = camera
        self.limits = limits or FrameLimits(max_width=4096, max_height=4096, max_bytes=1 << 20)
        self.next_seq = first_seq
        self.next_line = first_line
        self.valid_sent: list[Message] = []

    def _frame(
        self, defect: bool, end: bool = False
    ) -> tuple[list[bytes], tuple[int, int, int, int] | None]:
        rect = None
        square = None
        if defect:
            rows = min(16, self.height)
            r = (self.height - rows) // 2
            x = self.rng.randrange(8, max(9, self.width - 24))
            square = (r, x, rows, 16)
            rect = (self.next_line + r, x, self.next_line + r + rows, x + 16)
        px = web_frame(self.height, self.width, square)
        parts = encode_frame(self.camera, self.next_seq, px, line=self.next_line, end=end)
        return parts, rect

    def valid(self, defect: bool = False, end: bool = False) -> Message:
        """The next frame of the web; ``end`` closes the segment (its events are all out)."""
        parts, rect = self._frame(defect, end)
        lines = (self.next_line, self.next_line + self.height)
        m = Message("valid", parts, None, self.next_seq, lines, defect=rect)
        self.next_seq += 1
        self.next_line += self.height
        self.valid_sent.append(m)
        return m

    def _header(self, **changes: Any) -> dict[str, Any]:
        h: dict[str, Any] = {
            "v": 1,
            "camera": self.camera,
            "seq": self.next_seq,
            "height": self.height,
            "width": self.width,
            "dtype": "uint8",
            "line": self.next_line,
        }
        for k, v in changes.items():
            if v is _DELETE:
                h.pop(k, None)
            else:
                h[k] = v
        return h

    def _msg(
        self, kind: str, header: dict[str, Any] | bytes, payload: bytes | None = None
    ) -> Message:
        head = header if isinstance(header, bytes) else json.dumps(header).encode()
        if payload is None:
            payload = bytes(self.height * self.width)
        parts = [head, payload]
        return Message(kind, parts, oracle(parts, self.limits))

    def bad(self, kind: str) -> Message:
        """One malformed message of ``kind`` (see KINDS); its ``expect`` is the reason."""
        rng = self.rng
        good = self._header()
        head = json.dumps(good).encode()
        payload = bytes(self.height * self.width)
        if kind == "random_bytes":
            while True:
                parts = [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.choice((1, 2, 3)))]
                reason = oracle(parts, self.limits)
                if reason is not None:
                    return Message(kind, parts, reason)
        if kind == "one_part":
            return Message(kind, [head], oracle([head], self.limits))
        if kind == "three_parts":
            parts = [head, payload, b"extra"]
            return Message(kind, parts, oracle(parts, self.limits))
        if kind == "truncated_header":
            return self._msg(kind, head[: rng.randrange(1, len(head) - 1)], payload)
        if kind == "binary_header":
            return self._msg(kind, b"\xff\xfe\x00" + rng.randbytes(20), payload)
        if kind == "json_not_object":
            return self._msg(kind, rng.choice([b"[1,2,3]", b"42", b'"frame"', b"null"]), payload)
        if kind == "oversized_header":
            return self._msg(kind, self._header(pad="x" * (MAX_HEADER_BYTES + 10)), payload)
        if kind == "version":
            return self._msg(kind, self._header(v=rng.choice([0, 2, 99, "1", True])), payload)
        if kind == "missing_field":
            key = rng.choice(["v", "seq", "height", "width", "dtype"])
            return self._msg(kind, self._header(**{key: _DELETE}), payload)
        if kind == "wrong_type":
            key, value = rng.choice(
                [
                    ("seq", -1),
                    ("seq", 2**64),
                    ("seq", "7"),
                    ("height", "32"),
                    ("width", True),
                    ("width", 1.5),
                    ("camera", "bad camera!"),
                    ("end", "yes"),
                    ("line", -3),
                    ("dtype", 8),
                ]
            )
            return self._msg(kind, self._header(**{key: value}), payload)
        if kind == "unknown_dtype":
            dtype = rng.choice(["float32", "int8", "uint32", "", "UINT8", "uint8 "])
            return self._msg(kind, self._header(dtype=dtype), payload)
        if kind == "negative_dims":
            key = rng.choice(["height", "width"])
            return self._msg(kind, self._header(**{key: rng.choice([0, -1, -(2**40)])}), payload)
        if kind == "absurd_dims":
            h, w = rng.choice(
                [
                    (2**40, 2**40),
                    (2**62, 1),
                    (1, 2**62),
                    (self.limits.max_height + 1, self.width),
                    (self.height, self.limits.max_width + 1),
                ]
            )
            return self._msg(kind, self._header(height=h, width=w), payload)
        if kind == "over_max_bytes":
            side = self.limits.max_width
            return self._msg(kind, self._header(height=side, width=side, dtype="uint16"), payload)
        if kind == "truncated_payload":
            return self._msg(kind, head, payload[: -rng.randrange(1, len(payload))])
        if kind == "oversized_payload":
            return self._msg(kind, head, payload + bytes(rng.randrange(1, 4096)))
        if kind == "dtype_size_mismatch":
            return self._msg(kind, self._header(dtype="uint16"), payload)
        if kind == "narrow":
            # parses, but is narrower than one tile of the model: the daemon's own check
            narrow = self._header(width=4)
            parts = [json.dumps(narrow).encode(), bytes(self.height * 4)]
            return Message(kind, parts, "dims")
        if kind in ("duplicate", "out_of_order"):
            m = self.valid_sent[-1]
            if kind == "out_of_order":
                # The daemon expects the seq after the last valid frame it received and takes a
                # step back of more than REORDER_WINDOW *seqs* (not valid frames: lost frames
                # between them count) as a restarted camera, not as a frame out of order.
                expected_seq = m.seq + 1 if m.seq is not None else 0
                back = [
                    v
                    for v in self.valid_sent[-REORDER_WINDOW - 1 : -1]
                    if v.seq is not None and expected_seq - v.seq <= REORDER_WINDOW
                ]
                if back:
                    m = rng.choice(back)
            return Message(kind, list(m.parts), "sequence", m.seq)
        if kind == "corrupted_in_transit":
            # a real frame whose payload lost bytes: rejected, and its seq never arrives
            parts, _ = self._frame(defect=False)
            parts = [parts[0], parts[1][: -rng.randrange(1, len(parts[1]))]]
            lines = (self.next_line, self.next_line + self.height)
            m = Message(kind, parts, "size", self.next_seq, lines, consumes_seq=True)
            self.next_seq += 1
            self.next_line += self.height
            return m
        raise ValueError(f"unknown kind {kind!r}")


_DELETE = object()

KINDS = (
    "random_bytes",
    "one_part",
    "three_parts",
    "truncated_header",
    "binary_header",
    "json_not_object",
    "oversized_header",
    "version",
    "missing_field",
    "wrong_type",
    "unknown_dtype",
    "negative_dims",
    "absurd_dims",
    "over_max_bytes",
    "truncated_payload",
    "oversized_payload",
    "dtype_size_mismatch",
    "narrow",
    "duplicate",
    "out_of_order",
    "corrupted_in_transit",
)


def plan(planner: Planner, actions: list[tuple[str, bool]]) -> list[Message]:
    """Messages for ``actions`` = [(kind or "valid", defect?)]; always starts with a valid
    frame (sequence kinds need one) and ends with one that ends the segment (a lost frame at
    the very end would not show as a gap, and the segment's last events are then out)."""
    out = [planner.valid()]
    for kind, defect in actions:
        out.append(planner.valid(defect) if kind == "valid" else planner.bad(kind))
    out.append(planner.valid(end=True))
    return out


@dataclass
class Expected:
    valid: int = 0
    valid_lines: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    gaps: int = 0
    gap_ranges: list[tuple[int, int]] = field(default_factory=list)
    defects: list[tuple[int, int, int, int]] = field(default_factory=list)


def expected(messages: list[Message]) -> Expected:
    """What the daemon must report for ``messages`` sent in order (nothing dropped)."""
    e = Expected()
    lost: list[tuple[int, int]] = []
    for m in messages:
        if m.expect is not None:
            e.rejected[m.expect] += 1
            if m.consumes_seq and m.lines is not None:
                lost.append(m.lines)
            continue
        e.valid += 1
        if m.lines is not None:
            e.valid_lines += m.lines[1] - m.lines[0]
        if lost:
            e.gaps += 1
            e.gap_ranges.append((lost[0][0], lost[-1][1]))
            lost = []
        if m.defect is not None:
            e.defects.append(m.defect)
    return e


def overlaps(rect: tuple[int, int, int, int], event: dict[str, Any]) -> bool:
    l0, x0, l1, x1 = rect
    return bool(
        event["line_start"] < l1
        and l0 < event["line_end"]
        and event["x_start"] < x1
        and x0 < event["x_end"]
    )


def send(
    endpoint: str,
    messages: list[Message],
    context: zmq.Context[zmq.Socket[bytes]],
    pace_s: float = 0.0,
    configure: Callable[[zmq.Socket[bytes]], None] | None = None,
) -> None:
    """PUSH the messages in order (``pace_s`` between valid frames); waits for delivery."""
    sock = context.socket(zmq.PUSH)
    try:
        sock.setsockopt(zmq.LINGER, 10_000)
        sock.setsockopt(zmq.SNDHWM, 1000)
        if configure is not None:
            configure(sock)
        sock.connect(endpoint)
        for m in messages:
            sock.send_multipart(m.parts)
            if pace_s and m.expect is None:
                time.sleep(pace_s)
    finally:
        sock.close()  # lingers until delivered


# ----------------------------------------------------------------------------- a whole run


@dataclass
class FuzzReport:
    messages: int
    expected: Expected
    observed: dict[str, Any]  # counter deltas from status messages
    found: int
    events: int
    problems: list[str]


STATUS_KEYS = (
    "frames_received",
    "frames_rejected",
    "frames_inspected",
    "frames_dropped",
    "lines_inspected",
    "lines_dropped",
    "sequence_gaps",
)


def _delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: b[k] - a.get(k, 0) for k in STATUS_KEYS}
    reasons = Counter(b["rejected_by_reason"])
    reasons.subtract(Counter(a.get("rejected_by_reason", {})))
    out["rejected_by_reason"] = {k: v for k, v in reasons.items() if v}
    return out


def check(
    messages: list[Message], observed: dict[str, Any], events: list[dict[str, Any]]
) -> list[str]:
    """Every way ``observed`` (status counter deltas) and ``events`` differ from the plan."""
    e = expected(messages)
    problems = []
    want = {
        "frames_received": e.valid,
        "frames_rejected": sum(e.rejected.values()),
        "frames_inspected": e.valid,
        "frames_dropped": 0,
        "lines_inspected": e.valid_lines,
        "lines_dropped": 0,
        "sequence_gaps": e.gaps,
        "rejected_by_reason": dict(e.rejected),
    }
    for k, v in want.items():
        if observed.get(k) != v:
            problems.append(f"{k}: expected {v}, daemon says {observed.get(k)}")
    gaps = sorted(
        (r["line_start"], r["line_end"])
        for r in observed.get("not_inspected", [])
        if str(r["why"]).startswith("sequence gap")
    )
    if gaps != sorted(e.gap_ranges):
        problems.append(f"gap ranges: expected {sorted(e.gap_ranges)}, daemon says {gaps}")
    missed = [d for d in e.defects if not any(overlaps(d, ev) for ev in events)]
    if missed:
        problems.append(f"planted defects not found: {missed}")
    extra = [ev for ev in events if not any(overlaps(d, ev) for d in e.defects)]
    if extra:
        problems.append(f"{len(extra)} defect event(s) where nothing was planted")
    return problems


class StatusWatch:
    """Subscribes to a daemon's events; keeps the last status, not-inspected ranges and
    defect events (of one camera)."""

    def __init__(
        self,
        endpoint: str,
        context: zmq.Context[zmq.Socket[bytes]],
        camera: str,
        configure: Callable[[zmq.Socket[bytes]], None] | None = None,
    ) -> None:
        self.camera = camera
        self.last: dict[str, Any] | None = None
        self.not_inspected: list[dict[str, Any]] = []
        self.defects: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = context.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        if configure is not None:
            configure(self._sock)
        self._sock.connect(endpoint)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._sock.poll(100):
                    continue
                topic, body = self._sock.recv_multipart()[:2]
                doc = json.loads(body)
                with self._lock:
                    if topic == b"status":
                        self.last = doc
                        self.not_inspected += [
                            r for r in doc["not_inspected"] if r["camera"] == self.camera
                        ]
                    elif doc.get("camera") == self.camera:
                        self.defects.append(doc)
        finally:
            self._sock.close()

    def snapshot(self) -> dict[str, Any] | None:
        with self._lock:
            return None if self.last is None else dict(self.last)

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.snapshot()
            if s is not None and pred(s):
                return s
            time.sleep(0.05)
        raise TimeoutError(f"no matching status in {timeout} s (last: {self.snapshot()})")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def fuzz_round(
    frames: str,
    watch: StatusWatch,
    context: zmq.Context[zmq.Socket[bytes]],
    planner: Planner,
    n: int = 40,
    bad_fraction: float = 0.5,
    pace_s: float = 0.002,
    timeout: float = 60.0,
    configure: Callable[[zmq.Socket[bytes]], None] | None = None,
) -> FuzzReport:
    """One round against a running daemon: plan, send, wait for the counters, compare."""
    rng = planner.rng
    actions = [
        (rng.choice(KINDS), False) if rng.random() < bad_fraction else ("valid", rng.random() < 0.3)
        for _ in range(n)
    ]
    before = watch.wait(lambda s: True, timeout)
    # a status with the queues empty: counters from before this round are settled
    before = watch.wait(
        lambda s: s["frames_inspected"] + s["frames_dropped"] == s["frames_received"], timeout
    )
    with watch._lock:
        watch.not_inspected.clear()
        n_events = len(watch.defects)
    messages = plan(planner, actions)
    send(frames, messages, context, pace_s, configure)
    total = len(messages)

    def settled(s: dict[str, Any]) -> bool:
        d = _delta(before, s)
        return bool(
            d["frames_received"] + d["frames_rejected"] >= total
            and s["frames_inspected"] + s["frames_dropped"] == s["frames_received"]
        )

    after = watch.wait(settled, timeout)
    time.sleep(0.3)  # events of the segment the last frame ended
    observed = _delta(before, after)
    with watch._lock:
        observed["not_inspected"] = list(watch.not_inspected)
        events = watch.defects[n_events:]
    problems = check(messages, observed, events)
    e = expected(messages)
    found = sum(any(overlaps(d, ev) for ev in events) for d in e.defects)
    return FuzzReport(total, e, observed, found, len(events), problems)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--frames", default=None, help="a running daemon's frame endpoint")
    ap.add_argument("--events", default=None, help="its event endpoint")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument(
        "--limits",
        default=None,
        metavar="W,H,BYTES",
        help="the running daemon's frames.max_width, max_height, max_bytes (default: defaults)",
    )
    args = ap.parse_args(argv)
    from prometheus_client import CollectorRegistry

    from linescan.config import Config
    from linescan.service import Daemon

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    daemon = None
    limits = FrameLimits()  # a running daemon's: the defaults (see --frames)
    if args.frames is None:
        config = Config.model_validate(
            {
                "frames": {"endpoint": "tcp://127.0.0.1:*", "max_bytes": 1 << 20},
                "events": {"endpoint": "tcp://127.0.0.1:*", "status_interval_s": 0.1},
                "inspection": {"stride": STRIDE},
                "queues": {"overload": "block"},
                "metrics": {"enabled": False},
            }
        )
        limits = FrameLimits.from_config(config.frames)
        daemon = Daemon(config, flat_meta(), flat_backend(), CollectorRegistry(), ctx)
        daemon.start()
        frames, events = daemon.frames_endpoint, daemon.events_endpoint
    else:
        frames, events = args.frames, args.events
        if events is None:
            ap.error("--events is needed with --frames")
        if args.limits:
            w, h, b = (int(v) for v in args.limits.split(","))
            limits = FrameLimits(w, h, b)
    camera = f"fuzz{args.seed}"
    watch = StatusWatch(events, ctx, camera)
    rng = random.Random(args.seed)
    planner = Planner(rng, args.width, PATCH, camera, limits)
    totals: Counter[str] = Counter()
    failures = 0
    t_end = time.monotonic() + args.seconds
    rounds = 0
    try:
        while time.monotonic() < t_end:
            rep = fuzz_round(frames, watch, ctx, planner)
            rounds += 1
            totals["messages"] += rep.messages
            totals["valid"] += rep.expected.valid
            totals["rejected"] += sum(rep.expected.rejected.values())
            totals["planted"] += len(rep.expected.defects)
            totals["found"] += rep.found
            for p in rep.problems:
                failures += 1
                print(f"round {rounds}: {p}")
            if daemon is not None and not daemon.alive():
                print("the daemon died")
                failures += 1
                break
    finally:
        watch.close()
        if daemon is not None:
            daemon.stop()
            daemon.join(30)
        ctx.term()
    print(
        f"{rounds} rounds, {totals['messages']} messages: {totals['valid']} valid (all "
        f"inspected: {'yes' if not failures else 'NO'}), {totals['rejected']} rejected by reason, "
        f"{totals['found']}/{totals['planted']} planted defects found; {failures} problem(s)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
