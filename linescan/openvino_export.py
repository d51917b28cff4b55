"""``linescan export --openvino [--int8]``: OpenVINO IR in the bundle, INT8 by NNCF, checked.

What it writes into the bundle (``BUNDLE/openvino/``) and records in ``bundle.json`` under
``"openvino"``:

* ``model.xml`` + ``model.bin``: the network (``export.inference_module``: a VAE with its fixed
  posterior draws) converted from the weights, FP32 weights kept exact (no FP16 compression).
  bf16 is not a file: the CPU plugin compiles this IR with bf16 arithmetic.
* with ``--int8``, ``model.int8.xml`` + ``.bin``: NNCF post-training quantization of it,
  calibrated on ``tiles`` (default 512) tiles cut on the bundle's grid from the defect-free
  images of ``--data`` (by default the bundle's own training folder when it is still there). The
  record names every image with its sha256, the seed, and the sha256 of the calibration tiles
  themselves: the same images give the same tiles, and the checksum proves it.

**Accuracy is measured, not assumed.** Every fourth image (up to eight) of ``--data`` is held
out of the calibration and gets synthetic defects planted into two copies
(``data/plants.py``, as ``linescan calibrate`` plants them); ``--defects`` adds labelled images
(MVTec layout). Each engine (OpenVINO fp32, the reference; bf16 where the CPU has it; int8)
inspects them exactly as ``linescan inspect`` does, at the bundle's calibrated threshold, and
the record keeps, per engine: the pixel AUROC of the score, the operating-point recall (planted
or labelled defects the published mask touches) and the false alarms on the untouched held-out
images. An engine whose AUROC falls more than ``max_auroc_loss`` (default 0.005) or whose
recall falls more than ``max_recall_loss`` (default 0.02) below FP32's is refused: its files
are removed, the record says why, and the command exits 1. The tiles/s of each engine on this
machine are recorded too (``precision = "auto"`` picks the fastest accepted one).

``nncf`` and ``openvino`` come with ``pip install 'linescan[openvino]'`` and are imported only
here and in ``backends/openvino_cpu.py``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from linescan.backends import Backend, FixedBatch
from linescan.backends.openvino_cpu import (
    IR_FILES,
    OPENVINO_HINT,
    OV_DIR,
    compile_model,
    convert,
    import_openvino,
)
from linescan.backends.torch_cpu import cpu_has_native_bf16
from linescan.data.images import read_grey, read_mask, test_samples, training_images
from linescan.data.plants import PLANT_KINDS, plant
from linescan.errors import DataError, EngineError
from linescan.evaluate import pixel_roc
from linescan.model.bundle import Bundle, BundleMeta, load_bundle, sha256_file, update_meta
from linescan.pipeline import Settings, inspect_image, reconstruct
from linescan.stride import measure_tiles_per_s
from linescan.tiling import TileGrid, cut_tiles

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
Progress = Callable[[str], None]

DEFAULT_TILES = 512
MAX_AUROC_LOSS = 0.005
MAX_RECALL_LOSS = 0.02
HOLDOUT_EVERY = 4
MAX_HOLDOUT = 8
PLANTED_COPIES = 2


@dataclass(frozen=True)
class Bound:
    """The most INT8 (or bf16) may lose against FP32 on the held-out images."""

    auroc: float = MAX_AUROC_LOSS
    recall: float = MAX_RECALL_LOSS


@dataclass(frozen=True)
class Accuracy:
    """One engine on the held-out images, at the bundle's threshold."""

    auroc: float
    found: int
    defects: int
    alarms: int  # published regions on the untouched held-out images
    good_mpx: float

    @property
    def recall(self) -> float | None:
        return None if not self.defects else self.found / self.defects

    def to_json(self) -> dict[str, Any]:
        return {
            "auroc": round(self.auroc, 6),
            "recall": None if self.recall is None else round(self.recall, 6),
            "found": self.found,
            "defects": self.defects,
            "false_alarms": self.alarms,
            "good_mpx": round(self.good_mpx, 4),
        }


@dataclass
class Report:
    """What ``export_openvino`` did: the record stored and a verdict per engine."""

    record: dict[str, Any]
    accuracy: dict[str, Accuracy] = field(default_factory=dict)
    verdicts: dict[str, str] = field(default_factory=dict)  # precision -> "accepted" / why not
    speed: dict[str, float] = field(default_factory=dict)

    @property
    def refused(self) -> list[str]:
        return [p for p, v in self.verdicts.items() if v != "accepted"]


# --------------------------------------------------------------------------- data


def split_images(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(calibration images, held-out images): every fourth image, up to eight, is held out;
    a single image serves both (the record says so)."""
    paths = list(paths)
    held = [p for i, p in enumerate(paths) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    held = held[:MAX_HOLDOUT] or paths[-1:]
    calib = [p for p in paths if p not in held] or list(paths)
    return calib, held


def calibration_tiles(
    paths: Sequence[Path], meta: BundleMeta, n: int = DEFAULT_TILES, seed: int = 0
) -> tuple[F32, dict[str, Any]]:
    """``n`` tiles drawn (seeded) from every tile position of the bundle's grid on the images
    at the model's scale, and the record that names them (images, seed, checksum)."""
    if n < 1:
        raise ValueError(f"calibration needs at least one tile, got {n}")
    images = [meta.input.to_model(read_grey(p)) for p in paths]
    grid = TileGrid(meta.patch, meta.stride)
    where = [
        (i, y, x)
        for i, img in enumerate(images)
        if min(img.shape) >= meta.patch
        for y, x in grid.coords(*img.shape)
    ]
    if not where:
        raise DataError(f"no image of {paths[0].parent} holds one {meta.patch}-px tile")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(where), size=min(n, len(where)), replace=False).tolist())
    tiles = np.concatenate(
        [cut_tiles(images[where[k][0]], [where[k][1]], [where[k][2]], meta.patch) for k in pick]
    )
    record = {
        "source": str(Path(paths[0]).parent),
        "images": [{"file": Path(p).name, "sha256": sha256_file(Path(p))} for p in paths],
        "tiles": len(tiles),
        "seed": seed,
        "grid": {"patch": meta.patch, "stride": meta.stride},
        "sha256": hashlib.sha256(np.ascontiguousarray(tiles).tobytes()).hexdigest(),
    }
    return tiles, record


def quantize(model: Any, tiles: F32, batch: int = 64) -> Any:
    """NNCF post-training quantization of an OpenVINO model on ``tiles``."""
    try:
        import nncf
    except ImportError as exc:
        raise EngineError(f"INT8 export needs NNCF: {OPENVINO_HINT}") from exc
    nncf.set_log_level(logging.ERROR)
    batches = [tiles[i : i + batch] for i in range(0, len(tiles), batch)]
    try:
        return nncf.quantize(
            model,
            nncf.Dataset(batches),
            subset_size=len(batches),
            preset=nncf.QuantizationPreset.PERFORMANCE,
        )
    except Exception as exc:  # NNCF raises many kinds; the cause goes with it
        raise EngineError(f"NNCF quantization failed: {exc}") from exc


# --------------------------------------------------------------------------- accuracy


class _Compiled:
    """A compiled OpenVINO model as a Backend (static batch), for the check at export."""

    def __init__(self, model: Any, precision: str, threads: int | None, batch: int) -> None:
        self.name = "openvino"
        self.precision = precision
        self._compiled = compile_model(model.clone(), precision, threads, batch, None)
        self._request = self._compiled.create_infer_request()

    def infer(self, batch: F32) -> F32:
        out: F32 = np.array(self._request.infer({0: batch})[0], dtype=np.float32, copy=True)
        return out

    def close(self) -> None:
        self._request = None


@dataclass(frozen=True)
class _Case:
    pixels: npt.NDArray[np.generic]
    labels: I32  # model scale, 0 = good, 1..n = defect n
    defects: int


def _model_labels(labels: I32, n: int, meta: BundleMeta) -> I32:
    """Camera-pixel labels 1..n -> model scale (a model pixel is in defect i when any camera
    pixel it covers is, as ``linescan calibrate`` counts them)."""
    out = np.zeros(meta.input.model_shape(*labels.shape), dtype=np.int32)
    for i in range(1, n + 1):
        out[meta.input.to_model((labels == i).astype(np.uint8)) > 0] = i
    return out


def check_cases(
    held_out: Sequence[Path],
    defects: Sequence[Path | tuple[Path, Path]],
    meta: BundleMeta,
    reference: Backend,
    seed: int = 0,
) -> tuple[list[npt.NDArray[np.generic]], list[_Case]]:
    """The untouched held-out images and the defect cases: ``PLANTED_COPIES`` copies of each
    held-out image with one synthetic defect of each kind on the web (where the reference
    engine finds the web), plus labelled (image, mask) pairs."""
    import cv2

    goods: list[npt.NDArray[np.generic]] = [read_grey(p) for p in held_out]
    cases: list[_Case] = []
    n = meta.input.downscale
    max_value = float(2**meta.input.bit_depth - 1)
    for i, pixels in enumerate(goods):
        edges = reconstruct(pixels, meta, reference).edges
        lefts = [e.left for _, _, e in edges if e.left is not None]
        rights = [e.right for _, _, e in edges if e.right is not None]
        lo = max(lefts) * n + 8 * n if lefts else 0
        hi = min(rights) * n - 8 * n if rights else pixels.shape[1]
        for c in range(PLANTED_COPIES):
            rng = np.random.default_rng([seed, i, c])
            img, placed, labels = plant(pixels, rng, PLANT_KINDS, (lo, hi), max_value)
            cases.append(_Case(img, _model_labels(labels, len(placed), meta), len(placed)))
    for d in defects:
        if not isinstance(d, tuple):  # pragma: no cover - the CLI passes pairs
            continue
        pixels = read_grey(d[0])
        mask = read_mask(d[1])
        small = meta.input.to_model(mask.astype(np.uint8)) > 0
        k, labels = cv2.connectedComponents(small.astype(np.uint8), connectivity=8)
        cases.append(_Case(pixels, labels.astype(np.int32), int(k - 1)))
    return goods, cases


def measure_accuracy(
    meta: BundleMeta,
    backend: Backend,
    goods: Sequence[npt.NDArray[np.generic]],
    cases: Sequence[_Case],
    batch: int = 64,
) -> Accuracy:
    """Pixel AUROC, defects found and false alarms of one engine at the bundle's threshold
    (or, without one, at a threshold no good pixel reaches: AUROC only)."""
    settings = Settings(max_batch=batch, threshold=meta.threshold or float("inf"))
    scores, masks = [], []
    found = total = 0
    for c in cases:
        res = inspect_image(c.pixels, meta, backend, settings)
        scores.append(res.score)
        masks.append(c.labels > 0)
        hit = np.unique(c.labels[(res.mask > 0) & (c.labels > 0)])
        found += int(hit.size)
        total += c.defects
    alarms = sum(len(inspect_image(g, meta, backend, settings).regions) for g in goods)
    auroc = pixel_roc(scores, masks).auc if cases else float("nan")
    return Accuracy(
        auroc=float(auroc),
        found=found if meta.threshold is not None else 0,
        defects=total if meta.threshold is not None else 0,
        alarms=alarms,
        good_mpx=sum(g.size for g in goods) / 1e6,
    )


def verdict(candidate: Accuracy, reference: Accuracy, bound: Bound) -> str:
    """ "accepted", or why not."""
    why = []
    if not candidate.auroc >= reference.auroc - bound.auroc:
        why.append(
            f"AUROC {candidate.auroc:.4f} vs FP32 {reference.auroc:.4f} "
            f"(loss {reference.auroc - candidate.auroc:.4f} > {bound.auroc})"
        )
    r, r0 = candidate.recall, reference.recall
    if r is not None and r0 is not None and not r >= r0 - bound.recall:
        why.append(f"recall {r:.3f} vs FP32 {r0:.3f} (loss {r0 - r:.3f} > {bound.recall})")
    return "accepted" if not why else "; ".join(why)


# --------------------------------------------------------------------------- export


def _save(model: Any, xml: Path) -> tuple[str, str]:
    """Save IR atomically (both files replaced only once written); their sha256s."""
    ov = import_openvino()
    xml.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(dir=xml.parent, prefix=".export-"))
    try:
        tmp = tmpdir / xml.name
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        for f in (tmp, tmp.with_suffix(".bin")):
            os.chmod(f, 0o644)
        sums = sha256_file(tmp), sha256_file(tmp.with_suffix(".bin"))
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return sums


def _default_data(bundle: Bundle) -> Path | None:
    data = bundle.meta.training.get("data")
    if not isinstance(data, str):
        return None
    for cand in (Path(data), bundle.path / data, bundle.path.parent / data):
        if cand.is_dir():
            return cand
    return None


def export_openvino(
    bundle_path: Path,
    int8: bool = False,
    data: Path | None = None,
    defects: Path | None = None,
    tiles: int = DEFAULT_TILES,
    bound: Bound = Bound(),
    threads: int | None = None,
    batch: int = 64,
    seed: int = 0,
    progress: Progress | None = None,
) -> Report:
    """Write the OpenVINO IR (and with ``int8`` the quantized IR, checked) into the bundle and
    record it; see the module doc. Raises ModelError/DataError/EngineError."""
    say = progress or (lambda _m: None)
    ov = import_openvino()
    bundle = load_bundle(Path(bundle_path))
    meta = bundle.meta
    out = bundle.path / OV_DIR
    say("converting the network to OpenVINO")
    model = convert(bundle)
    xml_sha, bin_sha = _save(model, out / IR_FILES["fp32"])
    base = {"weights_sha256": meta.weights_sha256}
    fp32 = {"xml": f"{OV_DIR}/{IR_FILES['fp32']}", **base, "xml_sha256": xml_sha}
    record: dict[str, Any] = {
        "openvino": str(ov.__version__),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "fp32": {**fp32, "bin_sha256": bin_sha},
    }
    report = Report(record)
    if not int8:
        _drop_int8(out)
        update_meta(bundle.path, openvino=record)
        return report
    root = data or _default_data(bundle)
    if root is None:
        raise DataError(
            "INT8 calibration needs defect-free images of the material: --data DIR (the "
            f"bundle's training folder {meta.training.get('data')!r} is not there)"
        )
    paths = training_images(root)
    calib, held = split_images(paths)
    say(f"cutting up to {tiles} calibration tiles from {len(calib)} image(s) of {root}")
    cal_tiles, cal_record = calibration_tiles(calib, meta, tiles, seed)
    cal_record["held_out"] = [p.name for p in held]
    cal_record["held_out_separate"] = not set(held) & set(calib)
    say(f"quantizing with NNCF on {len(cal_tiles)} tiles")
    q_model = quantize(model, cal_tiles, batch)
    tmp_dir = Path(tempfile.mkdtemp(prefix="linescan-int8-"))
    try:
        q_xml = tmp_dir / IR_FILES["int8"]
        ov.save_model(q_model, str(q_xml), compress_to_fp16=False)
        q_model = ov.Core().read_model(str(q_xml))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    engines: dict[str, Backend] = {"fp32": _Compiled(model, "fp32", threads, batch)}
    if cpu_has_native_bf16():
        engines["bf16"] = _Compiled(model, "bf16", threads, batch)
    engines["int8"] = _Compiled(q_model, "int8", threads, batch)
    labelled: list[Path | tuple[Path, Path]] = []
    if defects is not None:
        labelled = [(s.image, s.mask) for s in test_samples(defects) if s.mask is not None]
        if not labelled:
            raise DataError(f"{defects}: no defect images with ground-truth masks under test/")
    say(
        f"checking accuracy on {len(held)} held-out image(s) with synthetic defects"
        + (f" and {len(labelled)} labelled image(s)" if labelled else "")
    )
    goods, cases = check_cases(held, labelled, meta, FixedBatch(engines["fp32"], batch), seed)
    for name, engine in engines.items():
        say(f"  {name}")
        report.accuracy[name] = measure_accuracy(
            meta, FixedBatch(engine, batch), goods, cases, batch
        )
    ref = report.accuracy["fp32"]
    for name in engines:
        if name != "fp32":
            report.verdicts[name] = verdict(report.accuracy[name], ref, bound)
    diff = None
    if len(cal_tiles) >= batch:  # the engines take whole batches
        first = cal_tiles[:batch]
        diff = float(np.abs(engines["int8"].infer(first) - engines["fp32"].infer(first)).max())
    say("measuring tiles/s")
    for name, engine in engines.items():
        report.speed[name] = measure_tiles_per_s(engine, meta.patch, batch, seconds=2.0)
        engine.close()
    record["accuracy"] = {
        "reference": "fp32",
        "threshold": meta.threshold,
        "score_sha256": meta.score_sha256,
        "held_out_images": len(held),
        "planted_copies": PLANTED_COPIES,
        "labelled_images": len(labelled),
        "bound": {"auroc_loss": bound.auroc, "recall_loss": bound.recall},
        "int8_max_abs_diff": diff,
    }
    for name, acc in report.accuracy.items():
        verdict_ = report.verdicts.get(name, "reference")
        record["accuracy"][name] = {
            **acc.to_json(),
            "accepted": verdict_ in ("accepted", "reference"),
            "verdict": verdict_,
        }
    record["speed"] = {
        **{k: round(v, 1) for k, v in report.speed.items()},
        "batch": batch,
        "threads": threads,
        "machine": platform.node(),
        "unit": "tiles/s on the export machine",
    }
    if report.verdicts["int8"] == "accepted":
        q_sha, q_bin = _save(q_model, out / IR_FILES["int8"])
        record["int8"] = {
            "xml": f"{OV_DIR}/{IR_FILES['int8']}",
            **base,
            "xml_sha256": q_sha,
            "bin_sha256": q_bin,
            "accepted": True,
            "calibration": cal_record,
        }
    else:
        _drop_int8(out)
        record["int8_refused"] = {"why": report.verdicts["int8"], "calibration": cal_record}
    update_meta(bundle.path, openvino=record)
    return report


def _drop_int8(out: Path) -> None:
    for f in (out / IR_FILES["int8"], (out / IR_FILES["int8"]).with_suffix(".bin")):
        f.unlink(missing_ok=True)


def format_report(report: Report) -> str:
    """The accuracy and speed table ``linescan export`` prints."""
    lines = []
    if report.accuracy:
        acc = report.record.get("accuracy", {})
        lines.append(
            f"accuracy on {acc.get('held_out_images')} held-out image(s) x "
            f"{acc.get('planted_copies')} with synthetic defects"
            + (f" + {acc['labelled_images']} labelled" if acc.get("labelled_images") else "")
            + f", at threshold {acc.get('threshold')}:"
        )
        lines.append("  engine  AUROC    recall          false alarms  tiles/s  verdict")
        for name, a in report.accuracy.items():
            recall = "-" if a.recall is None else f"{a.recall:.3f} ({a.found}/{a.defects})"
            lines.append(
                f"  {name:<6}  {a.auroc:.4f}  {recall:<14}  {a.alarms:>12}  "
                f"{report.speed.get(name, float('nan')):>7.0f}  "
                f"{report.verdicts.get(name, 'reference')}"
            )
        b = acc.get("bound", {})
        lines.append(
            f"bound: AUROC -{b.get('auroc_loss')}, recall -{b.get('recall_loss')} against FP32"
        )
    return "\n".join(lines)
