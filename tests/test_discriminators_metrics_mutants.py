"""What mutation testing of the discriminators and the image-quality metrics found unchecked: the blur's normalised
kernel, its (before, after) padding on both axes and its stride; the blur padding of a downsampling conv (an odd
total split with the extra pixel before), the LeakyReLU slope of 0.2; the residual block's division by sqrt(2) and
its skip without bias or activation; the minibatch standard deviation's grouping (sample i with i + B/group, as the
official reshape) and its 1e-8 under the square root; the wavelet re-injection's blurred halving (padding 1 each
side); the PatchGAN's layer layout (no bias before BatchNorm, channels capped at 8 * ndf, LeakyReLU); spectral
normalisation of every conv and linear layer of the global discriminators; a bad option reported as a ConfigError,
and (a defect, fixed) a wavelet discriminator for 8x8 images refused when built; the Y channel's +16 offset (SSIM
sees it) and a one-channel image left alone on the Y path; and the table's mean PSNR of identical images printed as
inf. Expected values are written out in each test (explicit loops, hand formulas, torch's plain conv), on tiny
inputs, on the CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from training.discriminators import (
    Blur,
    ConvLayer,
    FromWavelets,
    NLayerDiscriminator,
    ResBlock,
    StyleGAN2Discriminator,
    SWADiscriminator,
    build_discriminator,
    minibatch_stddev,
)
from training.metrics import psnr, ssim
from vqfr.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors; two threads only spin on a busy 2-core machine


def _blur_loops(x: torch.Tensor, taps: list[float], pad: tuple[int, int], down: int) -> torch.Tensor:
    """Depthwise FIR by explicit loops: zero padding (before, after) on H and W, the outer product of ``taps``
    divided by its sum, every ``down``-th output pixel."""
    k = np.outer(taps, taps) / np.sum(np.outer(taps, taps))
    n = len(taps)
    a = x.double().numpy()
    bsz, c, h, w = a.shape
    p = np.zeros((bsz, c, h + sum(pad), w + sum(pad)))
    p[:, :, pad[0]:pad[0] + h, pad[0]:pad[0] + w] = a
    oh, ow = (h + sum(pad) - n) // down + 1, (w + sum(pad) - n) // down + 1
    out = np.zeros((bsz, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = p[:, :, i * down:i * down + n, j * down:j * down + n]
            out[:, :, i, j] = (win * k).sum((-2, -1))
    return torch.from_numpy(out).float()


def _conv(layer: nn.Module) -> nn.Conv2d:
    return next(m for m in layer.modules() if isinstance(m, nn.Conv2d))


def _conv_layer_reference(layer: nn.Module, x: torch.Tensor, kernel_size: int, downsample: bool,
                          taps: list[float], activate: bool) -> torch.Tensor:
    """ConvLayer as documented: [blur, padding (len(taps) - 2) + (kernel_size - 1) with the odd pixel before, then
    a stride-2 conv without padding] or a 'same' conv, [then LeakyReLU(0.2)], with the layer's (normalised)
    weights."""
    conv = _conv(layer)
    if downsample:
        p = (len(taps) - 2) + (kernel_size - 1)
        x = _blur_loops(x, taps, (p - p // 2, p // 2), 1)
        y = F.conv2d(x, conv.weight, conv.bias, stride=2)
    else:
        y = F.conv2d(x, conv.weight, conv.bias, padding=kernel_size // 2)
    return torch.where(y >= 0, y, 0.2 * y) if activate else y


def test_blur_normalises_the_kernel_and_pads_both_axes_before_and_after():
    x = torch.randn(1, 2, 7, 9, generator=torch.Generator().manual_seed(0))
    for taps, pad, down in (([1, 3, 3, 1], (2, 1), 2), ([1, 3, 3, 1], (2, 1), 1), ([1, 2, 1], (0, 2), 2)):
        got = Blur(taps, pad, down)(x)
        torch.testing.assert_close(got, _blur_loops(x, taps, pad, down), atol=1e-5, rtol=0)
    ones = torch.ones(1, 1, 6, 6)  # a normalised kernel keeps a constant inside the image
    torch.testing.assert_close(Blur([1, 3, 3, 1], (1, 1), 2)(ones)[..., 1:-1, 1:-1], torch.ones(1, 1, 1, 1))


@pytest.mark.parametrize(("kernel_size", "taps"), [(3, [1, 3, 3, 1]), (1, [1, 3, 3, 1]), (3, [1, 2, 1])])
def test_downsampling_conv_layer_blurs_pads_and_convolves_as_documented(kernel_size, taps):
    torch.manual_seed(0)
    layer = ConvLayer(2, 3, kernel_size, downsample=True, resample_kernel=tuple(taps)).eval()
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        got = layer(x)
        want = _conv_layer_reference(layer, x, kernel_size, True, taps, activate=True)
    assert got.shape == (2, 3, 4, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (want < 0).any()  # the LeakyReLU slope is seen


def test_residual_block_divides_by_sqrt2_and_its_skip_has_no_bias_nor_activation():
    torch.manual_seed(1)
    block = ResBlock(2, 3, (1, 3, 3, 1)).eval()
    taps = [1, 3, 3, 1]
    x = torch.randn(2, 2, 8, 8)
    assert _conv(block.skip).bias is None
    with torch.no_grad():
        main = _conv_layer_reference(block.conv2, _conv_layer_reference(block.conv1, x, 3, False, taps, True),
                                     3, True, taps, True)
        skip = _conv_layer_reference(block.skip, x, 1, True, taps, activate=False)
        torch.testing.assert_close(block(x), (main + skip) / math.sqrt(2), atol=1e-5, rtol=0)


def test_minibatch_stddev_groups_sample_i_with_i_plus_batch_over_group():
    g = torch.Generator().manual_seed(2)
    for b in (8, 6):  # groups of 4 (two of them) and of 3 (6 is no multiple of 4)
        x = torch.randn(b, 3, 2, 2, generator=g, dtype=torch.float64)
        group = 4 if b == 8 else 3
        m = b // group
        want = torch.empty(b)
        for i in range(b):
            members = [j for j in range(b) if j % m == i % m]  # the official reshape(group, -1, ...)
            assert len(members) == group
            stack = x[members]
            var = ((stack - stack.mean(0)) ** 2).mean(0)  # biased, as the official code
            want[i] = torch.sqrt(var + 1e-8).mean()
        out = minibatch_stddev(x)
        torch.testing.assert_close(out[:, :3], x)
        torch.testing.assert_close(out[:, 3].float(), want[:, None, None].expand(b, 2, 2), atol=1e-6, rtol=0)
    same = torch.ones(4, 2, 1, 1)  # no spread at all: sqrt(1e-8)
    torch.testing.assert_close(minibatch_stddev(same)[:, 2].flatten(), torch.full((4,), 1e-4), atol=1e-7, rtol=0)


def _haar_loops(x: torch.Tensor) -> torch.Tensor:
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return torch.cat([(a + b + c + d) / 2, (c + d - a - b) / 2, (b + d - a - c) / 2, (a + d - b - c) / 2], 1)


def _inverse_haar_loops(y: torch.Tensor) -> torch.Tensor:
    bsz, c4, h, w = y.shape
    c = c4 // 4
    ll, lh, hl, hh = y[:, :c], y[:, c:2 * c], y[:, 2 * c:3 * c], y[:, 3 * c:]
    x = torch.empty(bsz, c, 2 * h, 2 * w, dtype=y.dtype)
    for i in range(h):
        for j in range(w):
            s = ll[..., i, j], lh[..., i, j], hl[..., i, j], hh[..., i, j]
            x[..., 2 * i, 2 * j] = (s[0] - s[1] - s[2] + s[3]) / 2
            x[..., 2 * i, 2 * j + 1] = (s[0] - s[1] + s[2] - s[3]) / 2
            x[..., 2 * i + 1, 2 * j] = (s[0] + s[1] - s[2] - s[3]) / 2
            x[..., 2 * i + 1, 2 * j + 1] = (s[0] + s[1] + s[2] + s[3]) / 2
    return x


def test_wavelet_reinjection_halves_the_image_with_a_padded_blur():
    torch.manual_seed(3)
    inject = FromWavelets(4, downsample=True, resample_kernel=(1, 3, 3, 1)).eval()
    bands = torch.randn(1, 12, 4, 4)
    image = _inverse_haar_loops(bands)  # [1, 3, 8, 8]
    want = _haar_loops(_blur_loops(image, [1, 3, 3, 1], (1, 1), 2))  # the official Downsample: pad 1 each side
    with torch.no_grad():
        got_bands, out = inject(bands, None)
        torch.testing.assert_close(got_bands, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(out, _conv_layer_reference(inject.conv, want, 3, False, [], True),
                                   atol=1e-5, rtol=0)


def test_patchgan_layers_as_pix2pix():
    torch.manual_seed(4)
    ndf, n_layers = 2, 4
    d = NLayerDiscriminator(3, ndf, n_layers).eval()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    # channels double per layer, capped at 8 * ndf; the last stride-2 conv is followed by a stride-1 one
    shapes = [(ndf, 3), (2 * ndf, ndf), (4 * ndf, 2 * ndf), (8 * ndf, 4 * ndf), (8 * ndf, 8 * ndf), (1, 8 * ndf)]
    assert [tuple(c.weight.shape[:2]) for c in convs] == shapes
    assert [c.bias is None for c in convs] == [False, True, True, True, True, False]  # no bias before BatchNorm
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        y = x
        for i, conv in enumerate(convs):
            stride = 2 if i < n_layers else 1
            y = F.conv2d(y, conv.weight, conv.bias, stride=stride, padding=1)
            if i == len(convs) - 1:
                break
            if 0 < i:  # fresh BatchNorm in eval: running mean 0, variance 1
                y = y / math.sqrt(1 + 1e-5)
            y = torch.where(y >= 0, y, 0.2 * y)
        torch.testing.assert_close(d(x), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [SWADiscriminator, StyleGAN2Discriminator])
def test_every_conv_and_linear_of_the_global_discriminators_is_spectrally_normalised(cls):
    d = cls(16, narrow=1 / 64)
    layers = [m for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) > 4
    assert all(parametrize.is_parametrized(m, "weight") for m in layers)


def test_a_bad_discriminator_option_is_a_config_error():
    with pytest.raises(ConfigError, match="invalid options for NLayerDiscriminator"):
        build_discriminator({"type": "NLayerDiscriminator", "bogus": 1})


def test_y_channel_keeps_its_offset_and_leaves_a_one_channel_image_alone():
    black, white = np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8)
    c1 = (0.01 * 255) ** 2  # constant images: SSIM is the luminance term alone; Y is 16 and 235 (BT.601, MATLAB)
    want = (2 * 16 * 235 + c1) / (16**2 + 235**2 + c1)
    assert ssim(black, white, test_y_channel=True) == pytest.approx(want, rel=1e-9)
    grey, lighter = np.full((16, 16, 1), 100, np.uint8), np.full((16, 16, 1), 104, np.uint8)
    assert psnr(grey, lighter, test_y_channel=True) == pytest.approx(10 * math.log10(255**2 / 16), rel=1e-12)


def test_table_mean_psnr_of_identical_images_is_inf(tmp_path, capsys):
    import cv2

    from training.metrics import main as metrics_main

    for sub in ("gt", "out"):
        (tmp_path / sub).mkdir()
        cv2.imwrite(str(tmp_path / sub / "a.png"), np.full((16, 16, 3), 77, np.uint8))
    assert metrics_main(["psnr-ssim", "--restored", str(tmp_path / "out"), "--gt", str(tmp_path / "gt")]) == 0
    mean_line = capsys.readouterr().out.splitlines()[-1]
    assert mean_line.split()[-4:] == ["psnr", "inf", "ssim", "1.0000"]


def test_wavelet_discriminator_refuses_8x8_images_when_built():
    """Defect: SWADiscriminator(8) was built, then failed at its first forward (when the GAN starts) with torch's
    "mat1 and mat2 shapes cannot be multiplied": its sub-bands start at 4x4 and re-injection halves them to 2x2."""
    with pytest.raises(ConfigError, match="at least 16"):
        build_discriminator({"type": "SWADiscriminator", "out_size": 8})
    assert SWADiscriminator(16, narrow=1 / 64)(torch.randn(2, 3, 16, 16)).shape == (2, 1)
    assert StyleGAN2Discriminator(8, narrow=1 / 64)(torch.randn(2, 3, 8, 8)).shape == (2, 1)


def test_a_crop_border_that_is_negative_or_leaves_nothing_is_refused(tmp_path, capsys):
    """A negative crop border gave a NaN PSNR (and a "got 0x0" SSIM error); the metrics and the command line now
    refuse it, and a border that leaves nothing names the largest one that fits. The largest one is measured."""
    import cv2

    from training.metrics import main as metrics_main
    from training.metrics import niqe

    a, b = np.zeros((9, 9, 3), np.uint8), np.full((9, 9, 3), 4, np.uint8)
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match="crop_border must be 0 or more, got -1"):
            metric(a, b, crop_border=-1)
        with pytest.raises(ValueError, match="leaves nothing of a 9x9 image; use at most 4"):
            metric(a, b, crop_border=5)
    with pytest.raises(ValueError, match="crop_border must be 0 or more"):
        niqe(np.zeros((200, 200, 3), np.uint8), crop_border=-2)
    b[4, 4] = 40  # only the centre pixel is left by the largest border: PSNR of one pixel 40 levels off
    assert psnr(a, b, crop_border=4) == pytest.approx(10 * math.log10(255**2 / 40**2), rel=1e-12)
    for sub in ("gt", "out"):
        (tmp_path / sub).mkdir()
        cv2.imwrite(str(tmp_path / sub / "a.png"), a)
    with pytest.raises(SystemExit):
        metrics_main(["psnr-ssim", "--restored", str(tmp_path / "out"), "--gt", str(tmp_path / "gt"),
                      "--crop-border", "-1"])
    assert "must be 0 or more, got -1" in capsys.readouterr().err
