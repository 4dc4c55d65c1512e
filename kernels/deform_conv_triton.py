"""Triton kernels of the modulated deformable convolution: forward as an implicit GEMM, and its backward.

Imported lazily by :mod:`kernels.dispatch` (triton is an optional dependency); the reference that these kernels must
reproduce is :func:`kernels.deform_conv.deform_conv2d_reference`. The GEMM view of the convolution is

    out[m, n] = sum over (tap k, input channel c) of col[m, (k, c)] * weight[n, c, k]      m = (b, oy, ox) pixel

where ``col[m, (k, c)] = mask * bilinear(x[b, c], position of tap k at pixel m, offset group of c)``. No ``col``
buffer is ever written: every program gathers its own [BLOCK_M, BLOCK_C] slice of it from the four bilinear corners
and feeds ``tl.dot`` straight away. Sampling coordinates, interpolation weights and accumulators are fp32 whatever
the storage dtype; the gathered slice is rounded once to the storage dtype to enter the tensor cores.

Kernels (grids in their launchers):
- :func:`_fwd_kernel`: one program per (pixel tile, output-channel tile); one software-pipelined loop over
  (group, tap, channel block).
- :func:`_bwd_input_kernel`: one program per (pixel tile, group, tap). It rebuilds ``grad_col = grad_out @ W_k`` for
  the group's channels, then writes grad_mask and grad_offset (the 4-corner derivative) for its pixels and scatters
  grad_x to the four corners with fp32 atomics. Constexpr flags drop the parts whose gradient is not needed.
- :func:`_bwd_weight_kernel`: one program per (tap, group, channel block, output-channel tile, pixel split); it
  accumulates ``col^T @ grad_out`` over its pixels and adds it into an fp32 buffer with atomics. Not launched when
  the weight needs no gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import dispatch
from kernels.dispatch import Launch

__all__ = ["forward", "backward", "forward_launch", "backward_launches", "untuned"]

# The kernels call triton.language builtins only: tl.full rather than tl.zeros, and tl.reduce with triton's own
# combine functions rather than tl.sum / tl.argmin. Those helpers are themselves @triton.jit functions, compiled or
# interpreted once and for all when triton is first imported, and torch imports triton on its own (with its first
# custom-op call), so under TRITON_INTERPRET=1 set later they would not run. The interpreter recognises the standard
# combine functions and reduces with numpy; compiled, tl.reduce with them is exactly what tl.sum / tl.argmin emit.


@triton.jit
def _corners(py, px, ok, H, W):
    """The bilinear corners of sample points ``(py, px)`` ([BLOCK_M] fp32) under torchvision's rule: a point outside
    (-1, H) x (-1, W) reads 0, and so does each of its corners outside the image. Returns the top-left corner
    ``(y0, x0)`` (int32), the fractions ``(ly, lx)``, and which corner rows and columns are valid:
    ``(top_ok, bot_ok, lft_ok, rgt_ok)``."""
    # Moving an outside point to -2 keeps the corner arithmetic finite and fails the top/left tests; the bottom test
    # also requires `inside`, since y0 + 1 = -1 is still out.
    inside = ok & (py > -1.0) & (py < H) & (px > -1.0) & (px < W)
    py = tl.where(inside, py, -2.0)
    px = tl.where(inside, px, -2.0)
    y0f = tl.floor(py)
    x0f = tl.floor(px)
    y0 = y0f.to(tl.int32)
    x0 = x0f.to(tl.int32)
    return y0, x0, py - y0f, px - x0f, y0 >= 0, inside & (y0 < H - 1), x0 >= 0, x0 < W - 1


@triton.jit
def _fwd_kernel(
    # pointers
    x_ptr,  # [B, C_IN, H, W], any strides (channels-last from the launcher: a corner's channels load as vectors)
    offset_ptr,  # [B, 2*G*KH*KW, H_OUT, W_OUT], any strides, (dy, dx) interleaved per tap
    mask_ptr,  # [B, G*KH*KW, H_OUT, W_OUT], any strides
    w_ptr,  # [KH*KW, C_IN, C_OUT] contiguous: the weight repacked so that output channels are contiguous
    bias_ptr,  # [C_OUT] contiguous (unused unless HAS_BIAS)
    out_ptr,  # [B, C_OUT, H_OUT, W_OUT], any strides
    # sizes
    C_IN, H, W, C_OUT, H_OUT, W_OUT, G, CG,  # CG = C_IN // G channels per offset group
    M,  # B * H_OUT * W_OUT output pixels (the GEMM's M)
    # convolution geometry
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    # strides (elements)
    sxb, sxc, sxh, sxw,
    sob, soc, soh, sow,
    smb, smc, smh, smw,
    syb, syc, syh, syw,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for exact fp32, "tf32" when torch allows it; None for fp16/bf16
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    GATHER_L1: tl.constexpr,  # 1: the corner loads ask for L1 caching (".ca"), 0: triton's default (see FWD_CONFIGS)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flat output pixels (b, oy, ox)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
    rc = tl.arange(0, BLOCK_C)
    m_ok = rm < M
    n_ok = rn < C_OUT
    b64 = (rm // (H_OUT * W_OUT)).to(tl.int64)  # batch offsets pass 2**31 elements at 64x128x512x512
    oy = (rm // W_OUT) % H_OUT
    ox = rm % W_OUT
    top = oy * STRIDE_H - PAD_H  # integer sample position of tap (0, 0) before the offset
    left = ox * STRIDE_W - PAD_W
    off_pix = offset_ptr + b64 * sob + oy * soh + ox * sow
    msk_pix = mask_ptr + b64 * smb + oy * smh + ox * smw

    x_b = b64 * sxb  # [BLOCK_M] start of each pixel's image
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    # One flat loop over (offset group, tap, channel block) rather than three nested ones: VQFR's groups have 32 to
    # 128 channels, so the innermost loop would run once or twice per tap, and Triton software-pipelines only the
    # innermost loop. Flat, the loads of step t + 1 (offsets, mask, the four corner tiles, the weight tile) are
    # issued while step t's tl.dot runs, for num_stages > 1. A tap's offsets and corner weights are recomputed per
    # channel block; they are per-pixel vectors, cheap beside the [BLOCK_M, BLOCK_C] gathers.
    n_cb = (CG + BLOCK_C - 1) // BLOCK_C
    for t in range(0, G * KH * KW * n_cb):
        gk = t // n_cb
        g = gk // (KH * KW)
        k = gk % (KH * KW)
        c = (t % n_cb) * BLOCK_C + rc
        # Sample position of tap k in fp32; its integer part is exact, as in the reference.
        off_k = off_pix + (g * (2 * KH * KW) + 2 * k) * soc
        dy = tl.load(off_k, mask=m_ok, other=0.0).to(tl.float32)
        dx = tl.load(off_k + soc, mask=m_ok, other=0.0).to(tl.float32)
        mk = tl.load(msk_pix + (g * (KH * KW) + k) * smc, mask=m_ok, other=0.0).to(tl.float32)
        py = (top + (k // KW) * DIL_H).to(tl.float32) + dy
        px = (left + (k % KW) * DIL_W).to(tl.float32) + dx
        y0, x0, ly, lx, top_ok, bot_ok, lft_ok, rgt_ok = _corners(py, px, m_ok, H, W)
        # Corner weights, mask folded in.
        hym = (1.0 - ly) * mk
        lym = ly * mk
        w00 = tl.where(top_ok & lft_ok, hym * (1.0 - lx), 0.0)[:, None]
        w01 = tl.where(top_ok & rgt_ok, hym * lx, 0.0)[:, None]
        w10 = tl.where(bot_ok & lft_ok, lym * (1.0 - lx), 0.0)[:, None]
        w11 = tl.where(bot_ok & rgt_ok, lym * lx, 0.0)[:, None]
        # Element offsets are kept 1-D (per pixel, per channel) and only combined at each load: 2-D 64-bit
        # pointer tiles held across the loop cost two registers per element and made every config spill.
        pix = x_b + (y0 * sxh + x0 * sxw)  # corner (y0, x0); only dereferenced where valid
        c_ok = (c < CG)[None, :]
        p = x_ptr + (pix[:, None] + ((g * CG + c) * sxc)[None, :])
        # An int flag rather than a string constexpr in the configs: Inductor re-emits the configs of a traced
        # triton_op, and ints are what its other tiles are.
        cache: tl.constexpr = ".ca" if GATHER_L1 else ""
        col = tl.load(p, mask=(top_ok & lft_ok)[:, None] & c_ok, other=0.0, cache_modifier=cache).to(tl.float32) * w00
        col += tl.load(p + sxw, mask=(top_ok & rgt_ok)[:, None] & c_ok, other=0.0,
                       cache_modifier=cache).to(tl.float32) * w01
        col += tl.load(p + sxh, mask=(bot_ok & lft_ok)[:, None] & c_ok, other=0.0,
                       cache_modifier=cache).to(tl.float32) * w10
        col += tl.load(p + (sxh + sxw), mask=(bot_ok & rgt_ok)[:, None] & c_ok, other=0.0,
                       cache_modifier=cache).to(tl.float32) * w11
        wt = tl.load(w_ptr + ((k * C_IN + g * CG + c) * C_OUT)[:, None] + rn[None, :],
                     mask=tl.trans(c_ok) & n_ok[None, :], other=0.0)
        acc = tl.dot(col.to(wt.dtype), wt, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + b64[:, None] * syb + rn[None, :] * syc + (oy * syh + ox * syw)[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _bwd_input_kernel(
    # pointers
    gout_ptr,  # [B, C_OUT, H_OUT, W_OUT], any strides
    x_ptr,  # [B, C_IN, H, W], any strides (channels-last from the launcher)
    offset_ptr,  # [B, 2*G*KH*KW, H_OUT, W_OUT], any strides
    mask_ptr,  # [B, G*KH*KW, H_OUT, W_OUT], any strides
    w_ptr,  # [KH*KW, C_IN, C_OUT] contiguous
    gx_ptr,  # [B, C_IN, H, W] fp32, zero-filled, strides of x: accumulated with atomics (unused unless NEED_X)
    goff_ptr,  # [B, 2*G*KH*KW, H_OUT, W_OUT] contiguous, written (dtype of offset; unused unless NEED_OFFSET)
    gmask_ptr,  # [B, G*KH*KW, H_OUT, W_OUT] contiguous, written (dtype of mask; unused unless NEED_MASK)
    # sizes
    C_IN, H, W, C_OUT, H_OUT, W_OUT, G, CG, M,
    # convolution geometry
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    # strides (elements); grad_x shares those of x
    sgb, sgc, sgh, sgw,
    sxb, sxc, sxh, sxw,
    sob, soc, soh, sow,
    smb, smc, smh, smw,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr,
    NEED_X: tl.constexpr, NEED_OFFSET: tl.constexpr, NEED_MASK: tl.constexpr,  # which gradients to produce
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_gk = tl.program_id(1)  # (offset group, tap)
    g = pid_gk // (KH * KW)
    k = pid_gk % (KH * KW)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.arange(0, BLOCK_C)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    hw_out = H_OUT * W_OUT
    b64 = (rm // hw_out).to(tl.int64)
    p = rm % hw_out
    oy = p // W_OUT
    ox = p % W_OUT

    # Same sample geometry as the forward, but the mask stays apart: it has its own gradient.
    off_k = offset_ptr + b64 * sob + (g * 2 * KH * KW + 2 * k) * soc + oy * soh + ox * sow
    dy = tl.load(off_k, mask=m_ok, other=0.0).to(tl.float32)
    dx = tl.load(off_k + soc, mask=m_ok, other=0.0).to(tl.float32)
    mk = tl.load(mask_ptr + b64 * smb + (g * KH * KW + k) * smc + oy * smh + ox * smw, mask=m_ok,
                 other=0.0).to(tl.float32)
    py = (oy * STRIDE_H - PAD_H + (k // KW) * DIL_H).to(tl.float32) + dy
    px = (ox * STRIDE_W - PAD_W + (k % KW) * DIL_W).to(tl.float32) + dx
    y0, x0, ly, lx, top_ok, bot_ok, lft_ok, rgt_ok = _corners(py, px, m_ok, H, W)
    ly = ly[:, None]
    lx = lx[:, None]
    hy = 1.0 - ly
    hx = 1.0 - lx
    ok00 = (top_ok & lft_ok)[:, None]
    ok01 = (top_ok & rgt_ok)[:, None]
    ok10 = (bot_ok & lft_ok)[:, None]
    ok11 = (bot_ok & rgt_ok)[:, None]
    pix = b64 * sxb + (y0 * sxh + x0 * sxw)  # [BLOCK_M] corner (y0, x0) in x and in grad_x
    go_pix = b64 * sgb + (oy * sgh + ox * sgw)  # [BLOCK_M]

    # Per-channel products, reduced over channels once at the end.
    acc_mask = tl.full((BLOCK_M, BLOCK_C), 0.0, tl.float32)
    acc_dy = tl.full((BLOCK_M, BLOCK_C), 0.0, tl.float32)
    acc_dx = tl.full((BLOCK_M, BLOCK_C), 0.0, tl.float32)
    for c0 in range(0, CG, BLOCK_C):
        cin = g * CG + c0 + rc
        c_ok = (c0 + rc < CG)[None, :]
        # grad_col[m, c] = sum_n grad_out[m, n] * weight[n, c, k]: a [BLOCK_M, BLOCK_C] GEMM tile over C_OUT.
        g_col = tl.full((BLOCK_M, BLOCK_C), 0.0, tl.float32)
        for n0 in range(0, C_OUT, BLOCK_N):
            n = n0 + rn
            n_ok = (n < C_OUT)[None, :]
            go = tl.load(gout_ptr + (go_pix[:, None] + (n * sgc)[None, :]), mask=m_ok[:, None] & n_ok, other=0.0)
            wt = tl.load(w_ptr + ((k * C_IN + cin) * C_OUT)[None, :] + n[:, None], mask=tl.trans(n_ok) & c_ok,
                         other=0.0)
            g_col = tl.dot(go.to(wt.dtype), wt, g_col, input_precision=DOT_PRECISION)
        off = pix[:, None] + (cin * sxc)[None, :]
        g_val = g_col * mk[:, None]  # gradient of the unmasked bilinear sample
        if NEED_OFFSET or NEED_MASK:  # static: the values of x are read only for these two
            # The four corner reads of this channel block (zero where invalid).
            v00 = tl.load(x_ptr + off, mask=ok00 & c_ok, other=0.0).to(tl.float32)
            v01 = tl.load(x_ptr + (off + sxw), mask=ok01 & c_ok, other=0.0).to(tl.float32)
            v10 = tl.load(x_ptr + (off + sxh), mask=ok10 & c_ok, other=0.0).to(tl.float32)
            v11 = tl.load(x_ptr + (off + (sxh + sxw)), mask=ok11 & c_ok, other=0.0).to(tl.float32)
            if NEED_MASK:
                acc_mask += g_col * (hy * (hx * v00 + lx * v01) + ly * (hx * v10 + lx * v11))
            if NEED_OFFSET:
                # d sample / d py and d sample / d px on the bilinear cell (invalid corners read 0).
                acc_dy += g_val * (hx * (v10 - v00) + lx * (v11 - v01))
                acc_dx += g_val * (hy * (v01 - v00) + ly * (v11 - v10))
        if NEED_X:
            # grad_x: scatter to the four corners; fp32 atomics because neighbouring pixels and taps share corners.
            tl.atomic_add(gx_ptr + off, g_val * (hy * hx), mask=ok00 & c_ok)
            tl.atomic_add(gx_ptr + (off + sxw), g_val * (hy * lx), mask=ok01 & c_ok)
            tl.atomic_add(gx_ptr + (off + sxh), g_val * (ly * hx), mask=ok10 & c_ok)
            tl.atomic_add(gx_ptr + (off + (sxh + sxw)), g_val * (ly * lx), mask=ok11 & c_ok)

    # Each (pixel, group, tap) belongs to exactly one program: plain stores into contiguous outputs.
    if NEED_OFFSET:
        goff = goff_ptr + b64 * (2 * G * KH * KW * hw_out) + (g * 2 * KH * KW + 2 * k) * hw_out + p
        tl.store(goff, tl.reduce(acc_dy, 1, tl.standard._sum_combine).to(goff_ptr.dtype.element_ty), mask=m_ok)
        tl.store(goff + hw_out, tl.reduce(acc_dx, 1, tl.standard._sum_combine).to(goff_ptr.dtype.element_ty),
                 mask=m_ok)
    if NEED_MASK:
        gmsk = gmask_ptr + b64 * (G * KH * KW * hw_out) + (g * KH * KW + k) * hw_out + p
        tl.store(gmsk, tl.reduce(acc_mask, 1, tl.standard._sum_combine).to(gmask_ptr.dtype.element_ty), mask=m_ok)


@triton.jit
def _bwd_weight_kernel(
    # pointers
    gout_ptr,  # [B, C_OUT, H_OUT, W_OUT], any strides
    x_ptr,  # [B, C_IN, H, W], any strides (channels-last from the launcher)
    offset_ptr,  # [B, 2*G*KH*KW, H_OUT, W_OUT], any strides
    mask_ptr,  # [B, G*KH*KW, H_OUT, W_OUT], any strides
    gw_ptr,  # [KH*KW, C_IN, C_OUT] contiguous fp32, zero-filled: accumulated with atomics
    # sizes
    C_IN, H, W, C_OUT, H_OUT, W_OUT, G, CG, M,
    SPLIT_M,  # programs sharing the pixels of one weight tile (pixel blocks are dealt round-robin)
    # convolution geometry
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    # strides (elements)
    sgb, sgc, sgh, sgw,
    sxb, sxc, sxh, sxw,
    sob, soc, soh, sow,
    smb, smc, smh, smw,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_kgc = tl.program_id(0)  # (tap, group, channel block)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_cblocks = (CG + BLOCK_C - 1) // BLOCK_C
    k = pid_kgc // (G * n_cblocks)
    g = (pid_kgc // n_cblocks) % G
    cin = g * CG + (pid_kgc % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = (cin < (g + 1) * CG)[None, :]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (rn < C_OUT)[None, :]
    hw_out = H_OUT * W_OUT
    off_k = (g * 2 * KH * KW + 2 * k) * soc
    msk_k = (g * KH * KW + k) * smc
    ch = (cin * sxc)[None, :]
    go_n = (rn * sgc)[None, :]
    tap_y = (k // KW) * DIL_H - PAD_H
    tap_x = (k % KW) * DIL_W - PAD_W

    acc = tl.full((BLOCK_C, BLOCK_N), 0.0, tl.float32)
    for mb in range(pid_s, (M + BLOCK_M - 1) // BLOCK_M, SPLIT_M):
        rm = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        b64 = (rm // hw_out).to(tl.int64)
        oy = (rm // W_OUT) % H_OUT
        ox = rm % W_OUT
        off = offset_ptr + (b64 * sob + oy * soh + ox * sow + off_k)
        dy = tl.load(off, mask=m_ok, other=0.0).to(tl.float32)
        dx = tl.load(off + soc, mask=m_ok, other=0.0).to(tl.float32)
        mk = tl.load(mask_ptr + (b64 * smb + oy * smh + ox * smw + msk_k), mask=m_ok, other=0.0).to(tl.float32)
        py = (oy * STRIDE_H + tap_y).to(tl.float32) + dy
        px = (ox * STRIDE_W + tap_x).to(tl.float32) + dx
        y0, x0, ly, lx, top_ok, bot_ok, lft_ok, rgt_ok = _corners(py, px, m_ok, H, W)
        hym = (1.0 - ly) * mk
        lym = ly * mk
        xo = (b64 * sxb + y0 * sxh + x0 * sxw)[:, None] + ch
        col = tl.load(x_ptr + xo, mask=(top_ok & lft_ok)[:, None] & c_ok, other=0.0).to(tl.float32) \
            * (hym * (1.0 - lx))[:, None]
        col += tl.load(x_ptr + (xo + sxw), mask=(top_ok & rgt_ok)[:, None] & c_ok, other=0.0).to(tl.float32) \
            * (hym * lx)[:, None]
        col += tl.load(x_ptr + (xo + sxh), mask=(bot_ok & lft_ok)[:, None] & c_ok, other=0.0).to(tl.float32) \
            * (lym * (1.0 - lx))[:, None]
        col += tl.load(x_ptr + (xo + (sxh + sxw)), mask=(bot_ok & rgt_ok)[:, None] & c_ok,
                       other=0.0).to(tl.float32) * (lym * lx)[:, None]
        go = tl.load(gout_ptr + ((b64 * sgb + oy * sgh + ox * sgw)[:, None] + go_n), mask=m_ok[:, None] & n_ok,
                     other=0.0)
        acc = tl.dot(tl.trans(col.to(go.dtype)), go, acc, input_precision=DOT_PRECISION)

    gw_ptrs = gw_ptr + ((k * C_IN + cin) * C_OUT)[:, None] + rn[None, :]
    tl.atomic_add(gw_ptrs, acc, mask=tl.trans(c_ok) & n_ok)


# --- autotune configs -------------------------------------------------------------------------------------------
# H100-class GPUs (132 SMs, 228 KB shared memory per SM): the forward is bound by the gather (4 loads and 4 FMAs per
# sampled value), so tiles favour a full output-channel tile (BLOCK_N = C_OUT up to 128, gathering each sample once)
# and enough pixels per program to hide load latency. VQFR's levels have 32-128 channels per offset group.
# Under the interpreter a single config (never benchmarked) with wide pixel tiles keeps CPU tests fast: the
# interpreter's cost is per operation, so fewer, larger programs run faster.


def _cfg(bm: int, bn: int, bc: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc}, num_warps=warps, num_stages=stages)


def _configs(gpu: list[triton.Config], interpreted: triton.Config) -> list[triton.Config]:
    return [interpreted] if dispatch.interpreting() else gpu


def _fwd_cfg(bm: int, bn: int, bc: int, warps: int, stages: int, l1: int = 1) -> triton.Config:
    config = _cfg(bm, bn, bc, warps, stages)
    return triton.Config({**config.kwargs, "GATHER_L1": l1}, num_warps=warps, num_stages=stages)


# The forward's flat loop is software-pipelined: with num_stages = S, the corner and weight tiles of S - 1 later
# steps are in flight (cp.async into shared memory) while a step's wgmma runs; S = 2 overlaps only the MMA with the
# next step's loads. Stages cost shared memory: (4 * BLOCK_M + BLOCK_N) * BLOCK_C elements per stage.
#
# Where the corner gathers are served from. Pipelined (num_stages > 1), Triton turns them into cp.async.cg, which
# bypasses L1: the 2.4 GB of corner values gathered at 1x128x512x512 all came from L2 (1.08 ms on an H100,
# 2026-11-27), although neighbouring pixels and taps share most corners. Two ways to L1, read in the PTX of triton
# 3.6, 3.8 and 3.9 (kernels.aot_check's compile, no GPU):
# - GATHER_L1=1 (cache_modifier ".ca") makes the pipelined copies cp.async.ca, with triton 3.9 only (3.6 and 3.8
#   ignore it);
# - num_stages=1: no pipelining; the gathers are ld.global.ca.v4 (16-byte, L1-allocating) loads, 12-16 KiB of
#   shared memory and 98-175 registers, so two or more programs per SM hide each other's load latency instead.
# Neither is timed on a GPU yet, so the two configs the H100 picked before (GATHER_L1=0, pipelined) stay in the list and
# the autotuner keeps the fastest on every card and version.
FWD_CONFIGS = _configs(
    [
        _fwd_cfg(128, 128, 32, 8, 3), _fwd_cfg(128, 128, 32, 8, 4), _fwd_cfg(128, 128, 32, 8, 2),
        _fwd_cfg(64, 128, 32, 4, 3), _fwd_cfg(64, 128, 32, 8, 3), _fwd_cfg(128, 64, 32, 4, 3),
        _fwd_cfg(128, 64, 32, 8, 3), _fwd_cfg(64, 64, 32, 4, 3), _fwd_cfg(256, 64, 32, 8, 3),
        _fwd_cfg(64, 256, 32, 8, 3), _fwd_cfg(32, 64, 32, 4, 3),
        _fwd_cfg(64, 128, 32, 8, 1), _fwd_cfg(128, 128, 32, 8, 1), _fwd_cfg(64, 128, 32, 4, 1),
        _fwd_cfg(64, 128, 32, 8, 3, l1=0), _fwd_cfg(128, 128, 32, 8, 3, l1=0),
    ],
    _fwd_cfg(128, 32, 16, 4, 1),
)
BWD_INPUT_CONFIGS = _configs(
    [_cfg(64, 64, 32, 4, 2), _cfg(64, 64, 32, 8, 2), _cfg(128, 64, 32, 8, 2), _cfg(64, 128, 32, 8, 2),
     _cfg(32, 64, 32, 4, 2)],
    _cfg(128, 32, 16, 4, 1),
)
BWD_WEIGHT_CONFIGS = _configs(
    [_cfg(64, 64, 32, 4, 2), _cfg(128, 64, 32, 8, 2), _cfg(64, 128, 32, 8, 2), _cfg(128, 128, 32, 8, 2),
     _cfg(64, 64, 16, 4, 3)],
    _cfg(128, 32, 16, 4, 1),
)


def _pruner(fp32_tile: Callable[[dict], int]) -> Callable:
    """An early_config_prune for one kernel.

    It drops tiles much wider than the problem (they only add masked work). For exact fp32 (``DOT_PRECISION ==
    "ieee"``: no tensor cores, operands and accumulators in registers) it also drops configs whose largest fp32
    register tile, ``fp32_tile(config)`` elements, exceeds 32 per thread: ``python -m kernels.aot_check`` showed
    those spill on sm_90. At least one config is always kept.
    """

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        c_out, cg = named_args["C_OUT"], named_args["CG"]
        kept = [c for c in configs
                if c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(c_out))
                and c.kwargs["BLOCK_C"] <= max(16, triton.next_power_of_2(cg))]
        exact = kwargs.get("DOT_PRECISION") == "ieee"

        def spills(c: triton.Config) -> bool:
            return exact and fp32_tile(c.kwargs) > 32 * 32 * c.num_warps

        kept = [c for c in kept if not spills(c)]
        if kept:
            return kept
        # Every tile is wider than the problem (a few channels): the narrowest one that does not spill. (The first
        # of the list, taken before, was the widest: 128x128, which spills in exact fp32.)
        fits = [c for c in configs if not spills(c)] or list(configs)
        return [min(fits, key=lambda c: (c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_C"], fp32_tile(c.kwargs) / c.num_warps))]

    return prune


# The autotuner adds the tensors' dtypes to its key. DOT_PRECISION must be in it too: fp32 launches are "ieee" or
# "tf32" depending on torch's setting at the call, the pruner keeps different configs for each, and without it a
# config tuned (and pruned) for one precision would be reused, from the cache, for the other.
_KEY = ["C_IN", "C_OUT", "G", "M", "KH", "KW", "DOT_PRECISION"]
_fwd = triton.autotune(
    FWD_CONFIGS, key=_KEY,
    prune_configs_by={"early_config_prune": _pruner(lambda k: k["BLOCK_M"] * k["BLOCK_N"])},
)(_fwd_kernel)
# The input-gradient kernel also keys on the gradients asked for: without grad_x it does no atomics, without the
# offset and mask gradients no corner reads, so the best tile differs (a frozen input is common in fine-tuning).
# reset_to_zero holds for eager launches only: traced ones run one config, untuned (see `untuned`).
_bwd_input = triton.autotune(
    BWD_INPUT_CONFIGS, key=[*_KEY, "NEED_X", "NEED_OFFSET", "NEED_MASK"], reset_to_zero=["gx_ptr"],
    prune_configs_by={"early_config_prune": _pruner(lambda k: 4 * k["BLOCK_M"] * k["BLOCK_C"])},
)(_bwd_input_kernel)
_bwd_weight = triton.autotune(
    BWD_WEIGHT_CONFIGS, key=_KEY, reset_to_zero=["gw_ptr"],
    prune_configs_by={"early_config_prune": _pruner(lambda k: k["BLOCK_N"] * max(k["BLOCK_M"], k["BLOCK_C"]))},
)(_bwd_weight_kernel)


# --- launchers ----------------------------------------------------------------------------------------------------


def _geometry(x: Tensor, offset: Tensor, weight: Tensor, stride, padding, dilation) -> dict:
    b, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = offset.shape[2], offset.shape[3]
    groups = offset.shape[1] // (2 * kh * kw)
    return dict(C_IN=c_in, H=h, W=w, C_OUT=c_out, H_OUT=h_out, W_OUT=w_out, G=groups, CG=c_in // groups,
                M=b * h_out * w_out, STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
                DIL_H=dilation[0], DIL_W=dilation[1], KH=kh, KW=kw,
                DOT_PRECISION=dispatch.dot_precision(x.dtype))


_SIZES = ("C_IN", "H", "W", "C_OUT", "H_OUT", "W_OUT", "G", "CG", "M")
_CONV = ("STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W", "DIL_H", "DIL_W")


def _contiguous_as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` contiguous in ``dtype``, in one copy at most. ``t.to(dtype).contiguous()`` copied twice when both
    change (the cast keeps the strides of a permuted tensor), and ``t.to(dtype, memory_format=contiguous_format)``
    alone returns a permuted ``t`` of that dtype as it is, not contiguous."""
    return t.contiguous() if t.dtype == dtype else t.to(dtype, memory_format=torch.contiguous_format)


def _packed_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """[C_OUT, C_IN, KH, KW] -> [KH*KW, C_IN, C_OUT] contiguous in ``dtype`` (output channels contiguous), in one copy
    (two when casting first, as for an fp32 weight beside fp16 activations under autocast); none for a weight whose
    memory already has this layout and dtype."""
    c_out, c_in, kh, kw = weight.shape
    return _contiguous_as(weight.permute(2, 3, 1, 0), dtype).view(kh * kw, c_in, c_out)


def _unpacked_weight_grad(grad_w: Tensor, weight: Tensor) -> Tensor:
    """The fp32 [KH*KW, C_IN, C_OUT] weight-gradient buffer -> [C_OUT, C_IN, KH, KW] contiguous in the dtype of
    ``weight``, in one copy."""
    c_out, c_in, kh, kw = weight.shape
    return _contiguous_as(grad_w.view(kh, kw, c_in, c_out).permute(3, 2, 0, 1), weight.dtype)


def forward_launch(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None,
                   stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]
                   ) -> tuple[Tensor, Launch]:
    """Allocate the output (in the memory format of ``x``) and describe the forward launch.

    The kernel reads ``x`` channels-last, so that the channels of one bilinear corner are contiguous and load as
    16-byte vectors; an NCHW ``x`` is converted first (one read and one write of ``x``).
    """
    geo = _geometry(x, offset, weight, stride, padding, dilation)
    out = torch.empty(x.shape[0], geo["C_OUT"], geo["H_OUT"], geo["W_OUT"], dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format)
    x = x.contiguous(memory_format=torch.channels_last)
    w = _packed_weight(weight, x.dtype)

    def grid(meta):
        return (triton.cdiv(geo["M"], meta["BLOCK_M"]), triton.cdiv(geo["C_OUT"], meta["BLOCK_N"]))

    # The kernel reads the bias with unit stride: a strided one (sliced out of a larger tensor) is copied first.
    args = [x, offset, mask, w, w if bias is None else bias.contiguous(), out, *(geo[k] for k in _SIZES + _CONV),
            *x.stride(), *offset.stride(), *mask.stride(), *out.stride()]
    constexprs = dict(KH=geo["KH"], KW=geo["KW"], HAS_BIAS=bias is not None, DOT_PRECISION=geo["DOT_PRECISION"])
    return out, Launch(_fwd, grid, args, constexprs)


def _channels_last(x: Tensor) -> bool:
    """True when ``x`` [B, C, H, W] is stored channels-last (C > 1; a single channel is both)."""
    return x.shape[1] > 1 and x.stride(1) == 1


def forward(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None,
            stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """Forward with the Triton kernel. Arguments already validated by ``check_deform_args`` (pairs normalised).

    Returns:
        [B, C_out, H_out, W_out] in the dtype and memory format (NCHW or channels-last) of ``x``.
    """
    out, launch = forward_launch(x, offset, mask, weight, bias, stride, padding, dilation)
    if out.numel() > 0:
        dispatch.launchable(launch.kernel)[launch.grid](*launch.args, **launch.constexprs)
    return out


def _weight_split(geo: dict) -> int:
    """Pixel splits of the weight-gradient GEMM: enough programs to fill ~4 waves of an H100 (132 SMs)."""
    if dispatch.interpreting():
        return 2  # still exercises the atomic reduction across programs
    tiles = geo["KH"] * geo["KW"] * geo["G"] * triton.cdiv(geo["CG"], 32) * triton.cdiv(geo["C_OUT"], 64)
    return max(1, min(triton.cdiv(4 * 132, tiles), triton.cdiv(geo["M"], 512)))


def backward_launches(grad_out: Tensor, x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                      stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                      output_mask: Sequence[bool] = (True, True, True, True),
                      ) -> tuple[tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None], list[Launch]]:
    """Allocate the gradient buffers that ``output_mask`` (x, offset, mask, weight) asks for (grad_x and grad_weight
    in fp32, zeroed for the atomics; None for the others) and describe the backward launches: the input kernel when
    grad_x, grad_offset or grad_mask is asked for, then the weight kernel when grad_weight is. grad_x comes back
    channels-last (fp32); :func:`backward` converts it."""
    need_x, need_offset, need_mask, need_weight = (bool(n) for n in output_mask)
    geo = _geometry(x, offset, weight, stride, padding, dilation)
    kk = geo["KH"] * geo["KW"]
    x = x.contiguous(memory_format=torch.channels_last)  # vector gathers, as in the forward
    grad_x = torch.zeros_like(x, dtype=torch.float32) if need_x else None  # channels-last: the strides of x
    grad_offset = torch.zeros(offset.shape, dtype=offset.dtype, device=x.device) if need_offset else None
    grad_mask = torch.zeros(mask.shape, dtype=mask.dtype, device=x.device) if need_mask else None
    grad_w = torch.zeros(kk, geo["C_IN"], geo["C_OUT"], dtype=torch.float32, device=x.device) if need_weight else None
    w = _packed_weight(weight, x.dtype)
    grad_out = grad_out.to(x.dtype)
    sizes = [geo[k] for k in _SIZES]
    conv = [geo[k] for k in _CONV]
    strides = [*grad_out.stride(), *x.stride(), *offset.stride(), *mask.stride()]
    constexprs = dict(KH=geo["KH"], KW=geo["KW"], DOT_PRECISION=geo["DOT_PRECISION"])
    split = _weight_split(geo)

    def grid_input(meta):
        return (triton.cdiv(geo["M"], meta["BLOCK_M"]), geo["G"] * kk)

    def grid_weight(meta):
        return (kk * geo["G"] * triton.cdiv(geo["CG"], meta["BLOCK_C"]), triton.cdiv(geo["C_OUT"], meta["BLOCK_N"]),
                split)

    launches = []
    if need_x or need_offset or need_mask:
        # An output not asked for gets a one-element stand-in, which the kernel never touches (not x itself: the
        # autotuner zeroes gx_ptr between its trials).
        stand_in = torch.zeros(1, dtype=torch.float32, device=x.device)
        outputs = [stand_in if grad_x is None else grad_x, offset.new_empty(1) if grad_offset is None else grad_offset,
                   mask.new_empty(1) if grad_mask is None else grad_mask]
        launches.append(Launch(_bwd_input, grid_input, [grad_out, x, offset, mask, w, *outputs, *sizes, *conv,
                                                        *strides],
                               dict(constexprs, NEED_X=need_x, NEED_OFFSET=need_offset, NEED_MASK=need_mask)))
    if grad_w is not None:
        launches.append(Launch(_bwd_weight, grid_weight,
                               [grad_out, x, offset, mask, grad_w, *sizes, split, *conv, *strides], constexprs))
    return (grad_x, grad_offset, grad_mask, grad_w), launches


def untuned(launch: Launch) -> Launch:
    """``launch`` with its autotuner replaced by the bare kernel and one config: the first that the autotuner's pruner
    keeps for it.

    For the backward kernels while they are traced (torch.compile, torch.export; the ops are ``triton_op``s and the
    launches go through ``torch.library.wrap_triton``). Both kernels accumulate into a zero-filled buffer with
    atomics, and their autotuners reset it between trials (``reset_to_zero``). The tracer drops that: it runs an
    autotuner's ``early_config_prune`` at trace time and wraps the kept configs in a new ``triton.autotune(configs,
    key=[])``, without ``reset_to_zero`` or ``restore_value`` (``torch/_higher_order_ops/triton_kernel_wrap.py``,
    torch 2.11 to 2.14). Inductor (or, with another backend, that new autotuner) then benchmarks every kept config
    on the real buffers, each trial adding into them, so the first call of each shape would return a multiple of the
    gradient (read from torch's sources; not run on a GPU). With one config there is no trial: the buffer is zeroed
    once, by the launcher, and written once.
    """
    tuner = launch.kernel
    named = dict(zip(tuner.arg_names, launch.args, strict=False))
    config = tuner.early_config_prune(tuner.configs, named, **launch.constexprs)[0]
    return Launch(tuner.fn, launch.grid, launch.args, {**launch.constexprs, **config.kwargs,
                                                        "num_warps": config.num_warps,
                                                        "num_stages": config.num_stages})


def backward(grad_out: Tensor, x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
             stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
             output_mask: Sequence[bool] = (True, True, True, True),
             ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients for x, offset, mask and weight with the Triton kernels (the bias gradient is a plain sum).

    Args:
        output_mask: which of (grad_x, grad_offset, grad_mask, grad_weight) to compute; the work of the others is
            skipped (the weight kernel is not launched, the input kernel drops its atomics or its reads of x).

    Returns:
        (grad_x, grad_offset, grad_mask, grad_weight), each shaped and typed like its input, or None where not asked.
    """
    (grad_x, grad_offset, grad_mask, grad_w), launches = backward_launches(
        grad_out, x, offset, mask, weight, stride, padding, dilation, output_mask
    )
    if grad_out.numel() > 0 and x.shape[1] > 0:
        if dispatch.is_traced(x):  # launched through wrap_triton's tracer: one config, no autotuning (see untuned)
            launches = [untuned(launch) for launch in launches]
        for launch in launches:
            dispatch.launchable(launch.kernel)[launch.grid](*launch.args, **launch.constexprs)
    grad_weight = None if grad_w is None else _unpacked_weight_grad(grad_w, weight)
    if grad_x is not None:
        grad_x = grad_x.to(dtype=x.dtype, memory_format=torch.channels_last if _channels_last(x)
                           else torch.contiguous_format)
    return grad_x, grad_offset, grad_mask, grad_weight
