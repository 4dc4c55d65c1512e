"""What mutation testing of the ONNX and AOTInductor exporters, ``export.compare`` and the torch and AOTInductor
backends (round 17) found unchecked: the ONNX exporter's default opset (19, in the file, the sidecar and the printed
summary), the summary's ``check:`` line and the check's result in the sidecar, the graph's input and output names
(``input``, ``fidelity``, ``output``) with one symbolic batch dimension shared by all three, the file's metadata
naming the architecture and precision, a graph traced at batch 2 running three faces at their own fidelities like
PyTorch, ``run_onnxruntime`` casting float64 feeds and returning float32, ``-o`` being required, and the fp32 check's
tolerance staying 1e-4 (not shrinking) for outputs whose peak is below 1; ``Agreement.to_dict`` writing strict JSON
("inf") and PSNRs rounded to 0.01 dB; ``python -m export.aoti``'s defaults (fp32, CUDA, dynamic batch) and flags
reaching the export on a CPU-only machine, a v2's fp32 islands (``decoder.conv_out.2`` and ``feat2index``) returning
float32, and our own errors raised while packaging reaching the user unwrapped; the AOTInductor backend refusing a
package for another device or torch release, casting float64 faces and fidelities to float32, and classing a
lower-case "cuda error" as BackendUnavailable; the torch backend's mode read whatever its case and spaces, ``auto``
choosing fp32 in eager mode on a GPU (fp16 only in max mode), an unknown precision refused by name, the caller's
module left in training mode while the backend evaluates a copy, per-image fidelities and float64 faces, and a v2's
face size from its code grid and patch (None for nearest code selection). Expected values are PyTorch's outputs on
the same inputs (within 1e-4 x max(1, peak) for onnxruntime, 1e-5 for the backend), names, shapes, opsets and messages
written out by hand, stand-in packages and stand-in onnxruntime outputs; tiny models on the CPU."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch

from deploy.soak import MICRO_V2
from tests.conftest import seeded_model
from tests.test_bench import SMALL_V2
from vqfr.backends import BACKENDS
from vqfr.backends.torch import TorchBackend

CPU = next(e for e in BACKENDS if e.label == "torch[cpu]")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors; two threads only spin on a busy 2-core machine


# ------------------------------------------------------------------------------------------------ export.onnx
@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """The micro v2 exported by ``python -m export.onnx --check`` with every other option at its default (one
    trace, about 20 s)."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from export import onnx as onnx_export

    folder = tmp_path_factory.mktemp("cli")
    config = folder / "micro.json"
    config.write_text(json.dumps(MICRO_V2))
    out = folder / "micro.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = onnx_export.main(["--random-weights", "5", "--config", str(config), "--check", "-o", str(out)])
    return {"code": code, "path": out, "printed": printed.getvalue()}


def test_onnx_cli_defaults_write_opset_19_and_report_the_check(cli_export):
    """The default opset is 19 (in the file, the sidecar and the printed summary), and ``--check`` runs and is
    reported: the sidecar holds its max abs error within 1e-4 and the summary prints it."""
    import onnx

    from vqfr.sidecar import read_sidecar

    assert cli_export["code"] == 0
    graph = onnx.load(str(cli_export["path"]))
    assert {o.domain: o.version for o in graph.opset_import}[""] == 19
    meta = read_sidecar(cli_export["path"])
    assert meta.opset == 19 and meta.precision == "fp32"
    check = meta.extra["check"]["onnxruntime_cpu_vs_pytorch_fp32"]
    assert 0 <= check["max_abs"] <= 1e-4
    assert meta.extra["fp32_islands"] == {}
    assert "opset 19" in cli_export["printed"] and "\ncheck: " in cli_export["printed"]
    assert "max_abs" in cli_export["printed"].split("\ncheck: ")[1]


def test_onnx_graph_names_its_inputs_and_output_and_shares_a_dynamic_batch(cli_export):
    """Inputs ``input`` [B, 3, 16, 16] and ``fidelity`` [B], output ``output`` [B, 3, 16, 16], B one symbolic
    dimension shared by all three; the file's metadata names the architecture and precision."""
    import onnx

    graph = onnx.load(str(cli_export["path"]))

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: dims(v) for v in graph.graph.input}
    outputs = {v.name: dims(v) for v in graph.graph.output}
    assert list(inputs) == ["input", "fidelity"] and list(outputs) == ["output"]
    batch = inputs["input"][0]
    assert isinstance(batch, str) and batch
    assert inputs == {"input": [batch, 3, 16, 16], "fidelity": [batch]}
    assert outputs == {"output": [batch, 3, 16, 16]}
    assert {p.key: p.value for p in graph.metadata_props}.items() >= {"vqfr.arch": "VQFRv2",
                                                                        "vqfr.precision": "fp32"}.items()


def test_onnx_graph_runs_other_batches_with_per_image_fidelities_like_pytorch(cli_export):
    """Three faces with fidelities 0, 0.5 and 1 through onnxruntime (the graph was traced at batch 2) match the
    PyTorch model run one face at a time, within 1e-4 x max(1, peak). ``run_onnxruntime`` takes float64 tensors
    (cast to the graph's float32) and returns float32."""
    from export import source
    from export.onnx import run_onnxruntime

    model = source.load_source_model(None, MICRO_V2, 5)
    gen = torch.Generator().manual_seed(11)
    x = torch.rand(3, 3, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1
    fidelity = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    with torch.no_grad():
        expected = torch.cat([model(x[i:i + 1].float(), fidelity=float(fidelity[i])) for i in range(3)]).numpy()
    out = run_onnxruntime(cli_export["path"], (x, fidelity), ["input", "fidelity"])
    assert out.dtype == np.float32 and out.shape == (3, 3, 16, 16)
    assert np.abs(out - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))


def test_onnx_cli_needs_an_output(tmp_path, monkeypatch, capsys):
    """No ``-o``: a usage error (exit 2) naming the option, before any export."""
    from export import onnx as onnx_export

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: pytest.fail("exported without -o"))
    with pytest.raises(SystemExit) as exc:
        onnx_export.main(["--random-weights", "0", "--config", "v2"])
    assert exc.value.code == 2 and "--output" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- torch backend
def test_torch_backend_mode_ignores_case_and_spaces(monkeypatch):
    model = seeded_model(copy.deepcopy(SMALL_V2))
    assert TorchBackend(CPU, model, mode=" MAX ").mode == "max"
    monkeypatch.setenv("VQFR_TORCH_MODE", " Eager")
    assert TorchBackend(CPU, model).mode == "eager"


def test_torch_backend_auto_precision_is_fp32_in_eager_mode_and_fp16_in_max_mode_on_cuda():
    """``auto`` is fp32 (exact against the official outputs) unless the max mode runs on a GPU. Only the choice is
    made here (no GPU is touched)."""
    model = seeded_model(copy.deepcopy(SMALL_V2))
    assert TorchBackend(CPU, model, device="cuda")._precision() == "fp32"
    assert TorchBackend(CPU, model, device="cuda", mode="max")._precision() == "fp16"
    assert TorchBackend(CPU, model, mode="max")._precision() == "fp32"


def test_torch_backend_refuses_an_unknown_precision_by_name():
    from vqfr.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        TorchBackend(CPU, seeded_model(copy.deepcopy(SMALL_V2)), precision="fp8").load()


def test_torch_backend_leaves_the_callers_module_as_it_was():
    """The backend evaluates a copy: the caller's module stays in training mode and keeps its weights."""
    model = seeded_model(copy.deepcopy(SMALL_V2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with TorchBackend(CPU, model) as be:
        assert be.model is not model and not be.model.training
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_torch_backend_runs_each_face_at_its_own_fidelity_and_casts_float64_faces():
    model = seeded_model(copy.deepcopy(SMALL_V2), seed=4)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        expected = torch.cat([model(x[:1].float(), fidelity=0.0), model(x[1:].float(), fidelity=1.0)])
    with TorchBackend(CPU, model) as be:
        out = be.infer(x, torch.tensor([0.0, 1.0]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_torch_backend_face_size_of_a_v2_is_its_code_grid_times_its_patch():
    """SMALL_V2: a 4 x 4 code grid and three levels (patch 4) take 16 px faces; a v2 that selects codes by nearest
    neighbour (no prediction head) and a v1 take any multiple of the patch (None)."""
    from vqfr.backends.torch import _face_size

    with TorchBackend(CPU, seeded_model(copy.deepcopy(SMALL_V2))) as be:
        assert be.face_size == 16
    assert _face_size({**SMALL_V2, "code_selection_mode": "Nearest"}) is None
    assert _face_size({"type": "VQFRv1"}) is None


def test_check_results_in_the_sidecar_are_strict_json_rounded_to_a_hundredth_of_a_db():
    """``Agreement.to_dict`` (what ``--check`` writes to the sidecar): an exact match's infinite PSNR as the string
    "inf" (strict JSON has no Infinity), other PSNRs rounded to 0.01 dB, the max abs error as it is."""
    import math

    from export.compare import Agreement

    assert json.dumps(Agreement(0.0, math.inf).to_dict(), allow_nan=False) == '{"max_abs": 0.0, "psnr_db": "inf"}'
    assert Agreement(1.5e-5, 61.23456).to_dict() == {"max_abs": 1.5e-5, "psnr_db": 61.23}


@pytest.mark.parametrize("error,passes", [(0.9e-4, True), (1.1e-4, False)])
def test_fp32_check_tolerance_is_1e4_absolute_for_outputs_whose_peak_is_below_one(error, passes, monkeypatch):
    """The tolerance is 1e-4 x max(1, peak): an output whose peak is 0.25 is held to 1e-4, not to 0.25e-4 (PyTorch
    replaced by a constant 0.25 and onnxruntime by 0.25 + ``error``)."""
    pytest.importorskip("onnxruntime")
    from export import onnx as onnx_export
    from export import source
    from vqfr.errors import EngineError

    model = source.load_source_model(None, MICRO_V2, 0)
    spec = source.export_spec(model)
    monkeypatch.setattr(onnx_export.source, "engine_module",
                        lambda m: lambda x, *rest: torch.full((x.shape[0], 3, 16, 16), 0.25))
    monkeypatch.setattr(onnx_export, "run_onnxruntime",
                        lambda path, inputs, names: np.full((inputs[0].shape[0], 3, 16, 16), 0.25 + error, np.float32))
    if passes:
        assert onnx_export.check_onnx("m.onnx", model, spec, "fp32").max_abs == pytest.approx(error, rel=1e-3)
    else:
        with pytest.raises(EngineError, match=r"fp32 tolerance 0\.0001\)"):
            onnx_export.check_onnx("m.onnx", model, spec, "fp32")


# ------------------------------------------------------------------------------------------------ export.aoti
def test_aoti_cli_defaults_and_every_option_reach_the_export(tmp_path, monkeypatch, capsys):
    """``python -m export.aoti`` on the CPU (the other CLI test needs a GPU): by default a dynamic-batch fp32
    package for CUDA; every flag reaches export_aoti, and the path written is printed."""
    from pathlib import Path

    from export import aoti

    seen: list[dict] = []

    def export_aoti(weights, output, **kwargs):
        seen.append({"weights": weights, "output": output, **kwargs})
        return output

    monkeypatch.setattr(aoti, "export_aoti", export_aoti)
    out = tmp_path / "m.pt2"
    assert aoti.main(["--random-weights", "7", "-o", str(out)]) == 0
    assert seen[-1] == {"weights": None, "output": out, "config": None, "precision": "fp32", "device": "cuda",
                        "batch": None, "size": None, "dynamic_size": False, "random_weights": 7}
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert aoti.main(["--weights", "w.pth", "--config", "v1", "--device", "cpu", "--precision", "fp16", "--batch",
                      "2", "--size", "64", "--dynamic-size", "-o", str(out)]) == 0
    assert seen[-1] == {"weights": Path("w.pth"), "output": out, "config": "v1", "precision": "fp16",
                        "device": "cpu", "batch": 2, "size": 64, "dynamic_size": True, "random_weights": None}


def test_aoti_fp16_v2_keeps_its_last_conv_and_code_predictor_in_fp32():
    """In a v2 the fp32 islands are ``decoder.conv_out.2`` and ``feat2index``: their weights stay float32 and they
    return float32 whatever dtype they are given."""
    from export import source
    from export.aoti import fp16_model

    half = fp16_model(source.load_source_model(None, MICRO_V2, 0))
    conv = half.decoder.conv_out[2]
    assert conv.inner.weight.dtype == torch.float32 and half.encoder.conv_in.weight.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in half.feat2index.parameters())
    y = conv(torch.rand(1, conv.inner.in_channels, 4, 4, dtype=torch.float16))
    assert y.dtype == torch.float32


def test_aoti_export_passes_our_own_errors_through_unwrapped(tmp_path, monkeypatch):
    """An error of ours while packaging (here: the output cannot be written) reaches the user as itself, with its
    own fix, not as "AOTInductor export failed ... report this with the torch version"."""
    from export import aoti
    from vqfr.errors import OutputError

    def unwritable(path):
        raise OutputError("cannot write here", path=path, fix="pick a writable folder")

    monkeypatch.setattr(aoti, "trace_engine", lambda *args: object())
    monkeypatch.setattr(aoti, "atomic_path", unwritable)
    with pytest.raises(OutputError, match="cannot write here") as exc:
        aoti.export_aoti(None, tmp_path / "m.pt2", config=MICRO_V2, random_weights=0, device="cpu")
    assert exc.value.fix == "pick a writable folder"


# ---------------------------------------------------------------------------------------------- backends.aoti
def _package_meta(**built_with):
    from vqfr.sidecar import EngineMeta, TensorSpec

    return EngineMeta(arch="VQFRv1", options={}, face_size=16, precision="fp32",
                      inputs=(TensorSpec("input", (-1, 3, 16, 16)),), outputs=(TensorSpec("output", (-1, 3, 16, 16)),),
                      built_with=built_with)


def test_aoti_backend_refuses_a_package_for_another_device_or_torch_release():
    """A CUDA package on the CPU row, or one built with another torch release, is refused with the reason a user
    reads; the same release with another local part, on its own device, is accepted."""
    from vqfr.backends.aoti import AOTIBackend

    cpu_row = next(e for e in BACKENDS if e.label == "aoti[cpu]")
    release = torch.__version__.split("+")[0]
    assert AOTIBackend.engine_problem(cpu_row, _package_meta(device="cuda", torch=release)) == (
        "the package was compiled for cuda")
    assert AOTIBackend.engine_problem(cpu_row, _package_meta(device="cpu", torch="1.0.0")) == (
        f"package built with torch 1.0.0, this is torch {torch.__version__}; rebuild it")
    assert AOTIBackend.engine_problem(cpu_row, _package_meta(device="cpu", torch=release + "+local")) is None


def test_aoti_backend_sends_float64_faces_and_fidelities_as_float32(tmp_path, monkeypatch):
    """A package reads its inputs' memory as float32 whatever tensors it is given: float64 faces and fidelities are
    cast first, and the output keeps only the faces given."""
    from vqfr.backends.aoti import AOTIBackend
    from vqfr.sidecar import EngineMeta, TensorSpec

    calls = []

    def package(*args):
        calls.append([(a.dtype, tuple(a.shape)) for a in args])
        return [args[0] * 2]

    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path, device_index=-1: package)
    meta = EngineMeta(arch="VQFRv2", options={}, face_size=16, precision="fp32",
                      inputs=(TensorSpec("input", (-1, 3, 16, 16)), TensorSpec("fidelity", (-1,))),
                      outputs=(TensorSpec("output", (-1, 3, 16, 16)),), extra={"device": "cpu"})
    backend = AOTIBackend(next(e for e in BACKENDS if e.label == "aoti[cpu]"), tmp_path / "m.pt2", meta=meta)
    backend.load()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    out = backend.infer(x, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert calls == [[(torch.float32, (2, 3, 16, 16)), (torch.float32, (2,))]]
    torch.testing.assert_close(out, (x * 2).float(), atol=0, rtol=0)


def test_aoti_backend_classes_a_lower_case_cuda_load_failure_as_unavailable(tmp_path, monkeypatch):
    """torch words CUDA failures in either case ("cuda error: no kernel image ..."): both say the machine cannot
    run the package (BackendUnavailable), not that the file is broken."""
    from vqfr.backends.aoti import AOTIBackend
    from vqfr.errors import BackendUnavailable

    def load(path, device_index=-1):
        raise RuntimeError("cuda error: no kernel image is available for execution on the device")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", load)
    backend = AOTIBackend(next(e for e in BACKENDS if e.label == "aoti[cpu]"), tmp_path / "m.pt2",
                          meta=_package_meta(device="cpu"))
    with pytest.raises(BackendUnavailable, match="cannot start the package here"):
        backend.load()
