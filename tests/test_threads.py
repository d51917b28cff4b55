"""The thread plan: pools sized to the cores the process may use, minus the reserve.

The plan changes process-wide state (torch, OpenCV, SSIM strips, BLAS, environment); the
``restore`` fixture puts all of it back so that the rest of the suite runs as before.
A subprocess checks the real thing: a narrowed affinity mask and the environment set before
torch is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from linescan import ssim, threads
from linescan.threads import SPIN_ENV, ThreadPlan, configure_threads, quota_cores

ENV_KEYS = (
    *SPIN_ENV,
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "OPENCV_FOR_THREADS_NUM",
)


@pytest.fixture(autouse=True)
def restore(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for key in ENV_KEYS:  # monkeypatch records the value and puts it back at teardown
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", tmp_path / "no-cpu.max")
    blas_before = _blas_threads()
    torch_before, cv2_before, ssim_before = (
        torch.get_num_threads(),
        cv2.getNumThreads(),
        ssim.get_workers(),
    )
    yield
    torch.set_num_threads(torch_before)
    cv2.setNumThreads(cv2_before)
    ssim.set_workers(ssim_before)
    if blas_before:
        import threadpoolctl

        threadpoolctl.threadpool_limits(limits=blas_before)


def _blas_threads() -> dict[str, int]:
    try:
        import threadpoolctl
    except ImportError:
        return {}
    return {
        i["prefix"]: i["num_threads"]
        for i in threadpoolctl.threadpool_info()
        if i["user_api"] == "blas"
    }


def _cpus(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(n)))


def test_plan_uses_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpus(monkeypatch, 3)
    plan = configure_threads()
    assert isinstance(plan, ThreadPlan)
    assert plan.cores_affinity == 3
    assert plan.usable == 3
    assert plan.torch_intra == 3
    assert torch.get_num_threads() == 3


def test_reserve_leaves_cores_free(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpus(monkeypatch, 4)
    plan = configure_threads(reserve=1)
    assert plan.usable == 3
    assert torch.get_num_threads() == 3
    plan = configure_threads(total_cores=2, reserve=1)
    assert plan.usable == 1
    assert torch.get_num_threads() == 1


def test_reserve_never_leaves_zero_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpus(monkeypatch, 2)
    plan = configure_threads(reserve=5)
    assert plan.usable == 1
    assert torch.get_num_threads() == 1
    assert any("reserve" in n for n in plan.notes)


def test_total_cores_is_capped_by_the_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpus(monkeypatch, 2)
    plan = configure_threads(total_cores=16)
    assert plan.usable == 2
    assert torch.get_num_threads() == 2
    assert any("asked for 16" in n for n in plan.notes)


def test_cgroup_quota_caps_the_plan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _cpus(monkeypatch, 8)
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs -> 2 whole cores
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", cpu_max)
    plan = configure_threads()
    assert plan.cores_quota == 2
    assert plan.usable == 2
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(
    ("text", "cores"),
    [("max 100000", None), ("200000 100000", 2), ("50000 100000", 1), ("junk", None), ("", None)],
)
def test_quota_parsing(tmp_path: Path, text: str, cores: int | None) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(text)
    assert quota_cores(path) == cores
    assert quota_cores(tmp_path / "missing") is None


def test_daemon_plan_keeps_image_work_single_threaded(monkeypatch: pytest.MonkeyPatch) -> None:
    # The post thread runs beside inference: no second team of image threads.
    _cpus(monkeypatch, 4)
    plan = configure_threads()
    assert (plan.opencv, plan.ssim_workers) == (1, 1)
    assert cv2.getNumThreads() == 1
    assert ssim.get_workers() == 1
    assert plan.torch_interop == torch.get_num_interop_threads()


def test_offline_plan_gives_the_ssim_strips_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpus(monkeypatch, 2)
    plan = configure_threads(pipelined=False)
    assert plan.ssim_workers == 2
    assert ssim.get_workers() == 2
    assert cv2.getNumThreads() == 1  # never nested under the SSIM workers


def test_blas_is_limited_when_threadpoolctl_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpus(monkeypatch, 2)
    plan = configure_threads()
    found = _blas_threads()
    if not found:
        assert plan.blas is None
    else:
        assert plan.blas == 1
        assert set(found.values()) == {1}
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="total_cores"):
        configure_threads(total_cores=0)
    with pytest.raises(ValueError, match="reserve"):
        configure_threads(reserve=-1)


def test_plan_is_plain_data(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpus(monkeypatch, 2)
    d = configure_threads().to_dict()
    assert json.loads(json.dumps(d)) == d
    assert vars(configure_threads())["usable"] == 2  # the daemon logs vars(plan)


def test_ssim_is_identical_for_any_number_of_workers() -> None:
    rng = np.random.default_rng(3)
    x = rng.random((300, 200), dtype=np.float32)
    y = np.clip(x + 0.05 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    ssim.set_workers(1)
    one = ssim.ssim_map(x, y)
    ssim.set_workers(3)
    three = ssim.ssim_map(x, y)
    assert np.array_equal(one, three)


def test_in_a_fresh_process_with_a_narrow_mask() -> None:
    """taskset-like: one CPU allowed; the plan runs before torch is imported, as the daemon."""
    cpu = min(os.sched_getaffinity(0))
    code = f"""
import json, os, sys
os.sched_setaffinity(0, {{{cpu}}})
from linescan.threads import configure_threads
plan = configure_threads()
import torch
print(json.dumps({{"plan": plan.to_dict(), "torch": torch.get_num_threads(),
                  "wait": os.environ.get("OMP_WAIT_POLICY")}}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["plan"]["cores_affinity"] == 1
    assert got["plan"]["torch_intra"] == 1
    assert got["torch"] == 1
    assert got["plan"]["spin_controls"] is True
    assert got["wait"] == "PASSIVE"


# --------------------------------------------------------------------------- the SSIM fast path
# What the strip-parallel SSIM promises beyond tests/test_ssim.py: the thread plan may hand it
# any number of workers, and the daemon computes it on bands of rows.


def _skimage_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from skimage.metrics import structural_similarity

    return structural_similarity(
        x.astype(np.float64),
        y.astype(np.float64),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        full=True,
    )[1]


@pytest.mark.parametrize("level", [0.0, 0.02, 0.5, 0.98, 1.0])
def test_ssim_of_nearly_flat_webs_matches_skimage_including_the_border(level: float) -> None:
    # Dark or bright, almost featureless webs: the variances are differences of nearly equal
    # numbers. Five float32 moments missed skimage by 1.5e-4 here; the four-blur form does not.
    rng = np.random.default_rng(int(level * 100))
    x = np.clip(level + 0.001 * rng.standard_normal((64, 80)), 0, 1).astype(np.float32)
    y = np.clip(level + 0.001 * rng.standard_normal((64, 80)), 0, 1).astype(np.float32)
    np.testing.assert_allclose(ssim.ssim_map(x, y), _skimage_map(x, y), rtol=0, atol=1e-4)


def test_dssim_is_one_minus_ssim_bit_for_bit() -> None:
    rng = np.random.default_rng(5)
    x = rng.random((150, 97), dtype=np.float32)
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    assert np.array_equal(ssim.dssim_map(x, y), np.float32(1.0) - ssim.ssim_map(x, y))


def test_ssim_rows_do_not_depend_on_the_strip_or_band_they_fall_in() -> None:
    rng = np.random.default_rng(6)
    h, w = 230, 61  # several strips (at least 32 rows each), a ragged last one
    x = rng.random((h, w), dtype=np.float32)
    y = np.clip(x + 0.05 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    whole = ssim.ssim_map(x, y)
    r = ssim.SSIMParams().radius
    for a, b in [(0, 1), (3, 40), (31, 33), (64, 130), (200, 230), (225, 230)]:
        lo, hi = max(0, a - r), min(h, b + r)
        band = ssim.ssim_map(x[lo:hi], y[lo:hi])[a - lo : b - lo]
        assert np.array_equal(band, whole[a:b]), (a, b)
