"""Tests for linescan.repeats: which defects form a repeating series, and when it ends."""

from __future__ import annotations

from typing import Any

import pytest

from linescan.config import RepeatsConfig
from linescan.repeats import RepeatFinder
from linescan.segment import Region


def region(line: int, x: int, size: int = 14) -> Region:
    return Region(line, line + size, x, x + size, size * size, 1.0, 0.5)


def feed(
    finder: RepeatFinder, marks: list[tuple[int, int]], camera: str = "cam0", first_seq: int = 0
) -> list[dict[str, Any] | None]:
    return [
        finder.observe(camera, first_seq + i, region(line, x)) for i, (line, x) in enumerate(marks)
    ]


def finder(**changes: Any) -> RepeatFinder:
    return RepeatFinder(RepeatsConfig(**changes), lines_per_metre=1000.0)


def test_a_mark_every_600_lines_repeats_from_the_third_on() -> None:
    """Defects 3, 4, 5 of a constant-period series carry repeat with count and first seq."""
    got = feed(finder(), [(150 + 600 * k, 200) for k in range(5)], first_seq=10)
    assert got[:2] == [None, None]
    for k, rep in enumerate(got[2:], start=3):
        assert rep == {"period_lines": 600, "period_m": 0.6, "count": k, "first_seq": 10}


def test_jitter_within_the_tolerances_still_repeats() -> None:
    """A few lines and pixels of jitter (detection is not a ruler) keep the series."""
    marks = [(100, 300), (707, 310), (1301, 295), (1912, 305), (2498, 300)]
    got = feed(finder(), marks)
    assert [r is not None for r in got] == [False, False, True, True, True]
    assert got[-1] is not None
    assert got[-1]["period_lines"] == 600  # (2498 - 100) / 4, rounded


@pytest.mark.parametrize(
    ("marks", "why"),
    [
        ([(100, 300), (700, 300), (1300, 360)], "third mark 60 px across"),
        ([(100, 300), (700, 300), (1400, 300)], "periods 600 then 700"),
        ([(100, 300), (130, 300), (160, 300)], "period under min_period_lines"),
    ],
)
def test_no_series_without_place_and_period(marks: list[tuple[int, int]], why: str) -> None:
    """Not the same place across the web, or no constant period: no repeat."""
    assert feed(finder(), marks) == [None, None, None], why


def test_other_defects_in_between_do_not_break_a_series() -> None:
    """Unrelated defects elsewhere on the web neither join nor end the series."""
    marks = [(100, 300), (400, 50), (700, 300), (1000, 120), (1300, 300), (1310, 120)]
    got = feed(finder(), marks)
    assert [r is not None for r in got] == [False, False, False, False, True, False]
    assert got[4] == {"period_lines": 600, "period_m": 0.6, "count": 3, "first_seq": 0}


def test_one_missed_mark_is_bridged_two_end_the_series() -> None:
    """max_missing = 1: a series survives one missing mark; after two it has ended, and the
    next marks must build a new one from three."""
    f = finder(max_missing=1)
    got = feed(f, [(0, 100), (600, 100), (1200, 100), (2400, 100)])  # 1800 missing
    assert got[3] is not None
    assert got[3]["count"] == 4
    assert got[3]["period_lines"] == 600
    later = feed(f, [(4800, 100), (5400, 100), (6000, 100)], first_seq=4)  # 3000..4200 missing
    assert later[:2] == [None, None]
    assert later[2] is not None
    assert later[2]["first_seq"] == 4


def test_min_count_and_the_period_bounds_come_from_the_config() -> None:
    """min_count = 4 needs four in a row; a period above max_period_lines is not looked for."""
    got = feed(finder(min_count=4), [(0, 100), (600, 100), (1200, 100), (1800, 100)])
    assert [r is not None for r in got] == [False, False, False, True]
    assert feed(finder(max_period_lines=500), [(0, 9), (600, 9), (1200, 9)]) == [None] * 3


def test_active_series_end_when_their_mark_is_overdue() -> None:
    """The status lists a series while its next mark can still come, then drops it."""
    f = finder(max_missing=0)
    feed(f, [(0, 100), (600, 100), (1200, 100)])
    assert [s["first_seq"] for s in f.describe({"cam0": 1500})] == [0]
    listed = f.describe({"cam0": 1500})[0]
    assert listed["x_px"] == 107
    assert listed["last_seq"] == 2
    assert listed["seqs"] == [0, 1, 2]  # the first two too, published before the series was
    assert f.describe({"cam0": 1807 + 18}) != []  # the mark's centre, and 12 + 1 % of 600
    assert f.describe({"cam0": 1807 + 19}) == []


def test_cameras_are_separate() -> None:
    """Marks of another camera at the same place do not join a camera's series."""
    f = finder()
    f.observe("cam0", 0, region(0, 100))
    f.observe("cam1", 1, region(600, 100))
    assert f.observe("cam0", 2, region(1200, 100)) is None


def test_a_camera_that_starts_over_forgets_its_series() -> None:
    """Line numbers far back (a restarted camera): old marks no longer count."""
    f = finder(max_period_lines=1000)
    feed(f, [(5000, 100), (5600, 100), (6200, 100)])
    assert f.active() != []
    again = feed(f, [(0, 100), (600, 100)], first_seq=3)
    assert again == [None, None]
    assert f.active() == []


def test_config_rejects_a_minimum_period_above_the_maximum() -> None:
    """min_period_lines > max_period_lines is a configuration error, not an empty search."""
    with pytest.raises(ValueError, match="min_period_lines"):
        RepeatsConfig(min_period_lines=500, max_period_lines=100)
