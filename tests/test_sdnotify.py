"""Tests for linescan.sdnotify: the systemd notify protocol over a real AF_UNIX socket."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from linescan import sdnotify


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd, named in $NOTIFY_SOCKET."""
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="ls-") as directory:
        path = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield sock


def test_unset_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $NOTIFY_SOCKET every call returns False and does nothing."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False
    assert sdnotify.watchdog() is False


def test_ready_sends_ready(notify_socket: socket.socket) -> None:
    """ready() sends the datagram READY=1 to $NOTIFY_SOCKET."""
    assert sdnotify.ready() is True
    assert notify_socket.recv(4096) == b"READY=1"


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (sdnotify.stopping, b"STOPPING=1"),
        (sdnotify.watchdog, b"WATCHDOG=1"),
        (lambda: sdnotify.status("inspecting\n3 cameras"), b"STATUS=inspecting 3 cameras"),
        (lambda: sdnotify.notify("READY=1\nSTATUS=up"), b"READY=1\nSTATUS=up"),
    ],
)
def test_helpers_send_their_state(
    notify_socket: socket.socket, call: Callable[[], bool], expected: bytes
) -> None:
    """stopping(), watchdog(), status() and notify() send exactly their assignments."""
    assert call() is True
    assert notify_socket.recv(4096) == expected


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A $NOTIFY_SOCKET starting with @ reaches a socket in the abstract namespace."""
    name = f"linescan-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready() is True
        assert sock.recv(4096) == b"READY=1"


def test_unreachable_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    """A $NOTIFY_SOCKET nobody listens on gives False, not an exception."""
    with tempfile.TemporaryDirectory(prefix="ls-") as directory:
        monkeypatch.setenv("NOTIFY_SOCKET", str(Path(directory) / "absent"))
        assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.ready() is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    """The watchdog interval is half of WATCHDOG_USEC, and only for our own PID."""
    assert sdnotify.watchdog_interval_s(env) == expected


def test_watchdog_interval_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit mapping, watchdog_interval_s reads os.environ."""
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval_s() == 1.0


def test_starting_extends_the_start_timeout(notify_socket: socket.socket) -> None:
    """During a long start-up (a TensorRT engine build) systemd's start deadline is pushed
    ahead again and again with a status line, and the pushing stops when start-up ends."""
    import time

    with sdnotify.starting("building\nengine", every_s=0.05, extend_s=2.0):
        first = notify_socket.recv(4096)
        second = notify_socket.recv(4096)
    assert first == second == b"EXTEND_TIMEOUT_USEC=2000000\nSTATUS=building engine"
    time.sleep(0.2)
    notify_socket.setblocking(False)
    drained = 0
    with contextlib.suppress(BlockingIOError):
        while notify_socket.recv(4096):
            drained += 1
    assert drained <= 1  # at most one sent while the block was being left, none after


def test_starting_outside_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with sdnotify.starting("x"):
        pass
