"""Tests for linescan.live: the page's API, its pictures, its token, over real HTTP.

The view is fed as the daemon feeds it (published event rows, status messages) and served by
the real ``MetricsServer``; the end-to-end run with a daemon and Chromium is
``test_operator.py``.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from viewkit import http as get
from viewkit import http_json

from linescan.errors import ConfigError
from linescan.journal import EventJournal
from linescan.live import LiveView, is_loopback, page_url, read_token
from linescan.metrics import Metrics, MetricsServer
from linescan.pictures import MemoryPictures

TOKEN = "0123456789abcdef0123"
Serve = Callable[..., tuple[str, LiveView]]


def event_rows(seqs: range, camera: str = "cam0") -> list[tuple[int, str, int, str]]:
    return [
        (s, "defect", 1_000 + s, json.dumps({"v": 1, "seq": s, "camera": camera, "x_start": s}))
        for s in seqs
    ]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """``serve(**view_args)``: a LiveView behind a real HTTP server on loopback."""
    servers: list[MetricsServer] = []

    def start(**kwargs: Any) -> tuple[str, LiveView]:
        metrics = Metrics(CollectorRegistry(), process=False)
        args: dict[str, Any] = {
            "model": "m@1",
            "lines_per_metre": 1000.0,
            "pixels_per_metre": None,
            "ready": lambda: True,
            "metrics": metrics,
        }
        args.update(kwargs)
        view = LiveView(**args)
        server = MetricsServer(metrics.registry, "127.0.0.1", 0, lambda: True, app=view)
        server.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}", view

    yield start
    for server in servers:
        server.stop()


def test_defects_since_limit_and_newest(serve: Serve) -> None:
    """?since=N&limit=M pages through the events oldest first; without since, the newest M;
    next_seq says where to go on."""
    url, view = serve(keep=50)
    view.record(event_rows(range(30)))
    status, got = http_json(url + "/api/defects?since=5&limit=10")
    assert status == 200
    assert [e["seq"] for e in got["events"]] == list(range(5, 15))
    assert (got["next_seq"], got["oldest_seq"]) == (15, 0)
    _, got = http_json(url + "/api/defects?limit=3")
    assert [e["seq"] for e in got["events"]] == [27, 28, 29]
    _, got = http_json(url + "/api/defects?since=30")
    assert (got["events"], got["next_seq"]) == ([], 30)


def test_defects_are_the_published_bodies(serve: Serve) -> None:
    """The API returns each event exactly as published, not a re-encoding."""
    url, view = serve()
    view.record([(0, "defect", 5, '{"v":1,"seq":0,"score_max":1.25,"note":"é"}')])
    _, headers, body = get(url + "/api/defects?since=0")
    assert body == b'{"events":[{"v":1,"seq":0,"score_max":1.25,"note":"\xc3\xa9"}],' + (
        b'"next_seq":1,"oldest_seq":0}'
    )
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"


def test_without_a_journal_the_newest_keep_events_are_served(serve: Serve) -> None:
    """The in-memory ring is bounded by pictures.keep."""
    url, view = serve(keep=5)
    view.record(event_rows(range(12)))
    _, got = http_json(url + "/api/defects?since=0")
    assert [e["seq"] for e in got["events"]] == [7, 8, 9, 10, 11]
    assert got["oldest_seq"] == 7


def test_with_a_journal_history_comes_from_it(serve: Serve, tmp_path: Path) -> None:
    """With a journal the page sees events of earlier runs too."""
    with EventJournal(tmp_path / "j.sqlite") as journal:
        journal.append_many(event_rows(range(40)))
        url, _ = serve(journal=journal, keep=5)
        _, got = http_json(url + "/api/defects?since=2&limit=1000")
        assert [e["seq"] for e in got["events"]] == list(range(2, 40))
        _, got = http_json(url + "/api/defects?limit=2")
        assert [e["seq"] for e in got["events"]] == [38, 39]


@pytest.mark.parametrize(
    "query", ["since=-1", "since=x", "limit=0", "limit=1001", "limit=", "since=1e3"]
)
def test_bad_queries_are_400_with_a_reason(serve: Serve, query: str) -> None:
    """A malformed since or limit is refused with a message that names it."""
    url, _ = serve()
    status, got = http_json(url + "/api/defects?" + query)
    assert status == 400
    assert re.search(r"(since|limit) must be a whole number from \d+ to \d+", got["error"])


def test_status_has_the_latest_message_rate_and_readiness(serve: Serve) -> None:
    """/api/status: the latest status message, lines/s from the last ones, ready, scale."""
    url, view = serve(ready=lambda: False)
    status, got = http_json(url + "/api/status")
    assert status == 200
    assert (got["status"], got["ready"], got["lines_per_s"]) == (None, False, None)
    view.status({"status_seq": 1, "lines_inspected": 1000, "defects": 2})
    view._rates[-1] = (view._rates[-1][0] - 2.0, 1000)  # as if two seconds ago
    view.status({"status_seq": 2, "lines_inspected": 5000, "defects": 3})
    _, got = http_json(url + "/api/status")
    assert got["status"]["status_seq"] == 2
    assert got["lines_per_s"] == pytest.approx(2000, rel=0.05)
    assert 0 <= got["status_age_s"] < 5
    view.status({"status_seq": 3, "lines_inspected": 5000, "defects": 3, "final": True})
    _, got = http_json(url + "/api/status")
    assert got["lines_per_s"] is None  # the daemon stopped: no rate to show
    assert (got["lines_per_metre"], got["pixels_per_metre"], got["model"]) == (
        1000.0,
        1000.0,
        "m@1",
    )


def test_pictures_are_served_as_png(serve: Serve) -> None:
    """/defects/SEQ.png serves the stored picture; an unknown seq is 404, a bad path 400."""
    store = MemoryPictures(5)
    store.put(3, "cam0", b"\x89PNG fake")
    url, _ = serve(pictures=store)
    status, headers, body = get(url + "/defects/3.png")
    assert (status, headers["Content-Type"], body) == (200, "image/png", b"\x89PNG fake")
    assert get(url + "/defects/4.png")[0] == 404
    assert get(url + "/defects/../metrics")[0] in (400, 404)
    assert get(url + "/defects/abc.png")[0] == 400


def test_the_page_ships_in_the_package_and_loads_nothing_from_elsewhere(serve: Serve) -> None:
    """/ is the packaged HTML; its script and style come from this server; the CSP says so."""
    url, _ = serve()
    status, headers, body = get(url + "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    html = body.decode()
    assert 'src="/static/app.js"' in html
    assert 'href="/static/app.css"' in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    for path, kind in (("/static/app.js", "text/javascript"), ("/static/app.css", "text/css")):
        status, headers, body = get(url + path)
        assert status == 200
        assert headers["Content-Type"].startswith(kind)
        assert b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b"")
        assert b"https://" not in body
    assert get(url + "/nothing")[0] == 404


def test_the_page_only_reads(serve: Serve) -> None:
    """No method but GET and HEAD is answered."""
    url, _ = serve()
    request = urllib.request.Request(url + "/api/defects", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 501
    info.value.close()


# --------------------------------------------------------------------------- the token


def test_a_token_guards_the_page_api_and_pictures_but_not_metrics(serve: Serve) -> None:
    """Missing: 401, wrong: 403, both counted; a bearer header or the cookie set from
    ?token= gets in; /metrics, /healthz and the page's script never need it."""
    store = MemoryPictures(5)
    store.put(1, "cam0", b"\x89PNG")
    url, view = serve(token=TOKEN, pictures=store)
    for path in ("/", "/api/status", "/api/defects", "/defects/1.png"):
        assert get(url + path)[0] == 401, path
        assert get(url + path, {"Authorization": "Bearer wrong-token-00000000"})[0] == 403
        assert get(url + path, {"Authorization": f"Bearer {TOKEN}"})[0] == 200, path
        assert get(url + path, {"Cookie": f"linescan_token={TOKEN}"})[0] == 200, path
        assert get(url + path, {"Cookie": "linescan_token=nope"})[0] == 403, path
    samples = view.metrics.registry.get_sample_value
    assert samples("linescan_http_auth_failures_total", {"reason": "missing"}) == 4
    assert samples("linescan_http_auth_failures_total", {"reason": "wrong"}) == 8
    for path in ("/metrics", "/healthz", "/readyz", "/static/app.js"):
        assert get(url + path)[0] == 200, path
    status, body = http_json(url + "/api/status")
    assert status == 401
    assert "token" in body["error"]


def test_the_token_in_the_address_becomes_a_cookie(serve: Serve) -> None:
    """/?token=T answers 303 to / with an HttpOnly, SameSite cookie: the token leaves the
    address bar and the browser's history."""
    url, _ = serve(token=TOKEN)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("GET", f"/?token={TOKEN}")
    response = conn.getresponse()
    response.read()
    assert response.status == 303
    assert response.getheader("Location") == "/"
    cookie = response.getheader("Set-Cookie") or ""
    assert cookie.startswith(f"linescan_token={TOKEN};")
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    conn.close()
    assert get(url + "/?token=wrong")[0] == 403


def test_token_files_are_checked_and_never_echoed(tmp_path: Path) -> None:
    """A token file must hold one long token; errors name the file, never its content."""
    good = tmp_path / "t"
    good.write_text(TOKEN + "\n")
    assert read_token(good) == TOKEN
    short = tmp_path / "s"
    short.write_text("secret-1")
    with pytest.raises(ConfigError) as info:
        read_token(short)
    assert "secret-1" not in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(tmp_path / "missing")


def test_loopback_and_page_addresses() -> None:
    """Only loopback addresses count as private; a wildcard bind is reached locally."""
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("192.168.1.5")
    assert page_url("0.0.0.0", 9108) == "http://127.0.0.1:9108/"
    assert page_url("::", 9108) == "http://[::1]:9108/"
    assert page_url("10.0.0.2", 80) == "http://10.0.0.2:80/"
