"""The grid_sample forward of the deformable conv (the float32 path off Triton) against the reference."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import dispatch
from kernels.deform_conv import deform_conv2d_grid_sample, deform_conv2d_reference


def case(b, c, h, w, groups, stride, padding, dilation, spread, c_out=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ho = (h + 2 * padding - dilation * 2 - 1) // stride + 1
    wo = (w + 2 * padding - dilation * 2 - 1) // stride + 1
    x = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    offset = torch.randn(b, 2 * groups * 9, ho, wo, generator=gen, dtype=torch.float64) * spread
    mask = torch.rand(b, groups * 9, ho, wo, generator=gen, dtype=torch.float64)
    c_out = c_out or c + 3
    weight = torch.randn(c_out, c, 3, 3, generator=gen, dtype=torch.float64) / (9 * c) ** 0.5
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64)
    return (x, offset, mask, weight, bias), (stride, padding, dilation)


CASES = [
    # b, c, h, w, groups, stride, padding, dilation, offset spread (px)
    (2, 12, 9, 13, 4, 1, 1, 1, 0.7),
    (2, 12, 9, 13, 4, 1, 1, 1, 9.0),  # most samples far outside the image
    (1, 20, 17, 9, 2, 2, 2, 1, 3.0),
    (1, 12, 13, 13, 3, 1, 2, 2, 2.0),
    (1, 8, 1, 1, 4, 1, 1, 1, 1.0),  # sides of 1: grid_sample's (S - 1) / 2 would be 0 without the padding
    (1, 8, 1, 7, 2, 1, 1, 1, 1.0),
    (1, 8, 5, 1, 2, 1, 1, 1, 2.0),
]


@pytest.mark.parametrize("shape", CASES, ids=[f"{c[1]}x{c[2]}x{c[3]}g{c[4]}s{c[5]}p{c[6]}d{c[7]}" for c in CASES])
def test_grid_sample_forward_matches_the_reference(shape):
    args, conv = case(*shape)
    # float64: the same function up to float64 rounding.
    torch.testing.assert_close(deform_conv2d_grid_sample(*args, *conv), deform_conv2d_reference(*args, *conv),
                               atol=1e-12, rtol=0)
    # float32: the tolerance the dispatch promises.
    args32 = [t.float() for t in args]
    torch.testing.assert_close(deform_conv2d_grid_sample(*args32, *conv), deform_conv2d_reference(*args32, *conv),
                               atol=1e-5, rtol=0)


def test_grid_sample_error_at_large_coordinates_is_the_references_own():
    """At 128x128 sample coordinates need 7 integer bits; grid_sample's normalisation costs about as much as the
    reference's own float32 rounding, measured against float64 maths on the same inputs."""
    args, conv = case(1, 8, 128, 128, 2, 1, 1, 1, 2.0)
    exact = deform_conv2d_reference(*args, *conv)
    args32 = [t.float() for t in args]
    ref_err = (deform_conv2d_reference(*args32, *conv).double() - exact).abs().max().item()
    ours_err = (deform_conv2d_grid_sample(*args32, *conv).double() - exact).abs().max().item()
    assert ours_err <= 1.5 * ref_err + 1e-6, (ours_err, ref_err)
    assert ours_err < 3e-5


def test_dispatch_runs_grid_sample_for_float32_only(monkeypatch):
    monkeypatch.delenv("VQFR_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args, conv = case(1, 8, 6, 7, 2, 1, 1, 1, 2.0)
    dispatch.LAUNCHES.clear()
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        kernels.modulated_deform_conv2d(*[t.to(dtype) for t in args], *conv)
    with kernels.use("reference"):
        kernels.modulated_deform_conv2d(*[t.float() for t in args], *conv)
    assert dispatch.LAUNCHES == {"modulated_deform_conv2d:grid_sample": 1, "modulated_deform_conv2d:reference": 3}


def test_gradients_flow_through_the_grid_sample_forward(monkeypatch):
    """Autograd still uses the reference backward; the forward it differentiates is the same function."""
    monkeypatch.delenv("VQFR_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args, conv = case(1, 8, 6, 7, 2, 1, 1, 1, 2.0)
    leaves = [t.float().requires_grad_() for t in args]
    dispatch.LAUNCHES.clear()
    kernels.modulated_deform_conv2d(*leaves, *conv).square().sum().backward()
    # the forward under autograd is the grid_sample one (else this compares the reference with itself)
    assert dispatch.LAUNCHES == {"modulated_deform_conv2d:grid_sample": 1,
                                 "modulated_deform_conv2d_backward:reference": 1}, dict(dispatch.LAUNCHES)
    ref_leaves = [t.float().requires_grad_() for t in args]
    with kernels.use("reference"):
        kernels.modulated_deform_conv2d(*ref_leaves, *conv).square().sum().backward()
    for ours, ref in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(ours.grad, ref.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_op_output_layout_matches_its_fake_kernel(channels_last):
    """Inductor and AOTInductor lay out the op's output by the fake kernel; every implementation must agree with it
    (batch 2: einsum outputs come back permuted otherwise)."""
    import kernels.ops  # noqa: F401  (registers torch.ops.vqfr.*)

    (x, offset, mask, weight, bias), _ = case(2, 8, 5, 6, 2, 1, 1, 1, 2.0)
    x = x.float().contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    args = (x, offset.float(), mask.float(), weight.float(), bias.float(), [1, 1], [1, 1], [1, 1])
    for mode in ("auto", "reference"):
        with kernels.use(mode):
            result = torch.library.opcheck(torch.ops.vqfr.modulated_deform_conv2d.default, args,
                                           test_utils=("test_faketensor",), raise_exception=False)
            assert result["test_faketensor"] == "SUCCESS", (mode, result)
            out = torch.ops.vqfr.modulated_deform_conv2d(*args)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
