"""The Triton kernels against the pure-torch references.

On a machine with a CUDA GPU the kernels run natively; elsewhere they run under Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set by a fixture for these tests only, so the rest of the suite keeps the fast reference).
Every test forces ``VQFR_KERNELS=triton``: if the Triton path could not run, the call raises instead of silently
testing the reference, and :data:`kernels.dispatch.LAUNCHES` is checked as well.

The interpreter runs one small tile config and is slow (its cost is per operation), so the deformable-convolution
shapes are a covering set of the issue's grid rather than its full product: every value of every parameter appears,
most pairs of (groups, kernel, stride, padding, dilation) appear, and each case still spans several pixel tiles.
"""

from __future__ import annotations

import pytest
import torch

import kernels
import kernels.ops  # noqa: F401  (registers torch.ops.vqfr.*)
from kernels import dispatch
from kernels.deform_conv import deform_conv2d_backward_reference, deform_conv2d_reference
from kernels.nearest_code import nearest_code_reference
from tests.conftest import deform_inputs

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

pytestmark = [pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed (extra 'gpu'/'dev')"),
              pytest.mark.usefixtures("triton_path")]  # tests/conftest.py: the Triton kernels, never a fallback

#: Allowed error of the kernel against the float64 reference, as a fraction of the reference's largest magnitude.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 4e-3}


def deform_case(c, h, w, groups, k, stride, padding, dilation, *, spread, c_out=6, b=2, seed=0,
                dtype=torch.float32):
    """Random DCN inputs on the test device. ``spread`` is the largest offset in pixels (uniform in [-spread,
    spread])."""
    tensors = deform_inputs(c, h, w, groups, k, stride, padding, dilation, spread=spread, c_out=c_out, b=b, seed=seed)
    return [t.to(DEVICE, dtype) for t in tensors]


def as_double(tensors):
    return [None if t is None else t.double() for t in tensors]


def assert_close_scaled(actual, expected, frac, what=""):
    """max |actual - expected| <= frac * max |expected| (errors scale with the magnitude of the result)."""
    scale = expected.abs().max().item() or 1.0
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= frac * scale, f"{what}: max error {err:.3g} > {frac:g} * {scale:.3g}"


# (channels, H, W, offset groups, kernel, stride, padding, dilation, offset spread in px, output channels)
COVERING = [
    (12, 9, 13, 4, 3, 1, 1, 1, 1.5, 6),
    (20, 17, 9, 2, 3, 2, 2, 1, 17.0, 6),  # offsets up to +-H: many samples fall outside
    (12, 13, 17, 3, 3, 1, 0, 2, 13.0, 6),
    (20, 9, 9, 1, 1, 2, 1, 1, 9.0, 40),  # 1x1; 20 channels in one group (two channel blocks); 40 outputs (two tiles)
    (12, 17, 13, 2, 1, 1, 0, 2, 2.5, 6),
    (20, 13, 13, 4, 3, 2, 2, 2, 0.7, 6),
    (12, 9, 17, 1, 3, 1, 2, 1, 9.0, 6),
]


@pytest.mark.parametrize("c,h,w,groups,k,stride,padding,dilation,spread,c_out", COVERING)
def test_deform_forward_matches_reference(c, h, w, groups, k, stride, padding, dilation, spread, c_out):
    args = deform_case(c, h, w, groups, k, stride, padding, dilation, spread=spread, c_out=c_out)
    out = kernels.modulated_deform_conv2d(*args, stride, padding, dilation)
    ref = deform_conv2d_reference(*as_double(args), stride, padding, dilation)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert_close_scaled(out, ref, TOLERANCE[torch.float32])
    assert dispatch.LAUNCHES["modulated_deform_conv2d:triton"] == 1


def test_deform_forward_on_cell_edges_and_image_border():
    """Offsets on a half-pixel lattice: samples land exactly on pixels, on cell edges and on y/x = -1 or H/W."""
    x, offset, mask, weight, bias = deform_case(12, 9, 11, 2, 3, 1, 1, 1, spread=1.0, seed=3)
    offset = (offset * 8).round() / 2  # multiples of 0.5 in [-4, 4]
    out = kernels.modulated_deform_conv2d(x, offset, mask, weight, bias, 1, 1, 1)
    ref = deform_conv2d_reference(*as_double([x, offset, mask, weight, bias]), 1, 1, 1)
    assert_close_scaled(out, ref, TOLERANCE[torch.float32])


def test_deform_infinite_and_nan_offsets_read_zero_like_the_reference():
    """Infinite and NaN offsets: the sample is outside, reads 0 and has zero offset and mask gradients, as torchvision
    (for inf) and the reference do. The kernels always did this; the reference returned NaN, so the two disagreed."""
    x, offset, mask, weight, bias = deform_case(8, 6, 7, 2, 3, 1, 1, 1, spread=2.0, c_out=5, seed=15, b=1)
    places = torch.zeros_like(mask, dtype=torch.bool)
    for tap, y, xx, dy, dx in [(0, 2, 3, float("inf"), 0.3), (4, 0, 0, -0.2, float("-inf")),
                               (13, 5, 6, float("nan"), 1.0), (17, 3, 1, 0.5, float("nan"))]:
        places[0, tap, y, xx] = True
        offset[0, 2 * tap, y, xx], offset[0, 2 * tap + 1, y, xx] = dy, dx
    finite = offset.nan_to_num(0.0, 0.0, 0.0)
    masked = as_double([x, finite, mask.masked_fill(places, 0.0), weight])  # the same samples, masked out instead
    out = kernels.modulated_deform_conv2d(x, offset, mask, weight, bias, 1, 1, 1)
    assert_close_scaled(out, deform_conv2d_reference(*masked, bias.double(), 1, 1, 1), TOLERANCE[torch.float32])
    assert_close_scaled(out, deform_conv2d_reference(*as_double([x, offset, mask, weight, bias]), 1, 1, 1),
                        TOLERANCE[torch.float32])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(16)).to(DEVICE)
    grads = torch.ops.vqfr.modulated_deform_conv2d_backward(grad_out, x, offset, mask, weight, [1, 1], [1, 1], [1, 1])
    expected = deform_conv2d_backward_reference(grad_out.double(), *masked, 1, 1, 1)
    off_places = places.repeat_interleave(2, dim=1)
    assert not grads[1][off_places].any() and not grads[2][places].any()
    expected[1][off_places], expected[2][places] = 0.0, 0.0
    for name, got, want in zip(("x", "offset", "mask", "weight"), grads, expected, strict=True):
        assert_close_scaled(got, want, 1e-5, f"grad_{name}")
    reference = deform_conv2d_backward_reference(*as_double([grad_out, x, offset, mask, weight]), 1, 1, 1)
    for name, got, want in zip(("x", "offset", "mask", "weight"), grads, reference, strict=True):
        assert_close_scaled(got, want, 1e-5, f"grad_{name} against the reference")


def nan_moat(t, pad=2):
    """``t`` as a strided view into a NaN-filled buffer with ``pad`` extra entries on both sides of every dimension.

    A kernel that reads anything outside ``t`` (a pixel tail, a padded channel, a corner outside the image) picks up
    NaN and poisons its result, even where the value read would have been multiplied by zero.
    """
    big = torch.full([s + 2 * pad for s in t.shape], float("nan"), dtype=t.dtype, device=t.device)
    view = big[tuple(slice(pad, pad + s) for s in t.shape)]
    view.copy_(t)
    return view


def test_deform_reads_nothing_outside_its_inputs():
    """Forward and backward on NaN-moated, non-contiguous inputs, without bias: exact results, no NaN."""
    x, offset, mask, weight, _ = deform_case(20, 9, 13, 2, 3, 1, 1, 1, spread=9.0, seed=5, c_out=5)
    grad_out = torch.randn(2, 5, 9, 13, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    moated = [nan_moat(t) for t in (x, offset, mask, weight)]
    out = kernels.modulated_deform_conv2d(*moated, None, 1, 1, 1)
    ref = deform_conv2d_reference(*as_double([x, offset, mask, weight]), None, 1, 1, 1)
    assert_close_scaled(out, ref, TOLERANCE[torch.float32])
    grads = torch.ops.vqfr.modulated_deform_conv2d_backward(nan_moat(grad_out), *moated, [1, 1], [1, 1], [1, 1])
    expected = deform_conv2d_backward_reference(*as_double([grad_out, x, offset, mask, weight]), 1, 1, 1)
    for name, got, want in zip(("x", "offset", "mask", "weight"), grads, expected, strict=True):
        assert_close_scaled(got, want, 1e-5, f"grad_{name}")


def test_deform_strided_bias():
    """A bias with a stride (every other element of a NaN-interleaved buffer) was read as if contiguous."""
    x, offset, mask, weight, bias = deform_case(12, 9, 11, 2, 3, 1, 1, 1, spread=2.0, seed=9, c_out=5, b=1)
    strided = torch.stack([bias, torch.full_like(bias, float("nan"))], dim=1)[:, 0]
    out = kernels.modulated_deform_conv2d(x, offset, mask, weight, strided, 1, 1, 1)
    ref = deform_conv2d_reference(*as_double([x, offset, mask, weight, bias]), 1, 1, 1)
    assert_close_scaled(out, ref, TOLERANCE[torch.float32])


def test_deform_channels_last_in_channels_last_out():
    """A channels-last x is read as is (no copy) and the output and grad_x come back channels-last."""
    x, offset, mask, weight, bias = deform_case(12, 9, 11, 1, 3, 1, 1, 1, spread=3.0, seed=8, c_out=5, b=1)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out = kernels.modulated_deform_conv2d(x_cl, offset, mask, weight, bias, 1, 1, 1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_scaled(out, deform_conv2d_reference(*as_double([x, offset, mask, weight, bias]), 1, 1, 1), 2e-6)
    out.sum().backward()
    assert x_cl.grad.is_contiguous(memory_format=torch.channels_last)
    ref_x = x.double().requires_grad_(True)
    deform_conv2d_reference(ref_x, *as_double([offset, mask, weight, bias]), 1, 1, 1).sum().backward()
    assert_close_scaled(x_cl.grad, ref_x.grad, 1e-5)


@pytest.mark.skipif(not ON_GPU, reason="torch.compile runs the Triton kernels compiled only (no CUDA GPU here)")
def test_deform_compiled_backward_gives_the_gradients_on_its_first_call():
    """Under torch.compile (Inductor) the backward kernels, which add into zero-filled buffers with atomics, run with
    one config: torch's tracer drops the autotuner's reset_to_zero, so benchmarking several configs on the real
    buffers would return a multiple of the gradient on the first call of each shape (kernels.deform_conv_triton.
    untuned). A shape no other test uses, so that nothing is cached."""
    x, offset, mask, weight, bias = deform_case(20, 17, 13, 4, 3, 1, 1, 1, spread=3.0, seed=21, c_out=7, b=2)

    def loss(x, offset, mask, weight, bias):
        return kernels.modulated_deform_conv2d(x, offset, mask, weight, bias, 1, 1, 1).square().sum()

    leaves = [t.clone().requires_grad_(True) for t in (x, offset, mask, weight, bias)]
    torch.compile(loss, fullgraph=True)(*leaves).backward()
    refs = [t.detach().double().cpu().requires_grad_(True) for t in (x, offset, mask, weight, bias)]
    deform_conv2d_reference(*refs, 1, 1, 1).square().sum().backward()
    for name, got, ref in zip(("x", "offset", "mask", "weight", "bias"), leaves, refs, strict=True):
        assert_close_scaled(got.grad.cpu(), ref.grad, 1e-5, f"grad_{name}")


# Batch 1 for the 4-group case: the interpreter's cost grows with groups x taps x pixel tiles.
BACKWARD_CASES = [(*COVERING[0], 1), (*COVERING[1], 2), (*COVERING[3], 2)]


@pytest.mark.parametrize("c,h,w,groups,k,stride,padding,dilation,spread,c_out,b", BACKWARD_CASES)
def test_deform_backward_matches_reference(c, h, w, groups, k, stride, padding, dilation, spread, c_out, b):
    x, offset, mask, weight, _ = deform_case(c, h, w, groups, k, stride, padding, dilation, spread=spread,
                                             c_out=c_out, seed=1, b=b)
    ho, wo = offset.shape[2:]
    grad_out = torch.randn(x.shape[0], c_out, ho, wo, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    conv = ([stride] * 2, [padding] * 2, [dilation] * 2)
    grads = torch.ops.vqfr.modulated_deform_conv2d_backward(grad_out, x, offset, mask, weight, *conv)
    expected = deform_conv2d_backward_reference(*as_double([grad_out, x, offset, mask, weight]), stride, padding,
                                                dilation)
    for name, got, want in zip(("x", "offset", "mask", "weight"), grads, expected, strict=True):
        assert got.shape == want.shape and got.dtype == torch.float32
        assert_close_scaled(got, want, 1e-5, f"grad_{name}")
    assert dispatch.LAUNCHES["modulated_deform_conv2d_backward:triton"] == 1


def test_deform_autograd_uses_triton_backward_for_every_input():
    """Gradients through the public function (x, offset, mask, weight, bias) equal autograd of the reference."""
    args = deform_case(12, 9, 13, 1, 3, 1, 1, 1, spread=2.0, seed=7, c_out=5)
    ours = [t.clone().requires_grad_(True) for t in args]
    ref = [t.double().requires_grad_(True) for t in args]
    kernels.modulated_deform_conv2d(*ours, 1, 1, 1).square().sum().backward()
    deform_conv2d_reference(*ref, 1, 1, 1).square().sum().backward()
    for name, a, b in zip(("x", "offset", "mask", "weight", "bias"), ours, ref, strict=True):
        assert_close_scaled(a.grad, b.grad, 1e-5, f"grad_{name}")
    assert dispatch.LAUNCHES["modulated_deform_conv2d_backward:triton"] == 1


class LaunchLog:
    """Wraps ``dispatch.launchable``: records (kernel name, constexprs) of every launch, then launches."""

    def __init__(self, monkeypatch):
        self.launches: list[tuple[str, dict]] = []
        real = dispatch.launchable

        def launchable(kernel):
            def at(grid):
                def launch(*args, **constexprs):
                    self.launches.append((kernel.fn.__name__, constexprs))
                    return real(kernel)[grid](*args, **constexprs)
                return launch
            return type("Launcher", (), {"__getitem__": lambda _, grid: at(grid)})()

        monkeypatch.setattr(dispatch, "launchable", launchable)

    def names(self) -> list[str]:
        return [name for name, _ in self.launches]


@pytest.mark.parametrize("output_mask", [
    (False, False, False, True),  # only the weight: the input kernel does not run
    (True, False, False, False),  # only x: the weight kernel does not run, the input kernel reads no x
    (False, True, True, False),  # offset and mask: no grad_x atomics
    (True, True, True, True),
])
def test_deform_backward_skips_the_gradients_not_asked_for(output_mask, monkeypatch):
    """The Triton backward launches only the kernels (and, in the input kernel, only the parts) that produce a
    gradient asked for; the others come back empty. The ones asked for match the reference as before."""
    log = LaunchLog(monkeypatch)
    x, offset, mask, weight, _ = deform_case(12, 9, 13, 2, 3, 1, 1, 1, spread=3.0, c_out=5, seed=12, b=1)
    grad_out = torch.randn(1, 5, 9, 13, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    grads = torch.ops.vqfr.modulated_deform_conv2d_backward(grad_out, x, offset, mask, weight, [1, 1], [1, 1],
                                                            [1, 1], list(output_mask))
    expected = deform_conv2d_backward_reference(*as_double([grad_out, x, offset, mask, weight]), 1, 1, 1)
    for name, need, got, want in zip(("x", "offset", "mask", "weight"), output_mask, grads, expected, strict=True):
        if need:
            assert_close_scaled(got, want, 1e-5, f"grad_{name}")
        else:
            assert got.numel() == 0, name
    need_x, need_offset, need_mask, need_weight = output_mask
    assert log.names() == ["_bwd_input_kernel"] * (need_x or need_offset or need_mask) + \
        ["_bwd_weight_kernel"] * need_weight
    for name, constexprs in log.launches:
        if name == "_bwd_input_kernel":
            assert (constexprs["NEED_X"], constexprs["NEED_OFFSET"], constexprs["NEED_MASK"]) == output_mask[:3]


@pytest.mark.parametrize("requires", [(False, False, False, True, True), (True, False, False, False, False),
                                      (True, True, True, False, False)], ids=["weight", "x", "frozen weight"])
def test_deform_autograd_on_triton_with_some_inputs_frozen(requires, monkeypatch):
    """Through the public function: only the gradients of inputs that require one are computed, and they equal
    autograd of the reference."""
    log = LaunchLog(monkeypatch)
    args = deform_case(12, 9, 13, 1, 3, 1, 1, 1, spread=2.0, seed=7, c_out=5, b=1)
    ours = [t.clone().requires_grad_(r) for t, r in zip(args, requires, strict=True)]
    ref = [t.double().requires_grad_(r) for t, r in zip(args, requires, strict=True)]
    kernels.modulated_deform_conv2d(*ours, 1, 1, 1).square().sum().backward()
    deform_conv2d_reference(*ref, 1, 1, 1).square().sum().backward()
    for name, a, b in zip(("x", "offset", "mask", "weight", "bias"), ours, ref, strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if b.grad is not None:
            assert_close_scaled(a.grad, b.grad, 1e-5, f"grad_{name}")
    assert log.names() == ["_fwd_kernel"] + ["_bwd_input_kernel"] * any(requires[:3]) + \
        ["_bwd_weight_kernel"] * requires[3]


@pytest.mark.parametrize("h,w", [(0, 5), (5, 0)])
def test_deform_empty_image_with_padding_matches_the_reference(h, w):
    """H or W = 0 with padding 2: the output is the bias (only zero padding is read) and the gradients are zero, as
    the reference gives (which used to raise)."""
    x, offset, mask, weight, bias = deform_case(4, h, w, 1, 3, 1, 2, 1, spread=1.0, c_out=3, seed=14, b=1)
    leaves = [t.clone().requires_grad_(True) for t in (x, offset, mask, weight, bias)]
    out = kernels.modulated_deform_conv2d(*leaves, 1, 2, 1)
    ref = deform_conv2d_reference(*as_double([x, offset, mask, weight, bias]), 1, 2, 1)
    assert out.shape == ref.shape == (1, 3, h + 2, w + 2)
    assert torch.equal(out.double(), ref)
    out.sum().backward()
    expected = deform_conv2d_backward_reference(*as_double([torch.ones_like(out), x, offset, mask, weight]), 1, 2, 1)
    for leaf, want in zip(leaves, expected, strict=False):
        assert leaf.grad.shape == want.shape and not leaf.grad.any() and not want.any()
    assert dispatch.LAUNCHES["modulated_deform_conv2d_backward:triton"] == 1


def test_deform_fp16_error_within_twice_plain_torch_fp16():
    """fp16 accuracy, measured against exact maths on the same fp16 inputs.

    truth: the reference in float64 on the fp16 inputs (so input rounding is not counted as anyone's error).
    plain torch fp16: the same reference run on the fp16 tensors, i.e. what a torch model gets in half precision
    (fp16 interpolation, fp16 products and sums per tap). kernel: the Triton kernel on the fp16 tensors (fp32
    coordinates and accumulation, the sampled values rounded once to fp16 for the tensor cores, fp16 output).
    Both the largest and the RMS error of the kernel must stay within 2x those of plain torch fp16.
    """
    args = deform_case(20, 17, 13, 2, 3, 1, 1, 1, spread=6.0, seed=11, c_out=16, dtype=torch.float16)
    truth = deform_conv2d_reference(*as_double(args), 1, 1, 1)
    kernel_err = (kernels.modulated_deform_conv2d(*args, 1, 1, 1).double() - truth).abs()
    torch_err = (deform_conv2d_reference(*args, 1, 1, 1).double() - truth).abs()
    assert kernel_err.max() <= 2 * torch_err.max(), (kernel_err.max().item(), torch_err.max().item())
    assert kernel_err.square().mean().sqrt() <= 2 * torch_err.square().mean().sqrt()
    assert_close_scaled(kernels.modulated_deform_conv2d(*args, 1, 1, 1), truth, TOLERANCE[torch.float16])


def test_deform_mixed_dtypes_run_on_triton_in_the_dtype_of_x():
    """Under autocast the op gets fp16 activations beside the fp32 weight and bias (it has no autocast rule). The
    dispatch now checks every tensor, and these dtypes are all ones the kernels take: the call stays on Triton and
    computes in the dtype of x, as the reference does with the same inputs, forward and backward."""
    x, offset, mask, weight, bias = deform_case(12, 9, 11, 2, 3, 1, 1, 1, spread=2.0, seed=17, c_out=5, b=1)
    args = [x.half(), offset, mask.half(), weight, bias]
    ours = [t.clone().requires_grad_(True) for t in args]
    out = kernels.modulated_deform_conv2d(*ours, 1, 1, 1)
    assert out.dtype == torch.float16 and dispatch.LAUNCHES["modulated_deform_conv2d:triton"] == 1
    truth = deform_conv2d_reference(*as_double(args), 1, 1, 1)
    assert_close_scaled(out, truth, TOLERANCE[torch.float16])
    out.float().square().sum().backward()
    assert dispatch.LAUNCHES["modulated_deform_conv2d_backward:triton"] == 1
    ref = [t.double().requires_grad_(True) for t in args]
    deform_conv2d_reference(*ref, 1, 1, 1).half().double().square().sum().backward()
    for name, a, b in zip(("x", "offset", "mask", "weight", "bias"), ours, ref, strict=True):
        assert a.grad.dtype == a.dtype, name
        assert_close_scaled(a.grad, b.grad, 1e-2, f"grad_{name}")


@pytest.mark.parametrize("name", ["x", "offset", "mask", "weight", "bias"])
def test_deform_non_floating_input_is_refused_before_any_launch(name):
    """An integer offset, mask, weight or bias beside a float x reached the kernels, which converted it silently
    (an integer x was refused only as 'dtype not supported', with the fix 'run on a CUDA GPU'): TypeError now."""
    args = dict(zip(("x", "offset", "mask", "weight", "bias"),
                    deform_case(12, 9, 11, 2, 3, 1, 1, 1, spread=1.0, c_out=5), strict=True))
    args[name] = args[name].round().long()
    with pytest.raises(TypeError, match=f"{name} has dtype torch.int64"):
        kernels.modulated_deform_conv2d(*args.values(), 1, 1, 1)
    assert not dispatch.LAUNCHES


def test_nearest_code_non_floating_input_is_refused_before_any_launch():
    """An integer codebook beside float tokens was promoted and searched by the kernel: TypeError now."""
    with pytest.raises(TypeError, match="codebook has dtype torch.int64"):
        kernels.nearest_code(torch.randn(5, 8, device=DEVICE), torch.randint(0, 3, (6, 8), device=DEVICE))
    assert not dispatch.LAUNCHES


class Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that return a tensor with storage of its own (a copy), not a view of one of their inputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.ops += [func.__name__ for t in tree_leaves(out)
                     if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_deform_weight_is_repacked_and_its_gradient_unpacked_in_one_copy(dtype):
    """The launchers cast the weight to the dtype of x and then repacked it ([C_out, C_in, KH, KW] -> [KH*KW, C_in,
    C_out] contiguous): two copies whenever the dtypes differ (an fp32 weight beside fp16 x under autocast). The fp32
    weight gradient went back the same way, cast then made contiguous: two copies for an fp16 weight. One each now,
    with the same values and layouts, and none for a weight already stored in the packed layout."""
    deform = dispatch.triton_module("deform_conv_triton")
    weight = torch.randn(5, 6, 3, 2, device=DEVICE).to(dtype)
    for to in (torch.float32, torch.float16):
        with Allocations() as log:
            packed = deform._packed_weight(weight, to)
        assert len(log.ops) == 1, log.ops
        assert packed.is_contiguous() and packed.dtype == to
        assert torch.equal(packed, weight.to(to).permute(2, 3, 1, 0).reshape(6, 6, 5))
    stored = weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)  # a weight whose memory is already packed
    with Allocations() as log:
        packed = deform._packed_weight(stored, dtype)
    assert not log.ops and packed.data_ptr() == stored.data_ptr() and packed.is_contiguous()
    grad_w = torch.randn(6, 6, 5, device=DEVICE)  # the kernel's fp32 [KH*KW, C_in, C_out] buffer
    with Allocations() as log:
        grad = deform._unpacked_weight_grad(grad_w, weight)
    assert len(log.ops) == 1, log.ops
    assert grad.is_contiguous() and grad.dtype == dtype and grad.shape == weight.shape
    assert torch.equal(grad, grad_w.view(3, 2, 6, 5).permute(3, 2, 0, 1).to(dtype))


# --- nearest code -------------------------------------------------------------------------------------------------


def codebook_case(n, k, d, seed=0, noise=0.05):
    """Tokens that are noisy copies of known codes: the true code wins by a wide margin."""
    gen = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, d, generator=gen)
    truth = torch.randint(0, k, (n,), generator=gen)
    z = codebook[truth] + noise * torch.randn(n, d, generator=gen)
    return z, codebook, truth


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nearest_code_clear_winner_exact(dtype):
    z, codebook, truth = codebook_case(300, 77, 24)  # several token blocks, code tiles and a dim tail
    idx, dist = kernels.nearest_code(z.to(DEVICE, dtype), codebook.to(DEVICE, dtype), return_distance=True)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert torch.equal(idx.cpu(), truth)
    _, ref_dist = nearest_code_reference(z.to(dtype), codebook.to(dtype), return_distance=True)
    torch.testing.assert_close(dist.cpu(), ref_dist, atol=2e-3 if dtype == torch.float16 else 1e-4, rtol=1e-3)
    assert dispatch.LAUNCHES["nearest_code:triton"] == 1


def test_nearest_code_equals_reference_where_margin_is_clear():
    """Random tokens: indices equal the reference's wherever the best code beats the second by a clear margin."""
    gen = torch.Generator().manual_seed(4)
    z, codebook = torch.randn(200, 40, generator=gen), torch.randn(150, 40, generator=gen)
    dist = torch.cdist(z.double(), codebook.double()).square()
    two = dist.topk(2, dim=1, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > 1e-3
    idx = kernels.nearest_code(nan_moat(z.to(DEVICE)), nan_moat(codebook.to(DEVICE))).cpu()  # strided, NaN around
    assert clear.sum() > 150
    assert torch.equal(idx[clear], nearest_code_reference(z, codebook)[clear])


def test_nearest_code_ties_go_to_lowest_index():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(70, 16, generator=gen)
    codebook = base.clone()
    codebook[4] = codebook[3]  # tie inside one tile
    codebook[45] = codebook[3]  # tie across tiles
    codebook[69] = codebook[10]
    z = torch.stack([codebook[3], codebook[45], codebook[69], codebook[10]]) + 0.01 * torch.randn(4, 16, generator=gen)
    idx = kernels.nearest_code(z.to(DEVICE), codebook.to(DEVICE)).cpu()
    assert idx.tolist() == [3, 3, 10, 10]
    same = torch.zeros(40, 16)  # every code identical: every token takes code 0
    assert kernels.nearest_code(torch.randn(9, 16).to(DEVICE), same.to(DEVICE)).cpu().tolist() == [0] * 9


def test_nearest_code_nan_is_the_minimum_as_in_torch_argmin():
    """NaN distances: torch.argmin (the reference) takes the first NaN, with distance NaN. The interpreter raised on
    a NaN token, and compiled, a NaN code could hide its whole tile from every token."""
    gen = torch.Generator().manual_seed(6)
    z, codebook = torch.randn(6, 16, generator=gen), torch.randn(70, 16, generator=gen)
    z[1, 3] = float("nan")  # a NaN token: every distance is NaN
    for nan_code in (None, 50, 10):  # a NaN code in the second codebook tile, then another in the first: it wins
        if nan_code is not None:
            codebook[nan_code, 0] = float("nan")
        idx, dist = kernels.nearest_code(z.to(DEVICE), codebook.to(DEVICE), return_distance=True)
        ref_idx, ref_dist = nearest_code_reference(z, codebook, return_distance=True)
        assert idx.cpu().tolist() == ref_idx.tolist(), nan_code
        torch.testing.assert_close(dist.cpu(), ref_dist, equal_nan=True, atol=1e-4, rtol=1e-4)


def test_ops_check_shapes_before_launching():
    """Called directly, the public ops used to hand wrong shapes to the Triton kernels, which read out of bounds."""
    x, offset, mask, weight, bias = deform_case(12, 9, 11, 2, 3, 1, 1, 1, spread=1.0, c_out=5)
    conv = ([1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="mask shape"):
        torch.ops.vqfr.modulated_deform_conv2d(x, offset, mask[:, :9], weight, bias, *conv)
    with pytest.raises(ValueError, match="offset shape"):
        torch.ops.vqfr.modulated_deform_conv2d(x, offset[:, :, :4], mask, weight, bias, *conv)
    grad_out = torch.zeros(2, 5, 9, 10, device=DEVICE)  # W_out is 11
    with pytest.raises(ValueError, match="grad_out shape"):
        torch.ops.vqfr.modulated_deform_conv2d_backward(grad_out, x, offset, mask, weight, *conv)
    with pytest.raises(ValueError, match="codebook"):
        torch.ops.vqfr.nearest_code(torch.randn(5, 16, device=DEVICE), torch.randn(7, 8, device=DEVICE))
    assert not dispatch.LAUNCHES


def test_model_modules_run_the_kernels():
    """The model's DCNv2Pack and quantizer reach the Triton kernels through the public functions."""
    from vqfr.models.quantizer import L2VectorQuantizer
    from vqfr.models.warping import DCNv2Pack

    torch.manual_seed(0)
    dcn, quantizer = DCNv2Pack(12, 12, deformable_groups=4).to(DEVICE).eval(), L2VectorQuantizer(40, 12).to(DEVICE)
    x, feat = torch.randn(1, 12, 7, 9, device=DEVICE), torch.randn(1, 12, 7, 9, device=DEVICE)
    with torch.no_grad():
        out = dcn(x, feat)
        quantized = quantizer(x)
        with kernels.use("reference"):
            ref = dcn(x, feat)
            ref_quantized = quantizer(x)
    assert_close_scaled(out, ref, 1e-5)
    assert torch.equal(quantized.indices, ref_quantized.indices)
    assert dispatch.LAUNCHES["modulated_deform_conv2d:triton"] == 1 and dispatch.LAUNCHES["nearest_code:triton"] == 1
