"""Tests for CurveZMQ on the frame and event sockets, key files, and what errors may say."""

from __future__ import annotations

import contextlib
import json
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from prometheus_client import CollectorRegistry

from linescan.cli import main
from linescan.config import Config, check_config, load_config
from linescan.errors import ConfigError
from linescan.ingest import encode_frame
from linescan.metrics import Metrics, MetricsServer
from linescan.replay import fetch
from linescan.security import (
    CurveKeys,
    authorized_keys,
    client_setup,
    create_keys,
    load_public_key,
    load_secret_key,
    looks_like_key,
)
from linescan.service import Daemon

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fuzz

Context = zmq.Context[zmq.Socket[bytes]]
# A made-up secret key (the ZeroMQ documentation's example): what must never be echoed.
SECRET = "JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6"


@pytest.fixture
def context() -> Iterator[Context]:
    ctx: Context = zmq.Context()  # a fresh one: ZeroMQ allows one ZAP handler per context
    yield ctx
    ctx.destroy(linger=0)  # never hangs on a socket a failed test left open


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Server keys, one authorised camera, one stranger."""
    k = tmp_path / "keys"
    create_keys(k, "frames")
    create_keys(k, "events")
    create_keys(k / "cameras", "camera1")
    (k / "cameras" / "camera1.key_secret").replace(k / "camera1.key_secret")
    create_keys(tmp_path / "elsewhere", "stranger")
    return {
        "frames": k / "frames.key_secret",
        "events": k / "events.key_secret",
        "cameras": k / "cameras",
        "camera": k / "camera1.key_secret",
        "stranger": tmp_path / "elsewhere" / "stranger.key_secret",
    }


def curve_config(keys: dict[str, Path], tmp_path: Path) -> Config:
    return Config.model_validate(
        {
            "frames": {
                "endpoint": "tcp://127.0.0.1:*",
                "curve_server_secret_key_file": str(keys["frames"]),
                "curve_authorized_keys_dir": str(keys["cameras"]),
            },
            "events": {
                "endpoint": "tcp://127.0.0.1:*",
                "status_interval_s": 0.1,
                "curve_server_secret_key_file": str(keys["events"]),
            },
            "metrics": {"enabled": False},
            "inspection": {"stride": fuzz.STRIDE, "max_wait_ms": 5.0},
            "queues": {"overload": "block"},
            "journal": {
                "path": str(tmp_path / "j.sqlite"),
                "replay_endpoint": "tcp://127.0.0.1:*",
            },
        }
    )


def wait(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def push(
    context: Context, endpoint: str, setup: Callable[[zmq.Socket[bytes]], None] | None
) -> zmq.Socket[bytes]:
    s = context.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 4)
    if setup is not None:
        setup(s)
    s.connect(endpoint)
    return s


def test_only_authorised_cameras_get_frames_in(
    keys: dict[str, Path], tmp_path: Path, context: Context
) -> None:
    """With CURVE, an authorised camera's frames are inspected; a sender with an unknown key,
    one on plain TCP and one with the wrong server key are refused and counted, and none of
    their frames gets in. Events and replays are encrypted: only subscribers that know the
    server key receive them."""
    events: list[dict[str, Any]] = []
    statuses: list[dict[str, Any]] = []
    d = Daemon(
        curve_config(keys, tmp_path),
        fuzz.flat_meta(),
        fuzz.flat_backend(),
        CollectorRegistry(),
        context,
        on_event=lambda t, b: (events if t == "defect" else statuses).append(b),
    )
    d.start()
    frames_public = load_public_key(keys["frames"])
    events_public = load_public_key(keys["events"])
    camera = load_secret_key(keys["camera"])
    stranger = load_secret_key(keys["stranger"])
    socks: list[zmq.Socket[bytes]] = []
    try:
        secure_sub = context.socket(zmq.SUB)
        plain_sub = context.socket(zmq.SUB)
        socks += [secure_sub, plain_sub]
        client_setup(events_public)(secure_sub)
        for s in (secure_sub, plain_sub):
            s.setsockopt(zmq.SUBSCRIBE, b"defect")
            s.connect(d.events_endpoint)
        rogues = [
            push(context, d.frames_endpoint, client_setup(frames_public, stranger)),
            push(context, d.frames_endpoint, None),
            push(context, d.frames_endpoint, client_setup(stranger.public, camera)),
        ]
        good = push(context, d.frames_endpoint, client_setup(frames_public, camera))
        socks += [*rogues, good]
        time.sleep(0.3)  # subscriptions settle
        for i, s in enumerate(rogues):
            px = fuzz.web_frame(fuzz.PATCH, 128, (8, 40, 16, 16))
            for seq in range(10):  # they queue until the high-water mark, then block
                with contextlib.suppress(zmq.Again):
                    s.send_multipart(encode_frame(f"rogue{i}", seq, px), flags=zmq.NOBLOCK)
        for i in range(3):
            px = fuzz.web_frame(fuzz.PATCH, 128, (8, 40, 16, 16))
            good.send_multipart(encode_frame("cam0", i, px, line=i * fuzz.PATCH, end=i == 2))
        assert wait(lambda: len(events) == 3)
        get = d.metrics.registry.get_sample_value
        labels = {"socket": "frames"}

        def refused(reason: str) -> float:
            return get("linescan_auth_failures_total", {**labels, "reason": reason}) or 0.0

        assert wait(lambda: refused("key") >= 1 and refused("protocol") >= 2)
        assert d.alive()
        assert d.totals.frames_received == 3
        assert d.totals.frames_rejected == 0
        assert wait(lambda: bool(statuses) and statuses[-1]["auth_failures"] >= 3)
        assert secure_sub.poll(5000)
        assert json.loads(secure_sub.recv_multipart()[1])["seq"] == 0
        assert not plain_sub.poll(300)
        assert d.replay_endpoint is not None
        page = fetch(d.replay_endpoint, 0, context=context, configure=client_setup(events_public))
        assert [e["seq"] for e in page.events] == [0, 1, 2]
        with pytest.raises(Exception, match="no reply"):
            fetch(d.replay_endpoint, 0, timeout_s=0.3, context=context)  # plain TCP: refused
    finally:
        for s in socks:
            s.close(linger=0)
        d.stop()
        assert d.join(30)


def test_frame_curve_needs_both_keys(keys: dict[str, Path], context: Context) -> None:
    """A server key without authorised camera keys (or the reverse) is refused at start."""
    config = Config.model_validate(
        {
            "frames": {
                "endpoint": "tcp://127.0.0.1:*",
                "curve_server_secret_key_file": str(keys["frames"]),
            },
            "events": {"endpoint": "tcp://127.0.0.1:*"},
        }
    )
    d = Daemon(config, fuzz.flat_meta(), fuzz.flat_backend(), CollectorRegistry(), context)
    with pytest.raises(ConfigError, match="go together"):
        d.start()


def test_key_files(keys: dict[str, Path], tmp_path: Path) -> None:
    """pyzmq certificates and bare Z85 keys load; the public half matches the secret."""
    pair = load_secret_key(keys["camera"])
    assert len(pair.public) == len(pair.secret) == 40
    assert SECRET not in repr(CurveKeys(b"x" * 40, SECRET.encode()))
    assert load_public_key(keys["cameras"] / "camera1.key") == pair.public
    assert load_public_key(keys["camera"]) == pair.public
    bare = tmp_path / "bare.key_secret"
    bare.write_text(pair.secret.decode() + "\n")
    bare.chmod(0o600)
    assert load_secret_key(bare).public == pair.public
    assert authorized_keys(keys["cameras"]) == {pair.public}
    assert stat.S_IMODE(keys["camera"].stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (f'public-key = "{"a" * 40}"\n', "holds no secret key"),
        (f"secret-key = '{SECRET[:-1]}'\n", "not 40 Z85 characters"),
        (f"# {SECRET}\nnothing here = 1\n", "holds no secret key"),
        (f'public-key = "{"a" * 40}"\nsecret-key = "{SECRET}"\n', "does not belong"),
    ],
)
def test_bad_key_files_are_refused_without_echo(tmp_path: Path, content: str, message: str) -> None:
    """A key file that cannot be used is refused with a reason that never quotes it."""
    path = tmp_path / "server.key_secret"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_secret_key(path)
    assert SECRET not in str(info.value)
    assert SECRET[:-1] not in str(info.value)


@pytest.mark.parametrize("secret", [SECRET, "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"])
def test_a_key_pasted_as_a_file_name_is_not_echoed(tmp_path: Path, secret: str) -> None:
    """A secret pasted where a key file's path belongs (even one with a / in it) is called
    out, not printed; ordinary long paths are not mistaken for keys."""
    assert looks_like_key(secret)
    with pytest.raises(ConfigError, match="looks like a key") as info:
        load_secret_key(tmp_path / secret)
    assert secret not in str(info.value)
    assert secret.split("/")[-1] not in str(info.value)
    plain = "/run/credentials/linescan.service/frames-server.key_secret/more/and/more"
    assert not looks_like_key(plain)
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_secret_key(Path(plain))
    assert plain in str(info.value)


def test_a_missing_or_bad_authorized_dir(tmp_path: Path) -> None:
    """A missing directory is an error; an unusable file in it is skipped."""
    with pytest.raises(ConfigError, match="not a directory"):
        authorized_keys(tmp_path / "nope")
    (tmp_path / "junk.key").write_text("hello\n")
    assert authorized_keys(tmp_path) == set()


@pytest.mark.parametrize(
    "toml",
    [
        f'[frames]\ncurve_server_secret_key = "{SECRET}"\n',  # unknown key, secret value
        f'[events]\ncurve_server_secret_key_file = "{SECRET}"\nsndhwm = "{SECRET}"\n',
        f'[frames]\nendpoint = "{SECRET}"\n',
        f'[metrics]\nlisten = "{SECRET}"\n',
        f'[inspection]\ncamera = "{SECRET}"\n',
        f'[frames]\ncurve_authorized_keys_dir = ["{SECRET}"]\n',
        f'[journal]\nreplay_endpoint = "tcp://{SECRET}:1"\nmax_events = 0\n',
        f"[frames]\ncurve_server_secret_key_file = {SECRET}\n",  # unquoted: TOML syntax error
        f'{SECRET} = "x"\n',
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "endpoint",
        "listen",
        "camera",
        "list",
        "endpoint-host",
        "toml-syntax",
        "key-as-name",
    ],
)
def test_config_errors_never_echo_key_material(
    tmp_path: Path, toml: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever is wrong with a config holding a key-looking string, no message quotes it."""
    path = tmp_path / "linescan.toml"
    path.write_text(toml)
    errors = check_config(path)
    assert errors
    assert not any(SECRET in e for e in errors)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert SECRET not in str(info.value)
    assert main(["check-config", str(path)]) == 1
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err


def test_metrics_bind_to_localhost_by_default() -> None:
    """The default metrics address is loopback, and the server binds exactly that."""
    config = Config()
    assert config.metrics.host == "127.0.0.1"
    server = MetricsServer(
        Metrics(CollectorRegistry(), process=False).registry,
        config.metrics.host,
        0,
        lambda: True,
    )
    server.start()
    try:
        assert server._server.server_address[0] == "127.0.0.1"
    finally:
        server.stop()


def test_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`linescan keygen DIR NAMES` writes usable key pairs, secrets mode 600, and never
    overwrites."""
    assert main(["keygen", str(tmp_path / "k"), "frames", "camera1"]) == 0
    out = capsys.readouterr().out
    for name in ("frames", "camera1"):
        secret = tmp_path / "k" / f"{name}.key_secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        pair = load_secret_key(secret)
        assert load_public_key(tmp_path / "k" / f"{name}.key") == pair.public
        assert pair.secret.decode() not in out
    assert main(["keygen", str(tmp_path / "k"), "frames"]) == 2
    assert "not overwriting" in capsys.readouterr().err
