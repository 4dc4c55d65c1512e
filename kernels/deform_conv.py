"""Modulated deformable convolution (DCNv2) with torchvision's exact semantics.

This file holds the pure-torch reference (the specification: forward, and backward by explicit formulas), a faster
pure-torch forward built on ``F.grid_sample`` (what float32 CPU calls run; within about 1e-5 of the reference) and
the public entry point :func:`modulated_deform_conv2d`. The Triton kernels live in ``kernels/deform_conv_triton.py``,
imported only when a kernel runs, because triton is an optional dependency.

Semantics (identical to ``torchvision.ops.deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)``):

- ``x`` [B, C_in, H, W]; ``weight`` [C_out, C_in, KH, KW] (one weight group); ``bias`` [C_out] or None.
- ``offset`` [B, 2*G*KH*KW, H_out, W_out]; the number of offset groups G is inferred from its channels.
  Channel ``g*2*K + 2*k`` is the y offset and ``g*2*K + 2*k + 1`` the x offset of kernel tap ``k = ky*KW + kx``
  (y and x interleaved per tap). Offset group ``g`` covers input channels ``[g*C_in/G, (g+1)*C_in/G)``.
- ``mask`` [B, G*KH*KW, H_out, W_out]; channel ``g*K + k``.
- Tap ``k`` of output pixel (oy, ox) samples ``x`` at
  ``(oy*stride - pad + ky*dil + dy, ox*stride - pad + kx*dil + dx)`` by bilinear interpolation. A point with
  y <= -1, y >= H, x <= -1 or x >= W reads 0; otherwise each of the four corners reads 0 when it lies outside.
  An infinite offset therefore reads 0 (torchvision's forward too), and so does a NaN one (undefined in torchvision),
  with zero gradients, on every path: the Triton kernels, the grid_sample forward and the reference.
- An empty image (H = 0 or W = 0) reads 0 everywhere, like torchvision: where the padding still gives a non-empty
  output, that output is the bias, and every gradient is zero (x's is empty).
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Iterable, Iterator, Sequence, Sized
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import check_floating, check_same_device

__all__ = [
    "deform_conv2d_reference", "deform_conv2d_backward_reference", "modulated_deform_conv2d",
    "bilinear_sample_reference", "bilinear_corners", "check_deform_args", "deform_conv2d_grid_sample",
]


def _pair(v: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """``v`` as (h, w). Integers only (numpy's too, as torchvision takes them): int() used to run a stride of 1.5
    as 1, and a string "11" as (1, 1)."""
    pair = (v, v) if isinstance(v, numbers.Integral) else v
    if isinstance(pair, (str, bytes)) or not isinstance(pair, Sized):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if len(pair) != 2:
        raise ValueError(f"{name}: expected an int or a pair of ints, got {v!r}")
    try:
        return operator.index(pair[0]), operator.index(pair[1])  # type: ignore[index]
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}") from None


def check_deform_args(
    x: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor, bias: Tensor | None, stride, padding, dilation
) -> tuple[int, tuple[int, int], tuple[int, int], tuple[int, int], int, int]:
    """Validate the arguments of a modulated deformable convolution.

    Returns:
        (groups G, stride, padding, dilation, H_out, W_out).

    Raises:
        ValueError: with the offending shape (or device) and what it should be.
        TypeError: when a tensor is not floating point (torchvision refuses those too).
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    check_same_device(x=x, offset=offset, mask=mask, weight=weight, bias=bias)
    check_floating("modulated_deform_conv2d", x=x, offset=offset, mask=mask, weight=weight, bias=bias)
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:  # torchvision's rule; stride 0 would divide by 0
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0; got stride {stride}, padding "
                         f"{padding}, dilation {dilation}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"x must be [B,C,H,W] and weight [C_out,C_in,KH,KW]; got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    b, c_in, h, w = x.shape
    c_out, w_cin, kh, kw = weight.shape
    if w_cin != c_in:
        raise ValueError(f"weight has {w_cin} input channels but x has {c_in}; only one weight group is supported")
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    taps = kh * kw
    if offset.dim() != 4 or offset.shape[1] % (2 * taps) != 0 or offset.shape[1] == 0:
        raise ValueError(f"offset must be [B, 2*G*{taps}, H_out, W_out]; got {tuple(offset.shape)}")
    groups = offset.shape[1] // (2 * taps)
    if c_in % groups != 0:
        raise ValueError(f"{groups} offset groups do not divide {c_in} input channels")
    if tuple(offset.shape) != (b, 2 * groups * taps, h_out, w_out):
        raise ValueError(f"offset shape {tuple(offset.shape)} != expected {(b, 2 * groups * taps, h_out, w_out)}")
    if mask is not None and tuple(mask.shape) != (b, groups * taps, h_out, w_out):
        raise ValueError(f"mask shape {tuple(mask.shape)} != expected {(b, groups * taps, h_out, w_out)}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias shape {tuple(bias.shape)} != expected {(c_out,)}")
    return groups, stride, padding, dilation, h_out, w_out


class Corner(NamedTuple):
    """One of the four bilinear corners of a batch of sample points (see :func:`bilinear_corners`)."""

    pixel: Tensor  # [N, P] int64 flat pixel index y*W + x, clamped into the image (read only where valid)
    weight: Tensor  # [N, P] interpolation weight, zero where the corner is invalid
    d_dy: Tensor  # [N, P] derivative of ``weight`` along y, zero where invalid
    d_dx: Tensor  # [N, P] derivative of ``weight`` along x, zero where invalid


def bilinear_corners(h: int, w: int, py: Tensor, px: Tensor) -> list[Corner]:
    """The four corners (y0x0, y0x1, y1x0, y1x1) of bilinear reads at ``(py, px)`` in an H x W image.

    torchvision's rules: a point with y <= -1, y >= H, x <= -1 or x >= W reads 0; otherwise each corner outside
    the image reads 0. The derivatives are those of the weights on the cell containing the point (right-sided at
    integer coordinates, like autograd through ``floor``).

    Args:
        h, w: image size.
        py, px: [N, P] sample rows and columns in pixels (floating point; the weights take their dtype).
    """
    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    # A point outside is moved to -2, as in the Triton kernels: all four corners are then out, and an infinite or NaN
    # position reads 0 with zero derivatives, instead of weights of inf - floor(inf) = NaN.
    py, px = torch.where(inside, py, -2.0), torch.where(inside, px, -2.0)
    y0f, x0f = torch.floor(py), torch.floor(px)
    ly, lx = py - y0f, px - x0f
    hy, hx = 1 - ly, 1 - lx
    y0, x0 = y0f.long(), x0f.long()
    y1, x1 = y0 + 1, x0 + 1
    corners = []
    for yi, xi, wgt, d_dy, d_dx in ((y0, x0, hy * hx, -hx, -hy), (y0, x1, hy * lx, -lx, hy),
                                    (y1, x0, ly * hx, hx, -ly), (y1, x1, ly * lx, lx, ly)):
        valid = (inside & (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)).to(wgt.dtype)
        index = yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)
        corners.append(Corner(index, wgt * valid, d_dy * valid, d_dx * valid))
    return corners


def _gather_pixels(flat: Tensor, pixel: Tensor) -> Tensor:
    """``flat`` [N, C, H*W] read at flat pixel indices ``pixel`` [N, P] -> [N, C, P]. An empty image (H*W = 0) has
    no pixel to gather from (every corner weight is zero there) and reads 0."""
    n, c, hw = flat.shape
    if hw == 0:
        return flat.new_zeros(n, c, pixel.shape[1])
    return torch.gather(flat, 2, pixel.unsqueeze(1).expand(n, c, pixel.shape[1]))


def bilinear_sample_reference(feat: Tensor, py: Tensor, px: Tensor) -> Tensor:
    """Bilinear read of ``feat`` at fractional pixel positions, zero outside, torchvision's corner rules.

    Args:
        feat: [N, C, H, W].
        py, px: [N, P] sample rows and columns in pixels (float).

    Returns:
        [N, C, P] sampled values, in the dtype of ``feat``.
    """
    n, c, h, w = feat.shape
    flat = feat.reshape(n, c, h * w)
    out = None
    for corner in bilinear_corners(h, w, py, px):
        val = _gather_pixels(flat, corner.pixel)
        term = val * corner.weight.unsqueeze(1).to(val.dtype)
        out = term if out is None else out + term
    assert out is not None
    return out


def _sample_grid(
    offset: Tensor, groups: int, taps: int, kw: int, stride, padding, dilation, dtype: torch.dtype
) -> list[tuple[Tensor, Tensor]]:
    """Sample rows and columns of every kernel tap: ``taps`` pairs of [B*G, H_out*W_out] in ``dtype``."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    b, _, h_out, w_out = offset.shape
    dev = offset.device
    base_y = (torch.arange(h_out, device=dev, dtype=dtype) * sh - ph).view(1, 1, h_out, 1)
    base_x = (torch.arange(w_out, device=dev, dtype=dtype) * sw - pw).view(1, 1, 1, w_out)
    off = offset.to(dtype).view(b, groups, taps, 2, h_out, w_out)
    grid = []
    for k in range(taps):
        ky, kx = divmod(k, kw)
        py = (base_y + ky * dh + off[:, :, k, 0]).reshape(b * groups, h_out * w_out)
        px = (base_x + kx * dw + off[:, :, k, 1]).reshape(b * groups, h_out * w_out)
        grid.append((py, px))
    return grid


def _contract_taps(columns: Iterable[tuple[int, Tensor]], weight: Tensor, bias: Tensor | None, h_out: int,
                   w_out: int, dtype: torch.dtype) -> Tensor:
    """The weight contraction shared by the torch implementations: sum over taps k of ``weight[:, :, k] @ col_k``,
    plus the bias. ``columns`` yields (k, [B, C_in, H_out*W_out]); returns [B, C_out, H_out, W_out] in ``dtype``."""
    kw = weight.shape[3]
    out = None
    for k, col in columns:
        ky, kx = divmod(k, kw)
        term = torch.einsum("oc,bcp->bop", weight[:, :, ky, kx].to(col.dtype), col)
        out = term if out is None else out + term
    assert out is not None
    out = out.view(out.shape[0], weight.shape[0], h_out, w_out)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1).to(out.dtype)
    return out.to(dtype)


def deform_conv2d_reference(
    x: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """Pure-torch modulated deformable convolution; differentiable in every input (see module docstring).

    It loops over the KH*KW kernel taps, so it holds one [B, C_in, H_out*W_out] sampled map at a time instead of a
    full im2col buffer. Sampling positions are computed in fp32 (fp64 for fp64 inputs); everything else runs in the
    dtype of ``x``, as plain torch would.

    Args:
        x: [B, C_in, H, W].
        offset: [B, 2*G*KH*KW, H_out, W_out].
        mask: [B, G*KH*KW, H_out, W_out] or None (all ones).
        weight: [C_out, C_in, KH, KW].
        bias: [C_out] or None.

    Returns:
        [B, C_out, H_out, W_out] in the dtype of ``x``.
    """
    groups, stride, padding, dilation, h_out, w_out = check_deform_args(
        x, offset, mask, weight, bias, stride, padding, dilation
    )
    b, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    taps = kh * kw
    cg = c_in // groups
    coord_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grid = _sample_grid(offset, groups, taps, kw, stride, padding, dilation, coord_dtype)
    # reshape, not view: a mask sliced out of a larger tensor has no flat (H_out*W_out) view.
    msk = None if mask is None else mask.reshape(b, groups, taps, h_out * w_out)
    xg = x.reshape(b * groups, cg, h, w)


    def columns() -> Iterator[tuple[int, Tensor]]:
        for k, (py, px) in enumerate(grid):
            col = bilinear_sample_reference(xg, py, px).view(b, groups, cg, h_out * w_out)
            if msk is not None:
                col = col * msk[:, :, k].unsqueeze(2).to(col.dtype)
            yield k, col.reshape(b, c_in, h_out * w_out)

    return _contract_taps(columns(), weight, bias, h_out, w_out, x.dtype)


def deform_conv2d_backward_reference(
    grad_out: Tensor,
    x: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    output_mask: Sequence[bool] = (True, True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`deform_conv2d_reference` by explicit formulas (no autograd), tap by tap.

    With ``v`` the bilinear sample of tap k, ``m`` its mask and ``g = W_k^T grad_out`` the gradient of the masked
    sample: ``grad_mask = sum_c g*v``, ``grad_offset = sum_c g*m*dv/d(y,x)``, ``grad_weight_k = grad_out (m*v)^T``,
    and ``grad_x`` scatters ``g*m*corner_weight`` to the four corners. Computed in fp32 (fp64 for fp64 inputs); the
    bias gradient is ``grad_out.sum((0, 2, 3))`` and is left to the caller.

    Args:
        grad_out: [B, C_out, H_out, W_out].
        x, offset, mask, weight: as for :func:`deform_conv2d_reference` (mask required).
        output_mask: which of (grad_x, grad_offset, grad_mask, grad_weight) to compute; the others are None and
            cost nothing (``g`` is needed by the first three only, the reads of ``x`` by the last three only).

    Returns:
        (grad_x, grad_offset, grad_mask, grad_weight), each shaped and typed like its input, or None where not asked.
    """
    groups, stride, padding, dilation, h_out, w_out = check_deform_args(
        x, offset, mask, weight, None, stride, padding, dilation
    )
    need_x, need_offset, need_mask, need_weight = (bool(n) for n in output_mask)
    if not (need_x or need_offset or need_mask or need_weight):
        return None, None, None, None
    b, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    taps, cg, p = kh * kw, c_in // groups, h_out * w_out
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    grid = _sample_grid(offset, groups, taps, kw, stride, padding, dilation, acc)
    xg = x.to(acc).reshape(b * groups, cg, h * w)
    msk = mask.to(acc).reshape(b * groups, taps, 1, p)  # channels-last or sliced masks have no such view
    gout = grad_out.to(acc).reshape(b, c_out, p)
    wt = weight.to(acc)

    grad_x = torch.zeros_like(xg) if need_x else None
    grad_offset = torch.zeros(b * groups, taps, 2, p, dtype=acc, device=x.device) if need_offset else None
    grad_mask = torch.zeros(b * groups, taps, p, dtype=acc, device=x.device) if need_mask else None
    grad_weight = torch.zeros_like(wt) if need_weight else None
    for k, (py, px) in enumerate(grid):
        ky, kx = divmod(k, kw)
        corners = bilinear_corners(h, w, py, px)
        if need_offset or need_mask or need_weight:
            reads = [_gather_pixels(xg, c.pixel) for c in corners]
            pairs = list(zip(reads, corners, strict=True))
            val = sum(r * c.weight.unsqueeze(1) for r, c in pairs)  # [B*G, Cg, P]
        if need_x or need_offset or need_mask:
            g_col = torch.einsum("oc,bop->bcp", wt[:, :, ky, kx], gout).reshape(b * groups, cg, p)
            g_val = g_col * msk[:, k]
        if grad_mask is not None:
            grad_mask[:, k] = (g_col * val).sum(1)
        if grad_offset is not None:
            grad_offset[:, k, 0] = sum((g_val * r * c.d_dy.unsqueeze(1)).sum(1) for r, c in pairs)
            grad_offset[:, k, 1] = sum((g_val * r * c.d_dx.unsqueeze(1)).sum(1) for r, c in pairs)
        if grad_x is not None and h * w > 0:  # an empty image has nothing to scatter to
            for c in corners:
                grad_x.scatter_add_(2, c.pixel.unsqueeze(1).expand(-1, cg, -1), g_val * c.weight.unsqueeze(1))
        if grad_weight is not None:
            col = (val * msk[:, k]).reshape(b, c_in, p)
            grad_weight[:, :, ky, kx] = torch.einsum("bop,bcp->oc", gout, col)
    return (
        None if grad_x is None else grad_x.view(b, c_in, h, w).to(x.dtype),
        None if grad_offset is None else grad_offset.view(b, 2 * groups * taps, h_out, w_out).to(offset.dtype),
        None if grad_mask is None else grad_mask.view(b, groups * taps, h_out, w_out).to(mask.dtype),
        None if grad_weight is None else grad_weight.to(weight.dtype),
    )


def _grid_side(n: int) -> int:
    """The smallest 2**k + 1 >= n (at least 2): the padded side that makes grid_sample's scale a power of two."""
    side = 2
    while side < n:
        side = 2 * side - 1
    return side


def deform_conv2d_grid_sample(
    x: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """The forward of :func:`deform_conv2d_reference` with one ``F.grid_sample`` per kernel tap (the fast CPU path).

    Same arguments, shapes and semantics. The reference builds each bilinear read from four gathers and a dozen
    elementwise passes over [B, C, H*W] tensors; ``grid_sample`` does the read in one vectorised kernel, which makes
    the operation about 4x faster on a CPU. Its bilinear rule (a corner outside the image reads 0; a point with
    y <= -1 or y >= H reads 0) is torchvision's. The mask product and the per-tap weight contraction are the
    reference's, in the same order.

    Exactness: grid_sample takes normalised coordinates and maps them back to pixels as ``(g + 1) * (S - 1) / 2``.
    ``x`` is zero-padded at the bottom and right to sides ``S = 2**k + 1``, so that this scale is a power of two and
    the padding reads 0 exactly where the image's outside would (a side of 1 works too). What remains is the rounding
    of ``g = p / 2**(k-1) - 1`` near -1: up to ``2**-24 * (S - 1)`` pixel (3e-5 px at 512), i.e. output differences
    of about 1e-5 relative on white-noise features at 512x512 and of 1e-6 on 16x16 maps.

    Args:
        x: [B, C_in, H, W] float32 (float64 works; other dtypes: use the reference).
        offset: [B, 2*G*KH*KW, H_out, W_out], (dy, dx) interleaved per tap.
        mask: [B, G*KH*KW, H_out, W_out].
        weight: [C_out, C_in, KH, KW].
        bias: [C_out] or None.

    Returns:
        [B, C_out, H_out, W_out] in the dtype of ``x`` (not always contiguous: the custom op lays it out).
    """
    groups, stride, padding, dilation, h_out, w_out = check_deform_args(
        x, offset, mask, weight, bias, stride, padding, dilation
    )
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    b, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    taps, cg, p = kh * kw, c_in // groups, h_out * w_out
    side_h, side_w = _grid_side(h), _grid_side(w)
    xg = F.pad(x, (0, side_w - w, 0, side_h - h)).reshape(b * groups, cg, side_h, side_w)
    scale_y, scale_x = 2.0 / (side_h - 1), 2.0 / (side_w - 1)  # powers of two: exact products
    base_y = (torch.arange(h_out, device=x.device, dtype=x.dtype) * sh - ph).view(1, 1, h_out, 1)
    base_x = (torch.arange(w_out, device=x.device, dtype=x.dtype) * sw - pw).view(1, 1, 1, w_out)
    off = offset.to(x.dtype).view(b, groups, taps, 2, h_out, w_out)
    msk = mask.to(x.dtype).reshape(b, groups, 1, taps, p)  # reshape: any mask strides (sliced, channels-last)

    def columns() -> Iterator[tuple[int, Tensor]]:
        for k in range(taps):
            ky, kx = divmod(k, kw)
            # The reference's sample position (same operations, same rounding), then normalised for grid_sample.
            # grid_sample reads 0 at any finite point outside, but NaN at an infinite or NaN one: those go to -5, at
            # least 2 px above and left of the image (-(S-1)*2 px), where the reference reads 0 too.
            gy = torch.nan_to_num((base_y + ky * dh + off[:, :, k, 0]) * scale_y - 1, nan=-5.0, posinf=-5.0,
                                  neginf=-5.0)
            gx = torch.nan_to_num((base_x + kx * dw + off[:, :, k, 1]) * scale_x - 1, nan=-5.0, posinf=-5.0,
                                  neginf=-5.0)
            grid = torch.stack((gx, gy), dim=-1).view(b * groups, h_out, w_out, 2)
            col = F.grid_sample(xg, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            yield k, (col.view(b, groups, cg, p) * msk[:, :, :, k]).view(b, c_in, p)

    return _contract_taps(columns(), weight, bias, h_out, w_out, x.dtype)


def modulated_deform_conv2d(
    x: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """Modulated deformable convolution with torchvision's semantics (see the module docstring).

    Runs the Triton kernel where it can (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; fp16, bf16 or
    fp32), else :func:`deform_conv2d_grid_sample` for float32 and the reference for other dtypes;
    :func:`kernels.use` and ``$VQFR_KERNELS`` force the Triton kernel or the reference. Dispatches through the
    ``vqfr::modulated_deform_conv2d`` custom op, so torch.compile, torch.export and the ONNX exporter see one node.
    Differentiable in x, offset, mask, weight and bias; the backward computes only the gradients autograd asks for
    (``ctx.needs_input_grad``, see :mod:`kernels.ops`).

    Args:
        x: [B, C_in, H, W] float16, bfloat16, float32 (or float64: reference only).
        offset: [B, 2*G*KH*KW, H_out, W_out], (dy, dx) interleaved per tap; G offset groups divide C_in.
        mask: [B, G*KH*KW, H_out, W_out] or None (all ones).
        weight: [C_out, C_in, KH, KW].
        bias: [C_out] or None.
        stride, padding, dilation: int or (h, w) pair.

        offset, mask, weight and bias may have other floating dtypes than ``x`` (an fp32 weight beside fp16
        activations under autocast): every path computes in the dtype of ``x``. A float64 tensor among them keeps
        the call off the Triton kernels (the grid_sample or reference path runs it).

    Returns:
        [B, C_out, H_out, W_out] in the dtype of ``x``.

    Raises:
        ValueError: on inconsistent shapes (the message names the tensor and the expected shape).
        TypeError: when a tensor is not floating point (an integer x or mask, say).
    """
    from kernels import ops

    groups, stride, padding, dilation, _, _ = check_deform_args(
        x, offset, mask, weight, bias, stride, padding, dilation
    )
    if mask is None:
        taps = weight.shape[2] * weight.shape[3]
        mask = offset.new_ones(offset.shape[0], groups * taps, *offset.shape[2:])
    return ops.deform_conv2d_op(x, offset, mask, weight, bias, list(stride), list(padding), list(dilation))
