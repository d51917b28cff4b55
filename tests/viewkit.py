"""Shared by the tests of what the operator sees (pictures, repeats, the page, the report):
a detector bundle, a running daemon with its HTTP server and page, a web with planted spots,
and headless Chromium.

The detector is the untrained "flat grey" L2 bundle of ``test_service.py`` (its reconstruction
is nearly the web's mean grey, so its residual is high exactly where the web leaves its grey
range: holes, knots, stains): built in milliseconds, run by the real torch engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
import zmq

from linescan.backends import Backend, create_backend
from linescan.config import Config
from linescan.data.synthetic import Defect, WovenWeb, plant_defects
from linescan.ingest import encode_frame
from linescan.listen import LossTracker, listen
from linescan.metrics import MetricsServer
from linescan.model.bundle import BundleMeta, build_module, load_bundle, save_bundle
from linescan.service import Daemon

Body = dict[str, Any]
U8 = npt.NDArray[np.uint8]
DETECTOR_THRESHOLD = 0.025


def save_detector(path: Path, downscale: int = 1) -> Path:
    """The flat-grey L2 detector bundle (threshold in the bundle)."""
    from linescan.preprocess import InputSpec

    meta = BundleMeta(
        loss="l2", latent=8, patch=32, residual="l2", input=InputSpec(downscale=downscale),
        name="detector", threshold=DETECTOR_THRESHOLD,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = build_module(meta)
    last = [m for m in module.modules() if isinstance(m, torch.nn.ConvTranspose2d)][-1]
    if last.bias is None:
        raise RuntimeError("the last layer has no bias")
    with torch.no_grad():
        last.weight.mul_(0.02)
        last.bias.fill_(0.47)  # the woven web's mean grey, normalised
    save_bundle(path, module, meta)
    return path


def backend(bundle: Path) -> Backend:
    return create_backend(load_bundle(bundle), "torch", "fp32", threads=1, batch=64)


def make_config(**sections: dict[str, Any]) -> Config:
    """Loopback ephemeral ports, fast status messages, one engine thread, no frame dropped."""
    base: dict[str, dict[str, Any]] = {
        "frames": {"endpoint": "tcp://127.0.0.1:*"},
        "events": {"endpoint": "tcp://127.0.0.1:*", "status_interval_s": 0.1},
        "metrics": {"listen": "127.0.0.1:0"},
        "engine": {"precision": "fp32", "threads": 1},
        "queues": {"ingest": 256, "overload": "block"},
        "journal": {"replay_endpoint": "tcp://127.0.0.1:*"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return Config().with_overrides(base)


def spot_web(width: int, lines: int, spots: list[Defect], seed: int = 3) -> U8:
    web = WovenWeb(width, seed).lines(0, lines)
    plant_defects(web, 0, spots)
    return web


def repeated_spots(
    first: int, period: int, count: int, x: int, size: int = 14, kind: str = "hole"
) -> list[Defect]:
    return [Defect(kind, line=first + k * period, x=x, height=size, width=size)
            for k in range(count)]  # fmt: skip


class Subscriber:
    """``linescan.listen.listen`` in a thread; the test reads what it heard in order.

    It stops by itself on the daemon's final status message.
    """

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.defects: list[Body] = []
        self.statuses: list[Body] = []
        self.loss: LossTracker | None = None
        self._q: queue.Queue[tuple[str, Body]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-subscriber", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        def on_event(topic: str, body: Body) -> bool:
            self._q.put((topic, body))
            return bool(body.get("final")) or self._stop.is_set()

        self.loss = listen(self.endpoint, on_event, timeout_s=5.0)

    def until(self, done: Callable[[Body], bool], timeout: float = 30.0) -> Body:
        """Read events until a status message satisfies ``done``; returns that status."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                last = self.statuses[-1] if self.statuses else None
                pytest.fail(f"no status satisfied the condition in {timeout} s; last: {last}")
            try:
                topic, body = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if topic == "defect":
                self.defects.append(body)
            else:
                self.statuses.append(body)
                if done(body):
                    return body

    def joined(self) -> Body:
        """Wait for the first status message: the subscription is live (PUB slow joiner)."""
        return self.until(lambda s: True, timeout=10)

    def final(self) -> Body:
        return self.until(lambda s: bool(s["final"]))

    def drained(self, frames: int) -> Body:
        """Wait until ``frames`` frames are received and every one is inspected or dropped."""
        return self.until(
            lambda s: (
                s["frames_received"] >= frames
                and s["frames_inspected"] + s["frames_dropped"] == s["frames_received"]
            )
        )

    def merged(self, key: str) -> list[Body]:
        """``not_inspected`` or ``breaks`` from every status message, in order."""
        return [rec for s in self.statuses for rec in s[key]]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "subscriber did not stop"


@dataclass
class Running:
    """A started daemon, its HTTP server (metrics and the page) and a joined subscriber."""

    daemon: Daemon
    url: str
    sub: Subscriber

    @property
    def defects(self) -> list[Body]:
        return self.sub.defects

    @property
    def statuses(self) -> list[Body]:
        return self.sub.statuses

    def send(self, web: U8, height: int = 200, camera: str = "cam0", end: bool = True) -> int:
        """Send ``web`` in frames of ``height`` lines; returns how many frames."""
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.connect(self.daemon.frames_endpoint)
        n = 0
        try:
            for i, start in enumerate(range(0, len(web), height)):
                block = web[start : start + height]
                last = start + height >= len(web)
                msg = encode_frame(
                    camera, i, block, t_capture_ns=time.time_ns(), line=start, end=end and last
                )
                sock.send_multipart(msg)
                n += 1
        finally:
            sock.close()
        return n

    def until(self, done: Callable[[Body], bool], timeout: float = 60.0) -> Body:
        return self.sub.until(done, timeout)

    def drained(self, frames: int) -> Body:
        """Every frame sent is inspected, and the segment's tail is out (``end`` flag)."""
        return self.until(
            lambda s: (
                s["frames_received"] >= frames
                and s["frames_inspected"] + s["frames_dropped"] == s["frames_received"]
                and s["queues"]["publish"] == 0
                and s["queues"]["inference"] == 0
                and s["queues"]["ingest"] == 0
            )
        )


@contextlib.contextmanager
def running(config: Config, bundle: Path) -> Iterator[Running]:
    """A daemon with its metrics server and the live page, and a joined subscriber."""
    meta = load_bundle(bundle).meta
    daemon = Daemon(config, meta, backend(bundle))
    server = MetricsServer(
        daemon.registry, config.metrics.host, 0, lambda: daemon.ready, app=daemon.view
    )
    server.start()
    sub: Subscriber | None = None
    try:
        daemon.start()
        sub = Subscriber(daemon.events_endpoint)
        sub.joined()
        yield Running(daemon, f"http://127.0.0.1:{server.port}", sub)
    finally:
        daemon.stop()
        daemon.join(30)
        if sub is not None:
            sub.close()
        server.stop()


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held open while they are chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def http(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def http_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, body = http(url, headers)
    return status, json.loads(body)


# --------------------------------------------------------------------------- Chromium


def chromium() -> str:
    """The headless browser, or a skip that says how to get one."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        "no Chromium: `apt-get install chromium` (CI installs it as root; see .ci/run) to run "
        "the browser tests"
    )


def chromium_run(url: str, *args: str, budget_ms: int = 8000, timeout: float = 90.0) -> str:
    """Run headless Chromium on ``url`` with a fresh profile; returns its standard output.

    ``--virtual-time-budget`` lets the page's own timers and fetches run for that long (in
    virtual time: Chromium waits for the network) before it dumps or screenshots.
    """
    exe = chromium()
    with tempfile.TemporaryDirectory(prefix="linescan-chromium-") as profile:
        cmd = [
            exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}", *args, url,
        ]  # fmt: skip
        env = {**os.environ, "HOME": profile}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout
