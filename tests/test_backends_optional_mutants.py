"""What mutation testing of the backend table (``vqfr/backends/base.py``), the onnxruntime and TensorRT backends and the
optional-import helper (``vqfr/_optional.py``) found unchecked: the table's full documented order (``aoti[cuda]`` above
``torch[cuda]``), ``.plan`` files going to TensorRT, a device that only starts like ``cuda`` refused, an in-memory
module handed to a file backend named as one, the ``--list-backends`` row format, the two reasons for "no CUDA",
:func:`~vqfr.backends.base.pad_batch` repeating the last face and fidelity (an empty batch left alone), a dynamic-size
engine taking the runtime's face size and a batch-1 engine getting one face a call; onnxruntime's reasons per row (the
``gpu`` extra and onnxruntime-gpu for the GPU providers, reinstalling for the CPU one, TensorRT for the TensorRT EP, a
visible GPU), a session failing on CUDA/TensorRT reported as the backend and not the file, the CUDA EP's provider list,
``$VQFR_TRT_CACHE``, the output the sidecar names in a multi-output graph, a sidecar whose input shapes are not the
graph's refused; TensorRT listed usable before any engine is named, a sidecar without a compute capability accepted on
any GPU, version compatibility compared down to the patch release, and at load (on a stand-in tensorrt) the GPU check,
fp32 refused for an fp16 engine, inputs checked against the sidecar, fp16 tensors fed and returned as fp16, and padding
only to the profile's minimum; and the pip extra each optional package's ImportError names (submodules by their package,
``dev`` for the rest). Expected values are written out in each test (the table as docs/DESIGN.md lists it, the extras as
pyproject.toml lists them, hand-made graphs and tensors, stand-in CUDA and TensorRT), on the CPU."""

from __future__ import annotations

import dataclasses
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from tests.test_backends_cli_behaviours import _scale_graph
from tests.test_export_trt import _FakeContext, _FakeEngine, _FakeRuntime, _trt_meta, install_fake_tensorrt
from vqfr.backends.base import (
    BACKENDS,
    MODULE,
    Availability,
    availability,
    candidates,
    cuda_missing,
    engine_kind,
    pad_batch,
)
from vqfr.errors import BackendUnavailable, EngineError
from vqfr.sidecar import EngineMeta, TensorSpec


def _meta(**built_with) -> EngineMeta:
    return EngineMeta(arch="VQFRv2", options={}, face_size=16, precision="fp32",
                      inputs=(TensorSpec("input", (-1, 3, 16, 16)), TensorSpec("fidelity", (-1,))),
                      outputs=(TensorSpec("output", (-1, 3, 16, 16)),), built_with=built_with)


# ----------------------------------------------------------------------------------------------- the table
def test_the_table_is_in_the_order_docs_design_lists_fastest_first():
    """``backend="auto"`` takes the first usable row, so the order is the choice; docs/DESIGN.md ("Choosing a
    backend") lists it row by row, with ``aoti[cuda]`` ranked above ``torch[cuda]`` by design."""
    assert [e.label for e in BACKENDS] == [
        "tensorrt", "onnxruntime[TensorRT EP]", "onnxruntime[CUDA EP]", "aoti[cuda]", "torch[cuda]",
        "onnxruntime[CPU]", "aoti[cpu]", "torch[cpu]"]
    assert [e.label for e in candidates(".pt2", device="cuda")] == ["aoti[cuda]"]


def test_plan_files_are_tensorrt_engines_like_engine_files():
    """trtexec writes ``.plan`` as often as ``.engine``; both (in any case) go to TensorRT and only to it."""
    assert engine_kind("model.PLAN") == ".plan"
    for name in ("model.plan", "model.engine"):
        assert [e.label for e in candidates(engine_kind(name))] == ["tensorrt"]


@pytest.mark.parametrize("device", ["cuda0", "cudax", "cuda-1", "cuda:x", "cuda:", "cuda:-1", "cuda:01"])
def test_a_device_that_only_starts_like_cuda_is_refused_by_name(device):
    """``cuda:N`` is a device; ``cuda0`` (a missing colon) or ``cuda:x`` is a typo, refused with the valid forms
    rather than matching no row, or (a defect, fixed) passing here and failing later on a GPU machine as torch's
    bare "Invalid device string" RuntimeError."""
    with pytest.raises(BackendUnavailable, match=rf"unknown device '{device}'.*auto, cuda, cpu or cuda:N"):
        candidates(".onnx", device=device)
    with pytest.raises(BackendUnavailable, match="unknown device"):
        candidates(None, device=device)


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1", "cuda:12"])
def test_a_cuda_device_with_an_index_takes_the_cuda_rows(device):
    assert [e.label for e in candidates(".onnx", device=device)] == ["onnxruntime[TensorRT EP]", "onnxruntime[CUDA EP]"]
    assert torch.device(device).index == int(device[5:])  # the form torch takes


def test_an_in_memory_module_for_a_file_backend_is_named_as_a_module_with_the_backend_that_takes_it():
    """A model object passed with ``backend="onnxruntime"`` is not a file: the error says it is an in-memory
    nn.Module (not "nn.Module files") and that the torch backend, on either device, loads one."""
    assert engine_kind(nn.Identity()) == engine_kind(None) == MODULE
    with pytest.raises(BackendUnavailable) as err:
        candidates(engine_kind(nn.Identity()), "onnxruntime")
    assert err.value.reason == "backend=onnxruntime on device=auto cannot load an in-memory nn.Module"
    assert err.value.fix.startswith("backends that load an in-memory nn.Module: torch (cuda, cpu); ")


def test_each_row_of_the_backend_list_says_yes_with_its_note_or_no_with_its_reason():
    """``--list-backends`` prints one row per backend: the label padded to 26 columns, then "yes" and the note
    (the version found) or "no " and the reason; a usable row without a note ends after "yes"."""
    torch_cpu, tensorrt = BACKENDS[-1], BACKENDS[0]
    assert str(Availability(torch_cpu, True, "", "torch 2.13")) == "torch[cpu]" + " " * 16 + " yes  torch 2.13"
    assert str(Availability(tensorrt, False, "no CUDA", "")) == "tensorrt" + " " * 18 + " no   no CUDA"
    assert str(Availability(torch_cpu, True)) == "torch[cpu]" + " " * 16 + " yes"


@pytest.mark.parametrize("build_cuda, expected", [
    (None, f"no CUDA: this torch ({torch.__version__}) is a CPU-only build"),
    ("12.8", "no CUDA GPU visible (torch.cuda.is_available() is False)"),
])
def test_no_cuda_says_whether_torch_is_a_cpu_build_or_no_gpu_is_visible(monkeypatch, build_cuda, expected):
    """The two causes have different fixes (install a CUDA build of torch, or check the driver and
    CUDA_VISIBLE_DEVICES), so each must get its own reason; with a GPU visible there is none."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", build_cuda)
    assert cuda_missing() == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cuda_missing() is None


def test_pad_batch_repeats_the_last_face_and_its_fidelity_and_leaves_full_or_empty_batches_alone():
    """An engine with a fixed batch of 4 given 2 faces gets faces [a, b, b, b] with fidelities [0.25, 0.75, 0.75,
    0.75]; a batch already as large is passed through as is, and so is an empty one (nothing to repeat)."""
    a, b = torch.full((3, 2, 2), 1.0), torch.full((3, 2, 2), 2.0)
    x, f = pad_batch(torch.stack([a, b]), torch.tensor([0.25, 0.75]), 4)
    assert torch.equal(x, torch.stack([a, b, b, b])) and torch.equal(f, torch.tensor([0.25, 0.75, 0.75, 0.75]))
    full, fidelity = torch.stack([a, b, a, b]), torch.tensor([0.0, 1.0, 0.5, 0.5])
    x, f = pad_batch(full, fidelity, 4)
    assert x is full and f is fidelity
    empty, no_fidelity = torch.zeros(0, 3, 2, 2), torch.zeros(0)
    x, f = pad_batch(empty, no_fidelity, 4)
    assert x.shape == (0, 3, 2, 2) and f.shape == (0,)


# ----------------------------------------------------------------------------------------------- tensorrt
def test_a_sidecar_without_a_compute_capability_is_accepted_on_any_gpu():
    """The compute capability is compared only when the sidecar records one; the TensorRT version still is."""
    from vqfr.backends.tensorrt import compatibility_problem

    meta = _meta(tensorrt="10.8.0.43")
    assert compatibility_problem(meta, "10.8.0.43", (8, 6)) is None
    assert compatibility_problem(meta, "10.8.0.43", (12, 0)) is None
    assert "this is TensorRT 10.9.0.34" in compatibility_problem(meta, "10.9.0.34", (8, 6))


def test_a_version_compatible_plan_never_runs_on_an_earlier_patch_release():
    """Version compatibility runs a plan on the TensorRT that built it and later ones, compared down to the patch:
    built with 10.8.1, it runs on 10.8.1 builds and 10.9, not on 10.8.0."""
    from vqfr.backends.tensorrt import compatibility_problem

    meta = dataclasses.replace(_meta(tensorrt="10.8.1.12", compute_capability="9.0"),
                               extra={"version_compatible": True})
    assert compatibility_problem(meta, "10.8.1.20", (9, 0)) is None
    assert compatibility_problem(meta, "10.9.0.34", (9, 0)) is None
    assert "built with TensorRT 10.8.1.12, this is TensorRT 10.8.0.43" in compatibility_problem(meta, "10.8.0.43",
                                                                                                (9, 0))


class _Fp16Engine(_FakeEngine):
    """The stand-in identity engine with fp16 inputs and output (an engine built from an fp16 ONNX)."""

    def get_tensor_dtype(self, name):
        return "f32" if name == "fidelity" else "f16"

    def create_execution_context(self):
        return _Fp16Context(self.profile)


class _Fp16Context(_FakeContext):
    def execute_async_v3(self, stream):
        import ctypes

        ctypes.memmove(self.addresses["output"], self.addresses["input"],
                       2 * int(torch.Size(self.shapes["input"]).numel()))
        return True


@pytest.fixture
def tensorrt_backend(monkeypatch, tmp_path):
    """TensorRTBackend(meta, engine class) over a stand-in tensorrt module and a (9, 0) GPU, running on the CPU."""
    from vqfr.backends.tensorrt import TensorRTBackend

    module = install_fake_tensorrt(monkeypatch)
    path = tmp_path / "m.engine"
    path.write_bytes(b"plan")

    def make(meta, engine=_FakeEngine, precision="auto"):
        module.Runtime = type("Runtime", (_FakeRuntime,), {"deserialize_cuda_engine": lambda self, plan: engine()})
        return TensorRTBackend(next(e for e in BACKENDS if e.name == "tensorrt"), path, meta=meta,
                               precision=precision, device="cpu")

    return make


def test_tensorrt_refuses_an_engine_built_for_another_gpu_at_load(tensorrt_backend):
    """Loading checks the sidecar against this GPU before deserializing: an engine built for compute capability
    8.6 on a 9.0 GPU is an EngineError naming both and the rebuild, not an obscure TensorRT failure."""
    meta = dataclasses.replace(_trt_meta(), built_with={"tensorrt": "10.8.0.43", "compute_capability": "8.6",
                                                        "gpu": "NVIDIA A10"})
    with pytest.raises(EngineError, match=r"m\.engine: engine built for compute capability 8\.6 \(NVIDIA A10\), "
                                          r"this GPU is 9\.0 \(stand-in GPU\).*python -m export\.trt"):
        tensorrt_backend(meta).load()


def test_tensorrt_refuses_fp32_asked_of_an_fp16_engine(tensorrt_backend):
    """An engine has one precision: fp32 asked of an fp16 engine is refused, like fp16 of an fp32 one."""
    meta = dataclasses.replace(_trt_meta(), precision="fp16")
    with pytest.raises(EngineError, match="was built in fp16; precision fp32 was asked"):
        tensorrt_backend(meta, precision="fp32").load()
    backend = tensorrt_backend(meta, precision="fp16")
    backend.load()
    assert backend.loaded


def test_tensorrt_refuses_an_engine_whose_inputs_are_not_its_sidecars(tmp_path, tensorrt_backend):
    """A v2 engine (input, fidelity) beside a v1 sidecar (input only) would be fed no fidelity: refused at load."""
    meta = dataclasses.replace(_trt_meta(), arch="VQFRv1", inputs=(TensorSpec("input", (-1, 3, 16, 16)),))
    with pytest.raises(EngineError, match=r"engine inputs \['input', 'fidelity'\] differ from its sidecar's "
                                          r"\['input'\]"):
        tensorrt_backend(meta).load()


def test_tensorrt_feeds_and_returns_fp16_for_an_fp16_engine(tensorrt_backend):
    """The inputs are cast to the engine's tensor types and the output is read in its type: an fp16 identity
    engine returns the faces rounded to fp16, as fp16."""
    backend = tensorrt_backend(dataclasses.replace(_trt_meta(), precision="fp16"), engine=_Fp16Engine)
    backend.load()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = backend.infer(x, torch.tensor([0.0, 1.0]))
    assert out.dtype == torch.float16 and torch.equal(out, x.half())


# ----------------------------------------------------------------------------------------------- onnxruntime
def test_without_onnxruntime_gpu_rows_name_the_gpu_extra_and_the_cpu_row_the_onnx_extra(monkeypatch):
    """The CUDA and TensorRT EPs come from onnxruntime-gpu (extra ``gpu``), the CPU provider from onnxruntime
    (extra ``onnx``): with neither installed, each row names the extra that gives it its provider."""
    import importlib.util

    from vqfr.backends.onnxruntime import OnnxRuntimeBackend

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else
                        find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for entry in BACKENDS:
        if entry.name == "onnxruntime":
            extra = "onnx" if entry.provider == "CPUExecutionProvider" else "gpu"
            reason, _ = OnnxRuntimeBackend.check(entry, None)
            assert reason == f"onnxruntime is not installed (pip install 'vqfr-deploy[{extra}]')", entry.label


def _onnxruntime_rows(monkeypatch, providers: list[str], cuda: bool) -> dict[str, str | None]:
    """{label: reason} of the onnxruntime rows, with an onnxruntime offering ``providers``, no TensorRT, and a GPU
    visible or not (torch reporting a CUDA build)."""
    ort = pytest.importorskip("onnxruntime")
    import vqfr.backends.onnxruntime as backend

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(providers))
    monkeypatch.setattr(backend, "missing_package", lambda module, extra: (
        f"{module} is not installed (pip install 'vqfr-deploy[{extra}]')" if module == "tensorrt" else None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    return {e.label: backend.OnnxRuntimeBackend.check(e, None)[0] for e in BACKENDS if e.name == "onnxruntime"}


def test_each_onnxruntime_row_says_what_it_lacks_with_its_own_fix(monkeypatch):
    """A CPU-only onnxruntime lacks the GPU providers (fix: the ``gpu`` extra, onnxruntime-gpu), a broken one the
    CPU provider (fix: reinstall); the TensorRT EP also needs TensorRT itself; the GPU rows need a visible GPU."""
    ort = pytest.importorskip("onnxruntime")
    v = ort.__version__
    rows = _onnxruntime_rows(monkeypatch, ["AzureExecutionProvider"], cuda=True)
    gpu_fix = "pip install 'vqfr-deploy[gpu]' (onnxruntime-gpu)"
    assert rows["onnxruntime[CUDA EP]"] == (f"onnxruntime {v} has no CUDAExecutionProvider (it has "
                                            f"AzureExecutionProvider); {gpu_fix}")
    assert rows["onnxruntime[CPU]"] == (f"onnxruntime {v} has no CPUExecutionProvider (it has AzureExecutionProvider)"
                                        "; reinstall it")
    all_three = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    rows = _onnxruntime_rows(monkeypatch, all_three, cuda=True)
    assert rows == {"onnxruntime[TensorRT EP]": "the TensorRT EP needs TensorRT: tensorrt is not installed (pip "
                                                "install 'vqfr-deploy[trt]')",
                    "onnxruntime[CUDA EP]": None, "onnxruntime[CPU]": None}
    no_gpu = "no CUDA GPU visible (torch.cuda.is_available() is False)"
    rows = _onnxruntime_rows(monkeypatch, all_three, cuda=False)
    assert rows["onnxruntime[CUDA EP]"] == no_gpu and rows["onnxruntime[CPU]"] is None
    assert rows["onnxruntime[TensorRT EP]"].endswith(f"; {no_gpu}")


@pytest.mark.parametrize("error, unavailable", [
    ("CUDA failure 100: no CUDA-capable device is detected", True),
    ("TensorRT EP could not build the engine", True),
    ("libnvinfer.so.10: cannot open shared object file", True),
    ("Protobuf parsing failed.", False),
])
def test_a_session_that_fails_to_start_is_the_backend_but_a_bad_graph_is_the_engine(monkeypatch, tmp_path, error,
                                                                                    unavailable):
    """A session failing on CUDA, TensorRT or their libraries is BackendUnavailable (the runtime tries the next
    row); any other failure is the file's, an EngineError naming the re-export."""
    ort = pytest.importorskip("onnxruntime")
    from vqfr.backends.onnxruntime import OnnxRuntimeBackend

    def fail(*args, **kwargs):
        raise RuntimeError(error)

    monkeypatch.setattr(ort, "InferenceSession", fail)
    row = next(e for e in BACKENDS if e.label == "onnxruntime[CPU]")
    expected = BackendUnavailable if unavailable else EngineError
    with pytest.raises(expected) as err:
        OnnxRuntimeBackend(row, tmp_path / "m.onnx", meta=_meta()).load()
    assert type(err.value) is expected and error in err.value.reason


def test_the_cuda_ep_runs_on_the_backends_gpu_before_the_cpu_and_the_trt_cache_follows_its_variable(monkeypatch,
                                                                                                     tmp_path):
    """The CUDA EP row lists the CUDA provider (on the device index asked) and then the CPU for what CUDA lacks; the
    CPU row only the CPU. ``$VQFR_TRT_CACHE`` moves the TensorRT EP's cache to ``$VQFR_TRT_CACHE/<16 hex>``."""
    from vqfr.backends.onnxruntime import OnnxRuntimeBackend

    path = tmp_path / "m.onnx"
    meta = dataclasses.replace(_meta(), file_sha256="0123456789abcdef" * 4)

    def providers(label: str, device: str):
        row = next(e for e in BACKENDS if e.label == label)
        return OnnxRuntimeBackend(row, path, meta=meta, device=device)._providers(path)

    assert providers("onnxruntime[CUDA EP]", "cuda:2") == [("CUDAExecutionProvider", {"device_id": 2}),
                                                           "CPUExecutionProvider"]
    assert providers("onnxruntime[CPU]", "cpu") == ["CPUExecutionProvider"]
    monkeypatch.setenv("VQFR_TRT_CACHE", str(tmp_path / "cache"))
    trt = dict(providers("onnxruntime[TensorRT EP]", "cuda")[0][1])
    assert trt["trt_engine_cache_path"] == str(tmp_path / "cache" / "0123456789abcdef")


def test_tensorrt_with_a_gpu_is_listed_usable_before_any_engine_is_named(monkeypatch):
    """``--list-backends`` (no engine, so no sidecar to compare) lists TensorRT as usable where it and a GPU are
    here, noting its version and the GPU; the sidecar comparison applies to an engine once one is named."""
    import vqfr.backends.tensorrt as backend

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.8.0.43"))
    monkeypatch.setattr(backend, "missing_package", lambda *a: None)
    monkeypatch.setattr(backend, "cuda_missing", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    (row,) = availability(backend="tensorrt")
    assert (row.usable, row.reason, row.note) == (True, "", "TensorRT 10.8.0.43, stand-in GPU")
    old = dataclasses.replace(_trt_meta(), built_with={"tensorrt": "10.7.0.23"})
    (row,) = availability("m.engine", old, backend="tensorrt")
    assert not row.usable and "this is TensorRT 10.8.0.43" in row.reason


class _WideProfileEngine(_FakeEngine):
    """A profile from batch 1 (min) through 2 (opt) to 4 (max)."""

    profile = (1, 4)

    def get_tensor_profile_shape(self, name, profile):
        return [(1, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16)]


def test_tensorrt_runs_one_face_as_a_batch_of_one_when_the_profiles_minimum_is_one(tensorrt_backend):
    """Padding is up to the profile's minimum (its first shape), not its optimum: one face is run alone."""
    backend = tensorrt_backend(_trt_meta(), engine=_WideProfileEngine)
    backend.load()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(backend.infer(x, torch.ones(1)), x)
    assert backend._context.shapes["input"] == (1, 3, 16, 16) and backend.max_batch == 4


def test_onnxruntime_returns_the_output_its_sidecar_names_when_the_graph_has_several(tmp_path):
    """A graph with an auxiliary output listed first (``aux = -input``, then ``output = input * 2``): the faces are
    the output the sidecar names, not whichever the graph lists first."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    import vqfr
    from vqfr.sidecar import write_sidecar

    faces = [("B", 3, 16, 16)]
    graph = helper.make_graph(
        [helper.make_node("Neg", ["input"], ["aux"]), helper.make_node("Add", ["input", "input"], ["output"])],
        "two_outputs",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, *faces),
         helper.make_tensor_value_info("fidelity", TensorProto.FLOAT, ["B"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, *faces) for name in ("aux", "output")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    engine = tmp_path / "two_outputs.onnx"
    onnx.save(model, engine)
    write_sidecar(engine, _meta())
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    np.testing.assert_array_equal(vqfr.Runtime(engine, device="cpu").infer(x, 0.5).numpy(), (x * 2).numpy())


@pytest.mark.parametrize("size, batch", [(32, -1), (16, 2)])
def test_onnxruntime_refuses_a_sidecar_whose_input_shape_is_not_the_graphs(tmp_path, size, batch):
    """The runtime sizes and batches faces from the sidecar, so a sidecar saying 32x32 faces (or a fixed batch of 2)
    beside a graph taking any batch of 16x16 faces is refused at load, naming both shapes."""
    from vqfr.backends.onnxruntime import OnnxRuntimeBackend
    from vqfr.sidecar import write_sidecar

    engine = _scale_graph(tmp_path / "scale.onnx", output="output")
    wrong = EngineMeta(arch="VQFRv2", options={}, face_size=size, precision="fp32",
                       inputs=(TensorSpec("input", (batch, 3, size, size)), TensorSpec("fidelity", (batch,))),
                       outputs=(TensorSpec("output", (batch, 3, size, size)),))
    write_sidecar(engine, wrong)
    row = next(e for e in BACKENDS if e.label == "onnxruntime[CPU]")
    with pytest.raises(EngineError, match=rf"graph input 'input' has shape \[-1, 3, 16, 16\], its sidecar says "
                                          rf"\[{batch}, 3, {size}, {size}\]"):
        OnnxRuntimeBackend(row, engine, meta=wrong).load()


# ----------------------------------------------------------------------------------------------- sidecar shapes
def test_a_dynamic_size_engine_takes_the_face_size_asked_and_a_fixed_one_its_own(tmp_path):
    """A v1 engine exported with --dynamic-size (H and W -1 in its sidecar) has no face size of its own, so the
    runtime's face_size applies; with fixed H and W the sidecar's face size is the engine's."""
    from vqfr.backends.onnxruntime import OnnxRuntimeBackend

    row = next(e for e in BACKENDS if e.label == "onnxruntime[CPU]")
    fixed = _meta()
    dynamic = dataclasses.replace(fixed, arch="VQFRv1", inputs=(TensorSpec("input", (-1, 3, -1, -1)),))
    assert OnnxRuntimeBackend(row, tmp_path / "m.onnx", meta=fixed).face_size == 16
    assert OnnxRuntimeBackend(row, tmp_path / "m.onnx", meta=dynamic).face_size is None


def test_an_engine_exported_at_batch_1_gets_one_face_a_call(tmp_path):
    """A fixed batch of 1 is a fixed batch too: the runtime cuts 3 faces into 3 calls instead of feeding the
    engine a batch of 3 it does not take."""
    import vqfr

    rt = vqfr.Runtime(_scale_graph(tmp_path / "b1.onnx", batch=1, output="output"), device="cpu", max_batch=4)
    assert rt.backend.fixed_batch == 1 and rt.batch_size == 1
    x, f = torch.rand(3, 3, 16, 16) * 2 - 1, torch.tensor([0.5, 1.0, 0.25])
    np.testing.assert_allclose(rt.infer(x, f).numpy(), (x * f[:, None, None, None]).numpy(), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- _optional
@pytest.mark.parametrize("module, extra", [
    ("onnx", "onnx"), ("onnxscript", "onnx"), ("onnxruntime", "onnx"), ("polygraphy", "onnx"), ("tensorrt", "trt"),
    ("triton", "gpu"), ("matplotlib", "bench"), ("scipy", "train"), ("torch.utils.tensorboard", "train"),
    ("onnxruntime.quantization", "onnx"), ("no_such_package_anywhere", "dev"),
])
def test_a_missing_optional_package_names_the_extra_that_installs_it(monkeypatch, module, extra):
    """Each package is named with an extra of pyproject.toml that lists it (a submodule with its package's extra,
    a package no extra lists with ``dev``), after what it was needed for."""
    import tomllib

    from tests.test_optional import PYPROJECT
    from vqfr import _optional

    listed = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"][extra]
    package = {"torch.utils.tensorboard": "tensorboard"}.get(module, module.split(".")[0])
    assert extra == "dev" or any(req.startswith(f"{package}>=") for req in listed)
    monkeypatch.setitem(sys.modules, module, None)  # the import fails
    with pytest.raises(ImportError) as err:
        _optional.require(module, "a test")
    text = str(err.value)
    assert text.startswith(f"{module} is needed for a test but is not installed (")
    assert text.endswith(f"Install it with: pip install 'vqfr-deploy[{extra}]'")
