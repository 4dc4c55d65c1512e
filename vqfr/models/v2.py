"""The v2 family: VQGANv2 (stage-1 codebook model) and VQFRv2 (OFFICIAL_VQFR.md §4).

Inputs are [B, 3, H, W] in [-1, 1] with H and W multiples of 32 (512 for the released model, whose latent grid is
``quantizer_opt.spatial_size`` = 16x16).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from vqfr.models.blocks import AttnBlock, Downsample, Network, Upsample, init_official_, norm_act_conv
from vqfr.models.blocks import ResnetBlockV2 as ResnetBlock
from vqfr.models.quantizer import L2VectorQuantizer, build_quantizer
from vqfr.models.warping import TextureWarpingModule, warp_and_decode_levels


def _mid_blocks(channels: int, attention: bool) -> nn.Sequential:
    if attention:
        return nn.Sequential(ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels))
    return nn.Sequential(ResnetBlock(channels, channels), ResnetBlock(channels, channels))


def _stage(cin: int, cout: int, num_blocks: int, attention: bool, resample: nn.Module | None) -> nn.Sequential:
    """[resample], RB cin->cout, [Attn], then (RB, [Attn]) x (num_blocks - 1)."""
    layers: list[nn.Module] = [] if resample is None else [resample]
    for j in range(num_blocks):
        layers.append(ResnetBlock(cin if j == 0 else cout, cout))
        if attention:
            layers.append(AttnBlock(cout))
    return nn.Sequential(*layers)


class EncoderV2(nn.Module):
    """conv_in, ``blocks.i`` (Downsample first for i > 0; attention at the last level), ``mid_blocks``,
    ``conv_out`` (GN, SiLU, 3x3 -> code_dim). [B,3,H,W] -> [B, code_dim, H/32, W/32]."""

    def __init__(self, base_channels, channel_multipliers, num_blocks, use_enc_attention, code_dim):
        super().__init__()
        chans = [m * base_channels for m in channel_multipliers]
        last = len(chans) - 1
        self.conv_in = nn.Conv2d(3, chans[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            _stage(chans[max(i - 1, 0)], chans[i], num_blocks, use_enc_attention and i == last,
                   Downsample(chans[i - 1]) if i > 0 else None)
            for i in range(len(chans))
        )
        self.mid_blocks = _mid_blocks(chans[-1], use_enc_attention)
        self.conv_out = norm_act_conv(chans[-1], code_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.blocks:
            x = block(x)
        return self.conv_out(self.mid_blocks(x))


class DecoderV2(nn.Module):
    """conv_in (code_dim -> top channels), ``mid_blocks``, ``blocks.j`` for Level_32 .. Level_1 (Upsample first for
    j > 0), ``conv_out`` (GN, SiLU, 3x3 -> 3). Returns (image [B,3,H,W], {level: feature})."""

    def __init__(self, base_channels, channel_multipliers, num_blocks, use_dec_attention, code_dim):
        super().__init__()
        chans = [m * base_channels for m in channel_multipliers]
        last = len(chans) - 1
        self.level_names = [f"Level_{2**i}" for i in reversed(range(len(chans)))]
        self.conv_in = nn.Conv2d(code_dim, chans[-1], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.mid_blocks = _mid_blocks(chans[-1], use_dec_attention)
        for i in reversed(range(len(chans))):
            cin = chans[min(i + 1, last)]
            self.blocks.append(
                _stage(cin, chans[i], num_blocks, use_dec_attention and i == last, Upsample(cin) if i < last else None)
            )
        self.conv_out = norm_act_conv(chans[0], 3)

    def features(self, z: Tensor) -> dict[str, Tensor]:
        """z [B, code_dim, h, w] -> {level: feature}, coarse to fine."""
        x = self.mid_blocks(self.conv_in(z))
        feats = {}
        for name, block in zip(self.level_names, self.blocks, strict=True):
            x = block(x)
            feats[name] = x
        return feats

    def forward(self, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats = self.features(z)
        return self.conv_out(feats["Level_1"]), feats


class MainBranchV2(nn.Module):
    """Warps each texture level towards the input; returns the main-branch residual x [B, C_1, H, W] that the
    caller adds to the texture feature (scaled by the fidelity)."""

    def __init__(self, base_channels, channel_multipliers, align_opt):
        super().__init__()
        chans = [m * base_channels for m in channel_multipliers]
        last = len(chans) - 1
        self.coarsest = f"Level_{2**last}"
        self.level_names = [f"Level_{2**i}" for i in reversed(range(last))]
        self.decoder_dict = nn.ModuleDict()
        self.pre_upsample_dict = nn.ModuleDict()
        self.align_func_dict = nn.ModuleDict()
        for i in reversed(range(len(chans))):
            name, prev = f"Level_{2**i}", chans[min(i + 1, last)]
            if i < last:
                self.pre_upsample_dict[name] = nn.Sequential(
                    nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(prev, chans[i], 3, padding=1)
                )
            self.align_func_dict[name] = TextureWarpingModule(
                channel=chans[i],
                cond_channels=align_opt["cond_channels"],
                cond_downscale_rate=2**i,
                deformable_groups=align_opt["deformable_groups"],
                previous_offset_channel=0 if i == last else prev,
            )
            if i < last:
                self.decoder_dict[name] = ResnetBlock(2 * chans[i], chans[i])

    def forward(self, dec_feats: dict[str, Tensor], cond: Tensor) -> Tensor:
        return warp_and_decode_levels(self, dec_feats, cond)


def _is_tracing() -> bool:
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing())


def fidelity_is_zero(fidelity: float | Tensor) -> bool:
    """True when every fidelity is known to be 0 without a device sync or a data-dependent graph branch.

    A Python number, or a CPU tensor in eager mode, is checked; a CUDA tensor, or any tensor under tracing or
    compilation, is treated as possibly non-zero (the full computation is still exact at 0).
    """
    if isinstance(fidelity, (int, float)):
        return fidelity == 0
    if _is_tracing() or fidelity.device.type != "cpu":
        return False
    return bool((fidelity == 0).all())


def fidelity_weights(fidelity: float | Tensor, batch: int, like: Tensor) -> float | Tensor:
    """A float stays a float; a 0-d or [B] tensor becomes [B,1,1,1] in ``like``'s dtype and device."""
    if isinstance(fidelity, (int, float)):
        return float(fidelity)
    f = fidelity.to(device=like.device, dtype=like.dtype)
    if f.dim() == 0:
        return f.reshape(1, 1, 1, 1)
    if f.dim() != 1 or f.shape[0] != batch:
        raise ValueError(f"fidelity must be a float, a 0-d tensor or a [B={batch}] tensor; got shape {tuple(f.shape)}")
    return f.reshape(batch, 1, 1, 1)


class VQGANv2(Network):
    """Stage-1 v2 codebook model: reconstructs its input. Keys: ``encoder``, ``decoder``, ``quantizer``."""

    arch = "VQGANv2"

    def __init__(self, base_channels, channel_multipliers, num_enc_blocks, use_enc_attention, num_dec_blocks,
                 use_dec_attention, code_dim, quantizer_opt, fix_keys=()):
        super().__init__()
        self.encoder = EncoderV2(base_channels, channel_multipliers, num_enc_blocks, use_enc_attention, code_dim)
        self.decoder = DecoderV2(base_channels, channel_multipliers, num_dec_blocks, use_dec_attention, code_dim)
        self.quantizer = build_quantizer(quantizer_opt)
        self.patch = 2 ** (len(channel_multipliers) - 1)
        init_official_(self)
        for name, p in self.named_parameters():
            if any(k in name for k in fix_keys):
                p.requires_grad_(False)

    def forward(self, x: Tensor, return_all: bool = False):
        """x [B,3,H,W] in [-1,1] -> reconstruction [B,3,H,W]; with ``return_all`` a dict with ``dec``,
        ``quant_feat``, ``code_indices`` ([B, h*w]), ``quant_loss`` and ``enc_feat``."""
        enc = self.encoder(x)
        q = self.quantizer(enc)
        dec, _ = self.decoder(q.z_q)
        if not return_all:
            return dec
        return {"dec": dec, "quant_feat": q.z_q, "code_indices": q.indices, "quant_loss": q.loss, "enc_feat": enc}


class VQFRv2(Network):
    """VQFR v2 restoration model.

    Keys, in the released order: ``encoder``, ``feat2index``, ``decoder``, ``main_branch``, ``inpfeat_extraction``,
    ``quantizer``. ``model(x, fidelity=f)`` returns the restored image ``main_dec`` [B,3,H,W] (unclamped).
    """

    arch = "VQFRv2"

    def __init__(self, base_channels, channel_multipliers, num_enc_blocks, use_enc_attention, num_dec_blocks,
                 use_dec_attention, code_dim, inpfeat_dim, code_selection_mode, align_opt, quantizer_opt):
        super().__init__()
        if code_selection_mode not in ("Predict", "Nearest"):
            raise ValueError(f"code_selection_mode must be 'Predict' or 'Nearest', got {code_selection_mode!r}")
        if align_opt["cond_channels"] != inpfeat_dim:
            raise ValueError(f"align_opt.cond_channels ({align_opt['cond_channels']}) must equal inpfeat_dim "
                             f"({inpfeat_dim})")
        self.encoder = EncoderV2(base_channels, channel_multipliers, num_enc_blocks, use_enc_attention, code_dim)
        self.feat2index = None
        if code_selection_mode == "Predict":
            # LayerNorm keeps torch's default eps 1e-5, as in the official model.
            self.feat2index = nn.Sequential(
                nn.LayerNorm(quantizer_opt["code_dim"]), nn.Linear(quantizer_opt["code_dim"], quantizer_opt["num_code"])
            )
        self.decoder = DecoderV2(base_channels, channel_multipliers, num_dec_blocks, use_dec_attention, code_dim)
        self.main_branch = MainBranchV2(base_channels, channel_multipliers, align_opt)
        self.inpfeat_extraction = nn.Conv2d(3, inpfeat_dim, 3, padding=1)
        self.quantizer = build_quantizer(quantizer_opt)
        assert isinstance(self.quantizer, L2VectorQuantizer)
        self.patch = 2 ** (len(channel_multipliers) - 1)
        init_official_(self)

    def select_codes(self, enc_feat: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """enc_feat [B, code_dim, h, w] -> (codebook feature [B, code_dim, h, w], logits [B, h*w, K] or None,
        indices [B, h*w])."""
        b, c, h, w = enc_feat.shape
        if self.feat2index is None:
            q = self.quantizer(enc_feat)
            return q.z_q, None, q.indices
        logits = self.feat2index(enc_feat.permute(0, 2, 3, 1).reshape(b, h * w, c))
        indices = logits.argmax(-1)
        return self.quantizer.get_feature(indices, h, w), logits, indices

    def forward(self, x: Tensor, fidelity: float | Tensor = 1.0, return_all: bool = False):
        """Restore x [B,3,H,W] in [-1,1].

        Args:
            x: degraded faces, H and W multiples of 32.
            fidelity: a float, a 0-d tensor or a [B] tensor (one per image). It scales the warped main-branch
                residual: 0 gives the texture branch alone (the demo default), 1 the training setting. In eval mode,
                when every value is known to be 0, the main branch is skipped; the output is identical, since the
                official ``conv_out(texture + 0 * x)`` equals the texture output. In training it still runs, as the
                official graph does: the texture output alone was computed without autograd.
            return_all: return a dict of the official outputs: ``enc_feat``, ``quant_logit``, ``texture_dec``,
                ``main_dec``, plus ``code_indices``.

        Returns:
            ``main_dec`` [B,3,H,W], or the dict.
        """
        enc_feat = self.encoder(x)
        quant_feat, logits, indices = self.select_codes(enc_feat)
        # The texture decoder is frozen in training, as the official code runs it under no_grad.
        with torch.no_grad() if self.training else contextlib.nullcontext():
            texture_dec, dec_feats = self.decoder(quant_feat)
        weight = fidelity_weights(fidelity, x.shape[0], x)  # checks the shape, even where the branch is skipped
        if not self.training and fidelity_is_zero(fidelity):
            main_dec = texture_dec
        else:
            residual = self.main_branch(dec_feats, self.inpfeat_extraction(x))
            # Official quirk, kept: the main branch reuses the texture decoder's conv_out.
            main_dec = self.decoder.conv_out(dec_feats["Level_1"] + weight * residual)
        if not return_all:
            return main_dec
        return {"enc_feat": enc_feat, "quant_logit": logits, "texture_dec": texture_dec, "main_dec": main_dec,
                "code_indices": indices}
