"""Every knob of the daemon, in one validated TOML file.

Why one file and pydantic: an inspection PC runs unattended under systemd, so a typo must stop
the daemon at start-up with a message that names the key and the line, not surface hours later
as a silently ignored setting. Every model forbids unknown keys (``extra="forbid"``), is frozen
(a running pipeline never sees its settings change under it) and is *strict*: TOML is typed, so
``stride = "30"`` or ``bind = 1`` is a mistake worth reporting, not a value to coerce.

Paths written in the file are resolved against the file's directory, never against the working
directory (under systemd that is ``/``). Paths given as command-line overrides are resolved
against the working directory, which is what a person typing them expects.

``load_config`` raises :class:`~linescan.errors.ConfigError` listing every problem at once;
``check_config`` returns the same problems as a list for ``linescan check-config``. Neither ever
opens a ``*_key_file``: key material is read by the socket code that needs it, so no error
message can leak it.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from linescan.errors import ConfigError

__all__ = [
    "Config",
    "EngineConfig",
    "EventsConfig",
    "FramesConfig",
    "InspectionConfig",
    "JournalConfig",
    "LogConfig",
    "MetricsConfig",
    "ModelConfig",
    "PicturesConfig",
    "QueuesConfig",
    "RepeatsConfig",
    "apply_overrides",
    "check_config",
    "load_config",
    "parse_listen",
]

# A path field: strict mode would insist on a ``Path`` instance, but TOML only has strings.
_PathField = Annotated[Path, Field(strict=False)]

# tcp://HOST:PORT (PORT may be * for an ephemeral port; HOST may be *, a name, an IPv4 address,
# a [bracketed] IPv6 address, or an interface name), ipc://PATH, inproc://NAME.
_TCP_RE = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>\*|\d{1,5})$")
_OTHER_RE = re.compile(r"^(ipc|inproc)://\S+$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
_CAMERA_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def _check_endpoint(value: str) -> str:
    match = _TCP_RE.match(value)
    if match is not None:
        port = match["port"]
        if port != "*" and not 0 < int(port) <= 65535:
            raise ValueError(f"port must be 1..65535 or *, not {port}")
        return value
    if _OTHER_RE.match(value):
        return value
    # The value is not echoed (no message quotes a value: it may be a pasted secret).
    raise ValueError("not a ZeroMQ endpoint; expected tcp://HOST:PORT, ipc://PATH or inproc://NAME")


_Endpoint = Annotated[str, AfterValidator(_check_endpoint)]


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``ADDR:PORT`` (``[v6addr]:PORT`` for IPv6) into a host and a port.

    Port 0 asks the kernel for a free port (used by tests). Raises ``ValueError``.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError("not ADDR:PORT (use [ADDR]:PORT for IPv6)")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range 0..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("the bracketed host is not an IPv6 address") from None
        return host, port
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if ":" in host:
            raise ValueError("IPv6 addresses must be bracketed: [ADDR]:PORT") from None
        if not _HOSTNAME_RE.match(host):
            raise ValueError("the host is neither an IP address nor a host name") from None
    return host, port


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelConfig(_Section):
    """``[model]``: which model bundle to run, and an optional threshold override."""

    bundle: _PathField | None = None
    """Model bundle directory; None means the bundled default (``engines/default``), which
    the caller resolves because only it knows where the package is installed."""
    threshold: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """Residual threshold; None uses the one calibrated and stored in the bundle."""


class FramesConfig(_Section):
    """``[frames]``: where camera frames arrive, and the limits that protect memory."""

    endpoint: _Endpoint = "tcp://127.0.0.1:5555"
    socket: Literal["pull", "sub"] = "pull"
    """``pull``: cameras PUSH to us (lossless, back-pressured). ``sub``: we SUBscribe to a
    camera's PUB (lossy under load; gaps show up as sequence gaps)."""
    bind: bool = True
    """Bind the endpoint (cameras connect) or connect to it (the camera binds)."""
    max_width: Annotated[int, Field(ge=1, le=1 << 20)] = 16384
    max_height: Annotated[int, Field(ge=1, le=1 << 20)] = 8192
    max_bytes: Annotated[int, Field(ge=1, le=1 << 34)] = 268435456
    rcvhwm: Annotated[int, Field(ge=1, le=1_000_000)] = 64
    """ZeroMQ receive high-water mark, in messages (frames): bounds memory held by the socket."""
    curve_server_secret_key_file: _PathField | None = None
    curve_authorized_keys_dir: _PathField | None = None


class EventsConfig(_Section):
    """``[events]``: where defect and status events are published."""

    endpoint: _Endpoint = "tcp://127.0.0.1:5556"
    sndhwm: Annotated[int, Field(ge=1, le=10_000_000)] = 10000
    status_interval_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = 1.0
    curve_server_secret_key_file: _PathField | None = None


class MetricsConfig(_Section):
    """``[metrics]``: the Prometheus / health HTTP endpoint."""

    listen: str = "127.0.0.1:9108"
    enabled: bool = True
    page: bool = True
    """Serve the live page (``/``, ``/api/...``, ``/defects/SEQ.png``) beside the metrics."""
    token_file: _PathField | None = None
    """A file holding the page's access token: with it, ``/``, ``/api`` and ``/defects`` need
    ``?token=...`` once (a cookie keeps it) or ``Authorization: Bearer ...``; ``/metrics`` and
    the health checks never do. Not set: the page is open to whoever reaches ``listen``."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @property
    def host(self) -> str:
        """The address to bind, without IPv6 brackets."""
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        """The TCP port to bind (0: any free port)."""
        return parse_listen(self.listen)[1]


class InspectionConfig(_Section):
    """``[inspection]``: tiling, batching and how results are reported."""

    stride: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] | None = None
    """Tile stride in model pixels; None: the bundle's (30, the paper's, for 128 patches). The
    threshold was calibrated at the bundle's stride: change both together. ``"auto"``: the
    smallest stride this machine keeps up with at ``line_rate_hz`` (``linescan/stride.py``),
    measured at start."""
    line_rate_hz: Annotated[float, Field(gt=0, le=10_000_000, allow_inf_nan=False)] | None = None
    """Camera lines per second into this daemon, all its cameras together (``stride = "auto"``
    needs it)."""
    line_width_px: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    """Pixels per camera line (``stride = "auto"`` needs it: the cost of a line grows with it)."""
    stride_headroom: Annotated[float, Field(ge=1, le=100, allow_inf_nan=False)] = 1.3
    """``stride = "auto"`` picks a stride whose measured engine speed sustains this many times
    ``line_rate_hz`` (the rest of the pipeline, other processes and a busy moment need room)."""
    max_batch: Annotated[int, Field(ge=1, le=4096)] = 64
    max_wait_ms: Annotated[float, Field(ge=0, le=10_000, allow_inf_nan=False)] = 20.0
    lines_per_metre: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1000.0
    pixels_per_metre: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """Camera pixels per metre across the web (for defects per square metre); None: the same
    as ``lines_per_metre`` (square pixels)."""
    camera: str = "cam0"
    min_area_px: Annotated[int, Field(ge=0)] = 0
    opening_px: Annotated[int, Field(ge=1, le=256)] | Literal["paper"] | None = None
    """Diameter of the opening's disk in camera pixels, or "paper" (4 model pixels); None: the
    bundle's (4 camera pixels for bundles trained since the score). The threshold was
    calibrated with the bundle's: change both together (``linescan calibrate --opening``)."""
    web_left_px: Annotated[int, Field(ge=0)] | None = None
    """First camera column of the web; with ``web_right_px``, fixed web columns instead of the
    edges the bundle tracks. Columns outside are never scored."""
    web_right_px: Annotated[int, Field(ge=1)] | None = None
    """One past the last camera column of the web."""

    @field_validator("camera")
    @classmethod
    def _camera(cls, value: str) -> str:
        if not _CAMERA_RE.match(value):
            raise ValueError(
                "must be 1-64 characters of A-Z a-z 0-9 _ . : - (starting alphanumeric)"
            )
        return value

    @model_validator(mode="after")
    def _auto_stride(self) -> InspectionConfig:
        if self.stride == "auto" and (self.line_rate_hz is None or self.line_width_px is None):
            raise ValueError(
                'stride = "auto" needs line_rate_hz (camera lines per second) and '
                "line_width_px (pixels per line) in [inspection]"
            )
        return self


class EngineConfig(_Section):
    """``[engine]``: the inference backend."""

    backend: Literal["torch", "onnxruntime", "openvino", "tensorrt", "torch-cuda"] = "torch"
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"
    """``auto``: the backend's best (torch: bf16 on CPUs with native bf16; openvino: the
    fastest precision whose accuracy check at export passed on this bundle). ``int8``: the
    openvino backend's NNCF-quantized export (``linescan export --openvino --int8``)."""
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    """Intra-op threads; None lets the backend choose (usually the number of cores)."""
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d{1,2})?", value):
            raise ValueError("must be 'cpu', 'cuda' or 'cuda:N'")
        return value


class QueuesConfig(_Section):
    """``[queues]``: bounded queues between the daemon's threads, and the overload policy.

    ``overload`` says what ingest does with a frame when the band/inference queue is full:

    - ``drop-newest`` (default): drop the incoming frame whole. It is counted
      (``frames_dropped_total{reason="overload"}``), a status message names the lines that were
      not inspected, and the web segment restarts after the hole. Latency stays bounded and the
      work already queued is finished.
    - ``drop-oldest``: drop the oldest queued frame to make room for the new one. Freshest data
      wins; the hole is earlier on the web. Counted and reported the same way.
    - ``block``: ingest waits for room, so the receive socket's high-water mark fills and ZeroMQ
      pushes back (a PUSH camera blocks; a PUB camera drops, seen as sequence gaps). Nothing is
      dropped inside the daemon. For replaying recordings, not for a live line.
    """

    ingest: Annotated[int, Field(ge=1, le=100_000)] = 32
    inference: Annotated[int, Field(ge=1, le=100_000)] = 4
    publish: Annotated[int, Field(ge=1, le=10_000_000)] = 1024
    overload: Literal["drop-newest", "drop-oldest", "block"] = "drop-newest"


class LogConfig(_Section):
    """``[log]``: log format and level."""

    format: Literal["auto", "json", "console"] = "auto"
    """``auto``: JSON lines under systemd or when not on a terminal, readable text on one."""
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class JournalConfig(_Section):
    """``[journal]``: the durable event journal and its replay endpoint (``journal.py``).

    Every defect event is written to an SQLite file before it is published, so a subscriber
    that was down can replay what it missed, and event ``seq`` continues across restarts.

    ``path`` not set: ``linescan serve`` keeps the journal in ``$STATE_DIRECTORY/journal.sqlite``
    when systemd gives it a state directory (the unit's ``StateDirectory=linescan``, i.e.
    ``/var/lib/linescan/journal.sqlite``) and runs without a journal otherwise, with a warning;
    ``linescan demo`` never keeps one. Without a journal nothing can be replayed and ``seq``
    restarts at 0 with the daemon.
    """

    enabled: bool = True
    path: _PathField | None = None
    max_events: Annotated[int, Field(ge=1, le=100_000_000)] = 100_000
    """Most events kept; older ones are pruned (the newest is always kept)."""
    max_age_s: Annotated[float, Field(gt=0, le=10 * 365 * 86400, allow_inf_nan=False)] = 604800.0
    """Events older than this are pruned (default: one week)."""
    synchronous: Literal["full", "normal"] = "full"
    """``full``: each event is fsynced before it is sent (survives a power cut), one fsync per
    stitched tile row with defects, however many (about 0.1-7 ms depending on the disk, on the
    post thread; ``tools/bench_journal.py`` measures it); ``normal``:
    survives a crash or kill of the daemon but maybe not a power cut, and costs ~0.05 ms."""
    replay_endpoint: _Endpoint = "tcp://127.0.0.1:5557"
    """ZeroMQ REP endpoint answering replay requests (bound only while journaling)."""


class PicturesConfig(_Section):
    """``[pictures]``: a small picture of every defect (``crops.py``, ``pictures.py``).

    Camera pixels around the region, outlined, with its score map beside it, as a PNG served at
    ``/defects/SEQ.png`` and named by the event's ``image`` key. Stored beside the journal and
    pruned with it, or, without a journal, the newest ``keep`` in memory.
    """

    enabled: bool = True
    size_px: Annotated[int, Field(ge=32, le=1024)] = 160
    """Longer side of each half of a picture (the camera pixels, and the score map), in
    picture pixels: a bigger region is shrunk to it, a small one enlarged."""
    margin_px: Annotated[int, Field(ge=0, le=4096)] = 24
    """Camera pixels of context around the region (more for big regions: a quarter of it)."""
    ring_lines: Annotated[int, Field(ge=256, le=1_000_000)] = 4096
    """Recent camera lines kept per camera to cut pictures from (memory: ring_lines x width x
    bytes per pixel per camera); a region taller than this gets a picture of its lower part."""
    keep: Annotated[int, Field(ge=1, le=100_000)] = 500
    """Without a journal: pictures (and events for the page) kept in memory."""
    queue: Annotated[int, Field(ge=1, le=100_000)] = 256
    """Pictures waiting to be drawn; past it a picture is skipped (counted), never the event."""


class RepeatsConfig(_Section):
    """``[repeats]``: defects that recur at the same place across the web with a constant period
    down the web (a damaged roller), found by ``repeats.py``."""

    enabled: bool = True
    min_count: Annotated[int, Field(ge=3, le=100)] = 3
    """Defects in a row with one period before they are a repeating series."""
    x_tolerance_px: Annotated[int, Field(ge=0, le=100_000)] = 24
    """How far (camera pixels) a repeat's centre may lie from the series' across the web."""
    period_tolerance_lines: Annotated[int, Field(ge=0, le=100_000)] = 12
    period_tolerance: Annotated[float, Field(ge=0, le=0.5, allow_inf_nan=False)] = 0.01
    """The period may vary by period_tolerance_lines + period_tolerance x period lines."""
    min_period_lines: Annotated[int, Field(ge=1)] = 64
    max_period_lines: Annotated[int, Field(ge=1)] = 100_000
    max_missing: Annotated[int, Field(ge=0, le=100)] = 1
    """Repeats an established series may miss in a row (not found, or below the threshold)
    before it ends."""

    @model_validator(mode="after")
    def _periods(self) -> RepeatsConfig:
        if self.min_period_lines > self.max_period_lines:
            raise ValueError("min_period_lines must not exceed max_period_lines")
        return self


class Config(_Section):
    """The whole configuration file."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    frames: FramesConfig = Field(default_factory=FramesConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    inspection: InspectionConfig = Field(default_factory=InspectionConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    queues: QueuesConfig = Field(default_factory=QueuesConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    journal: JournalConfig = Field(default_factory=JournalConfig)
    pictures: PicturesConfig = Field(default_factory=PicturesConfig)
    repeats: RepeatsConfig = Field(default_factory=RepeatsConfig)

    def with_overrides(self, overrides: Mapping[str, Mapping[str, object]]) -> Config:
        """A copy with ``{section: {key: value}}`` replaced, validated again.

        Raises ConfigError naming every invalid override.
        """
        data: dict[str, Any] = self.model_dump()
        for section, values in overrides.items():
            current = data.get(section)
            if not isinstance(current, dict):
                raise ConfigError(f"unknown config section {section!r}")
            current.update(values)
        try:
            return Config.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(
                "invalid override:\n  " + "\n  ".join(_format_errors(exc, None, "override"))
            ) from None


def apply_overrides(
    config: Config,
    *,
    model: Path | None = None,
    threshold: float | None = None,
    frames: str | None = None,
    events: str | None = None,
    metrics: str | None = None,
    backend: str | None = None,
    device: str | None = None,
) -> Config:
    """Apply the ``serve`` command's flags on top of a loaded config; None leaves a key alone.

    ``model`` is a bundle directory, ``frames``/``events`` are ZeroMQ endpoints, ``metrics`` is
    ``ADDR:PORT``. Raises ConfigError.
    """
    overrides: dict[str, dict[str, object]] = {}

    def put(section: str, key: str, value: object) -> None:
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    put("model", "bundle", None if model is None else Path(model).absolute())
    put("model", "threshold", threshold)
    put("frames", "endpoint", frames)
    put("events", "endpoint", events)
    put("metrics", "listen", metrics)
    put("engine", "backend", backend)
    put("engine", "device", device)
    return config.with_overrides(overrides) if overrides else config


def _resolve_paths(config: Config, base: Path) -> Config:
    """Resolve relative paths in the file against the file's own directory."""

    def fix(path: Path | None) -> Path | None:
        return path if path is None or path.is_absolute() else base / path

    return config.model_copy(
        update={
            "model": config.model.model_copy(update={"bundle": fix(config.model.bundle)}),
            "frames": config.frames.model_copy(
                update={
                    "curve_server_secret_key_file": fix(config.frames.curve_server_secret_key_file),
                    "curve_authorized_keys_dir": fix(config.frames.curve_authorized_keys_dir),
                }
            ),
            "events": config.events.model_copy(
                update={
                    "curve_server_secret_key_file": fix(config.events.curve_server_secret_key_file)
                }
            ),
            "journal": config.journal.model_copy(update={"path": fix(config.journal.path)}),
            "metrics": config.metrics.model_copy(
                update={"token_file": fix(config.metrics.token_file)}
            ),
        }
    )


_TOML_POS_RE = re.compile(r"\(at line (\d+), column (\d+)\)")
_TABLE_RE = re.compile(r"^\s*\[\s*([A-Za-z0-9_-]+)\s*\]\s*(#.*)?$")


def _find_line(text: str, loc: tuple[str, ...]) -> int | None:
    """The 1-based line where ``loc`` (section[, key]) is written, found by a cheap scan.

    Handles ``[section]`` tables and top-level ``section.key = ...``; good enough for messages.
    """
    if not loc:
        return None
    section = loc[0]
    key = loc[1] if len(loc) > 1 else None
    current: str | None = None
    header_line: int | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        table = _TABLE_RE.match(line)
        if table is not None:
            current = table[1]
            if current == section and header_line is None:
                header_line = number
            continue
        stripped = line.lstrip()
        if key is not None and current == section and re.match(rf"{re.escape(key)}\s*=", stripped):
            return number
        # Top-level dotted keys (section.key = ...) or an inline table (section = {...}).
        dotted = rf"{re.escape(section)}\s*="
        if key is not None:
            dotted += rf"|{re.escape(section)}\s*\.\s*{re.escape(key)}\s*="
        if current is None and re.match(dotted, stripped):
            return number
    return header_line


def _format_errors(exc: ValidationError, text: str | None, where: str) -> list[str]:
    """One line per error, in file order: ``WHERE[:LINE]: section.key: message``.

    Input values are never echoed (pydantic's ``input`` is dropped): a value may be a secret.
    """
    found: list[tuple[int, str]] = []
    unions: set[tuple[str, ...]] = set()
    for error in exc.errors(include_input=False, include_url=False):
        # Our schema is two levels deep; deeper parts are pydantic's union tags.
        loc = tuple(str(part) for part in error["loc"][:2])
        if len(error["loc"]) > 2:
            # A value no member of a union accepts (stride = 0: neither 1..4096 nor "auto"):
            # one message, the first member's, is enough.
            if loc in unions:
                continue
            unions.add(loc)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            if len(loc) == 2:
                field = Config.model_fields.get(loc[0])
                names = list(getattr(field.annotation if field else None, "model_fields", {}))
                message = "unknown key"
            else:
                names = list(Config.model_fields)
                message = "unknown section"
            close = difflib.get_close_matches(loc[-1], names, n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        elif error["type"] == "model_type":
            message = "must be a table, e.g. [section]"
        line = _find_line(text, loc) if text is not None else None
        prefix = where if line is None else f"{where}:{line}"
        found.append((line or 0, f"{prefix}: {'.'.join(loc) or '(file)'}: {message}"))
    found.sort(key=lambda item: item[0])
    return [message for _, message in found]


def _load(path: Path) -> tuple[Config | None, list[str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [f"{path}: cannot read: {exc}"]
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        pos = _TOML_POS_RE.search(message)
        if pos is not None:
            message = _TOML_POS_RE.sub("", message).strip()
            return None, [f"{path}:{pos[1]}:{pos[2]}: TOML syntax error: {message}"]
        return None, [f"{path}: TOML syntax error: {message}"]
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        return None, _format_errors(exc, text, str(path))
    return _resolve_paths(config, path.absolute().parent), []


def check_config(path: Path) -> list[str]:
    """Every problem with the config file at ``path``, each with its location; [] if valid."""
    return _load(path)[1]


def load_config(path: Path | None) -> Config:
    """Load and validate a config file; None gives all defaults. Raises ConfigError."""
    if path is None:
        return Config()
    config, errors = _load(path)
    if config is None:
        raise ConfigError(
            f"invalid configuration ({len(errors)} errors):\n  " + "\n  ".join(errors)
        )
    return config
