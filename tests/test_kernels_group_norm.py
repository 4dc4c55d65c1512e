"""GroupNorm + SiLU (``kernels.group_norm_silu``): the Triton kernels against a float64 loop, the reference, the
custom op, and the opt-in ``fused_group_norm`` of the torch backend's max mode.

The kernel tests run the Triton path natively on a GPU and under Triton's CPU interpreter elsewhere (the
``triton_path`` fixture of tests/conftest.py, as in tests/test_kernels_triton.py: ``VQFR_KERNELS=triton``, so a path
that cannot run raises instead of silently testing the reference). Under the interpreter the statistics kernel gives
each program 32 pixels in tiles of 16 and the channels go in blocks of 64, so these small odd shapes still cross
several programs per image, a partial last tile and a partial channel block.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
import kernels.ops  # noqa: F401  (registers torch.ops.vqfr.*)
from kernels import dispatch
from kernels.group_norm import group_norm_silu_reference
from tests.conftest import seeded_model
from tests.test_bench import SMALL_V1, SMALL_V2

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

needs_triton = pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed (extra 'gpu'/'dev')")
kernel_path = pytest.mark.usefixtures("triton_path")  # tests/conftest.py: the Triton kernels, never a fallback


def truth(x, weight, bias, groups, eps, silu):
    """GroupNorm (+ SiLU) in float64 by the definition: two-pass mean and biased variance per (image, group)."""
    n, c, h, w = x.shape
    xg = x.double().reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(n, c, h, w)
    if weight is not None:
        y = y * weight.double().view(1, c, 1, 1)
    if bias is not None:
        y = y + bias.double().view(1, c, 1, 1)
    return y * torch.sigmoid(y) if silu else y


def case(n, c, h, w, *, seed=0, dtype=torch.float32, channels_last=False, offset=0.0, scale=1.0):
    """x [n, c, h, w] (per-channel means and scales vary), weight and bias [c], on the test device."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=gen) * (0.5 + torch.rand(1, c, 1, 1, generator=gen)) * scale
         + torch.randn(1, c, 1, 1, generator=gen) + offset)
    weight = 1 + 0.3 * torch.randn(c, generator=gen)
    bias = 0.2 * torch.randn(c, generator=gen)
    x = x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return x, weight.to(DEVICE), bias.to(DEVICE)


def max_err(actual, expected):
    return (actual.double().cpu() - expected.double().cpu()).abs().max().item()


# (batch, channels, groups, H, W, channels-last, silu): a covering set of C {32, 64, 96} x groups {32, 8, 1} x H, W
# {5, 9, 13} x batch {1, 3} x layout x SiLU, not the full product (the interpreter is slow).
FP32_CASES = [
    (1, 32, 32, 5, 9, False, True),
    (3, 32, 8, 13, 5, True, False),
    (1, 32, 1, 9, 13, True, True),
    (3, 64, 32, 9, 9, True, True),
    (1, 64, 8, 5, 13, False, False),
    (3, 64, 1, 13, 13, False, True),
    (1, 96, 32, 13, 9, True, False),  # 3 channels per group; two channel blocks, the second partial
    (3, 96, 8, 9, 5, False, True),
    (1, 96, 1, 5, 5, True, True),
]


@pytest.mark.parametrize("n,c,groups,h,w,channels_last,silu", FP32_CASES)
@needs_triton
@kernel_path
def test_triton_matches_float64_in_fp32(n, c, groups, h, w, channels_last, silu):
    x, weight, bias = case(n, c, h, w, seed=c + h, channels_last=channels_last)
    out = kernels.group_norm_silu(x, weight, bias, groups, 1e-6, silu=silu)
    expected = truth(x, weight, bias, groups, 1e-6, silu)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert max_err(out, expected) <= 1e-5 * max(1.0, expected.abs().max().item())
    assert dispatch.LAUNCHES["group_norm_silu:triton"] == 1


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not ON_GPU, reason="the interpreter has no bfloat16 (numpy lacks it); bf16 runs on a GPU only"))], ids=str)
@pytest.mark.parametrize("n,c,groups,h,w,channels_last,silu", [(3, 96, 32, 13, 9, False, True),
                                                                (3, 96, 32, 13, 9, True, True),
                                                                (1, 64, 1, 5, 13, True, False)])
@needs_triton
@kernel_path
def test_half_precision_error_within_twice_plain_torch(dtype, n, c, groups, h, w, channels_last, silu):
    """16-bit inputs, measured against float64 maths on the same 16-bit inputs.

    plain torch: ``F.silu(F.group_norm(x))`` run in the 16-bit dtype (what a model without the fp32 island gets);
    kernel: fp32 statistics and normalisation, one rounding to the output dtype. Both the largest and the RMS error
    of the kernel must stay within 2x those of plain torch. The weight and bias stay fp32 (the island's mix).
    """
    x, weight, bias = case(n, c, h, w, seed=5, dtype=dtype, channels_last=channels_last, offset=2.0)
    expected = truth(x, weight, bias, groups, 1e-6, silu)
    out = kernels.group_norm_silu(x, weight, bias, groups, 1e-6, silu=silu)
    assert out.dtype == dtype
    plain = F.group_norm(x, groups, weight.to(dtype), bias.to(dtype), 1e-6)
    plain = F.silu(plain) if silu else plain
    kernel_err = (out.double().cpu() - expected.cpu()).abs()
    torch_err = (plain.double().cpu() - expected.cpu()).abs()
    assert kernel_err.max() <= 2 * torch_err.max(), (kernel_err.max().item(), torch_err.max().item())
    assert kernel_err.square().mean().sqrt() <= 2 * torch_err.square().mean().sqrt()


@needs_triton
@kernel_path
def test_large_mean_keeps_the_variance():
    """x = 1000 + unit noise: a variance from the sum of squares (E[x^2] - E[x]^2 in fp32) cancels catastrophically;
    the kernels' per-tile two-pass statistics merged by Chan's formula do not."""
    x, _, _ = case(3, 64, 13, 11, seed=9, channels_last=True, offset=1000.0)
    expected = truth(x, None, None, 8, 1e-6, False)
    out = kernels.group_norm_silu(x, None, None, 8, 1e-6, silu=False)
    tolerance = 5e-4  # the folded affine x * scale + shift rounds x * scale (~1000 / std) once: ~1e-4 here
    assert max_err(out, expected) <= tolerance
    xg = x.float().reshape(3, 8, -1)
    naive_var = (xg * xg).mean(-1, keepdim=True) - xg.mean(-1, keepdim=True) ** 2
    naive = ((xg - xg.mean(-1, keepdim=True)) * torch.rsqrt(naive_var.clamp_min(0) + 1e-6)).reshape(x.shape)
    assert max_err(naive, expected) > 10 * tolerance  # the test would catch a sum-of-squares kernel


@needs_triton
@kernel_path
def test_memory_format_strides_and_input_untouched():
    """Channels-last in, channels-last out; NCHW in, NCHW out; x is not modified; strided views into NaN-filled
    buffers (a kernel that read outside x would pick up NaN) give the same result."""
    x, weight, bias = case(2, 64, 9, 13, seed=3)
    expected = truth(x, weight, bias, 8, 1e-6, True)
    for memory_format in (torch.channels_last, torch.contiguous_format):
        xm = x.contiguous(memory_format=memory_format)
        before = xm.clone()
        out = kernels.group_norm_silu(xm, weight, bias, 8, 1e-6)
        assert out.is_contiguous(memory_format=memory_format)
        assert torch.equal(xm, before) and xm.stride() == before.stride()
        assert max_err(out, expected) <= 1e-5 * expected.abs().max().item()
    # Views into NaN-filled buffers: channels sliced out of wider NHWC rows (pixel stride 66, not C) and out of an
    # NCHW batch (the pixels stay one axis, so the kernels read the views in place); H and W sliced (a copy first).
    nhwc = torch.full((2, 66, 9, 13), float("nan"), device=DEVICE).contiguous(memory_format=torch.channels_last)
    nchw = torch.full((4, 66, 9, 13), float("nan"), device=DEVICE)
    padded = torch.full((4, 66, 11, 15), float("nan"), device=DEVICE)
    views = ((nhwc[:, 1:65], True), (nchw[1:3, 1:65], False), (padded[1:3, 1:65, 1:10, 1:14], False))
    for view, channels_last in views:
        view.copy_(x)
        out = kernels.group_norm_silu(view, weight, bias, 8, 1e-6)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert max_err(out, expected) <= 1e-5 * expected.abs().max().item()
    assert dispatch.LAUNCHES["group_norm_silu:triton"] == 5


@needs_triton
@kernel_path
def test_compiled_with_aot_eager_reaches_the_kernel():
    """The public function traced whole by torch.compile(fullgraph=True) (the op's fake kernel gives the layout);
    the compiled call runs the Triton path."""
    x, weight, bias = case(1, 32, 5, 9, seed=4, channels_last=True)

    def fn(x, weight, bias):
        return kernels.group_norm_silu(x, weight, bias, 8, 1e-6)

    with torch.no_grad():
        out = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, weight, bias)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert max_err(out, truth(x, weight, bias, 8, 1e-6, True)) <= 1e-5 * 4
    assert dispatch.LAUNCHES["group_norm_silu:triton"] >= 1


@needs_triton
def test_traced_launcher_records_both_kernels_and_the_combine(monkeypatch):
    """The launcher as torch.compile traces it on a GPU (the op a triton_op, the launches through wrap_triton), traced
    here with make_fx and fake tensors on the CPU: the statistics and apply launches are recorded (the autotuners'
    pruners run at trace time) with the torch combine step between them. The GPU run itself is not tested here."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_mutation
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "TRACEABLE_LAUNCHES", True)  # the launches as the GPU flavour of the ops makes them
    module = dispatch.triton_module("group_norm_triton")
    x, weight, bias = (t.cpu() for t in case(2, 96, 9, 13, channels_last=True))
    graph = make_fx(lambda *a: module.group_norm_silu(*a, 8, 1e-6, True), tracing_mode="fake")(x, weight, bias).graph
    nodes = [n for n in graph.nodes if n.target is triton_kernel_wrapper_mutation]
    traced = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]) for n in nodes]
    assert [k.fn.__name__ for k in traced] == ["_group_norm_stats_kernel", "_group_norm_apply_kernel"]
    assert nodes[1].kwargs["kwargs"]["SILU"] is True
    order = list(graph.nodes)
    rsqrt = next(n for n in order if n.target is torch.ops.aten.rsqrt.default)  # the combine, for Inductor to fuse
    assert order.index(nodes[0]) < order.index(rsqrt) < order.index(nodes[1])


def test_reference_matches_float64_and_keeps_layout_and_dtype():
    """The reference (the CPU path): fp32 maths on an NCHW copy (torch's CPU channels-last GroupNorm computes the
    variance in one pass), the dtype and memory format of x."""
    x, weight, bias = case(2, 64, 7, 5, seed=6, channels_last=True, offset=300.0)
    out = group_norm_silu_reference(x.cpu(), weight.cpu(), bias.cpu(), 8, 1e-6)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert max_err(out, truth(x, weight, bias, 8, 1e-6, True)) <= 1e-4
    half = group_norm_silu_reference(x.cpu().half(), weight.cpu(), bias.cpu(), 8, 1e-6, silu=False)
    assert half.dtype == torch.float16 and half.is_contiguous(memory_format=torch.channels_last)


def test_opcheck_and_aot_eager_on_the_reference_path():
    """The op's schema, fake kernel and autograd registration (torch.library.opcheck), and a fullgraph compile."""
    x, weight, bias = (t.cpu() for t in case(2, 32, 5, 7, seed=7, channels_last=True))
    torch.library.opcheck(torch.ops.vqfr.group_norm_silu.default, (x, weight, bias, 8, 1e-6, True))
    torch.library.opcheck(torch.ops.vqfr.group_norm_silu.default, (x.contiguous(), None, None, 4, 1e-5, False))
    with torch.no_grad():
        out = torch.compile(lambda x: kernels.group_norm_silu(x, weight, bias, 8, 1e-6), backend="aot_eager",
                            fullgraph=True)(x)
    assert torch.equal(out, group_norm_silu_reference(x, weight, bias, 8, 1e-6))


def test_gradients_take_the_reference_and_the_op_has_no_backward():
    x, weight, bias = (t.cpu() for t in case(1, 32, 5, 5, seed=8))
    leaf = x.clone().requires_grad_(True)
    dispatch.LAUNCHES.clear()
    kernels.group_norm_silu(leaf, weight, bias, 8, 1e-6).square().sum().backward()
    ref = x.double().requires_grad_(True)
    truth(ref, weight, bias, 8, 1e-6, True).square().sum().backward()
    assert max_err(leaf.grad, ref.grad) <= 1e-4 and dispatch.LAUNCHES["group_norm_silu:reference"] == 1
    with pytest.raises(RuntimeError, match="has no backward"):
        torch.ops.vqfr.group_norm_silu(leaf, weight, bias, 8, 1e-6, True).sum().backward()
    with kernels.use("triton"), pytest.raises(RuntimeError, match="no backward"):
        kernels.group_norm_silu(leaf, weight, bias, 8, 1e-6)


@pytest.mark.parametrize("fn", ["public", "op", "reference"])
def test_bad_arguments_are_refused_with_the_fix(fn):
    call = {"public": kernels.group_norm_silu, "reference": group_norm_silu_reference,
            "op": lambda x, w, b, g, eps=1e-6: torch.ops.vqfr.group_norm_silu(x, w, b, g, eps, True)}[fn]
    x, weight, bias = (t.cpu() for t in case(1, 48, 5, 5))
    with pytest.raises(ValueError, match="num_groups=32 must be >= 1 and divide the 48 channels"):
        call(x, weight, bias, 32)
    with pytest.raises(ValueError, match=r"weight shape \(47,\) != expected \(48,\)"):
        call(x, weight[:47], bias, 8)
    with pytest.raises(ValueError, match=r"x must be \[N, C, H, W\]"):
        call(x[0], weight, bias, 8)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        call(x, weight, bias, 8, -1.0)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        call(x.long(), weight, bias, 8)
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        call(x, weight, bias.to("meta"), 8)


# --- the torch backend's max mode with fused_group_norm ----------------------------------------------------------


def _run_max(model, fused, x, fidelity, device="cpu"):
    """The max mode in fp32 without compile and CUDA graphs (the CPU defaults): (output on the CPU, state-dict keys,
    modules)."""
    from vqfr.backends import BACKENDS
    from vqfr.backends.torch import TorchBackend
    from vqfr.backends.torch_fast import FastOptions

    entry = next(e for e in BACKENDS if e.label == f"torch[{device}]")
    fast = FastOptions(compile=False, cuda_graphs=False, fused_group_norm=fused)
    with TorchBackend(entry, model, mode="max", precision="fp32", fast=fast, device=device) as be:
        keys = list(be.model.state_dict())
        modules = list(be.model.modules())
        return be.infer(x, fidelity).cpu(), keys, modules


@pytest.mark.parametrize("options", [SMALL_V1, SMALL_V2], ids=["v1", "v2"])
def test_fused_group_norm_in_max_mode_matches_and_keeps_the_keys(options):
    from vqfr.backends.torch_fast import FusedGroupNorm, with_fused_group_norm
    from vqfr.models.blocks import ResnetBlock

    model = seeded_model(copy.deepcopy(options), seed=2)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    fidelity = torch.tensor([1.0, 0.5])
    dispatch.LAUNCHES.clear()
    ref, ref_keys, _ = _run_max(model, False, x, fidelity)
    out, keys, modules = _run_max(model, True, x, fidelity)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert keys == ref_keys
    assert not any(isinstance(m, nn.GroupNorm) for m in modules)
    fused = [m for m in modules if isinstance(m, FusedGroupNorm)]
    assert len(fused) == sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert dispatch.LAUNCHES["group_norm_silu:reference"] > 0
    # The SiLU after each GroupNorm is fused: none is left in the model; ResnetBlocks' norms apply it themselves.
    assert not any(isinstance(m, nn.SiLU) for m in modules)
    blocks = [m for m in modules if isinstance(m, ResnetBlock)]
    assert blocks and all(b.norm1.applies_silu and b.norm2.applies_silu for b in blocks)
    copied = with_fused_group_norm(model)  # the caller's model is left alone
    assert list(copied.state_dict()) == list(model.state_dict())
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == len(fused)


@pytest.mark.parametrize("options", [SMALL_V1, SMALL_V2], ids=["v1", "v2"])
def test_fused_group_norm_model_compiles_as_one_graph(options):
    """torch.compile(fullgraph=True) of the max mode with the fused GroupNorm: no graph break (the op's fake kernel,
    ``norm_silu``'s attribute test); aot_eager checks the tracing without Inductor's C++ compile time."""
    from vqfr.backends import BACKENDS
    from vqfr.backends.torch import TorchBackend
    from vqfr.backends.torch_fast import FastOptions

    torch._dynamo.reset()
    model = seeded_model(copy.deepcopy(options), seed=4)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    fidelity = torch.tensor([0.3, 1.0])
    with torch.no_grad():
        ref = model(x, fidelity=fidelity) if options["type"] == "VQFRv2" else model(x)
    cpu = next(e for e in BACKENDS if e.label == "torch[cpu]")
    fast = FastOptions(compile=True, compile_backend="aot_eager", fused_group_norm=True)
    with TorchBackend(cpu, model, mode="max", fast=fast) as be:
        torch.testing.assert_close(be.infer(x, fidelity), ref, atol=1e-4, rtol=0)


@needs_triton
@kernel_path
def test_fused_group_norm_in_max_mode_runs_the_kernels():
    """The same through the Triton kernels (on the GPU, else interpreted on the CPU): every GroupNorm of the small v2
    reaches them."""
    model = seeded_model(copy.deepcopy(SMALL_V2), seed=3)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with kernels.use("auto"):
        ref, _, _ = _run_max(model, False, x, torch.tensor([1.0]), DEVICE)
        dispatch.LAUNCHES.clear()
        out, _, _ = _run_max(model, True, x, torch.tensor([1.0]), DEVICE)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert dispatch.LAUNCHES["group_norm_silu:triton"] >= sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not dispatch.LAUNCHES["group_norm_silu:reference"]
