"""Behaviours of the kernel references, their argument checks, the dispatch switch and the custom ops that no other
test pinned down (each test names what it protects; found by mutation testing of kernels/).

The numbers are checked against an independent float64 formulation written here with explicit loops (torchvision's
bilinear rule per sample point), not against the code under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels
import kernels.ops  # noqa: F401  (registers torch.ops.vqfr.*)
from kernels import dispatch
from kernels.deform_conv import (
    deform_conv2d_backward_reference,
    deform_conv2d_grid_sample,
    deform_conv2d_reference,
)
from kernels.nearest_code import nearest_code_reference


@pytest.fixture(autouse=True)
def clean_switches(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("VQFR_KERNELS", raising=False)
    dispatch.LAUNCHES.clear()


def bilinear(img: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """torchvision's bilinear read of ``img`` [C, H, W] at (y, x), written out: 0 for y <= -1, y >= H, x <= -1 or
    x >= W, else the in-image corners weighted by their areas."""
    _, h, w = img.shape
    if not (-1 < y < h and -1 < x < w):
        return img.new_zeros(img.shape[0])
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    out = img.new_zeros(img.shape[0])
    for yi, xi, wgt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx), (y0 + 1, x0, ly * (1 - lx)),
                        (y0 + 1, x0 + 1, ly * lx)):
        if 0 <= yi < h and 0 <= xi < w:
            out = out + wgt * img[:, yi, xi]
    return out


def naive_dcn(x, offset, mask, weight, bias, stride, padding, dilation):
    """Modulated deformable conv in float64 by loops over (batch, group, tap, output pixel): the module docstring's
    formula, with (h, w) pairs for the geometry and any KH x KW kernel."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    x, offset, mask, weight = (t.double() for t in (x, offset, mask, weight))
    b, c, _, _ = x.shape
    c_out, _, kh, kw = weight.shape
    taps = kh * kw
    groups = offset.shape[1] // (2 * taps)
    cg = c // groups
    ho, wo = offset.shape[2:]
    cols = torch.zeros(b, c, kh, kw, ho, wo, dtype=torch.float64)
    for n, g, ky, kx, oy, ox in itertools.product(range(b), range(groups), range(kh), range(kw), range(ho), range(wo)):
        k = ky * kw + kx
        y = oy * sh - ph + ky * dh + float(offset[n, g * 2 * taps + 2 * k, oy, ox])
        xx = ox * sw - pw + kx * dw + float(offset[n, g * 2 * taps + 2 * k + 1, oy, ox])
        sample = bilinear(x[n, g * cg:(g + 1) * cg], y, xx)
        cols[n, g * cg:(g + 1) * cg, ky, kx, oy, ox] = sample * float(mask[n, g * taps + k, oy, ox])
    out = torch.einsum("ocij,bcijhw->bohw", weight, cols)
    return out if bias is None else out + bias.double().view(1, -1, 1, 1)


# kernel (KH, KW), stride, padding, dilation: every (h, w) pair unequal, so a w computed from an h value shows.
GEOMETRIES = [
    ((2, 3), (1, 2), (2, 1), (2, 1)),
    ((3, 2), (2, 1), (0, 2), (1, 3)),
]


def geometry_case(kernel, stride, padding, dilation, *, b=2, c=4, groups=2, h=5, w=7, c_out=3, spread=2.0, seed=0,
                  dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    kh, kw = kernel
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    offset = (torch.rand(b, 2 * groups * kh * kw, ho, wo, generator=gen, dtype=torch.float64) * 2 - 1) * spread
    mask = torch.rand(b, groups * kh * kw, ho, wo, generator=gen, dtype=torch.float64)
    weight = torch.randn(c_out, c, kh, kw, generator=gen, dtype=torch.float64)
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (x, offset, mask, weight, bias)]


@pytest.mark.parametrize("kernel,stride,padding,dilation", GEOMETRIES, ids=["2x3", "3x2"])
def test_non_square_kernels_and_unequal_geometry_on_every_cpu_path(kernel, stride, padding, dilation):
    """The other tests use square kernels and equal (h, w) geometry, where reading kh for kw, or the h stride,
    padding or dilation for the w one, changes nothing. Every CPU forward (the reference, the grid_sample forward,
    the public entry point in each mode) against the loop formulation."""
    args = geometry_case(kernel, stride, padding, dilation)
    expected = naive_dcn(*args, stride, padding, dilation)
    assert expected.shape[2:] == args[1].shape[2:]
    torch.testing.assert_close(deform_conv2d_reference(*args, stride, padding, dilation), expected,
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(deform_conv2d_grid_sample(*args, stride, padding, dilation), expected,
                               atol=1e-10, rtol=0)
    args32 = [t.float() for t in args]
    for mode in ("auto", "reference"):  # auto: the grid_sample forward for float32
        with kernels.use(mode):
            out = kernels.modulated_deform_conv2d(*args32, stride, padding, dilation)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-5)
    assert dispatch.LAUNCHES == {"modulated_deform_conv2d:grid_sample": 1, "modulated_deform_conv2d:reference": 1}


@pytest.mark.parametrize("kernel,stride,padding,dilation", GEOMETRIES, ids=["2x3", "3x2"])
def test_backward_with_non_square_kernels_and_unequal_geometry(kernel, stride, padding, dilation):
    """The explicit backward formulas against finite differences of the forward (float64 gradcheck through the
    custom op, whose backward is the reference one on the CPU), for the geometries above."""
    args = geometry_case(kernel, stride, padding, dilation, b=1, c=2, groups=1, h=4, w=5, c_out=2, spread=1.3,
                         seed=1)
    leaves = tuple(t.clone().requires_grad_(True) for t in args)
    assert torch.autograd.gradcheck(
        lambda *t: kernels.modulated_deform_conv2d(*t, stride, padding, dilation), leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel,stride,padding,dilation", GEOMETRIES, ids=["2x3", "3x2"])
def test_fake_kernel_output_shape_with_unequal_geometry(kernel, stride, padding, dilation):
    """torch.compile and torch.export allocate by the fake kernel: its output size must be the real one when H and W
    have different stride, padding and dilation (the real op's shape is checked above)."""
    args = geometry_case(kernel, stride, padding, dilation, dtype=torch.float32)
    conv = (list(stride), list(padding), list(dilation))
    real = torch.ops.vqfr.modulated_deform_conv2d(*args, *conv)
    with FakeTensorMode() as mode:
        fake = torch.ops.vqfr.modulated_deform_conv2d(*(mode.from_tensor(t) for t in args), *conv)
    assert fake.shape == real.shape == args[1].shape[:1] + (3,) + args[1].shape[2:]


def test_reference_reads_sample_positions_in_float32_for_half_inputs():
    """The reference computes sample positions in fp32 for fp16 inputs. In fp16 a position near 200 px is rounded
    to 1/8 px: 200.3 would read as 200.25 and give 0.25 instead of 0.3 on a 0/1 stripe pattern."""
    w = 256
    x = (torch.arange(w) % 2).float().view(1, 1, 1, w)  # 0, 1, 0, 1, ...: exact in fp16
    weight = torch.ones(1, 1, 1, 1)
    offset = torch.zeros(1, 2, 1, w)
    offset[0, 1] = 200.3 - torch.arange(w).float()  # every output pixel samples (0, 200.3)
    mask = torch.ones(1, 1, 1, w)
    out = deform_conv2d_reference(x.half(), offset.half(), mask.half(), weight.half())
    assert out.dtype == torch.float16
    # the offsets themselves are fp16 (their own rounding is the caller's): the exact position of each
    pos = torch.arange(w).double() + offset[0, 1, 0].half().double()
    expected = torch.stack([bilinear(x[0].double(), 0.0, float(p)) for p in pos]).view(1, 1, 1, w)
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=0)


def test_backward_reference_of_bfloat16_inputs_accumulates_in_float32():
    """The backward computes in fp32 for fp16 and bf16 inputs and rounds each gradient once: against float64 maths
    on the same bf16 values, every gradient is within bf16's rounding of its result (bf16 sums over 16 channels x 9 taps
    would be off by several ulps)."""
    args = geometry_case((3, 3), (1, 1), (1, 1), (1, 1), b=1, c=16, groups=1, h=6, w=6, c_out=16, spread=1.5,
                         seed=2, dtype=torch.bfloat16)
    x, offset, mask, weight, _ = args
    grad_out = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(5)).bfloat16()
    got = deform_conv2d_backward_reference(grad_out, x, offset, mask, weight, 1, 1, 1)
    want = deform_conv2d_backward_reference(*(t.double() for t in (grad_out, x, offset, mask, weight)), 1, 1, 1)
    for name, g, e in zip(("x", "offset", "mask", "weight"), got, want, strict=True):
        assert g.dtype == torch.bfloat16, name
        # one bf16 rounding of the result: half an ulp, 2**-9 relative
        err = (g.double() - e).abs()
        assert bool((err <= e.abs() * 2.0 ** -8 + 1e-5).all()), (name, float(err.max()))


# --- argument checks ----------------------------------------------------------------------------------------------


def small_case():
    return geometry_case((3, 3), (1, 1), (1, 1), (1, 1), b=2, c=4, groups=2, h=5, w=6, c_out=3, dtype=torch.float32)


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_geometry_of_three_values_is_refused_by_the_public_function(mode):
    """stride, padding and dilation are an int or an (h, w) pair: a third value used to be ignored silently."""
    args = small_case()
    with kernels.use(mode):
        for position, name in enumerate(("stride", "padding", "dilation")):
            conv = [1, 1, 1]
            conv[position] = (1, 1, 1)
            with pytest.raises(ValueError, match=f"{name}: expected an int or a pair of ints"):
                kernels.modulated_deform_conv2d(*args, *conv)
            with pytest.raises(ValueError, match=f"{name}: expected an int or a pair of ints"):
                deform_conv2d_reference(*args, *conv)


def test_bytes_geometry_is_refused_like_a_string():
    """b"11" has two items that index as the integers 49 and 49: it must be refused like "11", not run as stride 49."""
    args = small_case()
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        kernels.modulated_deform_conv2d(*args, b"11", 1, 1)


def test_an_offset_with_no_channels_is_a_value_error():
    """An offset with 0 channels has no offset group: ValueError naming the expected shape, not ZeroDivisionError."""
    x, offset, mask, weight, bias = small_case()
    with pytest.raises(ValueError, match=r"offset must be \[B, 2\*G\*9, H_out, W_out\]"):
        kernels.modulated_deform_conv2d(x, offset[:, :0], mask, weight, bias, 1, 1, 1)


def test_offset_groups_that_do_not_divide_the_channels_are_refused():
    """3 offset groups over 4 input channels: ValueError saying so (it failed in a reshape, unnamed)."""
    x, _, _, weight, bias = small_case()
    offset, mask = torch.zeros(2, 2 * 3 * 9, 5, 6), torch.ones(2, 3 * 9, 5, 6)
    for mode in ("auto", "reference"):
        with kernels.use(mode), pytest.raises(ValueError, match="3 offset groups do not divide 4 input channels"):
            kernels.modulated_deform_conv2d(x, offset, mask, weight, bias, 1, 1, 1)


def test_a_bias_of_the_wrong_length_is_refused_not_broadcast():
    """A one-element bias would broadcast over the 3 output channels without a word."""
    x, offset, mask, weight, _ = small_case()
    for bias in (torch.ones(1), torch.ones(4), torch.ones(3, 1)):
        for mode in ("auto", "reference"):
            with kernels.use(mode), pytest.raises(ValueError, match=r"bias shape .* != expected \(3,\)"):
                kernels.modulated_deform_conv2d(x, offset, mask, weight, bias, 1, 1, 1)


def test_an_offset_or_mask_of_another_batch_is_refused():
    """The offset and mask must have x's batch: a batch-1 offset beside a batch-2 x is a ValueError naming the
    expected shape (torchvision refuses it too)."""
    x, offset, mask, weight, bias = small_case()
    with pytest.raises(ValueError, match=r"offset shape \(1, 36, 5, 6\) != expected \(2, 36, 5, 6\)"):
        kernels.modulated_deform_conv2d(x, offset[:1], mask, weight, bias, 1, 1, 1)
    with pytest.raises(ValueError, match=r"mask shape \(1, 18, 5, 6\) != expected \(2, 18, 5, 6\)"):
        kernels.modulated_deform_conv2d(x, offset, mask[:1], weight, bias, 1, 1, 1)


def test_backward_op_refuses_a_grad_out_of_the_wrong_shape_even_with_the_right_size():
    """grad_out [B, C_out, W_out, H_out] has as many elements as the right one: the reference would reshape it and
    return wrong gradients."""
    x, offset, mask, weight, _ = small_case()
    grad_out = torch.randn(2, 3, 6, 5)
    with pytest.raises(ValueError, match=r"grad_out shape \(2, 3, 6, 5\) != expected \(2, 3, 5, 6\)"):
        torch.ops.vqfr.modulated_deform_conv2d_backward(grad_out, x, offset, mask, weight, [1, 1], [1, 1], [1, 1])


def test_the_references_called_directly_name_a_tensor_on_another_device():
    """The references are public too: a meta tensor beside CPU ones raises ValueError naming it (meta maths would
    return uninitialised values without a word)."""
    x, offset, mask, weight, bias = small_case()
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        deform_conv2d_reference(x, offset, mask, weight.to("meta"), bias, 1, 1, 1)
    with pytest.raises(ValueError, match="offset is on meta but x is on cpu"):
        deform_conv2d_grid_sample(x, offset.to("meta"), mask, weight, bias, 1, 1, 1)
    with pytest.raises(ValueError, match="mask is on meta but x is on cpu"):
        deform_conv2d_backward_reference(torch.randn(2, 3, 5, 6), x, offset, mask.to("meta"), weight, 1, 1, 1)
    with pytest.raises(ValueError, match="codebook is on meta but z is on cpu"):
        nearest_code_reference(torch.randn(5, 8), torch.randn(6, 8, device="meta"))


def test_backward_op_body_names_a_grad_out_on_another_device():
    """The op body (what runs for CUDA tensors; a meta tensor would route to the fake kernel, so it is called
    directly here) checks grad_out's device against x's before computing."""
    x, offset, mask, weight, _ = small_case()
    with pytest.raises(ValueError, match="grad_out is on meta but x is on cpu"):
        kernels.ops._deform_conv2d_backward(torch.randn(2, 3, 5, 6, device="meta"), x, offset, mask, weight,
                                            [1, 1], [1, 1], [1, 1])


def test_an_empty_codebook_is_a_value_error():
    """K = 0 codes has no nearest code: ValueError naming the shapes (argmin of an empty row raised IndexError)."""
    for mode in ("auto", "reference"):
        with kernels.use(mode), pytest.raises(ValueError, match="with K >= 1"):
            kernels.nearest_code(torch.randn(4, 8), torch.randn(0, 8))
    with pytest.raises(ValueError, match="with K >= 1"):
        nearest_code_reference(torch.randn(4, 8), torch.randn(0, 8))


# --- nearest code: precision and dtypes ---------------------------------------------------------------------------


def test_nearest_code_in_float64_is_exact_to_float64():
    """float64 tokens are searched in float64 (the documented exception to fp32 accumulation): the distances come
    back in float64 and agree with a brute-force float64 search to 1e-12 (fp32 sums are off by about 1e-6 here)."""
    gen = torch.Generator().manual_seed(3)
    z, codebook = torch.randn(40, 16, generator=gen, dtype=torch.float64), torch.randn(30, 16, generator=gen,
                                                                                      dtype=torch.float64)
    brute = ((z[:, None] - codebook[None]) ** 2).sum(-1)
    for mode in ("auto", "reference"):
        with kernels.use(mode):
            idx, dist = kernels.nearest_code(z, codebook, return_distance=True)
        assert idx.dtype == torch.int64 and dist.dtype == torch.float64
        assert torch.equal(idx, brute.argmin(1))
        torch.testing.assert_close(dist, brute.min(1).values, atol=1e-12, rtol=0)


def test_nearest_code_distance_dtype_follows_the_tokens_not_the_codebook():
    """The distances are fp64 when z is fp64, fp32 otherwise, whatever the codebook's dtype; the fake kernel
    declares the same (torch.export and compile allocate by it)."""
    gen = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(6, 4, generator=gen), torch.randn(5, 4, generator=gen)
    for zt, ct, want in ((torch.float64, torch.float32, torch.float64), (torch.float32, torch.float64, torch.float32),
                         (torch.float16, torch.float64, torch.float32)):
        args = (z.to(zt), codebook.to(ct))
        idx, dist = torch.ops.vqfr.nearest_code(*args)
        assert dist.dtype == want, (zt, ct)
        with FakeTensorMode() as mode:
            fidx, fdist = torch.ops.vqfr.nearest_code(*(mode.from_tensor(t) for t in args))
        assert (fidx.dtype, fdist.dtype, fdist.shape) == (idx.dtype, dist.dtype, dist.shape)
        brute = ((z.to(zt).double()[:, None] - codebook.to(ct).double()[None]) ** 2).sum(-1)
        assert torch.equal(idx, brute.argmin(1))


# --- the dispatch switch -----------------------------------------------------------------------------------------


def test_an_empty_kernel_mode_in_the_environment_means_auto(monkeypatch):
    """``VQFR_KERNELS=`` (set but empty, as a shell script or a CI matrix may leave it) is the default, not an
    error; ``kernels.use("")`` is a programming error and raises."""
    for value in ("", "  "):
        monkeypatch.setenv("VQFR_KERNELS", value)
        assert dispatch.active_mode() == "auto"
    with pytest.raises(ValueError, match="is not a kernel mode"):
        with kernels.use(""):
            pass


def test_dot_precision_follows_the_float32_matmul_setting():
    """tf32 only for float32 inputs and only when torch allows TF32 matmuls; None (the kernel default) for fp16 and
    bf16."""
    assert dispatch.dot_precision(torch.float16) is None
    assert dispatch.dot_precision(torch.bfloat16) is None
    saved = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert dispatch.dot_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert dispatch.dot_precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved


@pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed (extra 'gpu')")
def test_triton_module_is_loaded_once_per_mode(monkeypatch):
    """Each Triton module is imported once per interpreter mode (re-executing it re-decorates every kernel and loses
    the autotuner's cache)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    first = dispatch.triton_module("nearest_code_triton")
    assert dispatch.triton_module("nearest_code_triton") is first
    assert first.__name__ == "kernels.nearest_code_triton__interpreted"


# --- the grid_sample forward --------------------------------------------------------------------------------------


def test_grid_sample_forward_is_exact_at_integer_sample_positions():
    """The image is padded to sides 2**k + 1 so that grid_sample's normalisation is a power of two: an integer
    sample position then survives the round trip exactly, and the float32 forward equals the reference bit for bit
    (another padded side gives errors of 1e-7 px and outputs off by about 4e-6)."""
    gen = torch.Generator().manual_seed(0)
    for h, w in ((5, 7), (6, 13), (1, 6)):
        x = torch.randn(2, 4, h, w, generator=gen)
        offset = torch.randint(-3, 4, (2, 2 * 2 * 9, h, w), generator=gen).float()
        mask = torch.rand(2, 18, h, w, generator=gen)
        weight, bias = torch.randn(3, 4, 3, 3, generator=gen), torch.randn(3, generator=gen)
        ours = deform_conv2d_grid_sample(x, offset, mask, weight, bias, 1, 1, 1)
        assert torch.equal(ours, deform_conv2d_reference(x, offset, mask, weight, bias, 1, 1, 1)), (h, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_infinite_offsets_read_zero_when_the_image_fills_the_padded_grid(dtype):
    """H = W = 2**k + 1 needs no padding: grid_sample's last row and column are the image's. An infinite offset
    must still read 0 there (it is sent far outside, not to the border), like the reference."""
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(1, 2, 5, 9, generator=gen, dtype=dtype) + 1.0  # no zero pixel anywhere
    weight = torch.ones(1, 2, 1, 1, dtype=dtype)
    offset = torch.zeros(1, 2, 5, 9, dtype=dtype)
    mask = torch.ones(1, 1, 5, 9, dtype=dtype)
    inf = float("inf")
    places = [((2, 3), (inf, 0.0)), ((1, 1), (-inf, 0.0)), ((4, 0), (0.0, inf)), ((0, 8), (0.0, -inf)),
              ((3, 5), (inf, inf))]
    for (y, xx), (dy, dx) in places:
        offset[0, 0, y, xx], offset[0, 1, y, xx] = dy, dx
    out = deform_conv2d_grid_sample(x, offset, mask, weight)
    expected = x.sum(1, keepdim=True)
    for (y, xx), _ in places:
        expected[0, 0, y, xx] = 0.0
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(deform_conv2d_reference(x, offset, mask, weight), expected, atol=1e-6, rtol=0)
