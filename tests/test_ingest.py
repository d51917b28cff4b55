"""Tests for linescan.ingest: the frame wire format, its validation and zero-copy parsing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from linescan.config import FramesConfig
from linescan.errors import FrameError
from linescan.ingest import (
    MAX_HEADER_BYTES,
    REJECT_REASONS,
    Frame,
    FrameLimits,
    encode_frame,
    parse_frame,
)

LIMITS = FrameLimits(max_width=64, max_height=64, max_bytes=64 * 64)


def header(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"v": 1, "camera": "cam1", "seq": 0, "height": 2, "width": 3}
    base["dtype"] = "uint8"
    base.update(fields)
    return {key: value for key, value in base.items() if value is not ...}


def message(fields: dict[str, Any], payload: bytes | None = None) -> list[bytes]:
    if payload is None:
        itemsize = 2 if fields.get("dtype") == "uint16" else 1
        height, width = fields.get("height", 1), fields.get("width", 1)
        size = (
            height * width * itemsize if isinstance(height, int) and isinstance(width, int) else 0
        )
        payload = bytes(max(0, min(size, 1 << 16)))
    return [json.dumps(fields).encode(), payload]


def reject(parts: list[bytes]) -> FrameError:
    with pytest.raises(FrameError) as info:
        parse_frame(parts, LIMITS, t_receive_ns=0)
    assert info.value.reason in REJECT_REASONS
    return info.value


# --- round trip -------------------------------------------------------------------------------


images = st.one_of(
    hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, max_side=24)),
    hnp.arrays(np.uint16, hnp.array_shapes(min_dims=2, max_dims=2, max_side=24)),
)
optional_int = st.none() | st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=150, deadline=None)
@given(
    image=images,
    camera=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", fullmatch=True),
    seq=st.integers(0, 2**63 - 1),
    t_capture_ns=optional_int,
    encoder=optional_int,
    line=st.none() | st.integers(0, 2**63 - 1),
    end=st.booleans(),
)
def test_encode_parse_round_trip(
    image: np.ndarray[Any, Any],
    camera: str,
    seq: int,
    t_capture_ns: int | None,
    encoder: int | None,
    line: int | None,
    end: bool,
) -> None:
    """parse_frame(encode_frame(x)) gives back every field and the exact pixels."""
    parts = encode_frame(camera, seq, image, t_capture_ns, line, end, encoder)
    frame = parse_frame(parts, LIMITS, t_receive_ns=123)
    assert (frame.camera, frame.seq, frame.height, frame.width) == (camera, seq, *image.shape)
    assert frame.dtype == image.dtype.name
    assert (frame.t_capture_ns, frame.encoder, frame.line, frame.end) == (
        t_capture_ns,
        encoder,
        line,
        end,
    )
    assert frame.t_receive_ns == 123
    assert frame.pixels.shape == image.shape
    assert frame.pixels.dtype.itemsize == image.dtype.itemsize
    np.testing.assert_array_equal(frame.pixels, image)
    assert not frame.pixels.flags.writeable


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=4))
def test_random_bytes_only_raise_frame_error(parts: list[bytes]) -> None:
    """Arbitrary byte parts either parse or raise FrameError with a known reason."""
    reason = None
    try:
        parse_frame(parts, LIMITS, t_receive_ns=0)
    except FrameError as exc:
        reason = exc.reason
    assert reason is None or reason in REJECT_REASONS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
header_keys = st.sampled_from(
    ["v", "camera", "seq", "height", "width", "dtype", "t_capture_ns", "encoder", "line", "end"]
)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.dictionaries(header_keys, json_values | st.integers(-2, 70)),
    payload=st.binary(max_size=64) | st.sampled_from([b"", bytes(6), bytes(12)]),
)
def test_random_headers_only_raise_frame_error(fields: dict[str, Any], payload: bytes) -> None:
    """Headers with random JSON values either parse or raise FrameError with a known reason."""
    parts = [json.dumps(fields).encode(), payload]
    reason: str | None = None
    try:
        frame = parse_frame(parts, LIMITS, t_receive_ns=0)
    except FrameError as exc:
        reason = exc.reason
    else:
        assert frame.pixels.nbytes == len(payload)
    assert reason is None or reason in REJECT_REASONS


# --- rejection reasons ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parts", "reason", "detail"),
    [
        ([b"{}"], "parts", "got 1"),
        ([b"{}", b"", b""], "parts", "got 3"),
        ([b" " * (MAX_HEADER_BYTES + 1), b""], "header_size", ""),
        ([b"\xff\xfe", b""], "json", "UTF-8"),
        ([b"{not json", b""], "json", ""),
        ([b"[1, 2]", b""], "json", "list"),
        ([b"[" * 100_000 + b"]" * 100_000, b""], "header_size", ""),
        ([b"[" * 30_000 + b"]" * 30_000, b""], "json", ""),
        (message(header(v=...)), "field", "v"),
        (message(header(v=2)), "version", ""),
        (message(header(v=True)), "version", ""),
        (message(header(v="1")), "version", ""),
        (message(header(seq=...)), "field", "seq"),
        (message(header(seq=-1)), "field", "seq"),
        (message(header(seq=1.5)), "field", "seq"),
        (message(header(seq=2**63)), "field", "seq"),
        (message(header(height=...)), "field", "height"),
        (message(header(height=True)), "field", "height"),
        (message(header(width="3")), "field", "width"),
        (message(header(camera="")), "field", "camera"),
        (message(header(camera="x" * 65)), "field", "camera"),
        (message(header(camera="a\nb")), "field", "camera"),
        (message(header(camera=7)), "field", "camera"),
        (message(header(t_capture_ns="now")), "field", "t_capture_ns"),
        (message(header(encoder=1.0)), "field", "encoder"),
        (message(header(line=-1)), "field", "line"),
        (message(header(end=1)), "field", "end"),
        (message(header(dtype=...)), "field", "dtype"),
        (message(header(dtype=8)), "field", "dtype"),
        (message(header(dtype="float32")), "dtype", "float32"),
        (message(header(dtype="int16")), "dtype", ""),
        (message(header(height=0)), "dims", "height"),
        (message(header(width=-3)), "dims", "width"),
        (message(header(height=65)), "dims", "height"),
        (message(header(width=65)), "dims", "width"),
        (message(header(height=64, width=64, dtype="uint16"), bytes(8)), "dims", ""),
        (message(header(), bytes(5)), "size", "5 bytes"),
        (message(header(), bytes(7)), "size", ""),
        (message(header(dtype="uint16"), bytes(6)), "size", ""),
    ],
)
def test_rejections_have_reasons(parts: list[bytes], reason: str, detail: str) -> None:
    """Each malformed frame is rejected with the right reason and a detail naming the problem."""
    error = reject(parts)
    assert error.reason == reason
    assert detail in error.detail


def test_every_reason_is_reachable() -> None:
    """REJECT_REASONS is exactly the set of reasons parse_frame can give."""
    assert set(REJECT_REASONS) == {
        "parts",
        "header_size",
        "json",
        "version",
        "field",
        "dtype",
        "dims",
        "size",
    }


def test_huge_dims_rejected_before_allocation() -> None:
    """height=10**9 with a tiny payload is rejected as dims, before any allocation."""
    limits = FrameLimits()
    parts = message(header(height=10**9, width=16384, dtype="uint16"), b"\x00" * 4)
    with pytest.raises(FrameError) as info:
        parse_frame(parts, limits, t_receive_ns=0)
    assert info.value.reason == "dims"


def test_max_bytes_checked_before_size() -> None:
    """A frame within per-axis limits but over max_bytes is dims, whatever the payload."""
    limits = FrameLimits(max_width=1000, max_height=1000, max_bytes=999)
    parts = message(header(height=10, width=100), b"")
    with pytest.raises(FrameError) as info:
        parse_frame(parts, limits, t_receive_ns=0)
    assert info.value.reason == "dims"


# --- details ----------------------------------------------------------------------------------


def test_pixels_are_a_view_not_a_copy() -> None:
    """The pixel array views the message buffer: no copy is made."""
    payload = bytearray(range(6))
    frame = parse_frame([json.dumps(header()).encode(), payload], LIMITS, t_receive_ns=0)
    payload[0] = 99
    assert frame.pixels[0, 0] == 99
    assert not frame.pixels.flags.writeable


def test_uint16_is_little_endian() -> None:
    """uint16 pixels are read little-endian whatever the host, and encoded little-endian."""
    fields = header(height=1, width=2, dtype="uint16")
    frame = parse_frame(message(fields, b"\x01\x02\x03\x04"), LIMITS, t_receive_ns=0)
    assert frame.pixels.tolist() == [[0x0201, 0x0403]]
    big = np.array([[0x0102]], dtype=">u2")
    assert encode_frame("c", 0, big)[1] == b"\x02\x01"


def test_missing_camera_uses_default() -> None:
    """A header without a camera takes the configured default camera name."""
    frame = parse_frame(message(header(camera=...)), LIMITS, 0, default_camera="line7")
    assert frame.camera == "line7"


def test_nulls_mean_absent_and_unknown_keys_are_ignored() -> None:
    """Optional keys may be null; unknown keys (camera metadata) are ignored."""
    fields = header(t_capture_ns=None, encoder=None, line=None, end=None, exposure_us=40)
    frame = parse_frame(message(fields), LIMITS, t_receive_ns=0)
    assert (frame.t_capture_ns, frame.encoder, frame.line, frame.end) == (None, None, None, False)


def test_limits_from_config() -> None:
    """FrameLimits.from_config copies the [frames] limits."""
    limits = FrameLimits.from_config(FramesConfig(max_width=10, max_height=20, max_bytes=30))
    assert limits == FrameLimits(max_width=10, max_height=20, max_bytes=30)


@pytest.mark.parametrize(
    "pixels",
    [np.zeros((2, 2, 3), np.uint8), np.zeros((0, 4), np.uint8), np.zeros((2, 2), np.float32)],
)
def test_encode_rejects_unsupported_arrays(pixels: np.ndarray[Any, Any]) -> None:
    """encode_frame refuses arrays the wire format cannot carry."""
    with pytest.raises(ValueError, match="pixels"):
        encode_frame("c", 0, pixels)


def test_frames_compare_by_identity() -> None:
    """Frames compare by identity (never element-wise on pixels)."""
    parts = encode_frame("c", 0, np.zeros((2, 2), np.uint8))
    first = parse_frame(parts, LIMITS, 0)
    second = parse_frame(parts, LIMITS, 0)
    assert first == first
    assert first != second


# --- over a real socket -----------------------------------------------------------------------


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.term()


def test_zero_copy_frames_from_a_real_socket(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    """Frames received with copy=False over loopback TCP parse to the sent pixels."""
    pull = context.socket(zmq.PULL)
    push = context.socket(zmq.PUSH)
    try:
        for sock in (pull, push):
            sock.setsockopt(zmq.LINGER, 0)
        pull.bind("tcp://127.0.0.1:*")
        push.connect(pull.getsockopt_string(zmq.LAST_ENDPOINT))
        image = np.arange(600 * 500, dtype=np.uint16).reshape(600, 500)
        push.send_multipart(encode_frame("cam1", 9, image, t_capture_ns=5, line=18000))
        if not pull.poll(5000):
            pytest.fail("no frame arrived within 5 s")
        parts = pull.recv_multipart(copy=False)
        frame = parse_frame(parts, FrameLimits(), t_receive_ns=6)
        assert isinstance(frame, Frame)
        assert (frame.seq, frame.line, frame.t_capture_ns) == (9, 18000, 5)
        np.testing.assert_array_equal(frame.pixels, image)
    finally:
        pull.close()
        push.close()
