"""``torch.library`` custom ops for the two VQFR kernels, with fake (meta) implementations and autograd.

torch.compile, torch.export and the ONNX exporter see each op as one node:

- ``torch.ops.vqfr.modulated_deform_conv2d(x, offset, mask, weight, bias, stride, padding, dilation) -> out``
- ``torch.ops.vqfr.modulated_deform_conv2d_backward(grad_out, x, offset, mask, weight, stride, padding, dilation,
  output_mask=None) -> (grad_x, grad_offset, grad_mask, grad_weight)`` (what the forward's autograd formula calls,
  with ``output_mask`` from ``ctx.needs_input_grad``; a gradient not asked for is not computed and comes back as an
  empty tensor, since a custom op cannot return None)
- ``torch.ops.vqfr.nearest_code(z, codebook) -> (idx, dist)``
- ``torch.ops.vqfr.group_norm_silu(x, weight, bias, num_groups, eps, silu) -> y`` (forward only: its backward
  raises; :func:`kernels.group_norm_silu` runs the differentiable reference when a gradient is needed)

Each op body picks the Triton kernel or the reference per call (:func:`kernels.dispatch.use_triton`).

How the ops are registered (decided once, when this module is first imported):

- With a CUDA device and triton installed, as ``torch.library.triton_op`` and the launchers go through
  ``torch.library.wrap_triton``. torch.compile then traces into the op and sees the Triton launches, and
  AOTInductor compiles the kernels into its package (no Python needed to run it). torch.export keeps the op as one
  node either way, which is what the ONNX translation to ``DeformConv`` matches.
- Otherwise as ``torch.library.custom_op`` (opaque to torch.compile, which runs it as an extern call).
  ``triton_op`` imports triton and ``torch._inductor`` when it registers (about 4 s on a small CPU), a cost that
  buys nothing on a machine without a GPU. The schemas are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from kernels import dispatch
from kernels.deform_conv import (
    check_deform_args,
    deform_conv2d_backward_reference,
    deform_conv2d_grid_sample,
    deform_conv2d_reference,
)
from kernels.group_norm import check_group_norm_args, group_norm_silu_reference, output_memory_format
from kernels.nearest_code import check_nearest_args, nearest_code_reference

if TYPE_CHECKING:
    from torch._library.custom_ops import CustomOpDef

__all__ = ["deform_conv2d_op", "deform_conv2d_backward_op", "nearest_code_op", "group_norm_silu_op", "TRITON_OPS"]

#: True when the ops are ``triton_op``s (CUDA and triton present at registration).
TRITON_OPS = torch.cuda.is_available() and dispatch.triton_installed()
dispatch.TRACEABLE_LAUNCHES = TRITON_OPS


def _define(name: str, fn: Callable[..., object]) -> CustomOpDef:
    """Register ``fn`` as the functional op ``name``, the one way this process registers them."""
    register = torch.library.triton_op if TRITON_OPS else torch.library.custom_op
    return cast("CustomOpDef", register(name, fn, mutates_args=()))


def _check_pairs(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> None:
    """The ops take (h, w) pairs: one value raised IndexError, three were cut to two without a word."""
    for name, value in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a pair (h, w); got {list(value)}")


def _conv_args(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
               ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    _check_pairs(stride, padding, dilation)
    return (int(stride[0]), int(stride[1])), (int(padding[0]), int(padding[1])), (int(dilation[0]), int(dilation[1]))


def _out_hw(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    kh, kw = weight.shape[2], weight.shape[3]
    h_out = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return h_out, w_out


def _memory_format(x: Tensor) -> torch.memory_format:
    """The output layout of the deformable conv: channels-last for a channels-last ``x`` (C > 1), else NCHW
    contiguous, whichever implementation runs (the Triton kernel's rule)."""
    return torch.channels_last if x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format


def _deform_conv2d(
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
    conv = _conv_args(stride, padding, dilation)
    # The op is public (torch.ops.vqfr.*): the Triton launchers trust their shapes, so check them on every path.
    check_deform_args(x, offset, mask, weight, bias, *conv)
    fast = dispatch.use_grid_sample(x)
    if dispatch.use_triton("modulated_deform_conv2d", x=x, offset=offset, mask=mask, weight=weight, bias=bias,
                           fallback="grid_sample" if fast else "reference"):
        return dispatch.triton_module("deform_conv_triton").forward(x, offset, mask, weight, bias, *conv)
    impl = deform_conv2d_grid_sample if fast else deform_conv2d_reference
    # The layout the fake kernel declares (Inductor and AOTInductor allocate and index by it).
    return impl(x, offset, mask, weight, bias, *conv).contiguous(memory_format=_memory_format(x))


deform_conv2d_op = _define("vqfr::modulated_deform_conv2d", _deform_conv2d)


# The fake kernels also serve as the Meta kernels: a meta tensor beside real ones dispatches here, and the output,
# allocated on the device of x or z, would be uninitialised memory. So they check the devices too.


@deform_conv2d_op.register_fake
def _(x, offset, mask, weight, bias, stride, padding, dilation):
    dispatch.check_same_device(x=x, offset=offset, mask=mask, weight=weight, bias=bias)
    dispatch.check_floating("modulated_deform_conv2d", x=x, offset=offset, mask=mask, weight=weight, bias=bias)
    _check_pairs(stride, padding, dilation)
    h_out, w_out = _out_hw(x, weight, stride, padding, dilation)
    return torch.empty(x.shape[0], weight.shape[0], h_out, w_out, dtype=x.dtype, device=x.device,
                       memory_format=_memory_format(x))


def _output_mask(output_mask: Sequence[bool] | None) -> tuple[bool, bool, bool, bool]:
    """(x, offset, mask, weight) gradients to compute: all when None."""
    if output_mask is None:
        return True, True, True, True
    if len(output_mask) != 4:
        raise ValueError(f"output_mask must hold 4 bools (grad_x, grad_offset, grad_mask, grad_weight); got "
                         f"{list(output_mask)}")
    need_x, need_offset, need_mask, need_weight = (bool(n) for n in output_mask)
    return need_x, need_offset, need_mask, need_weight


def _deform_conv2d_backward(
    grad_out: Tensor,
    x: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    output_mask: Sequence[bool] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_offset, grad_mask, grad_weight) of the modulated deformable convolution; those that
    ``output_mask`` does not ask for are skipped and returned as empty (numel 0) tensors of their input's dtype."""
    conv = _conv_args(stride, padding, dilation)
    need = _output_mask(output_mask)
    dispatch.check_same_device(x=x, grad_out=grad_out)
    dispatch.check_floating("modulated_deform_conv2d_backward", grad_out=grad_out)
    *_, h_out, w_out = check_deform_args(x, offset, mask, weight, None, *conv)
    if tuple(grad_out.shape) != (x.shape[0], weight.shape[0], h_out, w_out):
        raise ValueError(f"grad_out shape {tuple(grad_out.shape)} != expected "
                         f"{(x.shape[0], weight.shape[0], h_out, w_out)}")
    if dispatch.use_triton("modulated_deform_conv2d_backward", x=x, offset=offset, mask=mask, weight=weight,
                           grad_out=grad_out):
        grads = dispatch.triton_module("deform_conv_triton").backward(grad_out, x, offset, mask, weight, *conv,
                                                                      output_mask=need)
    else:
        grad_x, grad_offset, grad_mask, grad_weight = deform_conv2d_backward_reference(
            grad_out, x, offset, mask, weight, *conv, output_mask=need
        )
        # The layouts the fake kernel declares (the Triton backward's): grad_x like the forward's output, the rest
        # contiguous (the reference returns grad_x NCHW, and grad_weight in the layout of a float32 weight).
        grads = (None if grad_x is None else grad_x.contiguous(memory_format=_memory_format(x)),
                 None if grad_offset is None else grad_offset.contiguous(),
                 None if grad_mask is None else grad_mask.contiguous(),
                 None if grad_weight is None else grad_weight.contiguous())
    gx, goff, gmask, gw = (t.new_empty(0) if g is None else g for g, t in zip(grads, (x, offset, mask, weight),
                                                                              strict=True))
    return gx, goff, gmask, gw


deform_conv2d_backward_op = _define("vqfr::modulated_deform_conv2d_backward", _deform_conv2d_backward)


@deform_conv2d_backward_op.register_fake
def _(grad_out, x, offset, mask, weight, stride, padding, dilation, output_mask=None):
    dispatch.check_same_device(x=x, grad_out=grad_out, offset=offset, mask=mask, weight=weight)
    dispatch.check_floating("modulated_deform_conv2d_backward", x=x, grad_out=grad_out, offset=offset, mask=mask,
                            weight=weight)
    _check_pairs(stride, padding, dilation)
    # Not empty_like, which would copy the strides of a channels-last x, offset, mask or weight: Inductor allocates
    # and checks the real outputs by these layouts.
    full = (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x)),
            offset.new_empty(offset.shape), mask.new_empty(mask.shape), weight.new_empty(weight.shape))
    return tuple(g if n else t.new_empty(0) for g, n, t in zip(full, _output_mask(output_mask),
                                                               (x, offset, mask, weight), strict=True))


def _deform_setup_context(ctx, inputs, output):
    x, offset, mask, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, offset, mask, weight, bias)
    ctx.conv_args = (list(stride), list(padding), list(dilation))


def _deform_backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    """Only the gradients autograd needs (``ctx.needs_input_grad``): a frozen weight costs no weight-gradient GEMM, an
    input that needs no gradient no scatter, and the backward op does not run at all when only the bias needs one."""
    x, offset, mask, weight, bias = ctx.saved_tensors
    need = [bool(n) for n in ctx.needs_input_grad[:4]]
    grads: list[Tensor | None] = [None] * 4
    if any(need):
        # grad_out as autograd hands it over: both implementations take any strides, and a contiguous() copy here
        # cost a full read and write of it for a channels-last model (or an expanded gradient, as from .sum()).
        computed = deform_conv2d_backward_op(grad_out, x, offset, mask, weight, *ctx.conv_args, need)
        grads = [g if n else None for g, n in zip(computed, need, strict=True)]
    grad_bias = grad_out.sum((0, 2, 3)).to(bias.dtype) if bias is not None and ctx.needs_input_grad[4] else None
    return *grads, grad_bias, None, None, None


deform_conv2d_op.register_autograd(_deform_backward, setup_context=_deform_setup_context)


def _nearest_code(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest codebook row: ([N] int64 index, [N] squared distance, fp32 (fp64 for fp64 inputs))."""
    check_nearest_args(z, codebook)  # the kernel would read past a codebook narrower than the tokens
    if dispatch.use_triton("nearest_code", z=z, codebook=codebook):
        return dispatch.triton_module("nearest_code_triton").nearest_code(z, codebook)
    idx, dist = nearest_code_reference(z, codebook, return_distance=True)
    return idx, dist


nearest_code_op = _define("vqfr::nearest_code", _nearest_code)


@nearest_code_op.register_fake
def _(z, codebook):
    dispatch.check_same_device(z=z, codebook=codebook)
    dispatch.check_floating("nearest_code", z=z, codebook=codebook)
    dist_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    return z.new_empty(z.shape[0], dtype=torch.long), z.new_empty(z.shape[0], dtype=dist_dtype)


def _group_norm_silu(x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float,
                     silu: bool) -> Tensor:
    """GroupNorm in fp32, then SiLU when ``silu``; see ``kernels.group_norm`` for shapes and semantics."""
    check_group_norm_args(x, weight, bias, num_groups, eps)  # the Triton launchers trust their shapes
    if dispatch.use_triton("group_norm_silu", x=x, weight=weight, bias=bias):
        return dispatch.triton_module("group_norm_triton").group_norm_silu(x, weight, bias, num_groups, eps, silu)
    return group_norm_silu_reference(x, weight, bias, num_groups, eps, silu)


group_norm_silu_op = _define("vqfr::group_norm_silu", _group_norm_silu)


@group_norm_silu_op.register_fake
def _(x, weight, bias, num_groups, eps, silu):
    check_group_norm_args(x, weight, bias, num_groups, eps)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def _group_norm_silu_backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    raise RuntimeError("vqfr::group_norm_silu has no backward (it is an inference op). Fix: call "
                       "kernels.group_norm_silu, which runs the differentiable reference when a gradient is needed, "
                       "or F.group_norm")


group_norm_silu_op.register_autograd(_group_norm_silu_backward, setup_context=lambda ctx, inputs, output: None)
