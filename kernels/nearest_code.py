"""Nearest-code search: the index of the codebook row closest (squared L2) to each token.

This file holds the pure-torch reference, which is the specification, and the public entry point
:func:`nearest_code`. The reference uses the official quantizer's formula
``d = sum(z^2) + sum(e^2) - 2 z e^T`` and ``argmin`` (the lowest index wins exact ties), so its indices equal the
official code's. The fused Triton kernel lives in ``kernels/nearest_code_triton.py``, imported only when it runs.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor

from kernels.dispatch import check_floating, check_same_device

__all__ = ["nearest_code_reference", "nearest_code", "check_nearest_args"]


def check_nearest_args(z: Tensor, codebook: Tensor) -> None:
    """Raise ValueError unless ``z`` is [N, D] and ``codebook`` is [K, D] with K >= 1, both on one device, and
    TypeError unless both are floating point."""
    check_same_device(z=z, codebook=codebook)
    check_floating("nearest_code", z=z, codebook=codebook)
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1] or codebook.shape[0] == 0:
        raise ValueError(
            f"z must be [N, D] and codebook [K, D] with K >= 1; got {tuple(z.shape)} and {tuple(codebook.shape)}"
        )


def nearest_code_reference(
    z: Tensor, codebook: Tensor, return_distance: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Index of the nearest codebook row for every token, by the official formula.

    Args:
        z: [N, D] tokens.
        codebook: [K, D] code vectors.
        return_distance: also return the squared distance to the chosen code.

    Returns:
        [N] int64 indices, and with ``return_distance`` also [N] distances (fp32 for fp16/bf16 inputs).
    """
    check_nearest_args(z, codebook)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    zf, ef = z.to(acc), codebook.to(acc)
    distance = (zf * zf).sum(1, keepdim=True) + (ef * ef).sum(1) - 2 * (zf @ ef.t())
    idx = distance.argmin(dim=1)
    if return_distance:
        return idx, distance.gather(1, idx.unsqueeze(1)).squeeze(1)
    return idx


@overload
def nearest_code(z: Tensor, codebook: Tensor, return_distance: Literal[False] = False) -> Tensor: ...
@overload
def nearest_code(z: Tensor, codebook: Tensor, return_distance: Literal[True]) -> tuple[Tensor, Tensor]: ...


def nearest_code(z: Tensor, codebook: Tensor, return_distance: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Index of the nearest codebook row (squared L2) for every token.

    Runs the fused Triton kernel where it can (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; fp16, bf16
    or fp32, accumulated in fp32, no N x K matrix in memory) and :func:`nearest_code_reference` elsewhere;
    :func:`kernels.use` and ``$VQFR_KERNELS`` force either. Exact ties go to the lowest index. Dispatches through the
    ``vqfr::nearest_code`` custom op.

    Args:
        z: [N, D] tokens, floating point.
        codebook: [K, D] code vectors, floating point; its dtype may differ from that of ``z`` (the distances are
            accumulated in fp32 either way, fp64 when ``z`` is fp64; a float64 codebook takes the reference).
        return_distance: also return the squared distance to the chosen code.

    Returns:
        [N] int64 indices, and with ``return_distance`` also [N] distances (fp32; fp64 for fp64 inputs).

    Raises:
        ValueError: when the shapes do not fit.
        TypeError: when ``z`` or ``codebook`` is not floating point.
    """
    from kernels import ops

    check_nearest_args(z, codebook)
    idx, dist = ops.nearest_code_op(z, codebook)
    return (idx, dist) if return_distance else idx
