"""The convolutional autoencoder of Bergmann et al. 2018, Table I, for any patch size.

Encoder for a 128x128 patch (kernel/stride/padding -> output):

    conv1 4/2/1 -> 64x64x32     conv4 4/2/1 -> 16x16x64    conv7 3/1/1 -> 8x8x64
    conv2 4/2/1 -> 32x32x32     conv5 3/1/1 -> 16x16x64    conv8 3/1/1 -> 8x8x32
    conv3 3/1/1 -> 32x32x32     conv6 4/2/1 -> 8x8x128     conv9 8/1/0 -> 1x1xd

The decoder mirrors it with transposed convolutions for the up-sampling layers. LeakyReLU(0.2)
follows every layer except the last of the encoder and the last of the decoder, which are
linear. Four stride-2 layers divide the patch by 16, so conv9's kernel is patch/16 (2 for 32,
4 for 64, 8 for 128): the architecture follows the patch size, as Table II needs.

Initialisation matters: with PyTorch's default init this 18-layer network's output barely
depends on its input and small training budgets never leave a flat grey reconstruction. He
(Kaiming) initialisation for the LeakyReLU slope fixes it; ``tests/test_model.py`` keeps a test
that fails when a freshly built model ignores its input.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

SLOPE = 0.2
ARCHITECTURE = "bergmann2018-table1"


def check_patch(patch: int) -> None:
    if patch < 16 or patch % 16 != 0:
        raise ValueError(f"patch size must be a multiple of 16 and at least 16, got {patch}")


def _act() -> nn.Module:
    return nn.LeakyReLU(SLOPE, inplace=True)


def _encoder(patch: int, out_channels: int) -> nn.Sequential:
    k9 = patch // 16
    return nn.Sequential(
        nn.Conv2d(1, 32, 4, 2, 1), _act(),
        nn.Conv2d(32, 32, 4, 2, 1), _act(),
        nn.Conv2d(32, 32, 3, 1, 1), _act(),
        nn.Conv2d(32, 64, 4, 2, 1), _act(),
        nn.Conv2d(64, 64, 3, 1, 1), _act(),
        nn.Conv2d(64, 128, 4, 2, 1), _act(),
        nn.Conv2d(128, 64, 3, 1, 1), _act(),
        nn.Conv2d(64, 32, 3, 1, 1), _act(),
        nn.Conv2d(32, out_channels, k9, 1, 0),  # linear: the latent code
    )  # fmt: skip


def _decoder(patch: int, latent: int) -> nn.Sequential:
    k9 = patch // 16
    return nn.Sequential(
        nn.ConvTranspose2d(latent, 32, k9, 1, 0), _act(),
        nn.Conv2d(32, 64, 3, 1, 1), _act(),
        nn.Conv2d(64, 128, 3, 1, 1), _act(),
        nn.ConvTranspose2d(128, 64, 4, 2, 1), _act(),
        nn.Conv2d(64, 64, 3, 1, 1), _act(),
        nn.ConvTranspose2d(64, 32, 4, 2, 1), _act(),
        nn.Conv2d(32, 32, 3, 1, 1), _act(),
        nn.ConvTranspose2d(32, 32, 4, 2, 1), _act(),
        nn.ConvTranspose2d(32, 1, 4, 2, 1),  # linear: the reconstruction
    )  # fmt: skip


def he_init(module: nn.Module) -> None:
    """Kaiming-normal init for the LeakyReLU slope; the linear output layers get gain 1."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            # torch computes fan_in from weight dim 1 (times the kernel); for a transposed
            # convolution that is the number of outputs per input, close enough for stride 2.
            if _followed_by_activation(module, m):
                nn.init.kaiming_normal_(m.weight, a=SLOPE, nonlinearity="leaky_relu")
            else:
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _followed_by_activation(root: nn.Module, layer: nn.Module) -> bool:
    for seq in root.modules():
        if isinstance(seq, nn.Sequential):
            children = list(seq)
            for j, child in enumerate(children):
                if child is layer:
                    return j + 1 < len(children) and isinstance(children[j + 1], nn.LeakyReLU)
    return False


class Autoencoder(nn.Module):
    """The deterministic autoencoder used by the L2, SSIM and feature-matching variants."""

    def __init__(self, patch: int = 128, latent: int = 100) -> None:
        super().__init__()
        check_patch(patch)
        if latent < 1:
            raise ValueError(f"latent size must be >= 1, got {latent}")
        self.patch = patch
        self.latent = latent
        self.encoder = _encoder(patch, latent)
        self.decoder = _decoder(patch, latent)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, p, p) patches in [0, 1] -> (B, 1, p, p) reconstructions."""
        out: torch.Tensor = self.decoder(self.encoder(x))
        return out


class VAEOutput(NamedTuple):
    reconstruction: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor


class VariationalAutoencoder(nn.Module):
    """Same layers, with the encoder producing the mean and log-variance of Q(z|x).

    Inspection decodes N posterior samples (the paper: N = 6) and scores each pixel by its
    reconstruction probability (see ``residual.vae_residual``).
    """

    def __init__(self, patch: int = 128, latent: int = 100) -> None:
        super().__init__()
        check_patch(patch)
        self.patch = patch
        self.latent = latent
        self.encoder = _encoder(patch, 2 * latent)
        self.decoder = _decoder(patch, latent)
        he_init(self)
        # Start with a small posterior variance so early training is not swamped by noise.
        last = self.encoder[-1]
        if not isinstance(last, nn.Conv2d):  # pragma: no cover - the layer list above
            raise TypeError("the encoder must end in a convolution")
        with torch.no_grad():
            last.weight[latent:] *= 0.1
            if last.bias is not None:
                last.bias[latent:] = -4.0

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        mu, logvar = h[:, : self.latent], h[:, self.latent :]
        return mu, logvar.clamp(-12.0, 8.0)

    def forward(self, x: torch.Tensor) -> VAEOutput:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return VAEOutput(self.decoder(z), mu, logvar)

    def sample_reconstructions(self, x: torch.Tensor, samples: int) -> torch.Tensor:
        """(B, 1, p, p) -> (B, samples, p, p): decodes of ``samples`` draws from Q(z|x)."""
        mu, logvar = self.encode(x)
        std = torch.exp(0.5 * logvar)
        outs = []
        for _ in range(samples):
            z = mu + torch.randn_like(mu) * std
            outs.append(self.decoder(z))
        return torch.cat(outs, dim=1)


class FeatureExtractor(nn.Module):
    """The first three convolution layers of AlexNet (Krizhevsky et al.), for feature matching.

    Pretrained weights cannot be downloaded here: ``load_feature_extractor`` reads them from a
    user-given file (keys ``features.0``, ``features.3``, ``features.6`` as in torchvision's
    AlexNet, or ``conv1``/``conv2``/``conv3``). Grey patches are repeated to three channels.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 11, 4, 2)
        self.conv2 = nn.Conv2d(64, 192, 5, 1, 2)
        self.conv3 = nn.Conv2d(192, 384, 3, 1, 1)
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        h = self.pool(torch.relu(self.conv1(h)))
        h = self.pool(torch.relu(self.conv2(h)))
        out: torch.Tensor = self.conv3(h)
        return out
