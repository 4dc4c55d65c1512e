"""Our deformable convolution against ``torchvision.ops.deform_conv2d``, the op the official code calls.

The issue asks for exactly torchvision's semantics. The golden tests check them at the golden models' shapes; these
check them on the issue's odd shapes (every offset-group count, stride, padding, dilation, 1x1 and 3x3, offsets up
to +-H), forward and backward. torchvision is optional and PyPI's build does not import beside the CPU torch that CI
installs, so these tests skip there; they run wherever torchvision imports (here: torch 2.14.1 with torchvision
0.29.1, and torch 2.11.0 with 0.26.0, on the CPU).
"""

from __future__ import annotations

import importlib

import pytest
import torch

import kernels
from deploy.baselines import torchvision_problem
from kernels.deform_conv import deform_conv2d_grid_sample
from tests.test_kernels_triton import COVERING, as_double, assert_close_scaled, deform_case

pytestmark = pytest.mark.skipif(torchvision_problem() is not None, reason=str(torchvision_problem()))

CASES = [pytest.param(case, id="c{}-{}x{}-g{}-k{}-s{}-p{}-d{}".format(*case[:8])) for case in COVERING]


def torchvision_dcn(x, offset, mask, weight, bias, stride, padding, dilation):
    ops = importlib.import_module("torchvision.ops")
    return ops.deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)


def inputs(case, dtype):
    c, h, w, groups, k, stride, padding, dilation, spread, c_out = case
    tensors = deform_case(c, h, w, groups, k, stride, padding, dilation, spread=spread, c_out=c_out, dtype=dtype)
    return [t.cpu() for t in tensors], (stride, padding, dilation)


@pytest.mark.parametrize("case", CASES)
def test_reference_forward_and_backward_equal_torchvisions_in_float64(case):
    tensors, geometry = inputs(case, torch.float64)
    ours = [t.clone().requires_grad_() for t in tensors]
    theirs = [t.clone().requires_grad_() for t in tensors]
    with kernels.use("reference"):
        out = kernels.modulated_deform_conv2d(*ours, *geometry)
    expected = torchvision_dcn(*theirs, *geometry)
    assert out.shape == expected.shape
    assert_close_scaled(out, expected, 1e-12, "forward")
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with kernels.use("reference"):
        mine = torch.autograd.grad(out, ours, grad_out)
    ref = torch.autograd.grad(expected, theirs, grad_out)
    for name, a, b in zip(("x", "offset", "mask", "weight", "bias"), mine, ref, strict=True):
        assert_close_scaled(a, b, 1e-11, f"grad {name}")


@pytest.mark.parametrize("case", CASES)
def test_the_cpu_fast_path_matches_torchvision_in_float32(case):
    """The float32 CPU path (one grid_sample per tap) against torchvision's float32 kernel and float64 maths."""
    tensors, geometry = inputs(case, torch.float32)
    fast = deform_conv2d_grid_sample(*tensors, *geometry)
    theirs = torchvision_dcn(*tensors, *geometry)
    exact = torchvision_dcn(*as_double(tensors), *geometry)
    assert_close_scaled(fast, theirs, 1e-5, "grid_sample vs torchvision fp32")
    # No further from float64 than torchvision's own float32 result, give or take rounding.
    scale = exact.abs().max().item()
    assert (fast.double() - exact).abs().max().item() <= (theirs.double() - exact).abs().max().item() + 2e-6 * scale
