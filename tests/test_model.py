"""Tests of linescan.model.autoencoder: Table I of Bergmann et al. 2018 for any patch size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from linescan.model.autoencoder import (
    SLOPE,
    Autoencoder,
    FeatureExtractor,
    VariationalAutoencoder,
    check_patch,
)

# Table I for a 128x128 patch: (kind, kernel, stride, padding, out channels, out side)
ENCODER_128: list[tuple[str, int, int, int, int | None, int]] = [
    ("conv", 4, 2, 1, 32, 64),
    ("conv", 4, 2, 1, 32, 32),
    ("conv", 3, 1, 1, 32, 32),
    ("conv", 4, 2, 1, 64, 16),
    ("conv", 3, 1, 1, 64, 16),
    ("conv", 4, 2, 1, 128, 8),
    ("conv", 3, 1, 1, 64, 8),
    ("conv", 3, 1, 1, 32, 8),
    ("conv", 8, 1, 0, None, 1),  # d channels
]


def _decoder_expected(patch: int, latent: int) -> list[tuple[str, int, int, int, int, int]]:
    """The mirror image of the encoder: transposed convolutions where the encoder down-samples."""
    q = patch // 16
    return [
        ("convT", q, 1, 0, 32, q),
        ("conv", 3, 1, 1, 64, q),
        ("conv", 3, 1, 1, 128, q),
        ("convT", 4, 2, 1, 64, 2 * q),
        ("conv", 3, 1, 1, 64, 2 * q),
        ("convT", 4, 2, 1, 32, 4 * q),
        ("conv", 3, 1, 1, 32, 4 * q),
        ("convT", 4, 2, 1, 32, 8 * q),
        ("convT", 4, 2, 1, 1, patch),
    ]


def _encoder_expected(patch: int, latent: int) -> list[tuple[str, int, int, int, int, int]]:
    """Table I with every side scaled by patch / 128 and conv9's kernel patch / 16."""
    out = []
    for kind, k, st, pad, ch, side in ENCODER_128:
        if ch is None:
            out.append((kind, patch // 16, st, pad, latent, 1))
        else:
            out.append((kind, k, st, pad, ch, side * patch // 128))
    return out


def _trace(seq: nn.Sequential, x: torch.Tensor) -> list[tuple[str, int, int, int, int, int]]:
    """(kind, kernel, stride, padding, channels, side) of each conv layer's output."""
    out = []
    for m in seq:
        x = m(x)
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            kind = "convT" if isinstance(m, nn.ConvTranspose2d) else "conv"
            assert x.shape[-1] == x.shape[-2]
            k, st, pad = m.kernel_size[0], m.stride[0], m.padding[0]  # type: ignore[index]
            out.append((kind, k, st, pad, int(x.shape[1]), int(x.shape[-1])))
    return out


@pytest.mark.parametrize("patch", [32, 64, 128])
@pytest.mark.parametrize("latent", [8, 100])
def test_table_one_shapes(patch: int, latent: int) -> None:
    """Every encoder and decoder layer has Table I's kernel, stride, padding and output shape,
    scaled to the patch size (conv9's kernel is patch / 16)."""
    model = Autoencoder(patch, latent).eval()
    x = torch.rand(2, 1, patch, patch)
    with torch.no_grad():
        enc = _trace(model.encoder, x)
        z = model.encoder(x)
        dec = _trace(model.decoder, z)
        y = model(x)
    assert enc == _encoder_expected(patch, latent)
    assert z.shape == (2, latent, 1, 1)
    assert dec == _decoder_expected(patch, latent)
    assert y.shape == x.shape


def test_table_one_literal_for_128() -> None:
    """For a 128x128 patch the encoder's sides are literally 64, 32, 32, 16, 16, 8, 8, 8, 1."""
    model = Autoencoder(128, 100).eval()
    with torch.no_grad():
        enc = _trace(model.encoder, torch.rand(1, 1, 128, 128))
    assert [side for *_, side in enc] == [64, 32, 32, 16, 16, 8, 8, 8, 1]
    assert [ch for *_, ch, _ in enc] == [32, 32, 32, 64, 64, 128, 64, 32, 100]
    assert enc[-1][1] == 8  # conv9 is 8x8


@pytest.mark.parametrize("make", [Autoencoder, VariationalAutoencoder])
def test_leaky_relu_after_every_layer_but_the_last_ones(make: type[nn.Module]) -> None:
    """LeakyReLU(0.2) follows every conv layer except the last of the encoder and of the
    decoder, which are linear (nothing after them)."""
    model = make(32, 8)
    for seq in (model.encoder, model.decoder):
        assert isinstance(seq, nn.Sequential)
        children = list(seq)
        convs = [i for i, m in enumerate(children) if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
        assert len(convs) == 9
        for i in convs[:-1]:
            act = children[i + 1]
            assert isinstance(act, nn.LeakyReLU)
            assert act.negative_slope == pytest.approx(0.2)
        assert convs[-1] == len(children) - 1  # linear: nothing follows
        # no other kind of non-linearity anywhere
        assert all(isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.LeakyReLU) for m in children)
    assert pytest.approx(0.2) == SLOPE


def test_output_layer_is_linear() -> None:
    """The reconstruction is not squashed: scaling the last layer's weights scales the output."""
    torch.manual_seed(0)
    model = Autoencoder(32, 8).eval()
    x = torch.rand(2, 1, 32, 32)
    last = model.decoder[-1]
    assert isinstance(last, nn.ConvTranspose2d)
    with torch.no_grad():
        if last.bias is not None:
            last.bias.zero_()
        y1 = model(x)
        last.weight.mul_(3.0)
        y3 = model(x)
    torch.testing.assert_close(y3, 3.0 * y1, rtol=1e-4, atol=1e-6)
    assert (y1 < 0).any()  # no ReLU/sigmoid clamps it


@pytest.mark.parametrize("patch", [32, 64, 128])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fresh_model_does_not_ignore_its_input(patch: int, seed: int) -> None:
    """A freshly built model's output depends on its input: noise of 0.1 on the input moves the
    output by clearly more than 1e-4 mean absolute (PyTorch's default init gives ~1e-9)."""
    torch.manual_seed(seed)
    model = Autoencoder(patch, 16).eval()
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.rand(4, 1, patch, patch, generator=g)
    noise = 0.1 * torch.randn(4, 1, patch, patch, generator=g)
    with torch.no_grad():
        moved = (model(x + noise) - model(x)).abs().mean().item()
    assert moved > 1e-4


def test_fresh_vae_decoder_depends_on_the_code() -> None:
    """The VAE's posterior mean depends on the input too (same initialisation)."""
    torch.manual_seed(0)
    vae = VariationalAutoencoder(32, 16).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 32, 32, generator=g)
    with torch.no_grad():
        mu0, _ = vae.encode(x)
        mu1, _ = vae.encode(x + 0.1 * torch.randn(x.shape, generator=g))
        moved = (vae.decoder(mu1) - vae.decoder(mu0)).abs().mean().item()
    assert moved > 1e-4


def test_vae_shapes_and_sampling() -> None:
    """The VAE gives mu and logvar of size d, one reconstruction per forward, and N decodes
    of different posterior samples from sample_reconstructions."""
    torch.manual_seed(0)
    vae = VariationalAutoencoder(32, 12).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        out = vae(x)
        samples = vae.sample_reconstructions(x, 6)
    assert out.reconstruction.shape == (3, 1, 32, 32)
    assert out.mu.shape == (3, 12, 1, 1)
    assert out.logvar.shape == (3, 12, 1, 1)
    assert samples.shape == (3, 6, 32, 32)
    assert not torch.equal(samples[:, 0], samples[:, 1])  # distinct draws
    first = vae.encoder[-1]
    assert isinstance(first, nn.Conv2d)
    assert first.out_channels == 24  # mean and log-variance


def test_vae_logvar_is_clamped() -> None:
    """Extreme encoder outputs cannot make the posterior variance overflow."""
    vae = VariationalAutoencoder(32, 4).eval()
    last = vae.encoder[-1]
    assert isinstance(last, nn.Conv2d)
    with torch.no_grad():
        assert last.bias is not None
        last.bias[4:] = 1e6
        _, logvar = vae.encode(torch.rand(1, 1, 32, 32))
    assert float(logvar.max()) <= 8.0


@pytest.mark.parametrize(("patch", "side"), [(32, 1), (64, 3), (128, 7)])
def test_feature_extractor_shape(patch: int, side: int) -> None:
    """AlexNet conv1-conv3 on a grey patch gives 384 feature maps of AlexNet's size."""
    fe = FeatureExtractor().eval()
    x = torch.rand(2, 1, patch, patch)
    with torch.no_grad():
        f = fe(x)
        f3 = fe(x.expand(-1, 3, -1, -1))
    assert f.shape == (2, 384, side, side)
    torch.testing.assert_close(f, f3)  # grey is repeated to three channels


@pytest.mark.parametrize("patch", [0, 8, 15, 24, 100, -16])
def test_bad_patch_sizes_raise(patch: int) -> None:
    """A patch that is not a positive multiple of 16 is refused with ValueError."""
    with pytest.raises(ValueError, match="multiple of 16"):
        Autoencoder(patch, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        VariationalAutoencoder(patch, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        check_patch(patch)


def test_bad_latent_size_raises() -> None:
    """A latent size below 1 is refused."""
    with pytest.raises(ValueError, match="latent"):
        Autoencoder(32, 0)


def test_same_seed_same_model() -> None:
    """Initialisation is reproducible from torch's seed."""
    torch.manual_seed(5)
    a = Autoencoder(32, 8)
    torch.manual_seed(5)
    b = Autoencoder(32, 8)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb)
