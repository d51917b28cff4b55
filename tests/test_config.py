"""Tests for linescan.config: defaults, validation, error reporting, the deploy example."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from linescan.config import (
    Config,
    apply_overrides,
    check_config,
    load_config,
    parse_listen,
)
from linescan.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "linescan.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "linescan.toml"
    path.write_text(text, encoding="utf-8")
    return path


def sections() -> dict[str, type[BaseModel]]:
    out: dict[str, type[BaseModel]] = {}
    for name, field in Config.model_fields.items():
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise TypeError(f"section {name} is not a model")
        out[name] = annotation
    return out


# --- defaults and the example file -------------------------------------------------------------


def test_none_gives_defaults() -> None:
    """load_config(None) returns the documented defaults."""
    config = load_config(None)
    assert config == Config()
    assert config.frames.endpoint == "tcp://127.0.0.1:5555"
    assert config.frames.socket == "pull"
    assert config.frames.bind is True
    assert (config.frames.max_width, config.frames.max_height) == (16384, 8192)
    assert config.frames.max_bytes == 268435456
    assert config.frames.rcvhwm == 64
    assert config.events.endpoint == "tcp://127.0.0.1:5556"
    assert config.events.sndhwm == 10000
    assert config.events.status_interval_s == 1.0
    assert (config.metrics.host, config.metrics.port, config.metrics.enabled) == (
        "127.0.0.1",
        9108,
        True,
    )
    assert config.inspection.stride is None  # the bundle's
    assert config.inspection.max_batch == 64
    assert config.inspection.max_wait_ms == 20.0
    assert config.inspection.lines_per_metre == 1000.0
    assert config.inspection.camera == "cam0"
    assert config.inspection.min_area_px == 0
    assert config.engine.backend == "torch"
    assert config.engine.precision == "auto"
    assert config.engine.threads is None
    assert config.engine.device == "cpu"
    assert (config.queues.ingest, config.queues.inference, config.queues.publish) == (32, 4, 1024)
    assert config.queues.overload == "drop-newest"
    assert (config.log.format, config.log.level) == ("auto", "info")
    assert config.model.bundle is None
    assert config.model.threshold is None


def test_deploy_example_equals_defaults() -> None:
    """deploy/linescan.toml loads cleanly and sets exactly the defaults."""
    assert check_config(EXAMPLE) == []
    assert load_config(EXAMPLE) == Config()


def test_deploy_example_documents_every_key() -> None:
    """Every section and key appears in deploy/linescan.toml, set or commented out."""
    text = EXAMPLE.read_text(encoding="utf-8")
    current: str | None = None
    seen: dict[str, set[str]] = {}
    for line in text.splitlines():
        header = re.match(r"^\[(\w+)\]", line)
        if header:
            current = header[1]
            seen[current] = set()
            continue
        key = re.match(r"^#?\s?(\w+) = ", line)
        if key and current is not None:
            seen[current].add(key[1])
    expected = {name: set(model.model_fields) for name, model in sections().items()}
    assert seen == expected


def test_deploy_example_commented_values_are_valid(tmp_path: Path) -> None:
    """Uncommenting every example value in deploy/linescan.toml still gives a valid config."""
    text = EXAMPLE.read_text(encoding="utf-8")
    uncommented = re.sub(r"(?m)^# (\w+ = )", r"\1", text)
    assert uncommented != text
    assert check_config(write(tmp_path, uncommented)) == []


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    """An empty file is valid and means all defaults."""
    assert load_config(write(tmp_path, "")) == Config()


# --- validation -------------------------------------------------------------------------------


def test_values_are_read(tmp_path: Path) -> None:
    """Keys in the file override defaults, in every section."""
    path = write(
        tmp_path,
        """
[model]
bundle = "/models/a"
threshold = 0.25
[frames]
endpoint = "ipc:///run/linescan/frames"
socket = "sub"
bind = false
[events]
status_interval_s = 2
[metrics]
listen = "[::1]:0"
[engine]
backend = "tensorrt"
precision = "fp16"
threads = 2
device = "cuda:1"
[queues]
overload = "block"
[log]
level = "DEBUG"
""",
    )
    config = load_config(path)
    assert config.model.bundle == Path("/models/a")
    assert config.model.threshold == 0.25
    assert config.frames.socket == "sub"
    assert config.frames.bind is False
    assert config.events.status_interval_s == 2.0
    assert (config.metrics.host, config.metrics.port) == ("::1", 0)
    assert config.engine.backend == "tensorrt"
    assert config.engine.threads == 2
    assert config.queues.overload == "block"
    assert config.log.level == "debug"


@pytest.mark.parametrize(
    ("toml", "location"),
    [
        ('[frames]\nendpoint = "tcp://127.0.0.1"', "frames.endpoint"),
        ('[frames]\nendpoint = "udp://x:1"', "frames.endpoint"),
        ('[frames]\nsocket = "push"', "frames.socket"),
        ("[frames]\nmax_width = 0", "frames.max_width"),
        ("[frames]\nrcvhwm = 0", "frames.rcvhwm"),
        ('[frames]\nbind = "yes"', "frames.bind"),
        ("[events]\nstatus_interval_s = 0", "events.status_interval_s"),
        ("[events]\nstatus_interval_s = nan", "events.status_interval_s"),
        ('[metrics]\nlisten = "9108"', "metrics.listen"),
        ('[metrics]\nlisten = "127.0.0.1:70000"', "metrics.listen"),
        ('[metrics]\nlisten = "::1:9108"', "metrics.listen"),
        ("[inspection]\nstride = 0", "inspection.stride"),
        ('[inspection]\nstride = "30"', "inspection.stride"),
        ("[inspection]\nlines_per_metre = 0.0", "inspection.lines_per_metre"),
        ('[inspection]\ncamera = "two words"', "inspection.camera"),
        ("[inspection]\nmin_area_px = -1", "inspection.min_area_px"),
        ('[engine]\nbackend = "openvino-gpu"', "engine.backend"),
        ('[engine]\nprecision = "int4"', "engine.precision"),
        ('[inspection]\nstride = "automatic"', "inspection.stride"),
        ('[inspection]\nstride = "auto"', "inspection"),
        ("[inspection]\nstride_headroom = 0.5", "inspection.stride_headroom"),
        ("[engine]\nthreads = 0", "engine.threads"),
        ('[engine]\ndevice = "gpu"', "engine.device"),
        ("[queues]\ningest = 0", "queues.ingest"),
        ('[queues]\noverload = "drop"', "queues.overload"),
        ('[log]\nformat = "xml"', "log.format"),
        ("[model]\nthreshold = -1.0", "model.threshold"),
        ("[model]\nbundel = 'x'", "model.bundel"),
        ("[extra]\nx = 1", "extra"),
    ],
)
def test_invalid_values_are_reported(tmp_path: Path, toml: str, location: str) -> None:
    """Each out-of-range, wrong-typed or unknown key is reported at its location."""
    errors = check_config(write(tmp_path, toml))
    assert len(errors) == 1, errors
    assert f": {location}: " in errors[0]


def test_check_config_reports_every_error_with_line(tmp_path: Path) -> None:
    """check_config lists all errors at once, each with file, line and section.key."""
    path = write(
        tmp_path,
        """# comment
[frames]
max_width = 0
bnd = true

[inspection]
stride = -5

[engine]
backend = "cuda"
""",
    )
    errors = check_config(path)
    assert errors == [
        f"{path}:3: frames.max_width: Input should be greater than or equal to 1",
        f"{path}:4: frames.bnd: unknown key (did you mean 'bind'?)",
        f"{path}:7: inspection.stride: Input should be greater than or equal to 1",
        f"{path}:10: engine.backend: "
        "Input should be 'torch', 'onnxruntime', 'openvino', 'tensorrt' or 'torch-cuda'",
    ]


def test_dotted_keys_are_located(tmp_path: Path) -> None:
    """Errors in top-level dotted keys are located on their line too."""
    path = write(tmp_path, 'log.level = "info"\nqueues.ingest = 0\n')
    errors = check_config(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:2: queues.ingest: ")


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    """A TOML syntax error is reported with its line and column."""
    path = write(tmp_path, "[frames]\nendpoint = = 1\n")
    errors = check_config(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:2:")
    assert "TOML syntax error" in errors[0]


def test_missing_file_is_reported(tmp_path: Path) -> None:
    """A missing file is one error naming the file, not an exception."""
    errors = check_config(tmp_path / "nope.toml")
    assert len(errors) == 1
    assert "nope.toml" in errors[0]


def test_load_config_raises_with_all_errors(tmp_path: Path) -> None:
    """load_config raises ConfigError whose message contains every error."""
    path = write(tmp_path, "[frames]\nmax_width = 0\nmax_height = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "frames.max_width" in str(info.value)
    assert "frames.max_height" in str(info.value)


def test_key_files_are_never_read(tmp_path: Path) -> None:
    """Key-file paths are only stored: their contents never appear in errors."""
    secret = tmp_path / "frames.key_secret"
    secret.write_text("SUPERSECRETKEYMATERIAL\n", encoding="utf-8")
    path = write(
        tmp_path,
        f'[frames]\ncurve_server_secret_key_file = "{secret}"\nmax_width = 0\n'
        "[events]\ncurve_server_secret_key_file = 42\n",
    )
    errors = check_config(path)
    assert len(errors) == 2
    assert not any("SUPERSECRET" in error or "42" in error.split(": ")[-1] for error in errors)
    ok = write(tmp_path, f'[frames]\ncurve_server_secret_key_file = "{secret}"\n')
    assert load_config(ok).frames.curve_server_secret_key_file == secret


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    """Relative paths in the file are relative to the file's directory, not the cwd."""
    path = write(
        tmp_path, '[model]\nbundle = "models/a"\n[frames]\ncurve_authorized_keys_dir = "k"\n'
    )
    config = load_config(path)
    assert config.model.bundle == tmp_path / "models" / "a"
    assert config.frames.curve_authorized_keys_dir == tmp_path / "k"


def test_config_is_frozen() -> None:
    """A loaded config cannot be changed in place."""
    config = Config()
    with pytest.raises(ValidationError):
        config.frames.__setattr__("rcvhwm", 1)


# --- overrides --------------------------------------------------------------------------------


def test_apply_overrides_sets_flags() -> None:
    """CLI overrides replace keys and leave others alone."""
    config = apply_overrides(
        Config(),
        model=Path("/m"),
        frames="tcp://0.0.0.0:6000",
        events="tcp://127.0.0.1:*",
        metrics="0.0.0.0:0",
        threshold=0.3,
    )
    assert config.model.bundle == Path("/m")
    assert config.model.threshold == 0.3
    assert config.frames.endpoint == "tcp://0.0.0.0:6000"
    assert config.events.endpoint == "tcp://127.0.0.1:*"
    assert config.metrics.port == 0
    assert config.frames.rcvhwm == Config().frames.rcvhwm
    assert apply_overrides(config) is config


def test_apply_overrides_validates() -> None:
    """Invalid overrides raise ConfigError naming the key."""
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        apply_overrides(Config(), metrics="nonsense")
    with pytest.raises(ConfigError, match=r"frames\.endpoint"):
        apply_overrides(Config(), frames="localhost:5555")


def test_with_overrides_rejects_unknown_section() -> None:
    """with_overrides refuses sections that do not exist."""
    with pytest.raises(ConfigError, match="bogus"):
        Config().with_overrides({"bogus": {"a": 1}})
    with pytest.raises(ConfigError, match=r"frames\.nope"):
        Config().with_overrides({"frames": {"nope": 1}})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:80", ("localhost", 80)),
        ("[::]:9108", ("::", 9108)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    """ADDR:PORT and [IPv6]:PORT split into host and port."""
    assert parse_listen(text) == expected


def test_example_is_valid_toml() -> None:
    """The example parses as TOML with every section present."""
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert set(data) == set(sections())
