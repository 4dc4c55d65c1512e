"""GroupNorm with an optional fused SiLU, computed in fp32 whatever the storage dtype.

This file holds the pure-torch reference (the specification), the argument checks and the public entry point
:func:`group_norm_silu`. The Triton kernels live in ``kernels/group_norm_triton.py``, imported only when a kernel
runs, because triton is an optional dependency.

Semantics: ``y = SiLU(GroupNorm(x))`` (or without the SiLU), i.e. for image n and group g of ``C / G`` channels,

    mean, var = statistics of x[n, channels of g, :, :] (biased variance, as torch's GroupNorm)
    y[n, c] = (x[n, c] - mean) * rsqrt(var + eps) * weight[c] + bias[c]

computed in fp32 (fp64 for fp64 inputs) and rounded once to the dtype of ``x``. The output has the memory format of
``x``: channels-last in, channels-last out. This is VQFR's "fp32 island" GroupNorm (``F.group_norm(x.float())``,
then the SiLU, then the cast back) as one operation.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import check_floating, check_same_device

__all__ = ["group_norm_silu_reference", "group_norm_silu", "check_group_norm_args", "output_memory_format"]


def check_group_norm_args(x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float) -> None:
    """Validate the arguments of :func:`group_norm_silu`.

    Raises:
        ValueError: with the offending shape, group count, eps or device and what it should be.
        TypeError: when a tensor is not floating point, or ``num_groups`` is not an integer.
    """
    check_same_device(x=x, weight=weight, bias=bias)
    check_floating("group_norm_silu", x=x, weight=weight, bias=bias)
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups must be an int, got {num_groups!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W]; got shape {tuple(x.shape)} (add the missing dimensions with "
                         "x.view(...))")
    c = x.shape[1]
    if num_groups < 1 or c % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must be >= 1 and divide the {c} channels of x; use a divisor of "
                         f"{c} (VQFR's GroupNorm uses 32)")
    if not eps >= 0:  # also refuses NaN
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"{name} shape {tuple(t.shape)} != expected {(c,)} (one value per channel of x)")


def output_memory_format(x: Tensor) -> torch.memory_format:
    """The layout of the output: channels-last for a channels-last ``x`` (C > 1), else NCHW contiguous, whichever
    implementation runs (the fake kernel declares the same)."""
    return torch.channels_last if x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format


def group_norm_silu_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int,
                              eps: float = 1e-6, silu: bool = True) -> Tensor:
    """``SiLU(F.group_norm(x))`` in fp32 (fp64 for fp64 inputs), cast back to the dtype of ``x``; differentiable.

    ``x`` is made NCHW-contiguous before ``F.group_norm``: torch's CPU GroupNorm on a channels-last tensor computes
    the variance in one pass (E[x^2] - E[x]^2) and loses precision on activations with a large mean.

    Args:
        x: [N, C, H, W] floating point, any memory format.
        weight, bias: [C] or None (no affine), any floating dtype.
        num_groups: G, dividing C.
        eps: added to the variance.
        silu: apply SiLU after the affine.

    Returns:
        [N, C, H, W] in the dtype and memory format (:func:`output_memory_format`) of ``x``.
    """
    check_group_norm_args(x, weight, bias, num_groups, eps)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = F.group_norm(x.to(acc, memory_format=torch.contiguous_format), num_groups,
                     None if weight is None else weight.to(acc), None if bias is None else bias.to(acc), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype, memory_format=output_memory_format(x))


def group_norm_silu(x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float = 1e-6,
                    silu: bool = True) -> Tensor:
    """GroupNorm (statistics and normalisation in fp32), then SiLU when ``silu``, in the dtype of ``x``.

    Runs the Triton kernels where they can run (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; x in
    fp16, bf16 or fp32) and :func:`group_norm_silu_reference` elsewhere; :func:`kernels.use` and ``$VQFR_KERNELS``
    force either. Dispatches through the ``vqfr::group_norm_silu`` custom op, so torch.compile and torch.export see
    one node (on a GPU torch.compile traces into it: the op is a ``triton_op``).

    Forward only: the op has no backward. A call that needs a gradient (grad mode on and x, weight or bias requiring
    one) runs the differentiable reference instead, counted in ``kernels.LAUNCHES`` as
    ``"group_norm_silu:reference"``; in mode ``triton`` it raises RuntimeError.

    Args:
        x: [N, C, H, W] float16, bfloat16, float32 (float64: reference only), any memory format.
        weight, bias: [C] or None (no affine); any floating dtype (an fp16 weight beside fp32 x is read as it is,
            then used in fp32).
        num_groups: G, dividing C (VQFR: 32).
        eps: added to the variance (VQFR: 1e-6).
        silu: apply SiLU after the affine.

    Returns:
        [N, C, H, W] in the dtype and memory format of ``x`` (channels-last in, channels-last out).

    Raises:
        ValueError: on inconsistent shapes, a group count that does not divide C, or tensors on several devices.
        TypeError: when a tensor is not floating point.
    """
    from kernels import dispatch, ops

    check_group_norm_args(x, weight, bias, num_groups, eps)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if needs_grad:
        if dispatch.active_mode() == "triton":
            raise RuntimeError("group_norm_silu: the Triton kernel was forced (VQFR_KERNELS=triton or "
                               "kernels.use('triton')) but it has no backward and this call needs a gradient. Fix: "
                               "run it under torch.no_grad() / torch.inference_mode(), or use mode 'auto', which "
                               "takes the differentiable reference here")
        dispatch.LAUNCHES["group_norm_silu:reference"] += 1
        return group_norm_silu_reference(x, weight, bias, num_groups, eps, silu)
    return ops.group_norm_silu_op(x, weight, bias, int(num_groups), float(eps), bool(silu))
