"""CurveZMQ on the frame and event sockets: keys from files, authorised cameras, counted refusals.

Why: the frame socket is how pixels get into the inspection system. On a shared network anyone
who can reach it could feed it a fake web (and hide a real defect). With CURVE the daemon's
frame socket is a CURVE server: traffic is encrypted, and a camera is let in only when its
public key is one of the ``*.key`` files in ``frames.curve_authorized_keys_dir``. Everyone else
fails the handshake and never gets a frame in; each refused handshake is counted in
``linescan_auth_failures_total{socket="frames", reason}``:

- ``key``: the client's key is not authorised (ZAP said 400);
- ``protocol``: the client speaks plain TCP, or does not know the server's public key;
- ``other``: any other handshake failure.

The event and replay sockets can be CURVE servers too (``events.curve_server_secret_key_file``):
subscribers then need the server's public key and any key pair of their own (events are
encrypted and the daemon is authenticated; subscribers are not checked).

Key files are those ``zmq.auth.create_certificates`` writes (``linescan keygen``): ``NAME.key``
holds ``public-key = "..."``, ``NAME.key_secret`` holds both keys. A file holding just the
40-character Z85 key is accepted too. No error message ever contains key material: they name
the file and what is wrong with it.

ZeroMQ runs one ZAP handler per context. :class:`CurveAuth` installs it (a
``zmq.auth.thread.ThreadAuthenticator``) with two domains: frames (authorised keys only) and
events (any client key). A context that already has a handler is an error.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from linescan.errors import ConfigError
from linescan.log import RateLimitedLogger, get_logger
from linescan.metrics import AUTH_FAILURE_REASONS

if TYPE_CHECKING:
    from linescan.config import EventsConfig, FramesConfig
    from linescan.metrics import Metrics

__all__ = [
    "AUTH_FAILURE_REASONS",
    "EVENTS_DOMAIN",
    "FRAMES_DOMAIN",
    "AuthMonitor",
    "CurveAuth",
    "CurveKeys",
    "CurveSetup",
    "authorized_keys",
    "client_setup",
    "create_keys",
    "curve_from_config",
    "load_public_key",
    "load_secret_key",
    "server_setup",
]

log = get_logger("linescan.security")
_MONITOR_IDS = itertools.count()

FRAMES_DOMAIN: Final = "linescan-frames"
EVENTS_DOMAIN: Final = "linescan-events"

Context = zmq.Context[zmq.Socket[bytes]]
SocketSetup = Callable[[zmq.Socket[bytes]], None]

_Z85_KEY_RE: Final = re.compile(rb"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_Z85_RUN_RE: Final = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40,}")
_Z85_RARE: Final = frozenset(":+=^!*?&<>()[]{}@%$#")
_CERT_LINE_RE: Final = re.compile(rb"^\s*(public-key|secret-key)\s*=\s*(.*?)\s*$")
_MAX_KEY_FILE_BYTES: Final = 64 * 1024


class CurveKeys:
    """A key pair (Z85 bytes). ``repr`` never shows the secret."""

    __slots__ = ("public", "secret")

    def __init__(self, public: bytes, secret: bytes) -> None:
        self.public = public
        self.secret = secret

    def __repr__(self) -> str:
        return f"CurveKeys(public={self.public.decode()!r}, secret=<hidden>)"


def looks_like_key(text: str) -> bool:
    """True when ``text`` holds what looks like a Z85 key: 40 characters of the Z85 alphabet
    with at least one of its punctuation characters that file names rarely use (a random
    key has one with probability 1 - 2e-5). A key pasted where a file name belongs must not
    be printed back in an error."""
    for m in _Z85_RUN_RE.finditer(text):
        run = m.group(0)
        for i in range(len(run) - 39):
            if _Z85_RARE & set(run[i : i + 40]):
                return True
    return False


def _read_key_file(path: Path, what: str) -> dict[str, bytes]:
    """``{"public": ..., "secret": ...}`` from a certificate or bare-key file; errors say why
    without quoting the file."""
    if not path.exists() and looks_like_key(str(path)):
        raise ConfigError(
            f"{what}: the configured file name looks like a key itself; write the key into a "
            "file (`linescan keygen`) and configure the file's path"
        )
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what}: {path} is not a regular file")
        if st.st_size > _MAX_KEY_FILE_BYTES:
            raise ConfigError(f"{what}: {path} is too large to be a key file")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or 'error'}") from None
    found: dict[str, bytes] = {}
    lines = [
        line for line in data.splitlines() if line.strip() and not line.lstrip().startswith(b"#")
    ]
    for line in lines:
        m = _CERT_LINE_RE.match(line)
        if m is not None:
            key = m[2].strip(b"'\"")
            name = "public" if m[1] == b"public-key" else "secret"
            if not _Z85_KEY_RE.match(key):
                raise ConfigError(f"{what}: {path}: the {name} key is not 40 Z85 characters")
            found[name] = key
    if not found and len(lines) == 1 and _Z85_KEY_RE.match(lines[0].strip()):
        found["bare"] = lines[0].strip()
    return found


def load_secret_key(path: Path, what: str = "CURVE secret key") -> CurveKeys:
    """The key pair in a ``*.key_secret`` file (or a file holding only the Z85 secret key).

    Warns when the file is readable by others. Raises ConfigError (never quoting the file).
    """
    path = Path(path)
    keys = _read_key_file(path, what)
    secret = keys.get("secret", keys.get("bare"))
    if secret is None:
        raise ConfigError(
            f"{what}: {path} holds no secret key (a .key_secret file from `linescan keygen` "
            "is needed, not the public .key file)"
        )
    try:
        public = zmq.curve_public(secret)
    except zmq.ZMQError as exc:  # pragma: no cover - a 40-char Z85 string always decodes
        raise ConfigError(f"{what}: {path}: not a valid CURVE key") from exc
    if "public" in keys and keys["public"] != public:
        raise ConfigError(f"{what}: {path}: the public key does not belong to the secret key")
    try:
        mode = path.stat().st_mode
    except OSError:  # pragma: no cover - just read it
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("secret key file is readable by other users; chmod 600 it", path=str(path))
    return CurveKeys(public, secret)


def load_public_key(path: Path, what: str = "CURVE public key") -> bytes:
    """The public key in a ``*.key`` (or ``*.key_secret``) file, or a bare Z85 key file."""
    path = Path(path)
    keys = _read_key_file(path, what)
    if "public" in keys:
        return keys["public"]
    if "secret" in keys:
        return bytes(zmq.curve_public(keys["secret"]))
    if "bare" in keys:
        return keys["bare"]
    raise ConfigError(f"{what}: {path} holds no public key")


def authorized_keys(directory: Path) -> set[bytes]:
    """The public keys of every ``*.key`` file in ``directory``.

    A file that is not a key file is skipped with a warning (one bad file must not lock every
    camera out). Raises ConfigError when the directory cannot be read.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"authorised camera keys: {directory} is not a directory")
    keys: set[bytes] = set()
    try:
        files = sorted(directory.glob("*.key"))
    except OSError as exc:
        raise ConfigError(f"authorised camera keys: cannot list {directory}: {exc}") from None
    for f in files:
        try:
            keys.add(load_public_key(f, "authorised camera key"))
        except ConfigError as exc:
            log.warning("skipping an unusable camera key file", error=str(exc))
    if not keys:
        log.warning("no authorised camera keys: no camera can send frames", dir=str(directory))
    return keys


def server_setup(keys: CurveKeys, domain: str) -> SocketSetup:
    """Socket options that make a socket a CURVE server in ZAP ``domain``."""

    def setup(sock: zmq.Socket[bytes]) -> None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())

    return setup


def client_setup(server_public: bytes, client: CurveKeys | None = None) -> SocketSetup:
    """Socket options for a CURVE client of a server with ``server_public``.

    Without ``client`` keys a fresh pair is made (enough for the event and replay sockets,
    which accept any client key; a camera needs its authorised pair).
    """
    if client is None:
        public, secret = zmq.curve_keypair()
        client = CurveKeys(public, secret)
    pair = client

    def setup(sock: zmq.Socket[bytes]) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret)

    return setup


def create_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, to share) and ``NAME.key_secret`` (mode 600) in ``directory``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise ConfigError(f"key name {name!r} must be 1-64 of A-Z a-z 0-9 _ . - ")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_file = directory / f"{name}.key"
    secret_file = directory / f"{name}.key_secret"
    if public_file.exists() or secret_file.exists():
        raise ConfigError(f"{public_file} or {secret_file} exists already; not overwriting keys")
    old = os.umask(0o077)
    try:
        pub, sec = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old)
    Path(sec).chmod(0o600)
    Path(pub).chmod(0o644)
    return Path(pub), Path(sec)


class _Allow:
    """A ZAP credentials provider: authorised keys only, or anyone (``keys=None``)."""

    def __init__(self, keys: set[bytes] | None) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return self.keys is None or key in self.keys


class CurveAuth:
    """The context's ZAP handler: authorised keys for frames, any key for events."""

    def __init__(self, context: Context, frame_keys: set[bytes]) -> None:
        self._auth = ThreadAuthenticator(context)
        self._frames = _Allow(frame_keys)
        self._started = False

    def start(self) -> None:
        try:
            self._auth.start()
        except zmq.ZMQError as exc:
            raise ConfigError(
                "cannot start ZeroMQ authentication: this ZeroMQ context already has a ZAP "
                f"handler ({exc})"
            ) from exc
        self._started = True
        self._auth.configure_curve_callback(FRAMES_DOMAIN, self._frames)
        self._auth.configure_curve_callback(EVENTS_DOMAIN, _Allow(None))

    def reload(self, frame_keys: set[bytes]) -> None:
        """Replace the authorised camera keys (e.g. after editing the directory)."""
        self._frames.keys = frame_keys

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._auth.stop()


@dataclass
class CurveSetup:
    """What the config asks for: socket set-ups for the frame and event sockets, and the ZAP
    handler (frames only). All None: plain TCP."""

    frames: SocketSetup | None = None
    events: SocketSetup | None = None
    auth: CurveAuth | None = None

    def stop(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None


def curve_from_config(frames: FramesConfig, events: EventsConfig, context: Context) -> CurveSetup:
    """Load the configured keys and start the ZAP handler; raises ConfigError.

    Frame-socket CURVE needs both the server's secret key and the directory of authorised
    camera keys: encryption without client authentication would let any key in.
    """
    setup = CurveSetup()
    secret_file, keys_dir = frames.curve_server_secret_key_file, frames.curve_authorized_keys_dir
    if (secret_file is None) != (keys_dir is None):
        raise ConfigError(
            "frames.curve_server_secret_key_file and frames.curve_authorized_keys_dir go "
            "together: CurveZMQ on the frame socket needs the server's secret key and the "
            "public keys of the cameras allowed to send"
        )
    if events.curve_server_secret_key_file is not None:
        ekeys = load_secret_key(
            events.curve_server_secret_key_file, "events.curve_server_secret_key_file"
        )
        setup.events = server_setup(ekeys, EVENTS_DOMAIN)
    if secret_file is not None and keys_dir is not None:
        fkeys = load_secret_key(secret_file, "frames.curve_server_secret_key_file")
        allowed = authorized_keys(keys_dir)
        setup.auth = CurveAuth(context, allowed)
        setup.auth.start()
        setup.frames = server_setup(fkeys, FRAMES_DOMAIN)
        log.info("frame socket: CurveZMQ", authorised_cameras=len(allowed), keys_dir=str(keys_dir))
    return setup


_FAILURE_EVENTS: Final[dict[int, str]] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "key",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "other",
}


DISCONNECT_HINT: Final = (
    "closed by the sender, a network fault, or a message over frames.max_bytes (ZeroMQ "
    "refuses one by dropping the connection; frames queued behind it on that connection are "
    "lost and show up as a sequence gap)"
)


class AuthMonitor:
    """Counts refused handshakes on one socket, from a thread reading its monitor pipe; with
    ``disconnects``, also connections that ended.

    Why disconnects: ZeroMQ enforces MAXMSGSIZE by closing the sender's connection, with no
    error anywhere else, so an oversized frame (and whatever was queued behind it) would be
    lost without a trace. ZeroMQ does not say why a connection ended; each one is counted and
    logged with the possible causes, and the frames lost show up as a sequence gap. A refused
    handshake (a wrong key, a port scanner, a TCP health check) is followed by a disconnect of
    its own: that one is not counted again. With ``auth=False`` (no CurveZMQ) refused
    handshakes are not authentication failures and are not counted at all.

    Create it before the socket is handed to its own thread. It ends by itself when the
    socket is closed (ZeroMQ sends MONITOR_STOPPED) or on :meth:`stop`.
    """

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        socket_name: str,
        metrics: Metrics | None = None,
        on_failure: Callable[[str], None] | None = None,
        disconnects: bool = False,
        auth: bool = True,
    ) -> None:
        self.socket_name = socket_name
        self._metrics = metrics
        self._on_failure = on_failure
        self._auth = auth
        self._lock = threading.Lock()
        self.failures: dict[str, int] = dict.fromkeys(AUTH_FAILURE_REASONS, 0)
        self.disconnects = 0
        self._refused_open = 0  # refused handshakes whose own disconnect is still to come
        mask = 0
        events = [*_FAILURE_EVENTS, zmq.EVENT_MONITOR_STOPPED]
        if disconnects:
            events.append(zmq.EVENT_DISCONNECTED)
        for ev in events:
            mask |= int(ev)
        # A unique inproc address: pyzmq's default names it after the socket's file
        # descriptor, which a socket opened after this one is closed may reuse before ZeroMQ has
        # released the old monitor's endpoint ("Address already in use", or a monitor that
        # never hears its socket's events).
        addr = f"inproc://linescan.monitor.{os.getpid()}.{next(_MONITOR_IDS)}"
        self._mon: Any = sock.get_monitor_socket(mask, addr)
        self._stop = threading.Event()
        self._throttled = RateLimitedLogger(log, interval_s=10.0)
        self._thread = threading.Thread(
            target=self._run, name=f"linescan-auth-{socket_name}", daemon=True
        )
        self._thread.start()

    def total(self) -> int:
        with self._lock:
            return sum(self.failures.values())

    def _run(self) -> None:
        mon = self._mon
        try:
            while not self._stop.is_set():
                if not mon.poll(100):
                    continue
                msg = parse_monitor_message(mon.recv_multipart())
                event = int(msg["event"])
                if event == zmq.EVENT_MONITOR_STOPPED:
                    return
                endpoint = msg.get("endpoint")
                where = endpoint.decode() if isinstance(endpoint, bytes) else endpoint
                if event == zmq.EVENT_DISCONNECTED:
                    if self._refused_open > 0:
                        self._refused_open -= 1  # the refused handshake's own disconnect
                    else:
                        self._disconnected(where)
                    continue
                reason = _FAILURE_EVENTS.get(event)
                if reason is None:
                    continue
                self._refused_open += 1
                if not self._auth:
                    continue
                with self._lock:
                    self.failures[reason] += 1
                if self._metrics is not None:
                    self._metrics.auth_failures_total.labels(self.socket_name, reason).inc()
                if self._on_failure is not None:
                    self._on_failure(reason)
                self._throttled.warning(
                    f"auth:{self.socket_name}:{reason}",
                    "connection refused: handshake failed",
                    socket=self.socket_name,
                    reason=reason,
                    endpoint=where,
                )
        finally:
            mon.close(linger=0)

    def _disconnected(self, endpoint: str | None) -> None:
        with self._lock:
            self.disconnects += 1
        if self._metrics is not None:
            self._metrics.disconnects_total.labels(self.socket_name).inc()
        # info, not warning: a camera that closes at the end of a run is normal; a frame lost
        # with the connection is reported by the sequence gap it leaves.
        self._throttled.info(
            f"disconnect:{self.socket_name}",
            "sender disconnected",
            socket=self.socket_name,
            endpoint=endpoint,
            possible_causes=DISCONNECT_HINT,
        )

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
