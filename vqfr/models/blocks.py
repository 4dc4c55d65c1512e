"""Building blocks shared by the v1 and v2 architecture families.

State-dict key names follow the official code exactly; see ``../shared/reference/OFFICIAL_VQFR.md`` §1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Network(nn.Module):
    """Base of the four top-level architectures (VQGAN and VQFR, v1 and v2): the attributes callers read.

    ``arch`` is the options' ``type``; ``patch`` is the side, in pixels, of the square one code token covers;
    ``options`` is the dict the model was built from (set by ``vqfr.build_model``); ``weights_path`` is the
    checkpoint it was loaded from (set by ``vqfr.load_model`` only).
    """

    arch: str
    patch: int
    options: dict[str, Any]
    weights_path: str  # set by ``vqfr.load_model`` only


def group_norm(channels: int) -> nn.GroupNorm:
    """The official normalisation: GroupNorm with 32 groups, eps 1e-6, affine."""
    if channels % 32 != 0:
        raise ValueError(f"GroupNorm(32) needs a channel count divisible by 32, got {channels}")
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def norm_act_conv(cin: int, cout: int, kernel_size: int = 3) -> nn.Sequential:
    """GN, SiLU, conv: the official ``conv_out`` layout (keys ``0.*`` and ``2.*``)."""
    return nn.Sequential(group_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2))


def norm_silu(norm: nn.Module, x: Tensor, inplace: bool = False) -> Tensor:
    """``SiLU(norm(x))``; a norm that applies the SiLU itself (``applies_silu`` True: the fused GroupNorm + SiLU of
    :mod:`vqfr.backends.torch_fast`) is only called."""
    if getattr(norm, "applies_silu", False):
        return norm(x)
    return F.silu(norm(x), inplace=inplace)


class ResnetBlock(nn.Module):
    """``skip(x) + conv2(SiLU(GN2(conv1(SiLU(GN1(x))))))`` with 3x3 convs.

    The skip is a 1x1 conv when ``cin != cout`` and the identity (no keys) otherwise. Its key name differs between
    the families, so each family's subclass sets ``skip_name``.

    Shapes: [B, cin, H, W] -> [B, cout, H, W].
    """

    skip_name = "shortcut_conv"
    #: The norms whose output goes straight into a SiLU (through :func:`norm_silu`): a fused GroupNorm + SiLU may
    #: replace them.
    silu_norms = ("norm1", "norm2")

    def __init__(self, cin: int, cout: int | None = None):
        super().__init__()
        cout = cin if cout is None else cout
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.add_module(self.skip_name, nn.Conv2d(cin, cout, 1))

    def forward(self, x: Tensor) -> Tensor:
        # Without autograd the SiLU overwrites the fresh GroupNorm output instead of keeping both: at v1's finest
        # level that pair is 2 x 1.07 GB at batch 8 in fp16 (same values either way).
        inplace = not torch.is_grad_enabled()
        h = self.conv1(norm_silu(self.norm1, x, inplace))
        h = self.conv2(norm_silu(self.norm2, h, inplace))
        skip = self._modules.get(self.skip_name)
        return (x if skip is None else skip(x)) + h


class ResnetBlockV2(ResnetBlock):
    """The v2 family's ResnetBlock: same maths, skip conv named ``residual_func``."""

    skip_name = "residual_func"


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w tokens, with a residual.

    ``softmax_j(q_i . k_j * int(c)^-0.5)`` weights ``v``, then ``proj_out``. Keys: ``norm, q, k, v, proj_out``.
    Shapes: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.norm(x)
        # [B, 1, HW, C] so that scaled_dot_product_attention attends over the HW tokens.
        q, k, v = (conv(t).reshape(b, 1, c, h * w).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, scale=int(c) ** -0.5)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class UpDownSample(nn.Module):
    """The v1 resampler: identity (no keys) at scale 1; else a 3x3 conv and a bilinear resize.

    ``up``: conv at the low resolution first, then bilinear to ``scale*h``.
    ``down``: bilinear to ``h // scale`` first, then the conv. A bilinear /32 reads just the 2x2 pixels around
    32i+15.5 (no antialias), as the official code does.
    """

    def __init__(self, cin: int, cout: int, scale: int, direction: str):
        super().__init__()
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        if int(scale) != scale or scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale!r}")
        self.scale = int(scale)
        self.direction = direction
        if self.scale != 1:
            self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.scale == 1:
            return x
        h, w = x.shape[-2:]
        if self.direction == "up":
            x = self.conv(x)
            return F.interpolate(x, size=(h * self.scale, w * self.scale), mode="bilinear", align_corners=False)
        x = F.interpolate(x, size=(h // self.scale, w // self.scale), mode="bilinear", align_corners=False)
        return self.conv(x)


class Downsample(nn.Module):
    """The v2 downsampler: zero-pad right and bottom by 1, then a 3x3 stride-2 conv. [B,C,H,W] -> [B,C,H/2,W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """The v2 upsampler: nearest x2, then a 3x3 conv. [B,C,H,W] -> [B,C,2H,2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def init_official_(module: nn.Module) -> None:
    """The official ``_init_weights``: trunc-normal(0.02) convs and linears with zero bias; unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def levels(count: int) -> list[str]:
    """``['Level_1', 'Level_2', ...]`` for ``count`` levels."""
    return [f"Level_{2**i}" for i in range(count)]

