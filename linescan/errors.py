"""The project's exception tree.

    LinescanError            anything linescan raises on purpose
    ├── ConfigError          a configuration file or flag is invalid
    ├── DataError            an input image or dataset cannot be used (names the file)
    ├── FrameError           a camera frame is malformed (carries a short machine reason)
    ├── ModelError           a model bundle is missing, corrupt or mismatched
    └── EngineError          an inference backend failed (CUDA, TensorRT, onnxruntime, torch)

Backends re-raise their library's failures as ``EngineError(...) from exc`` so the daemon can
count and report them without knowing every library's exception types.
"""

from __future__ import annotations


class LinescanError(Exception):
    """Base of every error linescan raises on purpose."""


class ConfigError(LinescanError):
    """A configuration file or command-line flag is invalid."""


class DataError(LinescanError):
    """An image or dataset cannot be used; the message names the file."""


class FrameError(LinescanError):
    """A camera frame is malformed. ``reason`` is a short label used as a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ModelError(LinescanError):
    """A model bundle is missing, corrupt, tampered with or does not fit the request."""


class EngineError(LinescanError):
    """An inference backend failed."""
