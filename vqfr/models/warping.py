"""The texture warping module (TWM) and its modulated deformable convolution (OFFICIAL_VQFR.md §1-2)."""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from vqfr.models.blocks import UpDownSample, group_norm


class DCNv2Pack(nn.Module):
    """3x3 modulated deformable conv whose offsets and mask come from a separate feature.

    Keys: ``weight`` [C_out, C_in, 3, 3], ``bias`` [C_out], ``conv_offset`` (C_in -> 3*G*9, 3x3).
    ``conv_offset(feat)`` is split as ``[:, :2*G*9]`` offsets (dy, dx interleaved per tap, as torchvision) and
    ``sigmoid([:, 2*G*9:])`` mask; the official ``chunk(3)`` + ``cat`` of the first two chunks is exactly this slice.
    """

    def __init__(self, cin: int, cout: int, deformable_groups: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.groups = deformable_groups
        self.padding = padding
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(cout))
        taps = kernel_size * kernel_size
        self.conv_offset = nn.Conv2d(cin, deformable_groups * 3 * taps, kernel_size, padding=padding)
        bound = 1.0 / math.sqrt(cin * kernel_size * kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def offsets_and_mask(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        """feat [B, C_in, H, W] -> (offset [B, 2*G*K, H, W], mask [B, G*K, H, W])."""
        out = self.conv_offset(feat)
        n_off = 2 * self.groups * self.weight.shape[2] * self.weight.shape[3]
        return out[:, :n_off], torch.sigmoid(out[:, n_off:])

    def forward(self, x: Tensor, feat: Tensor) -> Tensor:
        """x [B, C_in, H, W], feat [B, C_in, H, W] -> [B, C_out, H, W]."""
        offset, mask = self.offsets_and_mask(feat)
        return kernels.modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, 1, self.padding, 1)


class TextureWarpingModule(nn.Module):
    """Warps the texture feature of one level towards the degraded input.

    The condition (the input feature) is resized to this level: v1 (``cond_conv=True``) with its
    ``UpDownSample(down)`` (bilinear then a 3x3 conv, key ``downsample.conv``), v2 with a plain bilinear resize.
    Returns ``(warped, feat)``; ``feat`` is the offset *feature* (C channels) handed to the next finer level, which
    passes it back as ``previous``: the module upsamples it itself (:func:`upsample_offset_feature`), so that the
    upsampled copy lives only until its concatenation.

    Shapes: x_main [B, C, h, w], cond [B, cc, H, W] with H = h * rate, previous [B, p, h/2, w/2] or None.
    """

    def __init__(
        self,
        channel: int,
        cond_channels: int,
        cond_downscale_rate: int,
        deformable_groups: int,
        previous_offset_channel: int = 0,
        cond_conv: bool = False,
    ):
        super().__init__()
        self.rate = int(cond_downscale_rate)
        if cond_conv:
            self.downsample = UpDownSample(cond_channels, cond_channels, self.rate, "down")
        self.offset_conv1 = nn.Sequential(
            nn.Conv2d(channel + cond_channels, channel, 1),
            group_norm(channel),
            nn.SiLU(),
            nn.Conv2d(channel, channel, 7, padding=3, groups=channel),
            group_norm(channel),
            nn.SiLU(),
            nn.Conv2d(channel, channel, 1),
        )
        self.offset_conv2 = nn.Sequential(
            nn.Conv2d(channel + previous_offset_channel, channel, 3, padding=1), group_norm(channel), nn.SiLU()
        )
        self.dcn = DCNv2Pack(channel, channel, deformable_groups)

    def resize_cond(self, cond: Tensor) -> Tensor:
        if hasattr(self, "downsample"):
            return self.downsample(cond)
        if self.rate == 1:  # a same-size bilinear resize is an exact copy
            return cond
        h, w = cond.shape[-2:]
        return F.interpolate(cond, size=(h // self.rate, w // self.rate), mode="bilinear", align_corners=False)

    def forward(self, x_main: Tensor, cond: Tensor, previous: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # The blocks run layer by layer rather than as block(torch.cat(...)), which would keep each concatenation
        # alive until the whole block returns: this frees it after the first conv. At the finest level the
        # concatenation before offset_conv2 is the largest activation of the forward (v2, batch 8, fp16: 805 MB).
        # Concatenation order is the official one: condition first, then the texture feature.
        feat = torch.cat([self.resize_cond(cond), x_main], dim=1)
        for layer in self.offset_conv1:
            feat = layer(feat)
        if previous is not None:
            feat = torch.cat([feat, upsample_offset_feature(previous)], dim=1)
        for layer in self.offset_conv2:
            feat = layer(feat)
        return self.dcn(x_main, feat), feat


def upsample_offset_feature(feat: Tensor) -> Tensor:
    """Bilinear x2 of the previous level's offset feature, times 2.

    Official quirk, kept for compatibility: the factor 2 suits a displacement, but this is a feature.
    """
    h, w = feat.shape[-2:]
    return F.interpolate(feat, size=(2 * h, 2 * w), mode="bilinear", align_corners=False) * 2


class MainBranch(Protocol):
    """What :func:`warp_and_decode_levels` reads of a main branch (v1's ``MainDecoderV1``, v2's ``MainBranchV2``)."""

    align_func_dict: nn.ModuleDict  # level name -> TextureWarpingModule
    pre_upsample_dict: nn.ModuleDict  # finer level name -> upsampling of the main feature
    decoder_dict: nn.ModuleDict  # finer level name -> decoder block on [main, warped]
    coarsest: str
    level_names: list[str]  # the finer levels, coarse to fine


def warp_and_decode_levels(branch: MainBranch, dec_feats: dict[str, Tensor], cond: Tensor) -> Tensor:
    """The main branch's walk from the coarsest level to the finest, shared by v1 and v2.

    At the coarsest level the texture feature is warped alone; at each finer level the main feature is upsampled
    (``pre_upsample_dict``), the texture feature warped with the previous level's offset feature, and both decoded
    together (``decoder_dict`` on their concatenation). ``branch`` holds ``align_func_dict``, ``pre_upsample_dict``,
    ``decoder_dict``, ``coarsest`` and ``level_names`` (the finer levels, coarse to fine).

    Args:
        dec_feats: the texture decoder's features by level name, e.g. ``Level_1`` [B, C1, H, W].
        cond: the input feature [B, cc, H, W] the offsets are conditioned on.

    Returns:
        The main feature at the finest level [B, C1, H, W].
    """
    x, feat = branch.align_func_dict[branch.coarsest](dec_feats[branch.coarsest], cond)
    for name in branch.level_names:
        x = branch.pre_upsample_dict[name](x)
        warped, feat = branch.align_func_dict[name](dec_feats[name], cond, feat)
        # Only the concatenation stays alive through the decoder block, the peak of the finest level: not its two
        # halves, nor the finest offset feature, which no level needs (see TextureWarpingModule.forward).
        x = torch.cat([x, warped], dim=1)
        del warped
        if name == branch.level_names[-1]:
            del feat
        x = branch.decoder_dict[name](x)
    return x
