"""Tests found missing by mutation testing of kernels/, export/ and deploy/{measure,report,baselines}.py.

Each test pins a behaviour that a plausible bug left untested: a boundary rule of the bilinear reads, the default
mask, exact-tie and multi-block cases of the nearest-code search, fp32 accumulation of the fp16 deformable conv, the
general geometry of the ONNX DeformConv translation, and the statistics and files of the benchmark. Tiny shapes, CPU
(the Triton kernels under the interpreter), seconds; optional dependencies are skipped cleanly.
"""

from __future__ import annotations

import copy
import json
import math
import time
import types

import numpy as np
import pytest
import torch

import kernels
import kernels.ops  # noqa: F401  (registers torch.ops.vqfr.*)
from kernels import dispatch
from kernels.deform_conv import (
    deform_conv2d_backward_reference,
    deform_conv2d_reference,
)
from kernels.nearest_code import nearest_code_reference
from tests.conftest import deform_inputs, export_onnx_program

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def _case(c, h, w, groups, k, *, stride=1, padding=1, dilation=1, spread=1.5, c_out=5, b=1, seed=0):
    return deform_inputs(c, h, w, groups, k, stride, padding, dilation, spread=spread, c_out=c_out, b=b, seed=seed)


# --- the torch paths ----------------------------------------------------------------------------------------------


def test_a_sample_exactly_on_the_top_border_has_zero_offset_gradient():
    """torchvision's rule: a point with y <= -1 reads 0, with zero gradient. At y == -1 exactly the bottom corners
    (row 0) have weight 0 but a non-zero derivative, so a bound of ``y >= -1`` instead of ``y > -1`` would push the
    sample into the image. Same on the left border (x == -1)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 4, 5, generator=gen, dtype=torch.float64) + 3.0
    weight = torch.randn(3, 2, 1, 1, generator=gen, dtype=torch.float64)
    offset = torch.zeros(1, 2, 4, 5, dtype=torch.float64)
    offset[0, 0, 0, 2], offset[0, 1, 0, 2] = -1.0, 0.25  # pixel (0, 2) samples (-1, 2.25)
    offset[0, 0, 2, 0], offset[0, 1, 2, 0] = 0.5, -1.0  # pixel (2, 0) samples (2.5, -1)
    mask = torch.ones(1, 1, 4, 5, dtype=torch.float64)
    grad_out = torch.randn(1, 3, 4, 5, generator=gen, dtype=torch.float64)
    out = deform_conv2d_reference(x, offset, mask, weight)
    assert not out[0, :, 0, 2].any() and not out[0, :, 2, 0].any()
    _, grad_offset, grad_mask, _ = deform_conv2d_backward_reference(grad_out, x, offset, mask, weight)
    assert not grad_offset[0, :, 0, 2].any() and not grad_offset[0, :, 2, 0].any()
    assert not grad_mask[0, 0, 0, 2] and not grad_mask[0, 0, 2, 0]
    # autograd through the reference's forward agrees
    leaf = offset.clone().requires_grad_(True)
    deform_conv2d_reference(x, leaf, mask, weight).backward(grad_out)
    assert not leaf.grad[0, :, 0, 2].any() and not leaf.grad[0, :, 2, 0].any()


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_no_mask_means_a_mask_of_ones(mode, monkeypatch):
    """``mask=None`` is documented as all ones (plain DCNv1): forward and every gradient equal an explicit ones mask."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("VQFR_KERNELS", raising=False)
    x, offset, _, weight, bias = _case(8, 6, 7, 2, 3, seed=1)
    ones = torch.ones(1, 2 * 9, 6, 7)
    with kernels.use(mode):
        leaves = [t.clone().requires_grad_(True) for t in (x, offset, weight, bias)]
        out = kernels.modulated_deform_conv2d(leaves[0], leaves[1], None, leaves[2], leaves[3], 1, 1, 1)
        out.square().sum().backward()
    expected = deform_conv2d_reference(x.double(), offset.double(), ones.double(), weight.double(), bias.double(),
                                       1, 1, 1)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    ref_leaves = [t.double().requires_grad_(True) for t in (x, offset, weight, bias)]
    deform_conv2d_reference(ref_leaves[0], ref_leaves[1], ones.double(), ref_leaves[2], ref_leaves[3],
                            1, 1, 1).square().sum().backward()
    for ours, ref in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=1e-4, rtol=1e-4)


def test_float16_on_the_cpu_takes_the_reference_not_grid_sample(monkeypatch):
    """grid_sample's fp16 coordinates would be off by up to 0.25 px at 512: only float32 takes that forward."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("VQFR_KERNELS", raising=False)
    x, offset, mask, weight, bias = _case(4, 5, 6, 1, 3, seed=2)
    dispatch.LAUNCHES.clear()
    kernels.modulated_deform_conv2d(*[t.half() for t in (x, offset, mask, weight, bias)], 1, 1, 1)
    assert dispatch.LAUNCHES == {"modulated_deform_conv2d:reference": 1}


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "on"])
def test_triton_interpret_is_read_as_triton_reads_it(value, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert dispatch.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.interpreting()


def test_exact_ties_go_to_the_lowest_index_on_the_reference(monkeypatch):
    """Integer codes and tokens make every distance exact, so these are true ties (the existing tie test's
    duplicated rows differ by a rounding of the matmul: their distances are -3.8e-6 and 0)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("VQFR_KERNELS", raising=False)
    gen = torch.Generator().manual_seed(7)
    codebook = torch.randint(-3, 4, (24, 8), generator=gen).float()
    codebook[13] = codebook[5]
    codebook[21] = codebook[5]
    codebook[9] = codebook[2] + 2  # z = codebook[2] + 1 is as far from both (distance 8)
    codebook[19] = codebook[2] + 2
    z = torch.stack([codebook[5], codebook[2] + 1, codebook[21]])
    dist_all = ((z[:, None].double() - codebook[None].double()) ** 2).sum(-1)
    assert dist_all[0, 5] == dist_all[0, 13] == dist_all[0, 21] == 0
    expected = [5, int(dist_all[1].argmin()), 5]  # torch.argmin on exact float64 distances: the first minimum
    assert expected[1] in (2, 9)
    assert nearest_code_reference(z, codebook).tolist() == expected
    assert kernels.nearest_code(z, codebook).tolist() == expected
    assert nearest_code_reference(z.half(), codebook.half()).tolist() == expected


# --- the Triton kernels (natively on a GPU, else under the interpreter) -------------------------------------------

needs_triton = pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed (extra 'gpu')")


@needs_triton
def test_triton_nearest_code_distances_span_several_dim_blocks(triton_path):
    """D = 80 spans several BLOCK_D tiles (32 under the interpreter): |z|^2 and |e|^2 must sum over all of them.
    |z|^2 does not change the argmin, so only the returned distance shows a |z|^2 taken from one tile."""
    gen = torch.Generator().manual_seed(8)
    codebook = torch.randn(50, 80, generator=gen)
    truth = torch.randint(0, 50, (40,), generator=gen)
    z = codebook[truth] + 0.3 * torch.randn(40, 80, generator=gen)
    idx, dist = kernels.nearest_code(z.to(DEVICE), codebook.to(DEVICE), return_distance=True)
    ref_idx, ref_dist = nearest_code_reference(z.double(), codebook.double(), return_distance=True)
    assert torch.equal(idx.cpu(), truth) and torch.equal(ref_idx, truth)
    torch.testing.assert_close(dist.cpu().double(), ref_dist, atol=1e-3, rtol=1e-5)
    assert dispatch.LAUNCHES["nearest_code:triton"] == 1


@needs_triton
def test_triton_fp16_deform_conv_accumulates_in_fp32_and_rounds_once(triton_path):
    """The kernel's contract: fp32 accumulation, the output rounded once to fp16. With small integers (integer
    offsets, unit mask) every product and partial sum is exact in fp32, so the fp16 output must be exactly the
    fp16 rounding of the exact result; an fp16 accumulator rounds its partial sums (spacing 2 to 8 above 2048)."""
    gen = torch.Generator().manual_seed(9)
    c, h, w = 64, 6, 7
    x = torch.randint(0, 8, (1, c, h, w), generator=gen).float()
    offset = torch.randint(-1, 2, (1, 2 * 9, h, w), generator=gen).float()
    mask = torch.ones(1, 9, h, w)
    weight = torch.randint(1, 4, (3, c, 3, 3), generator=gen).float()
    bias = torch.randint(-5, 6, (3,), generator=gen).float()
    exact = deform_conv2d_reference(*(t.double() for t in (x, offset, mask, weight, bias)), 1, 1, 1)
    assert exact.abs().max() > 4096  # partial sums well above fp16's exact-integer range
    out = kernels.modulated_deform_conv2d(*(t.to(DEVICE, torch.float16) for t in (x, offset, mask, weight, bias)),
                                          1, 1, 1)
    assert out.dtype == torch.float16 and dispatch.LAUNCHES["modulated_deform_conv2d:triton"] == 1
    assert torch.equal(out.cpu(), exact.half())


# --- ONNX translation ---------------------------------------------------------------------------------------------


class _GeometryProbe(torch.nn.Module):
    def __init__(self, stride, padding, dilation):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(4, 6, 3, 3, generator=gen) * 0.2)
        self.bias = torch.nn.Parameter(torch.randn(4, generator=gen))
        self.conv = (stride, padding, dilation)

    def forward(self, x, offset, mask):
        return kernels.modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, *self.conv)


def test_deform_conv_translation_keeps_unequal_stride_padding_and_dilation(tmp_path):
    """VQFR's DCNs are stride 1, padding 1, dilation 1, but the translation is general: ONNX wants pads as
    [top, left, bottom, right] and (h, w) strides and dilations. Unequal h and w values tell each order apart."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from export.onnx import run_onnxruntime

    stride, padding, dilation = (2, 1), (1, 2), (1, 2)
    x, offset, mask, _, _ = _case(6, 7, 8, 2, 3, stride=stride, padding=padding, dilation=dilation, spread=2.0,
                                  seed=4)
    probe = _GeometryProbe(stride, padding, dilation).eval()
    path = export_onnx_program(probe, (x, offset, mask), tmp_path / "dcn.onnx")
    with torch.no_grad():
        expected = probe(x, offset, mask).numpy()
    got = run_onnxruntime(path, (x, offset, mask), ["x", "offset", "mask"])
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_nearest_code_translation_returns_the_distance_of_the_chosen_code(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")

    class Probe(torch.nn.Module):
        def forward(self, z, codebook):
            idx, dist = kernels.nearest_code(z, codebook, return_distance=True)
            return idx, dist

    gen = torch.Generator().manual_seed(5)
    z, codebook = torch.randn(9, 6, generator=gen), torch.randn(12, 6, generator=gen)
    path = export_onnx_program(Probe().eval(), (z, codebook), tmp_path / "nearest.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    idx, dist = session.run(None, {"z": z.numpy(), "codebook": codebook.numpy()})
    ref_idx, ref_dist = nearest_code_reference(z, codebook, return_distance=True)
    assert idx.tolist() == ref_idx.tolist()
    np.testing.assert_allclose(dist, ref_dist.numpy(), atol=1e-5, rtol=1e-5)


def test_trt_check_sample_feed_spans_both_fidelity_branches():
    """``--check`` feeds its samples with fidelities from 0 to 1 (texture-only branch and full branch)."""
    from export.trt import _check_feeds

    meta = types.SimpleNamespace(takes_fidelity=True)
    samples = [np.zeros((3, 32, 32), np.float32), np.ones((3, 32, 32), np.float32)]
    feeds = _check_feeds(meta, 3, 32, samples)
    assert feeds["sample"]["input"].shape == (3, 3, 32, 32)
    assert feeds["sample"]["fidelity"].tolist() == [0.0, 0.5, 1.0]
    assert feeds["random"]["fidelity"].shape == (3,)


# --- deploy: measure, report, baselines ---------------------------------------------------------------------------


def test_percentile_interpolates_linearly_between_ranks():
    from deploy.measure import percentile

    values = [5.0, 1.0, 4.0, 2.0, 3.0]  # unsorted on purpose
    assert percentile(values, 0.0) == 1.0 and percentile(values, 1.0) == 5.0
    assert percentile(values, 0.5) == 3.0
    assert percentile(values, 0.1) == pytest.approx(1.4)
    assert percentile(values, 0.9) == pytest.approx(4.6)
    assert percentile([7.0], 0.9) == 7.0
    assert percentile([10.0, 20.0], 0.25) == pytest.approx(12.5)


def test_time_calls_first_s_is_the_first_calls_time():
    from deploy.measure import time_calls

    timing = time_calls(lambda i: time.sleep(0.05 if i == 0 else 0.0), warmup=3, iters=2,
                        device=torch.device("cpu"))
    assert timing.first_s >= 0.05 and max(timing.ms) < 50


def test_time_calls_never_times_more_calls_than_asked():
    from deploy.measure import time_calls

    slow = time_calls(lambda i: time.sleep(0.01), warmup=1, iters=2, device=torch.device("cpu"), row_seconds=0.001)
    assert len(slow.ms) == 2


def test_compare_outputs_with_an_infinite_output_has_zero_psnr():
    from deploy.measure import compare_outputs

    ref = torch.zeros(1, 3, 4, 4)
    out = ref.clone()
    out[0, 1, 2, 3] = math.inf
    assert compare_outputs([out], [ref]) == (math.inf, 0.0)


def test_compare_outputs_with_a_nan_output_is_not_reported_as_exact():
    """max(0.0, nan) is 0.0: a backend whose output held NaN (an fp16 overflow) showed max abs err 0 and PSNR nan."""
    from deploy.measure import compare_outputs

    ref = torch.zeros(1, 3, 4, 4)
    out = ref.clone()
    out[0, 0, 0, 0] = math.nan
    err, psnr_db = compare_outputs([out], [ref])
    assert err == math.inf and psnr_db == 0.0


def test_results_json_is_strict_json_and_round_trips_every_non_finite_float(tmp_path):
    from deploy import report

    rows = [{"backend": "x", "precision": "fp16", "batch": 1, "median_ms": 1.0, "max_abs_err": math.nan,
             "psnr_db": -math.inf, "speedup": math.inf}]
    path = report.write_json(tmp_path / "r.json", {}, rows)

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    json.loads(path.read_text(), parse_constant=refuse)  # NaN / Infinity tokens are not JSON
    _, back = report.load(path)
    assert math.isnan(back[0]["max_abs_err"]) and back[0]["psnr_db"] == -math.inf and back[0]["speedup"] == math.inf


def test_markdown_keeps_a_column_filled_in_a_later_row_and_rows_without_what():
    from deploy import report

    rows = [{"backend": "a", "precision": "fp32", "batch": 1, "median_ms": 1.0},  # no "what": a forward row
            {"backend": "b", "precision": "fp16", "batch": 1, "median_ms": 2.0, "peak_mem_mb": 12.0}]
    table = report.markdown_table(rows)
    assert "peak MB" in table and "| 12 |" in table
    text = report.markdown({}, rows)
    assert "## Model forward" in text and "| a |" in text and "| b |" in text


def test_eager_baseline_uses_per_image_fidelities_and_leaves_the_model_alone():
    import vqfr
    from deploy.baselines import EagerBaseline, seeded_weights_
    from tests.conftest import TINY_V2

    model = seeded_weights_(vqfr.build_model(copy.deepcopy(TINY_V2)), 0).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    f = torch.tensor([0.0, 1.0])
    with torch.no_grad(), kernels.use("reference"):
        expected = torch.cat([model(x[:1], fidelity=0.0), model(x[1:], fidelity=1.0)])
    out = EagerBaseline(model, torch.device("cpu"), "fp32").infer(x, f)
    # 1e-4, the parity tolerance: a batch of 2 and two batches of 1 take different conv paths (1.03e-5 was seen);
    # a swapped or shared fidelity moves the output by far more
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    EagerBaseline(model, torch.device("cpu"), "bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the caller's model is not cast
