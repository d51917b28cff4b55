"""Camera frames off the wire: validate a ZeroMQ multipart message, view its pixels, no copy.

Why a module of its own: the frame socket is the daemon's attack surface and its busiest path.
Every byte that arrives is checked here, against limits from the config, before anything is
allocated for it; what passes is a read-only NumPy view of the message buffer.

Wire format, version 1
----------------------
A frame is one ZeroMQ multipart message of exactly two parts, ``[header, pixels]``:

``header``: a UTF-8 JSON object, at most 64 KiB::

    {"v": 1, "camera": "cam0", "seq": 41, "height": 512, "width": 4096, "dtype": "uint8",
     "t_capture_ns": 1732900000000000000, "encoder": 123456, "line": 20992, "end": false}

    key           type      required  meaning
    v             int       yes       wire-format version; must be 1
    camera        str       no        camera name, 1-64 of A-Z a-z 0-9 _ . : - (starting
                                      alphanumeric); default from the config
    seq           int >= 0  yes       frame counter; +1 per frame; a jump is a sequence gap
    height        int >= 1  yes       lines in this frame
    width         int >= 1  yes       pixels per line
    dtype         str       yes       "uint8" or "uint16"
    t_capture_ns  int       no        capture time, ns since the Unix epoch (camera clock)
    encoder       int       no        web encoder position at the first line
    line          int >= 0  no        absolute index of the first line on the web; when absent
                                      the daemon derives it from ``seq`` and ``height``
    end           bool      no        true: this frame ends the web segment (roll change)

Optional keys may be ``null``, which means absent. Integers must fit in a signed 64-bit
integer. Unknown keys are ignored, so a camera may add its own metadata (exposure, gain)
without breaking version 1; a change in meaning of any key above needs ``v = 2``.

``pixels``: ``height * width`` values, rows in C order (row-major), little-endian, with no
padding between rows: exactly ``height * width * itemsize`` bytes.

Rejections
----------
:func:`parse_frame` raises :class:`~linescan.errors.FrameError` whose ``reason`` is one of
:data:`REJECT_REASONS` (used as a Prometheus label, so the set is fixed) and whose ``detail``
says what was wrong: ``parts`` (not two parts), ``header_size`` (header over 64 KiB), ``json``
(not a UTF-8 JSON object), ``version`` (``v`` is not 1), ``field`` (a key missing or of the
wrong type; the detail names it), ``dtype`` (not uint8/uint16), ``dims`` (height/width outside
1..limit, or a payload that would exceed ``max_bytes``; checked before anything is allocated),
``size`` (payload length differs from ``height * width * itemsize``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import numpy.typing as npt

from linescan.errors import FrameError

if TYPE_CHECKING:
    import zmq

    from linescan.config import FramesConfig

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "REJECT_REASONS",
    "WIRE_VERSION",
    "Frame",
    "FrameLimits",
    "encode_frame",
    "parse_frame",
]

WIRE_VERSION: Final = 1
MAX_HEADER_BYTES: Final = 64 * 1024
REJECT_REASONS: Final = (
    "parts",
    "header_size",
    "json",
    "version",
    "field",
    "dtype",
    "dims",
    "size",
)
DTYPES: Final[dict[str, np.dtype[np.unsignedinteger[Any]]]] = {
    "uint8": np.dtype("<u1"),
    "uint16": np.dtype("<u2"),
}

_CAMERA_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_INT64_MAX: Final = 2**63 - 1
_INT64_MIN: Final = -(2**63)

DType = Literal["uint8", "uint16"]


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """What the daemon accepts: frames larger than these are rejected with reason ``dims``."""

    max_width: int = 16384
    max_height: int = 8192
    max_bytes: int = 268435456

    @classmethod
    def from_config(cls, frames: FramesConfig) -> FrameLimits:
        """The limits of the ``[frames]`` config section."""
        return cls(frames.max_width, frames.max_height, frames.max_bytes)


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """One validated camera frame. ``pixels`` is a read-only view of the received message.

    Compared by identity: two frames are never "equal" just because their pixels are.
    """

    camera: str
    seq: int
    height: int
    width: int
    dtype: DType
    pixels: npt.NDArray[np.unsignedinteger[Any]]
    t_capture_ns: int | None
    t_receive_ns: int
    encoder: int | None
    line: int | None
    end: bool


def _buffer(part: bytes | bytearray | memoryview | zmq.Frame) -> memoryview:
    """A flat byte view of one message part, without copying."""
    view = memoryview(part) if isinstance(part, bytes | bytearray | memoryview) else part.buffer
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _check_int(key: str, value: object, minimum: int) -> int:
    # bool is an int subclass in Python, but `"height": true` is a camera bug, not a height.
    if isinstance(value, bool) or not isinstance(value, int):
        raise FrameError("field", f"{key} must be an integer, not {type(value).__name__}")
    if not minimum <= value <= _INT64_MAX:
        raise FrameError("field", f"{key} must be in {minimum}..{_INT64_MAX}")
    return value


def _required_int(header: dict[str, Any], key: str, minimum: int = _INT64_MIN) -> int:
    value = header.get(key)
    if value is None:
        raise FrameError("field", f"{key} is missing")
    return _check_int(key, value, minimum)


def _optional_int(header: dict[str, Any], key: str, minimum: int = _INT64_MIN) -> int | None:
    value = header.get(key)
    return None if value is None else _check_int(key, value, minimum)


def parse_frame(
    parts: Sequence[bytes | bytearray | memoryview | zmq.Frame],
    limits: FrameLimits,
    t_receive_ns: int,
    *,
    default_camera: str = "cam0",
) -> Frame:
    """Validate a ``[header, pixels]`` message and return a :class:`Frame` viewing its pixels.

    ``parts`` come from ``socket.recv_multipart(copy=False)`` (zero copy) or as bytes; the
    returned frame keeps the payload buffer alive. Raises ``FrameError(reason, detail)`` with
    ``reason`` in :data:`REJECT_REASONS`, and nothing else for any input.
    """
    if len(parts) != 2:
        raise FrameError("parts", f"expected 2 parts [header, pixels], got {len(parts)}")
    header_view = _buffer(parts[0])
    if header_view.nbytes > MAX_HEADER_BYTES:
        raise FrameError(
            "header_size", f"header is {header_view.nbytes} bytes, over {MAX_HEADER_BYTES}"
        )
    try:
        header = json.loads(header_view.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers too long to convert.
        raise FrameError("json", f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("json", f"header is a JSON {type(header).__name__}, not an object")

    if "v" not in header:
        raise FrameError("field", "v is missing")
    version = header["v"]
    if isinstance(version, bool) or version != WIRE_VERSION:
        raise FrameError("version", f"unsupported wire version {str(version)[:20]!r}")

    camera = header.get("camera")
    if camera is None:
        camera = default_camera
    elif not isinstance(camera, str) or not _CAMERA_RE.fullmatch(camera):
        raise FrameError(
            "field", "camera must be 1-64 characters of A-Z a-z 0-9 _ . : - (alphanumeric first)"
        )

    seq = _required_int(header, "seq", minimum=0)
    height = _required_int(header, "height")
    width = _required_int(header, "width")
    t_capture_ns = _optional_int(header, "t_capture_ns")
    encoder = _optional_int(header, "encoder")
    line = _optional_int(header, "line", minimum=0)
    end = header.get("end")
    if end is None:
        end = False
    elif not isinstance(end, bool):
        raise FrameError("field", f"end must be true or false, not {type(end).__name__}")

    dtype_name = header.get("dtype")
    if dtype_name is None:
        raise FrameError("field", "dtype is missing")
    if not isinstance(dtype_name, str):
        raise FrameError("field", f"dtype must be a string, not {type(dtype_name).__name__}")
    dtype = DTYPES.get(dtype_name)
    if dtype is None:
        raise FrameError("dtype", f"dtype must be uint8 or uint16, not {dtype_name[:20]!r}")

    # Dimensions before the payload: nothing below depends on a size we have not bounded.
    if not 1 <= height <= limits.max_height:
        raise FrameError("dims", f"height {height} is outside 1..{limits.max_height}")
    if not 1 <= width <= limits.max_width:
        raise FrameError("dims", f"width {width} is outside 1..{limits.max_width}")
    expected = height * width * dtype.itemsize
    if expected > limits.max_bytes:
        raise FrameError("dims", f"{height}x{width} {dtype_name} is {expected} bytes, over max")

    payload = _buffer(parts[1])
    if payload.nbytes != expected:
        raise FrameError(
            "size",
            f"payload is {payload.nbytes} bytes, {height}x{width} {dtype_name} is {expected}",
        )
    pixels = np.frombuffer(payload, dtype=dtype).reshape(height, width)
    pixels.flags.writeable = False
    return Frame(
        camera=camera,
        seq=seq,
        height=height,
        width=width,
        dtype="uint8" if dtype.itemsize == 1 else "uint16",
        pixels=pixels,
        t_capture_ns=t_capture_ns,
        t_receive_ns=t_receive_ns,
        encoder=encoder,
        line=line,
        end=end,
    )


def encode_frame(
    camera: str,
    seq: int,
    pixels: npt.NDArray[Any],
    t_capture_ns: int | None = None,
    line: int | None = None,
    end: bool = False,
    encoder: int | None = None,
) -> list[bytes]:
    """The ``[header, pixels]`` message for a 2-D uint8/uint16 image (simulator and tests).

    Raises ValueError for an array that the wire format cannot carry.
    """
    if pixels.ndim != 2 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"pixels must be a non-empty 2-D array, not shape {pixels.shape}")
    kind = {np.dtype(np.uint8): "uint8", np.dtype(np.uint16): "uint16"}.get(
        pixels.dtype.newbyteorder("=")
    )
    if kind is None:
        raise ValueError(f"pixels must be uint8 or uint16, not {pixels.dtype}")
    header: dict[str, Any] = {
        "v": WIRE_VERSION,
        "camera": camera,
        "seq": seq,
        "height": int(pixels.shape[0]),
        "width": int(pixels.shape[1]),
        "dtype": kind,
    }
    optional = {"t_capture_ns": t_capture_ns, "encoder": encoder, "line": line}
    header.update({key: value for key, value in optional.items() if value is not None})
    if end:
        header["end"] = True
    data = np.ascontiguousarray(pixels, dtype=DTYPES[kind]).tobytes()
    return [json.dumps(header, separators=(",", ":")).encode("utf-8"), data]
