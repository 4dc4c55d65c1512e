"""Triton kernels of GroupNorm (+ SiLU): a statistics pass and an apply pass, both reading whole pixel rows.

Imported lazily by :mod:`kernels.dispatch` (triton is an optional dependency); the reference that these kernels must
reproduce is :func:`kernels.group_norm.group_norm_silu_reference`.

Why not the obvious per-group reduction: with channels-last (NHWC) activations, one group's 4 channels are 8
contiguous bytes of each 256-byte pixel row (fp16, 128 channels), so a program per (image, group) reads scattered
sectors. Here every program reads [pixels, channels] tiles of whole rows (coalesced along C in NHWC, along the pixels
in NCHW: the kernels take strides and Triton vectorises along whichever is contiguous), and groups are formed later
from per-channel statistics.

Three steps per call (grids in the launcher):

1. :func:`_group_norm_stats_kernel`, grid (SPLIT, N): program (s, n) owns pixels
   ``[s*PIX_PER_PROG, (s+1)*PIX_PER_PROG)`` of image n and writes, per channel, the fp32 mean and M2 (sum of squared
   deviations) of its pixels (their count follows from the geometry): two passes over each [BLOCK_P, BLOCK_C] tile
   held in registers (tile mean, then squared deviations), merged into the running values with Chan's parallel
   formula. No sum of squares anywhere: activations with a mean of 1000 and a standard deviation of 1 keep their
   variance.
2. torch ops on the [N, SPLIT, C] partials (0.5 MB at most at VQFR's shapes): Chan's formula again over (program,
   channel of the group) gives mean and rstd per (n, group), and the affine is folded into per-(n, c)
   ``scale = rstd * weight`` and ``shift = bias - mean * scale`` (fp32). Under torch.compile Inductor traces and fuses
   these.
3. :func:`_group_norm_apply_kernel`, grid (pixel tiles, channel tiles, N): ``y = x * scale + shift``, SiLU when
   asked, one rounding to the output dtype: one read of x and one write of y.

DRAM traffic: x read twice, y written once (the partials and scales are small).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import dispatch
from kernels.dispatch import Launch
from kernels.group_norm import output_memory_format

__all__ = ["group_norm_silu", "stats_launch", "apply_launch", "combine", "pixels_per_program"]

# Builtins only (tl.full, tl.exp, tl.reduce with triton's standard combine functions): see deform_conv_triton.py.


@triton.jit
def _group_norm_stats_kernel(
    # pointers
    x_ptr,  # [N, C, HW] through strides (NCHW or NHWC; H and W merged into one pixel axis)
    mean_ptr,  # [N, SPLIT, C] fp32 out: mean of each channel over the program's pixels
    m2_ptr,  # [N, SPLIT, C] fp32 out: sum of squared deviations from that mean
    # sizes
    C, HW,
    PIX_PER_PROG,  # pixels per program (the last program of an image may have fewer)
    SPLIT,  # programs per image
    # strides (elements)
    sxn, sxc, sxp,
    # meta-parameters
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    s = tl.program_id(0)
    n = tl.program_id(1)
    start = s * PIX_PER_PROG
    end = tl.minimum(start + PIX_PER_PROG, HW)
    rp = tl.arange(0, BLOCK_P)
    rc = tl.arange(0, BLOCK_C)
    x_n = x_ptr + n.to(tl.int64) * sxn  # in-image offsets fit 32 bits (checked by the launcher)
    out = (n * SPLIT + s).to(tl.int64) * C
    for c0 in range(0, C, BLOCK_C):
        c = c0 + rc
        c_ok = c < C
        mean = tl.full((BLOCK_C,), 0.0, tl.float32)
        m2 = tl.full((BLOCK_C,), 0.0, tl.float32)
        for p0 in range(start, end, BLOCK_P):
            p = p0 + rp
            ok = (p < end)[:, None] & c_ok[None, :]
            v = tl.load(x_n + (p * sxp)[:, None] + (c * sxc)[None, :], mask=ok, other=0.0).to(tl.float32)
            # The tile's own mean and M2 (exact two-pass: the tile is in registers).
            cnt = tl.minimum(end - p0, BLOCK_P).to(tl.float32)
            t_mean = tl.reduce(v, 0, tl.standard._sum_combine) / cnt
            d = tl.where(ok, v - t_mean[None, :], 0.0)
            t_m2 = tl.reduce(d * d, 0, tl.standard._sum_combine)
            # Chan et al.: merge (seen, mean, m2) with (cnt, t_mean, t_m2). Every earlier tile was full, so `seen`
            # is known without a loop-carried count.
            seen = (p0 - start).to(tl.float32)
            total = seen + cnt
            delta = t_mean - mean
            mean += delta * (cnt / total)
            m2 += t_m2 + delta * delta * (seen * cnt / total)
        tl.store(mean_ptr + out + c, mean, mask=c_ok)
        tl.store(m2_ptr + out + c, m2, mask=c_ok)


@triton.jit
def _group_norm_apply_kernel(
    # pointers
    x_ptr,  # [N, C, HW] through strides
    scale_ptr,  # [N, C] fp32 contiguous: rstd * weight
    shift_ptr,  # [N, C] fp32 contiguous: bias - mean * scale
    y_ptr,  # [N, C, HW] through strides (the memory format of x), dtype of x
    # sizes
    N, C, HW,  # N only keys the autotuner
    # strides (elements)
    sxn, sxc, sxp,
    syn, syc, syp,
    # meta-parameters
    SILU: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    ok = (p < HW)[:, None] & c_ok[None, :]
    a = tl.load(scale_ptr + n * C + c, mask=c_ok, other=0.0)
    b = tl.load(shift_ptr + n * C + c, mask=c_ok, other=0.0)
    n64 = n.to(tl.int64)
    v = tl.load(x_ptr + n64 * sxn + ((p * sxp)[:, None] + (c * sxc)[None, :]), mask=ok, other=0.0).to(tl.float32)
    y = v * a[None, :] + b[None, :]
    if SILU:
        y = y / (1.0 + tl.exp(-y))  # SiLU; exp overflows to inf for y < -88 and y / inf = -0, the limit
    tl.store(y_ptr + n64 * syn + ((p * syp)[:, None] + (c * syc)[None, :]), y.to(y_ptr.dtype.element_ty), mask=ok)


# --- autotune configs -------------------------------------------------------------------------------------------
# H100-class GPUs, memory-bound: tiles of 4K to 8K elements (8 to 16 KiB in fp16), 4 or 8 warps. Wide channel tiles
# read whole NHWC rows (128 channels = 256 B); a narrow channel tile with long pixel runs suits NCHW. Five configs
# per kernel, benchmarked once per key (a few seconds at most); under the interpreter one config, never benchmarked.

def _cfg(bp: int, bc: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=warps, num_stages=2)


if dispatch.interpreting():
    # Narrow tiles, so that small test images still span several tiles, programs and channel blocks.
    STATS_CONFIGS = [_cfg(16, 64, 1)]
    APPLY_CONFIGS = [_cfg(32, 64, 1)]
else:
    STATS_CONFIGS = [_cfg(32, 128, 4), _cfg(64, 128, 8), _cfg(16, 256, 4), _cfg(64, 64, 4), _cfg(128, 32, 4)]
    APPLY_CONFIGS = [_cfg(64, 128, 4), _cfg(32, 128, 4), _cfg(128, 64, 8), _cfg(16, 256, 4), _cfg(128, 32, 4)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop channel tiles wider than the channels (masked work only); keep at least the narrowest."""
    widest = max(16, triton.next_power_of_2(named_args["C"]))
    kept = [c for c in configs if c.kwargs["BLOCK_C"] <= widest]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_C"])]


# The autotuner adds the tensors' dtypes to the key; sxc tells NHWC (1) from NCHW (HW). The group count is not in
# the key: neither kernel depends on it (groups are formed in the torch step).
_stats = triton.autotune(STATS_CONFIGS, key=["C", "HW", "PIX_PER_PROG", "sxc"],
                         prune_configs_by={"early_config_prune": _prune})(_group_norm_stats_kernel)
_apply = triton.autotune(APPLY_CONFIGS, key=["N", "C", "HW", "sxc", "SILU"],
                         prune_configs_by={"early_config_prune": _prune})(_group_norm_apply_kernel)


# --- launchers ----------------------------------------------------------------------------------------------------

#: Pixels per stats program are a multiple of this (the widest BLOCK_P), so that only an image's last tile is partial.
PIXEL_GRAIN = 128
#: Pixels per stats program under the interpreter: several programs per small test image, two tiles each.
INTERPRETER_PIXELS = 32


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def pixels_per_program(n: int, hw: int, device: torch.device) -> int:
    """Pixels per statistics program: about 4 waves of programs over the GPU's SMs, each a multiple of
    :data:`PIXEL_GRAIN` pixels (the whole image when it is small). Not autotuned: it fixes the partials' layout,
    which the torch step (traced before any kernel runs under torch.compile) must know."""
    if dispatch.interpreting() or device.type != "cuda":
        return INTERPRETER_PIXELS
    programs = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    split = max(1, min(triton.cdiv(programs, n), triton.cdiv(hw, PIXEL_GRAIN)))
    return triton.cdiv(triton.cdiv(hw, split), PIXEL_GRAIN) * PIXEL_GRAIN


def _flat(t: Tensor) -> Tensor:
    """[N, C, H, W] -> [N, C, H*W]: a view for NCHW and NHWC tensors (a copy only for other strides)."""
    return t.flatten(2)


def _check_offsets(flat: Tensor) -> None:
    n, c, hw = flat.shape
    span = (c - 1) * abs(flat.stride(1)) + (hw - 1) * abs(flat.stride(2))
    if span >= 2**31:
        raise ValueError(f"group_norm_silu: one image of shape {tuple(flat.shape)} spans {span} elements, past the "
                         "kernels' 32-bit in-image offsets; run it with kernels.use('reference')")


def stats_launch(xf: Tensor, pixels: int) -> tuple[tuple[Tensor, Tensor], Launch]:
    """Allocate the [N, SPLIT, C] fp32 partials (mean, M2) and describe the statistics launch on ``xf`` [N, C, HW]."""
    n, c, hw = xf.shape
    split = triton.cdiv(hw, pixels)
    mean = torch.empty(n, split, c, dtype=torch.float32, device=xf.device)
    m2 = torch.empty(n, split, c, dtype=torch.float32, device=xf.device)

    def grid(meta):
        return (split, n)

    return (mean, m2), Launch(_stats, grid, [xf, mean, m2, c, hw, pixels, split, *xf.stride()], {})


def combine(mean: Tensor, m2: Tensor, hw: int, pixels: int, weight: Tensor | None, bias: Tensor | None,
            num_groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """Per-(n, c) fp32 ``(scale, shift)`` from the [N, SPLIT, C] partials of :func:`_group_norm_stats_kernel`.

    Chan's formula over the SPLIT x C/G parts of each group: ``mean = sum(n_i m_i) / total`` and
    ``M2 = sum(M2_i) + sum(n_i (m_i - mean)^2)``; the variance is biased (``M2 / total``), as torch's GroupNorm.
    """
    n, split, c = mean.shape
    cpg = c // num_groups
    counts = torch.full((split,), float(pixels), dtype=torch.float32, device=mean.device)
    counts[-1] = hw - (split - 1) * pixels
    counts = counts.view(1, split, 1, 1)
    parts_mean = mean.view(n, split, num_groups, cpg)
    total = float(hw * cpg)
    group_mean = (parts_mean * counts).sum((1, 3)) / total  # [N, G]
    dev = parts_mean - group_mean.view(n, 1, num_groups, 1)
    group_m2 = m2.view(n, split, num_groups, cpg).sum((1, 3)) + (counts * dev * dev).sum((1, 3))
    rstd = torch.rsqrt(group_m2 / total + eps)
    scale = rstd.repeat_interleave(cpg, dim=1)  # [N, C]
    if weight is not None:
        scale = scale * weight.to(torch.float32)
    shift = -group_mean.repeat_interleave(cpg, dim=1) * scale
    if bias is not None:
        shift = shift + bias.to(torch.float32)
    return scale.contiguous(), shift.contiguous()


def apply_launch(xf: Tensor, scale: Tensor, shift: Tensor, yf: Tensor, silu: bool) -> Launch:
    """Describe the apply launch: ``yf = SiLU?(xf * scale + shift)``, all [N, C, HW] through strides."""
    n, c, hw = xf.shape

    def grid(meta):
        return (triton.cdiv(hw, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]), n)

    return Launch(_apply, grid, [xf, scale, shift, yf, n, c, hw, *xf.stride(), *yf.stride()], dict(SILU=silu))


def group_norm_silu(x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float,
                    silu: bool) -> Tensor:
    """GroupNorm (+ SiLU) with the Triton kernels. Arguments already validated by ``check_group_norm_args``.

    Returns:
        [N, C, H, W] in the dtype and memory format (NCHW or channels-last) of ``x``.
    """
    n, c, h, w = x.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    if y.numel() == 0:
        return y
    xf, yf = _flat(x), _flat(y)  # y is NCHW or NHWC: a view
    _check_offsets(xf)
    pixels = pixels_per_program(n, h * w, x.device)
    (mean, m2), stats = stats_launch(xf, pixels)
    dispatch.launchable(stats.kernel)[stats.grid](*stats.args, **stats.constexprs)
    scale, shift = combine(mean, m2, h * w, pixels, weight, bias, num_groups, eps)
    apply = apply_launch(xf, scale, shift, yf, silu)
    dispatch.launchable(apply.kernel)[apply.grid](*apply.args, **apply.constexprs)
    return y
