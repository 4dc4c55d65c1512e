"""What mutation testing (round 6) of the fused GroupNorm + SiLU and the torch backend's fast path found unchecked,
pinned here (found by planting bugs one at a time; expected values from float64 formulas written out below, never
from the code under test; tiny shapes, on the CPU, the Triton kernels under the interpreter):

- ``kernels.group_norm_silu`` uses the ``eps`` it is given (a constant group normalises to the bias, not NaN; a
  large eps is visible), accepts ``eps=0``, refuses a bias (like a weight) that is not one value per channel (the
  Triton path would broadcast a [1] bias silently) and a bool group count; the affine works with only a weight or
  only a bias; float64 inputs are computed in float64; empty inputs give empty outputs; a strided-pixel view gives an
  NCHW output; a statistics program whose pixels are not whole tiles counts its own pixels; the 32-bit offset
  check refuses an image spanning exactly 2**31 elements;
- a weight that needs a gradient (a trainable ``FusedGroupNorm`` on a frozen input) takes the differentiable
  reference, in mode ``auto`` and in mode ``reference``;
- ``Float32Island`` returns the dtype of its first floating input, casts keyword inputs too, and leaves integer
  inputs and outputs (v1's code indices) alone;
- ``FusedGroupNorm`` / ``with_fused_group_norm`` keep each GroupNorm's own eps (VQFR's are all 1e-6, so the models
  cannot tell), leave a (GroupNorm, module) pair alone when the module is not a SiLU, and make no islands;
- the max mode in fp16 with ``fused_group_norm``: the GroupNorms are fused before the islands are made, so no
  island wraps a fused norm (it would hide ``applies_silu``: the SiLU would run twice), the ResnetBlocks' norms
  apply their SiLU, and the output stays within fp16 rounding of the fp32 model;
- ``FastOptions.resolved`` keeps explicit choices; ``FastRunner`` compiles each (batch, fidelity kind) once, keeps
  the first call's time in ``prepare_s``, and hands the model its dtype and the layout ``channels_last`` asks;
- ``deploy.bench``'s ``torch-max-gn`` runs at the precision and with the fast options asked for and says so in its
  note; ``deploy.profile_model --fused-group-norm`` reaches the profile.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kernels
from kernels import dispatch
from kernels.group_norm import check_group_norm_args, group_norm_silu_reference
from tests.conftest import seeded_model
from tests.test_bench import SMALL_V2, tiny_yml
from vqfr.backends import BACKENDS
from vqfr.backends.torch import TorchBackend
from vqfr.backends.torch_fast import (
    FastOptions,
    FastRunner,
    Float32Island,
    FusedGroupNorm,
    island_names,
    with_fused_group_norm,
)

CPU = next(e for e in BACKENDS if e.label == "torch[cpu]")
needs_triton = pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed (extra 'gpu'/'dev')")
kernel_path = pytest.mark.usefixtures("triton_path")  # tests/conftest.py: the Triton kernels, never a fallback


def gn64(x, weight, bias, groups, eps, silu):
    """GroupNorm (+ SiLU) in float64 by the definition, written out: per (image, group) mean and biased variance."""
    n, c, h, w = x.shape
    xd = x.detach().double().cpu()
    y = torch.empty(n, c, h, w, dtype=torch.float64)
    cpg = c // groups
    for i in range(n):
        for g in range(groups):
            part = xd[i, g * cpg:(g + 1) * cpg]
            mean = part.sum() / part.numel()
            var = ((part - mean) ** 2).sum() / part.numel()
            y[i, g * cpg:(g + 1) * cpg] = (part - mean) / (var + eps) ** 0.5
    if weight is not None:
        y = y * weight.detach().double().cpu().view(1, c, 1, 1)
    if bias is not None:
        y = y + bias.detach().double().cpu().view(1, c, 1, 1)
    return y / (1 + torch.exp(-y)) if silu else y


def inputs(n, c, h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=gen) * 2 + 0.5, 1 + 0.3 * torch.randn(c, generator=gen),
            0.2 * torch.randn(c, generator=gen))


def err(actual, expected):
    return (actual.double().cpu() - expected).abs().max().item()


# ------------------------------------------------------------------------------------------- kernels.group_norm_silu
@needs_triton
@kernel_path
# the constant group's masked pixels compute SiLU(-3000): exp overflows to inf, and y / inf = -0 (the kernel's note)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_the_kernels_use_eps_a_constant_group_gives_the_bias_and_eps_zero_is_valid():
    """A constant group has variance 0: with eps its output is the bias (SiLU of it), without eps it would be
    0/0. A large eps changes every output visibly. eps=0 is a valid GroupNorm (torch's accepts it)."""
    x, weight, bias = inputs(2, 8, 5, 7, seed=1)
    x[1, 2:4] = 3.0  # image 1, group 1 (channels 2-3 of 4 groups): constant
    out = kernels.group_norm_silu(x, weight, bias, 4, 1e-6, silu=True)
    expected = gn64(x, weight, bias, 4, 1e-6, True)
    assert torch.isfinite(out).all()
    # x * scale + shift with scale = rstd * weight ~ 1000 rounds 3000 * weight once in fp32: ~1e-4
    assert err(out[1, 2:4], expected[1, 2:4]) <= 5e-4
    others = torch.ones(2, 8, dtype=torch.bool)
    others[1, 2:4] = False
    assert err(out[others], expected[others]) <= 1e-5
    big = kernels.group_norm_silu(x, weight, bias, 4, 0.5, silu=False)
    assert err(big, gn64(x, weight, bias, 4, 0.5, False)) <= 1e-5
    x0, _, _ = inputs(1, 8, 5, 7, seed=2)
    assert err(kernels.group_norm_silu(x0, None, None, 2, 0.0, silu=False), gn64(x0, None, None, 2, 0.0, False)) <= 1e-5
    assert dispatch.LAUNCHES["group_norm_silu:triton"] == 3


@needs_triton
@kernel_path
@pytest.mark.parametrize("which", ["weight only", "bias only"])
def test_the_kernels_apply_a_weight_without_bias_and_a_bias_without_weight(which):
    x, weight, bias = inputs(2, 8, 5, 7, seed=3)
    weight, bias = (weight, None) if which == "weight only" else (None, bias)
    out = kernels.group_norm_silu(x, weight, bias, 2, 1e-6, silu=False)
    assert err(out, gn64(x, weight, bias, 2, 1e-6, False)) <= 1e-5


@needs_triton
@kernel_path
def test_a_bias_or_weight_of_one_value_is_refused_not_broadcast():
    """The Triton path adds ``bias`` to an [N, C] shift: a [1] bias would broadcast silently there."""
    x, weight, bias = inputs(1, 8, 3, 3)
    with pytest.raises(ValueError, match=r"bias shape \(1,\) != expected \(8,\)"):
        kernels.group_norm_silu(x, weight, bias[:1], 2, 1e-6)
    with pytest.raises(ValueError, match=r"weight shape \(1,\) != expected \(8,\)"):
        kernels.group_norm_silu(x, weight[:1], bias, 2, 1e-6)
    with pytest.raises(TypeError, match="num_groups must be an int, got True"):
        check_group_norm_args(x, weight, bias, True, 1e-6)  # type: ignore[arg-type]


@needs_triton
@kernel_path
def test_empty_inputs_give_empty_outputs():
    """A batch of no images (or images of no pixels): an empty output in the layout of x, not an error from the
    partials of no pixels."""
    for shape, channels_last in (((0, 8, 3, 5), True), ((2, 8, 0, 5), False)):
        layout = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.empty(shape).contiguous(memory_format=layout)
        out = kernels.group_norm_silu(x, torch.ones(8), torch.zeros(8), 2, 1e-6)
        assert out.shape == shape and out.dtype == torch.float32 and out.is_contiguous(memory_format=layout)


@needs_triton
@kernel_path
def test_the_statistics_hold_when_a_programs_pixels_are_not_a_whole_number_of_tiles(monkeypatch):
    """On a GPU each statistics program gets a multiple of 128 pixels, so only an image's last tile is partial; the
    kernel's count of a tile is still the pixels left in its own program, not in the image: 24 pixels per program
    (tiles of 16 under the interpreter) over 45-pixel images."""
    module = dispatch.triton_module("group_norm_triton")
    monkeypatch.setattr(module, "pixels_per_program", lambda n, hw, device: 24)
    x, weight, bias = inputs(2, 8, 5, 9, seed=7)
    out = kernels.group_norm_silu(x, weight, bias, 2, 1e-6, silu=False)
    assert err(out, gn64(x, weight, bias, 2, 1e-6, False)) <= 1e-5


def test_an_odd_layout_gives_an_nchw_output():
    """Only a channels-last x gives a channels-last output; a view with strided pixels (x[..., ::2]) is not one."""
    x, weight, bias = inputs(1, 8, 3, 10, seed=8)
    view = x[..., ::2]
    out = kernels.group_norm_silu(view, weight, bias, 2, 1e-6)
    assert out.is_contiguous() and not out.is_contiguous(memory_format=torch.channels_last)
    assert err(out, gn64(view, weight, bias, 2, 1e-6, True)) <= 1e-5


def test_float64_is_computed_in_float64():
    """1e4 plus noise of 1e-3: float32 cannot even hold the input (its spacing at 1e4 is 1e-3)."""
    gen = torch.Generator().manual_seed(4)
    x = (1e4 + 1e-3 * torch.randn(1, 4, 3, 5, generator=gen)).double()
    weight, bias = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for out in (group_norm_silu_reference(x, weight, bias, 2, 1e-6, silu=False),
                kernels.group_norm_silu(x, weight, bias, 2, 1e-6, silu=False)):
        assert out.dtype == torch.float64
        assert err(out, gn64(x, weight, bias, 2, 1e-6, False)) <= 1e-6


def test_a_weight_that_needs_a_gradient_takes_the_differentiable_reference():
    """A trainable FusedGroupNorm fed a tensor that needs no gradient (a frozen input): the weight and bias still
    get theirs, as from the float64 formula."""
    x, weight, bias = inputs(1, 4, 3, 5, seed=5)
    norm = nn.GroupNorm(2, 4, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
    fused = FusedGroupNorm(norm, silu=True)
    dispatch.LAUNCHES.clear()
    fused(x).square().sum().backward()
    assert dispatch.LAUNCHES["group_norm_silu:reference"] == 1
    w64, b64 = weight.double().requires_grad_(True), bias.double().requires_grad_(True)
    gn64_grad = gn64(x, None, None, 2, 1e-6, False) * w64.view(1, 4, 1, 1) + b64.view(1, 4, 1, 1)
    (gn64_grad * torch.sigmoid(gn64_grad)).square().sum().backward()
    assert fused.weight.grad is not None and fused.bias.grad is not None
    assert err(fused.weight.grad, w64.grad) <= 1e-4 and err(fused.bias.grad, b64.grad) <= 1e-4
    fused.zero_grad()
    with kernels.use("reference"):  # forcing the reference is no reason to refuse a gradient (only 'triton' is)
        fused(x).square().sum().backward()
    assert err(fused.weight.grad, w64.grad) <= 1e-4


@needs_triton
@kernel_path
def test_an_image_spanning_two_to_the_31_elements_is_refused():
    """In-image offsets are 32-bit: the largest offset must stay below 2**31 (meta tensors: no memory)."""
    module = dispatch.triton_module("group_norm_triton")
    module._check_offsets(torch.empty_strided((1, 2, 2), (2**31, 2**31 - 2, 1), device="meta"))  # span 2**31 - 1
    with pytest.raises(ValueError, match="32-bit in-image offsets"):
        module._check_offsets(torch.empty_strided((1, 2, 2), (2**31 + 1, 2**31 - 1, 1), device="meta"))  # 2**31


# ------------------------------------------------------------------------------------------------- Float32Island
class _Pair(nn.Module):
    """(a + b, the integer tensor + 1): records the dtypes it was called with."""

    def forward(self, a, idx, b):
        self.seen = (a.dtype, idx.dtype, b.dtype)
        return a + b, idx + 1


def test_an_island_returns_the_first_inputs_dtype_and_leaves_integers_alone():
    island = Float32Island(_Pair())
    a = torch.tensor([1.5, -2.0]).half()
    idx = torch.tensor([3, 2047])
    out, codes = island(a, idx, b=torch.tensor([0.25, 0.5], dtype=torch.bfloat16))  # keywords are cast too
    assert island.inner.seen == (torch.float32, torch.int64, torch.float32)
    assert out.dtype == torch.float16 and out.tolist() == [1.75, -1.5]
    assert codes.dtype == torch.int64 and codes.tolist() == [4, 2048]


# -------------------------------------------------------------------------------------------------- FusedGroupNorm
def test_fused_group_norm_keeps_each_norms_eps_and_leaves_other_pairs_alone():
    """A GroupNorm with eps 0.25 (VQFR's are all 1e-6, so the models cannot tell): its fused module uses 0.25. A
    (GroupNorm, Conv) pair keeps its conv: only a SiLU is fused."""
    x, weight, bias = inputs(2, 4, 3, 5, seed=6)
    norm = nn.GroupNorm(2, 4, eps=0.25)
    conv = nn.Conv2d(4, 4, 1, bias=False)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
        conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1) * 2)  # doubles each channel
    model = nn.Sequential(nn.Sequential(norm, nn.SiLU()), nn.Sequential(copy.deepcopy(norm), conv))
    fused = with_fused_group_norm(model)
    assert isinstance(fused[0][0], FusedGroupNorm) and fused[0][0].eps == 0.25 and fused[0][0].applies_silu
    assert isinstance(fused[1][0], FusedGroupNorm) and not fused[1][0].applies_silu and fused[1][1] is not conv
    assert isinstance(fused[1][1], nn.Conv2d) and island_names(fused) == []  # fused norms are not islands
    with torch.no_grad():
        first, second = fused[0](x), fused[1](x)
    assert err(first, gn64(x, weight, bias, 2, 0.25, True)) <= 1e-5
    assert err(second, 2 * gn64(x, weight, bias, 2, 0.25, False)) <= 1e-5


def test_max_mode_in_half_precision_with_the_fused_group_norm():
    """fp16 with fp32 islands and the fused GroupNorm: no fused norm is itself wrapped in an island (an island
    hides ``applies_silu`` and the SiLU would run twice; the attention blocks' islands hold their norm), the
    ResnetBlocks' norms apply their SiLU, and the output stays at fp16 rounding distance from the fp32 model."""
    from vqfr.models.blocks import ResnetBlock

    model = seeded_model(copy.deepcopy(SMALL_V2), seed=5)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        ref = model(x, fidelity=torch.tensor([0.5]))
    fast = FastOptions(compile=False, cuda_graphs=False, fused_group_norm=True)
    with TorchBackend(CPU, model, mode="max", precision="fp16", fast=fast) as be:
        islands = [m for m in be.model.modules() if isinstance(m, Float32Island)]
        assert islands and not any(isinstance(i.inner, FusedGroupNorm) for i in islands)
        blocks = [m for m in be.model.modules() if isinstance(m, ResnetBlock)]
        assert blocks and all(isinstance(b.norm1, FusedGroupNorm) and b.norm1.applies_silu and
                              isinstance(b.norm2, FusedGroupNorm) and b.norm2.applies_silu for b in blocks)
        # their affine stays fp32, as an island's does (fp16 weights cost 1.2x the error against float64)
        fused = [m for m in be.model.modules() if isinstance(m, FusedGroupNorm)]
        assert fused and all(m.weight.dtype == m.bias.dtype == torch.float32 for m in fused)
        convs = [m for m in be.model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs[0].weight.dtype == torch.float16  # the rest of the model is in fp16
        out = be.infer(x, torch.tensor([0.5]))
    assert out.dtype == torch.float16
    mse = ((out.float().clamp(-1, 1) - ref.clamp(-1, 1)) / 2).pow(2).mean()
    assert 10 * torch.log10(1 / mse) > 45


# ------------------------------------------------------------------------------------------------------ FastRunner
def test_explicit_fast_options_win_over_the_device_defaults():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert FastOptions(compile=True).resolved(cpu).compile is True  # the CPU tests compile with aot_eager
    assert FastOptions(compile=False, cuda_graphs=False).resolved(cuda) == FastOptions(compile=False,
                                                                                        cuda_graphs=False)
    assert FastOptions().resolved(cpu) == FastOptions(compile=False, cuda_graphs=False)


def test_the_runner_compiles_each_key_once_and_keeps_the_first_calls_time(monkeypatch):
    from vqfr.backends import torch_fast

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(kwargs) or fn)
    options = FastOptions(compile=True, compile_backend="eager", channels_last=False).resolved(torch.device("cpu"))
    model = nn.Conv2d(3, 2, 1).eval()
    runner = FastRunner(model, "VQFRv1", torch.device("cpu"), torch.float32, options)
    ticks = iter(k * k for k in range(100))  # 0, 1, 4, 9, ...: each call's duration differs
    monkeypatch.setattr(torch_fast.time, "perf_counter", lambda: float(next(ticks)))
    for batch in (1, 1, 2, 1):
        runner(torch.rand(batch, 3, 4, 4), torch.zeros(batch))
    assert len(compiled) == 2 and all(kw["fullgraph"] and kw["dynamic"] is False for kw in compiled)
    assert runner.prepare_s == {(1, False): 1.0, (2, False): 25.0 - 16.0}


class _Layout(nn.Module):
    def forward(self, x):
        self.seen = (x.dtype, x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last))
        return x


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_runner_hands_the_model_its_dtype_and_layout(channels_last):
    """The input is cast to the model's dtype and laid out as ``channels_last`` asks (NHWC or NCHW), whatever the
    caller passes."""
    model = _Layout()
    options = FastOptions(channels_last=channels_last).resolved(torch.device("cpu"))
    runner = FastRunner(model, "VQFRv1", torch.device("cpu"), torch.bfloat16, options)
    x = torch.rand(2, 3, 4, 5)
    runner(x if channels_last else x.contiguous(memory_format=torch.channels_last), torch.ones(2))
    assert model.seen == (torch.bfloat16, not channels_last, channels_last)


# ------------------------------------------------------------------------------------------ deploy.bench / profile
def test_bench_torch_max_gn_takes_the_precision_and_fast_options_asked_for():
    from deploy import bench

    model = seeded_model(copy.deepcopy(SMALL_V2))
    cfg = bench.BenchConfig(backends=["torch-max-gn"], precisions=["bf16"], batches=[1],
                            fast=FastOptions(channels_last=False))
    subjects = [s for s in bench.make_subjects(cfg, model, torch.device("cpu"), None) if s.backend == "torch-max-gn"]
    assert [s.precision for s in subjects] == ["bf16"]
    assert subjects[0].note == "fp32 islands, fused GroupNorm+SiLU (kernels.group_norm_silu)"
    backend = subjects[0].make()
    try:
        assert backend.precision == "bf16" and backend.mode == "max"
        assert backend.fast.fused_group_norm and not backend.fast.channels_last
        assert any(isinstance(m, FusedGroupNorm) for m in backend.model.modules())
    finally:
        backend.close()


def test_profile_model_cli_passes_fused_group_norm_on(tmp_path, monkeypatch):
    from deploy import profile_model

    calls = []

    class Stop(Exception):
        pass

    def profile(*args, **kwargs):
        calls.append(kwargs)
        raise Stop

    monkeypatch.setattr(profile_model, "profile", profile)
    for flags, expected in (([], False), (["--fused-group-norm"], True)):
        with pytest.raises(Stop):
            profile_model.main(["--config", str(tiny_yml(tmp_path, SMALL_V2)), "--device", "cpu", *flags])
        assert calls[-1]["fused_group_norm"] is expected
