"""Grey-scale image I/O and the dataset layouts the tools read.

Why a module of its own: every entry point (training, offline inspection, evaluation) must agree
on what an image *is* before the model sees it. The rules, in one place:

- Images are 2-D grey, uint8 or uint16, as the camera wrote them. Line-scan cameras deliver
  10/12-bit data in 16-bit containers; silently squashing that to 8 bits (``cv2.imread`` without
  flags does) would throw away the dynamic range the model was trained on, so we read with
  ``IMREAD_UNCHANGED`` and keep the depth. Colour files are converted to grey (same depth).
  Anything else (float TIFF/EXR, 2-channel, unreadable) is refused with a ``DataError`` that
  names the file, rather than being coerced into something the model was never trained on.
- Datasets come in the MVTec-AD layout (``train/good``, ``test/<type>``,
  ``ground_truth/<type>/<stem>_mask.png``) or, for training only, as a plain folder of images.
  Both real datasets under the project's shared data (MVTec "grid" and the AITEX fabrics) name
  masks ``<stem>_mask.png``; we also accept a mask with the image's own file name, the other
  common convention, so that datasets converted by other tools load unchanged.

Orders are sorted, so that every run (and every machine) sees the same files in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import cv2
import numpy as np
import numpy.typing as npt

from linescan.errors import DataError

GreyImage: TypeAlias = npt.NDArray[np.uint8] | npt.NDArray[np.uint16]
Mask: TypeAlias = npt.NDArray[np.bool_]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Formats whose OpenCV writer stores 16-bit samples. For the others cv2.imwrite would saturate
# to 8 bits (values > 255 become 255) without a word, so we refuse instead.
_SUFFIXES_16BIT = (".png", ".tif", ".tiff")

_MVTEC_TRAIN = ("train", "good")
_GOOD = "good"


def _is_image_file(path: Path) -> bool:
    # Names starting with "." are editor/OS droppings (macOS "._x.png" AppleDouble files).
    return (
        path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image_file(p))


def read_grey(path: Path) -> GreyImage:
    """Read ``path`` as a C-contiguous 2-D grey image, uint8 or uint16 as stored.

    Colour (BGR) and colour+alpha (BGRA) files are converted to grey at their own depth.
    Raises ``DataError`` naming the file for missing, unreadable or unsupported images.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        img: npt.NDArray[Any] | None = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise DataError(f"{path}: cannot be decoded as an image ({exc})") from exc
    if img is None:
        raise DataError(f"{path}: cannot be decoded as an image (corrupt or unsupported format)")
    if img.dtype not in (np.uint8, np.uint16):
        raise DataError(
            f"{path}: unsupported sample type {img.dtype}; only 8-bit and 16-bit unsigned "
            "integer images are accepted"
        )
    if img.size == 0:
        raise DataError(f"{path}: image is empty (shape {img.shape})")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    elif img.ndim == 3 and img.shape[2] in (3, 4):
        code = cv2.COLOR_BGR2GRAY if img.shape[2] == 3 else cv2.COLOR_BGRA2GRAY
        img = cv2.cvtColor(img, code)
    if img is None or img.ndim != 2:
        shape = None if img is None else img.shape
        raise DataError(f"{path}: unsupported image layout {shape}; expected grey, BGR or BGRA")
    return np.ascontiguousarray(img)


def write_grey(path: Path, img: GreyImage) -> None:
    """Write a 2-D uint8/uint16 image to ``path`` (format from the suffix), creating folders.

    16-bit images need a format that stores 16 bits (PNG or TIFF). Raises ``DataError`` on any
    failure, naming the file.
    """
    path = Path(path)
    arr = np.asarray(img)
    if arr.ndim != 2 or arr.dtype not in (np.uint8, np.uint16):
        raise DataError(
            f"{path}: can only write 2-D uint8 or uint16 images, got {arr.dtype} {arr.shape}"
        )
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise DataError(f"{path}: unsupported image suffix {path.suffix!r}; use {IMAGE_SUFFIXES}")
    if arr.dtype == np.uint16 and suffix not in _SUFFIXES_16BIT:
        raise DataError(
            f"{path}: {path.suffix} cannot store 16-bit samples; use one of {_SUFFIXES_16BIT}"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{path}: cannot create folder {path.parent} ({exc})") from exc
    try:
        ok = bool(cv2.imwrite(str(path), np.ascontiguousarray(arr)))
    except cv2.error as exc:
        raise DataError(f"{path}: cannot be written ({exc})") from exc
    if not ok:
        raise DataError(f"{path}: cannot be written (OpenCV imwrite failed)")


def read_mask(path: Path) -> Mask:
    """Read a ground-truth mask: nonzero pixels are defect."""
    mask: Mask = np.asarray(read_grey(path)) != 0
    return mask


def training_images(root: Path) -> list[Path]:
    """Defect-free training images of a dataset, sorted.

    ``root/train/good`` when it exists (MVTec-AD layout), else the images directly in ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such dataset folder")
    mvtec = root.joinpath(*_MVTEC_TRAIN)
    folder = mvtec if mvtec.is_dir() else root
    images = _images_in(folder)
    if not images:
        raise DataError(
            f"{root}: no training images found; looked in {mvtec} (MVTec-AD layout) "
            f"{'(exists, but holds no images)' if mvtec.is_dir() else '(absent)'} "
            f"and directly in {root} (plain folder) for files ending in {IMAGE_SUFFIXES}"
        )
    return images


@dataclass(frozen=True)
class TestSample:
    """One test image, its ground-truth mask (None for defect-free images) and its type."""

    __test__ = False  # not a pytest test class, despite the name

    image: Path
    mask: Path | None
    defect_type: str


def _find_mask(image: Path, gt_folder: Path) -> Path | None:
    stem = image.stem
    # MVTec-AD and AITEX (as shipped here): <stem>_mask.png. Then any other image suffix, then
    # the other common convention: the mask has the image's own name.
    candidates = [gt_folder / f"{stem}_mask{s}" for s in IMAGE_SUFFIXES]
    candidates += [gt_folder / f"{stem}{s}" for s in IMAGE_SUFFIXES]
    for cand in candidates:
        if cand.is_file():
            return cand
    return None


def test_samples(root: Path) -> list[TestSample]:
    """Test images of an MVTec-AD layout dataset with their masks, sorted by type then name.

    Images are ``root/test/<type>/*``; masks ``root/ground_truth/<type>/<stem>_mask.png``
    (or ``<stem>.png``). Type ``good`` has no masks. A defect image without a mask is an error:
    evaluating on it would count every true detection as a false positive.
    """
    root = Path(root)
    test_dir = root / "test"
    if not test_dir.is_dir():
        raise DataError(f"{root}: no test folder {test_dir} (expected the MVTec-AD layout)")
    samples: list[TestSample] = []
    type_dirs = sorted(d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    for type_dir in type_dirs:
        defect_type = type_dir.name
        gt_folder = root / "ground_truth" / defect_type
        for image in _images_in(type_dir):
            if defect_type == _GOOD:
                samples.append(TestSample(image=image, mask=None, defect_type=defect_type))
                continue
            mask = _find_mask(image, gt_folder)
            if mask is None:
                expected = gt_folder / f"{image.stem}_mask.png"
                raise DataError(
                    f"{image}: no ground-truth mask; expected {expected} "
                    f"(or {gt_folder / image.stem}.png)"
                )
            samples.append(TestSample(image=image, mask=mask, defect_type=defect_type))
    if not samples:
        raise DataError(f"{root}: no test images in {test_dir}/<type>/")
    return samples


# pytest collects module-level names starting with "test" from test modules that import them.
test_samples.__test__ = False  # type: ignore[attr-defined]
