"""Tests of linescan.data: image I/O, dataset layouts and the synthetic generators.

Every dataset here is made in tmp_path: the suite must not depend on downloaded data.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linescan.data import images
from linescan.data.images import read_grey, read_mask, training_images, write_grey
from linescan.data.synthetic import (
    DEFECT_KINDS,
    Defect,
    WovenWeb,
    checkerboard,
    plant_defects,
    random_defects,
    toy_test_image,
    toy_test_scene,
    toy_train_images,
    write_synthetic_dataset,
)
from linescan.errors import DataError

# ------------------------------------------------------------------------------- image I/O


@pytest.mark.parametrize(
    ("dtype", "suffix"),
    [(np.uint8, ".png"), (np.uint8, ".bmp"), (np.uint16, ".png"), (np.uint16, ".tif")],
)
def test_round_trip_keeps_depth_and_values(tmp_path: Path, dtype: type, suffix: str) -> None:
    """8- and 16-bit grey images read back with their dtype and exact values."""
    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max
    img = rng.integers(0, top + 1, size=(17, 23)).astype(dtype)
    img[0, 0], img[0, 1] = 0, top  # the extremes survive
    path = tmp_path / "sub" / "dir" / f"img{suffix}"
    write_grey(path, img)
    back = read_grey(path)
    assert back.dtype == dtype
    assert back.flags.c_contiguous
    np.testing.assert_array_equal(back, img)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("channels", [3, 4])
def test_colour_is_converted_to_grey_at_same_depth(
    tmp_path: Path, dtype: type, channels: int
) -> None:
    """BGR and BGRA files become 2-D grey of the same dtype, as cv2's BGR2GRAY computes it."""
    rng = np.random.default_rng(1)
    colour = rng.integers(0, np.iinfo(dtype).max + 1, size=(9, 11, channels)).astype(dtype)
    path = tmp_path / "colour.png"
    assert cv2.imwrite(str(path), colour)
    grey = read_grey(path)
    code = cv2.COLOR_BGR2GRAY if channels == 3 else cv2.COLOR_BGRA2GRAY
    assert grey.ndim == 2
    assert grey.dtype == dtype
    np.testing.assert_array_equal(grey, cv2.cvtColor(colour, code))


def test_missing_file_raises_data_error_naming_it(tmp_path: Path) -> None:
    """A missing file is a DataError whose message names the file."""
    path = tmp_path / "nope.png"
    with pytest.raises(DataError, match=r"nope\.png"):
        read_grey(path)


def test_corrupt_file_raises_data_error_naming_it(tmp_path: Path) -> None:
    """A file that is not a decodable image is a DataError naming the file."""
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(DataError, match=r"broken\.png.*decoded"):
        read_grey(path)


def test_float_image_is_refused(tmp_path: Path) -> None:
    """A float TIFF is refused (not silently rescaled), naming the file and the sample type."""
    path = tmp_path / "float.tiff"
    assert cv2.imwrite(str(path), np.full((4, 5), 0.5, np.float32))
    with pytest.raises(DataError, match=r"float\.tiff.*float32"):
        read_grey(path)


def test_write_refuses_16_bit_to_an_8_bit_format(tmp_path: Path) -> None:
    """Writing uint16 to JPEG would saturate silently, so it is a DataError instead."""
    with pytest.raises(DataError, match=r"x\.jpg.*16-bit"):
        write_grey(tmp_path / "x.jpg", np.full((4, 4), 1000, np.uint16))


def test_read_mask_is_nonzero(tmp_path: Path) -> None:
    """Any nonzero mask pixel is defect, zero is good."""
    m = np.array([[0, 1, 128], [255, 0, 0]], np.uint8)
    write_grey(tmp_path / "m.png", m)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), m != 0)


# ------------------------------------------------------------------------- dataset layouts


def _blank(path: Path, value: int = 0) -> None:
    write_grey(path, np.full((8, 8), value, np.uint8))


def test_training_images_mvtec_layout(tmp_path: Path) -> None:
    """With train/good present, its images are returned sorted and the root's are ignored."""
    for name in ("b.png", "a.png", "c.tif"):
        _blank(tmp_path / "train" / "good" / name)
    _blank(tmp_path / "stray.png")
    (tmp_path / "train" / "good" / "notes.txt").write_text("not an image")
    found = training_images(tmp_path)
    assert [p.name for p in found] == ["a.png", "b.png", "c.tif"]


def test_training_images_plain_folder(tmp_path: Path) -> None:
    """Without train/good, the images directly in the folder are used (case-insensitive suffix)."""
    for name in ("2.PNG", "1.jpg", "._1.png"):
        _blank(tmp_path / name)
    (tmp_path / "readme.md").write_text("x")
    assert [p.name for p in training_images(tmp_path)] == ["1.jpg", "2.PNG"]


def test_training_images_none_names_both_layouts(tmp_path: Path) -> None:
    """No images: the DataError names the folder and both layouts tried."""
    with pytest.raises(DataError) as info:
        training_images(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg
    assert "train" in msg
    assert "MVTec" in msg
    assert "plain" in msg


def test_test_samples_pairs_masks(tmp_path: Path) -> None:
    """Masks are paired by stem under both naming conventions; good images have none."""
    for name in ("001.png", "000.png"):
        _blank(tmp_path / "test" / "good" / name)
        _blank(tmp_path / "test" / "scratch" / name, 10)
        _blank(tmp_path / "ground_truth" / "scratch" / name.replace(".png", "_mask.png"), 255)
    _blank(tmp_path / "test" / "hole" / "x.png", 20)
    _blank(tmp_path / "ground_truth" / "hole" / "x.png", 255)  # same-name convention
    samples = images.test_samples(tmp_path)
    got = [(s.defect_type, s.image.name, s.mask.name if s.mask else None) for s in samples]
    assert got == [
        ("good", "000.png", None),
        ("good", "001.png", None),
        ("hole", "x.png", "x.png"),
        ("scratch", "000.png", "000_mask.png"),
        ("scratch", "001.png", "001_mask.png"),
    ]
    assert all(s.mask is None or s.mask.parent.parent.name == "ground_truth" for s in samples)


def test_test_samples_missing_mask_names_image(tmp_path: Path) -> None:
    """A defect image without a mask is a DataError naming the image."""
    _blank(tmp_path / "test" / "crack" / "007.png")
    (tmp_path / "ground_truth" / "crack").mkdir(parents=True)
    with pytest.raises(DataError, match=r"007\.png.*mask"):
        images.test_samples(tmp_path)


# ---------------------------------------------------------------------- toy (paper, Fig. 3)


def test_checkerboard_levels_and_edges() -> None:
    """A checkerboard is two levels ~40/~215 with only thin anti-aliased edges between them."""
    img = checkerboard(96, 16.0, 30.0, (3.0, 5.0), None)
    assert img.dtype == np.uint8
    assert img.shape == (96, 96)
    dark, bright = (img <= 45).mean(), (img >= 210).mean()
    assert 0.35 < dark < 0.65
    assert 0.35 < bright < 0.65
    assert dark + bright > 0.8  # edges are a small fraction


def test_toy_test_mask_covers_the_strokes() -> None:
    """Every painted pixel is in the mask, the mask is painted grey, and nothing else changed."""
    for seed in range(5):
        scene = toy_test_scene(128, seed)
        changed = scene.image != scene.clean
        assert not (changed & ~scene.mask).any()
        assert changed.sum() >= 0.9 * scene.mask.sum()
        assert 0.005 < scene.mask.mean() < 0.25
        grey = scene.image[scene.mask].astype(int)
        assert grey.min() >= 100
        assert grey.max() <= 156
        image, mask = toy_test_image(128, seed)
        np.testing.assert_array_equal(image, scene.image)
        np.testing.assert_array_equal(mask, scene.mask)


def test_generators_are_deterministic_for_a_seed() -> None:
    """Same seed, same pixels; another seed, other pixels."""
    a, b, c = (toy_train_images(3, 64, s) for s in (7, 7, 8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    np.testing.assert_array_equal(toy_test_image(64, 3)[0], toy_test_image(64, 3)[0])
    np.testing.assert_array_equal(WovenWeb(40, 1).lines(5, 30), WovenWeb(40, 1).lines(5, 30))
    assert not np.array_equal(WovenWeb(40, 1).lines(5, 30), WovenWeb(40, 2).lines(5, 30))
    r1 = random_defects(np.random.default_rng(4), 200, 0, 2000, 5)
    r2 = random_defects(np.random.default_rng(4), 200, 0, 2000, 5)
    assert r1 == r2


# ------------------------------------------------------------------------------ woven web


def test_woven_web_grey_level_and_texture() -> None:
    """The web is mid-grey (~120) with moderate texture contrast, not flat and not saturated."""
    img = WovenWeb(256, 0).lines(1000, 256)
    assert img.shape == (256, 256)
    assert img.dtype == np.uint8
    assert 110 < img.mean() < 130
    assert 10 < img.std() < 35
    assert img.min() > 0
    assert img.max() < 255
    # Periodic weave: an 8 px shift along either axis matches far better than a 4 px shift
    # (plain weave repeats every 2 threads = 16 px, half-repeat swaps warp and weft).
    f = img.astype(float)
    assert np.abs(f[:, 16:] - f[:, :-16]).mean() < 0.5 * np.abs(f[:, 4:] - f[:, :-4]).mean()
    assert np.abs(f[16:] - f[:-16]).mean() < 0.5 * np.abs(f[4:] - f[:-4]).mean()


_WIDTH = 48

_defects = st.lists(
    st.builds(
        Defect,
        kind=st.sampled_from(DEFECT_KINDS),
        line=st.integers(0, 299),
        x=st.integers(0, _WIDTH - 1),  # may run over the right edge: drawn clipped
        height=st.integers(1, 40),
        width=st.integers(1, 40),
    ),
    max_size=5,
)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    start=st.integers(0, 10**9),
    cuts=st.sets(st.integers(1, 299), max_size=8),
    defects=_defects,
)
def test_split_rendering_is_bit_exact(
    seed: int, start: int, cuts: set[int], defects: list[Defect]
) -> None:
    """Lines + defects rendered in any split of [start, start + N) equal one whole render."""
    n = 300
    web = WovenWeb(_WIDTH, seed)
    shifted = [
        Defect(d.kind, d.line + start, d.x, d.height, d.width) for d in defects
    ]  # defects at the same place relative to the stretch, so they are on it
    whole = web.lines(start, n)
    whole_mask = plant_defects(whole, start, shifted)
    bounds = [0, *sorted(cuts), n]
    blocks, masks = [], []
    for a, b in itertools.pairwise(bounds):
        block = web.lines(start + a, b - a)
        masks.append(plant_defects(block, start + a, shifted))
        blocks.append(block)
    np.testing.assert_array_equal(np.concatenate(blocks), whole)
    np.testing.assert_array_equal(np.concatenate(masks), whole_mask)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_changes_masked_pixels_only(kind: str) -> None:
    """A planted defect visibly changes every masked pixel and nothing outside its box."""
    web = WovenWeb(96, 5)
    clean = web.lines(100, 80)
    d = Defect(kind, line=130, x=30, height=4, width=30) if kind == "broken_thread" else None
    d = d or Defect(kind, line=120, x=30, height=24, width=18)
    img = clean.copy()
    mask = plant_defects(img, 100, [d])
    box = np.zeros_like(mask)
    box[d.line - 100 : d.line_end - 100, d.x : d.x_end] = True
    diff = np.abs(img.astype(int) - clean.astype(int))
    assert mask.sum() >= 0.4 * d.height * d.width
    assert not (mask & ~box).any()
    assert (diff[~box] == 0).all()
    assert diff[mask].min() >= 15
    assert diff[mask].mean() >= 25


def test_random_defects_are_apart_and_inside() -> None:
    """Random defects lie in range, inside the width, sorted, at least 2*max_size lines apart."""
    rng = np.random.default_rng(11)
    for _ in range(20):
        ds = random_defects(rng, 120, 500, 1500, 4, min_size=6, max_size=30)
        assert len(ds) == 4
        for d in ds:
            assert d.line >= 500
            assert d.line_end <= 1500
            assert d.x >= 0
            assert d.x_end <= 120
            assert max(d.height, d.width) <= 30
        for a, b in itertools.pairwise(ds):
            assert b.line - a.line_end >= 60
    with pytest.raises(ValueError, match="do not fit"):
        random_defects(rng, 120, 0, 200, 4, max_size=30)


# -------------------------------------------------------------------- datasets on disk


@pytest.mark.parametrize(("kind", "size"), [("toy", (64, 64)), ("woven", (96, 128))])
def test_synthetic_dataset_round_trips(
    tmp_path: Path, kind: Literal["toy", "woven"], size: tuple[int, int]
) -> None:
    """A written synthetic dataset reads back through training_images and test_samples."""
    root = write_synthetic_dataset(
        tmp_path / "ds",
        kind,
        n_train=3,
        n_test_good=2,
        n_test_defect=2,
        size=size,
        seed=9,
    )
    train = training_images(root)
    assert len(train) == 3
    assert all(read_grey(p).shape == size for p in train)
    samples = images.test_samples(root)
    assert [s.defect_type for s in samples] == ["defect", "defect", "good", "good"]
    for s in samples:
        img = read_grey(s.image)
        assert img.shape == size
        if s.mask is not None:
            mask = read_mask(s.mask)
            assert mask.shape == size
            assert mask.any()
    with pytest.raises(DataError, match="not an empty folder"):
        write_synthetic_dataset(root, "toy", 1, 0, 0, (8, 8), 0)
