"""TensorRT engine building.

TensorRT cannot be installed on the development machines (its PyPI wheels download from NVIDIA's index), so these
tests check what runs everywhere:

- ``mypy export/trt.py`` against the tensorrt-stubs package, with a control that proves the stubs are really used;
- without tensorrt, a clear ImportError naming the pip extra, from the API and the CLI;
- the option checks that run before TensorRT is touched.

The engine build itself runs only where tensorrt and a CUDA GPU are present (marked ``trt``). The check that every
node of our graphs is in the TensorRT parser's supported-op list is in test_export_onnx.py, beside the exports.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from export.trt import BuildOptions, build_engine, main, tensorrt_available
from vqfr.errors import ConfigError, EngineError, OutputError

ROOT = Path(__file__).resolve().parents[1]
HAS_TENSORRT = tensorrt_available()
needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="tensorrt is not installed (it needs NVIDIA's index)")
no_tensorrt = pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed")


def _stub_dir() -> Path | None:
    """The folder holding tensorrt-stubs' ``tensorrt/__init__.pyi``, or None."""
    if importlib.util.find_spec("tensorrt_stubs") is None:
        return None
    for folder in map(Path, sys.path):
        if (folder / "tensorrt" / "__init__.pyi").is_file() and (folder / "tensorrt_bindings").is_dir():
            return folder
    return None


@pytest.fixture(scope="module")
def mypy_config(tmp_path_factory) -> Path:
    """A mypy config that type-checks against tensorrt-stubs.

    tensorrt-stubs (10.13.0.35.1) installs ``tensorrt/__init__.pyi`` without a ``py.typed`` marker, so mypy skips it
    (PEP 561), and five stub lines are not valid Python: four parameters named ``in`` (a keyword) and one parameter
    without a default after defaulted ones (``add_scale_nd``). This copies the stubs, renames those parameters and
    gives that one a default, and puts the copy on mypy's path. Errors inside the stubs themselves are ignored.
    """
    site = _stub_dir()
    if site is None or importlib.util.find_spec("mypy") is None:
        pytest.skip("tensorrt-stubs or mypy is not installed (pip install --no-deps tensorrt-stubs)")
    stubs = tmp_path_factory.mktemp("trt_stubs")
    for package in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(site / package, stubs / package, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    repaired = 0
    for stub in stubs.rglob("*.pyi"):
        text = stub.read_text()
        text, n_in = re.subn(r"([(,] *)in: ", r"\1in_: ", text)
        text, n_default = re.subn(r"(power: Weights = None, channel_axis: int)\)", r"\1 = ...)", text)
        repaired += n_in + n_default
        stub.write_text(text)
    assert repaired <= 5, "tensorrt-stubs changed; revisit this repair"
    assert (stubs / "tensorrt" / "__init__.pyi").is_file()
    config = stubs / "mypy.ini"
    # Only TensorRT's stubs are followed (other imports are Any), which keeps mypy to a few seconds.
    config.write_text(f"[mypy]\npython_version = 3.10\nignore_missing_imports = True\nfollow_imports = skip\n"
                      f"mypy_path = {stubs}\n\n[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]\n"
                      f"follow_imports = normal\nignore_errors = True\n")
    return config


def _mypy(config: Path, target: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), "--no-incremental",
                           str(target)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_trt_module_type_checks_against_tensorrt_stubs(mypy_config, tmp_path):
    result = _mypy(mypy_config, ROOT / "export" / "trt.py")
    assert result.returncode == 0, result.stdout + result.stderr
    # Control: the same config rejects a misuse of the TensorRT API, so the stubs are really in use.
    wrong = tmp_path / "wrong_trt_use.py"
    wrong.write_text("import tensorrt as trt\n\n\ndef f() -> None:\n    trt.Builder(trt.Logger()).no_such_method()\n")
    control = _mypy(mypy_config, wrong)
    assert control.returncode == 1 and "no_such_method" in control.stdout, control.stdout


@no_tensorrt
def test_missing_tensorrt_names_the_extra(tmp_path, capsys):
    onnx_path = tmp_path / "m.onnx"
    with pytest.raises(ImportError, match=r"pip install 'vqfr-deploy\[trt\]'"):
        build_engine(onnx_path, tmp_path / "m.engine")
    assert main([str(onnx_path), "-o", str(tmp_path / "m.engine")]) == 1
    assert "vqfr-deploy[trt]" in capsys.readouterr().err
    assert not (tmp_path / "m.engine").exists()


def test_type_stubs_alone_are_refused_naming_their_folder(tmp_path, monkeypatch):
    """tensorrt-stubs alone imports as an empty namespace package: refused, naming where it was found as a plain path
    (its __path__ object printed as "_NamespacePath([...])" before)."""
    import export.trt

    (tmp_path / "stubs_only_trt").mkdir()
    (tmp_path / "stubs_only_trt" / "__init__.pyi").write_text("class Builder: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace = importlib.import_module("stubs_only_trt")
    monkeypatch.setattr(export.trt, "require", lambda name, purpose: namespace)
    with pytest.raises(ImportError) as info:
        export.trt._tensorrt()
    assert str(info.value) == (f"tensorrt is needed for building TensorRT engines but only its type stubs are "
                               f"installed ({tmp_path / 'stubs_only_trt'}). Install it with: pip install "
                               "'vqfr-deploy[trt]'")
    assert not tensorrt_available()


def test_build_options_are_checked_first(tmp_path):
    with pytest.raises(ConfigError, match="min-batch"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", BuildOptions(min_batch=4, opt_batch=2))
    for workspace in (0, float("nan"), float("inf")):  # nan and inf used to pass, then fail in int() after the parse
        with pytest.raises(ConfigError, match="workspace must be a positive number"):
            build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", BuildOptions(workspace_gb=workspace))


def test_cli_with_samples_names_a_missing_onnx_as_missing(tmp_path, capsys):
    """With --samples the face size was read from the ONNX's sidecar first, so a mistyped ONNX path was reported as
    a missing sidecar."""
    import cv2

    face = tmp_path / "face.png"
    cv2.imwrite(str(face), np.zeros((16, 16, 3), np.uint8))
    assert main([str(tmp_path / "typo.onnx"), "-o", str(tmp_path / "m.engine"), "--check", "--samples",
                 str(face)]) == 1
    err = capsys.readouterr().err
    assert "typo.onnx: does not exist" in err and "sidecar" not in err, err


@pytest.mark.trt
@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_engine_from_tiny_v2_fp16_onnx_matches_onnxruntime(tmp_path):
    from export.onnx import export_onnx
    from tests.conftest import TINY_V2
    from vqfr.sidecar import read_sidecar

    onnx32 = export_onnx(None, tmp_path / "tiny.onnx", config=TINY_V2, random_weights=0)
    onnx16 = export_onnx(None, tmp_path / "tiny16.onnx", config=TINY_V2, random_weights=0, precision="fp16")
    cache = tmp_path / "timing.cache"
    engine = build_engine(onnx16, tmp_path / "tiny16.engine", BuildOptions(max_batch=4, opt_batch=2,
                                                                          timing_cache=cache),
                          check=True, reference_onnx=onnx32)
    meta = read_sidecar(engine)
    assert meta.precision == "fp16" and meta.extra["strongly_typed"] and meta.extra["dcn_precision"] == "fp32"
    assert meta.built_with["tensorrt"] and meta.built_with["compute_capability"]
    assert meta.extra["check"]["sample"]["psnr_db"] >= 45 and cache.stat().st_size > 0


class _FakeLayerType:
    CONVOLUTION, NORMALIZATION, SOFTMAX, PLUGIN_V2, PLUGIN_V3, ELEMENTWISE, SHAPE = range(7)


class _FakeTensor:
    def __init__(self, dtype, shape=()):
        self.dtype, self.shape, self.name = dtype, shape, "t"


class _FakeLayer:
    def __init__(self, kind, metadata, dtype="f16"):
        self.type, self.metadata, self.name = kind, metadata, "layer"
        self.num_outputs = 1
        self.precision = None
        self._out = _FakeTensor(dtype)
        self.output_types = {}

    def get_output(self, i):
        return self._out

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


class _FakeNetwork:
    def __init__(self, layers=(), inputs=()):
        self.layers, self.inputs = list(layers), list(inputs)
        self.num_layers, self.num_inputs = len(self.layers), len(self.inputs)

    def get_layer(self, i):
        return self.layers[i]

    def get_input(self, i):
        return self.inputs[i]


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """Just enough of the tensorrt module for the helpers that inspect a parsed network."""
    module = types.SimpleNamespace(LayerType=_FakeLayerType, float32="f32", float16="f16")
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


def test_weakly_typed_fp16_builds_pin_exactly_the_islands(fake_tensorrt):
    from export.trt import _pin_fp32_islands

    layers = {
        "island conv": _FakeLayer(_FakeLayerType.CONVOLUTION, "[ONNX Layer: node_Conv_99]"),
        "island add (local function)": _FakeLayer(_FakeLayerType.ELEMENTWISE, "[ONNX Layer: node_Add_7 | Local F]"),
        "normalization": _FakeLayer(_FakeLayerType.NORMALIZATION, "[ONNX Layer: node_InstanceNormalization_3]"),
        "softmax": _FakeLayer(_FakeLayerType.SOFTMAX, "[ONNX Layer: node_Softmax_1]"),
        "deform conv plugin": _FakeLayer(_FakeLayerType.PLUGIN_V3, "[ONNX Layer: node_DeformConv_5]"),
        "other conv": _FakeLayer(_FakeLayerType.CONVOLUTION, "[ONNX Layer: node_Conv_9]"),
        "shape": _FakeLayer(_FakeLayerType.SHAPE, "[ONNX Layer: node_Conv_99]", dtype="i64"),
    }
    network = _FakeNetwork(layers.values())
    assert _pin_fp32_islands(network, {"node_Conv_99", "node_Add_7", "node_DeformConv_5"}, dcn_fp16=False) == 6
    pinned = {name for name, layer in layers.items() if layer.precision == "f32"}
    assert pinned == set(layers) - {"other conv"}
    assert layers["island conv"].output_types == {0: "f32"} and layers["shape"].output_types == {}

    for layer in layers.values():
        layer.precision = None
    _pin_fp32_islands(network, {"node_Conv_99", "node_DeformConv_5"}, dcn_fp16=True)
    assert layers["deform conv plugin"].precision is None and layers["island conv"].precision == "f32"


def test_profile_covers_the_batch_and_fixes_dynamic_size(fake_tensorrt):
    from export.trt import _profile_shapes
    from vqfr.sidecar import EngineMeta, TensorSpec

    meta = EngineMeta(arch="VQFRv1", options={}, face_size=512, precision="fp32",
                      inputs=(TensorSpec("input", (-1, 3, -1, -1)),), outputs=(TensorSpec("output", (-1, 3, -1, -1)),))
    tensor = _FakeTensor("f32", (-1, 3, -1, -1))
    tensor.name = "input"
    shapes = _profile_shapes(_FakeNetwork(inputs=[tensor]), meta, BuildOptions(min_batch=1, opt_batch=2,
                                                                                max_batch=6, size=256))
    assert shapes == {"input": ([1, 3, 256, 256], [2, 3, 256, 256], [6, 3, 256, 256])}


def test_profile_keeps_a_batch_fixed_at_export(fake_tensorrt):
    """A profile may only range over dynamic dimensions: an ONNX exported with --batch 2 keeps batch 2 whatever the
    (default) --min/--opt/--max-batch, instead of a profile TensorRT rejects at build time."""
    from export.trt import _profile_shapes
    from vqfr.sidecar import EngineMeta, TensorSpec

    meta = EngineMeta(arch="VQFRv2", options={}, face_size=64, precision="fp32",
                      inputs=(TensorSpec("input", (2, 3, 64, 64)), TensorSpec("fidelity", (2,))),
                      outputs=(TensorSpec("output", (2, 3, 64, 64)),))
    image, fidelity = _FakeTensor("f32", (2, 3, 64, 64)), _FakeTensor("f32", (2,))
    image.name, fidelity.name = "input", "fidelity"
    shapes = _profile_shapes(_FakeNetwork(inputs=[image, fidelity]), meta, BuildOptions())
    assert shapes == {"input": ([2, 3, 64, 64],) * 3, "fidelity": ([2],) * 3}


def test_engine_sidecar_records_the_size_a_dynamic_onnx_is_built_for(tmp_path):
    """A v1 ONNX with dynamic H/W becomes an engine for one size: its sidecar must say that size (the runtime feeds
    faces of the sidecar's face size), and --size is checked against the graph."""
    from export.trt import _engine_sidecar
    from vqfr.sidecar import EngineMeta, TensorSpec, write_sidecar

    dynamic, static = tmp_path / "dynamic.onnx", tmp_path / "static.onnx"
    meta = EngineMeta(arch="VQFRv1", options={"type": "VQFRv1", "proj_patch_size": 32}, face_size=512,
                      precision="fp32", inputs=(TensorSpec("input", (-1, 3, -1, -1)),),
                      outputs=(TensorSpec("output", (-1, 3, -1, -1)),),
                      extra={"dynamic_batch": True, "dynamic_size": True})
    for path in (dynamic, static):
        path.write_bytes(b"onnx graph")
    write_sidecar(dynamic, meta)
    engine = _engine_sidecar(dynamic, BuildOptions(size=256))
    assert engine.face_size == 256 and engine.extra == {"dynamic_batch": True, "dynamic_size": False}
    assert [t.shape for t in engine.inputs + engine.outputs] == [(-1, 3, 256, 256)] * 2
    assert _engine_sidecar(dynamic, BuildOptions()).inputs[0].shape == (-1, 3, 512, 512)
    for bad in (100, 0):
        with pytest.raises(ConfigError, match=f"multiple of 32, got {bad}"):
            _engine_sidecar(dynamic, BuildOptions(size=bad))
    write_sidecar(static, _engine_sidecar(dynamic, BuildOptions()))
    assert _engine_sidecar(static, BuildOptions(size=512)).inputs[0].shape == (-1, 3, 512, 512)
    with pytest.raises(ConfigError, match=r"static.onnx: --size 256 asked, but this ONNX takes 512x512 inputs only"):
        _engine_sidecar(static, BuildOptions(size=256))


def test_engine_sidecar_refuses_an_onnx_changed_since_its_sidecar(tmp_path):
    """A re-exported ONNX beside an old sidecar: the engine's sidecar would describe another model. A wrong path
    is named as such."""
    from export.trt import _engine_sidecar
    from vqfr.sidecar import write_sidecar

    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"old graph")
    write_sidecar(onnx_path, _trt_meta())
    onnx_path.write_bytes(b"new graph")
    with pytest.raises(EngineError, match="m.onnx: has changed since export"):
        _engine_sidecar(onnx_path, BuildOptions())
    with pytest.raises(EngineError, match="typo.onnx: does not exist"):  # not "has no readable sidecar"
        _engine_sidecar(tmp_path / "typo.onnx", BuildOptions())


def test_a_file_that_is_not_onnx_is_an_engine_error(tmp_path):
    """E.g. the .pt2 of export.aoti: its sidecar passes for an ONNX one, then the parse raised protobuf's DecodeError
    (a raw traceback from the CLI)."""
    from export.trt import _onnx_bytes

    package = tmp_path / "vqfr_v2.pt2"
    package.write_bytes(b"PK\x03\x04 a zip archive, not a protobuf")
    with pytest.raises(EngineError, match=r"vqfr_v2.pt2: is not an ONNX model .*Fix: pass the .onnx file"):
        _onnx_bytes(package, _trt_meta(), BuildOptions())


def test_check_repeats_samples_up_to_the_batch():
    """With a fixed batch (or --min-batch) above the number of --samples, the sample batch still fits the profile."""
    from export.trt import _check_feeds

    face = np.zeros((3, 16, 16), np.float32)
    feeds = _check_feeds(_trt_meta(), 3, 16, [face])
    assert feeds["sample"]["input"].shape == (3, 3, 16, 16) and feeds["sample"]["fidelity"].shape == (3,)
    assert feeds["random"]["input"].shape == (3, 3, 16, 16)


def test_cli_refuses_check_options_without_check(tmp_path, capsys):
    onnx_path = tmp_path / "m.onnx"
    for extra in (["--samples", str(tmp_path / "face.png")], ["--reference-onnx", str(onnx_path)]):
        with pytest.raises(SystemExit) as exc:
            main([str(onnx_path), "-o", str(tmp_path / "m.engine"), *extra])
        assert exc.value.code == 2 and "only used by --check; add --check" in capsys.readouterr().err
    assert not (tmp_path / "m.engine").exists()


def test_build_refuses_to_overwrite_its_onnx(tmp_path):
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"onnx")
    with pytest.raises(OutputError, match="would overwrite the input"):
        build_engine(onnx_path, onnx_path)
    assert onnx_path.read_bytes() == b"onnx"


def test_cli_refuses_an_output_over_a_check_sample(tmp_path, capsys):
    """``--samples`` are inputs of the build too: an output over one is refused before anything is read."""
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"onnx")
    sample = tmp_path / "face.engine"  # not an image: reading it first would give another error
    sample.write_bytes(b"sample")
    assert main([str(onnx_path), "-o", str(sample), "--check", "--size", "16", "--samples", str(sample)]) == 1
    assert f"the output would overwrite the input {sample}" in capsys.readouterr().err
    assert sample.read_bytes() == b"sample"


def test_version_compatible_engines_run_on_later_tensorrt_only():
    from vqfr.backends.tensorrt import compatibility_problem

    meta = _trt_meta(version_compatible=True)
    for later in ("10.8.0.43", "10.13.0.35", "11.0.0.1"):
        assert compatibility_problem(meta, later, (9, 0)) is None, later
    assert "built with TensorRT 10.8.0.43, this is TensorRT 10.3.0.26" in compatibility_problem(meta, "10.3.0.26",
                                                                                                (9, 0))


# --- the TensorRT backend, on a stand-in tensorrt module (an identity engine) -------------------------------------

def _trt_meta(version_compatible: bool = False):
    from vqfr.sidecar import EngineMeta, TensorSpec

    return EngineMeta(arch="VQFRv2", options={}, face_size=16, precision="fp32",
                      inputs=(TensorSpec("input", (-1, 3, 16, 16)), TensorSpec("fidelity", (-1,))),
                      outputs=(TensorSpec("output", (-1, 3, 16, 16)),),
                      built_with={"tensorrt": "10.8.0.43", "compute_capability": "9.0"},
                      extra={"version_compatible": version_compatible})


class _FakeContext:
    """Copies ``input`` to ``output``; like TensorRT, refuses shapes outside the profile (returns False)."""

    def __init__(self, profile):
        self.profile, self.shapes, self.addresses = profile, {}, {}

    def set_input_shape(self, name, shape):
        low, high = self.profile
        if not low <= shape[0] <= high:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def get_tensor_shape(self, name):
        return self.shapes.get("input" if name == "output" else name, (-1, 3, 16, 16))

    def execute_async_v3(self, stream):
        import ctypes

        size = 4 * int(torch.Size(self.shapes["input"]).numel())
        ctypes.memmove(self.addresses["output"], self.addresses["input"], size)
        return True


class _FakeEngine:
    num_io_tensors = 3
    profile = (2, 4)

    def get_tensor_name(self, i):
        return ("input", "fidelity", "output")[i]

    def get_tensor_mode(self, name):
        return "out" if name == "output" else "in"

    def get_tensor_dtype(self, name):
        return "f32"

    def get_tensor_profile_shape(self, name, profile):
        low, high = self.profile
        return [(low, 3, 16, 16), (low, 3, 16, 16), (high, 3, 16, 16)]

    def create_execution_context(self):
        return _FakeContext(self.profile)


class _FakeLogger:
    WARNING = 2

    def __init__(self, level):
        self.level = level


class _FakeRuntime:
    def __init__(self, logger):
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, plan):
        # TensorRT refuses a version-compatible plan (it embeds the lean runtime, host code) unless allowed.
        if plan.startswith(b"version-compatible") and not self.engine_host_code_allowed:
            return None
        # Every VQFR plan holds the DeformConv plugin (ModulatedDeformConv2d): without its creator in the plugin
        # registry (trt.init_libnvinfer_plugins), TensorRT logs "Cannot find plugin" and returns None.
        if not sys.modules["tensorrt"].plugin_namespaces:
            return None
        return _FakeEngine()


def install_fake_tensorrt(monkeypatch) -> types.SimpleNamespace:
    """Put a stand-in ``tensorrt`` module (version 10.8.0.43, :class:`_FakeRuntime`) in ``sys.modules`` and make the
    CUDA queries of the TensorRT backend answer as a 9.0 GPU named "stand-in GPU"; returns the module."""
    import contextlib

    module = types.SimpleNamespace(__version__="10.8.0.43", Logger=_FakeLogger, Runtime=_FakeRuntime,
                                   TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"), float32="f32",
                                   float16="f16", int32="i32", plugin_namespaces=[])
    module.init_libnvinfer_plugins = lambda logger, namespace: module.plugin_namespaces.append(namespace) or True
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in GPU")
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    return module


@pytest.fixture
def trt_backend(monkeypatch, tmp_path):
    """TensorRTBackend(path, meta) over a stand-in tensorrt module and CUDA queries, running on the CPU."""
    from vqfr.backends.base import BACKENDS
    from vqfr.backends.tensorrt import TensorRTBackend

    install_fake_tensorrt(monkeypatch)
    row = next(e for e in BACKENDS if e.name == "tensorrt")

    def make(plan: bytes, meta):
        path = tmp_path / "m.engine"
        path.write_bytes(plan)
        return TensorRTBackend(row, path, meta=meta, device="cpu")

    return make


def test_tensorrt_backend_loads_version_compatible_engines(trt_backend):
    """export.trt --version-compatible serialises the lean runtime into the plan; the backend must allow host code
    for it (IRuntime::setEngineHostCodeAllowed), and only for it."""
    backend = trt_backend(b"version-compatible plan", _trt_meta(version_compatible=True))
    backend.load()
    assert backend.loaded and backend._runtime.engine_host_code_allowed
    plain = trt_backend(b"plan", _trt_meta())
    plain.load()
    assert not plain._runtime.engine_host_code_allowed


def test_tensorrt_backend_pads_batches_below_the_profile_and_refuses_larger_ones(trt_backend):
    """A profile with min batch 2 (--min-batch 2, or an ONNX exported with --batch 2) still serves one face; a
    batch above the profile is a clear EngineError, not a failure inside torch.empty."""
    backend = trt_backend(b"plan", _trt_meta())
    backend.load()
    assert backend.max_batch == 4
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    out = backend.infer(x, torch.zeros(1))
    assert out.shape == (1, 3, 16, 16) and torch.equal(out, x)
    three = torch.rand(3, 3, 16, 16)
    assert torch.equal(backend.infer(three, torch.zeros(3)), three)
    with pytest.raises(EngineError, match=r"m.engine: the engine does not take input of shape \[5, 3, 16, 16\]"):
        backend.infer(torch.rand(5, 3, 16, 16), torch.zeros(5))


def test_tensorrt_backend_precision_mismatch_names_real_export_flags(trt_backend):
    """Asking an fp32 engine for fp16 is refused with a fix whose flags exist: export.trt has no --precision
    (precision follows the ONNX: export.onnx --precision, or export.trt --fp16)."""
    from export.onnx import build_parser as onnx_parser
    from export.trt import build_parser as trt_parser

    backend = trt_backend(b"plan", _trt_meta())
    backend.requested_precision = "fp16"
    with pytest.raises(EngineError, match="was built in fp32; precision fp16 was asked") as info:
        backend.load()
    fix = info.value.fix or ""
    assert "export.onnx --precision" in fix and "export.trt --fp16" in fix
    assert "--precision" in onnx_parser().format_help() and "--fp16" in trt_parser().format_help()
    assert "--precision" not in trt_parser().format_help()


def test_tensorrt_backend_registers_the_deform_conv_plugin_before_deserializing(trt_backend):
    """export.trt registers libnvinfer_plugin before parsing (and polygraphy's --check registers it again), so the
    build and its check passed; a fresh process running the engine through the backend never registered it, and
    TensorRT could not deserialize any VQFR engine ("Cannot find plugin: ModulatedDeformConv2d")."""
    import tensorrt

    backend = trt_backend(b"plan", _trt_meta())
    backend.load()
    assert backend.loaded and tensorrt.plugin_namespaces == [""]


def test_build_refuses_outputs_the_runtime_would_not_load_or_that_overwrite_inputs(tmp_path):
    """Checked before TensorRT is imported: an engine named ``.onnx`` would be handed to onnxruntime, ``-o`` on the
    ONNX's sidecar replaced it with engine bytes, and ``--timing-cache`` on the ONNX overwrote the model."""
    from vqfr.sidecar import sidecar_path

    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"onnx")
    sidecar_path(onnx_path).write_text("{}")
    with pytest.raises(ConfigError, match=r"m_trt.onnx: .*\.engine.*Fix: name it m_trt.engine"):
        build_engine(onnx_path, tmp_path / "m_trt.onnx")
    with pytest.raises((ConfigError, OutputError), match=r"m.onnx.json"):
        build_engine(onnx_path, sidecar_path(onnx_path))
    for cache in (onnx_path, sidecar_path(onnx_path)):
        with pytest.raises(OutputError, match="would overwrite the input"):
            build_engine(onnx_path, tmp_path / "m.engine", BuildOptions(timing_cache=cache))
    with pytest.raises(ConfigError, match="timing cache .* the engine"):
        build_engine(onnx_path, tmp_path / "m.engine", BuildOptions(timing_cache=tmp_path / "m.engine"))
    assert onnx_path.read_bytes() == b"onnx" and sidecar_path(onnx_path).read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]


def test_build_refuses_a_timing_cache_it_could_not_save_before_building(tmp_path, read_only_folder):
    """``--timing-cache caches/trt.cache`` (missing folder) or ``--timing-cache caches`` (a folder) was only found
    out when the cache was saved after the build: OutputError after minutes of building, and no engine written.
    Refused before TensorRT is touched (here: before the ImportError of the missing tensorrt)."""
    from vqfr.sidecar import sidecar_path

    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"onnx")
    sidecar_path(onnx_path).write_text("{}")
    (tmp_path / "caches").mkdir()
    (tmp_path / "notes.txt").write_text("notes")
    cases = {tmp_path / "missing" / "trt.cache": r"trt.cache: the timing cache's folder .*missing does not exist",
             tmp_path / "caches": r"caches: is a folder. Fix: give --timing-cache the path of a file",
             tmp_path / "notes.txt" / "trt.cache": r"trt.cache: the timing cache's folder .*notes.txt is not a folder"}
    for cache, message in cases.items():
        with pytest.raises(OutputError, match=message):
            build_engine(onnx_path, tmp_path / "m.engine", BuildOptions(timing_cache=cache))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caches", "m.onnx", "m.onnx.json", "notes.txt"]
    read_only_folder(tmp_path / "caches")  # a folder that takes no files
    with pytest.raises(OutputError, match=r"trt.cache: cannot write into .*caches \(Permission denied\)\. Fix: "
                                          r"choose a folder you can write to \(--timing-cache\)"):
        build_engine(onnx_path, tmp_path / "m.engine", BuildOptions(timing_cache=tmp_path / "caches" / "trt.cache"))


class _FakeBuilderConfig:
    """``create_timing_cache`` as TensorRT answers a corrupt or foreign file: no cache (None), or an exception."""

    def __init__(self, answer):
        self.answer = answer

    def create_timing_cache(self, data):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache is None:  # pybind11 refuses None for the ITimingCache reference
            raise TypeError("set_timing_cache(): incompatible function arguments")
        return True


def test_a_corrupt_timing_cache_is_an_engine_error_naming_it(tmp_path):
    """A truncated or foreign ``--timing-cache`` file gave no cache, which was passed on to set_timing_cache: a
    TypeError traceback from the CLI instead of the EngineError that names the file and says to delete it."""
    from export.trt import _load_timing_cache

    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"not a timing cache")
    for answer in (None, RuntimeError("Serialization assertion failed")):
        with pytest.raises(EngineError, match=r"trt.cache: TensorRT rejected the timing cache. Fix: delete it"):
            _load_timing_cache(_FakeBuilderConfig(answer), cache)
    assert _load_timing_cache(_FakeBuilderConfig("cache"), cache) == "cache"


def test_check_refuses_what_it_would_miss_before_building(tmp_path, monkeypatch, capsys):
    """``--check --reference-onnx vqfr_v2.onx`` (a typo), or --check without polygraphy or onnxruntime, built the
    engine for minutes, then failed in the comparison: a polygraphy traceback or an ImportError, and no engine.
    Refused before TensorRT is touched (here: before the ImportError of the missing tensorrt)."""
    from vqfr.sidecar import sidecar_path

    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"onnx")
    sidecar_path(onnx_path).write_text("{}")
    missing = tmp_path / "m_fp32.onx"
    with pytest.raises(EngineError, match=r"m_fp32.onx: does not exist. Fix: pass --reference-onnx an .onnx file"):
        build_engine(onnx_path, tmp_path / "m.engine", check=True, reference_onnx=missing)
    assert main([str(onnx_path), "-o", str(tmp_path / "m.engine"), "--check", "--reference-onnx", str(missing)]) == 1
    assert "m_fp32.onx: does not exist" in capsys.readouterr().err
    for module in ("polygraphy", "onnxruntime"):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)  # import fails, as when it is not installed
            with pytest.raises(ImportError, match=rf"{module} is needed for comparing TensorRT with onnxruntime"):
                build_engine(onnx_path, tmp_path / "m.engine", check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]
