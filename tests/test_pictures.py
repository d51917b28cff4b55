"""Tests for linescan.pictures: the PNG of a crop, the stores, and the drawing thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry

from linescan.crops import Crop
from linescan.metrics import Metrics
from linescan.pictures import (
    MemoryPictures,
    PictureError,
    PictureWriter,
    Roll,
    SqlitePictures,
    pictures_path,
    read_pictures,
    render,
)
from linescan.segment import Region

U8 = npt.NDArray[np.uint8]
RED = (0, 0, 255)


def crop(scored: int = 64, size: int = 64, with_scores: bool = True) -> Crop:
    """A 64x64 window at line 1000, x 200 with a dark 16x16 region in its middle."""
    pixels = np.full((size, size), 128, np.uint8)
    pixels[24:40, 24:40] = 10
    scores = np.zeros((size, size), np.uint8)
    scores[24:40, 24:40] = 255
    return Crop(
        camera="cam0",
        region=Region(1024, 1040, 224, 240, 256, 2.0, 1.5),
        window=(1000, 1000 + size, 200, 200 + size),
        step=1,
        pixels=pixels,
        scores=scores[: scored * size // 64] if with_scores else None,
        scored_lines=scored if with_scores else 0,
        bit_depth=8,
    )


def decode(png: bytes) -> U8:
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    out: U8 = image
    return out


def metrics() -> Metrics:
    return Metrics(CollectorRegistry(), process=False)


# --------------------------------------------------------------------------- drawing


def test_a_picture_is_the_crop_outlined_beside_its_score_map() -> None:
    """size x (2 size + 4): camera pixels with a red outline around the region (not on it),
    the score map beside it, hot where the region is."""
    png = render(crop(), 160)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = decode(png)
    assert image.shape == (160, 2 * 160 + 4, 3)
    left, right = image[:, :160], image[:, 164:]
    red = np.all(left == RED, axis=2)
    ys, xs = np.nonzero(red)
    # the region is 24..40 of 64 -> 60..100 of 160: the outline runs just outside it
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (58, 101, 58, 101)
    assert left[80, 80].tolist() == [10, 10, 10]  # the dark region itself is untouched
    assert right[80, 80, 2] > 100  # hot: red end of the colour map
    assert right[10, 10, 0] > 100  # cold: blue end


def test_rows_without_a_score_are_grey_not_blue() -> None:
    """Where no score is known the map is grey, never the colour of "no defect"."""
    image = decode(render(crop(scored=32), 64))[:, 68:]
    assert image[50, 10].tolist() == [96, 96, 96]
    assert image[10, 10, 0] > 100
    unscored = decode(render(crop(with_scores=False), 64))[:, 68:]
    assert unscored[5, 5].tolist() == [96, 96, 96]


def test_sixteen_bit_crops_are_drawn_to_scale() -> None:
    """A uint16 camera (12-bit) is shown on its bit depth's scale, not clipped."""
    c = crop()
    pixels = (c.pixels.astype(np.uint16) * 16).astype(np.uint16)
    image = decode(render(Crop(**{**c.__dict__, "pixels": pixels, "bit_depth": 12}), 64))
    assert abs(int(image[2, 2, 0]) - 128) <= 1


# --------------------------------------------------------------------------- stores


def test_memory_pictures_keep_the_newest() -> None:
    """Without a journal the newest ``keep`` pictures stay; older ones are gone."""
    store = MemoryPictures(3)
    for seq in range(5):
        store.put(seq, "cam0", bytes([seq]))
    assert [store.get(s) for s in range(5)] == [None, None, b"\x02", b"\x03", b"\x04"]


def test_sqlite_pictures_live_beside_the_journal_and_go_with_it(tmp_path: Path) -> None:
    """Stored beside the journal file; pruned to the journal's oldest event; pictures of a
    journal that is gone (seq at or above its next seq) are dropped at start."""
    path = pictures_path(tmp_path / "journal.sqlite")
    assert path == tmp_path / "journal.pictures.sqlite"
    store = SqlitePictures(path)
    for seq in range(10):
        store.put(seq, "cam0", b"png%d" % seq)
    store.prune(oldest_seq=4)
    assert [store.get(s) for s in (3, 4, 9)] == [None, b"png4", b"png9"]
    store.close()
    again = SqlitePictures(path, next_seq=7)
    assert (again.get(6), again.get(7), again.count()) == (b"png6", None, 3)
    again.close()


def test_roll_records_round_trip_and_age_out(tmp_path: Path) -> None:
    """Inspected lengths are kept per daemon run, camera and segment, updated in place, and
    pruned by the journal's age bound."""
    path = tmp_path / "p.sqlite"
    store = SqlitePictures(path, max_age_s=3600)
    now = time.time_ns()
    roll = Roll(1, "cam0", 2, 0, 5000, 4096, 4000, 1000.0, 2000.0, now - 10**9, now)
    store.put_roll(roll)
    store.put_roll(Roll(**{**roll.__dict__, "line_end": 9000}))
    store.put_roll(Roll(**{**roll.__dict__, "segment": 1, "t_last_ns": now - 7200 * 10**9}))
    store.put(3, "cam0", b"x")
    pictures, rolls = read_pictures(path)
    assert pictures == {3: b"x"}
    assert sorted((r.segment, r.line_end) for r in rolls) == [(1, 5000), (2, 9000)]
    assert sorted(r.metres for r in rolls) == pytest.approx([5.0, 9.0])
    store.prune(None)
    _, rolls = read_pictures(path)
    assert [r.segment for r in rolls] == [2]
    assert rolls[0].square_metres == pytest.approx(9.0 * 4000 / 2000.0)
    store.close()


def test_reading_something_else_is_a_clear_error(tmp_path: Path) -> None:
    """A missing file or one that is not a picture store says so."""
    with pytest.raises(PictureError, match="no picture store"):
        read_pictures(tmp_path / "none.sqlite")
    other = tmp_path / "other.sqlite"
    other.write_bytes(b"not a database at all, not even close" * 10)
    with pytest.raises(PictureError):
        read_pictures(other)


# --------------------------------------------------------------------------- the thread


def test_a_request_waits_for_a_picture_being_drawn() -> None:
    """``get`` of an expected picture waits until it is stored; a cancelled one does not."""
    m = metrics()
    writer = PictureWriter(MemoryPictures(10), 64, 8, m)
    writer.expect(5)
    got: list[bytes | None] = []
    reader = threading.Thread(target=lambda: got.append(writer.get(5, wait_s=10)))
    reader.start()
    time.sleep(0.2)
    assert got == []  # still waiting: nothing was drawn yet
    writer.start()
    writer.submit(5, crop())
    reader.join(10)
    assert got
    assert got[0] is not None
    assert got[0][:4] == b"\x89PNG"
    writer.expect(6)
    writer.cancel(6)
    t0 = time.monotonic()
    assert writer.get(6, wait_s=5) is None
    assert time.monotonic() - t0 < 1
    writer.stop()
    assert m.registry.get_sample_value("linescan_pictures_total", {"result": "stored"}) == 1
    assert m.registry.get_sample_value("linescan_picture_bytes_total") == len(got[0])


def test_a_full_queue_skips_the_picture_and_counts_it() -> None:
    """The post thread never waits for pictures: past the queue they are skipped, counted."""
    m = metrics()
    writer = PictureWriter(MemoryPictures(10), 64, 2, m)  # not started: nothing drains
    assert [writer.submit(s, crop()) for s in range(4)] == [True, True, False, False]
    assert m.registry.get_sample_value("linescan_pictures_total", {"result": "skipped"}) == 2
    assert writer.get(3, wait_s=0.1) is None
    writer.start()
    writer.stop()  # draws what was queued first
    assert writer.store.get(0) is not None
    assert writer.store.get(1) is not None


class BrokenStore(MemoryPictures):
    def put(self, seq: int, camera: str, png: bytes) -> None:
        if seq % 2:
            raise OSError("disk full")
        super().put(seq, camera, png)


def test_a_failing_store_is_counted_and_the_thread_goes_on() -> None:
    """A picture that cannot be stored is an error counted, never a dead thread."""
    m = metrics()
    writer = PictureWriter(BrokenStore(10), 64, 8, m)
    writer.start()
    for seq in range(4):
        writer.submit(seq, crop())
    writer.stop()
    assert m.registry.get_sample_value("linescan_pictures_total", {"result": "error"}) == 2
    assert m.registry.get_sample_value("linescan_pictures_total", {"result": "stored"}) == 2


def test_the_store_is_pruned_to_the_journal_as_pictures_come(tmp_path: Path) -> None:
    """Every ``prune_every`` pictures the writer asks the journal's oldest seq and prunes."""
    store = SqlitePictures(tmp_path / "j.pictures.sqlite")
    oldest = {"seq": 0}
    writer = PictureWriter(store, 32, 64, metrics(), lambda: oldest["seq"], prune_every=4)
    writer.start()
    for seq in range(8):
        oldest["seq"] = max(0, seq - 2)  # the journal keeps three events
        writer.submit(seq, crop())
    writer.stop()
    assert store.count() <= 5
    assert store.get(0) is None
    assert store.get(7) is not None
    store.close()


# --------------------------------------------------------------------------- in the daemon


@pytest.mark.slow
@pytest.mark.parametrize("enabled", [True, False])
def test_the_daemon_keeps_pictures_in_memory_or_none(tmp_path: Path, enabled: bool) -> None:
    """Without a journal the pictures live in memory and are served; with pictures off the
    events say ``image: null``, no picture is drawn and none is served."""
    from viewkit import http, make_config, running, save_detector, spot_web

    from linescan.data.synthetic import Defect

    bundle = save_detector(tmp_path / "detector")
    config = make_config(journal={"enabled": False}, pictures={"enabled": enabled})
    web = spot_web(256, 1200, [Defect("hole", line=300, x=100, height=16, width=16)])
    with running(config, bundle) as run:
        run.drained(run.send(web))
        [event] = run.defects
        status, headers, body = http(f"{run.url}/defects/{event['seq']}.png")  # waits for it
        stored = run.daemon.registry.get_sample_value(
            "linescan_pictures_total", {"result": "stored"}
        )
    if enabled:
        assert event["image"] == f"/defects/{event['seq']}.png"
        assert (status, headers["Content-Type"]) == (200, "image/png")
        assert decode(body).shape[0] == 160
        assert stored == 1
    else:
        assert event["image"] is None
        assert status == 404
        assert stored == 0
