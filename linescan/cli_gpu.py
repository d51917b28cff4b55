"""``linescan export`` and ``linescan build-engine``: the commands of the GPU path.

Kept apart from ``cli.py`` so the GPU commands own their imports: ``export`` needs onnx and
onnxruntime (the ``onnx`` extra), ``build-engine`` needs TensorRT and pycuda (the ``gpu``
extra), and neither is imported until its command runs. A missing extra raises
``EngineError``/``ModelError`` naming the pip command; ``cli.main`` prints it and exits 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from linescan.errors import ConfigError


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_export(a: argparse.Namespace) -> int:
    from linescan.export import export_onnx, verify_onnx
    from linescan.model.bundle import ONNX_FP16_FILE, read_meta

    path = export_onnx(a.model, opset=a.opset)
    meta = read_meta(a.model)
    print(f"wrote {path} (sha256 {meta.onnx_sha256}, opset {a.opset}, dynamic batch axis)")
    print(f"wrote {path.with_name(ONNX_FP16_FILE)} (sha256 {meta.onnx_fp16_sha256}, FP16 inside)")
    if a.no_verify:
        return 0
    for precision in ("fp32", "fp16"):
        diff = verify_onnx(a.model, precision=precision)
        print(
            f"onnxruntime {precision} export vs torch fp32 on batches of 1 and 5: "
            f"max |diff| = {diff:.2e}"
        )
    return 0


def cmd_build_engine(a: argparse.Namespace) -> int:
    from linescan.backends.tensorrt import build_engine

    if a.opt_batch is not None and a.opt_batch > a.max_batch:
        raise ConfigError(f"--opt-batch {a.opt_batch} exceeds --max-batch {a.max_batch}")
    opt = a.opt_batch if a.opt_batch is not None else min(64, a.max_batch)
    plan = build_engine(
        a.model,
        fp16=a.fp16,
        max_batch=a.max_batch,
        opt_batch=opt,
        engines_dir=a.engines,
        device=a.device,
        force=a.force,
    )
    print(f"engine {plan}")
    return 0


def add_parsers(sub: Any) -> None:
    """Add ``export`` and ``build-engine`` to the ``linescan`` sub-command parsers."""
    e = sub.add_parser("export", help="export a bundle's network to ONNX (dynamic batch axis)")
    e.add_argument("--model", type=Path, required=True, help="model bundle directory")
    e.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    e.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-torch check")
    e.set_defaults(func=cmd_export)

    b = sub.add_parser(
        "build-engine", help="build (or reuse a cached) TensorRT engine for this GPU"
    )
    b.add_argument("--model", type=Path, required=True, help="model bundle directory")
    b.add_argument("--fp16", action="store_true", help="FP16 kernels where the GPU has them")
    b.add_argument("--max-batch", type=_positive, default=256, help="largest batch (default 256)")
    b.add_argument(
        "--opt-batch",
        type=_positive,
        default=None,
        help="batch the kernels are tuned for (default min(64, max-batch))",
    )
    b.add_argument(
        "--engines",
        type=Path,
        default=None,
        help="engine cache directory (default $LINESCAN_ENGINES, the checkout's engines/, "
        "or ~/.cache/linescan/engines)",
    )
    b.add_argument("--device", type=int, default=0, help="GPU index (default 0)")
    b.add_argument("--force", action="store_true", help="rebuild even if a cached engine fits")
    b.set_defaults(func=cmd_build_engine)
