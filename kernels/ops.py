"""``torch.library`` custom ops for the two VQFR kernels, with fake (meta) implementations and autograd.

torch.compile, torch.export and the ONNX exporter see each op as one node:
``torch.ops.vqfr.modulated_deform_conv2d`` and ``torch.ops.vqfr.nearest_code``. The eager implementations
live beside their references in ``kernels/deform_conv.py`` and ``kernels/nearest_code.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kernels.deform_conv import deform_conv2d_reference
from kernels.nearest_code import nearest_code_reference

__all__ = ["deform_conv2d_op", "nearest_code_op"]


@torch.library.custom_op("vqfr::modulated_deform_conv2d", mutates_args=())
def deform_conv2d_op(
    x: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """Modulated deformable convolution; see ``kernels.deform_conv`` for shapes and semantics."""
    return deform_conv2d_reference(x, offset, mask, weight, bias, tuple(stride), tuple(padding), tuple(dilation))


@deform_conv2d_op.register_fake
def _(x, offset, mask, weight, bias, stride, padding, dilation):
    kh, kw = weight.shape[2], weight.shape[3]
    h_out = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty(x.shape[0], weight.shape[0], h_out, w_out)


def _deform_setup_context(ctx, inputs, output):
    x, offset, mask, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, offset, mask, weight, bias)
    ctx.conv_args = (tuple(stride), tuple(padding), tuple(dilation))


def _deform_backward(ctx, grad_out):
    # Recompute the reference with autograd and differentiate it: exact gradients for every input.
    x, offset, mask, weight, bias = ctx.saved_tensors
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, offset, mask, weight, bias)]
    with torch.enable_grad():
        out = deform_conv2d_reference(*leaves, *ctx.conv_args)
        wanted = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return tuple(next(grads) if t is not None else None for t in leaves) + (None, None, None)


deform_conv2d_op.register_autograd(_deform_backward, setup_context=_deform_setup_context)


@torch.library.custom_op("vqfr::nearest_code", mutates_args=())
def nearest_code_op(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest codebook row: ([N] int64 index, [N] squared distance)."""
    idx, dist = nearest_code_reference(z, codebook, return_distance=True)
    return idx, dist


@nearest_code_op.register_fake
def _(z, codebook):
    dist_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    return z.new_empty(z.shape[0], dtype=torch.long), z.new_empty(z.shape[0], dtype=dist_dtype)
