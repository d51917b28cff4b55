"""Where TensorRT engines are cached, and when a cached one may be used.

A TensorRT engine (a ``.plan``) is only valid for the exact network, TensorRT version, GPU
model and build flags it was built with; loading a foreign one fails at best and runs subtly
different kernels at worst. So every engine is filed under a key over all of those:

    key = sha256(schema, ONNX sha256, TensorRT version, GPU name, compute capability,
                 fp16, max_batch, opt_batch)

    ENGINES/<bundle-name>-<key[:16]>.plan        the serialised engine
    ENGINES/<bundle-name>-<key[:16]>.plan.json   sidecar: the key's parts, the plan's sha256
    ENGINES/timing-<gpu>-sm<cc>-trt<version>.timing  TensorRT's timing cache (speeds up rebuilds)

:func:`lookup` returns a plan only when its sidecar names exactly the current parts and the
plan's checksum matches: a stale engine (re-exported model, upgraded TensorRT), one copied from
another machine, or a truncated file is never loaded; the caller builds a new one instead.
Pure Python: tested without TensorRT or a GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from linescan.errors import EngineError
from linescan.model.bundle import atomic_write_bytes

SCHEMA = 1
"""Bump when the key's meaning changes, so engines filed under the old meaning are not reused."""
ENGINES_ENV = "LINESCAN_ENGINES"
PLAN_SUFFIX = ".plan"
SIDECAR_SUFFIX = ".plan.json"
KEY_CHARS = 16


@dataclass(frozen=True)
class EngineKey:
    """Everything a TensorRT engine depends on; equal keys mean interchangeable engines."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    fp16: bool
    max_batch: int
    opt_batch: int

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{64}", self.onnx_sha256):
            raise EngineError(f"engine key: {self.onnx_sha256!r} is not a sha256 hex digest")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise EngineError(
                f"engine key: need 1 <= opt_batch <= max_batch, got opt_batch={self.opt_batch}, "
                f"max_batch={self.max_batch}"
            )

    def parts(self) -> dict[str, Any]:
        """The key's parts as plain JSON values, with the schema (what the sidecar stores)."""
        return {"schema": SCHEMA, **asdict(self)}

    def digest(self) -> str:
        """sha256 over the canonical JSON of :meth:`parts`."""
        canonical = json.dumps(self.parts(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def default_engines_dir() -> Path:
    """``$LINESCAN_ENGINES``; else ``$STATE_DIRECTORY/engines`` (systemd's StateDirectory=,
    the one writable place of the sandboxed unit, beside the event journal); else ``engines/``
    of a source checkout; else the user's cache.

    Never the working directory: under systemd that is ``/``.
    """
    env = os.environ.get(ENGINES_ENV)
    if env:
        return Path(env)
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        # systemd passes a colon-separated list when the unit names several; ours names one.
        return Path(state.split(":")[0]) / "engines"
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file() and (repo / "engines").is_dir():
        return repo / "engines"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "linescan" / "engines"


def _slug(text: str) -> str:
    """A file-name-safe version of a bundle or GPU name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "model"


def engine_path(engines_dir: Path, bundle_name: str, key: EngineKey) -> Path:
    return engines_dir / f"{_slug(bundle_name)}-{key.digest()[:KEY_CHARS]}{PLAN_SUFFIX}"


def sidecar_path(plan: Path) -> Path:
    return plan.with_name(plan.name[: -len(PLAN_SUFFIX)] + SIDECAR_SUFFIX)


def timing_cache_path(engines_dir: Path, key: EngineKey) -> Path:
    """One timing cache per GPU model and TensorRT version, shared by every model's builds."""
    cc = key.compute_capability.replace(".", "")
    name = f"timing-{_slug(key.gpu_name)}-sm{cc}-trt{_slug(key.tensorrt_version)}.timing"
    return engines_dir / name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_sidecar(plan: Path) -> dict[str, Any] | None:
    """The sidecar's contents, or None when it is missing or unreadable."""
    try:
        raw = json.loads(sidecar_path(plan).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def why_not_usable(plan: Path, key: EngineKey) -> str | None:
    """None when ``plan`` may be loaded for ``key``; otherwise the reason (for the log)."""
    if not plan.is_file():
        return "no engine file"
    side = read_sidecar(plan)
    if side is None:
        return "sidecar missing or unreadable"
    theirs = side.get("key")
    if not isinstance(theirs, dict):
        return "sidecar records no key"
    ours = key.parts()
    if theirs != ours:
        changed = sorted(k for k in ours.keys() | theirs.keys() if theirs.get(k) != ours.get(k))
        return "built for another configuration (differs in: " + ", ".join(changed) + ")"
    if side.get("plan_sha256") != _sha256(plan):
        return "engine file does not match its recorded checksum (truncated or replaced)"
    return None


def lookup(engines_dir: Path, bundle_name: str, key: EngineKey) -> Path | None:
    """The cached engine for ``key``, or None when there is none that may be used."""
    plan = engine_path(engines_dir, bundle_name, key)
    return plan if why_not_usable(plan, key) is None else None


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)


def store(
    engines_dir: Path,
    bundle_name: str,
    key: EngineKey,
    plan_bytes: bytes,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an engine and its sidecar atomically; returns the plan's path.

    The plan is written first and the sidecar last, so a crash in between leaves a plan
    without a sidecar, which :func:`lookup` refuses.
    """
    try:
        engines_dir.mkdir(parents=True, exist_ok=True)
        plan = engine_path(engines_dir, bundle_name, key)
        sidecar_path(plan).unlink(missing_ok=True)
        _atomic_write(plan, plan_bytes)
        record = {
            "key": key.parts(),
            "digest": key.digest(),
            "bundle": bundle_name,
            "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(),
            "plan_bytes": len(plan_bytes),
            **(extra or {}),
        }
        _atomic_write(sidecar_path(plan), (json.dumps(record, indent=2) + "\n").encode())
    except OSError as exc:
        raise EngineError(f"cannot write the engine under {engines_dir}: {exc}") from exc
    return plan


def other_engines(engines_dir: Path, bundle_name: str, key: EngineKey) -> list[Path]:
    """This bundle's engines for other keys (stale after a re-export or an upgrade)."""
    current = engine_path(engines_dir, bundle_name, key)
    prefix = f"{_slug(bundle_name)}-"
    return sorted(
        p
        for p in engines_dir.glob(f"{prefix}*{PLAN_SUFFIX}")
        if p != current and re.fullmatch(r"[0-9a-f]{16}", p.name[len(prefix) : -len(PLAN_SUFFIX)])
    )
