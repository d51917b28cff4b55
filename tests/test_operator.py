"""What the operator sees, end to end: a real daemon (ZeroMQ on loopback, journal, token)
inspects a web with a spot every 600 lines; the events carry ``repeat`` from the third spot on;
real headless Chromium shows every defect on the live page; ``linescan report`` on the journal
has an HTML entry and a CSV row per event; ``linescan demo`` prints the page's address and
serves it while it runs.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from viewkit import (
    Body,
    Running,
    chromium_run,
    free_ports,
    http,
    http_json,
    make_config,
    repeated_spots,
    running,
    save_detector,
    spot_web,
)

from linescan.data.synthetic import Defect

pytestmark = pytest.mark.slow

TOKEN = "operator-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PERIOD, FIRST, SPOT_X = 600, 150, 200
SPOTS = repeated_spots(FIRST, PERIOD, 7, x=SPOT_X)  # lines 150, 750, ..., 3750
OTHERS = [
    Defect("knot", line=1000, x=60, height=12, width=12),
    Defect("hole", line=2300, x=40, height=16, width=20),
]
LINES, WIDTH = 4200, 256


@dataclass
class Scenario:
    run: Running
    journal: Path
    events: list[Body]
    final: Body


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """The daemon, still running, after it inspected the whole web."""
    root = tmp_path_factory.mktemp("operator")
    bundle = save_detector(root / "detector")
    token = root / "page.token"
    token.write_text(TOKEN + "\n")
    journal = root / "state" / "journal.sqlite"
    config = make_config(
        journal={"path": journal},
        metrics={"listen": "127.0.0.1:0", "token_file": token},
    )
    web = spot_web(WIDTH, LINES, SPOTS + OTHERS)
    with running(config, bundle) as run:
        frames = run.send(web, height=200)
        final = run.drained(frames)
        yield Scenario(run, journal, sorted(run.defects, key=lambda e: e["seq"]), final)


def spot_events(events: list[Body]) -> list[Body]:
    return sorted(
        (e for e in events if abs((e["x_start"] + e["x_end"]) / 2 - SPOT_X - 7) <= 8),
        key=lambda e: e["line_start"],
    )


def test_a_spot_every_600_lines_repeats_from_the_third_on(scenario: Scenario) -> None:
    """Every spot is found; the first two carry no repeat, each later one repeat = {600
    lines, 0.6 m, its count, the first spot's seq}; the other defects none; the status lists
    the series and the metrics count it."""
    spots = spot_events(scenario.events)
    assert [round((e["line_start"] - FIRST) / PERIOD) for e in spots] == list(range(7))
    assert "repeat" not in spots[0]
    assert "repeat" not in spots[1]
    for k, e in enumerate(spots[2:], start=3):
        assert e["repeat"] == {
            "period_lines": PERIOD,
            "period_m": PERIOD / 1000.0,
            "count": k,
            "first_seq": spots[0]["seq"],
        }
    others = [e for e in scenario.events if e not in spots]
    assert others
    assert all("repeat" not in e for e in others)
    [series] = scenario.final["repeats"]
    assert (series["camera"], series["count"], series["first_seq"]) == ("cam0", 7, spots[0]["seq"])
    assert series["seqs"] == [e["seq"] for e in spots]
    status, _, text = http(scenario.run.url + "/metrics")
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text.decode())
        for s in fam.samples
    }
    assert samples[("linescan_repeating_defects_total", (("camera", "cam0"),))] == 5
    assert samples[("linescan_repeating_series", (("camera", "cam0"),))] == 1


def test_every_event_names_its_picture_and_it_is_served(scenario: Scenario) -> None:
    """image = /defects/SEQ.png; the PNG shows the region outlined in red."""
    for e in scenario.events:
        assert e["image"] == f"/defects/{e['seq']}.png"
        status, headers, png = http(scenario.run.url + e["image"], AUTH)
        assert status == 200
        assert headers["Content-Type"] == "image/png"
        image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None
        assert image.shape[0] <= 160
        assert np.all(image == (0, 0, 255), axis=2).sum() > 20  # the red outline
    assert http(scenario.run.url + scenario.events[0]["image"])[0] == 401  # token needed
    stored = scenario.run.daemon.registry.get_sample_value(
        "linescan_pictures_total", {"result": "stored"}
    )
    assert stored == len(scenario.events)  # each drawn once, none skipped or missing


def test_the_page_api_serves_the_journal(scenario: Scenario) -> None:
    """/api/defects returns the events as published; /api/status the final counts."""
    status, got = http_json(scenario.run.url + "/api/defects?since=0&limit=1000", AUTH)
    assert status == 200
    assert got["events"] == scenario.events  # exactly as the subscriber got them
    _, st = http_json(scenario.run.url + "/api/status", AUTH)
    assert st["ready"] is True
    assert st["status"]["defects"] == len(scenario.events)
    assert st["status"]["cameras"]["cam0"]["line"] == LINES


def test_the_browser_shows_every_defect(scenario: Scenario, tmp_path: Path) -> None:
    """Headless Chromium opens /?token=...: one element per defect, data-defect-seq holding
    its picture; one roll-map mark per defect; the repeating defect as a banner. A
    screenshot shows the banner's colour."""
    url = scenario.run.url + f"/?token={TOKEN}"
    dom = chromium_run(url, "--dump-dom")
    figures = re.findall(
        r'<figure class="defect[^"]*" data-defect-seq="(\d+)"[^>]*><img ([^>]*)>', dom
    )
    seqs = {e["seq"] for e in scenario.events}
    assert {int(s) for s, _ in figures} == seqs, dom[:2000]
    for seq, img in figures:
        assert f'src="/defects/{seq}.png"' in img
    marks = {int(s) for s in re.findall(r'data-map-seq="(\d+)"', dom)}
    assert marks == seqs
    assert "Repeating defect on cam0" in dom
    assert 'class="badge ready"' in dom
    shot = tmp_path / "page.png"
    chromium_run(url, f"--screenshot={shot}", "--window-size=1400,1000", "--hide-scrollbars")
    image = cv2.imread(str(shot))
    assert image is not None
    magenta = np.all(np.abs(image.astype(int) - (175, 28, 162)) <= 12, axis=2)
    assert magenta.sum() > 2000  # the banner and the repeating defects' borders


def test_a_wrong_token_shows_no_pictures(scenario: Scenario) -> None:
    """Chromium with a wrong token gets a refusal, not the page."""
    dom = chromium_run(scenario.run.url + "/?token=not-the-token-0000", "--dump-dom")
    assert "wrong token" in dom
    assert "data-defect-seq" not in dom


def test_the_report_has_an_entry_and_a_row_per_event(scenario: Scenario, tmp_path: Path) -> None:
    """`linescan report` on the journal: as many HTML entries (each with its picture) and CSV
    rows as events, the repeating defect listed, a roll map, defects per metre."""
    out = tmp_path / "report"
    res = subprocess.run(
        [sys.executable, "-m", "linescan.cli", "report", "--journal", str(scenario.journal),
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    n = len(scenario.events)
    assert f"({n} defects, {n} pictures)" in res.stdout
    html = (out / "index.html").read_text(encoding="utf-8")
    entries = re.findall(r'data-defect-seq="(\d+)"><img alt="defect \d+" src="data:image/png', html)
    assert sorted(int(s) for s in entries) == [e["seq"] for e in scenario.events]
    assert 'src="http' not in html
    with (out / "defects.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["seq"]) for r in rows] == [e["seq"] for e in scenario.events]
    assert sum(1 for r in rows if r["repeat_period_lines"] == str(PERIOD)) == 5
    first = spot_events(scenario.events)[0]["seq"]
    assert f"<td>#{first}</td>" in html
    assert re.search(r"<th>defects per metre</th><td>[0-9.]+</td>", html)
    assert re.search(r"<th>web inspected</th><td>4.2 m</td>", html)
    rollmap = cv2.imread(str(out / "rollmap.png"))
    assert rollmap is not None
    assert rollmap.shape[0] > 300


# --------------------------------------------------------------------------- the demo


def test_the_demo_prints_the_page_and_serves_it_while_it_runs(tmp_path: Path) -> None:
    """`linescan demo` prints the page's address first, serves the page and its API while the
    web runs, and with --hold keeps it up after the summary until Ctrl-C."""
    bundle = save_detector(tmp_path / "detector")
    config = tmp_path / "demo.toml"
    config.write_text('[engine]\nthreads = 1\nprecision = "fp32"\n')
    ports = free_ports(3)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "linescan.cli", "demo", "--config", str(config),
         "--model", str(bundle), "--lines", "6000", "--width", "512", "--defects", "3",
         "--line-rate", "2000", "--frames", f"tcp://127.0.0.1:{ports[0]}",
         "--events", f"tcp://127.0.0.1:{ports[1]}", "--metrics", f"127.0.0.1:{ports[2]}",
         "--hold"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{ports[2]}/"
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        seen: dict[str, Any] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("live page: "):
                assert line.strip() == f"live page: {url}"
            if line.startswith("sending ") and "during" not in seen:
                time.sleep(0.5)  # the web is on its way: the page must answer now
                seen["during"] = (http(url)[0], http_json(url + "api/status")[1])
            if "stays up" in line:
                break
        assert any(x.startswith("live page: ") for x in lines), "".join(lines)
        status, during = seen["during"]
        assert status == 200
        assert during["ready"] is True
        found = [x for x in lines if x.startswith("  defect #")]
        assert "stays up" in lines[-1], "".join(lines)
        _, after = http_json(url + "api/defects?since=0")
        assert len(after["events"]) == len(found) > 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) in (0, 1)  # a loaded 2-core machine is slow to stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
