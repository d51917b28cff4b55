"""Tests for linescan.report: the roll report from a journal and its picture store."""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from linescan.cli import main
from linescan.journal import EventJournal, JournalError
from linescan.pictures import Roll, SqlitePictures, pictures_path
from linescan.report import load_report, roll_map, write_report

T0 = time.time_ns() - 60 * 10**9


def event(seq: int, camera: str, line: int, x: int, **extra: Any) -> dict[str, Any]:
    return {
        "v": 1, "seq": seq, "camera": camera, "segment": 1, "line_start": line,
        "line_end": line + 10, "x_start": x, "x_end": x + 10, "position_m": line / 1000.0,
        "area_px": 100, "score_max": 3.5, "score_mean": 2.0, "threshold": 1.0, "model": "m@1",
        "t_capture_ns": T0 + seq, "t_receive_ns": T0 + seq, "t_publish_ns": T0 + seq * 10**6,
        "latency_ms": 5.0, "image": f"/defects/{seq}.png", **extra,
    }  # fmt: skip


def png() -> bytes:
    ok, buf = cv2.imencode(".png", np.full((20, 44, 3), 90, np.uint8))
    assert ok
    return bytes(buf.tobytes())


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    """Six events of two cameras (the last three of cam0 a repeating series), pictures of all
    but one, and 20 m of cam0 and 10 m of cam1 inspected, 2 m wide."""
    path = tmp_path / "journal.sqlite"
    rep = {"period_lines": 600, "period_m": 0.6, "first_seq": 0}
    events = [
        event(0, "cam0", 100, 500),
        event(1, "cam1", 300, 20),
        event(2, "cam0", 700, 500),
        event(3, "cam0", 1300, 502, repeat={**rep, "count": 3}),
        event(4, "cam0", 1900, 499, repeat={**rep, "count": 4}),
        event(5, "cam1", 4000, 70, note='<script>alert("x")</script>'),
    ]
    with EventJournal(path) as j:
        j.append_many([(e["seq"], "defect", e["t_publish_ns"], json.dumps(e)) for e in events])
    store = SqlitePictures(pictures_path(path))
    for e in events[:-1]:
        store.put(e["seq"], e["camera"], png())
    now = time.time_ns()
    store.put_roll(Roll(7, "cam0", 1, 0, 20000, 4000, None, 1000.0, 2000.0, T0 - 10**9, now))
    store.put_roll(Roll(7, "cam1", 2, 0, 10000, 4000, 4000, 1000.0, 2000.0, T0 - 10**9, now))
    store.close()
    return path


def test_the_report_counts_per_metre_and_square_metre(journal: Path, tmp_path: Path) -> None:
    """30 m and 60 m² inspected, six defects: 0.2 per metre, 0.1 per square metre; one entry
    per event with its picture (or a note); every event a CSV row."""
    report = load_report(journal)
    assert report.metres == pytest.approx(30.0)
    assert report.square_metres == pytest.approx(60.0)
    out = tmp_path / "out"
    wrote = write_report(report, out)
    assert wrote == {"events": 6, "csv_rows": 6, "html_entries": 6, "pictures": 5}
    html = (out / "index.html").read_text(encoding="utf-8")
    assert re.findall(r'data-defect-seq="(\d+)"', html) == [str(s) for s in range(6)]
    assert html.count('src="data:image/png;base64,') == 6  # five pictures and the roll map
    assert "no picture of defect 5" in html
    assert "<th>defects per metre</th><td>0.2</td>" in html
    assert "<th>defects per square metre</th><td>0.1</td>" in html
    assert '<script>alert("x")</script>' not in html  # nothing from an event is markup
    with (out / "defects.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["seq"] for r in rows] == [str(s) for s in range(6)]
    assert rows[4]["repeat_count"] == "4"
    assert rows[4]["picture"] == "yes"
    assert rows[5]["picture"] == "no"
    assert rows[0]["time_utc"].endswith("+00:00")


def test_repeating_defects_are_listed_once_per_series(journal: Path) -> None:
    """The events of one series make one row: camera, place, period, count, its events."""
    [series] = load_report(journal).series()
    assert (series.camera, series.first_seq, series.period_lines, series.count) == (
        "cam0",
        0,
        600,
        4,
    )
    assert series.seqs == (3, 4)
    assert series.x_px == 506  # the mean of 507 and 504, rounded


def test_camera_and_since_select_events(journal: Path, tmp_path: Path) -> None:
    """--camera keeps one camera's events and roll; --since the events from that seq."""
    report = load_report(journal, camera="cam1")
    assert [e["seq"] for e in report.events] == [1, 5]
    assert report.metres == pytest.approx(10.0)
    assert [e["seq"] for e in load_report(journal, since=3).events] == [3, 4, 5]


def test_the_roll_map_draws_a_panel_per_camera_and_segment(journal: Path) -> None:
    """One panel per camera and segment, a mark per defect (repeating ones in magenta)."""
    image = roll_map(load_report(journal))
    assert image.shape[1] >= 2 * 300
    magenta = np.all(image == (175, 28, 162), axis=2).sum()
    orange = np.all(image == (12, 88, 234), axis=2).sum()
    assert magenta > 2 * 50  # two repeating marks
    assert orange > 4 * 25  # four others


def test_without_a_picture_store_the_report_says_so(tmp_path: Path) -> None:
    """A journal alone: entries without pictures, per metre "not recorded", a note."""
    path = tmp_path / "j.sqlite"
    with EventJournal(path) as j:
        e = event(0, "cam0", 10, 10)
        j.append(0, "defect", e["t_publish_ns"], json.dumps(e))
    report = load_report(path)
    assert report.notes
    write_report(report, tmp_path / "out")
    html = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert "<th>defects per metre</th><td>not recorded</td>" in html
    assert "no picture of defect 0" in html


def test_the_cli_writes_the_report_and_says_what(
    journal: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`linescan report` prints what it wrote; a missing journal is one line and exit 2."""
    out = tmp_path / "r"
    assert main(["report", "--journal", str(journal), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "(6 defects, 5 pictures)" in said
    assert "(6 rows)" in said
    assert (out / "rollmap.png").is_file()
    assert main(["report", "--journal", str(tmp_path / "none.sqlite"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no event journal at" in err
    assert err.count("\n") == 1
    assert main(["report", "--journal", str(journal), "--since", "-1", "--out", str(out)]) == 2


def test_report_errors_are_linescan_errors(tmp_path: Path) -> None:
    """A file that is not a journal is refused with the library's error."""
    bad = tmp_path / "bad.sqlite"
    bad.write_text("hello")
    with pytest.raises(JournalError):
        load_report(bad)
