"""Modulated deformable convolution (DCNv2) with torchvision's exact semantics.

This file holds the pure-torch reference, which is the specification, and the public entry point
:func:`modulated_deform_conv2d`.

Semantics (identical to ``torchvision.ops.deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)``):

- ``x`` [B, C_in, H, W]; ``weight`` [C_out, C_in, KH, KW] (one weight group); ``bias`` [C_out] or None.
- ``offset`` [B, 2*G*KH*KW, H_out, W_out]; the number of offset groups G is inferred from its channels.
  Channel ``g*2*K + 2*k`` is the y offset and ``g*2*K + 2*k + 1`` the x offset of kernel tap ``k = ky*KW + kx``
  (y and x interleaved per tap). Offset group ``g`` covers input channels ``[g*C_in/G, (g+1)*C_in/G)``.
- ``mask`` [B, G*KH*KW, H_out, W_out]; channel ``g*K + k``.
- Tap ``k`` of output pixel (oy, ox) samples ``x`` at
  ``(oy*stride - pad + ky*dil + dy, ox*stride - pad + kx*dil + dx)`` by bilinear interpolation. A point with
  y <= -1, y >= H, x <= -1 or x >= W reads 0; otherwise each of the four corners reads 0 when it lies outside.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["deform_conv2d_reference", "modulated_deform_conv2d", "bilinear_sample_reference", "check_deform_args"]


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {v!r}")
    return (int(v[0]), int(v[1]))


def check_deform_args(
    x: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor, bias: Tensor | None, stride, padding, dilation
) -> tuple[int, tuple[int, int], tuple[int, int], tuple[int, int], int, int]:
    """Validate the arguments of a modulated deformable convolution.

    Returns:
        (groups G, stride, padding, dilation, H_out, W_out).

    Raises:
        ValueError: with the offending shape and what it should be.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"x must be [B,C,H,W] and weight [C_out,C_in,KH,KW]; got {tuple(x.shape)}, {tuple(weight.shape)}")
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


def bilinear_sample_reference(feat: Tensor, py: Tensor, px: Tensor) -> Tensor:
    """Bilinear read of ``feat`` at fractional pixel positions, zero outside, torchvision's corner rules.

    Args:
        feat: [N, C, H, W].
        py, px: [N, P] sample rows and columns in pixels (float).

    Returns:
        [N, C, P] sampled values, in the dtype of ``feat``.
    """
    n, c, h, w = feat.shape
    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    y0f = torch.floor(py)
    x0f = torch.floor(px)
    ly = py - y0f
    lx = px - x0f
    hy = 1 - ly
    hx = 1 - lx
    y0 = y0f.long()
    x0 = x0f.long()
    y1 = y0 + 1
    x1 = x0 + 1
    flat = feat.reshape(n, c, h * w)
    out = None
    for yi, xi, wgt in ((y0, x0, hy * hx), (y0, x1, hy * lx), (y1, x0, ly * hx), (y1, x1, ly * lx)):
        valid = inside & (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
        idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).unsqueeze(1).expand(n, c, yi.shape[1])
        val = torch.gather(flat, 2, idx)
        term = val * (wgt * valid.to(wgt.dtype)).unsqueeze(1).to(val.dtype)
        out = term if out is None else out + term
    assert out is not None
    return out


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
    full im2col buffer. Sampling positions are computed in fp32 (fp64 for fp64 inputs).

    Args:
        x: [B, C_in, H, W].
        offset: [B, 2*G*KH*KW, H_out, W_out].
        mask: [B, G*KH*KW, H_out, W_out] or None (all ones).
        weight: [C_out, C_in, KH, KW].
        bias: [C_out] or None.

    Returns:
        [B, C_out, H_out, W_out] in the dtype of ``x``.
    """
    groups, (sh, sw), (ph, pw), (dh, dw), h_out, w_out = check_deform_args(
        x, offset, mask, weight, bias, stride, padding, dilation
    )
    b, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    taps = kh * kw
    cg = c_in // groups
    coord_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device

    base_y = (torch.arange(h_out, device=dev, dtype=coord_dtype) * sh - ph).view(1, 1, h_out, 1)
    base_x = (torch.arange(w_out, device=dev, dtype=coord_dtype) * sw - pw).view(1, 1, 1, w_out)
    off = offset.to(coord_dtype).view(b, groups, taps, 2, h_out, w_out)
    msk = None if mask is None else mask.view(b, groups, taps, h_out * w_out)
    xg = x.reshape(b * groups, cg, h, w)

    out = None
    for k in range(taps):
        ky, kx = divmod(k, kw)
        py = (base_y + ky * dh + off[:, :, k, 0]).reshape(b * groups, h_out * w_out)
        px = (base_x + kx * dw + off[:, :, k, 1]).reshape(b * groups, h_out * w_out)
        col = bilinear_sample_reference(xg, py, px).view(b, groups, cg, h_out * w_out)
        if msk is not None:
            col = col * msk[:, :, k].unsqueeze(2).to(col.dtype)
        col = col.reshape(b, c_in, h_out * w_out)
        term = torch.einsum("oc,bcp->bop", weight[:, :, ky, kx].to(col.dtype), col)
        out = term if out is None else out + term
    assert out is not None
    out = out.view(b, c_out, h_out, w_out)
    if bias is not None:
        out = out + bias.view(1, c_out, 1, 1).to(out.dtype)
    return out.to(x.dtype)


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
    """Modulated deformable convolution, torchvision semantics (see the module docstring for shapes).

    Dispatches through the ``vqfr::modulated_deform_conv2d`` custom op, so that torch.compile, torch.export and the
    ONNX exporter see one node.
    """
    from kernels import ops

    if mask is None:
        groups = offset.shape[1] // (2 * weight.shape[2] * weight.shape[3])
        mask = offset.new_ones(offset.shape[0], groups * weight.shape[2] * weight.shape[3], *offset.shape[2:])
    return ops.deform_conv2d_op(x, offset, mask, weight, bias, list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)))
