"""VQFR's two unusual operations: nearest-code search and modulated deformable convolution.

Each has a pure-torch reference (the specification) and a public entry point that dispatches through a
``torch.library`` custom op. Nothing runs at import except the op registration.
"""

from kernels.deform_conv import deform_conv2d_reference, modulated_deform_conv2d
from kernels.nearest_code import nearest_code, nearest_code_reference

__all__ = ["modulated_deform_conv2d", "deform_conv2d_reference", "nearest_code", "nearest_code_reference"]
