"""VQFR's two unusual operations, nearest-code search and modulated deformable convolution, and its GroupNorm + SiLU.

Each has a pure-torch reference (the specification) and a public entry point that dispatches through a
``torch.library`` custom op (``torch.ops.vqfr.*``, registered by :mod:`kernels.ops` on first use). The op runs a
Triton kernel on CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1``) and pure torch elsewhere (the
reference; for float32 deformable convs its faster ``grid_sample`` form);
``$VQFR_KERNELS=auto|triton|reference`` or ``with kernels.use(...)`` forces either. Importing this package imports
neither triton nor the custom ops.
"""

from kernels.deform_conv import deform_conv2d_reference, modulated_deform_conv2d
from kernels.dispatch import LAUNCHES, active_mode, use, why_not_triton
from kernels.group_norm import group_norm_silu, group_norm_silu_reference
from kernels.nearest_code import nearest_code, nearest_code_reference

__all__ = [
    "modulated_deform_conv2d", "deform_conv2d_reference", "nearest_code", "nearest_code_reference",
    "group_norm_silu", "group_norm_silu_reference",
    "use", "active_mode", "why_not_triton", "LAUNCHES",
]
