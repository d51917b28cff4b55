"""systemd's notification protocol (``sd_notify``), implemented directly.

Why: ``Type=notify`` lets systemd know when the daemon is really ready (model loaded, sockets
bound) rather than merely started, and ``WatchdogSec=`` restarts it if its main loop hangs. The
protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named in
``$NOTIFY_SOCKET``; a dependency (or libsystemd) for that is not worth it.

Outside systemd ``$NOTIFY_SOCKET`` is unset and every call is a no-op returning False, so the
daemon calls these unconditionally. A path starting with ``@`` names a socket in Linux's
abstract namespace. Failures to send are logged and reported as False, never raised: a daemon
must not die because its supervisor went away (if the watchdog then fires, systemd restarts it,
which is the point).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from linescan.log import get_logger

__all__ = [
    "notify",
    "ready",
    "starting",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval_s",
]


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # systemd also speaks vsock (``vsock:CID:PORT``) for VMs; a daemon on a line PC never needs it.
    return None


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``KEY=VALUE`` lines) to systemd; True if it was sent.

    False, doing nothing, when ``$NOTIFY_SOCKET`` is unset (not under systemd).
    """
    env = os.environ if environ is None else environ
    target = env.get("NOTIFY_SOCKET")
    if not target:
        return False
    address = _address(target)
    log = get_logger("linescan.sdnotify")
    if address is None:
        log.warning("unsupported NOTIFY_SOCKET address", address=target)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), address)
    except OSError as exc:
        log.warning("sd_notify failed", address=target, error=str(exc))
        return False
    return True


def ready() -> bool:
    """Tell systemd start-up is complete (``READY=1``)."""
    return notify("READY=1")


def stopping() -> bool:
    """Tell systemd a clean shutdown has begun (``STOPPING=1``)."""
    return notify("STOPPING=1")


def watchdog() -> bool:
    """Pet the watchdog (``WATCHDOG=1``); call every :func:`watchdog_interval_s` seconds."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """Set the one-line status ``systemctl status`` shows (``STATUS=...``)."""
    # A newline would end the assignment and start a new (bogus) one.
    return notify("STATUS=" + " ".join(text.splitlines()))


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """How often to pet the watchdog: half of ``$WATCHDOG_USEC``, as systemd advises.

    None when no watchdog is set, the value is invalid, or ``$WATCHDOG_PID`` names another
    process (the variable was inherited, not meant for us).
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000


@contextmanager
def starting(text: str, *, every_s: float = 10.0, extend_s: float = 30.0) -> Iterator[None]:
    """Keep systemd's start timeout from firing during a long start-up (``EXTEND_TIMEOUT_USEC``).

    Why: the first start on a GPU builds the TensorRT engine, which takes minutes, while
    ``TimeoutStartSec=`` defaults to 90 s: without this, systemd would kill the build and
    restart it for ever. Every ``every_s`` seconds the deadline is pushed ``extend_s`` ahead of
    now (systemd 236+), with ``text`` as the status line, until the block ends. A start-up that
    truly hangs stops extending only when the block is left, so bound what runs inside.
    """
    if not os.environ.get("NOTIFY_SOCKET"):
        yield
        return
    state = f"EXTEND_TIMEOUT_USEC={int(extend_s * 1_000_000)}\nSTATUS=" + " ".join(
        text.splitlines()
    )
    done = threading.Event()

    def keep() -> None:
        while True:
            notify(state)
            if done.wait(every_s):
                return

    thread = threading.Thread(target=keep, name="linescan-sd-starting", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(every_s + 1.0)
