"""The pure-torch references in kernels/ against independent formulations (CPU, float64 where it matters)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import deform_conv2d_reference, modulated_deform_conv2d, nearest_code, nearest_code_reference
from kernels.deform_conv import deform_conv2d_backward_reference


def deform_conv_by_grid_sample(x, offset, mask, weight, bias, stride, padding, dilation):
    """An independent DCN: one grid_sample (bilinear, zeros, align_corners=True) per group and tap."""
    b, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    taps = kh * kw
    g = offset.shape[1] // (2 * taps)
    ho, wo = offset.shape[2:]
    cg = c // g
    oy = torch.arange(ho, dtype=x.dtype).view(ho, 1) * stride - padding
    ox = torch.arange(wo, dtype=x.dtype).view(1, wo) * stride - padding
    cols = torch.zeros(b, c, taps, ho, wo, dtype=x.dtype)
    for gi, k in itertools.product(range(g), range(taps)):
        ky, kx = divmod(k, kw)
        py = oy + ky * dilation + offset[:, gi * 2 * taps + 2 * k]
        px = ox + kx * dilation + offset[:, gi * 2 * taps + 2 * k + 1]
        grid = torch.stack([2 * px / (w - 1) - 1, 2 * py / (h - 1) - 1], dim=-1)
        s = F.grid_sample(x[:, gi * cg:(gi + 1) * cg], grid, mode="bilinear", padding_mode="zeros",
                          align_corners=True)
        cols[:, gi * cg:(gi + 1) * cg, k] = s * mask[:, gi * taps + k].unsqueeze(1)
    out = torch.einsum("ock,bckij->boij", weight.reshape(c_out, c, taps), cols)
    return out + (0 if bias is None else bias.view(1, -1, 1, 1))


def random_case(c=12, h=9, w=13, groups=4, k=3, stride=1, padding=1, dilation=1, c_out=5, spread=2.0,
                dtype=torch.float64, seed=0, b=2):
    gen = torch.Generator().manual_seed(seed)
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    x = torch.randn(b, c, h, w, generator=gen, dtype=dtype)
    offset = torch.randn(b, 2 * groups * k * k, ho, wo, generator=gen, dtype=dtype) * spread
    mask = torch.rand(b, groups * k * k, ho, wo, generator=gen, dtype=dtype)
    weight = torch.randn(c_out, c, k, k, generator=gen, dtype=dtype)
    bias = torch.randn(c_out, generator=gen, dtype=dtype)
    return x, offset, mask, weight, bias


@pytest.mark.parametrize("c,h,w,groups,k,stride,padding,dilation", [
    (12, 9, 13, 4, 3, 1, 1, 1), (20, 17, 9, 2, 3, 2, 2, 1), (12, 13, 13, 3, 3, 1, 2, 2), (20, 9, 17, 1, 1, 1, 0, 1),
    (12, 17, 17, 4, 3, 2, 0, 2),
])
@pytest.mark.parametrize("spread", [0.7, 9.0])  # 9 px pushes many samples outside the image
def test_reference_matches_grid_sample_formulation(c, h, w, groups, k, stride, padding, dilation, spread):
    args = random_case(c, h, w, groups, k, stride, padding, dilation, spread=spread)
    ref = deform_conv_by_grid_sample(*args, stride, padding, dilation)
    ours = deform_conv2d_reference(*args, stride, padding, dilation)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)


def test_zero_offsets_unit_mask_is_a_plain_convolution():
    x, offset, mask, weight, bias = random_case(c=20, h=9, w=13, groups=4, padding=1)
    out = deform_conv2d_reference(x, torch.zeros_like(offset), torch.ones_like(mask), weight, bias, 1, 1, 1)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, padding=1), atol=1e-10, rtol=1e-10)


def test_far_offsets_read_zero():
    x, offset, mask, weight, bias = random_case(c=12, h=9, w=9, groups=2)
    out = deform_conv2d_reference(x, torch.full_like(offset, 50.0), mask, weight, bias, 1, 1, 1)
    torch.testing.assert_close(out, bias.view(1, -1, 1, 1).expand_as(out))


def test_reference_gradcheck_float64():
    args = random_case(c=4, h=5, w=6, groups=2, c_out=3, b=1, spread=1.3, seed=3)
    inputs = tuple(a.clone().requires_grad_(True) for a in args)
    assert torch.autograd.gradcheck(lambda *t: deform_conv2d_reference(*t, 1, 1, 1), inputs, eps=1e-6, atol=1e-6,
                                    fast_mode=True)


def test_custom_op_gradients_equal_reference_gradients():
    args = random_case(c=8, h=7, w=9, groups=2, c_out=4, spread=1.5, seed=4)
    a = [t.clone().requires_grad_(True) for t in args]
    b = [t.clone().requires_grad_(True) for t in args]
    deform_conv2d_reference(*a, 1, 1, 1).square().sum().backward()
    modulated_deform_conv2d(*b, 1, 1, 1).square().sum().backward()
    for ta, tb in zip(a, b, strict=True):
        torch.testing.assert_close(tb.grad, ta.grad, atol=1e-10, rtol=1e-10)


def test_bad_shapes_raise_value_error():
    x, offset, mask, weight, bias = random_case()
    with pytest.raises(ValueError, match="offset"):
        deform_conv2d_reference(x, offset[:, :-1], mask, weight, bias, 1, 1, 1)
    with pytest.raises(ValueError, match="mask"):
        deform_conv2d_reference(x, offset, mask[:, :-1], weight, bias, 1, 1, 1)


@pytest.mark.parametrize("stride,padding,dilation", [(0, 1, 1), ((1, 0), 1, 1), (1, -1, 1), (1, 1, 0)])
def test_bad_geometry_raises_value_error(stride, padding, dilation):
    """torchvision's rule: stride and dilation >= 1, padding >= 0 (stride 0 was a ZeroDivisionError)."""
    x, offset, mask, weight, bias = random_case()
    with pytest.raises(ValueError, match="stride and dilation must be >= 1"):
        modulated_deform_conv2d(x, offset, mask, weight, bias, stride, padding, dilation)


def test_masks_of_any_layout_on_the_torch_paths():
    """A mask sliced out of a larger tensor (no flat H_out*W_out view) and a channels-last mask: the reference and
    grid_sample forwards and the reference backward used to raise in ``mask.view``."""
    x, offset, mask, weight, bias = (t.float() for t in random_case(c=8, h=7, w=9, groups=2, c_out=4, seed=6))
    sliced = torch.zeros(2, 20, 10, 12)[:, 1:19, 2:9, 1:10]
    sliced.copy_(mask)
    expected = modulated_deform_conv2d(x, offset, mask, weight, bias, 1, 1, 1)
    for mode in ("auto", "reference"):  # auto: the grid_sample forward for float32
        with kernels.use(mode):
            for layout in (sliced, mask.contiguous(memory_format=torch.channels_last)):
                torch.testing.assert_close(modulated_deform_conv2d(x, offset, layout, weight, bias, 1, 1, 1),
                                           expected, atol=1e-5, rtol=0)
    grad_out = torch.randn_like(expected)
    grads = deform_conv2d_backward_reference(grad_out, x, offset, mask, weight, 1, 1, 1)
    for layout in (sliced, mask.contiguous(memory_format=torch.channels_last)):
        for got, want in zip(deform_conv2d_backward_reference(grad_out, x, offset, layout, weight, 1, 1, 1), grads,
                             strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_nearest_code_matches_brute_force_and_breaks_ties_low():
    gen = torch.Generator().manual_seed(0)
    z, e = torch.randn(300, 24, generator=gen), torch.randn(77, 24, generator=gen)
    brute = ((z[:, None, :].double() - e[None].double()) ** 2).sum(-1)
    idx, dist = nearest_code_reference(z, e, return_distance=True)
    assert torch.equal(idx, brute.argmin(1))
    torch.testing.assert_close(dist.double(), brute.min(1).values, atol=1e-4, rtol=1e-5)
    assert torch.equal(nearest_code(z, e), idx)
    dup = torch.cat([e[:5], e[:5]])  # rows 5..9 duplicate rows 0..4: ties resolve to the lower index
    assert int(nearest_code_reference(e[3:4], dup)) == 3


def test_nearest_code_half_precision_accumulates_in_fp32():
    gen = torch.Generator().manual_seed(1)
    z, e = torch.randn(64, 256, generator=gen), torch.randn(128, 256, generator=gen)
    idx32 = nearest_code_reference(z, e)
    idx16, dist16 = nearest_code_reference(z.half(), e.half(), return_distance=True)
    assert dist16.dtype == torch.float32
    assert (idx16 == idx32).float().mean() > 0.95
    # Exact maths on the same fp16 inputs: distances near 400, where fp32 sums are off by ~1e-4 and fp16 ones by
    # ~0.5 (more than the smallest best-to-second gap here, 0.23, so fp16 sums also pick a wrong code).
    exact = ((z.half().double()[:, None, :] - e.half().double()[None]) ** 2).sum(-1)
    assert torch.equal(idx16, exact.argmin(1))
    torch.testing.assert_close(dist16.double(), exact.min(1).values, atol=1e-3, rtol=0)


@pytest.mark.parametrize("bad", [(1.5, 1), 1.0, "11", (1, None)], ids=["float in a pair", "float", "str", "None"])
def test_geometry_that_is_not_integers_is_refused(bad):
    """stride (1.5, 1) used to run silently as stride 1 (int() truncated it) and "11" as (1, 1)."""
    x, offset, mask, weight, bias = random_case()
    for path in ("auto", "reference"):
        with kernels.use(path), pytest.raises(TypeError, match=r"stride must be an int or a pair of ints"):
            modulated_deform_conv2d(x, offset, mask, weight, bias, bad, 1, 1)


def test_numpy_integers_are_taken_like_ints():
    """As torchvision takes them (stride read from a numpy config, say); they used to raise "has no len()"."""
    np = pytest.importorskip("numpy")
    x, offset, mask, weight, bias = random_case(stride=2, padding=1)
    expected = modulated_deform_conv2d(x, offset, mask, weight, bias, 2, 1, 1)
    out = modulated_deform_conv2d(x, offset, mask, weight, bias, np.int64(2), (np.int32(1), 1), 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
