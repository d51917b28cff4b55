"""Model bundles: a directory with the weights and everything needed to use them.

    BUNDLE/
      bundle.json     metadata: architecture, latent size, patch, loss, residual, SSIM window and
                      constants, input normalisation and scaling, stride, threshold and how it was
                      calibrated, the training data summary and command line, weight checksums
      weights.pt      a plain ``state_dict`` of tensors, read with ``torch.load(weights_only=True)``
      model.onnx      (optional, ``linescan export``) the same network with a dynamic batch axis
      model.fp16.onnx (optional, with model.onnx) the same in FP16 with FP32 inputs and outputs,
                      what strongly typed TensorRT builds FP16 engines from
      openvino/       (optional, ``linescan export --openvino [--int8]``) OpenVINO IR of the same
                      network: model.xml/.bin (FP32 weights; bf16 is a compile-time choice) and
                      model.int8.xml/.bin (NNCF post-training quantization), their checksums,
                      the calibration data's record and checksum and the accuracy check's
                      numbers in bundle.json under "openvino" (``linescan/openvino_export.py``)
      score.npz       (optional) statistics of the residual on defect-free material that turn it
                      into the score (``score.py``): per column, per distance from the web's
                      edges and from a segment's ends; written at the end of training and by
                      ``linescan calibrate``. Plain float32 arrays, loaded without pickle

Safety: nothing here unpickles arbitrary objects. ``weights_only=True`` restricts the unpickler
to tensors and plain containers, and before that the file's SHA-256 must equal the one in
``bundle.json``: a truncated, tampered or swapped weights file is refused with a message that
says which check failed. The metadata is validated field by field on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from linescan.errors import ModelError
from linescan.model.autoencoder import ARCHITECTURE, Autoencoder, VariationalAutoencoder
from linescan.preprocess import InputSpec
from linescan.residual import RESIDUAL_KINDS, ResidualKind
from linescan.score import SCORE_FILE, ScoreModel, Scoring, score_from_bytes, score_to_bytes
from linescan.segment import PAPER_DIAMETER
from linescan.ssim import SSIMParams

FORMAT = "linescan-bundle"
FORMAT_VERSION = 1
META_FILE = "bundle.json"
WEIGHTS_FILE = "weights.pt"
ONNX_FILE = "model.onnx"
ONNX_FP16_FILE = "model.fp16.onnx"

Loss = Literal["ssim", "l2", "vae", "fm"]
LOSSES: tuple[Loss, ...] = ("ssim", "l2", "vae", "fm")


@dataclass(frozen=True)
class BundleMeta:
    loss: Loss
    latent: int
    patch: int
    residual: ResidualKind
    ssim: SSIMParams = SSIMParams()
    input: InputSpec = InputSpec()
    stride: int = 30
    threshold: float | None = None
    calibration: dict[str, Any] | None = None
    vae_samples: int = 6
    vae_sigma: float = 0.1
    name: str = "model"
    training: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    onnx_sha256: str | None = None
    onnx_fp16_sha256: str | None = None
    created: str = ""
    opening: int = PAPER_DIAMETER  # diameter of the opening's disk, model pixels
    score: ScoreModel | None = field(default=None, compare=False, repr=False)
    score_sha256: str | None = None
    openvino: dict[str, Any] | None = None  # the OpenVINO export's record (openvino_export.py)

    def scoring(self, fixed_columns: tuple[int | None, int | None] | None = None) -> Scoring:
        """How this bundle's residual becomes its score (``score.py``)."""
        return Scoring(self.residual, self.score, fixed_columns)

    @property
    def variant(self) -> Literal["ae", "vae"]:
        return "vae" if self.loss == "vae" else "ae"

    @property
    def channels(self) -> int:
        """Reconstructions per tile the engine returns: N posterior samples for a VAE."""
        return self.vae_samples if self.variant == "vae" else 1

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.weights_sha256[:12]}"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "created": self.created,
            "model": {
                "architecture": ARCHITECTURE,
                "variant": self.variant,
                "loss": self.loss,
                "latent": self.latent,
                "patch": self.patch,
                "residual": self.residual,
                "vae_samples": self.vae_samples,
                "vae_sigma": self.vae_sigma,
            },
            "ssim": self.ssim.to_dict(),
            "input": self.input.to_dict(),
            "inspection": {
                "stride": self.stride,
                "threshold": self.threshold,
                "opening_disk_diameter": self.opening,
                "calibration": self.calibration,
            },
            "score": self._score_json(),
            "training": self.training,
            "weights": {"file": WEIGHTS_FILE, "sha256": self.weights_sha256},
            "onnx": self._onnx_json(),
            "openvino": self.openvino,
        }

    def _score_json(self) -> dict[str, Any] | None:
        if self.score is None or not self.score_sha256:
            return None
        return {"file": SCORE_FILE, "sha256": self.score_sha256, **self.score.to_json()}

    def _onnx_json(self) -> dict[str, Any] | None:
        if not self.onnx_sha256:
            return None
        record: dict[str, Any] = {"file": ONNX_FILE, "sha256": self.onnx_sha256}
        if self.onnx_fp16_sha256:
            record["fp16"] = {"file": ONNX_FP16_FILE, "sha256": self.onnx_fp16_sha256}
        return record


@dataclass(frozen=True)
class Bundle:
    path: Path
    meta: BundleMeta
    module: nn.Module


def build_module(meta: BundleMeta) -> nn.Module:
    if meta.variant == "vae":
        return VariationalAutoencoder(meta.patch, meta.latent)
    return Autoencoder(meta.patch, meta.latent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never half of it.

    The file keeps its mode, or gets the usual one for a new file (0666 less the umask): a
    temporary file is private (0600), and a bundle calibrated by one user must stay readable
    by the service's own user.
    """
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_meta(path: Path, meta: BundleMeta) -> None:
    text = json.dumps(meta.to_json(), indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(path / META_FILE, text.encode())


def save_bundle(path: Path, module: nn.Module, meta: BundleMeta) -> BundleMeta:
    """Write weights and metadata; returns the metadata with checksum and date filled in."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = path / f".{WEIGHTS_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / WEIGHTS_FILE)
    meta = replace(
        meta,
        weights_sha256=sha256_file(path / WEIGHTS_FILE),
        created=meta.created or datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_meta(path, meta)
    return meta


def save_score(path: Path, score: ScoreModel, **changes: Any) -> BundleMeta:
    """Store score statistics in an existing bundle (and other metadata ``changes``).

    The metadata is read (and checked) before the statistics file is replaced; a crash
    between the two writes leaves a bundle that is refused with a message, never a mix.
    """
    meta = read_meta(path)
    data = score_to_bytes(score)
    atomic_write_bytes(path / SCORE_FILE, data)
    meta = replace(meta, score=score, score_sha256=hashlib.sha256(data).hexdigest(), **changes)
    write_meta(path, meta)
    return meta


def update_meta(path: Path, **changes: Any) -> BundleMeta:
    """Change metadata fields (e.g. the threshold) of an existing, valid bundle."""
    meta = read_meta(path)
    meta = replace(meta, **changes)
    write_meta(path, meta)
    return meta


def _get(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ModelError(f"{where}: missing field {key!r}")
    v = d[key]
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise ModelError(f"{where}: field {key!r} has the wrong type ({type(v).__name__})")
    return v


def _onnx_fp16_sha(onnx: Any) -> str | None:
    fp16 = onnx.get("fp16") if isinstance(onnx, dict) else None
    sha = fp16.get("sha256") if isinstance(fp16, dict) else None
    return sha if isinstance(sha, str) else None


def _read_score(path: Path, record: Any, where: str) -> tuple[ScoreModel | None, str | None]:
    """The score statistics named in ``bundle.json``, checked against their checksum."""
    if record is None:
        return None, None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise ModelError(f"{where}: the score record must be an object with a sha256")
    file = path / SCORE_FILE
    if not file.is_file():
        raise ModelError(f"model bundle {path}: {SCORE_FILE} is missing ({META_FILE} names it)")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ModelError(
            f"model bundle {path}: {SCORE_FILE} does not match the checksum in {META_FILE} "
            "(file is truncated, corrupt or was replaced); refusing to load it"
        )
    return score_from_bytes(data, record, f"model bundle {path}"), str(record["sha256"])


def read_meta(path: Path) -> BundleMeta:
    """Read and validate ``bundle.json``; raises ModelError saying what is wrong."""
    if not path.is_dir():
        raise ModelError(f"model bundle {path} does not exist or is not a directory")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise ModelError(f"{path} is not a model bundle: {META_FILE} is missing")
    where = str(meta_path)
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{where} is corrupt (not valid JSON): {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelError(f"{where} is corrupt: not a JSON object")
    if raw.get("format") != FORMAT:
        raise ModelError(f"{where}: not a linescan bundle (format {raw.get('format')!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{where}: bundle format version {raw.get('format_version')!r} is not supported "
            f"(this linescan reads version {FORMAT_VERSION})"
        )
    try:
        m = _get(raw, "model", dict, where)
        arch = _get(m, "architecture", str, where + " model")
        if arch != ARCHITECTURE:
            raise ModelError(f"{where}: unknown architecture {arch!r} (expected {ARCHITECTURE!r})")
        loss = _get(m, "loss", str, where + " model")
        if loss not in LOSSES:
            raise ModelError(f"{where}: unknown loss {loss!r}; expected one of {LOSSES}")
        residual = _get(m, "residual", str, where + " model")
        if residual not in RESIDUAL_KINDS:
            raise ModelError(f"{where}: unknown residual {residual!r}; expected {RESIDUAL_KINDS}")
        s = _get(raw, "ssim", dict, where)
        ssim = SSIMParams(
            window=_get(s, "window", int, where + " ssim"),
            sigma=_get(s, "sigma", float, where + " ssim"),
            gaussian=_get(s, "gaussian", bool, where + " ssim"),
            k1=_get(s, "k1", float, where + " ssim"),
            k2=_get(s, "k2", float, where + " ssim"),
            data_range=_get(s, "data_range", float, where + " ssim"),
        )
        i = _get(raw, "input", dict, where)
        resize = i.get("resize")
        if resize is not None and not (
            isinstance(resize, list)
            and len(resize) == 2
            and all(isinstance(v, int) for v in resize)
        ):
            raise ModelError(f"{where}: input.resize must be null or [width, height]")
        inp = InputSpec(
            bit_depth=_get(i, "bit_depth", int, where + " input"),
            downscale=_get(i, "downscale", int, where + " input"),
            resize=(resize[0], resize[1]) if resize else None,
        )
        insp = _get(raw, "inspection", dict, where)
        threshold = insp.get("threshold")
        if threshold is not None and not isinstance(threshold, int | float):
            raise ModelError(f"{where}: inspection.threshold must be a number or null")
        w = _get(raw, "weights", dict, where)
        onnx = raw.get("onnx")
        opening = insp.get("opening_disk_diameter", PAPER_DIAMETER)
        if not isinstance(opening, int) or isinstance(opening, bool) or not 1 <= opening <= 64:
            raise ModelError(f"{where}: inspection.opening_disk_diameter must be 1..64")
        score, score_sha = _read_score(path, raw.get("score"), where)
        openvino = raw.get("openvino")
        if openvino is not None and not isinstance(openvino, dict):
            raise ModelError(f"{where}: openvino must be an object or null")
        meta = BundleMeta(
            name=_get(raw, "name", str, where),
            created=str(raw.get("created", "")),
            loss=cast(Loss, loss),
            latent=_get(m, "latent", int, where + " model"),
            patch=_get(m, "patch", int, where + " model"),
            residual=cast(ResidualKind, residual),
            vae_samples=_get(m, "vae_samples", int, where + " model"),
            vae_sigma=_get(m, "vae_sigma", float, where + " model"),
            ssim=ssim,
            input=inp,
            stride=_get(insp, "stride", int, where + " inspection"),
            threshold=float(threshold) if threshold is not None else None,
            calibration=insp.get("calibration"),
            training=raw.get("training") or {},
            weights_sha256=_get(w, "sha256", str, where + " weights"),
            onnx_sha256=onnx.get("sha256") if isinstance(onnx, dict) else None,
            onnx_fp16_sha256=_onnx_fp16_sha(onnx),
            opening=opening,
            score=score,
            score_sha256=score_sha,
            openvino=openvino,
        )
        meta.scoring()  # a residual the statistics do not cover is refused here
    except ValueError as exc:  # out-of-range values rejected by the dataclasses
        raise ModelError(f"{where}: {exc}") from exc
    if meta.latent < 1 or meta.patch < 16 or meta.patch % 16 or not 1 <= meta.stride <= meta.patch:
        raise ModelError(
            f"{where}: inconsistent model (latent={meta.latent}, patch={meta.patch}, "
            f"stride={meta.stride})"
        )
    return meta


def load_bundle(path: Path) -> Bundle:
    """Load and verify a bundle: metadata, checksum, then weights into the architecture."""
    path = Path(path)
    meta = read_meta(path)
    wpath = path / WEIGHTS_FILE
    if not wpath.is_file():
        raise ModelError(f"model bundle {path}: weights file {WEIGHTS_FILE} is missing")
    digest = sha256_file(wpath)
    if digest != meta.weights_sha256:
        raise ModelError(
            f"model bundle {path}: {WEIGHTS_FILE} does not match the checksum in {META_FILE} "
            f"(file is truncated, corrupt or was replaced); refusing to load it"
        )
    try:
        state = torch.load(wpath, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable/unsafe files
        raise ModelError(f"model bundle {path}: cannot read {WEIGHTS_FILE}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"model bundle {path}: {WEIGHTS_FILE} is not a plain state_dict")
    module = build_module(meta)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"model bundle {path}: weights do not fit the architecture in {META_FILE} "
            f"(latent={meta.latent}, patch={meta.patch}, loss={meta.loss}): {exc}"
        ) from exc
    module.eval()
    return Bundle(path=path, meta=meta, module=module)
