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

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.trt import BuildOptions, build_engine, main, tensorrt_available
from vqfr.errors import ConfigError

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
        pytest.skip("tensorrt-stubs or mypy is not installed")
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


def test_build_options_are_checked_first(tmp_path):
    with pytest.raises(ConfigError, match="min-batch"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", BuildOptions(min_batch=4, opt_batch=2))
    with pytest.raises(ConfigError, match="workspace"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", BuildOptions(workspace_gb=0))


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
    import types

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
