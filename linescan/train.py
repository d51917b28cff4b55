"""Training: random crops of defect-free images, Adam, the paper's recipe by default.

The paper (section 4.2): 10,000 patches of 128x128 cropped at random positions from the
defect-free images, first down-scaled to 256x256; 200 epochs of Adam with learning rate 2e-4 and
weight decay 1e-5. Every number is a flag. For a line-scan web, a fixed 256x256 resize would
crush the aspect ratio (AITEX images are 4096x256): ``downscale`` keeps it (a block factor n).

The crop positions are drawn once from the seed (the paper's fixed set of 10,000 patches) and
reshuffled every epoch from (seed, epoch), so a run resumed from a checkpoint continues exactly
as it would have without the interruption. Checkpoints hold tensors and numbers only
(``torch.load(weights_only=True)`` reads them).

When to stop. The paper trains 200 epochs; on a 2-core CPU that is hours, and a fixed small
number stops while the loss still falls (AITEX: pixel AUROC 0.870 after 12 epochs, 0.946 after
36). So ``epochs`` is a maximum: after every epoch the loss on held-out crops (from the images
kept out for calibration, or fresh crops of the training images when there are none) is
measured, and training stops once it has not improved by ``min_improvement`` (relative) for
``patience`` epochs, or when ``time_budget_s`` is spent. The weights of the best held-out loss
are kept. The progress line and the final line say which of these ended the run.

At the end, the score statistics (``score.py``) are learned from the training images with the
final weights and stored in the bundle, so every trained bundle scores the web normalised by
column, edge and row; ``linescan train`` then calibrates the threshold on the held-out images.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 - the universal alias
from torch import nn

from linescan.backends.torch_cpu import cpu_has_native_bf16
from linescan.data.images import read_grey, training_images
from linescan.errors import DataError, ModelError
from linescan.model.autoencoder import FeatureExtractor, VariationalAutoencoder
from linescan.model.bundle import BundleMeta, Loss, build_module, save_bundle, sha256_file
from linescan.preprocess import InputSpec
from linescan.residual import ResidualKind
from linescan.ssim import SSIMParams, ssim_torch

F32 = npt.NDArray[np.float32]
CHECKPOINT = "checkpoints/last.pt"


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    out: Path
    loss: Loss = "ssim"
    latent: int = 100
    patch: int = 128  # 0: chosen from the images (``choose_patch``)
    patches: int = 10_000
    epochs: int = 200
    batch: int = 64
    lr: float = 2e-4
    weight_decay: float = 1e-5
    input: InputSpec = field(default_factory=lambda: InputSpec(resize=(256, 256)))
    bit_depth: int | None = None  # None: from the images' dtype
    ssim: SSIMParams = field(default_factory=SSIMParams)
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"  # auto | fp32 | bf16
    checkpoint_every: int = 10
    resume: bool = False
    patience: int = 5  # epochs without held-out improvement before stopping (0: never stop early)
    min_improvement: float = 0.01  # relative improvement of the held-out loss that counts
    time_budget_s: float | None = None
    opening_px: int | None = 4  # opening diameter in camera pixels; None: the paper's 4 model px
    statistics: bool = True  # learn the score statistics at the end
    holdout: float = 0.1  # fraction of images kept out of training for calibration
    fm_weights: Path | None = None
    fm_lambda: float = 1.0
    name: str | None = None
    command: str = ""


@dataclass(frozen=True)
class TrainResult:
    bundle: Path
    meta: BundleMeta
    final_loss: float
    seconds: float
    holdout_images: list[Path]
    epochs: int = 0  # epochs trained
    best_epoch: int = 0  # the epoch whose weights were kept
    stopped: str = ""  # why training ended


def default_residual(loss: Loss) -> ResidualKind:
    return {"ssim": "ssim", "l2": "l2", "fm": "l2", "vae": "vae"}[loss]  # type: ignore[return-value]


# --------------------------------------------------------------------------- data


PATCHES = (128, 64, 32)


def choose_patch(images: Sequence[F32]) -> int:
    """The paper's 128, or the largest smaller patch at most half the images' smaller side.

    A patch as tall as the images puts every crop at the same height: the model then learns
    the texture at one vertical phase only and reconstructs a web (or an image) that starts at
    another badly, worst at the tiles' borders (AITEX at 1/2 scale: 128 rows, every crop at
    y = 0). With at least two patches per side, crops see every phase.
    """
    side = min(min(x.shape) for x in images)
    for p in PATCHES:
        if side >= 2 * p:
            return p
    for p in (*PATCHES, 16):
        if side >= p:
            return p
    raise DataError(f"images of {side} px at the model's scale are smaller than a 16-px patch")


def load_images(paths: Sequence[Path], spec: InputSpec, patch: int) -> list[F32]:
    """Model-scale float images; every image must hold at least one patch."""
    out = []
    for p in paths:
        img = read_grey(p)
        x = spec.to_model(img)
        if x.shape[0] < patch or x.shape[1] < patch:
            raise DataError(
                f"{p}: {img.shape[1]}x{img.shape[0]} px is {x.shape[1]}x{x.shape[0]} at the "
                f"model's scale, smaller than one {patch}x{patch} patch; use a smaller --patch "
                "or less down-scaling"
            )
        out.append(x)
    return out


def infer_bit_depth(paths: Sequence[Path]) -> int:
    dtypes = {read_grey(p).dtype for p in paths[: min(len(paths), 8)]}
    if len(dtypes) > 1:
        raise DataError(f"training images mix bit depths ({sorted(map(str, dtypes))})")
    return 16 if np.dtype(next(iter(dtypes))) == np.uint16 else 8


def trained_on(training: dict[str, Any], paths: Sequence[Path]) -> list[bool]:
    """Which of ``paths`` the model was trained on (its bundle's ``training`` record).

    By content (``images_sha256``); for bundles from before that was recorded, by repeating
    the hold-out split of the recorded training folder (the same seed and share).
    """
    shas = training.get("images_sha256")
    if isinstance(shas, list):
        known = set(shas)
        return [sha256_file(p) in known for p in paths]
    data = training.get("data")
    if not isinstance(data, str) or not Path(data).is_dir():
        return [False] * len(paths)
    try:
        all_paths = training_images(Path(data))
    except DataError:
        return [False] * len(paths)
    fraction = float(training.get("holdout", 0.1))
    train_paths, hold = split_holdout(all_paths, fraction, int(training.get("seed", 0)))
    if len(hold) != int(training.get("holdout_images", len(hold))):
        return [False] * len(paths)
    seen = {p.resolve() for p in train_paths}
    return [Path(p).resolve() in seen for p in paths]


def split_holdout(paths: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Keep some defect-free images out of training to calibrate the threshold on unseen data."""
    n_hold = int(len(paths) * fraction) if len(paths) >= 5 else 0
    if fraction > 0 and len(paths) >= 5:
        n_hold = max(1, n_hold)
    if n_hold == 0:
        return paths, []
    rng = np.random.default_rng(seed + 7919)
    idx = rng.permutation(len(paths))
    hold = sorted(paths[i] for i in idx[:n_hold])
    train = sorted(paths[i] for i in idx[n_hold:])
    return train, hold


def crop_positions(
    images: Sequence[F32], count: int, patch: int, seed: int
) -> npt.NDArray[np.int64]:
    """(count, 3) rows of (image, y, x): images drawn in proportion to their crop positions."""
    rng = np.random.default_rng(seed)
    sizes = np.array(
        [(x.shape[0] - patch + 1) * (x.shape[1] - patch + 1) for x in images], dtype=np.float64
    )
    which = rng.choice(len(images), size=count, p=sizes / sizes.sum())
    ys = np.array([rng.integers(0, images[i].shape[0] - patch + 1) for i in which])
    xs = np.array([rng.integers(0, images[i].shape[1] - patch + 1) for i in which])
    return np.stack([which, ys, xs], axis=1).astype(np.int64)


def gather(images: Sequence[F32], pos: npt.NDArray[np.int64], patch: int) -> torch.Tensor:
    out = np.empty((len(pos), 1, patch, patch), dtype=np.float32)
    for k, (i, y, x) in enumerate(pos):
        out[k, 0] = images[int(i)][y : y + patch, x : x + patch]
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- losses


def load_feature_extractor(path: Path) -> FeatureExtractor:
    """AlexNet's first three conv layers from a user-given weights file (never downloaded)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable files
        raise ModelError(f"feature-extractor weights {path}: cannot read: {exc}") from exc
    if not isinstance(state, dict):
        raise ModelError(f"feature-extractor weights {path}: not a state_dict")
    aliases = {"features.0": "conv1", "features.3": "conv2", "features.6": "conv3"}
    mapped: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        for src, dst in aliases.items():
            if k.startswith(src + "."):
                k = dst + k[len(src) :]
        if k.split(".")[0] in ("conv1", "conv2", "conv3"):
            mapped[k] = v
    fe = FeatureExtractor()
    try:
        fe.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"feature-extractor weights {path} do not hold AlexNet conv1-conv3: {exc}"
        ) from exc
    fe.eval()
    for p in fe.parameters():
        p.requires_grad_(False)
    return fe


LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def make_loss(cfg: TrainConfig, amp: bool) -> LossFn:
    ssim_params = cfg.ssim

    def forward(model: nn.Module, x: torch.Tensor) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return model(x)

    if cfg.loss == "ssim":

        def ssim_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
            y = forward(model, x).float()
            return 1.0 - ssim_torch(x, y, ssim_params).mean()

        return ssim_loss
    if cfg.loss == "l2":

        def l2_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(forward(model, x).float(), x)

        return l2_loss
    if cfg.loss == "vae":

        def vae_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
            out = forward(model, x)
            rec = out.reconstruction.float()
            mu, logvar = out.mu.float(), out.logvar.float()
            n_px = x[0].numel()
            # Gaussian decoder: per-pixel squared error, KL spread over the pixels so both
            # terms are per-pixel quantities of comparable scale.
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1).mean() / n_px
            return F.mse_loss(rec, x) + 0.01 * kl

        return vae_loss
    if cfg.loss == "fm":
        if cfg.fm_weights is None:
            raise ModelError(
                "--loss fm needs --fm-weights FILE: AlexNet conv1-conv3 weights (a state_dict "
                "saved with torch.save); pretrained weights cannot be downloaded by linescan"
            )
        fe = load_feature_extractor(cfg.fm_weights)
        lam = cfg.fm_lambda

        def fm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
            y = forward(model, x).float()
            return F.mse_loss(y, x) + lam * F.mse_loss(fe(y), fe(x))

        return fm_loss
    raise ModelError(f"unknown loss {cfg.loss!r}")


# --------------------------------------------------------------------------- progress


class Progress:
    """One status line on stderr: epoch, batch, loss, speed, ETA. Plain lines when not a TTY."""

    def __init__(self, total_steps: int, stream: TextIO = sys.stderr) -> None:
        self.total = total_steps
        self.stream = stream
        self.t0 = time.monotonic()
        self.done0 = 0
        self.tty = stream.isatty()
        self._last = 0.0

    def start_at(self, done: int) -> None:
        self.done0 = done

    def update(
        self,
        done: int,
        epoch: int,
        epochs: int,
        loss: float,
        final: bool = False,
        held_out: str = "",
    ) -> None:
        now = time.monotonic()
        if not final and now - self._last < (0.2 if self.tty else 10.0):
            return
        self._last = now
        rate = (done - self.done0) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        pct = 100.0 * done / max(self.total, 1)
        bar_w = 24
        filled = int(bar_w * done / max(self.total, 1))
        bar = "#" * filled + "." * (bar_w - filled)
        msg = (
            f"epoch {epoch}/{epochs} [{bar}] {pct:5.1f}% loss {loss:.5f}{held_out} "
            f"{rate:.1f} batch/s ETA {_fmt_s(eta)}"
        )
        if self.tty:
            self.stream.write("\r" + msg + ("\n" if final else ""))
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()


def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "--:--"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


# --------------------------------------------------------------------------- loop


def train(cfg: TrainConfig, log: TextIO = sys.stderr) -> TrainResult:
    t_start = time.monotonic()
    if cfg.device != "cpu" and not torch.cuda.is_available():
        raise ModelError(f"--device {cfg.device}: CUDA is not available on this machine")
    paths = training_images(cfg.data)
    train_paths, hold = split_holdout(paths, cfg.holdout, cfg.seed)
    bit_depth = cfg.bit_depth or infer_bit_depth(train_paths)
    spec = replace(cfg.input, bit_depth=bit_depth)
    images = load_images(train_paths, spec, cfg.patch or 16)
    if not cfg.patch:
        chosen = choose_patch(images)
        log.write(
            f"patch {chosen} (the images are {min(min(x.shape) for x in images)} px on their "
            "smaller side at the model's scale; --patch to choose)\n"
        )
        cfg = replace(cfg, patch=chosen)
    pos = crop_positions(images, cfg.patches, cfg.patch, cfg.seed)

    torch.manual_seed(cfg.seed)
    meta = BundleMeta(
        loss=cfg.loss,
        latent=cfg.latent,
        patch=cfg.patch,
        residual=default_residual(cfg.loss),
        ssim=cfg.ssim,
        input=spec,
        name=cfg.name or cfg.out.name,
        stride=min(30, cfg.patch),  # the paper's 30, or one tile for patches smaller than that
    )
    model = build_module(meta).to(cfg.device)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = cfg.device == "cpu" and (
        cfg.precision == "bf16" or (cfg.precision == "auto" and cpu_has_native_bf16())
    )
    loss_fn = make_loss(cfg, amp)

    start_epoch = 0
    epoch_loss = float("nan")
    stop = _Stopping(cfg.patience, cfg.min_improvement)
    ckpt = cfg.out / CHECKPOINT
    if cfg.resume:
        if not ckpt.is_file():
            raise ModelError(f"--resume: no checkpoint at {ckpt}")
        state = torch.load(ckpt, map_location=cfg.device, weights_only=True)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ModelError(
                f"--resume: the checkpoint at {ckpt} holds a different network than "
                f"d={cfg.latent}, patch {cfg.patch}: pass the --latent and --patch it was "
                f"trained with ({str(exc).splitlines()[0]})"
            ) from exc
        opt.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        epoch_loss = float(state.get("loss", float("nan")))
        stop.restore(state)
        log.write(f"resumed from {ckpt} after epoch {start_epoch}\n")

    # Held-out crops: from the calibration images when there are some (never trained on),
    # else other crops of the training images.
    val_images = load_images(hold, spec, cfg.patch) if hold else images
    n_val = min(1024, max(256, cfg.patches // 10))
    val_pos = crop_positions(val_images, n_val, cfg.patch, cfg.seed + 104_729)
    val_x = gather(val_images, val_pos, cfg.patch)

    steps_per_epoch = math.ceil(cfg.patches / cfg.batch)
    progress = Progress(cfg.epochs * steps_per_epoch, log)
    progress.start_at(start_epoch * steps_per_epoch)
    early = (
        f"until the held-out loss stops improving by {100 * cfg.min_improvement:g} % for "
        f"{cfg.patience} epochs, at most {cfg.epochs} epochs"
        if cfg.patience > 0
        else f"{cfg.epochs} epochs"
    )
    if cfg.time_budget_s is not None:
        early += f" or {_fmt_s(cfg.time_budget_s)}"
    log.write(
        f"training {cfg.loss} autoencoder d={cfg.latent} patch={cfg.patch} on "
        f"{len(images)} images ({len(hold)} held out for calibration), {cfg.patches} crops, "
        f"{early}, {'bf16' if amp else 'fp32'}, {torch.get_num_threads()} threads\n"
    )
    model.train()
    epoch = start_epoch
    stopped = f"the maximum of {cfg.epochs} epochs"
    if stop.done:
        stopped = stop.reason
    while epoch < cfg.epochs and not stop.done:
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(pos), generator=g).numpy()
        torch.manual_seed(cfg.seed * 7_919 + epoch)  # VAE sampling noise
        total, n = 0.0, 0
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch : (b + 1) * cfg.batch]
            x = gather(images, pos[idx], cfg.patch).to(cfg.device)
            x = x.contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model, x)
            if not torch.isfinite(loss):
                raise ModelError(f"training diverged at epoch {epoch + 1} (loss {loss.item()})")
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(loss.item()) * len(idx)
            n += len(idx)
            progress.update(
                epoch * steps_per_epoch + b + 1,
                epoch + 1,
                cfg.epochs,
                total / n,
                held_out=stop.describe(),
            )
        epoch_loss = total / max(n, 1)
        epoch += 1
        val = _held_out_loss(model, loss_fn, val_x, cfg)
        stop.update(epoch, val, model)
        if cfg.time_budget_s is not None and time.monotonic() - t_start >= cfg.time_budget_s:
            stop.end(f"the time budget of {_fmt_s(cfg.time_budget_s)}")
        if stop.done:
            stopped = stop.reason
        last = epoch == cfg.epochs or stop.done
        if cfg.checkpoint_every > 0 and (epoch % cfg.checkpoint_every == 0 or last):
            _save_checkpoint(ckpt, model, opt, epoch, epoch_loss, stop)
    progress.update(
        epoch * steps_per_epoch, epoch, cfg.epochs, epoch_loss, final=True, held_out=stop.describe()
    )
    best_epoch = stop.restore_best(model) or epoch
    log.write(
        f"stopped after epoch {epoch}: {stopped}; kept the weights of epoch {best_epoch}"
        + (f" (held-out loss {stop.best:.5f})" if math.isfinite(stop.best) else "")
        + "\n"
    )

    model.eval()
    vae_sigma = _vae_sigma(model, images, pos, cfg) if meta.variant == "vae" else meta.vae_sigma
    seconds = time.monotonic() - t_start
    training = {
        "data": str(cfg.data),
        "images": len(train_paths),
        "holdout_images": len(hold),
        "holdout": cfg.holdout,
        # which images the weights have seen: calibration must not judge false alarms on them
        "images_sha256": sorted(sha256_file(p) for p in train_paths),
        "image_sizes": sorted({f"{x.shape[1]}x{x.shape[0]}" for x in images}),
        "patches": cfg.patches,
        "epochs": epoch,
        "max_epochs": cfg.epochs,
        "best_epoch": best_epoch,
        "stopped": stopped,
        "held_out_loss": stop.best if math.isfinite(stop.best) else None,
        "patience": cfg.patience,
        "min_improvement": cfg.min_improvement,
        "time_budget_s": cfg.time_budget_s,
        "batch": cfg.batch,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "seed": cfg.seed,
        "precision": "bf16" if amp else "fp32",
        "final_loss": epoch_loss if math.isfinite(epoch_loss) else None,
        "seconds": round(seconds, 1),
        "command": cfg.command,
        "torch": torch.__version__,
        "host": platform.node(),
    }
    opening = meta.opening
    if cfg.opening_px is not None and spec.resize is None:
        opening = opening_diameter(cfg.opening_px, spec.downscale)
    meta = replace(meta, vae_sigma=vae_sigma, training=training, opening=opening)
    model = model.to(memory_format=torch.contiguous_format)
    meta = save_bundle(cfg.out, model.cpu(), meta)
    if cfg.statistics:
        log.write("learning the score statistics on the training images\n")
        meta = learn_statistics(cfg.out, train_paths, cfg.precision)
    return TrainResult(cfg.out, meta, epoch_loss, seconds, hold, epoch, best_epoch, stopped)


def learn_statistics(
    bundle_path: Path, paths: Sequence[Path], precision: str = "auto"
) -> BundleMeta:
    """Learn the score statistics of a bundle from defect-free images and store them."""
    from linescan.backends import create_backend
    from linescan.model.bundle import load_bundle, save_score
    from linescan.pipeline import reconstruct
    from linescan.residual import residual_components
    from linescan.score import learn_score

    bundle = load_bundle(bundle_path)
    meta = bundle.meta
    backend = create_backend(bundle, "torch", precision)
    kinds: tuple[ResidualKind, ...] = ("vae",) if meta.variant == "vae" else ("combined", "l2")
    xs, maps = [], []
    for p in paths:
        rec = reconstruct(read_grey(p), meta, backend)
        comps = {}
        for kind in kinds:
            comps.update(
                residual_components(
                    kind, rec.model_input, rec.reconstruction, meta.ssim, meta.vae_sigma
                )
            )
        xs.append(rec.model_input)
        maps.append(comps)
    score = learn_score(
        xs,
        maps,
        learned={"images": len(paths), "source": "training", "data": meta.training.get("data")},
    )
    return save_score(bundle_path, score)


def opening_diameter(camera_px: int, downscale: int) -> int:
    """The opening's disk diameter in model pixels for a diameter in camera pixels."""
    return max(1, round(camera_px / downscale))


class _Stopping:
    """Early stopping on the held-out loss, and the best weights so far."""

    def __init__(self, patience: int, min_improvement: float) -> None:
        self.patience = patience
        self.min_improvement = min_improvement
        self.best = math.inf
        self.best_epoch = 0
        self.stale = 0
        self.last = math.nan
        self.best_state: dict[str, torch.Tensor] | None = None
        self.done = False
        self.reason = ""

    def update(self, epoch: int, loss: float, model: nn.Module) -> None:
        self.last = loss
        if loss < self.best * (1.0 - self.min_improvement) or not math.isfinite(self.best):
            self.best, self.best_epoch, self.stale = loss, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.stale += 1
            if loss < self.best:  # better, if not by enough to reset the patience
                self.best, self.best_epoch = loss, epoch
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.patience > 0 and self.stale >= self.patience:
            self.end(
                f"the held-out loss has not improved by {100 * self.min_improvement:g} % "
                f"for {self.patience} epochs"
            )

    def end(self, reason: str) -> None:
        if not self.done:
            self.done, self.reason = True, reason

    def describe(self) -> str:
        if not math.isfinite(self.best):
            return ""
        return f" held-out {self.last:.5f} (best {self.best:.5f} @ {self.best_epoch})"

    def restore_best(self, model: nn.Module) -> int:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        return self.best_epoch

    def state(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stale": self.stale,
            "done": self.done,
            "reason": self.reason,
            "best_state": self.best_state if self.best_state is not None else {},
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        st = checkpoint.get("stopping")
        if not isinstance(st, dict):
            return  # a checkpoint from before early stopping
        self.best = float(st.get("best", math.inf))
        self.best_epoch = int(st.get("best_epoch", 0))
        self.stale = int(st.get("stale", 0))
        self.done = bool(st.get("done", False))
        self.reason = str(st.get("reason", ""))
        best_state = st.get("best_state")
        self.best_state = best_state if isinstance(best_state, dict) and best_state else None


@torch.inference_mode()
def _held_out_loss(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, cfg: TrainConfig) -> float:
    """The training loss on the held-out crops (the same seeded noise every epoch)."""
    was_training = model.training
    model.eval()
    torch.manual_seed(cfg.seed + 1)  # VAE sampling noise: the same draw every epoch
    total = 0.0
    for i in range(0, len(x), cfg.batch):
        xb = x[i : i + cfg.batch].to(cfg.device).contiguous(memory_format=torch.channels_last)
        total += float(loss_fn(model, xb).item()) * len(xb)
    model.train(was_training)
    return total / max(len(x), 1)


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    epoch: int,
    loss: float,
    stop: _Stopping,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}
    torch.save({**state, "loss": loss, "stopping": stop.state()}, tmp)
    tmp.replace(path)


@torch.inference_mode()
def _vae_sigma(
    model: nn.Module, images: Sequence[F32], pos: npt.NDArray[np.int64], cfg: TrainConfig
) -> float:
    """RMS reconstruction error of the posterior mean on up to 512 training crops."""
    if not isinstance(model, VariationalAutoencoder):
        raise ModelError("internal: VAE sigma asked of a non-VAE model")
    x = gather(images, pos[:512], cfg.patch).to(cfg.device)
    mu, _ = model.encode(x)
    rec = model.decoder(mu)
    return max(float(torch.sqrt(F.mse_loss(rec, x)).item()), 1e-3)
