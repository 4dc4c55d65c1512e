"""The three discriminators of the recipe, written here (no torchvision, no compiled ops).

- :class:`SWADiscriminator`: SWAGAN-style global discriminator (v1): the image enters as Haar wavelet sub-bands
  and every level re-injects the input at its resolution through the wavelet domain.
- :class:`StyleGAN2Discriminator`: StyleGAN2-style global discriminator (v2): residual blocks with blurred
  stride-2 convolutions and a minibatch standard-deviation feature.
- :class:`NLayerDiscriminator`: PatchGAN local discriminator (pix2pix) with BatchNorm.

Every convolution and linear layer is spectrally normalised (one power iteration per training forward), as in the
official code. Official discriminator weights were never released, so the layout is ours; the architecture follows
OFFICIAL_VQFR.md §8. ``narrow`` scales the channel counts for tiny test configurations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from vqfr.errors import ConfigError

__all__ = ["SWADiscriminator", "StyleGAN2Discriminator", "NLayerDiscriminator", "DISCRIMINATORS",
           "build_discriminator", "haar_dwt", "haar_iwt"]


def _channels(channel_multiplier: int, narrow: float) -> dict[int, int]:
    """StyleGAN2's channel count per resolution."""
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return {k: max(1, int(v * narrow)) for k, v in base.items()}


def _log2_size(out_size: int) -> int:
    log = int(math.log2(out_size))
    if 2**log != out_size or not 8 <= out_size <= 1024:
        raise ConfigError(f"discriminator out_size must be a power of two in [8, 1024], got {out_size}")
    return log


class Blur(nn.Module):
    """Depthwise FIR filter with the normalised outer product of ``kernel``, zero padding ``pad`` (before, after),
    then every ``down``-th pixel. [B, C, H, W] -> [B, C, (H + sum(pad) - K) // down + 1, ...]."""

    kernel: Tensor  # [1, 1, K, K] buffer

    def __init__(self, kernel: list[int] | tuple[int, ...], pad: tuple[int, int], down: int = 1):
        super().__init__()
        k = torch.tensor(kernel, dtype=torch.float32)
        k2 = torch.outer(k, k)
        self.register_buffer("kernel", (k2 / k2.sum())[None, None], persistent=False)
        self.pad, self.down = pad, down

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        x = F.pad(x, (self.pad[0], self.pad[1], self.pad[0], self.pad[1]))
        weight = self.kernel.to(x.dtype).expand(c, 1, -1, -1)
        return F.conv2d(x, weight, stride=self.down, groups=c)


class ConvLayer(nn.Sequential):
    """[blur +] spectrally normalised conv (stride 2 when downsampling) [+ LeakyReLU(0.2)].

    Downsampling blurs first with padding ``(len(kernel) - 2) + (kernel_size - 1)`` split evenly, then convolves
    with stride 2 and no padding, which halves H and W.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, downsample: bool = False,
                 resample_kernel: tuple[int, ...] = (1, 3, 3, 1), bias: bool = True, activate: bool = True):
        layers: list[nn.Module] = []
        if downsample:
            p = (len(resample_kernel) - 2) + (kernel_size - 1)
            layers.append(Blur(resample_kernel, ((p + 1) // 2, p // 2)))
            conv = nn.Conv2d(cin, cout, kernel_size, stride=2, padding=0, bias=bias)
        else:
            conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=bias)
        layers.append(spectral_norm(conv))
        if activate:
            layers.append(nn.LeakyReLU(0.2))
        super().__init__(*layers)


def minibatch_stddev(x: Tensor, group_size: int = 4) -> Tensor:
    """Append the mean over features of the per-group standard deviation as one channel.

    The group is the largest divisor of the batch that is at most ``group_size`` (the official ``min(B, 4)``
    wherever that divides the batch; it fails otherwise). [B, C, H, W] -> [B, C + 1, H, W].
    """
    b, c, h, w = x.shape
    group = max(g for g in range(1, min(b, group_size) + 1) if b % g == 0)
    y = x.reshape(group, -1, c, h, w)
    std = torch.sqrt(y.var(0, unbiased=False) + 1e-8).mean((1, 2, 3))  # [B / group]
    std = std.reshape(1, -1, 1, 1, 1).expand(group, -1, 1, h, w).reshape(b, 1, h, w)
    return torch.cat([x, std], 1)


class _Head(nn.Module):
    """Minibatch stddev, 3x3 conv at 4x4, then linear -> LeakyReLU -> linear -> [B, 1]."""

    def __init__(self, cin: int, c4: int):
        super().__init__()
        self.final_conv = ConvLayer(cin + 1, c4, 3)
        self.final_linear = nn.Sequential(spectral_norm(nn.Linear(c4 * 16, c4)), nn.LeakyReLU(0.2),
                                          spectral_norm(nn.Linear(c4, 1)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.final_conv(minibatch_stddev(x))
        return self.final_linear(x.flatten(1))


def _check_input(x: Tensor, out_size: int, name: str) -> None:
    if x.shape[-2:] != (out_size, out_size):
        raise ValueError(f"{name} was built for {out_size}x{out_size} inputs, got {tuple(x.shape[-2:])}; set its "
                         "out_size to the training image size")


class ResBlock(nn.Module):
    """StyleGAN2 discriminator block: (conv3x3, down-conv3x3) + down-conv1x1 skip, divided by sqrt(2)."""

    def __init__(self, cin: int, cout: int, resample_kernel: tuple[int, ...]):
        super().__init__()
        self.conv1 = ConvLayer(cin, cin, 3)
        self.conv2 = ConvLayer(cin, cout, 3, downsample=True, resample_kernel=resample_kernel)
        self.skip = ConvLayer(cin, cout, 1, downsample=True, resample_kernel=resample_kernel, bias=False,
                              activate=False)

    def forward(self, x: Tensor) -> Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class StyleGAN2Discriminator(nn.Module):
    """StyleGAN2-style global discriminator. [B, 3, S, S] in [-1, 1] -> logits [B, 1].

    Args:
        out_size: S, the image side (power of two).
        channel_multiplier: StyleGAN2's multiplier for resolutions >= 64 (2 in the official config).
        resample_kernel: 1-D blur taps for downsampling.
        narrow: channel scale (1.0 official; smaller for tests).
    """

    def __init__(self, out_size: int, channel_multiplier: int = 2, resample_kernel=(1, 3, 3, 1), narrow: float = 1.0):
        super().__init__()
        log = _log2_size(out_size)
        ch = _channels(channel_multiplier, narrow)
        self.out_size = out_size
        body: list[nn.Module] = [ConvLayer(3, ch[out_size], 1)]
        cin = ch[out_size]
        for i in range(log, 2, -1):
            body.append(ResBlock(cin, ch[2 ** (i - 1)], tuple(resample_kernel)))
            cin = ch[2 ** (i - 1)]
        self.conv_body = nn.Sequential(*body)
        self.head = _Head(cin, ch[4])

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.out_size, "StyleGAN2Discriminator")
        return self.head(self.conv_body(x))


def haar_dwt(x: Tensor) -> Tensor:
    """Orthonormal 2-D Haar transform: [B, C, H, W] -> [B, 4C, H/2, W/2] as (LL, LH, HL, HH) channel blocks."""
    a, b = x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]
    c, d = x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]
    return 0.5 * torch.cat([a + b + c + d, -a - b + c + d, -a + b - c + d, a - b - c + d], 1)


def haar_iwt(y: Tensor) -> Tensor:
    """Inverse of :func:`haar_dwt`: [B, 4C, h, w] -> [B, C, 2h, 2w]."""
    ll, lh, hl, hh = y.chunk(4, 1)
    a = 0.5 * (ll - lh - hl + hh)
    b = 0.5 * (ll - lh + hl - hh)
    c = 0.5 * (ll + lh - hl - hh)
    d = 0.5 * (ll + lh + hl + hh)
    top = torch.stack([a, b], -1).flatten(-2)  # rows 0::2, columns interleaved
    bottom = torch.stack([c, d], -1).flatten(-2)
    return torch.stack([top, bottom], -2).flatten(-3, -2)


class FromWavelets(nn.Module):
    """Injects the input image, as wavelet sub-bands [B, 12, r, r], into the feature path at resolution r.

    For every level but the first the sub-bands are first brought down one octave (inverse transform, blurred
    stride-2 downsample, forward transform). Returns (sub-bands at this level, features + skip).
    """

    def __init__(self, cout: int, downsample: bool, resample_kernel: tuple[int, ...]):
        super().__init__()
        self.downsample = Blur(resample_kernel, (1, 1), down=2) if downsample else None
        self.conv = ConvLayer(12, cout, 3)

    def forward(self, bands: Tensor, skip: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.downsample is not None:
            bands = haar_dwt(self.downsample(haar_iwt(bands)))
        out = self.conv(bands)
        return bands, out if skip is None else out + skip


class SWADiscriminator(nn.Module):
    """SWAGAN-style (wavelet) global discriminator. [B, 3, S, S] in [-1, 1] -> logits [B, 1].

    The image is Haar-transformed to [B, 12, S/2, S/2]; each level adds the (downsampled) sub-bands through a 3x3
    conv and halves the resolution with a (conv3x3, blurred down-conv3x3) block, down to 4x4; the head is the
    StyleGAN2 one. Arguments as :class:`StyleGAN2Discriminator`, but ``out_size`` must be at least 16.
    """

    #: the smallest ``out_size`` (the config check reads it)
    MIN_SIZE = 16

    def __init__(self, out_size: int, channel_multiplier: int = 2, resample_kernel=(1, 3, 3, 1), narrow: float = 1.0):
        super().__init__()
        log = _log2_size(out_size) - 1
        if out_size < self.MIN_SIZE:  # the first level is already at S/2 and re-injection halves it: 2x2 at the head
            raise ConfigError(f"SWADiscriminator out_size must be at least {self.MIN_SIZE}, got {out_size}: its "
                              "wavelet input is already out_size/2 and its head takes 4x4 features",
                              fix="use larger images, or StyleGAN2Discriminator (which takes 8x8)")
        ch = _channels(channel_multiplier, narrow)
        kernel = tuple(resample_kernel)
        self.out_size = out_size
        self.from_wavelets = nn.ModuleList()
        self.convs = nn.ModuleList()
        cin = ch[out_size]  # the official table is indexed by the image size at the first (S/2) level
        for i in range(log, 2, -1):
            cout = ch[2 ** (i - 1)]
            self.from_wavelets.append(FromWavelets(cin, downsample=i != log, resample_kernel=kernel))
            self.convs.append(nn.Sequential(ConvLayer(cin, cin, 3),
                                            ConvLayer(cin, cout, 3, downsample=True, resample_kernel=kernel)))
            cin = cout
        self.from_wavelets.append(FromWavelets(ch[4], downsample=True, resample_kernel=kernel))
        self.head = _Head(cin, ch[4])

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.out_size, "SWADiscriminator")
        bands, out = haar_dwt(x), None
        for inject, conv in zip(self.from_wavelets[:-1], self.convs, strict=True):
            bands, out = inject(bands, out)
            out = conv(out)
        _, out = self.from_wavelets[-1](bands, out)
        return self.head(out)


class NLayerDiscriminator(nn.Module):
    """PatchGAN local discriminator: conv4x4/2 + LeakyReLU, then ``n_layers - 1`` (conv4x4/2, BN, LeakyReLU), a
    stride-1 (conv4x4, BN, LeakyReLU) and a conv4x4 to one channel. Convs before BatchNorm have no bias.

    [B, input_nc, H, W] -> patch logits [B, 1, h, w] (h ~ H / 2**n_layers - 2).
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [spectral_norm(nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1)),
                                   nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [spectral_norm(nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False)),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]
        layers.append(spectral_norm(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)))
        self.main = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


DISCRIMINATORS: dict[str, type[nn.Module]] = {
    "SWADiscriminator": SWADiscriminator,
    "StyleGAN2Discriminator": StyleGAN2Discriminator,
    "NLayerDiscriminator": NLayerDiscriminator,
}


def build_discriminator(options: dict) -> nn.Module:
    """Build from an official-style block: ``type`` plus arguments."""
    opts = dict(options)
    kind = opts.pop("type", None)
    if kind not in DISCRIMINATORS:
        raise ConfigError(f"unknown discriminator type {kind!r}", fix=f"use one of {sorted(DISCRIMINATORS)}")
    try:
        return DISCRIMINATORS[kind](**opts)
    except TypeError as exc:
        raise ConfigError(f"invalid options for {kind}: {exc}") from exc
