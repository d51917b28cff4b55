"""``linescan report``: a roll report from the event journal, for the shift or the customer.

    linescan report --journal FILE [--since N] [--camera C] --out DIR

writes

* ``DIR/index.html``: one self-contained file (pictures and the roll map embedded, no link
  out): how much web was inspected, defects per metre and per square metre, the repeating
  defects, the roll map, and every defect event as an element ``data-defect-seq="SEQ"`` with
  its picture, position, size and score;
* ``DIR/defects.csv``: one row per defect event, with a header;
* ``DIR/rollmap.png``: the roll map: one panel per camera and segment, down the web (metres)
  against across it (camera pixels), one mark per defect (repeating ones in magenta).

The events come from the journal (``journal.py``) and the pictures and inspected lengths from
the picture store beside it (``pictures.py``: ``<journal>.pictures.sqlite``); a journal
without one (pictures off, or an older daemon) gives a report without pictures, whose
defects per metre say "not recorded". With ``--since N`` the inspected length counts the
segments seen since event N was published.
"""

from __future__ import annotations

import base64
import csv
import html
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np
import numpy.typing as npt

from linescan.journal import read_journal
from linescan.pictures import Roll, pictures_path, read_pictures

__all__ = ["Report", "Series", "load_report", "roll_map", "write_report"]

U8 = npt.NDArray[np.uint8]
CSV_COLUMNS = (
    "seq", "camera", "segment", "time_utc", "position_m", "line_start", "line_end", "x_start",
    "x_end", "area_px", "score_max", "score_mean", "threshold", "model", "latency_ms",
    "repeat_period_lines", "repeat_period_m", "repeat_count", "repeat_first_seq", "picture",
)  # fmt: skip
MAX_PANELS = 24  # roll map panels (camera x segment) drawn; the newest first
PANEL_W, PANEL_H, AXIS_W, TITLE_H, FOOT_H = 260, 640, 64, 34, 22


@dataclass(frozen=True)
class Series:
    """A repeating defect as the report shows it: the events that carried its ``repeat``."""

    camera: str
    first_seq: int
    period_lines: int
    period_m: float
    count: int
    seqs: tuple[int, ...]
    x_px: int


@dataclass
class Report:
    journal: Path
    events: list[dict[str, Any]]
    pictures: dict[int, bytes]
    rolls: list[Roll]
    since: int = 0
    camera: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def metres(self) -> float | None:
        return sum(r.metres for r in self.rolls) if self.rolls else None

    @property
    def square_metres(self) -> float | None:
        return sum(r.square_metres for r in self.rolls) if self.rolls else None

    def series(self) -> list[Series]:
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for e in self.events:
            rep = e.get("repeat")
            if isinstance(rep, dict):
                groups.setdefault((str(e["camera"]), int(rep["first_seq"])), []).append(e)
        out = []
        for (camera, first), evs in sorted(groups.items()):
            last = evs[-1]["repeat"]
            xs = [(e["x_start"] + e["x_end"]) / 2 for e in evs]
            out.append(
                Series(
                    camera=camera,
                    first_seq=first,
                    period_lines=int(last["period_lines"]),
                    period_m=float(last["period_m"]),
                    count=int(last["count"]),
                    seqs=tuple(int(e["seq"]) for e in evs),
                    x_px=round(sum(xs) / len(xs)),
                )
            )
        return out


def load_report(journal: Path, since: int = 0, camera: str | None = None) -> Report:
    """The events (from ``since``, of ``camera``), their pictures and the inspected lengths.

    Raises ``JournalError`` when the journal is missing or not one, ``PictureError`` when the
    picture store beside it is not one.
    """
    journal = Path(journal)
    events = [
        e for e in read_journal(journal, since) if camera is None or e.get("camera") == camera
    ]
    report = Report(journal, events, {}, [], since, camera)
    store = pictures_path(journal)
    if store.is_file():
        pictures, rolls = read_pictures(store)
        seqs = {int(e["seq"]) for e in events}
        report.pictures = {s: p for s, p in pictures.items() if s in seqs}
        if camera is not None:
            rolls = [r for r in rolls if r.camera == camera]
        if since > 0 and events:
            t0 = int(events[0]["t_publish_ns"])
            rolls = [r for r in rolls if r.t_last_ns >= t0]
        report.rolls = sorted(rolls, key=lambda r: (r.t_first_ns, r.camera, r.segment))
    else:
        report.notes.append(f"no picture store beside the journal ({store.name}): no pictures, "
                            "inspected length not recorded")  # fmt: skip
    return report


# -------------------------------------------------------------------- the roll map


@dataclass
class _Panel:
    camera: str
    segment: int
    first: int
    last: int
    width: int
    lines_per_metre: float
    events: list[dict[str, Any]] = field(default_factory=list)
    t_last: int = 0


def _panels(report: Report) -> list[_Panel]:
    """One panel per (camera, segment, daemon run), the newest first."""
    panels: dict[tuple[str, int, int], _Panel] = {}
    lpm_default = report.rolls[0].lines_per_metre if report.rolls else None
    for r in report.rolls:
        panels[(r.camera, r.segment, r.run)] = _Panel(
            r.camera, r.segment, r.line_start, r.line_end, r.width_px, r.lines_per_metre,
            t_last=r.t_last_ns,
        )  # fmt: skip
    slack = 5_000_000_000  # ns: an event may go out a little before its first roll record
    for e in report.events:
        cam, seg, t = str(e["camera"]), int(e["segment"]), int(e["t_publish_ns"])
        # segment numbers restart with the daemon: the run inspecting it when the event went out
        run = next(
            (
                r.run
                for r in report.rolls
                if r.camera == cam and r.segment == seg
                and r.t_first_ns - slack <= t <= r.t_last_ns + slack
            ),
            -1,
        )  # fmt: skip
        key = (cam, seg, run)
        p = panels.get(key)
        if p is None:
            lpm = lpm_default or _lines_per_metre(e)
            p = panels[key] = _Panel(cam, seg, int(e["line_start"]), int(e["line_end"]), 0, lpm)
        p.first = min(p.first, int(e["line_start"]))
        p.last = max(p.last, int(e["line_end"]))
        p.width = max(p.width, int(e["x_end"]))
        p.t_last = max(p.t_last, t)
        p.events.append(e)
    return sorted(panels.values(), key=lambda p: -p.t_last)


def _lines_per_metre(e: dict[str, Any]) -> float:
    pos, line = float(e.get("position_m") or 0.0), int(e["line_start"])
    return line / pos if pos > 0 and line > 0 else 1000.0


def roll_map(report: Report) -> U8:
    """The roll map as a BGR image: a panel per camera and segment, newest first."""
    panels = _panels(report)[:MAX_PANELS]
    if not panels:
        canvas = np.full((120, 420, 3), 255, np.uint8)
        _text(canvas, "no defects and no inspected web in this report", (10, 64), 0.5)
        return canvas
    per_row = min(len(panels), 6)
    rows = math.ceil(len(panels) / per_row)
    cell_w, cell_h = AXIS_W + PANEL_W + 16, TITLE_H + PANEL_H + FOOT_H
    canvas = np.full((rows * cell_h, per_row * cell_w, 3), 255, np.uint8)
    for i, p in enumerate(panels):
        ox, oy = (i % per_row) * cell_w, (i // per_row) * cell_h
        _draw_panel(canvas, p, ox, oy)
    return canvas


def _draw_panel(canvas: U8, p: _Panel, ox: int, oy: int) -> None:
    x0, y0 = ox + AXIS_W, oy + TITLE_H
    width = max(p.width, 1)
    span = max(p.last - p.first, 1)
    _text(canvas, f"{p.camera} segment {p.segment}: {len(p.events)} defects", (ox + 4, oy + 22),
          0.5, bold=True)  # fmt: skip
    cv2.rectangle(canvas, (x0, y0), (x0 + PANEL_W, y0 + PANEL_H), (247, 242, 238), -1)
    cv2.rectangle(canvas, (x0, y0), (x0 + PANEL_W, y0 + PANEL_H), (160, 160, 160), 1)
    for k in range(5):
        line = p.first + span * k / 4
        y = y0 + round(PANEL_H * k / 4)
        cv2.line(canvas, (x0 - 4, y), (x0, y), (120, 120, 120), 1)
        _text(canvas, f"{line / p.lines_per_metre:.1f} m", (ox + 2, y + 4), 0.4)
    _text(canvas, "0", (x0, y0 + PANEL_H + 16), 0.4)
    _text(canvas, f"{width} px", (x0 + PANEL_W - 52, y0 + PANEL_H + 16), 0.4)
    for e in sorted(p.events, key=lambda e: bool(e.get("repeat"))):
        cx = x0 + round((e["x_start"] + e["x_end"]) / 2 / width * PANEL_W)
        cy = y0 + round(((e["line_start"] + e["line_end"]) / 2 - p.first) / span * PANEL_H)
        repeat = bool(e.get("repeat"))
        colour = (175, 28, 162) if repeat else (12, 88, 234)  # magenta / orange (BGR)
        cv2.circle(canvas, (cx, cy), 6 if repeat else 5, colour, -1, cv2.LINE_AA)
        cv2.circle(canvas, (cx, cy), 6 if repeat else 5, (40, 40, 40), 1, cv2.LINE_AA)


def _text(canvas: U8, text: str, at: tuple[int, int], scale: float, bold: bool = False) -> None:
    cv2.putText(canvas, text, at, cv2.FONT_HERSHEY_SIMPLEX, scale, (30, 30, 30),
                2 if bold else 1, cv2.LINE_AA)  # fmt: skip


# -------------------------------------------------------------------- writing


def write_report(report: Report, out: Path) -> dict[str, int]:
    """Write index.html, defects.csv and rollmap.png into ``out``; returns what it wrote."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ok, png = cv2.imencode(".png", roll_map(report))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 BGR image
        raise RuntimeError("cannot encode the roll map")
    map_png = bytes(png.tobytes())
    (out / "rollmap.png").write_bytes(map_png)
    with (out / "defects.csv").open("w", newline="", encoding="utf-8") as f:
        rows = _write_csv(f, report)
    with (out / "index.html").open("w", encoding="utf-8") as f:
        entries = _write_html(f, report, map_png)
    pictures = sum(1 for e in report.events if int(e["seq"]) in report.pictures)
    return {"events": len(report.events), "csv_rows": rows, "html_entries": entries,
            "pictures": pictures}  # fmt: skip


def _time(e: dict[str, Any]) -> str:
    t = e.get("t_publish_ns")
    if not isinstance(t, int):
        return ""
    return datetime.fromtimestamp(t / 1e9, tz=UTC).isoformat(timespec="milliseconds")


def _write_csv(f: TextIO, report: Report) -> int:
    w = csv.writer(f)
    w.writerow(CSV_COLUMNS)
    for e in report.events:
        rep = e.get("repeat") or {}
        w.writerow([
            e["seq"], e["camera"], e["segment"], _time(e), e.get("position_m"),
            e["line_start"], e["line_end"], e["x_start"], e["x_end"], e["area_px"],
            e.get("score_max"), e.get("score_mean"), e.get("threshold"), e.get("model"),
            e.get("latency_ms"), rep.get("period_lines"), rep.get("period_m"), rep.get("count"),
            rep.get("first_seq"), "yes" if int(e["seq"]) in report.pictures else "no",
        ])  # fmt: skip
    return len(report.events)


_CSS = """
body{font-family:system-ui,"DejaVu Sans",sans-serif;margin:1.5rem;color:#111827;background:#fff}
h1{font-size:1.4rem;margin:0 0 .3rem}h2{font-size:1.1rem;margin:1.6rem 0 .5rem}
.muted{color:#6b7280}table{border-collapse:collapse}td,th{border:1px solid #d1d5db;
padding:.25rem .6rem;text-align:left;font-variant-numeric:tabular-nums}
th{background:#f3f4f6}.repeat{color:#a21caf;font-weight:700}
#defects{display:flex;flex-wrap:wrap;gap:.6rem}
.defect{margin:0;padding:.3rem;border:1px solid #d1d5db;border-radius:6px;width:340px}
.defect.repeat{border:2px solid #a21caf}.defect img{display:block;max-width:100%}
.defect figcaption{font-size:.8rem;line-height:1.35;margin-top:.2rem;font-weight:400;
color:#111827}.nopic{height:80px;background:#e5e7eb;display:flex;align-items:center;
justify-content:center;color:#6b7280}
@media print{.defect{break-inside:avoid}}
"""


def _fmt(value: float | None, digits: int) -> str:
    return "not recorded" if value is None else f"{value:,.{digits}f}"


def _per(n: int, amount: float | None) -> str:
    if amount is None:
        return "not recorded"
    if amount <= 0:
        return "-"
    return f"{n / amount:.4g}"


def _write_html(f: TextIO, report: Report, map_png: bytes) -> int:
    esc = html.escape
    events = report.events
    cams = sorted({str(e["camera"]) for e in events} | {r.camera for r in report.rolls})
    times = [e["t_publish_ns"] for e in events if isinstance(e.get("t_publish_ns"), int)]
    span = ""
    if times:
        a = datetime.fromtimestamp(min(times) / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
        b = datetime.fromtimestamp(max(times) / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
        span = f"{a} to {b} UTC"
    f.write('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">')
    f.write(f"<title>linescan roll report: {esc(report.journal.name)}</title>")
    f.write(f"<style>{_CSS}</style></head><body>\n")
    f.write("<h1>linescan roll report</h1>\n")
    selection = f"events from seq {report.since}" + (
        f", camera {report.camera}" if report.camera else ""
    )
    f.write(f'<p class="muted">{esc(str(report.journal))}: {esc(selection)}; {esc(span)}</p>\n')
    for note in report.notes:
        f.write(f'<p class="muted">{esc(note)}</p>\n')
    m, m2 = report.metres, report.square_metres
    f.write("<table><tbody>\n")
    for label, value in (
        ("cameras", ", ".join(cams) or "-"),
        ("defects", str(len(events))),
        ("web inspected", f"{_fmt(m, 1)} m" if m is not None else "not recorded"),
        ("area inspected", f"{_fmt(m2, 1)} m²" if m2 is not None else "not recorded"),
        ("defects per metre", _per(len(events), m)),
        ("defects per square metre", _per(len(events), m2)),
        ("repeating defects", str(len(report.series()))),
    ):
        f.write(f"<tr><th>{esc(label)}</th><td>{esc(value)}</td></tr>\n")
    f.write("</tbody></table>\n")

    f.write("<h2>Repeating defects</h2>\n")
    series = report.series()
    if not series:
        f.write('<p class="muted">none</p>\n')
    else:
        f.write("<table><thead><tr><th>camera</th><th>across the web</th><th>period</th>"
                "<th>in a row</th><th>first</th><th>events from the third on</th></tr></thead>"
                "<tbody>\n")  # fmt: skip
        for s in series:
            f.write(
                f'<tr class="repeat"><td>{esc(s.camera)}</td><td>x ≈ {s.x_px} px</td>'
                f"<td>{s.period_m:.3f} m ({s.period_lines} lines)</td><td>{s.count}</td>"
                f"<td>#{s.first_seq}</td><td>{', '.join(f'#{q}' for q in s.seqs)}</td></tr>\n"
            )
        f.write("</tbody></table>\n")

    f.write("<h2>Roll map</h2>\n")
    f.write('<p class="muted">down the web (metres) against across it (camera pixels), one '
            "mark per defect; repeating defects in magenta</p>\n")  # fmt: skip
    f.write(f'<img id="rollmap" alt="roll map" src="data:image/png;base64,'
            f'{base64.b64encode(map_png).decode()}">\n')  # fmt: skip

    f.write(f'<h2>Defects ({len(events)})</h2>\n<div id="defects">\n')
    for e in events:
        _write_entry(f, e, report.pictures.get(int(e["seq"])))
    f.write("</div>\n</body></html>\n")
    return len(events)


def _write_entry(f: TextIO, e: dict[str, Any], png: bytes | None) -> None:
    esc = html.escape
    seq = int(e["seq"])
    rep = e.get("repeat")
    cls = "defect repeat" if rep else "defect"
    f.write(f'<figure class="{cls}" data-defect-seq="{seq}">')
    if png is not None:
        f.write(f'<img alt="defect {seq}" src="data:image/png;base64,'
                f'{base64.b64encode(png).decode()}">')  # fmt: skip
    else:
        f.write(f'<div class="nopic">no picture of defect {seq}</div>')
    score = e.get("score_max")
    thr = e.get("threshold")
    caption = (
        f"<b>#{seq}</b> {esc(str(e['camera']))} · segment {int(e['segment'])} · "
        f"{float(e.get('position_m') or 0):.2f} m · x {int(e['x_start'])}–{int(e['x_end'])} px"
        f" · {int(e['area_px'])} px² · score {_sig(score)} (threshold {_sig(thr)})"
        f"<br>{esc(_time(e))}"
    )
    if isinstance(rep, dict):
        caption += (
            f'<br><span class="repeat">repeats every {float(rep["period_m"]):.3f} m '
            f"({int(rep['period_lines'])} lines), {int(rep['count'])} in a row since "
            f"#{int(rep['first_seq'])}</span>"
        )
    f.write(f"<figcaption>{caption}</figcaption></figure>\n")


def _sig(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, int | float) else "-"
