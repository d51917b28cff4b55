"""The OpenVINO backend: the bundle's network on OpenVINO's CPU plugin, in fp32, bf16 or int8.

Why a third CPU engine: OpenVINO's CPU plugin runs INT8 convolutions on VNNI (AVX512-VNNI,
AVX-VNNI, AMX), and an INT8 model made by NNCF post-training quantization is what anomalib
users deploy on CPUs. On this project's 2-core reference machine it runs the Table I network
about 1.7x as fast as torch in bf16 (``make bench``).

Where the network comes from: ``linescan export --openvino [--int8]`` writes OpenVINO IR into
the bundle (``openvino/model.xml`` + ``.bin`` in FP32, ``openvino/model.int8.xml`` + ``.bin``
quantized; see ``linescan/openvino_export.py``) and records the files' sha256, the weights they
were made from, and the INT8 accuracy check in ``bundle.json``. A file that does not match its
record, or was made from other weights, is refused with the command that rebuilds it. Without
an export, fp32 and bf16 are converted from the weights at start (a few seconds); int8 always
needs the export (its calibration data and accuracy check cannot be made at start).

Precision: ``fp32``; ``bf16`` (the FP32 IR compiled with OpenVINO's bf16 inference precision,
on CPUs with native bf16, else refused); ``int8``; ``auto``: the fastest precision whose
accuracy check passed on this bundle (``choose_precision``).

Compiled models are cached per machine by OpenVINO itself (``CACHE_DIR``) under the engine
cache (``$LINESCAN_ENGINES/openvino``, ``$STATE_DIRECTORY/engines/openvino`` under systemd),
like the TensorRT engines: OpenVINO keys a blob by the model, the device and the compile
options, so a stale one is never loaded, and a second start skips the compilation.

Batches: the model is reshaped to a static batch (``max_batch``) and ``FixedBatch`` (see
``backends/__init__.py``) pads every call to it, so a tile's reconstruction is the same bits
in the daemon and offline.

``openvino`` is imported only here, when the backend is chosen; without it every entry point
raises ``EngineError`` naming ``pip install 'linescan[openvino]'``. Every OpenVINO failure
becomes ``EngineError``. Not thread-safe: one inference thread per backend.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from linescan.backends import F32
from linescan.backends.torch_cpu import cpu_has_native_bf16
from linescan.engine_cache import default_engines_dir
from linescan.errors import EngineError, ModelError
from linescan.log import get_logger
from linescan.model.bundle import Bundle, read_meta, sha256_file
from linescan.threads import affinity_cores

OPENVINO_HINT = "pip install 'linescan[openvino]'"
PRECISIONS = ("auto", "fp32", "bf16", "int8")
OV_DIR = "openvino"
IR_FILES = {"fp32": "model.xml", "int8": "model.int8.xml"}  # bf16 compiles the FP32 IR
SPEED_ORDER = ("int8", "bf16", "fp32")  # without a measurement: INT8 first (VNNI), then bf16

log = get_logger("linescan.openvino")


def import_openvino() -> Any:
    """The openvino module; EngineError with the install command when it is missing."""
    try:
        import openvino
    except ImportError as exc:
        raise EngineError(f"the OpenVINO backend needs OpenVINO: {OPENVINO_HINT}") from exc
    return openvino


@functools.cache
def _core(cache_dir: str | None) -> Any:
    ov = import_openvino()
    core = ov.Core()
    if cache_dir is not None:
        core.set_property({"CACHE_DIR": cache_dir})
    return core


def cache_dir(engines_dir: Path | None = None) -> Path:
    """Where OpenVINO keeps compiled models: ``ENGINES/openvino``."""
    return (engines_dir or default_engines_dir()) / "openvino"


def ir_path(bundle_path: Path, precision: str) -> Path:
    """The IR file of ``precision`` (fp32, int8) inside a bundle."""
    return bundle_path / OV_DIR / IR_FILES[precision]


def checked_ir(bundle: Bundle, precision: str) -> Path | None:
    """The bundle's IR for ``precision`` (fp32 or int8) after checking it against its record
    in ``bundle.json`` (read again from disk: an export may have run since the bundle was
    loaded); None when there is no export of it. ModelError when it is stale or damaged."""
    flags = "--openvino --int8 --data GOOD_IMAGES" if precision == "int8" else "--openvino"
    fix = f"run `linescan export --model {bundle.path} {flags}`"
    meta = read_meta(bundle.path)
    if meta.weights_sha256 != bundle.meta.weights_sha256:
        raise ModelError(
            f"model bundle {bundle.path} changed on disk since it was loaded; reload it"
        )
    record = (meta.openvino or {}).get(precision)
    xml = ir_path(bundle.path, precision)
    if not isinstance(record, dict):
        if xml.exists():
            raise ModelError(f"{xml} is not recorded in {bundle.path}/bundle.json: {fix}")
        return None
    if record.get("weights_sha256") != meta.weights_sha256:
        raise ModelError(
            f"{xml} was exported from other weights than the bundle's (retrained since?): {fix}"
        )
    for path, key in ((xml, "xml_sha256"), (xml.with_suffix(".bin"), "bin_sha256")):
        if not path.is_file():
            raise ModelError(f"model bundle {bundle.path}: {path.name} is missing: {fix}")
        if sha256_file(path) != record.get(key):
            raise ModelError(
                f"{path} does not match the checksum in bundle.json (stale, corrupt or tampered "
                f"export); refusing to load it: {fix}"
            )
    if precision == "int8" and not record.get("accepted", False):
        raise ModelError(f"{xml} failed its accuracy check at export; it is not to be run: {fix}")
    return xml


def accuracy_current(bundle: Bundle, precision: str) -> bool:
    """True when the export's accuracy check of ``precision`` passed and was made with the
    bundle's current threshold and score statistics (a recalibration invalidates it)."""
    record = bundle.meta.openvino or {}
    acc = record.get("accuracy") or {}
    if precision == "fp32":
        return True
    result = acc.get(precision)
    return bool(
        isinstance(result, dict)
        and result.get("accepted")
        and acc.get("threshold") == bundle.meta.threshold
        and acc.get("score_sha256") == bundle.meta.score_sha256
    )


def choose_precision(bundle: Bundle, native_bf16: bool | None = None) -> tuple[str, str]:
    """``auto``: the fastest precision whose accuracy check passed on this bundle, and why.

    Candidates: int8 (exported, accepted, and checked with the bundle's current threshold and
    statistics), bf16 (on CPUs with native bf16, and accepted when it was checked), fp32.
    Fastest by the tiles/s the export measured (on the export machine), else INT8 > bf16 > fp32.
    """
    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    record = bundle.meta.openvino or {}
    usable = ["fp32"]
    if native and (
        accuracy_current(bundle, "bf16") or "bf16" not in (record.get("accuracy") or {})
    ):
        usable.append("bf16")
    if isinstance(record.get("int8"), dict) and accuracy_current(bundle, "int8"):
        usable.append("int8")
    speed = record.get("speed") or {}
    if all(isinstance(speed.get(p), int | float) for p in usable):
        best = max(usable, key=lambda p: float(speed[p]))
        return best, f"fastest at export ({speed[best]:.0f} tiles/s) of {usable}"
    best = next(p for p in SPEED_ORDER if p in usable)
    return best, f"first of {list(SPEED_ORDER)} usable here: {usable}"


def convert(bundle: Bundle) -> Any:
    """The bundle's inference network as an OpenVINO model, batch axis dynamic."""
    import torch

    from linescan.export import inference_module

    ov = import_openvino()
    p = bundle.meta.patch
    module = inference_module(bundle)
    example = torch.rand(2, 1, p, p, generator=torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # OpenVINO traces with torch.jit.trace, which torch announces as deprecated; the
            # tracer's own warnings are about shapes, fixed in this convolutional network.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            return ov.convert_model(module, example_input=example, input=[(-1, 1, p, p)])
    except Exception as exc:  # OpenVINO's frontends raise their own exception classes
        raise EngineError(f"OpenVINO cannot convert {bundle.path}: {exc}") from exc


def compile_model(
    model: Any, precision: str, threads: int | None, batch: int, cache: Path | None
) -> Any:
    """``model`` reshaped to a static batch and compiled for the CPU plugin."""
    p = model.input(0).get_partial_shape()[2].get_length()
    try:
        model.reshape([batch, 1, p, p])
        config: dict[str, Any] = {
            "NUM_STREAMS": 1,  # one batch at a time, all threads on it: the daemon's shape
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = max(1, min(threads, affinity_cores()))
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        core = _core(None if cache is None else str(cache))
        return core.compile_model(model, "CPU", config)
    except (OSError, RuntimeError) as exc:
        raise EngineError(f"OpenVINO cannot compile the model for the CPU: {exc}") from exc


class OpenVinoBackend:
    """The bundle's network on OpenVINO's CPU plugin (see the module doc)."""

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "auto",
        threads: int | None = None,
        max_batch: int = 64,
        engines_dir: Path | None = None,
        cache: bool = True,
    ) -> None:
        self.name = "openvino"
        if precision not in PRECISIONS:
            raise EngineError(
                f"openvino backend: precision must be one of {PRECISIONS}, not {precision!r}"
            )
        import_openvino()
        why = "asked for"
        if precision == "auto":
            precision, why = choose_precision(bundle)
        if precision == "bf16" and not cpu_has_native_bf16():
            raise EngineError(
                "openvino backend: bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX); "
                "use fp32 or int8"
            )
        self.precision = precision
        xml = checked_ir(bundle, "int8" if precision == "int8" else "fp32")
        if xml is None and precision == "int8":
            raise ModelError(
                f"model bundle {bundle.path} has no INT8 export: run `linescan export --model "
                f"{bundle.path} --openvino --int8 --data GOOD_IMAGES`"
            )
        if xml is None:
            log.info(
                "no OpenVINO export in the bundle: converting the weights", bundle=str(bundle.path)
            )
            model = convert(bundle)
        else:
            try:
                model = _core(None).read_model(str(xml))
            except RuntimeError as exc:
                raise EngineError(f"OpenVINO cannot read {xml}: {exc}") from exc
        where = cache_dir(engines_dir) if cache else None
        self._compiled = compile_model(model, precision, threads, max_batch, where)
        self._request = self._compiled.create_infer_request()
        self._batch = max_batch
        self._patch = bundle.meta.patch
        self._channels = bundle.meta.channels
        log.info(
            "openvino engine",
            precision=precision,
            why=why,
            ir=None if xml is None else str(xml),
            batch=max_batch,
            cache=None if where is None else str(where),
        )

    def infer(self, batch: F32) -> F32:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.shape != (self._batch, 1, self._patch, self._patch):
            raise EngineError(
                f"openvino backend: expected ({self._batch}, 1, {self._patch}, {self._patch}) "
                f"tiles (a static batch: wrap it in FixedBatch), got {x.shape}"
            )
        try:
            result = self._request.infer({0: x})
        except RuntimeError as exc:
            raise EngineError(f"OpenVINO inference failed: {exc}") from exc
        out: F32 = np.array(result[0], dtype=np.float32, copy=True)
        if out.shape != (self._batch, self._channels, self._patch, self._patch):
            raise EngineError(f"openvino backend: unexpected output shape {out.shape}")
        return out

    def close(self) -> None:
        self._request = None
        self._compiled = None
