"""The explicit backward reference of the deformable convolution against autograd through the forward reference.

The forward reference passes float64 gradcheck (tests/test_kernel_references.py), so autograd through it is the
ground truth; the explicit formulas are what the Triton backward is compared with and what the CPU path runs.
"""

import pytest
import torch

from kernels.deform_conv import deform_conv2d_backward_reference, deform_conv2d_reference


def case(c, h, w, groups, k, spread, seed, integer_offsets=False):
    gen = torch.Generator().manual_seed(seed)
    ho, wo = h, w  # the cases below keep the spatial size (stride 1, "same" padding)
    x = torch.randn(2, c, h, w, generator=gen, dtype=torch.float64)
    offset = (torch.rand(2, 2 * groups * k * k, ho, wo, generator=gen, dtype=torch.float64) * 2 - 1) * spread
    if integer_offsets:  # samples exactly on pixels: the derivative is the one-sided one of autograd through floor
        offset = offset.round()
    mask = torch.rand(2, groups * k * k, ho, wo, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, c, k, k, generator=gen, dtype=torch.float64)
    return x, offset, mask, weight


@pytest.mark.parametrize("c,h,w,groups,k,spread,integer_offsets", [
    (12, 9, 13, 4, 3, 1.5, False),
    (20, 13, 9, 2, 3, 13.0, False),  # many samples outside the image
    (12, 9, 9, 3, 1, 2.0, False),
    (8, 7, 7, 2, 3, 2.0, True),
])
def test_backward_reference_equals_autograd(c, h, w, groups, k, spread, integer_offsets):
    x, offset, mask, weight = case(c, h, w, groups, k, spread, seed=c + h, integer_offsets=integer_offsets)
    pad = k // 2
    leaves = [t.clone().requires_grad_(True) for t in (x, offset, mask, weight)]
    out = deform_conv2d_reference(*leaves, None, 1, pad, 1)
    grad_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, leaves, grad_out)
    got = deform_conv2d_backward_reference(grad_out, x, offset, mask, weight, 1, pad, 1)
    for name, g, e in zip(("x", "offset", "mask", "weight"), got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"grad_{n}: {m}")


def test_backward_reference_keeps_input_dtypes():
    x, offset, mask, weight = (t.float() for t in case(12, 9, 9, 4, 3, 1.0, seed=0))
    grad_out = torch.randn(2, 5, 9, 9)
    grads = deform_conv2d_backward_reference(grad_out, x.half(), offset, mask.half(), weight, 1, 1, 1)
    assert [g.dtype for g in grads] == [torch.float16, torch.float32, torch.float16, torch.float32]
    assert [g.shape for g in grads] == [x.shape, offset.shape, mask.shape, weight.shape]
