"""Which implementation runs: the switch, the fallbacks, the lazy triton import and the custom-op contract."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels
import kernels.ops  # noqa: F401  (registers torch.ops.vqfr.*)
from kernels import dispatch
from kernels.deform_conv import deform_conv2d_backward_reference, deform_conv2d_reference
from kernels.nearest_code import nearest_code_reference


@pytest.fixture(autouse=True)
def clean_switches(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("VQFR_KERNELS", raising=False)
    dispatch.LAUNCHES.clear()


def small_dcn(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 6, 7, generator=gen)
    offset = torch.randn(1, 2 * 2 * 9, 6, 7, generator=gen)
    mask = torch.rand(1, 2 * 9, 6, 7, generator=gen)
    weight = torch.randn(4, 8, 3, 3, generator=gen)
    bias = torch.randn(4, generator=gen)
    return [t.to(dtype) for t in (x, offset, mask, weight, bias)]


def run_both(dtype=torch.float32):
    args = small_dcn(dtype)
    out = kernels.modulated_deform_conv2d(*args, 1, 1, 1)
    z, codebook = torch.randn(10, 8, dtype=dtype), torch.randn(6, 8, dtype=dtype)
    idx = kernels.nearest_code(z, codebook)
    return out, deform_conv2d_reference(*args, 1, 1, 1), idx, nearest_code_reference(z, codebook)


def test_cpu_without_interpreter_runs_pure_torch():
    out, ref, idx, ref_idx = run_both()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)  # float32 deformable conv: the grid_sample forward
    assert torch.equal(idx, ref_idx)
    assert dispatch.LAUNCHES == {"modulated_deform_conv2d:grid_sample": 1, "nearest_code:reference": 1}
    assert "TRITON_INTERPRET" in kernels.why_not_triton(torch.ones(1))
    with kernels.use("reference"):
        assert torch.equal(run_both()[0], ref)
    assert dispatch.LAUNCHES["modulated_deform_conv2d:reference"] == 1


def test_float64_takes_the_reference_even_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out, ref, idx, ref_idx = run_both(torch.float64)
    assert torch.equal(out, ref) and torch.equal(idx, ref_idx)
    assert set(dispatch.LAUNCHES) == {"modulated_deform_conv2d:reference", "nearest_code:reference"}
    monkeypatch.setenv("VQFR_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="float64"):
        run_both(torch.float64)


def test_bfloat16_under_the_interpreter_takes_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "bfloat16" in kernels.why_not_triton(torch.ones(1, dtype=torch.bfloat16))
    run_both(torch.bfloat16)
    assert dispatch.LAUNCHES["modulated_deform_conv2d:reference"] == 1


def test_forcing_triton_where_it_cannot_run_says_why(monkeypatch):
    monkeypatch.setenv("VQFR_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        run_both()


def test_missing_triton_falls_back_and_names_the_extra(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    run_both()
    assert set(dispatch.LAUNCHES) == {"modulated_deform_conv2d:grid_sample", "nearest_code:reference"}
    with kernels.use("triton"), pytest.raises(RuntimeError, match=r"pip install 'vqfr-deploy\[gpu\]'"):
        run_both()


def test_use_overrides_the_environment_and_nests(monkeypatch):
    monkeypatch.setenv("VQFR_KERNELS", "triton")
    assert kernels.active_mode() == "triton"
    with kernels.use("reference"):
        assert kernels.active_mode() == "reference"
        run_both()  # would raise in mode triton
        with kernels.use("auto"):
            assert kernels.active_mode() == "auto"
        assert kernels.active_mode() == "reference"
    assert kernels.active_mode() == "triton"


def test_reference_mode_wins_over_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VQFR_KERNELS", "reference")
    run_both()
    assert set(dispatch.LAUNCHES) == {"modulated_deform_conv2d:reference", "nearest_code:reference"}


def test_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("VQFR_KERNELS", "fastest")
    with pytest.raises(ValueError, match="VQFR_KERNELS='fastest'.*auto, triton, reference"):
        run_both()
    with pytest.raises(ValueError, match="kernels.use"):
        with kernels.use("cuda"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the ops are triton_ops, which import triton")
def test_cpu_use_never_loads_the_triton_kernels():
    """Registering the ops imports neither triton nor torch._inductor, and CPU calls never load the kernel modules.

    (The first call of any torch custom op imports torch._dynamo, which imports triton when it is installed: that is
    torch's doing, so only this package's own Triton modules are checked after the calls.)
    """
    code = (
        "import sys, torch, kernels, kernels.ops\n"
        "print(kernels.ops.TRITON_OPS, 'triton' in sys.modules, 'torch._inductor' in sys.modules)\n"
        "x = torch.randn(1, 4, 5, 5); off = torch.zeros(1, 18, 5, 5); m = torch.ones(1, 9, 5, 5)\n"
        "kernels.modulated_deform_conv2d(x, off, m, torch.randn(2, 4, 3, 3), None, 1, 1, 1)\n"
        "kernels.nearest_code(torch.randn(3, 4), torch.randn(5, 4))\n"
        "print(sorted(m for m in sys.modules if m.startswith('kernels.') and 'triton' in m))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VQFR_KERNELS")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False", "False", "[]"], res.stdout


def test_op_schemas_are_the_published_contract():
    """The ONNX translation and AOTInductor rely on these names and argument orders."""
    schemas = {name: str(getattr(torch.ops.vqfr, name).default._schema)
               for name in ("modulated_deform_conv2d", "modulated_deform_conv2d_backward", "nearest_code")}
    assert schemas["modulated_deform_conv2d"] == (
        "vqfr::modulated_deform_conv2d(Tensor x, Tensor offset, Tensor mask, Tensor weight, Tensor? bias, "
        "SymInt[] stride, SymInt[] padding, SymInt[] dilation) -> Tensor"
    )
    assert schemas["nearest_code"] == "vqfr::nearest_code(Tensor z, Tensor codebook) -> (Tensor, Tensor)"
    assert schemas["modulated_deform_conv2d_backward"].startswith(
        "vqfr::modulated_deform_conv2d_backward(Tensor grad_out, Tensor x, Tensor offset, Tensor mask, Tensor weight,"
    )


class _Both(torch.nn.Module):
    def forward(self, x, offset, mask, weight, z, codebook):
        out = kernels.modulated_deform_conv2d(x, offset, mask, weight, None, 1, 1, 1)
        return out, kernels.nearest_code(z, codebook)


def test_export_sees_one_node_per_op_with_correct_fake_shapes():
    x, offset, mask, weight, _ = small_dcn()
    z, codebook = torch.randn(10, 8), torch.randn(6, 8)
    ep = torch.export.export(_Both(), (x, offset, mask, weight, z, codebook))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("vqfr.modulated_deform_conv2d.default") == 1
    assert targets.count("vqfr.nearest_code.default") == 1
    out, idx = ep.module()(x, offset, mask, weight, z, codebook)
    assert out.shape == (1, 4, 6, 7) and idx.shape == (10,)
    torch.testing.assert_close(out, deform_conv2d_reference(x, offset, mask, weight, None, 1, 1, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_op_layouts_match_its_fake_kernel(channels_last):
    """Inductor allocates and checks the backward op's outputs by its fake kernel: with a channels-last x (a model
    trained channels-last), the fake said channels-last offset, mask and weight gradients and the reference returned
    an NCHW grad_x, and torch.compile of the backward failed its stride assertion."""
    x, offset, mask, weight, _ = small_dcn()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, offset, mask, weight = (t.contiguous(memory_format=fmt) for t in (x, offset, mask, weight))
    grad_out = torch.randn(1, 4, 6, 7)
    args = (grad_out, x, offset, mask, weight, [1, 1], [1, 1], [1, 1])
    real = torch.ops.vqfr.modulated_deform_conv2d_backward(*args)
    with FakeTensorMode() as mode:  # compared here: opcheck of torch 2.11 compares no strides
        fake = torch.ops.vqfr.modulated_deform_conv2d_backward(*(mode.from_tensor(a) if isinstance(a, torch.Tensor)
                                                                 else a for a in args))
    for name, r, f in zip(("x", "offset", "mask", "weight"), real, fake, strict=True):
        significant = [i for i, n in enumerate(r.shape) if n != 1]  # nothing is indexed along size-1 dimensions
        assert [r.stride(i) for i in significant] == [f.stride(i) for i in significant], (name, r.stride(), f.stride())
    assert real[0].is_contiguous(memory_format=fmt) and all(g.is_contiguous() for g in real[1:])


def test_ops_check_shapes_before_dispatch():
    """The ops are public: wrong shapes raise ValueError whichever implementation would run (the Triton launchers
    trust their arguments and read out of bounds; tests/test_kernels_triton.py checks that path)."""
    x, offset, mask, weight, bias = small_dcn()
    conv = ([1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="mask shape"):
        torch.ops.vqfr.modulated_deform_conv2d(x, offset, mask[:, :9], weight, bias, *conv)
    with pytest.raises(ValueError, match="grad_out shape"):
        torch.ops.vqfr.modulated_deform_conv2d_backward(torch.randn(1, 4, 6, 6), x, offset, mask, weight, *conv)
    with pytest.raises(ValueError, match="codebook"):
        torch.ops.vqfr.nearest_code(torch.randn(5, 16), torch.randn(7, 8))


def test_models_route_through_the_ops(tiny_v1_options):
    from tests.conftest import seeded_model

    model = seeded_model(tiny_v1_options)
    dcns = sum(type(m).__name__ == "DCNv2Pack" for m in model.modules())
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert dispatch.LAUNCHES["modulated_deform_conv2d:grid_sample"] == dcns > 0
    assert dispatch.LAUNCHES["nearest_code:reference"] >= 1


TRITON_OP_SCRIPT = """
import torch
real = torch.cuda.is_available
torch.cuda.is_available = lambda: True  # register the GPU flavour of the ops on this CPU-only machine
import kernels, kernels.ops
torch.cuda.is_available = real
from kernels import dispatch
from kernels.deform_conv import deform_conv2d_reference
assert kernels.ops.TRITON_OPS and dispatch.TRACEABLE_LAUNCHES
g = torch.Generator().manual_seed(0)
x, off = torch.randn(1, 8, 6, 7, generator=g), torch.randn(1, 36, 6, 7, generator=g)
m, w, b = torch.rand(1, 18, 6, 7, generator=g), torch.randn(4, 8, 3, 3, generator=g), torch.randn(4, generator=g)
z, e = torch.randn(10, 8, generator=g), torch.randn(6, 8, generator=g)
ref = deform_conv2d_reference(x, off, m, w, b, 1, 1, 1)
eager = kernels.modulated_deform_conv2d(x, off, m, w, b, 1, 1, 1)  # the interpreter, through triton_op's body
assert dispatch.LAUNCHES["modulated_deform_conv2d:triton"] == 1, dict(dispatch.LAUNCHES)
assert (eager - ref).abs().max() < 1e-5

def f(x, off, m, w, b, z, e):
    return kernels.modulated_deform_conv2d(x, off, m, w, b, 1, 1, 1), kernels.nearest_code(z, e)

compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
xg = x.clone().requires_grad_(True)
out, idx = compiled(xg, off, m, w, b, z, e)
out.sum().backward()
xr = x.clone().requires_grad_(True)
deform_conv2d_reference(xr, off, m, w, b, 1, 1, 1).sum().backward()
assert (out - ref).abs().max() < 1e-5 and torch.equal(idx, kernels.nearest_code_reference(z, e))
assert (xg.grad - xr.grad).abs().max() < 1e-5
xn, wn, bn = torch.randn(2, 16, 5, 7, generator=g), torch.randn(16, generator=g), torch.randn(16, generator=g)
gn_ref = kernels.group_norm_silu_reference(xn, wn, bn, 4, 1e-6)
with torch.no_grad():
    assert (kernels.group_norm_silu(xn, wn, bn, 4, 1e-6) - gn_ref).abs().max() < 1e-5
    assert dispatch.LAUNCHES["group_norm_silu:triton"] == 1, dict(dispatch.LAUNCHES)
    gn = torch.compile(lambda x: kernels.group_norm_silu(x, wn, bn, 4, 1e-6), backend="aot_eager", fullgraph=True)
    assert (gn(xn) - gn_ref).abs().max() < 1e-5
print("ok")
"""


@pytest.mark.skipif(not dispatch.triton_installed(), reason="triton_op needs triton")
@pytest.mark.skipif(dispatch.interpreter_problem() is not None, reason=str(dispatch.interpreter_problem()))
def test_triton_op_flavour_registers_runs_and_traces():
    """The ops as registered on a GPU machine (torch.library.triton_op): eager calls reach the kernel, and
    torch.compile traces the forward and its autograd formula (fullgraph). On a CPU the traced body takes the
    reference; on a GPU the same body records the Triton launches through wrap_triton."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("VQFR_KERNELS", None)
    res = subprocess.run([sys.executable, "-c", TRITON_OP_SCRIPT], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr[-3000:]


def test_an_interpreter_that_cannot_run_is_named_with_its_fix(monkeypatch):
    """Triton 3.6's interpreter breaks on numpy >= 2.4: auto mode falls back, forced mode says why and the fix."""
    import importlib.metadata

    versions = {"triton": "3.6.0", "numpy": "2.4.6"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dispatch.interpreter_problem.cache_clear()
    try:
        x = torch.ones(2, 2)
        reason = dispatch.why_not_triton(x)
        assert reason is not None and "triton >= 3.7 or numpy < 2.4" in reason
        if dispatch.triton_installed():
            with kernels.use("triton"), pytest.raises(RuntimeError, match="numpy < 2.4"):
                dispatch.use_triton("nearest_code", x)
        versions.update(triton="3.7.1")
        dispatch.interpreter_problem.cache_clear()
        assert dispatch.interpreter_problem() is None
        versions.update(triton="3.6.0", numpy="2.3.5")
        dispatch.interpreter_problem.cache_clear()
        assert dispatch.interpreter_problem() is None
    finally:
        dispatch.interpreter_problem.cache_clear()


def test_a_triton_older_than_the_floor_is_named_with_its_fix(monkeypatch):
    """Triton < 3.6 (below the [gpu] extra's floor) has other language and autotuner APIs: the kernels failed deep
    inside a launch. Auto mode now takes the fallback; forced mode says why and the upgrade."""
    import importlib.metadata

    versions = {"triton": "3.5.1", "numpy": "2.3.5"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    monkeypatch.setattr(dispatch, "triton_installed", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dispatch.triton_too_old.cache_clear()
    try:
        x = torch.ones(2, 2)
        reason = dispatch.why_not_triton(x)
        assert reason is not None and "triton 3.5.1 is older than 3.6" in reason and "pip install -U" in reason
        assert not dispatch.use_triton("nearest_code", x)  # auto: the reference
        with kernels.use("triton"), pytest.raises(RuntimeError, match="older than 3.6"):
            dispatch.use_triton("nearest_code", x)
        versions.update(triton="3.6.0")
        dispatch.triton_too_old.cache_clear()
        assert dispatch.triton_too_old() is None
    finally:
        dispatch.triton_too_old.cache_clear()


# (x, offset, mask, weight, bias) requiring grad
REQUIRES = {
    "only weight": (False, False, False, True, False),
    "only x": (True, False, False, False, False),
    "frozen weight and bias": (True, True, True, False, False),
    "only bias": (False, False, False, False, True),
    "all": (True,) * 5,
}


@pytest.mark.parametrize("requires", REQUIRES.values(), ids=REQUIRES.keys())
def test_autograd_asks_the_backward_op_for_the_needed_gradients_only(requires, monkeypatch):
    """The autograd formula passes ``ctx.needs_input_grad`` to the backward op as its output_mask (and does not call
    it when only the bias needs a gradient); it used to compute all four gradients whatever was needed."""
    calls = []
    backward_op = kernels.ops.deform_conv2d_backward_op

    def spy(*args):
        calls.append(None if len(args) < 9 else [bool(n) for n in args[8]])
        return backward_op(*args)

    monkeypatch.setattr(kernels.ops, "deform_conv2d_backward_op", spy)
    args = small_dcn(torch.float64)  # the reference forward and backward
    ours = [t.clone().requires_grad_(r) for t, r in zip(args, requires, strict=True)]
    ref = [t.clone().requires_grad_(r) for t, r in zip(args, requires, strict=True)]
    got = torch.autograd.grad(kernels.modulated_deform_conv2d(*ours, 1, 1, 1).square().sum(),
                              [t for t in ours if t.requires_grad])
    want = torch.autograd.grad(deform_conv2d_reference(*ref, 1, 1, 1).square().sum(),
                               [t for t in ref if t.requires_grad])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
    assert calls == ([list(requires[:4])] if any(requires[:4]) else [])


def test_backward_op_output_mask_matches_its_fake_kernel():
    """Gradients not asked for come back as empty tensors (a custom op cannot return None), in the fake kernel too."""
    x, offset, mask, weight, _ = small_dcn()
    args = (torch.randn(1, 4, 6, 7), x, offset, mask, weight, [1, 1], [1, 1], [1, 1], [False, True, True, False])
    real = torch.ops.vqfr.modulated_deform_conv2d_backward(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.vqfr.modulated_deform_conv2d_backward(*(mode.from_tensor(a) if isinstance(a, torch.Tensor)
                                                                 else a for a in args))
    assert [tuple(r.shape) for r in real] == [tuple(f.shape) for f in fake] == [(0,), offset.shape, mask.shape, (0,)]
    assert [r.dtype for r in real] == [f.dtype for f in fake]
    with pytest.raises(ValueError, match="output_mask"):
        torch.ops.vqfr.modulated_deform_conv2d_backward(*args[:8], [True, True])


def test_compiled_backward_with_a_frozen_weight():
    """torch.compile (AOTAutograd traces the autograd formula and the backward op's fake kernel) with the weight
    frozen: the gradients of x, offset and mask equal eager ones and the weight gets none."""
    args = small_dcn()

    def f(x, offset, mask, weight, bias):
        return kernels.modulated_deform_conv2d(x, offset, mask, weight, bias, 1, 1, 1).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (f, compiled):
        leaves = [t.clone().requires_grad_(i < 3) for i, t in enumerate(args)]
        fn(*leaves).backward()
        assert leaves[3].grad is None and leaves[4].grad is None
        results.append([t.grad for t in leaves[:3]])
    for eager, traced in zip(*results, strict=True):
        torch.testing.assert_close(traced, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("h,w", [(0, 5), (5, 0), (0, 0)])
def test_an_empty_image_with_padding_reads_zero_padding_on_every_path(h, w):
    """x with H = 0 or W = 0 and padding 2 gives a non-empty output (3x3 kernel) that reads zero padding only.
    torchvision returns the bias there (its bilinear reads are 0 outside the image), and so did the grid_sample
    forward and the Triton kernel, but the reference forward and backward raised RuntimeError "index -1 is out of
    bounds" (a gather from an empty image). Gradients: x's is empty, the others are zero."""
    gen = torch.Generator().manual_seed(1)
    ho, wo = h + 2, w + 2
    x = torch.randn(2, 4, h, w, generator=gen, dtype=torch.float64)
    offset = torch.randn(2, 18, ho, wo, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 9, ho, wo, generator=gen, dtype=torch.float64)
    weight, bias = torch.randn(3, 4, 3, 3, generator=gen, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    expected = bias.view(1, 3, 1, 1).expand(2, 3, ho, wo)
    assert torch.equal(deform_conv2d_reference(x, offset, mask, weight, bias, 1, 2, 1), expected)
    grads = deform_conv2d_backward_reference(torch.randn(2, 3, ho, wo, dtype=torch.float64), x, offset, mask,
                                              weight, 1, 2, 1)
    assert [tuple(g.shape) for g in grads] == [x.shape, offset.shape, mask.shape, weight.shape]
    assert all(not g.any() for g in grads)
    for mode, dtype in (("auto", torch.float32), ("auto", torch.float64), ("reference", torch.float32)):
        with kernels.use(mode):
            leaves = [t.to(dtype).clone().requires_grad_(True) for t in (x, offset, mask, weight, bias)]
            out = kernels.modulated_deform_conv2d(*leaves, 1, 2, 1)
            torch.testing.assert_close(out, expected.to(dtype), atol=0, rtol=0)
            out.sum().backward()
            assert not any(t.grad.any() for t in leaves[:4]) and leaves[0].grad.shape == x.shape
            torch.testing.assert_close(leaves[4].grad, torch.full((3,), 2.0 * ho * wo, dtype=dtype))


def non_finite_case():
    """small_dcn in float64 with infinite and NaN offsets at a few (pixel, tap) places, and the same inputs with those
    places masked out instead (finite offset, mask 0): torchvision reads 0 at an infinite position, so both give the
    same output. Returns (inputs, masked-out inputs, the places as a bool [1, 18, 6, 7] mask-shaped tensor)."""
    x, offset, mask, weight, bias = small_dcn(torch.float64)
    places = torch.zeros_like(mask, dtype=torch.bool)
    off = offset.clone()
    for (tap, y, xx), (dy, dx) in zip([(0, 2, 3), (4, 0, 0), (13, 5, 6), (17, 3, 1)],
                                      [(float("inf"), 0.3), (-0.2, float("-inf")), (float("nan"), 1.0),
                                       (0.5, float("nan"))], strict=True):
        places[0, tap, y, xx] = True
        off[0, 2 * tap, y, xx], off[0, 2 * tap + 1, y, xx] = dy, dx
    return (x, off, mask, weight, bias), (x, offset, mask.masked_fill(places, 0), weight, bias), places


def test_infinite_or_nan_offsets_read_zero_on_every_cpu_path():
    """An infinite offset puts the sample outside the image, where torchvision (and the Triton kernels) read 0. The
    reference computed its bilinear weights as inf - floor(inf) = NaN and returned NaN for the whole output pixel,
    forward and backward, and so did the grid_sample forward (the default float32 CPU path): a model whose fp16
    offset conv overflowed gave NaN on the CPU and finite values on the GPU. A NaN position (undefined in
    torchvision) reads 0 too, as in the Triton kernels."""
    (x, off, mask, weight, bias), masked, places = non_finite_case()
    expected = deform_conv2d_reference(*masked, 1, 1, 1)
    for mode, dtype in (("auto", torch.float32), ("reference", torch.float32), ("auto", torch.float64)):
        with kernels.use(mode):
            out = kernels.modulated_deform_conv2d(*(t.to(dtype) for t in (x, off, mask, weight, bias)), 1, 1, 1)
        torch.testing.assert_close(out, expected.to(dtype), atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0)
    assert dispatch.LAUNCHES["modulated_deform_conv2d:grid_sample"] == 1
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = deform_conv2d_backward_reference(grad_out, x, off, mask, weight, 1, 1, 1)
    want = deform_conv2d_backward_reference(grad_out, *masked[:4], 1, 1, 1)
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=0)  # x
    torch.testing.assert_close(got[3], want[3], atol=1e-12, rtol=0)  # weight
    # offset and mask: zero at the non-finite places (the output does not depend on them there), else unchanged.
    off_places = places.repeat_interleave(2, dim=1)
    assert not got[1][off_places].any() and not got[2][places].any()
    torch.testing.assert_close(got[1][~off_places], want[1][~off_places], atol=1e-12, rtol=0)
    torch.testing.assert_close(got[2][~places], want[2][~places], atol=1e-12, rtol=0)


def test_tensors_on_another_device_are_named():
    """A tensor on another device than x (or z) raises ValueError naming it. A meta tensor beside CPU ones used to
    return uninitialised memory: garbage indices from nearest_code, a garbage output from the deformable conv."""
    x, offset, mask, weight, bias = small_dcn()
    args = {"x": x, "offset": offset, "mask": mask, "weight": weight, "bias": bias}
    for name in ("offset", "mask", "weight", "bias"):
        moved = [t.to("meta") if n == name else t for n, t in args.items()]
        with pytest.raises(ValueError, match=f"{name} is on meta but x is on cpu"):
            kernels.modulated_deform_conv2d(*moved, 1, 1, 1)
        with pytest.raises(ValueError, match=f"{name} is on meta but x is on cpu"):
            torch.ops.vqfr.modulated_deform_conv2d(*moved, [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="grad_out is on meta but x is on cpu"):
        torch.ops.vqfr.modulated_deform_conv2d_backward(torch.empty(1, 4, 6, 7, device="meta"), x, offset, mask,
                                                        weight, [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="codebook is on meta but z is on cpu"):
        kernels.nearest_code(torch.randn(5, 8), torch.randn(6, 8, device="meta"))
    with pytest.raises(ValueError, match="codebook is on meta but z is on cpu"):
        torch.ops.vqfr.nearest_code(torch.randn(5, 8), torch.randn(6, 8, device="meta"))


@pytest.mark.parametrize("bad", [[1], [1, 1, 1]], ids=["one value", "three values"])
def test_ops_take_pairs_only(bad):
    """stride, padding and dilation are (h, w) pairs. Called directly, the ops raised IndexError on one value and
    silently dropped a third, in the real kernels and in the fake ones (tracing)."""
    x, offset, mask, weight, bias = small_dcn()
    grad_out = torch.randn(1, 4, 6, 7)
    for position, name in enumerate(("stride", "padding", "dilation")):
        conv = [[1, 1], [1, 1], [1, 1]]
        conv[position] = bad
        with pytest.raises(ValueError, match=re.escape(f"{name} must be a pair (h, w); got {bad}")):
            torch.ops.vqfr.modulated_deform_conv2d(x, offset, mask, weight, bias, *conv)
        with pytest.raises(ValueError, match=f"{name} must be a pair"):
            torch.ops.vqfr.modulated_deform_conv2d_backward(grad_out, x, offset, mask, weight, *conv)
        with FakeTensorMode() as mode:
            fakes = [mode.from_tensor(t) for t in (grad_out, x, offset, mask, weight, bias)]
            with pytest.raises(ValueError, match=f"{name} must be a pair"):
                torch.ops.vqfr.modulated_deform_conv2d(*fakes[1:], *conv)
            with pytest.raises(ValueError, match=f"{name} must be a pair"):
                torch.ops.vqfr.modulated_deform_conv2d_backward(*fakes[:5], *conv)


DCN_NAMES = ("x", "offset", "mask", "weight", "bias")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
@pytest.mark.parametrize("name", DCN_NAMES)
def test_a_non_floating_dcn_input_is_refused_on_every_path(name, dtype):
    """torchvision refuses integer tensors; the references and the ops computed with them (an integer x gave an int64
    output, an integer offset or weight was converted silently). Every entry point now raises TypeError naming the
    tensor, whatever implementation would run; the Triton path is checked in tests/test_kernels_triton.py."""
    args = dict(zip(DCN_NAMES, small_dcn(), strict=True))
    args[name] = args[name].to(dtype)
    pattern = f"{name} has dtype {dtype}.*floating-point.*{name}.float\\(\\)"
    conv = ([1, 1], [1, 1], [1, 1])
    for mode in ("auto", "reference"):  # auto: the grid_sample forward for float32
        with kernels.use(mode), pytest.raises(TypeError, match=pattern):
            kernels.modulated_deform_conv2d(*args.values(), 1, 1, 1)
    with pytest.raises(TypeError, match=pattern):
        deform_conv2d_reference(*args.values(), 1, 1, 1)
    with pytest.raises(TypeError, match=pattern):
        torch.ops.vqfr.modulated_deform_conv2d(*args.values(), *conv)
    backward_args = (torch.randn(1, 4, 6, 7), args["x"], args["offset"], args["mask"], args["weight"], *conv)
    if name != "bias":
        with pytest.raises(TypeError, match=pattern):
            torch.ops.vqfr.modulated_deform_conv2d_backward(*backward_args)
        with pytest.raises(TypeError, match=pattern):
            deform_conv2d_backward_reference(*backward_args[:5], 1, 1, 1)
    with FakeTensorMode() as fake_mode, pytest.raises(TypeError, match=pattern):  # tracing refuses too
        torch.ops.vqfr.modulated_deform_conv2d(*(fake_mode.from_tensor(t) for t in args.values()), *conv)
    assert not dispatch.LAUNCHES


def test_a_non_floating_grad_out_or_code_search_input_is_refused():
    """The same for the backward op's grad_out, and for nearest_code's tokens and codebook (the reference and the
    kernel converted an integer codebook and searched it)."""
    x, offset, mask, weight, _ = small_dcn()
    with pytest.raises(TypeError, match="grad_out has dtype torch.int64"):
        torch.ops.vqfr.modulated_deform_conv2d_backward(torch.ones(1, 4, 6, 7, dtype=torch.long), x, offset, mask,
                                                        weight, [1, 1], [1, 1], [1, 1])
    z, codebook = torch.randn(5, 8), torch.randn(6, 8)
    for name, args in (("z", (z.long(), codebook)), ("codebook", (z, codebook.int()))):
        pattern = f"nearest_code: {name} has dtype .*{name}.float\\(\\)"
        for mode in ("auto", "reference"):
            with kernels.use(mode), pytest.raises(TypeError, match=pattern):
                kernels.nearest_code(*args)
        with pytest.raises(TypeError, match=pattern):
            nearest_code_reference(*args)
        with pytest.raises(TypeError, match=pattern):
            torch.ops.vqfr.nearest_code(*args)
        with FakeTensorMode() as fake_mode, pytest.raises(TypeError, match=pattern):
            torch.ops.vqfr.nearest_code(*(fake_mode.from_tensor(t) for t in args))
    assert not dispatch.LAUNCHES


@pytest.mark.skipif(not dispatch.triton_installed(), reason="why_not_triton stops at 'not installed' first")
def test_why_not_triton_checks_every_tensor_not_only_the_first(monkeypatch):
    """It looked at the dtype of x (or z) only: a float64 offset, weight or codebook beside fp32 inputs was sent to
    the kernels, and an integer one too, when called directly. Every tensor is checked now and the reason names it;
    auto mode falls back (the reference computes in the dtype of x, as before), forced mode says why. Mixed dtypes
    the kernels support (an fp32 weight beside fp16 activations, as under autocast) stay on Triton."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if dispatch.interpreter_problem():
        pytest.skip(dispatch.interpreter_problem())
    x, offset, mask, weight, bias = small_dcn()
    assert kernels.why_not_triton(x=x, offset=offset, mask=mask, weight=weight, bias=bias) is None
    assert kernels.why_not_triton(x=x.half(), offset=offset, mask=mask.half(), weight=weight, bias=bias) is None
    assert kernels.why_not_triton(x, offset) is None  # positional tensors still work
    for name in ("offset", "mask", "weight", "bias"):
        args = {"x": x, "offset": offset, "mask": mask, "weight": weight, "bias": bias}
        args[name] = args[name].double()
        assert kernels.why_not_triton(**args) == f"{name} has dtype torch.float64, not one of float16, bfloat16, " \
                                                 "float32"
    assert kernels.why_not_triton(x, offset.long()) == "tensor 1 has dtype torch.int64, not one of float16, " \
                                                       "bfloat16, float32"
    assert "x is bfloat16" in kernels.why_not_triton(x=x.bfloat16(), weight=weight)

    out = kernels.modulated_deform_conv2d(x, offset.double(), mask, weight, bias, 1, 1, 1)  # auto: falls back
    torch.testing.assert_close(out, deform_conv2d_reference(x, offset, mask, weight, bias, 1, 1, 1), atol=1e-5,
                               rtol=0)
    z, codebook = torch.randn(10, 8), torch.randn(6, 8)
    assert torch.equal(kernels.nearest_code(z, codebook.double()), nearest_code_reference(z, codebook))
    assert dispatch.LAUNCHES == {"modulated_deform_conv2d:grid_sample": 1, "nearest_code:reference": 1}
    with kernels.use("triton"):
        with pytest.raises(RuntimeError, match="cannot run: offset has dtype torch.float64"):
            kernels.modulated_deform_conv2d(x, offset.double(), mask, weight, bias, 1, 1, 1)
        with pytest.raises(RuntimeError, match="cannot run: grad_out has dtype torch.float64"):
            torch.ops.vqfr.modulated_deform_conv2d_backward(torch.randn(1, 4, 6, 7, dtype=torch.float64), x, offset,
                                                            mask, weight, [1, 1], [1, 1], [1, 1])
        with pytest.raises(RuntimeError, match="cannot run: codebook has dtype torch.float64"):
            kernels.nearest_code(z, codebook.double())


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_backward_op_gets_grad_out_as_autograd_hands_it_over(channels_last, monkeypatch):
    """The autograd formula passed ``grad_out.contiguous()``: a copy of the whole output gradient for a model run
    channels-last (whose gradients are channels-last). Both backward implementations take any strides, so it now
    passes the tensor itself; the gradients and their layouts are those of a contiguous grad_out."""
    seen = []
    backward_op = kernels.ops.deform_conv2d_backward_op

    def spy(grad_out, *args):
        seen.append(grad_out)
        return backward_op(grad_out, *args)

    monkeypatch.setattr(kernels.ops, "deform_conv2d_backward_op", spy)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    args = [t.contiguous(memory_format=fmt) if t.dim() == 4 else t for t in small_dcn(torch.float64)]
    grad_out = torch.randn(1, 4, 6, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    results = []
    for g in (grad_out.contiguous(memory_format=fmt), grad_out.contiguous()):
        leaves = [t.clone().requires_grad_(True) for t in args]
        out = kernels.modulated_deform_conv2d(*leaves, 1, 1, 1)
        out.backward(g)
        assert seen[-1].data_ptr() == g.data_ptr() and seen[-1].stride() == g.stride()
        results.append([t.grad for t in leaves])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        assert got.stride() == want.stride()
    assert results[0][0].is_contiguous(memory_format=fmt)  # grad_x in the layout of x
