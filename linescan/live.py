"""The live page: what the operator sees, served beside ``/metrics`` (``[metrics] listen``).

``LiveView`` is an ``App`` for ``metrics.MetricsServer``; it only reads. Routes:

    /                       the page (``linescan/static/``: HTML, JS, CSS; nothing from a CDN)
    /static/app.js|app.css  its script and style
    /api/defects            defect events as published, oldest first:
                            ``?since=N`` from seq N on, ``&limit=M`` (1..1000, default 100);
                            without ``since`` the newest M. Answer
                            ``{"events": [...], "next_seq": K, "oldest_seq": O}``: ask
                            ``since=K`` next. From the journal when there is one (history
                            across restarts), else from the newest ``pictures.keep`` in memory.
    /api/status             ``{"status": <the latest status message>, "ready", "lines_per_s"
                            (null once the status is final or STALE_S old), "status_age_s",
                            "lines_per_metre", "pixels_per_metre", "model", "t_ns"}``
    /defects/SEQ.png        the picture of defect event SEQ (``pictures.py``)

The page polls ``/api/status`` and ``/api/defects?since=K`` every second and draws: readiness,
lines/s, metres and defects per metre, drops and queue depths; any repeating defect as a red
banner; a roll map per camera and segment (one mark per defect: down the web against across
it); and the defects, newest first, each an element ``data-defect-seq="SEQ"`` holding its
picture, position (metres, x), score and camera.

Pictures of the product are not for everyone: with ``[metrics] token_file`` the page,
``/api`` and ``/defects`` need the token (``?token=...`` once, kept in a cookie, or
``Authorization: Bearer ...``); ``/metrics`` and the health checks never do. Missing and wrong
tokens are counted (``linescan_http_auth_failures_total{reason}``). Without a token on an
address other than loopback the daemon warns at start.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from email.message import Message
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from linescan.errors import ConfigError
from linescan.journal import EventJournal, JournalError, JournalRow
from linescan.metrics import AppResponse, Metrics
from linescan.pictures import PictureStore, PictureWriter

__all__ = ["COOKIE", "LiveView", "is_loopback", "page_url", "read_token"]

COOKIE: Final = "linescan_token"
MAX_LIMIT: Final = 1000
DEFAULT_LIMIT: Final = 100
RATE_WINDOW_S: Final = 10.0  # lines/s is measured over the status messages of this long
STALE_S: Final = 5.0  # no status for this long: no rate to show (the page says so)
_PICTURE_RE = re.compile(r"^/defects/(\d{1,18})\.png$")
_STATIC: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}
_OPEN: Final = frozenset({"/static/app.js", "/static/app.css"})  # code, no product in it
_SECURITY: Final = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)
JSON_TYPE: Final = "application/json"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: only this machine reaches the port."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def page_url(host: str, port: int) -> str:
    """The page's address for a person on this machine (a wildcard bind is reached locally)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def read_token(path: Path) -> str:
    """The page token in ``path`` (surrounding whitespace ignored); never echoed in errors."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"metrics.token_file: cannot read {path}: {exc.__class__.__name__}"
        ) from None
    if len(token) < 16 or any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ConfigError(
            f"metrics.token_file: {path} must hold one token of at least 16 printable "
            "characters without spaces (e.g. `openssl rand -hex 16`)"
        )
    return token


def _static(name: str) -> bytes:
    return resources.files("linescan").joinpath("static", name).read_bytes()


class LiveView:
    """The page's state (recent events, the latest status) and its routes. Thread-safe: the
    post thread feeds it, the HTTP threads read it."""

    def __init__(
        self,
        *,
        model: str,
        lines_per_metre: float,
        pixels_per_metre: float | None,
        ready: Callable[[], bool],
        metrics: Metrics,
        keep: int = 500,
        journal: EventJournal | None = None,
        pictures: PictureWriter | PictureStore | None = None,
        token: str | None = None,
    ) -> None:
        self.model = model
        self.lines_per_metre = lines_per_metre
        self.pixels_per_metre = pixels_per_metre or lines_per_metre
        self.ready = ready
        self.metrics = metrics
        self.journal = journal
        self.pictures = pictures
        self.token = token
        self._lock = threading.Lock()
        self._events: deque[tuple[int, str]] = deque(maxlen=keep)
        self._status: dict[str, Any] | None = None
        self._status_at = 0.0  # monotonic time of the latest status
        self._rates: deque[tuple[float, int]] = deque()
        self._files = {path: (_static(name), kind) for path, (name, kind) in _STATIC.items()}

    # ---------------------------------------------------------------- fed by the daemon

    def record(self, rows: Sequence[JournalRow]) -> None:
        """Defect events as published (``EventPublisher``'s journal hook: exact bodies)."""
        with self._lock:
            self._events.extend((seq, body) for seq, _topic, _t, body in rows)

    def status(self, body: dict[str, Any]) -> None:
        """The latest status message."""
        now = time.monotonic()
        with self._lock:
            self._status = body
            self._status_at = now
            self._rates.append((now, int(body.get("lines_inspected", 0))))
            while len(self._rates) > 2 and now - self._rates[1][0] >= RATE_WINDOW_S:
                self._rates.popleft()

    # ---------------------------------------------------------------- the app

    def __call__(self, target: str, headers: Message) -> AppResponse | None:
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query, keep_blank_values=True)
        picture = _PICTURE_RE.match(path)
        if path not in _STATIC and not path.startswith("/api/") and picture is None:
            if path.startswith("/defects/"):
                return _text(400, "a picture is /defects/SEQ.png, SEQ a defect event's seq\n")
            return None
        if path not in _OPEN:
            refused, cookie = self._check_token(path, query, headers)
            if refused is not None:
                return refused
            if cookie is not None and path in ("/", "/index.html"):
                # the token leaves the address bar (and history) once it is in the cookie
                return AppResponse(303, b"", "text/plain", (("Location", "/"), cookie))
        if path in _STATIC:
            body, kind = self._files[path]
            return AppResponse(200, body, kind, (*_SECURITY, ("Cache-Control", "no-cache")))
        if picture is not None:
            return self._picture(int(picture[1]))
        if path == "/api/defects":
            return self._defects(query)
        if path == "/api/status":
            return _json(200, self._status_body())
        return _json(404, {"error": f"no such API: {path}"})

    def _check_token(
        self, path: str, query: dict[str, list[str]], headers: Message
    ) -> tuple[AppResponse | None, tuple[str, str] | None]:
        """(a refusal, or None) and the cookie to set when the token came in the query."""
        if self.token is None:
            return None, None
        given: str | None = None
        from_query = False
        auth = headers.get("Authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        elif "token" in query:
            given, from_query = query["token"][-1], True
        else:
            try:
                jar = SimpleCookie(headers.get("Cookie") or "")
            except CookieError:
                jar = SimpleCookie()
            if COOKIE in jar:
                given = jar[COOKIE].value
        if given is None:
            self.metrics.http_auth_failures_total.labels("missing").inc()
            return self._refuse(path, 401, "this page needs its token: open /?token=TOKEN"), None
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            self.metrics.http_auth_failures_total.labels("wrong").inc()
            return self._refuse(path, 403, "wrong token"), None
        if not from_query:
            return None, None
        cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
        return None, ("Set-Cookie", cookie)

    def _refuse(self, path: str, code: int, why: str) -> AppResponse:
        if path.startswith("/api/"):
            return _json(code, {"error": why})
        return _text(code, why + "\n")

    def _picture(self, seq: int) -> AppResponse:
        png = None if self.pictures is None else self.pictures.get(seq)
        if png is None:
            return _text(404, f"no picture of defect {seq} (none kept, or pruned)\n")
        return AppResponse(200, png, "image/png", (("Cache-Control", "private, max-age=3600"),))

    def _defects(self, query: dict[str, list[str]]) -> AppResponse:
        try:
            since = _int_arg(query, "since", None, 0, 2**62)
            limit = _int_arg(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        if limit is None:  # pragma: no cover - it has a default
            limit = DEFAULT_LIMIT
        try:
            seqs_bodies, oldest, newest = self._select(since, limit)
        except JournalError as exc:
            return _json(503, {"error": f"the journal cannot be read: {exc}"})
        if seqs_bodies:
            next_seq = seqs_bodies[-1][0] + 1
        elif since is not None:
            next_seq = since
        else:
            next_seq = 0 if newest is None else newest + 1
        body = (
            '{"events":['
            + ",".join(b for _, b in seqs_bodies)
            + f'],"next_seq":{next_seq},"oldest_seq":{json.dumps(oldest)}}}'
        )
        return AppResponse(200, body.encode(), JSON_TYPE, (("Cache-Control", "no-store"),))

    def _select(
        self, since: int | None, limit: int
    ) -> tuple[list[tuple[int, str]], int | None, int | None]:
        """(seq, body) of the events asked for, and the oldest and newest seq held."""
        if self.journal is not None:
            oldest, newest = self.journal.bounds()
            if since is None:
                since = 0 if newest is None else max(0, newest - limit + 1)
            events = self.journal.since(since, limit)
            return [(e.seq, e.body) for e in events], oldest, newest
        with self._lock:
            held = list(self._events)
        oldest = held[0][0] if held else None
        newest = held[-1][0] if held else None
        if since is None:
            return held[-limit:], oldest, newest
        return [e for e in held if e[0] >= since][:limit], oldest, newest

    def _status_body(self) -> dict[str, Any]:
        with self._lock:
            status = self._status
            rates = list(self._rates)
            age = None if status is None else time.monotonic() - self._status_at
        lines_per_s = None
        fresh = age is not None and age < STALE_S and not (status or {}).get("final")
        if fresh and len(rates) >= 2 and rates[-1][0] > rates[0][0]:
            lines_per_s = (rates[-1][1] - rates[0][1]) / (rates[-1][0] - rates[0][0])
        try:
            ready = bool(self.ready())
        except Exception:  # a probe that raises means "not ready"
            ready = False
        return {
            "status": status,
            "ready": ready,
            "lines_per_s": lines_per_s,
            "status_age_s": age,
            "lines_per_metre": self.lines_per_metre,
            "pixels_per_metre": self.pixels_per_metre,
            "model": self.model,
            "t_ns": time.time_ns(),
        }


def _int_arg(
    query: dict[str, list[str]], name: str, default: int | None, lo: int, hi: int
) -> int | None:
    values = query.get(name)
    if not values:
        return default
    text = values[-1]
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise ValueError(f"{name} must be a whole number from {lo} to {hi}")
    return int(text)


def _plain(value: object) -> object:
    # status messages are built from NumPy results (edges); their scalars are not JSON types
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json(code: int, value: dict[str, Any]) -> AppResponse:
    body = json.dumps(value, allow_nan=False, separators=(",", ":"), default=_plain).encode()
    return AppResponse(code, body, JSON_TYPE, (("Cache-Control", "no-store"),))


def _text(code: int, text: str) -> AppResponse:
    return AppResponse(code, text.encode(), "text/plain; charset=utf-8")
