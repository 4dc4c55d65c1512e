"""What the ONNX exporter, its fp16 rewrite, its ``--check`` and the kernel switch promise, pinned where the other
test modules left a plausible bug unnoticed (found by planting bugs one at a time, docs/EXPORT.md, docs/KERNELS.md):

- ``export_onnx(precision="fp16")`` keeps every documented fp32 island in fp32 in the file it writes (the
  deformable convs, the code-prediction head), records one island per GroupNorm/DCN/Linear in its sidecar, writes
  no local stack traces, and records the opset it was asked for; an fp32 export claims no islands; a fixed-batch
  sidecar says its batch is fixed;
  ``convert_to_fp16(dcn_fp16=True)`` moves the deformable convs to fp16 and leaves no unused weight;
- ``--check`` fails NaN outputs, holds fp32 to ``FP32_TOLERANCE`` x max(1, peak) and fp16 to ``FP16_MIN_PSNR``
  exactly, and names the ``-o`` path, never the temporary file, when onnxruntime fails;
- ``export.compare`` measures PSNR on [0, 1] images clamped from [-1, 1], the max (not the mean) abs error, and
  refuses outputs whose shape differs from the reference's;
- ``VQFR_KERNELS`` is read as typed (spaces, capitals); CUDA tensors of every supported dtype take Triton (checked
  with fake CUDA tensors), float64 or a second device the reference; the fake nearest-code kernel
  declares the distance dtype the real one returns (float64 for float64 inputs), as torch.compile/export rely on.

The exports use the micro v2 of deploy.soak (16 px faces): one trace, about 20 s on 2 cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import kernels  # noqa: E402
from deploy.soak import MICRO_V2  # noqa: E402
from export import compare, fp16, source  # noqa: E402
from export import onnx as onnx_export  # noqa: E402
from kernels import dispatch  # noqa: E402
from vqfr.errors import ConfigError, EngineError  # noqa: E402
from vqfr.sidecar import read_sidecar  # noqa: E402

ir = pytest.importorskip("onnxscript").ir
_ENGINE = source.engine_module
OPSET = 20  # not the default, so a sidecar that records the default instead is caught


@pytest.fixture(scope="module")
def micro_exports(tmp_path_factory):
    """The micro v2 exported at opset 20 in fp32 (traced once) and in fp16 with ``--check`` (from the same trace,
    so the fp16 path of export_onnx runs as it does after tracing)."""
    folder = tmp_path_factory.mktemp("micro")
    fp32 = onnx_export.export_onnx(None, folder / "micro.onnx", config=MICRO_V2, random_weights=0, opset=OPSET)
    patch = pytest.MonkeyPatch()
    patch.setattr(onnx_export, "_trace", lambda model, spec, opset: ir.load(fp32))
    try:
        half = onnx_export.export_onnx(None, folder / "micro_fp16.onnx", config=MICRO_V2, random_weights=0,
                                       opset=OPSET, precision="fp16", check=True)
    finally:
        patch.undo()
    return {"fp32": fp32, "fp16": half}


def _float_inputs(node) -> list:
    return [v for v in node.inputs if v is not None and v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)]


def test_fp16_export_computes_the_deform_convs_and_code_prediction_in_fp32(micro_exports):
    """docs/EXPORT.md: every DeformConv (sampling coordinates) and v2's code-prediction Linear (near-tie logits: a
    flipped code changes a whole 32x32 patch) stay fp32 in ``--precision fp16``; ``--dcn-fp16`` is TensorRT's
    opt-in, not the exporter's default."""
    graph = ir.load(micro_exports["fp16"]).graph
    deform = [n for n in graph if n.op_type == "DeformConv"]
    prediction = [n for n in graph if n.metadata_props.get(fp16.FP32_KEY) == "code_prediction"]
    assert len(deform) == 4 and any(n.op_type == "MatMul" for n in prediction)
    for node in deform + prediction:
        assert all(v.dtype == ir.DataType.FLOAT for v in _float_inputs(node)), (node.op_type, node.name)
        assert all(v.dtype == ir.DataType.FLOAT for v in node.outputs if v.dtype is not None), node.name


def test_fp16_sidecar_counts_one_island_per_translated_op_and_fp32_claims_none(micro_exports):
    """``extra.fp32_islands`` is what a reader audits the fp16 rewrite by: one group_norm per GroupNorm (its
    InstanceNormalization), one deform_conv per DCN, one code_prediction, one layer_norm and the last conv; an fp32
    engine has no islands."""
    islands = read_sidecar(micro_exports["fp16"]).extra["fp32_islands"]
    graph = ir.load(micro_exports["fp32"]).graph
    assert islands["group_norm"] == sum(n.op_type == "InstanceNormalization" for n in graph) > 20
    assert islands["deform_conv"] == 4 and islands["code_prediction"] == 1 and islands["layer_norm"] == 1
    assert islands["last_conv"] == 1 and islands["ArgMax"] == 1
    assert read_sidecar(micro_exports["fp32"]).extra["fp32_islands"] == {}


def test_fp16_file_is_about_half_the_fp32_file(micro_exports):
    """Weights are stored in the precision of their readers: an fp16 engine that kept the fp32 originals beside
    their fp16 copies would be as large as the fp32 one."""
    assert micro_exports["fp16"].stat().st_size < 0.7 * micro_exports["fp32"].stat().st_size


def test_export_keeps_no_stack_traces_and_records_the_opset_asked_for(micro_exports):
    """Stack traces hold local paths (docs/EXPORT.md: dropped); the sidecar's opset is the file's, also when it is
    not the default, and the graph says which precision it holds."""
    import onnx

    for key in ("fp32", "fp16"):
        path = micro_exports[key]
        model = onnx.load(str(path))
        keys = {p.key for n in model.graph.node for p in n.metadata_props}
        assert "namespace" in keys and not keys & {"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node"}
        file_opset = {i.domain: i.version for i in model.opset_import}[""]
        assert file_opset == read_sidecar(path).opset == OPSET
        assert {p.key: p.value for p in model.metadata_props}["vqfr.precision"] == key



def test_convert_to_fp16_with_dcn_fp16_computes_the_deform_convs_in_fp16(micro_exports, tmp_path):
    """``convert_to_fp16(dcn_fp16=True)`` is documented to move the deformable convs out of their islands too (fp16
    in and out), leaves no unused weight behind, and the graph still restores the faces (>= 40 dB, as dcn_to_fp16's
    graphs must)."""
    from export.compare import psnr

    graph_model = ir.load(micro_exports["fp32"])
    fp16.convert_to_fp16(graph_model, dcn_fp16=True)
    deform = [n for n in graph_model.graph if n.op_type == "DeformConv"]
    assert len(deform) == 4
    # convert_to_fp16 itself (no optimizer after it here) drops the fp32 weights it replaced by fp16 copies
    assert [name for name, value in graph_model.graph.initializers.items() if not value.uses()] == []
    for node in deform:
        assert all(v.dtype == ir.DataType.FLOAT16 for v in [*_float_inputs(node), node.outputs[0]]), node.name
    path = tmp_path / "dcn16.onnx"
    ir.save(graph_model, path)
    model = source.load_source_model(None, MICRO_V2, 0)
    inputs = source.check_inputs(source.export_spec(model))
    with torch.no_grad():
        reference = source.engine_module(model)(*inputs)
    assert psnr(onnx_export.run_onnxruntime(path, inputs, ["input", "fidelity"]), reference) >= 40.0

def test_the_newest_opset_the_installed_onnx_defines_is_not_refused(tmp_path, monkeypatch):
    """``--opset`` runs up to the installed onnx's newest opset; only beyond it is the request refused."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    asked = []

    def trace(model, spec, opset):
        asked.append(opset)
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(onnx_export, "_trace", trace)
    with pytest.raises(ConfigError, match="stopped by the test"):
        onnx_export.export_onnx(None, tmp_path / "m.onnx", config=MICRO_V2, random_weights=0, opset=newest)
    assert asked == [newest]



def test_sidecar_of_a_fixed_batch_export_says_its_batch_is_fixed(micro):
    """A ``--batch 2`` engine's sidecar says so in both places a reader looks: batch 2 in the shapes and
    ``dynamic_batch`` false (it said true for every export)."""
    from export import metadata

    model, _ = micro
    meta = metadata.engine_meta(model, source.export_spec(model, batch=2), precision="fp32", weights=None,
                                random_weights=0, opset=OPSET)
    assert meta.extra["dynamic_batch"] is False and meta.inputs[0].shape[0] == 2 and meta.outputs[0].shape[0] == 2
    dynamic = metadata.engine_meta(model, source.export_spec(model), precision="fp32", weights=None,
                                   random_weights=0, opset=OPSET)
    assert dynamic.extra["dynamic_batch"] is True and dynamic.inputs[0].shape[0] == -1

# ------------------------------------------------------------------------------------------------------- --check
@pytest.fixture(scope="module")
def micro():
    model = source.load_source_model(None, MICRO_V2, 0)
    return model, source.export_spec(model)


def _check(monkeypatch, micro, precision, error, scale=1.0):
    """check_onnx on the micro v2 with onnxruntime replaced by the PyTorch output plus ``error(output)``, the model's
    output multiplied by ``scale`` on both sides."""
    model, spec = micro

    class Scaled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(*inputs) * scale

    engine = _ENGINE
    monkeypatch.setattr(onnx_export.source, "engine_module", lambda m: Scaled(engine(m)))

    def fake_ort(path, inputs, names):
        with torch.no_grad():
            y = Scaled(engine(model))(*inputs).numpy()
        return (y + error(y)).astype(np.float32)

    monkeypatch.setattr(onnx_export, "run_onnxruntime", fake_ort)
    return onnx_export.check_onnx("m.onnx", model, spec, precision)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_check_fails_an_engine_that_outputs_nan(precision, micro, monkeypatch):
    """A NaN compares false with every bound: written as ``max_abs > tolerance`` the check passed a graph whose
    output is NaN (a broken fp16 engine's typical symptom)."""
    def nan_one_pixel(y):
        e = np.zeros_like(y)
        e[0, 0, 0, 0] = np.nan
        return e

    with pytest.raises(EngineError, match="differs from PyTorch|too far from PyTorch"):
        _check(monkeypatch, micro, precision, nan_one_pixel)


def test_fp32_check_tolerance_is_exactly_1e4_times_the_peak_above_one(micro, monkeypatch):
    """fp32 must be within FP32_TOLERANCE max abs, scaled by the output's peak only when that exceeds 1: a single
    pixel off by 1.5x the bound fails at unit scale, and 0.8x the scaled bound passes at a peak of about 4."""
    tol = onnx_export.FP32_TOLERANCE
    model, spec = micro
    with torch.no_grad():
        peak = float(source.engine_module(model)(*source.check_inputs(spec)).abs().max())
    scale = 1.0 / peak if peak > 1 else 1.0  # a peak <= 1: the bound is FP32_TOLERANCE itself

    def spike(size):
        def error(y):
            e = np.zeros_like(y)
            e[0, 0, 3, 5] = size
            return e
        return error

    with pytest.raises(EngineError, match="fp32 tolerance 0.0001"):
        _check(monkeypatch, micro, "fp32", spike(1.5 * tol), scale=scale)
    big = 4.0 / peak
    result = _check(monkeypatch, micro, "fp32", spike(0.8 * tol * 4.0), scale=big)
    assert result.max_abs == pytest.approx(0.8 * tol * 4.0, rel=1e-2)


def test_fp16_check_holds_45_db_and_says_to_export_fp32(micro, monkeypatch):
    """An fp16 engine at about 42 dB is below the documented 45 dB and must fail, with the fix the user can apply."""
    rng = np.random.default_rng(0)
    result = _check(monkeypatch, micro, "fp16", lambda y: 0.008 * rng.standard_normal(y.shape))  # 0.004 on [0, 1]
    assert onnx_export.FP16_MIN_PSNR <= result.psnr_db < 50
    with pytest.raises(EngineError, match=r"needs >= 45.0 dB") as info:
        _check(monkeypatch, micro, "fp16", lambda y: 0.016 * rng.standard_normal(y.shape))  # about 42 dB
    assert "--precision fp32" in info.value.fix


def test_onnxruntime_failure_names_the_output_not_the_temporary_file(micro, monkeypatch):
    """onnxruntime puts the path it loaded into its messages; the exporter checks a temporary file, so the message
    must show the ``-o`` path instead (the temporary file is gone when the user reads it)."""
    ort = pytest.importorskip("onnxruntime")
    model, spec = micro
    temporary = "/tmp/out/.m.onnx.1a2b.partial.onnx"

    def broken(path, inputs, names):
        raise ort.capi.onnxruntime_pybind11_state.InvalidGraph(f"Load model from {path} failed: bad node")

    monkeypatch.setattr(onnx_export, "run_onnxruntime", broken)
    with pytest.raises(EngineError, match=r"Load model from /tmp/out/m.onnx failed") as info:
        onnx_export.check_onnx(temporary, model, spec, "fp32", name="/tmp/out/m.onnx")
    assert ".partial" not in str(info.value)


# ---------------------------------------------------------------------------------------------- export.compare
def test_psnr_is_measured_on_clamped_zero_to_one_images():
    """An error of 0.02 in [-1, 1] space is 0.01 on the [0, 1] image the user sees: 40 dB (not 34, nor 80); a
    difference beyond +-1 is clamped away as to_images does."""
    ref = np.zeros((1, 3, 8, 8))
    assert compare.psnr(ref + 0.02, ref) == pytest.approx(40.0, abs=1e-6)
    assert compare.psnr(np.full((1, 3, 8, 8), 1.5), np.ones((1, 3, 8, 8))) == float("inf")


def test_agreement_reports_the_largest_error_and_refuses_other_shapes():
    """max_abs is the worst pixel (a single bad pixel must not be averaged away), and an output of another batch or
    size is an error, not broadcast against the reference."""
    ref = np.zeros((2, 3, 4, 4))
    out = ref.copy()
    out[1, 2, 3, 3] = 0.5
    assert compare.agreement(out, ref).max_abs == 0.5
    with pytest.raises(ValueError, match="shape"):
        compare.agreement(np.zeros((1, 3, 4, 4)), ref)


# ---------------------------------------------------------------------------------------------- kernels.dispatch
@pytest.mark.parametrize("value", [" reference ", "Reference", "REFERENCE\n"])
def test_kernel_mode_from_the_environment_ignores_case_and_spaces(value, monkeypatch):
    """``VQFR_KERNELS=Reference`` (or with a stray space from a shell script) is the reference mode, as documented,
    not a ValueError in the middle of a restore."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("VQFR_KERNELS", value)
    assert kernels.active_mode() == "reference"


@pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed (extra 'gpu')")
def test_cuda_tensors_of_every_supported_dtype_take_triton(monkeypatch):
    """On a GPU the kernels take float16, bfloat16 (AMP bf16 training) and float32; a float64 tensor anywhere or a
    tensor on another device takes the reference. Fake CUDA tensors check the choice without a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.delenv("VQFR_KERNELS", raising=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = {dtype: torch.empty(1, 8, 6, 7, device="cuda", dtype=dtype)
             for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
        weight = torch.empty(4, 8, 3, 3, device="cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert kernels.why_not_triton(x=x[dtype], weight=weight) is None, dtype
    assert "float64" in kernels.why_not_triton(x=x[torch.float32], weight=weight.double())
    assert "several devices" in kernels.why_not_triton(x=x[torch.float16], weight=torch.empty(4, 8, 3, 3))
    dispatch.LAUNCHES.clear()
    assert dispatch.use_triton("modulated_deform_conv2d", x=x[torch.bfloat16], weight=weight)
    assert dispatch.LAUNCHES == {"modulated_deform_conv2d:triton": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_fake_nearest_code_kernel_declares_what_the_op_returns(dtype):
    """torch.compile and torch.export allocate by the fake kernel: the distance of a float64 search is float64 in
    eager, so a fake that always said float32 gave a traced float64 model the wrong output dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import kernels.ops  # noqa: F401 - registers torch.ops.vqfr.*

    z, codebook = torch.randn(5, 4, dtype=dtype), torch.randn(7, 4, dtype=dtype)
    idx, dist = torch.ops.vqfr.nearest_code(z, codebook)
    with FakeTensorMode() as mode:
        fake_idx, fake_dist = torch.ops.vqfr.nearest_code(mode.from_tensor(z), mode.from_tensor(codebook))
    assert (fake_idx.dtype, fake_dist.dtype, tuple(fake_dist.shape)) == (idx.dtype, dist.dtype, tuple(dist.shape))
    assert dist.dtype == dtype
