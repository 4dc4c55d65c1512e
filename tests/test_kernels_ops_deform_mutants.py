"""What the custom-op glue (kernels/ops.py) and the deformable-conv references (kernels/deform_conv.py) promise that
no other test pinned (mutation round 23): which implementation the float32 dispatch really runs, which tensors the
Triton decision looks at, the backward op's default ``output_mask`` and the dtypes of the gradients it skips, the
layout rule for a one-channel input, the argument checks (pairs, weight, offset and mask sizes), mixed dtypes, a
grad_out with no flat view and a NaN row offset on the grid_sample path.

Numbers are compared against float64 autograd through the reference (an independent derivation of the explicit
backward formulas) or against documented behaviour (docs/KERNELS.md), not against captured outputs.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels
import kernels.ops  # noqa: F401  (registers torch.ops.vqfr.*)
from kernels import dispatch
from kernels.deform_conv import bilinear_sample_reference, deform_conv2d_grid_sample, deform_conv2d_reference
from tests.test_kernels_dispatch import small_dcn
from tests.test_kernels_reference_mutants import bilinear


@pytest.fixture(autouse=True)
def clean_switches(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("VQFR_KERNELS", raising=False)
    dispatch.LAUNCHES.clear()


def autograd_grads(grad_out, x, offset, mask, weight):
    """(grad_x, grad_offset, grad_mask, grad_weight) by float64 autograd through the reference forward."""
    leaves = [t.detach().double().requires_grad_() for t in (x, offset, mask, weight)]
    out = deform_conv2d_reference(*leaves, None, 1, 1, 1)
    return torch.autograd.grad(out, leaves, grad_out.double())


def test_float32_auto_mode_really_runs_the_grid_sample_forward(monkeypatch):
    """LAUNCHES counts "modulated_deform_conv2d:grid_sample" for float32 in mode auto; the function that runs must be
    the grid_sample one (the 4x faster CPU path), not the reference under that name."""
    calls = []
    real = kernels.ops.deform_conv2d_grid_sample

    def spy(*args):
        calls.append(args[0].dtype)
        return real(*args)

    monkeypatch.setattr(kernels.ops, "deform_conv2d_grid_sample", spy)
    args = small_dcn()
    out = kernels.modulated_deform_conv2d(*args, 1, 1, 1)
    assert calls == [torch.float32]
    assert dispatch.LAUNCHES == {"modulated_deform_conv2d:grid_sample": 1}
    torch.testing.assert_close(out, deform_conv2d_reference(*small_dcn(torch.float64), 1, 1, 1).float(),
                               atol=1e-4, rtol=0)
    kernels.modulated_deform_conv2d(*small_dcn(torch.float64), 1, 1, 1)  # float64: the reference, no grid_sample
    assert calls == [torch.float32]


def test_a_float64_bias_keeps_the_forward_off_the_triton_kernel(monkeypatch):
    """docs/KERNELS.md: the Triton decision looks at every tensor of the call, bias included; a float64 bias beside
    float32 inputs is not given to the kernel (a forced triton mode says so, naming the bias)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not dispatch.triton_installed() or dispatch.interpreter_problem():
        pytest.skip("needs triton's interpreter")
    x, offset, mask, weight, bias = small_dcn()
    with kernels.use("triton"), pytest.raises(RuntimeError, match="cannot run: bias has dtype torch.float64"):
        torch.ops.vqfr.modulated_deform_conv2d(x, offset, mask, weight, bias.double(), [1, 1], [1, 1], [1, 1])
    assert not dispatch.LAUNCHES


def test_backward_op_without_output_mask_computes_all_four_gradients():
    """``output_mask=None`` (the schema's default) computes all four gradients, each equal to float64 autograd."""
    x, offset, mask, weight, _ = small_dcn(torch.float64)
    grad_out = torch.randn(1, 4, 6, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.ops.vqfr.modulated_deform_conv2d_backward(grad_out, x, offset, mask, weight, [1, 1], [1, 1], [1, 1])
    for g, want in zip(got, autograd_grads(grad_out, x, offset, mask, weight), strict=True):
        assert g.shape == want.shape
        torch.testing.assert_close(g, want, atol=1e-10, rtol=1e-10)


def test_gradients_not_asked_for_come_back_empty_in_their_own_dtype():
    """A gradient the output_mask skips is an empty tensor of its input's dtype (the op's docstring), like the fake
    kernel's: a float64 offset beside a float16 mask gives a float64 empty grad_offset and a float16 empty
    grad_mask."""
    x, offset, mask, weight, _ = small_dcn()
    offset, mask = offset.double(), mask.half()
    args = (torch.randn(1, 4, 6, 7), x, offset, mask, weight, [1, 1], [1, 1], [1, 1], [True, False, False, True])
    real = torch.ops.vqfr.modulated_deform_conv2d_backward(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.vqfr.modulated_deform_conv2d_backward(*(mode.from_tensor(a) if isinstance(a, torch.Tensor)
                                                                 else a for a in args))
    for got in (real, fake):
        assert [g.dtype for g in got] == [torch.float32, torch.float64, torch.float16, torch.float32]
        assert [g.numel() for g in got[1:3]] == [0, 0]


ONE_CHANNEL_MODES = ["auto", "reference", pytest.param("triton", marks=pytest.mark.skipif(
    not dispatch.triton_installed(), reason="triton is not installed"))]


@pytest.mark.parametrize("mode", ONE_CHANNEL_MODES)
def test_a_one_channel_channels_last_input_gives_an_nchw_output(mode, monkeypatch):
    """docs/KERNELS.md: the output is channels-last for a channels-last x with C > 1, else NCHW, on every path and in
    the fake kernel (Inductor lays the output out by it). A [B, 1, H, W] tensor is contiguous in either layout, so
    C = 1 is NCHW, also for an NHWC view whose channel stride is 1."""
    if mode == "triton" and not torch.cuda.is_available():
        if dispatch.interpreter_problem():
            pytest.skip(dispatch.interpreter_problem())
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 6, 1, generator=gen).permute(0, 3, 1, 2)  # strides (30, 1, 6, 1)
    offset, mask = torch.randn(2, 18, 5, 6, generator=gen), torch.rand(2, 9, 5, 6, generator=gen)
    weight, bias = torch.randn(3, 1, 3, 3, generator=gen), torch.randn(3, generator=gen)
    args = (x, offset, mask, weight, bias, [1, 1], [1, 1], [1, 1])
    with kernels.use(mode):
        out = torch.ops.vqfr.modulated_deform_conv2d(*args)
    with FakeTensorMode() as fake_mode:
        fake = torch.ops.vqfr.modulated_deform_conv2d(*(fake_mode.from_tensor(a) if isinstance(a, torch.Tensor)
                                                        else a for a in args))
    assert out.stride() == fake.stride() == (90, 30, 6, 1)
    torch.testing.assert_close(out, deform_conv2d_grid_sample(x, offset, mask, weight, bias, 1, 1, 1), atol=1e-5,
                               rtol=0)


def test_a_float_in_the_second_place_of_a_pair_is_refused():
    """Each value of a (h, w) pair must be an integer, the second one too: (1, 1.5) would run as (1, 1)."""
    args = small_dcn()
    for mode in ("auto", "reference"):
        with kernels.use(mode), pytest.raises(TypeError, match=r"dilation must be an int or a pair of ints"):
            kernels.modulated_deform_conv2d(*args, 1, 1, (1, 1.5))


@pytest.mark.parametrize("weight_shape", [(4, 8, 9), (4, 8, 3, 3, 1)], ids=["3-d", "5-d"])
def test_a_weight_that_is_not_four_dimensional_is_named_with_the_expected_layout(weight_shape):
    """The ValueError says which layout is expected, not Python's "too many values to unpack"."""
    x, offset, mask, _, bias = small_dcn()
    with pytest.raises(ValueError, match=r"weight \[C_out,C_in,KH,KW\]"):
        deform_conv2d_reference(x, offset, mask, torch.randn(weight_shape), bias, 1, 1, 1)


def test_a_weight_with_fewer_input_channels_than_x_is_refused():
    """One weight group: a [C_out, C_in / 2, KH, KW] weight (a grouped-conv weight) is a ValueError naming both
    channel counts, on the op as on the reference, not an einsum error from deep inside."""
    x, offset, mask, weight, bias = small_dcn()
    for call in (deform_conv2d_reference, kernels.modulated_deform_conv2d):
        with pytest.raises(ValueError, match="weight has 4 input channels but x has 8"):
            call(x, offset, mask, weight[:, :4], bias, 1, 1, 1)


@pytest.mark.parametrize("name", ["offset", "mask"])
def test_an_offset_or_mask_of_the_wrong_output_size_is_a_value_error_naming_it(name):
    """The offset and mask must cover [H_out, W_out] exactly (6 x 7 here): one column short is a ValueError naming
    the tensor and the expected shape, not a view error from inside the sampling."""
    x, offset, mask, weight, bias = small_dcn()
    args = {"offset": offset, "mask": mask}
    args[name] = args[name][..., :6].contiguous()
    for mode in ("auto", "reference"):
        with kernels.use(mode), pytest.raises(ValueError, match=rf"{name} shape .* != expected \(1, \d+, 6, 7\)"):
            kernels.modulated_deform_conv2d(x, args["offset"], args["mask"], weight, bias, 1, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bilinear_sample_reference_returns_the_dtype_of_the_features(dtype):
    """Its docstring: the samples come back in the dtype of ``feat`` (the reference forward then runs in the dtype
    of x, as plain torch would), and equal torchvision's bilinear rule up to that dtype's rounding."""
    gen = torch.Generator().manual_seed(4)
    feat = torch.randn(2, 3, 4, 5, generator=gen)
    py, px = torch.rand(2, 6, generator=gen) * 6 - 1.5, torch.rand(2, 6, generator=gen) * 7 - 1.5
    got = bilinear_sample_reference(feat.to(dtype), py, px)
    assert got.dtype == dtype
    want = torch.stack([torch.stack([bilinear(feat[n].to(dtype).double(), float(py[n, i]), float(px[n, i]))
                                     for i in range(6)], 1) for n in range(2)])
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=0)


def test_a_grad_out_with_no_flat_view_is_taken_as_it_is():
    """A deformable-conv output concatenated along its width gets its gradient as a narrow slice of the
    concatenation's (no flat H_out*W_out view); the backward takes any strides and gives float64 autograd's
    gradients."""
    args = small_dcn(torch.float64)
    leaves = [t.clone().requires_grad_() for t in args]
    out = kernels.modulated_deform_conv2d(*leaves, 1, 1, 1)
    upstream = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.cat([out, out.new_zeros(1, 4, 6, 3)], dim=3).backward(upstream)
    want = autograd_grads(upstream[..., :7], *args[:4])
    for leaf, w in zip(leaves[:4], want, strict=True):
        torch.testing.assert_close(leaf.grad, w, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(leaves[4].grad, upstream[..., :7].sum((0, 2, 3)), atol=1e-12, rtol=0)


def test_offset_mask_weight_and_bias_of_another_dtype_are_converted_to_the_dtype_of_x():
    """modulated_deform_conv2d's docstring: an fp32 weight beside fp16 activations (autocast) computes in the dtype
    of x, so the output equals that of a mask, weight and bias converted to the dtype of x beforehand (the sample
    positions are computed in fp32 either way); float64 ones beside a float32 x likewise, offset included."""
    x, offset, mask, weight, bias = small_dcn()
    for x_dtype, other in ((torch.float16, torch.float32), (torch.float32, torch.float64)):
        xd, rest = x.to(x_dtype), [t.to(other) for t in (offset, mask, weight, bias)]
        for mode in ("auto", "reference"):
            with kernels.use(mode):
                mixed = kernels.modulated_deform_conv2d(xd, *rest, 1, 1, 1)
                converted = kernels.modulated_deform_conv2d(xd, rest[0].float(), *(t.to(x_dtype) for t in rest[1:]),
                                                            1, 1, 1)
            assert mixed.dtype == x_dtype
            assert torch.equal(mixed, converted), (x_dtype, mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_nan_row_offset_beside_a_column_inside_the_image_reads_zero(dtype):
    """A NaN dy reads 0 even where dx alone would keep the sample inside the image (the grid_sample path maps the
    row and the column separately): the output equals that of the same tap masked out."""
    x, offset, mask, weight, bias = small_dcn(torch.float64)
    off, masked = offset.clone(), mask.clone()
    off[0, 2 * 4, 3, 3], off[0, 2 * 4 + 1, 3, 3] = float("nan"), 0.25  # tap 4 (the centre) of pixel (3, 3)
    masked[0, 4, 3, 3] = 0
    expected = deform_conv2d_reference(x, offset, masked, weight, bias, 1, 1, 1)
    out = kernels.modulated_deform_conv2d(*(t.to(dtype) for t in (x, off, mask, weight, bias)), 1, 1, 1)
    path = "grid_sample" if dtype == torch.float32 else "reference"
    assert dispatch.LAUNCHES == {f"modulated_deform_conv2d:{path}": 1}
    torch.testing.assert_close(out, expected.to(dtype), atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0)
