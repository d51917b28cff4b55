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
    if a.openvino or a.int8:
        return _export_openvino(a)
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


def _export_openvino(a: argparse.Namespace) -> int:
    """``export --openvino [--int8]``: OpenVINO IR into the bundle; INT8 quantized and
    checked against FP32 (refused beyond the bound: exit 1)."""
    import sys

    from linescan.openvino_export import Bound, export_openvino, format_report

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = export_openvino(
        a.model,
        int8=a.int8,
        data=a.data,
        defects=a.defects,
        tiles=a.calibration_tiles,
        bound=Bound(auroc=a.max_auroc_loss, recall=a.max_recall_loss),
        threads=a.threads,
        batch=a.batch,
        progress=say,
    )
    rec = report.record
    print(f"wrote {a.model}/{rec['fp32']['xml']} (OpenVINO {rec['openvino']}, FP32 weights)")
    if a.int8:
        print(format_report(report))
        if "int8" in rec:
            cal = rec["int8"]["calibration"]
            print(
                f"wrote {a.model}/{rec['int8']['xml']} (NNCF INT8, calibrated on {cal['tiles']} "
                f"tiles of {len(cal['images'])} image(s), sha256 {cal['sha256'][:16]})"
            )
        for name in report.refused:
            print(f"refused {name}: {report.verdicts[name]}")
        if "int8" in report.refused:
            print("INT8 not written: the quantized engine loses more than the bound allows")
            return 1
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
    e = sub.add_parser(
        "export", help="export a bundle's network to ONNX (dynamic batch axis) or OpenVINO"
    )
    e.add_argument("--model", type=Path, required=True, help="model bundle directory")
    e.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    e.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-torch check")
    ov = e.add_argument_group(
        "OpenVINO (pip install 'linescan[openvino]')",
        "--openvino writes OpenVINO IR into the bundle instead of ONNX; --int8 adds an NNCF "
        "INT8 model, calibrated on tiles of defect-free images and checked against FP32 on "
        "held-out ones with synthetic defects (refused beyond the bound: exit 1)",
    )
    ov.add_argument("--openvino", action="store_true", help="OpenVINO IR (FP32; bf16 at run time)")
    ov.add_argument("--int8", action="store_true", help="also INT8 by NNCF (implies --openvino)")
    ov.add_argument(
        "--data",
        type=Path,
        default=None,
        help="defect-free images (folder or MVTec layout; default: the bundle's training data)",
    )
    ov.add_argument(
        "--defects", type=Path, default=None, help="labelled defects (MVTec layout) to check too"
    )
    ov.add_argument(
        "--calibration-tiles", type=_positive, default=512, help="tiles NNCF calibrates on (512)"
    )
    ov.add_argument(
        "--max-auroc-loss", type=float, default=0.005, help="refuse INT8 below FP32's AUROC - X"
    )
    ov.add_argument(
        "--max-recall-loss", type=float, default=0.02, help="refuse INT8 below FP32's recall - X"
    )
    ov.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: all)")
    ov.add_argument("--batch", type=_positive, default=64, help="tiles per call (default 64)")
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
