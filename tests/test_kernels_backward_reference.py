"""The explicit backward reference of the deformable convolution against autograd through the forward reference.

The forward reference passes float64 gradcheck (tests/test_kernel_references.py), so autograd through it is the
ground truth; the explicit formulas are what the Triton backward is compared with and what the CPU path runs.
"""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class AtenOps(TorchDispatchMode):
    """Counts the aten operators run inside the block, by name (``ops["scatter_add_"]``)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("output_mask", [
    (False, False, False, True),  # only the weight (x, offset and mask come from frozen layers or data)
    (True, False, False, False),  # only x
    (True, True, True, False),  # a frozen weight
    (False, True, True, False),
    (False, False, True, False),
])
def test_backward_reference_computes_only_the_gradients_asked_for(output_mask):
    """Gradients not asked for come back as None and cost nothing: grad_x is the only one that scatters, the
    weight gradient the only one that needs a second matmul per tap, and grad_col (W_k^T grad_out) is needed by x,
    offset and mask only. The ones asked for are bitwise those of the full backward."""
    x, offset, mask, weight = case(12, 9, 9, 2, 3, 2.0, seed=3)
    grad_out = torch.randn(2, 5, 9, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    full = deform_conv2d_backward_reference(grad_out, x, offset, mask, weight, 1, 1, 1)
    with AtenOps() as ops:
        got = deform_conv2d_backward_reference(grad_out, x, offset, mask, weight, 1, 1, 1, output_mask=output_mask)
    for name, need, g, f in zip(("x", "offset", "mask", "weight"), output_mask, got, full, strict=True):
        assert (g is not None) == need, name
        if need:
            assert torch.equal(g, f), name
    need_x, need_offset, need_mask, need_weight = output_mask
    taps = 9
    assert (ops.counts["scatter_add_"] > 0) == need_x, ops.counts
    assert (ops.counts["gather"] > 0) == (need_offset or need_mask or need_weight), ops.counts  # x at the corners
    matmuls = ops.counts["bmm"] + ops.counts["mm"]
    assert matmuls == taps * ((need_x or need_offset or need_mask) + need_weight), ops.counts


def test_backward_reference_with_nothing_asked_for_does_nothing():
    x, offset, mask, weight = case(8, 7, 7, 2, 3, 1.0, seed=5)
    grad_out = torch.ones(2, 5, 7, 7, dtype=torch.float64)
    with AtenOps() as ops:
        got = deform_conv2d_backward_reference(grad_out, x, offset, mask, weight, 1, 1, 1, output_mask=(False,) * 4)
    assert got == (None, None, None, None)
    assert not ops.counts, ops.counts
