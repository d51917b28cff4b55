#!/usr/bin/env python
"""Soak a real ``linescan serve`` process: bad senders, bad frames, overload, SIGKILL restarts.

It builds a tiny model bundle that sees a flat grey web as defect-free (no training: see
``fuzz.flat_bundle``), writes a config with CurveZMQ on the frame and event sockets, the event
journal and the metrics endpoint on loopback, starts ``python -m linescan.cli serve --config``,
and runs, against that one process (restarted as needed):

``auth``      an authorised camera sends frames; senders with an unknown key, plain TCP and a
              wrong server key are refused and counted (no frame of theirs gets in).
``fuzz``      malformed frames between valid ones (``tools/fuzz.py``): each rejected by reason,
              every valid frame inspected, every planted defect found.
``overload``  frames offered at twice the capacity measured just before: offered = inspected
              + dropped + rejected exactly, the not-inspected ranges in status messages add up
              to the lines dropped, and RSS stays bounded.
``restart``   a steady stream of frames with defects while the daemon is SIGKILLed and
              restarted: the journal passes SQLite's integrity check each time, event ``seq``
              continues from the last journaled one, and a subscriber that replays from the
              journal (``replay.follow``) ends up with every event exactly once, identical to
              the journal.

``many daemons`` (``--daemons N``, default 3; 0 skips it) N daemons side by side, each as an
              instance of ``deploy/linescan@.service`` runs (own config, ports,
              ``$STATE_DIRECTORY`` and journal), a camera with defects on each, one subscriber
              following all of them (``replay.follow_many``) while each daemon in turn is
              SIGKILLed and restarted: it must end with every daemon's journal, exactly.

It prints one table row per scenario and exits 1 if any invariant failed::

    nice -n 5 .venv/bin/python tools/soak.py --duration 60     # about 5 minutes
    .venv/bin/python tools/soak.py --short                    # CI-sized, about a minute

``--no-curve`` runs without CurveZMQ (and skips ``auth``); ``--bundle`` soaks another model
(it must see the flat web as defect-free).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
for p in (str(ROOT), str(TOOLS)):
    if p not in sys.path:  # run as a script from a checkout
        sys.path.insert(0, p)

import fuzz  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from linescan.ingest import FrameLimits  # noqa: E402
from linescan.replay import (  # noqa: E402
    EventSource,
    FollowStats,
    ReplayError,
    fetch,
    follow,
    follow_many,
)
from linescan.security import (  # noqa: E402
    CurveKeys,
    client_setup,
    create_keys,
    load_public_key,
    load_secret_key,
)

Ctx = zmq.Context[zmq.Socket[bytes]]
Setup = Callable[[zmq.Socket[bytes]], None]
HEIGHT = fuzz.PATCH  # lines per frame
OVERLOAD_HEIGHT = 4 * fuzz.PATCH  # taller frames: the sender's cost is per frame


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A free loopback port never handed out before in this process (the kernel may offer a
    just-closed port again: two daemons of one test on one port fail to start)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ----------------------------------------------------------------------------- the daemon


class DaemonProcess:
    """A ``linescan serve`` subprocess with its config, keys and journal in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        bundle: Path,
        curve: bool = True,
        threads: int = 1,
        state_directory: bool = False,
        camera: str = "cam0",
    ) -> None:
        """``state_directory``: run as an instance of ``deploy/linescan@.service`` does, with
        ``$STATE_DIRECTORY`` (``workdir/state``) and no ``journal.path`` in the config, so the
        journal lands where the unit's default puts it."""
        self.workdir = workdir
        self.curve = curve
        self.state = workdir / "state" if state_directory else None
        self.journal = (self.state or workdir) / "journal.sqlite"
        self.log = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        keys = workdir / "keys"
        curve_frames = curve_events = ""
        self.camera_keys: CurveKeys | None = None
        self.rogue_keys: CurveKeys | None = None
        self.frames_public: bytes | None = None
        self.events_public: bytes | None = None
        if curve:
            create_keys(keys, "frames")
            create_keys(keys, "events")
            create_keys(keys / "cameras", "camera1")
            _, rogue_secret = create_keys(workdir / "rogue", "rogue")
            (keys / "cameras" / "camera1.key_secret").replace(keys / "camera1.key_secret")
            self.camera_keys = load_secret_key(keys / "camera1.key_secret")
            self.rogue_keys = load_secret_key(rogue_secret)
            self.frames_public = load_public_key(keys / "frames.key")
            self.events_public = load_public_key(keys / "events.key")
            curve_frames = (
                'curve_server_secret_key_file = "keys/frames.key_secret"\n'
                'curve_authorized_keys_dir = "keys/cameras"\n'
            )
            curve_events = 'curve_server_secret_key_file = "keys/events.key_secret"\n'
        self.limits = FrameLimits(4096, 4096, 4 << 20)
        self.config = workdir / "linescan.toml"
        self._settings = (bundle, curve_frames, curve_events, camera, threads)
        self._configure()

    def _configure(self) -> None:
        """Choose the ports and write the config."""
        bundle, curve_frames, curve_events, camera, threads = self._settings
        self.ports = {k: free_port() for k in ("frames", "events", "replay", "metrics")}
        self.frames = f"tcp://127.0.0.1:{self.ports['frames']}"
        self.events = f"tcp://127.0.0.1:{self.ports['events']}"
        self.replay = f"tcp://127.0.0.1:{self.ports['replay']}"
        self.metrics_url = f"http://127.0.0.1:{self.ports['metrics']}"
        self.config.write_text(
            f'[model]\nbundle = "{bundle}"\n'
            f'[frames]\nendpoint = "{self.frames}"\nmax_width = 4096\nmax_height = 4096\n'
            f"max_bytes = {4 << 20}\nrcvhwm = 256\n{curve_frames}"
            f'[events]\nendpoint = "{self.events}"\nstatus_interval_s = 0.2\n{curve_events}'
            f'[metrics]\nlisten = "127.0.0.1:{self.ports["metrics"]}"\n'
            f"[inspection]\nstride = {fuzz.STRIDE}\nmax_batch = 64\nmax_wait_ms = 10.0\n"
            f'camera = "{camera}"\n'
            f"[engine]\nthreads = {threads}\n"
            '[log]\nformat = "json"\nlevel = "warning"\n'
            "[journal]\n"
            + ('path = "journal.sqlite"\n' if self.state is None else "")
            + f'replay_endpoint = "{self.replay}"\n',
            encoding="utf-8",
        )

    # sockets of the clients
    def camera_setup(self) -> Setup | None:
        if not self.curve or self.frames_public is None:
            return None
        return client_setup(self.frames_public, self.camera_keys)

    def events_setup(self) -> Setup | None:
        if not self.curve or self.events_public is None:
            return None
        return client_setup(self.events_public)

    @property
    def pid(self) -> int:
        return 0 if self.proc is None else self.proc.pid

    def start(self, ctx: Ctx, timeout: float = 120.0) -> None:
        """Start ``linescan serve`` and wait until it answers replay requests and /readyz."""
        self.launch()
        self.wait_ready(ctx, timeout)

    def launch(self) -> None:
        """Start ``linescan serve`` (``wait_ready`` waits for it: start several, then wait)."""
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("STATE_DIRECTORY", None)
        if self.state is not None:
            self.state.mkdir(parents=True, exist_ok=True)
            env["STATE_DIRECTORY"] = str(self.state)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "linescan.cli", "serve", "--config", str(self.config)],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.starts += 1

    def wait_ready(self, ctx: Ctx, timeout: float = 120.0) -> None:
        """Wait until the launched daemon answers replay requests and /readyz."""
        if self.proc is None:
            raise RuntimeError("wait_ready before launch")
        deadline = time.monotonic() + timeout
        clashes = 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if "Address already in use" in self.tail() and clashes < 3 and self.starts == 1:
                    # another process took a chosen port between the choice and the bind
                    clashes += 1
                    self.log.write_text("", encoding="utf-8")
                    self.starts = 0
                    self._configure()
                    self.launch()
                    continue
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.tail()}")
            try:
                fetch(self.replay, 0, 1, timeout_s=0.5, context=ctx, configure=self.events_setup())
                with urllib.request.urlopen(f"{self.metrics_url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except (ReplayError, OSError):
                time.sleep(0.2)
        raise TimeoutError(f"daemon not ready in {timeout} s: {self.tail()}")

    def kill(self) -> None:
        """SIGKILL, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM; the exit status (the daemon drains first)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
                return -9
        return int(self.proc.returncode)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += s.value
        return total

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def journal_rows(path: Path) -> list[tuple[int, str]]:
    """(seq, body) of every journaled event, read like any other reader would."""
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return [
            (int(s), str(b)) for s, b in conn.execute("SELECT seq, body FROM events ORDER BY seq")
        ]
    finally:
        conn.close()


def integrity(path: Path) -> str:
    conn = sqlite3.connect(str(path), timeout=10)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


# ----------------------------------------------------------------------------- clients


class Subscriber:
    """A subscriber that never misses a defect event (``replay.follow``) in a thread."""

    def __init__(self, d: DaemonProcess, ctx: Ctx) -> None:
        self.events: list[dict[str, Any]] = []
        self.stats = FollowStats()  # updated while it runs
        self.done = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._d = d

        def on_event(topic: str, body: dict[str, Any]) -> None:
            if topic == "defect":
                with self._lock:
                    self.events.append(body)

        def run() -> None:
            follow(
                d.events,
                d.replay,
                on_event,
                since=0,
                topics=("defect",),
                context=ctx,
                configure=d.events_setup(),
                should_stop=self._stop.is_set,
                replay_timeout_s=1.0,
                stats=self.stats,
            )

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def count(self) -> int:
        with self._lock:
            return len(self.events)

    def wait_for(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count() >= n:
                return True
            time.sleep(0.1)
        return False

    def close(self) -> FollowStats:
        self._stop.set()
        self._thread.join(30)
        self.done = True
        return self.stats


class Sender:
    """Valid frames of one camera at a rate (``fps``, may be changed while it runs), from a
    thread; survives daemon restarts (frames it cannot hand to ZeroMQ within 100 ms are
    counted as not offered)."""

    def __init__(
        self,
        d: DaemonProcess,
        ctx: Ctx,
        planner: fuzz.Planner,
        fps: float,
        defect_every: int = 0,
    ) -> None:
        self.offered = 0
        self.not_offered = 0
        self.planner = planner
        self._stop = threading.Event()
        self._sock = ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, 64)
        self._sock.setsockopt(zmq.SNDTIMEO, 100)
        self._sock.setsockopt(zmq.LINGER, 10_000)
        setup = d.camera_setup()
        if setup is not None:
            setup(self._sock)
        self._sock.connect(d.frames)
        self.fps = fps
        self._every = defect_every
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        due = time.monotonic()
        i = 0
        while not self._stop.is_set():
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            due = max(due, now - 0.5) + 1.0 / self.fps  # behind: catch up half a second at most
            m = self.planner.valid(defect=bool(self._every) and i % self._every == 0)
            try:
                self._sock.send_multipart(m.parts)
                self.offered += 1
            except zmq.Again:
                self.not_offered += 1
            i += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if not self._sock.closed:
            self._sock.close()  # lingers until delivered

    def finish(self) -> tuple[int, int, int, int]:
        """Stop, then send one more frame on the same socket (so it arrives last): it has a
        defect and ends the web, so once its event is out, every event of this camera is.
        The defect's (line0, x0, line1, x1)."""
        self._stop.set()
        self._thread.join(10)
        m = self.planner.valid(defect=True, end=True)
        self._sock.setsockopt(zmq.SNDTIMEO, 30_000)
        self._sock.send_multipart(m.parts)
        self.offered += 1
        self.stop()
        if m.defect is None:  # pragma: no cover - asked for one
            raise RuntimeError("the last frame has no defect")
        return m.defect


@contextlib.contextmanager
def watching(d: DaemonProcess, ctx: Ctx, camera: str) -> Iterator[fuzz.StatusWatch]:
    watch = fuzz.StatusWatch(d.events, ctx, camera, d.events_setup())
    try:
        watch.wait(lambda s: True, 30)
        yield watch
    finally:
        watch.close()


def settled(s: dict[str, Any]) -> bool:
    return bool(
        s["frames_inspected"] + s["frames_dropped"] == s["frames_received"]
        and s["queues"]["ingest"] == 0
        and s["queues"]["inference"] == 0
        and s["queues"]["publish"] == 0
    )


# ----------------------------------------------------------------------------- scenarios


@dataclass
class Row:
    """One line of the table; None: not measured in this scenario."""

    scenario: str
    offered: int | None = None
    inspected: int | None = None
    dropped: int | None = None
    rejected: int | None = None
    published: int | None = None
    journaled: int | None = None
    replayed: int | None = None
    rss_start_mib: float | None = None
    rss_end_mib: float | None = None
    restarts: int | None = None
    seconds: float = 0.0
    notes: str = ""
    problems: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, d: DaemonProcess, ctx: Ctx, width: int) -> None:
        self.d = d
        self.ctx = ctx
        self.width = width
        self.sub = Subscriber(d, ctx)

    def _planner(self, camera: str, height: int = HEIGHT) -> fuzz.Planner:
        return fuzz.Planner(random.Random(camera), self.width, height, camera, self.d.limits)

    def _capacity(self, watch: fuzz.StatusWatch, seconds: float) -> float:
        """Frames per second the daemon inspects at most: the offered rate doubles each step
        until the inspected rate stops growing (batches fill up as the rate grows, so the
        capacity is only reached once frames are being dropped)."""
        planner = self._planner("calibrate", OVERLOAD_HEIGHT)
        step = max(1.0, seconds / 5)
        rate = 10.0
        best = 0.0
        while True:
            a = watch.wait(settled, 120)
            sender = Sender(self.d, self.ctx, planner, rate)
            time.sleep(step)
            sender.stop()
            b = watch.wait(
                lambda s, a=a, n=sender.offered: (
                    settled(s) and s["frames_received"] - a["frames_received"] >= n
                ),
                120,
            )
            inspected = (b["frames_inspected"] - a["frames_inspected"]) / step
            dropped = b["frames_dropped"] - a["frames_dropped"]
            if (dropped > 0.05 * sender.offered and inspected < 1.1 * best) or rate > 5000:
                return max(best, inspected)
            best = max(best, inspected)
            rate *= 2

    def _mark(self) -> tuple[int, int, int]:
        st = self.sub.stats
        return (st.live, st.replayed, len(journal_rows(self.d.journal)))

    def _events(self, row: Row, mark: tuple[int, int, int]) -> None:
        st = self.sub.stats
        row.published = st.live - mark[0]
        row.replayed = st.replayed - mark[1]
        row.journaled = len(journal_rows(self.d.journal)) - mark[2]

    def _counts(self, row: Row, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        d = fuzz._delta(before, after)
        row.inspected = d["frames_inspected"]
        row.dropped = d["frames_dropped"]
        row.rejected = d["frames_rejected"]
        return d

    # ------------------------------------------------------------------ auth
    def auth(self, seconds: float) -> Row:
        row = Row("auth")
        d, t0 = self.d, time.monotonic()
        if not d.curve or d.frames_public is None or d.rogue_keys is None:
            row.notes = "skipped (no CurveZMQ)"
            return row
        row.rss_start_mib = d.rss_kib() / 1024
        mark = self._mark()
        fail0 = {
            r: d.metric("linescan_auth_failures_total", {"reason": r}) for r in ("key", "protocol")
        }
        rogues: list[tuple[str, Setup | None]] = [
            ("unknown key", client_setup(d.frames_public, d.rogue_keys)),
            ("plain TCP", None),
            ("wrong server key", client_setup(d.rogue_keys.public, d.camera_keys)),
        ]
        socks = []
        with watching(d, self.ctx, "auth") as watch:
            before = watch.wait(settled, 30)
            for _name, setup in rogues:
                s = self.ctx.socket(zmq.PUSH)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDHWM, 4)
                if setup is not None:
                    setup(s)
                s.connect(d.frames)
                socks.append(s)
            rogue_planner = fuzz.Planner(random.Random(1), self.width, HEIGHT, "rogue", d.limits)
            sender = Sender(d, self.ctx, self._planner("auth"), 20.0, defect_every=5)
            t_end = time.monotonic() + seconds
            tried = 0
            while time.monotonic() < t_end:
                m = rogue_planner.valid(defect=True)
                for s in socks:
                    with contextlib.suppress(zmq.Again):
                        s.send_multipart(m.parts, flags=zmq.NOBLOCK)
                        tried += 1
                time.sleep(0.05)
            sender.stop()
            row.offered = sender.offered
            after = watch.wait(
                lambda s: (
                    settled(s)
                    and s["frames_received"] - before["frames_received"] >= sender.offered
                ),
                60,
            )
            dlt = self._counts(row, before, after)
            time.sleep(0.5)
            rogue_seen = any(r["camera"] == "rogue" for r in after["not_inspected"])
        for s in socks:
            s.close(linger=0)
        fails = {
            r: d.metric("linescan_auth_failures_total", {"reason": r}) - fail0[r]
            for r in ("key", "protocol")
        }
        row.rss_end_mib = d.rss_kib() / 1024
        self._events(row, mark)
        row.seconds = time.monotonic() - t0
        row.notes = f"refused handshakes: {fails['key']:.0f} key, {fails['protocol']:.0f} protocol"
        if dlt["frames_received"] != sender.offered or rogue_seen:
            row.problems.append(
                f"frames received {dlt['frames_received']} != the authorised camera's "
                f"{sender.offered}"
            )
        if fails["key"] < 1 or fails["protocol"] < 2:
            row.problems.append(f"refusals not counted: {fails}")
        if after.get("auth_failures", 0) < 3:
            row.problems.append(f"status auth_failures {after.get('auth_failures')} < 3")
        return row

    # ------------------------------------------------------------------ fuzz
    def fuzz(self, seconds: float) -> Row:
        row = Row("fuzz", offered=0, inspected=0, dropped=0, rejected=0)
        d, t0 = self.d, time.monotonic()
        row.rss_start_mib = d.rss_kib() / 1024
        mark = self._mark()
        planner = fuzz.Planner(random.Random(7), self.width, HEIGHT, "fuzz", d.limits)
        found = planted = 0
        with watching(d, self.ctx, "fuzz") as watch:
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                rep = fuzz.fuzz_round(
                    d.frames,
                    watch,
                    self.ctx,
                    planner,
                    n=40,
                    pace_s=0.01,
                    configure=d.camera_setup(),
                )
                row.offered = (row.offered or 0) + rep.messages
                row.inspected = (row.inspected or 0) + rep.observed["frames_inspected"]
                row.dropped = (row.dropped or 0) + rep.observed["frames_dropped"]
                row.rejected = (row.rejected or 0) + rep.observed["frames_rejected"]
                found += rep.found
                planted += len(rep.expected.defects)
                row.problems += rep.problems
        row.rss_end_mib = d.rss_kib() / 1024
        self._events(row, mark)
        row.seconds = time.monotonic() - t0
        row.notes = f"{found}/{planted} planted defects found"
        if row.offered != (row.inspected or 0) + (row.dropped or 0) + (row.rejected or 0):
            row.problems.append("offered != inspected + dropped + rejected")
        return row

    # ------------------------------------------------------------------ overload
    def overload(self, seconds: float, calibrate_s: float) -> Row:
        row = Row("overload")
        d, t0 = self.d, time.monotonic()
        mark = self._mark()
        with watching(d, self.ctx, "over") as watch:
            capacity = self._capacity(watch, calibrate_s)
            s1 = watch.wait(settled, 120)
            with watch._lock:
                watch.not_inspected.clear()
            # twice that, for `seconds`; the capacity of a shared machine drifts, so the rate
            # follows twice the inspection rate of the last seconds (saturated: the capacity)
            row.rss_start_mib = d.rss_kib() / 1024
            rss_max = row.rss_start_mib
            planner = self._planner("over", OVERLOAD_HEIGHT)
            sender = Sender(d, self.ctx, planner, max(2.0 * capacity, 2.0))
            t_end = time.monotonic() + seconds
            last = watch.wait(lambda s: True, 10)
            while time.monotonic() < t_end:
                time.sleep(min(2.0, max(0.1, t_end - time.monotonic())))
                rss_max = max(rss_max, d.rss_kib() / 1024)
                cur = watch.snapshot() or last
                dt = (cur["t_publish_ns"] - last["t_publish_ns"]) / 1e9
                if dt > 0.5:  # saturated, inspected = capacity; if not, the rate doubles
                    now_capacity = (cur["frames_inspected"] - last["frames_inspected"]) / dt
                    sender.fps = max(2.0 * now_capacity, 2.0)
                    last = cur
            sender.stop()
            row.offered = sender.offered
            achieved = sender.offered / seconds
            s2 = watch.wait(
                lambda s: (
                    settled(s)
                    and s["frames_received"]
                    + s["frames_rejected"]
                    - s1["frames_received"]
                    - s1["frames_rejected"]
                    >= sender.offered
                ),
                120,
            )
            row.rss_end_mib = d.rss_kib() / 1024
            dlt = self._counts(row, s1, s2)
            inspected_fps = dlt["frames_inspected"] / seconds
            time.sleep(0.5)
            with watch._lock:
                ranges = list(watch.not_inspected)
        # every status message of the phase must have arrived to add the ranges up
        named = sum(
            r["line_end"] - r["line_start"]
            for r in ranges
            if not str(r["why"]).startswith("sequence gap")
        )
        self._events(row, mark)
        row.seconds = time.monotonic() - t0
        row.notes = (
            f"capacity {capacity:.0f} fps at the start, offered {achieved:.0f} fps, "
            f"inspected {inspected_fps:.0f} fps ({achieved / max(inspected_fps, 1e-9):.1f}x); "
            f"RSS max {rss_max:.0f} MiB; {len(ranges)} ranges name {named} lines"
        )
        if row.offered != dlt["frames_inspected"] + dlt["frames_dropped"] + dlt["frames_rejected"]:
            row.problems.append(
                f"offered {row.offered} != inspected {row.inspected} + dropped {row.dropped} "
                f"+ rejected {row.rejected}"
            )
        if named != dlt["lines_dropped"]:
            row.problems.append(
                f"not_inspected ranges name {named} lines, {dlt['lines_dropped']} dropped"
            )
        if not row.dropped:
            row.problems.append("nothing dropped: not an overload")
        if achieved < 1.5 * inspected_fps:
            row.notes += " (the sender could not reach 2x)"
        if rss_max - (row.rss_start_mib or 0.0) > 128:
            row.problems.append(f"RSS grew {rss_max - (row.rss_start_mib or 0.0):.0f} MiB")
        return row

    # ------------------------------------------------------------------ restart
    def restart(self, seconds: float, restarts: int) -> Row:
        row = Row("restart", restarts=0)
        d, t0 = self.d, time.monotonic()
        mark = self._mark()
        row.rss_start_mib = d.rss_kib() / 1024
        sender = Sender(d, self.ctx, self._planner("restart"), 15.0, defect_every=1)
        phase = seconds / (restarts + 1)
        seqs_ok = True
        for _ in range(restarts):
            time.sleep(phase)
            before = len(journal_rows(d.journal))
            d.kill()
            check = integrity(d.journal)
            rows = journal_rows(d.journal)
            last = rows[-1][0] if rows else -1
            if check != "ok":
                row.problems.append(f"journal integrity after SIGKILL: {check}")
            if len(rows) < before:
                row.problems.append("journal lost rows in the kill")
            d.start(self.ctx)
            # the next event journaled continues the seq
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                new = [s for s, _ in journal_rows(d.journal) if s > last]
                if new:
                    if min(new) != last + 1:
                        seqs_ok = False
                        row.problems.append(f"seq after restart {min(new)}, expected {last + 1}")
                    break
                time.sleep(0.2)
            else:
                row.problems.append("no event after the restart")
            row.restarts = (row.restarts or 0) + 1
        time.sleep(phase)
        sender.stop()
        row.offered = sender.offered
        rows = journal_rows(d.journal)
        n = rows[-1][0] + 1 if rows else 0
        if not self.sub.wait_for(n, 60):
            row.problems.append(f"subscriber has {self.sub.count()} events, journal {n}")
        row.rss_end_mib = d.rss_kib() / 1024
        self._events(row, mark)
        row.seconds = time.monotonic() - t0
        row.notes = f"seq continued after {row.restarts} SIGKILL(s): {'yes' if seqs_ok else 'NO'}"
        return row

    def late_subscriber(self) -> Row:
        """A subscriber that was down all along catches up from seq 0 out of the journal."""
        row = Row("late subscriber")
        t0 = time.monotonic()
        rows = journal_rows(self.d.journal)
        got: list[dict[str, Any]] = []
        stats = FollowStats()

        def on_event(topic: str, body: dict[str, Any]) -> bool:
            got.append(body)
            return len(got) >= len(rows)

        if rows:
            follow(
                self.d.events,
                self.d.replay,
                on_event,
                since=0,
                topics=("defect",),
                timeout_s=30,
                context=self.ctx,
                configure=self.d.events_setup(),
                stats=stats,
            )
        row.journaled, row.published, row.replayed = len(rows), stats.live, stats.replayed
        if [json.loads(b) for _, b in rows] != got[: len(rows)]:
            row.problems.append(f"caught up {len(got)} events, journal has {len(rows)}, or differ")
        if stats.lost:
            row.problems.append(f"lost: {stats.lost}")
        row.seconds = time.monotonic() - t0
        row.notes = f"{len(got)} events from seq 0, {stats.replayed} of them from the journal"
        return row

    def finish(self) -> Row:
        """The subscriber against the journal: every event once, in order, identical."""
        row = Row("subscriber")
        stats = self.sub.close()
        rows = journal_rows(self.d.journal)
        got = [int(e["seq"]) for e in self.sub.events]
        row.published = stats.live
        row.replayed = stats.replayed
        row.journaled = len(rows)
        if got != list(range(len(got))):
            row.problems.append("subscriber's seqs are not 0, 1, 2, ... without gaps or repeats")
        if [s for s, _ in rows] != got:
            row.problems.append(f"subscriber has {len(got)} events, the journal {len(rows)}")
        else:
            same = all(json.loads(b) == e for (_, b), e in zip(rows, self.sub.events, strict=True))
            if not same:
                row.problems.append("replayed bodies differ from the journal")
        if stats.lost:
            row.problems.append(f"lost: {stats.lost}")
        row.notes = (
            f"{len(got)} events in seq order, {stats.duplicates} duplicates dropped, "
            f"{stats.replay_errors} replay retries"
        )
        return row


def many_daemons(
    workdir: Path,
    bundle: Path,
    ctx: Ctx,
    n: int,
    seconds: float,
    curve: bool = True,
    fps: float = 10.0,
) -> Row:
    """``n`` daemons side by side, each as an instance of ``deploy/linescan@.service`` runs
    (its own config, ports, ``$STATE_DIRECTORY`` and journal), a camera sending frames with
    defects to each, and one subscriber following all of them (``replay.follow_many``), while
    each daemon in turn is SIGKILLed and restarted. Every daemon's journal must reach the
    subscriber exactly once, in ``seq`` order, under its own source name."""
    row = Row("many daemons", restarts=0)
    t0 = time.monotonic()
    names = [f"cam{i + 1}" for i in range(n)]
    daemons: dict[str, DaemonProcess] = {}
    for name in names:
        (workdir / name).mkdir(parents=True, exist_ok=True)
        daemons[name] = DaemonProcess(
            workdir / name, bundle, curve, state_directory=True, camera=name
        )
    got: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    lock = threading.Lock()
    stop = threading.Event()
    stats = {name: FollowStats() for name in names}
    senders: list[Sender] = []
    sub: threading.Thread | None = None
    try:
        for d in daemons.values():
            d.launch()
        for d in daemons.values():
            d.wait_ready(ctx)
        row.rss_start_mib = sum(d.rss_kib() for d in daemons.values()) / 1024
        sources = [
            EventSource(name, d.events, d.replay, d.events_setup()) for name, d in daemons.items()
        ]

        def on_event(source: str, topic: str, body: dict[str, Any]) -> None:
            if topic == "defect":
                with lock:
                    got[source].append(body)

        def follow_all() -> None:
            follow_many(
                sources,
                on_event,
                0,
                topics=("defect", "status"),
                context=ctx,
                should_stop=stop.is_set,
                replay_timeout_s=1.0,
                stats=stats,
            )

        sub = threading.Thread(target=follow_all, daemon=True)
        sub.start()
        for name, d in daemons.items():
            planner = fuzz.Planner(random.Random(name), 256, HEIGHT, name, d.limits)
            senders.append(Sender(d, ctx, planner, fps, defect_every=1))
        phase = seconds / (n + 1)
        for name, d in daemons.items():
            time.sleep(phase)
            before = journal_rows(d.journal)
            d.kill()
            if integrity(d.journal) != "ok":
                row.problems.append(f"{name}: journal integrity after SIGKILL")
            if len(journal_rows(d.journal)) < len(before):
                row.problems.append(f"{name}: journal lost rows in the kill")
            d.start(ctx)
            row.restarts = (row.restarts or 0) + 1
        time.sleep(phase)
        ends = {name: sender.finish() for name, sender in zip(names, senders, strict=True)}
        row.offered = sum(sender.offered for sender in senders)

        def caught_up() -> bool:
            with lock:
                return all(
                    any(fuzz.overlaps(ends[name], e) for e in got[name])
                    and len(got[name]) >= len(journal_rows(d.journal))
                    for name, d in daemons.items()
                )

        # every journaled event reaches the subscriber (live or replayed)
        deadline = time.monotonic() + 60
        while not caught_up() and time.monotonic() < deadline:
            time.sleep(0.2)
        row.rss_end_mib = sum(d.rss_kib() for d in daemons.values()) / 1024
    finally:
        stop.set()
        if sub is not None:
            sub.join(30)
        for sender in senders:
            sender.stop()
        for d in daemons.values():
            code = d.stop()
            if code != 0:
                row.problems.append(f"{d.workdir.name}: exit status {code} after SIGTERM")
    journaled = 0
    per: list[str] = []
    for name, d in daemons.items():
        rows = journal_rows(d.journal)
        journaled += len(rows)
        mine = got[name]
        seqs = [int(e["seq"]) for e in mine]
        per.append(f"{name} {len(mine)}/{len(rows)}")
        if [s for s, _ in rows] != list(range(len(rows))):
            row.problems.append(f"{name}: journal seqs are not 0, 1, 2, ...")
        if seqs != [s for s, _ in rows]:
            row.problems.append(
                f"{name}: subscriber has {len(mine)} events, the journal {len(rows)}"
            )
        elif any(json.loads(b) != e for (_, b), e in zip(rows, mine, strict=True)):
            row.problems.append(f"{name}: events differ from the journal")
        if any(e.get("camera") != name for e in mine):
            row.problems.append(f"{name}: an event of another camera under this source")
        if stats[name].lost:
            row.problems.append(f"{name}: lost {stats[name].lost}")
        if not rows:
            row.problems.append(f"{name}: no events at all")
    row.journaled = journaled
    row.published = sum(st.live for st in stats.values())
    row.replayed = sum(st.replayed for st in stats.values())
    row.seconds = time.monotonic() - t0
    row.notes = (
        f"{n} daemons, one subscriber, each daemon SIGKILLed once: events received/journaled "
        + ", ".join(per)
    )
    return row


def run(
    workdir: Path,
    duration: float,
    restarts: int,
    width: int = 256,
    curve: bool = True,
    bundle: Path | None = None,
    scenarios: tuple[str, ...] = ("auth", "fuzz", "overload", "restart"),
    daemons: int = 0,
) -> list[Row]:
    """Every scenario against one daemon process (restarted by ``restart``); the rows.
    ``daemons`` > 0 adds the many-daemon scenario (``many_daemons``) with that many."""
    if bundle is None:
        bundle = fuzz.flat_bundle(workdir / "bundle")
    d = DaemonProcess(workdir, bundle, curve)
    ctx: Ctx = zmq.Context()
    rows: list[Row] = []
    soak: Soak | None = None
    try:
        d.start(ctx)
        soak = Soak(d, ctx, width)
        if "auth" in scenarios:
            rows.append(soak.auth(duration / 2))
        if "fuzz" in scenarios:
            rows.append(soak.fuzz(duration / 2))
        if "overload" in scenarios:
            rows.append(soak.overload(duration, calibrate_s=max(3.0, duration / 10)))
        if "restart" in scenarios:
            rows.append(soak.restart(duration, restarts))
        rows.append(soak.late_subscriber())
        code = d.stop()
        if code != 0:
            rows.append(Row("shutdown", problems=[f"exit status {code} after SIGTERM"]))
        rows.append(soak.finish())
        rows[-1].restarts = d.starts - 1
        if integrity(d.journal) != "ok":
            rows[-1].problems.append("journal integrity check failed at the end")
        if daemons:
            rows.append(many_daemons(workdir / "many", bundle, ctx, daemons, duration, curve))
    finally:
        if soak is not None and not soak.sub.done:
            soak.sub.close()
        d.kill()
        ctx.term()
    return rows


COLUMNS = (
    ("scenario", "scenario", "{}"),
    ("offered", "frames offered", "{}"),
    ("inspected", "inspected", "{}"),
    ("dropped", "dropped", "{}"),
    ("rejected", "rejected", "{}"),
    ("journaled", "events journaled", "{}"),
    ("published", "received live", "{}"),
    ("replayed", "replayed", "{}"),
    ("rss_start_mib", "RSS start MiB", "{:.0f}"),
    ("rss_end_mib", "RSS end MiB", "{:.0f}"),
    ("restarts", "restarts survived", "{}"),
    ("seconds", "s", "{:.0f}"),
)


def table(rows: list[Row]) -> str:
    """A Markdown table of the rows, then the notes and problems."""
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " | ok |"
    sep = "|" + "|".join("---" for _ in range(len(COLUMNS) + 1)) + "|"
    lines = [head, sep]
    for r in rows:
        cells = [
            "-" if getattr(r, key) is None else fmt.format(getattr(r, key))
            for key, _, fmt in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + f" | {'yes' if not r.problems else 'NO'} |")
    lines.append("")
    for r in rows:
        if r.notes:
            lines.append(f"- {r.scenario}: {r.notes}")
        for p in r.problems:
            lines.append(f"- {r.scenario}: PROBLEM: {p}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per scenario")
    ap.add_argument("--restarts", type=int, default=3, help="SIGKILLs in the restart scenario")
    ap.add_argument("--short", action="store_true", help="CI-sized: 4 s scenarios, 1 restart")
    ap.add_argument("--width", type=int, default=256, help="web width in pixels")
    ap.add_argument("--no-curve", action="store_true", help="plain TCP (skips auth)")
    ap.add_argument(
        "--daemons",
        type=int,
        default=3,
        help="daemons side by side in the many-daemon scenario (0: skip it; --short: 2)",
    )
    ap.add_argument("--bundle", type=Path, default=None, help="model bundle (default: built)")
    ap.add_argument("--work", type=Path, default=None, help="keep files here (default: temp)")
    args = ap.parse_args(argv)
    duration, restarts = (4.0, 1) if args.short else (args.duration, args.restarts)
    daemons = min(args.daemons, 2) if args.short else args.daemons
    work = args.work or Path(tempfile.mkdtemp(prefix="linescan-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        rows = run(
            work, duration, restarts, args.width, not args.no_curve, args.bundle, daemons=daemons
        )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    print(f"\n{time.monotonic() - t0:.0f} s in all")
    return 1 if any(r.problems for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
