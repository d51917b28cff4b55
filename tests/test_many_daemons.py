"""Many cameras: the systemd template unit, per-instance configs, Prometheus discovery, and
several daemons side by side with one subscriber (``linescan events --endpoint ...``).

The daemons here are real ``linescan serve`` processes, each run as an instance of
``deploy/linescan@.service`` runs one (its own config file, ports and ``$STATE_DIRECTORY``,
where its event journal lands), on a real network of zero weights (``tools/fuzz.py``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from linescan.cli import event_sources
from linescan.config import check_config, load_config, parse_listen
from linescan.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
sys.path.insert(0, str(ROOT / "tools"))
import fuzz  # noqa: E402
import soak  # noqa: E402

Context = zmq.Context[zmq.Socket[bytes]]


# ----------------------------------------------------------------------------- systemd


def _verify_root(tmp_path: Path) -> Path:
    """A root for ``systemd-analyze verify --root``: the system's own units (the targets ours
    names), our unit files, and a stand-in for the virtual environment's ``linescan`` (verify
    checks that ExecStart's program exists)."""
    system = next(
        (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
        None,
    )
    if system is None:
        pytest.skip("no systemd unit directory on this machine to verify against")
    root = tmp_path / "root"
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    exe = root / "opt/linescan/.venv/bin/linescan"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in ("linescan.service", "linescan@.service"):
        shutil.copy(DEPLOY / unit, units / unit)
    return root


@pytest.mark.parametrize("unit", ["linescan.service", "linescan@cam1.service"])
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path, unit: str) -> None:
    """`systemd-analyze verify` accepts the unit and the template (an instance of it) without
    a single warning: an unknown key or a bad value is only a warning to systemd."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed here")
    root = _verify_root(tmp_path)
    res = subprocess.run(
        [exe, "verify", "--man=no", f"--root={root}", unit],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", res.stdout
    assert res.stderr.strip() == "", res.stderr


def test_the_template_gives_each_instance_its_own_config_state_and_log() -> None:
    """One config file, state directory (journal, engines) and log identifier per instance."""
    text = (DEPLOY / "linescan@.service").read_text()
    lines = {ln.split("=", 1)[0]: ln.split("=", 1)[1] for ln in text.splitlines() if "=" in ln}
    assert lines["ExecStart"].endswith("serve --config /etc/linescan/%i.toml")
    assert lines["StateDirectory"] == "linescan/%i"
    assert lines["WorkingDirectory"] == "/var/lib/linescan/%i"
    assert lines["SyslogIdentifier"] == "linescan-%i"
    assert lines["Type"] == "notify"
    plain = (DEPLOY / "linescan.service").read_text()
    for key in ("WatchdogSec", "Restart", "ProtectSystem", "DynamicUser", "KillSignal"):
        assert f"\n{key}={lines[key]}\n" in plain, key  # same hardening and lifecycle


# ----------------------------------------------------------------------------- configs


def _instances() -> list[Path]:
    return sorted((DEPLOY / "instances").glob("*.toml"))


def test_instance_configs_are_valid_and_use_their_own_ports() -> None:
    """Every example instance config is valid, names its camera after its file (the unit's
    instance name), and no two daemons share a port."""
    files = _instances()
    assert len(files) >= 2
    ports: list[str] = []
    for f in files:
        assert check_config(f) == []
        c = load_config(f)
        assert c.inspection.camera == f.stem
        assert c.journal.path is None  # the journal follows $STATE_DIRECTORY
        ports += [c.frames.endpoint, c.events.endpoint, c.journal.replay_endpoint]
        ports.append(f"tcp://{c.metrics.listen}")
    assert len(set(ports)) == len(ports), ports


def test_prometheus_discovers_every_instance_from_files() -> None:
    """prometheus.yml scrapes by file-based discovery, and the example targets file lists the
    metrics address of every example instance, named by its instance."""
    text = (DEPLOY / "prometheus.yml").read_text()
    assert "file_sd_configs:" in text
    assert "- /etc/prometheus/linescan/*.json" in text
    groups: list[dict[str, Any]] = json.loads((DEPLOY / "prometheus-targets.json").read_text())
    listed = {t: g["labels"]["daemon"] for g in groups for t in g["targets"]}
    for t in listed:
        parse_listen(t)
    want = {load_config(f).metrics.listen: f.stem for f in _instances()}
    assert listed == want


# ----------------------------------------------------------------------------- sources


def test_event_sources_pair_endpoints_with_replays() -> None:
    """Replay endpoints go with event endpoints by name, else in order; names default to the
    endpoint; mistakes are one clear error."""
    s = event_sources(["tcp://a:1", "tcp://b:1"], ["tcp://a:2", "tcp://b:2"])
    assert [(x.name, x.events, x.replay) for x in s] == [
        ("tcp://a:1", "tcp://a:1", "tcp://a:2"),
        ("tcp://b:1", "tcp://b:1", "tcp://b:2"),
    ]
    s = event_sources(["l1=tcp://a:1", "l2=tcp://b:1"], ["l2=tcp://b:2"])
    assert [(x.name, x.replay) for x in s] == [("l1", None), ("l2", "tcp://b:2")]
    s = event_sources(["l1=tcp://a:1", "l2=tcp://b:1"], ["l2=tcp://b:2", "tcp://a:2"])
    assert [(x.name, x.replay) for x in s] == [("l1", "tcp://a:2"), ("l2", "tcp://b:2")]
    with pytest.raises(ConfigError, match="given twice"):
        event_sources(["x=tcp://a:1", "x=tcp://b:1"], None)
    with pytest.raises(ConfigError, match="no --endpoint is named 'l3'"):
        event_sources(["l1=tcp://a:1"], ["l3=tcp://a:2"])
    with pytest.raises(ConfigError, match="one per --endpoint"):
        event_sources(["tcp://a:1", "tcp://b:1"], ["tcp://a:2"])
    with pytest.raises(ConfigError, match="--server-key"):
        event_sources(["tcp://a:1", "tcp://b:1", "tcp://c:1"], None, [Path("k1"), Path("k2")])


def test_events_cli_refuses_since_without_a_replay_endpoint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Several sources, --since, and a source without --replay: exit 2 naming the fix."""
    from linescan.cli import main

    code = main(["events", "--endpoint", "a=tcp://127.0.0.1:1", "--since", "0"])
    assert code == 2
    assert "--replay a=tcp://HOST:PORT" in capsys.readouterr().err


# ----------------------------------------------------------------------------- side by side


def _recorded(path: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        doc = json.loads(line)
        if doc.pop("topic") == "defect":
            out.setdefault(doc.pop("source"), []).append(doc)
    return out


@pytest.mark.slow
def test_three_daemons_one_subscriber_loses_nothing(tmp_path: Path) -> None:
    """Three `linescan serve` processes side by side, each with its own ports and state
    directory, a camera sending frames with defects to each, and one `linescan events`
    following all three from seq 0 (it joins late: the first events come from the journals).
    One daemon is SIGKILLed and restarted meanwhile. The subscriber ends with every daemon's
    journal exactly: each event once, in seq order, tagged with its source, none lost."""
    bundle = fuzz.flat_bundle(tmp_path / "bundle")
    ctx: Context = zmq.Context()
    names = ("cam1", "cam2", "cam3")
    daemons: dict[str, soak.DaemonProcess] = {}
    for name in names:
        (tmp_path / name).mkdir()
        daemons[name] = soak.DaemonProcess(
            tmp_path / name, bundle, curve=False, state_directory=True, camera=name
        )
    record = tmp_path / "events.jsonl"
    senders: list[soak.Sender] = []
    sub: subprocess.Popen[str] | None = None
    try:
        for d in daemons.values():
            d.launch()
        for d in daemons.values():
            d.wait_ready(ctx)
        for name, d in daemons.items():
            planner = fuzz.Planner(random.Random(name), 128, fuzz.PATCH, name, d.limits)
            senders.append(soak.Sender(d, ctx, planner, fps=8.0, defect_every=1))
        time.sleep(2.0)
        cmd = [sys.executable, "-m", "linescan.cli", "events", "--since", "0", "--quiet"]
        for name, d in daemons.items():
            cmd += ["--endpoint", f"{name}={d.events}", "--replay", f"{name}={d.replay}"]
        cmd += ["--record", str(record)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        sub = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)
        daemons["cam2"].kill()
        daemons["cam2"].start(ctx)
        time.sleep(2.0)
        # each camera's last frame has a defect and ends the web: once its event is out, all are
        last = {name: s.finish() for name, s in zip(names, senders, strict=True)}

        def caught_up() -> bool:
            got = _recorded(record)
            return all(
                any(fuzz.overlaps(last[name], e) for e in got.get(name, []))
                and len(got[name]) >= len(soak.journal_rows(d.journal))
                for name, d in daemons.items()
            )

        deadline = time.monotonic() + 60
        while not caught_up() and time.monotonic() < deadline:
            time.sleep(0.2)
        sub.send_signal(signal.SIGINT)
        _, err = sub.communicate(timeout=30)
        assert sub.returncode == 0, err
    finally:
        for s in senders:
            s.stop()
        if sub is not None and sub.poll() is None:
            sub.kill()
            sub.wait(10)
        codes = {name: d.stop() for name, d in daemons.items()}
        ctx.destroy(linger=0)
    assert codes == dict.fromkeys(names, 0)
    got = _recorded(record)
    assert set(got) == set(names)
    for name, d in daemons.items():
        assert d.journal == tmp_path / name / "state" / "journal.sqlite"  # $STATE_DIRECTORY's
        rows = soak.journal_rows(d.journal)
        assert len(rows) >= 10, name
        assert [int(e["seq"]) for e in got[name]] == list(range(len(rows))), name
        assert [json.loads(b) for _, b in rows] == got[name], name
        assert {e["camera"] for e in got[name]} == {name}
    assert daemons["cam2"].starts == 2
    summary = {ln.split(":", 1)[0]: ln for ln in err.splitlines() if ": defect events:" in ln}
    assert set(summary) == set(names), err
    for line in summary.values():
        replayed = int(line.split("defect events: ", 1)[1].split(" replayed")[0])
        assert replayed > 0, line  # it joined late: the first events came from the journal
        assert line.endswith("lost: 0 []"), line


def test_a_daemon_whose_port_was_taken_starts_again_on_new_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test harness chooses free ports, and another process may take one before the
    daemon binds it: the daemon exits naming the address, and the harness chooses again."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = int(taken.getsockname()[1])
    real = soak.free_port
    calls = iter(range(1000))

    def first_metrics_port_taken() -> int:
        return port if next(calls) == 3 else real()  # frames, events, replay, metrics

    monkeypatch.setattr(soak, "free_port", first_metrics_port_taken)
    bundle = fuzz.flat_bundle(tmp_path / "bundle")
    (tmp_path / "d").mkdir()
    d = soak.DaemonProcess(tmp_path / "d", bundle, curve=False)
    assert d.ports["metrics"] == port
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        d.start(ctx, timeout=120)
        assert d.ports["metrics"] != port
        assert d.starts == 1
    finally:
        d.stop()
        ctx.destroy(linger=0)
        taken.close()
