"""One deliberate thread plan for the whole process: torch, OpenCV, our SSIM strips, BLAS.

Why: an inspection PC runs other processes, and every numeric library here starts its own
pool sized to "all cores" by default: torch's OpenMP team, OpenCV's pthreads pool, two
OpenBLAS builds (numpy's and OpenCV's). Left alone they oversubscribe the cores, and OpenMP
workers that spin while waiting for a preempted team-mate turn a 5 ms batch-1 forward into
450 ms when another process keeps one core busy. :func:`configure_threads` sizes every pool
from the cores this process may really use and makes waiting threads sleep instead of spin.

The plan (``usable`` = cores allowed by affinity and the cgroup quota, capped by
``total_cores``, minus ``reserve``):

* torch intra-op = ``usable``: the model is the bulk of the work and the critical path.
* torch inter-op = 1: the network is one chain of layers; nothing runs side by side.
* OpenCV = 1 and SSIM strips = 1 when ``pipelined`` (the daemon): the post thread (stitch,
  residual, segmentation, about a tenth of the model's time) runs while inference runs, so a
  second team of image threads would only fight torch's team for the same cores. For
  sequential work (offline inspection, the benchmark: model, then residual) the SSIM strips
  get ``usable`` threads instead; OpenCV stays at 1 so that the two pools never nest.
* BLAS (OpenBLAS, via threadpoolctl when it is installed) = 1: nothing hot here calls BLAS,
  and its threads busy-wait.

Spinning controls, set in the environment: ``OMP_WAIT_POLICY=PASSIVE`` and
``GOMP_SPINCOUNT=0`` (GNU OpenMP, which torch's wheels ship), ``KMP_BLOCKTIME=0`` (Intel
OpenMP builds), ``OPENCV_THREAD_POOL_ACTIVE_WAIT_*=0`` (OpenCV's pool). These are read once,
when the library is loaded, so **they only take effect if this runs before ``import torch``
and ``import cv2``**: the daemon's entry point calls :func:`configure_threads` first, before it
imports anything that imports torch. A value the operator already put in the environment is
kept. ``ThreadPlan.spin_controls`` says whether they were in time. Thread counts, by contrast,
are set through the libraries' APIs and work at any time.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
"""cgroup v2 CPU quota ("max 100000" or "<quota> <period>"); absent outside cgroup v2."""

SPIN_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "GOMP_SPINCOUNT": "0",
    "KMP_BLOCKTIME": "0",
    "OPENCV_THREAD_POOL_ACTIVE_WAIT_PAUSE_LIMIT": "0",
    "OPENCV_THREAD_POOL_ACTIVE_WAIT_WORKER": "0",
    "OPENCV_THREAD_POOL_ACTIVE_WAIT_MAIN": "0",
}


@dataclass(frozen=True)
class ThreadPlan:
    """What :func:`configure_threads` decided and did; the daemon logs it at start-up."""

    cores_affinity: int  # CPUs in this process's affinity mask (taskset, cpuset cgroup)
    cores_quota: int | None  # ceil(cgroup cpu.max quota / period); None when unlimited
    cores_requested: int | None  # total_cores as given
    reserve: int
    usable: int  # cores the plan fills
    pipelined: bool
    torch_intra: int
    torch_interop: int  # what torch reports after the attempt to set it
    opencv: int
    ssim_workers: int
    blas: int | None  # OpenBLAS threads set through threadpoolctl; None when not installed
    spin_controls: bool  # the wait-policy variables were set before torch/cv2 were loaded
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


def affinity_cores() -> int:
    """CPUs this process may run on: its affinity mask, which taskset and cpusets shrink."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def quota_cores(path: Path | None = None) -> int | None:
    """Whole cores of the cgroup v2 CPU quota (rounded up), or None when there is none.

    A container limited to 1.5 CPUs still sees every core in its affinity mask; sizing pools
    to the mask there means throttling, with OpenMP teams stalled mid-barrier.
    """
    try:
        fields = (path or CGROUP_CPU_MAX).read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def _set_spin_env() -> bool:
    """Put the wait-policy variables in the environment; True when still in time."""
    in_time = "torch" not in sys.modules and "cv2" not in sys.modules
    for key, value in SPIN_ENV.items():
        os.environ.setdefault(key, value)
    return in_time


def configure_threads(
    total_cores: int | None = None, reserve: int = 0, *, pipelined: bool = True
) -> ThreadPlan:
    """Size every thread pool of the process to the cores it may use, and return the plan.

    ``total_cores``: the most cores to use (the config's ``engine.threads``); None for all that
    the affinity mask and cgroup quota allow. ``reserve``: cores to leave to other processes
    on the machine. ``pipelined``: the daemon's layout, where post-processing runs alongside
    inference (see the module docstring). Call it once, as early as possible.
    """
    if total_cores is not None and total_cores < 1:
        raise ValueError(f"total_cores must be >= 1, got {total_cores}")
    if reserve < 0:
        raise ValueError(f"reserve must be >= 0, got {reserve}")
    notes: list[str] = []
    spin = _set_spin_env()
    if not spin:
        notes.append(
            "torch or cv2 was imported before configure_threads: the wait-policy variables "
            "apply only to child processes"
        )
    aff = affinity_cores()
    quota = quota_cores()
    allowed = aff if quota is None else min(aff, quota)
    total = allowed if total_cores is None else min(total_cores, allowed)
    if total_cores is not None and total_cores > allowed:
        notes.append(f"asked for {total_cores} cores, {allowed} allowed: using {allowed}")
    usable = total - reserve
    if usable < 1:
        notes.append(f"reserve {reserve} leaves no core of {total}: using 1")
        usable = 1
    intra = usable
    ssim_workers = 1 if pipelined else usable
    opencv = 1
    blas = 1

    # Environment first, for libraries not loaded yet and for child processes.
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[key] = str(intra)
    for key in ("OPENBLAS_NUM_THREADS", "OPENCV_FOR_THREADS_NUM"):
        os.environ[key] = str(blas if key.startswith("OPENBLAS") else opencv)

    import cv2
    import torch

    from linescan import ssim

    torch.set_num_threads(intra)
    try:
        if torch.get_num_interop_threads() != 1:
            torch.set_num_interop_threads(1)
    except RuntimeError:
        notes.append(
            "torch inter-op threads were fixed before configure_threads ran "
            f"({torch.get_num_interop_threads()})"
        )
    cv2.setNumThreads(opencv)
    ssim.set_workers(ssim_workers)
    blas_set = _limit_blas(blas, notes)
    return ThreadPlan(
        cores_affinity=aff,
        cores_quota=quota,
        cores_requested=total_cores,
        reserve=reserve,
        usable=usable,
        pipelined=pipelined,
        torch_intra=torch.get_num_threads(),
        torch_interop=torch.get_num_interop_threads(),
        opencv=cv2.getNumThreads(),
        ssim_workers=ssim.get_workers(),
        blas=blas_set,
        spin_controls=spin,
        notes=tuple(notes),
    )


def _limit_blas(n: int, notes: list[str]) -> int | None:
    """Limit every loaded OpenBLAS to ``n`` threads; threadpoolctl is optional.

    threadpoolctl comes with scikit-learn, not with linescan: without it, the
    ``OPENBLAS_NUM_THREADS`` variable set above still covers BLAS libraries loaded later.
    """
    try:
        # by name: an optional, untyped package that mypy may or may not find
        threadpoolctl = importlib.import_module("threadpoolctl")
    except ImportError:
        notes.append("threadpoolctl not installed: BLAS threads only set through the environment")
        return None
    threadpoolctl.threadpool_limits(limits=n, user_api="blas")
    return n
