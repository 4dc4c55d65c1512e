"""The v1 family: VQGANv1 (stage-1 codebook model) and VQFRv1 (OFFICIAL_VQFR.md §3).

Levels are named ``Level_N`` for a feature map at 1/N of the input resolution. Inputs are [B, 3, H, W] in [-1, 1]
with H and W multiples of ``proj_patch_size`` (32 for the released model).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vqfr.models.blocks import Network, ResnetBlock, UpDownSample, group_norm, init_official_, norm_act_conv
from vqfr.models.quantizer import Quantized, build_quantizer
from vqfr.models.warping import TextureWarpingModule, warp_and_decode_levels


def _level_table(base_channels: int, channel_multipliers: list[int], count: int) -> list[tuple[str, int]]:
    return [(f"Level_{2**i}", channel_multipliers[i] * base_channels) for i in range(count)]


class EncoderV1(nn.Module):
    """conv_in, then per level a ``pre_downsample_dict`` resampler and ``encoder_dict`` resblocks; ``enc_convout_dict``
    (GN, SiLU, 3x3) on each quantized level. [B,3,H,W] -> {level: [B, C_level, H/N, W/N]}."""

    def __init__(self, base_channels, proj_patch_size, resolution_scale_rates, channel_multipliers,
                 encoder_num_blocks, quant_level):
        super().__init__()
        n = int(math.log2(proj_patch_size)) + 1
        table = _level_table(base_channels, channel_multipliers, n)
        self.level_names = [name for name, _ in table]
        self.quant_level = list(quant_level)
        self.conv_in = nn.Conv2d(3, table[0][1], 3, padding=1)
        self.encoder_dict = nn.ModuleDict()
        self.pre_downsample_dict = nn.ModuleDict()
        for i, (name, ch) in enumerate(table):
            cin = table[max(i - 1, 0)][1]
            self.encoder_dict[name] = nn.Sequential(*[ResnetBlock(ch, ch) for _ in range(encoder_num_blocks)])
            self.pre_downsample_dict[name] = UpDownSample(cin, ch, resolution_scale_rates[i], "down")
        self.enc_convout_dict = nn.ModuleDict()
        for name in self.quant_level:
            ch = dict(table)[name]
            self.enc_convout_dict[name] = norm_act_conv(ch, ch)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.conv_in(x)
        out = {}
        for name in self.level_names:
            x = self.encoder_dict[name](self.pre_downsample_dict[name](x))
            if name in self.quant_level:
                out[name] = self.enc_convout_dict[name](x)
        return out


class DecoderV1(nn.Module):
    """Texture decoder: from the coarsest quantized level up, per level ``pre_upsample_dict`` (conv at the low
    resolution, then bilinear x2) and ``decoder_dict`` resblocks; ``conv_out`` = GN, SiLU, 3x3 -> 3.

    Returns (image [B,3,H,W], {level: feature}).
    """

    def __init__(self, base_channels, proj_patch_size, resolution_scale_rates, channel_multipliers,
                 decoder_num_blocks):
        super().__init__()
        n = int(math.log2(proj_patch_size)) + 1
        table = _level_table(base_channels, channel_multipliers, n)
        rates = list(resolution_scale_rates)[::-1]  # Level_1 upsamples by the last rate, the coarsest by the first
        self.level_names = [name for name, _ in table][::-1]
        self.decoder_dict = nn.ModuleDict()
        self.pre_upsample_dict = nn.ModuleDict()
        for i in range(n - 1, -1, -1):
            name, ch = table[i]
            cin = table[min(i + 1, n - 1)][1]
            self.decoder_dict[name] = nn.Sequential(*[ResnetBlock(ch, ch) for _ in range(decoder_num_blocks)])
            self.pre_upsample_dict[name] = UpDownSample(cin, ch, rates[i], "up")
        self.conv_out = norm_act_conv(table[0][1], 3)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats = {}
        for name in self.level_names:
            x = self.decoder_dict[name](self.pre_upsample_dict[name](x))
            feats[name] = x
        return self.conv_out(x), feats


class MainDecoderV1(nn.Module):
    """Main branch: warps each texture level towards the input and decodes, finishing with
    ``conv_out_1`` (GN, SiLU) and ``conv_out`` (3x3 on ``cat([x, x_lq])``) -> the restored image."""

    def __init__(self, base_channels, resolution_scale_rates, channel_multipliers, align_opt, align_from_patch):
        super().__init__()
        n = int(math.log2(align_from_patch)) + 1
        table = _level_table(base_channels, channel_multipliers, n)
        chans = dict(table)
        rates = list(resolution_scale_rates)[::-1]
        self.coarsest = table[-1][0]
        self.level_names = [name for name, _ in table[:-1]][::-1]  # finer levels, coarse to fine
        self.decoder_dict = nn.ModuleDict()
        self.pre_upsample_dict = nn.ModuleDict()
        for i in range(n - 2, -1, -1):
            name, ch = table[i]
            self.decoder_dict[name] = ResnetBlock(2 * ch, ch)
            self.pre_upsample_dict[name] = UpDownSample(table[i + 1][1], ch, rates[i], "up")
        self.align_func_dict = nn.ModuleDict()
        for name, cfg in align_opt.items():
            level = int(name.split("_")[1])
            previous = 0 if level == align_from_patch else chans[f"Level_{2 * level}"]
            self.align_func_dict[name] = TextureWarpingModule(
                channel=chans[name],
                cond_channels=cfg["cond_channels"],
                cond_downscale_rate=cfg["cond_downscale_rate"],
                deformable_groups=cfg["deformable_groups"],
                previous_offset_channel=previous,
                cond_conv=True,
            )
        self.conv_out_1 = nn.Sequential(group_norm(table[0][1]), nn.SiLU())
        self.conv_out = nn.Sequential(nn.Conv2d(table[0][1] + 3, 3, 3, padding=1))

    def forward(self, dec_feats: dict[str, Tensor], cond: Tensor, x_lq: Tensor) -> Tensor:
        x = warp_and_decode_levels(self, dec_feats, cond)
        return self.conv_out(torch.cat([self.conv_out_1(x), x_lq], dim=1))


class GeneralizedQuantizer(nn.Module):
    """One quantizer per quantized level (key ``quantize_dict.Level_N``)."""

    def __init__(self, quantizer_opt: dict):
        super().__init__()
        self.quantize_dict = nn.ModuleDict({name: build_quantizer(opt) for name, opt in quantizer_opt.items()})

    def forward(self, enc: dict[str, Tensor], iters: int = -1) -> dict[str, Quantized]:
        return {name: q(enc[name], iters=iters) for name, q in self.quantize_dict.items()}


def _freeze(module: nn.Module, fix_keys: list[str]) -> None:
    for name, p in module.named_parameters():
        if any(k in name for k in fix_keys):
            p.requires_grad_(False)


def _quant_outputs(quant: dict[str, Quantized]) -> dict:
    return {
        "feat_dict": {n: {"z_conv": q.z_conv, "z_quant_before_conv": q.z_quant_before_conv} for n, q in quant.items()},
        "quant_loss": sum(q.loss for q in quant.values()),
        "code_indices": {n: q.indices for n, q in quant.items()},
    }


class VQGANv1(Network):
    """Stage-1 v1 codebook model: reconstructs its input. Keys: ``encoder``, ``decoder``, ``quantizer``."""

    arch = "VQGANv1"

    def __init__(self, base_channels, proj_patch_size, resolution_scale_rates, channel_multipliers,
                 encoder_num_blocks, decoder_num_blocks, quant_level, quantizer_opt, fix_keys=()):
        super().__init__()
        self.encoder = EncoderV1(base_channels, proj_patch_size, resolution_scale_rates, channel_multipliers,
                                 encoder_num_blocks, quant_level)
        self.decoder = DecoderV1(base_channels, proj_patch_size, resolution_scale_rates, channel_multipliers,
                                 decoder_num_blocks)
        self.quantizer = GeneralizedQuantizer(quantizer_opt)
        self.patch = proj_patch_size
        init_official_(self)
        _freeze(self, list(fix_keys))

    def forward(self, x: Tensor, iters: int = -1, return_all: bool = False):
        """x [B,3,H,W] in [-1,1] -> reconstruction [B,3,H,W]; with ``return_all`` a dict with ``dec``,
        ``feat_dict``, ``quant_loss`` and ``code_indices``."""
        quant = self.quantizer(self.encoder(x), iters=iters)
        dec, _ = self.decoder(quant[self.decoder.level_names[0]].z_q)
        if not return_all:
            return dec
        return {"dec": dec, **_quant_outputs(quant)}


class VQFRv1(Network):
    """VQFR v1 restoration model.

    Keys, in the released order: ``inpfeat_extraction``, ``encoder``, ``decoder``, ``main_decoder``, ``quantizer``.
    ``model(x)`` returns the restored image ``main_dec`` [B,3,H,W] (unclamped, [-1,1] space) for
    x [B,3,H,W] in [-1,1], H and W multiples of 32.
    """

    arch = "VQFRv1"

    def __init__(self, base_channels, proj_patch_size, resolution_scale_rates, channel_multipliers,
                 encoder_num_blocks, decoder_num_blocks, quant_level, inpfeat_extraction_opt, align_opt,
                 align_from_patch, quantizer_opt, fix_keys=()):
        super().__init__()
        self.inpfeat_extraction = nn.Module()
        self.inpfeat_extraction.conv = nn.Conv2d(inpfeat_extraction_opt["in_dim"], inpfeat_extraction_opt["out_dim"],
                                                 3, padding=1)
        self.encoder = EncoderV1(base_channels, proj_patch_size, resolution_scale_rates, channel_multipliers,
                                 encoder_num_blocks, quant_level)
        self.decoder = DecoderV1(base_channels, proj_patch_size, resolution_scale_rates, channel_multipliers,
                                 decoder_num_blocks)
        self.main_decoder = MainDecoderV1(base_channels, resolution_scale_rates, channel_multipliers, align_opt,
                                          align_from_patch)
        self.quantizer = GeneralizedQuantizer(quantizer_opt)
        self.patch = proj_patch_size
        init_official_(self)
        _freeze(self, list(fix_keys))

    def forward(self, x: Tensor, iters: int = -1, return_all: bool = False, fidelity=None):
        """Restore x [B,3,H,W] in [-1,1].

        Args:
            x: degraded faces, H and W multiples of ``proj_patch_size``.
            iters: training iteration (k-means warm-up); ignored in eval mode.
            return_all: return a dict of the official outputs instead: ``dec`` (texture branch), ``main_dec``,
                ``feat_dict`` ({level: {z_conv, z_quant_before_conv}}), ``quant_loss``, ``code_indices``.
            fidelity: accepted and ignored, as in the official v1.

        Returns:
            ``main_dec`` [B,3,H,W], or the dict.
        """
        del fidelity
        cond = self.inpfeat_extraction.conv(x)
        quant = self.quantizer(self.encoder(x), iters=iters)
        dec, feats = self.decoder(quant[self.decoder.level_names[0]].z_q)
        main_dec = self.main_decoder(feats, cond, x)
        if not return_all:
            return main_dec
        return {"dec": dec, "main_dec": main_dec, **_quant_outputs(quant)}
