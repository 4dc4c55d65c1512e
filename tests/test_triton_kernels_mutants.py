"""What mutation testing (round 14) of the Triton kernels (``kernels.deform_conv_triton``,
``kernels.nearest_code_triton``, ``kernels.group_norm_triton``) found unchecked, pinned here (bugs planted one at a
time; expected values from the float64 references of the kernels package or from hand arithmetic written out in each
test, never from the code under test; tiny shapes, on the CPU under Triton's interpreter, natively on a GPU):

- the deformable convolution with a rectangular geometry (kernel 2x3 and 3x1, stride, padding and dilation with
  different height and width values): a tap's row and column come from KW, each axis from its own stride and
  dilation, in the forward and in the weight-gradient kernel;
- samples exactly on the lines y = -1 or x = -1 (offsets on a half-pixel lattice) are outside, as torchvision's rule
  and the reference say: zero offset and mask gradients, not a derivative along the one corner row or column that
  is in the image;
- the forward accumulates in fp32 with fp16 storage (2048 plus eight ones is 2056, not 2048);
- the weight gradient with two offset groups of two channel blocks each takes each program's group from its
  (tap, group, channel block) index, not from the program id modulo the group count;
- the nearest-code distance keeps the official evaluation order ``(|z|^2 + |e|^2) - 2 z.e`` (fp32 rounding visible
  at z = 4096, e = 1); a token at distance inf from every code gets index 0, as ``torch.argmin``; tokens and a
  codebook with different strides (a transposed codebook view) are each read with their own;
- the GroupNorm statistics programs' pixel count on a GPU (SM count stubbed): about four waves of programs, rounded
  up to whole grains of 128 pixels.
"""

from __future__ import annotations

import pytest
import torch

import kernels
import kernels.ops  # noqa: F401  (registers torch.ops.vqfr.*)
from kernels import dispatch
from kernels.deform_conv import deform_conv2d_backward_reference, deform_conv2d_reference

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

pytestmark = [pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed (extra 'gpu'/'dev')"),
              pytest.mark.usefixtures("triton_path")]  # tests/conftest.py: the Triton kernels, never a fallback


def as_double(tensors):
    return [None if t is None else t.double() for t in tensors]


def assert_close_scaled(actual, expected, frac, what=""):
    """max |actual - expected| <= frac * max |expected|."""
    scale = expected.abs().max().item() or 1.0
    err = (actual.double().cpu() - expected.double().cpu()).abs().max().item()
    assert err <= frac * scale, f"{what}: max error {err:.3g} > {frac:g} * {scale:.3g}"


# --- modulated deformable convolution -----------------------------------------------------------------------------


def dcn_inputs(b, c, h, w, groups, kh, kw, stride, padding, dilation, *, c_out, seed, half_lattice=False):
    """Random DCN inputs for any kernel, stride, padding and dilation pairs (rectangular allowed), float32."""
    gen = torch.Generator().manual_seed(seed)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    x = torch.randn(b, c, h, w, generator=gen)
    offset = (torch.rand(b, 2 * groups * kh * kw, ho, wo, generator=gen) * 2 - 1) * 2.5
    if half_lattice:
        offset = (offset * 2).round() / 2  # multiples of 0.5: samples on pixels, cell edges and the lines -1, H, W
    mask = torch.rand(b, groups * kh * kw, ho, wo, generator=gen)
    weight = torch.randn(c_out, c, kh, kw, generator=gen) / (c * kh * kw) ** 0.5
    bias = torch.randn(c_out, generator=gen)
    return [t.to(DEVICE) for t in (x, offset, mask, weight, bias)]


def check_forward_and_backward(x, offset, mask, weight, bias, stride, padding, dilation, seed):
    out = kernels.modulated_deform_conv2d(x, offset, mask, weight, bias, stride, padding, dilation)
    ref = deform_conv2d_reference(*as_double([x, offset, mask, weight, bias]), stride, padding, dilation)
    assert_close_scaled(out, ref, 2e-6, "out")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    grads = torch.ops.vqfr.modulated_deform_conv2d_backward(grad_out, x, offset, mask, weight, list(stride),
                                                             list(padding), list(dilation))
    expected = deform_conv2d_backward_reference(*as_double([grad_out, x, offset, mask, weight]), stride, padding,
                                                dilation)
    for name, got, want in zip(("x", "offset", "mask", "weight"), grads, expected, strict=True):
        assert_close_scaled(got, want, 1e-5, f"grad_{name}")
    return grads, expected


def test_deform_rectangular_kernel_stride_padding_and_dilation():
    """Every geometry pair with different height and width values (kernel 2x3, stride (1, 2), padding (2, 0),
    dilation (1, 2)): a tap's row is k // KW and its column k % KW, and each axis takes its own stride and dilation,
    in the forward and in both backward kernels."""
    args = dcn_inputs(1, 6, 7, 11, 2, 2, 3, (1, 2), (2, 0), (1, 2), c_out=5, seed=21)
    check_forward_and_backward(*args, (1, 2), (2, 0), (1, 2), seed=22)
    args = dcn_inputs(1, 4, 9, 6, 1, 3, 1, (2, 1), (0, 1), (2, 1), c_out=3, seed=23)  # the transposed case: 3x1
    check_forward_and_backward(*args, (2, 1), (0, 1), (2, 1), seed=24)


def test_deform_backward_on_cell_edges_and_the_image_border():
    """Offsets on a half-pixel lattice with padding 1: many samples lie exactly on the lines y = -1 or x = -1 (and
    H, W), where torchvision's rule reads 0, so their offset and mask gradients are 0 too (a point on y = -1 is
    outside, not a point whose lower corner row 0 is read with weight 0 and a non-zero derivative)."""
    args = dcn_inputs(1, 4, 5, 6, 2, 3, 3, (1, 1), (1, 1), (1, 1), c_out=3, seed=25, half_lattice=True)
    x, offset = args[0], args[1]
    h, w = x.shape[2:]
    ho, wo = offset.shape[2:]
    taps = torch.arange(18) % 9  # two offset groups of nine taps
    py = (torch.arange(ho).view(1, 1, -1, 1) - 1 + (taps // 3).view(1, -1, 1, 1)).to(DEVICE) + offset[:, 0::2]
    px = (torch.arange(wo).view(1, 1, 1, -1) - 1 + (taps % 3).view(1, -1, 1, 1)).to(DEVICE) + offset[:, 1::2]
    assert ((py == -1) | (py == h) | (px == -1) | (px == w)).sum() >= 10  # the case does hit the border lines
    check_forward_and_backward(*args, (1, 1), (1, 1), (1, 1), seed=26)


def test_deform_half_precision_accumulates_in_fp32():
    """fp16 storage, fp32 accumulation: one output pixel sums 2048 * 1 (tap 0) and eight taps of 1 * 1. In fp32 the
    sum is 2056, exact in fp16; accumulating in fp16 would stay at 2048 (2049 rounds to even at a spacing of 2)."""
    x = torch.ones(1, 1, 3, 3, dtype=torch.float16, device=DEVICE)
    weight = torch.ones(1, 1, 3, 3, dtype=torch.float16, device=DEVICE)
    weight[0, 0, 0, 0] = 2048.0
    offset = torch.zeros(1, 18, 3, 3, dtype=torch.float16, device=DEVICE)
    mask = torch.ones(1, 9, 3, 3, dtype=torch.float16, device=DEVICE)
    out = kernels.modulated_deform_conv2d(x, offset, mask, weight, None, 1, 1, 1)
    assert out.dtype == torch.float16
    assert out[0, 0, 1, 1].item() == 2056.0  # the centre pixel: all nine taps inside the image


def test_deform_weight_gradient_with_several_groups_of_several_channel_blocks():
    """Two offset groups of 17 channels each (two channel blocks per group under the interpreter's 16-channel tile):
    the weight-gradient program of (tap, group, channel block) takes its group from the middle digit, not from the
    program id modulo the group count (the same thing when a group fits one channel block)."""
    args = dcn_inputs(1, 34, 4, 5, 2, 3, 3, (1, 1), (1, 1), (1, 1), c_out=3, seed=27)
    check_forward_and_backward(*args, (1, 1), (1, 1), (1, 1), seed=28)


# --- nearest code -------------------------------------------------------------------------------------------------


def test_nearest_code_distance_keeps_the_official_evaluation_order():
    """``(|z|^2 + |e|^2) - 2 z.e`` rounded in that order: z = 4096, e = 1 gives fl(2**24 + 1) - 8192 = 16769024 in
    fp32, where the exact (4096 - 1)^2 = 16769025 is what ``|z|^2 + (|e|^2 - 2 z.e)`` would give."""
    z = torch.tensor([[4096.0, 0.0, 0.0]], device=DEVICE)
    codebook = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], device=DEVICE)
    idx, dist = kernels.nearest_code(z, codebook, return_distance=True)
    assert idx.tolist() == [0]
    assert dist.tolist() == [16769024.0]
    assert dispatch.LAUNCHES["nearest_code:triton"] == 1


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy
def test_nearest_code_all_infinite_distances_pick_index_zero():
    """A token whose |z|^2 overflows is at distance inf from every code: torch.argmin then returns 0 (the first of
    equal values), and so must the kernel, whose running best starts at inf with index 0."""
    z = torch.full((3, 4), 1e30, device=DEVICE)
    z[1] = torch.tensor([0.1, 0.2, 0.3, 0.4])  # a finite token between two infinite ones
    codebook = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0]], device=DEVICE)
    idx, dist = kernels.nearest_code(z, codebook, return_distance=True)
    assert idx.tolist() == [0, 1, 0]
    assert dist[0].item() == float("inf") and dist[2].item() == float("inf") and abs(dist[1].item()) < 1e-6


def test_nearest_code_tokens_and_codebook_with_different_strides():
    """Tokens contiguous, codebook a transposed view (its column stride is K, the tokens' is 1): each operand is
    read with its own strides. 33 tokens and 37 codes: partial tiles of both."""
    gen = torch.Generator().manual_seed(31)
    codes_t = torch.randn(12, 37, generator=gen)  # [D, K] storage: codebook = codes_t.t() is [K, D], strides (1, K)
    truth = torch.randint(0, 37, (33,), generator=gen)
    z = codes_t.t()[truth] + 0.01 * torch.randn(33, 12, generator=gen)
    codebook = codes_t.to(DEVICE).t()
    assert codebook.stride() == (1, 37)
    idx, dist = kernels.nearest_code(z.to(DEVICE), codebook, return_distance=True)
    assert torch.equal(idx.cpu(), truth)
    want = (z.double() - codes_t.t().double()[truth]).square().sum(1)
    torch.testing.assert_close(dist.cpu().double(), want, atol=1e-4, rtol=0)


# --- GroupNorm + SiLU ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,hw,expected", [
    (1, 512 * 512, 512),  # 528 programs wanted: cdiv(262144, 528) = 497 pixels, rounded up to 4 grains of 128
    (64, 4096, 512),  # cdiv(528, 64) = 9 programs per image: cdiv(4096, 9) = 456 -> 512
    (4, 128 * 128, 128),  # 132 programs per image, capped at 16384 / 128 = 128 of one grain each
    (1, 1000, 128),  # a small image: cdiv(1000, 128) = 8 programs of 125 pixels -> one grain each
])
def test_group_norm_pixels_per_program_on_a_gpu_are_whole_grains(n, hw, expected, monkeypatch):
    """On a GPU (an H100's 132 SMs stubbed; no GPU needed) the statistics programs get about 4 waves' worth of
    pixels each, rounded up to a multiple of PIXEL_GRAIN = 128 (the widest pixel tile), so that only an image's last
    tile is partial. Hand arithmetic, no kernel run."""
    module = dispatch.triton_module("group_norm_triton")
    monkeypatch.setattr(module, "_sm_count", lambda index: 132)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU branch; nothing is launched
    assert module.PIXEL_GRAIN == 128
    assert module.pixels_per_program(n, hw, torch.device("cuda", 0)) == expected
