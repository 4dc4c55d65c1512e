"""Backends, sidecars, the CLI and the detectors: behaviours users rely on that no other test file pinned down
(found by mutation testing of vqfr/backends, vqfr/sidecar.py, vqfr/atomic.py, vqfr/cli.py and vqfr/faces).

Engines here are hand-built ONNX graphs whose output is known exactly (``output = input * fidelity``), so the
onnxruntime backend's plumbing (which input gets which tensor, the output name, dtype casts, batch padding) is checked
against arithmetic rather than against itself. Everything runs on the CPU in seconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import vqfr
from vqfr.backends.base import BACKENDS
from vqfr.errors import EngineError
from vqfr.sidecar import EngineMeta, TensorSpec, write_sidecar


def _row(label: str):
    return next(e for e in BACKENDS if e.label == label)


def _meta(size: int = 16, batch: int = -1, precision: str = "fp32", output: str = "output", **kw) -> EngineMeta:
    return EngineMeta(arch="VQFRv2", options={}, face_size=size, precision=precision,
                      inputs=(TensorSpec("input", (batch, 3, size, size)), TensorSpec("fidelity", (batch,))),
                      outputs=(TensorSpec(output, (batch, 3, size, size)),), **kw)


def _scale_graph(path: Path, batch: int = -1, fp16: bool = False, output: str = "restored") -> Path:
    """A v2-shaped ONNX engine computing ``output = input * fidelity`` (per face), with its sidecar."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    dtype = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    b = "B" if batch < 0 else batch
    nodes = [helper.make_node("Reshape", ["fidelity", "shape"], ["f4"])]
    if fp16:
        nodes.append(helper.make_node("Cast", ["f4"], ["f4h"], to=TensorProto.FLOAT16))
    nodes.append(helper.make_node("Mul", ["input", "f4h" if fp16 else "f4"], [output]))
    graph = helper.make_graph(
        nodes, "scale",
        [helper.make_tensor_value_info("input", dtype, [b, 3, 16, 16]),
         helper.make_tensor_value_info("fidelity", TensorProto.FLOAT, [b])],
        [helper.make_tensor_value_info(output, dtype, [b, 3, 16, 16])],
        [helper.make_tensor("shape", TensorProto.INT64, [4], [-1, 1, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    write_sidecar(path, _meta(batch=batch, precision="fp16" if fp16 else "fp32", output=output))
    return path


def _faces(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------------------------- onnxruntime
def test_onnxruntime_feeds_each_face_its_own_fidelity_and_reads_the_sidecars_output(tmp_path):
    engine = _scale_graph(tmp_path / "scale.onnx")
    rt = vqfr.Runtime(engine, device="cpu")
    assert rt.entry.label == "onnxruntime[CPU]"
    x, f = _faces(3), torch.tensor([0.0, 1.0, 0.5])
    np.testing.assert_allclose(rt.infer(x, f).numpy(), (x * f[:, None, None, None]).numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(rt.infer(x, 0.25).numpy(), (x * 0.25).numpy(), atol=1e-6, rtol=0)


def test_onnxruntime_pads_a_fixed_batch_fp16_engine_and_returns_only_the_faces_given(tmp_path):
    engine = _scale_graph(tmp_path / "scale_b2_fp16.onnx", batch=2, fp16=True)
    rt = vqfr.Runtime(engine, device="cpu", max_batch=4)
    assert rt.backend.precision == "fp16" and rt.batch_size == 2
    x, f = _faces(3, seed=1), torch.tensor([1.0, 0.5, 0.25])
    for n in (1, 3):
        y = rt.infer(x[:n], f[:n])
        assert y.shape == (n, 3, 16, 16)
        np.testing.assert_allclose(y.float().numpy(), (x[:n] * f[:n, None, None, None]).numpy(), atol=2e-3, rtol=0)


def test_onnxruntime_reads_the_image_and_output_types_by_name(tmp_path):
    """A graph listing ``fidelity`` first, with fp16 images and an fp32 output: the images' type was read from the
    first input (fidelity, fp32), so fp32 images were fed to the fp16 graph; and the GPU path bound an output of the
    input's type."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Reshape", ["fidelity", "shape"], ["f4"]),
             helper.make_node("Cast", ["input"], ["x32"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x32", "f4"], ["output"])]
    graph = helper.make_graph(
        nodes, "scale",
        [helper.make_tensor_value_info("fidelity", TensorProto.FLOAT, ["B"]),
         helper.make_tensor_value_info("input", TensorProto.FLOAT16, ["B", 3, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 3, 16, 16])],
        [helper.make_tensor("shape", TensorProto.INT64, [4], [-1, 1, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    engine = tmp_path / "fidelity_first.onnx"
    onnx.save(model, engine)
    write_sidecar(engine, _meta(precision="fp16"))
    rt = vqfr.Runtime(engine, device="cpu")
    assert (rt.backend.in_dtype, rt.backend.out_dtype) == ("float16", "float32")
    x, f = _faces(2, seed=3), torch.tensor([0.5, 1.0])
    expected = x.half().float() * f[:, None, None, None]
    np.testing.assert_allclose(rt.infer(x, f).float().numpy(), expected.numpy(), atol=1e-6, rtol=0)


def test_onnxruntime_refuses_a_precision_the_engine_was_not_exported_in(tmp_path):
    """An fp16 engine asked for fp32 (or an fp32 one for fp16) runs in its own precision only: refused before the
    session is built, naming the re-export, rather than silently serving the other precision."""
    from vqfr.backends.onnxruntime import OnnxRuntimeBackend

    pytest.importorskip("onnxruntime")
    engine = tmp_path / "m.onnx"
    engine.write_bytes(b"never parsed: the precision is refused first")
    for exported, asked in (("fp16", "fp32"), ("fp32", "fp16"), ("fp32", "bf16")):
        backend = OnnxRuntimeBackend(_row("onnxruntime[CPU]"), engine, meta=_meta(precision=exported),
                                     precision=asked)
        with pytest.raises(EngineError, match=f"was exported in {exported}; precision {asked} was asked"):
            backend.load()


def test_tensorrt_ep_builds_fp16_when_asked_and_runs_on_the_backends_gpu(tmp_path):
    """The TensorRT EP is the one row that may build fp16 from an fp32 graph (``--precision fp16``); ``auto`` keeps
    the graph's precision. The EP and the CUDA EP run on the device index the backend was given."""
    from vqfr.backends.onnxruntime import OnnxRuntimeBackend

    path = tmp_path / "m.onnx"
    row = _row("onnxruntime[TensorRT EP]")

    def options(precision: str, meta: EngineMeta | None = None, device: str = "cuda:1"):
        meta = meta or _meta(file_sha256="c" * 64)
        providers = OnnxRuntimeBackend(row, path, meta=meta, precision=precision, device=device)._providers(path)
        assert [p if isinstance(p, str) else p[0] for p in providers] == [
            "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        return dict(providers[0][1]), dict(providers[1][1])

    trt, cuda = options("fp16")
    assert trt["trt_fp16_enable"] is True and trt["device_id"] == 1 and cuda["device_id"] == 1
    assert trt["trt_engine_cache_path"] == str(tmp_path / "m.onnx.trt_cache" / ("c" * 16))
    assert options("auto")[0]["trt_fp16_enable"] is False
    assert options("auto", _meta(precision="fp16", file_sha256="c" * 64))[0]["trt_fp16_enable"] is True


def test_an_engine_suffix_in_capitals_loads_like_a_lower_case_one(tmp_path):
    """``MODEL.ONNX`` (a file copied from a case-insensitive file system) is the same kind of engine."""
    from vqfr.backends.base import MODULE, engine_kind

    assert engine_kind("a/MODEL.ONNX") == ".onnx" and engine_kind("x.Engine") == ".engine"
    assert engine_kind(torch.nn.Identity()) == MODULE
    engine = _scale_graph(tmp_path / "SCALE.ONNX")
    rt = vqfr.Runtime(engine, device="cpu")
    assert rt.entry.label == "onnxruntime[CPU]"
    x = _faces(2)
    np.testing.assert_allclose(rt.infer(x, 0.5).numpy(), (x * 0.5).numpy(), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- tensorrt, aoti
def test_tensorrt_engines_need_the_same_patch_release_unless_version_compatible():
    """A TensorRT plan runs only on the release that built it (major.minor.patch); the build number may differ."""
    from vqfr.backends.tensorrt import compatibility_problem

    meta = _meta(built_with={"tensorrt": "10.8.0.43", "compute_capability": "9.0", "gpu": "NVIDIA H100"})
    assert compatibility_problem(meta, "10.8.0.43", (9, 0)) is None
    assert compatibility_problem(meta, "10.8.0.50", (9, 0)) is None
    assert "this is TensorRT 10.8.1.12" in compatibility_problem(meta, "10.8.1.12", (9, 0))
    assert "this is TensorRT 10.7.0.23" in compatibility_problem(meta, "10.7.0.23", (9, 0))
    compatible = dataclasses.replace(meta, extra={"version_compatible": True})
    assert compatibility_problem(compatible, "10.8.1.12", (9, 0)) is None
    assert "10.7.0.23" in compatibility_problem(compatible, "10.7.0.23", (9, 0))  # never an earlier release
    assert "compute capability 9.0" in compatibility_problem(compatible, "10.8.0.43", (8, 9))
    hardware = dataclasses.replace(meta, extra={"hardware_compatibility": "ampere_plus"})
    assert compatibility_problem(hardware, "10.8.0.43", (8, 9)) is None
    assert "10.9.0.34" in compatibility_problem(hardware, "10.9.0.34", (9, 0))  # hardware-compatible only


def test_aoti_refuses_a_precision_the_package_was_not_compiled_in(tmp_path):
    from vqfr.backends.aoti import AOTIBackend

    package = tmp_path / "m.pt2"
    package.write_bytes(b"never opened: the precision is refused first")
    for compiled, asked in (("fp16", "fp32"), ("fp32", "fp16")):
        meta = _meta(precision=compiled, extra={"device": "cpu"})
        with pytest.raises(EngineError, match=f"was compiled in {compiled}; precision {asked} was asked"):
            AOTIBackend(_row("aoti[cpu]"), package, meta=meta, precision=asked).load()


# ----------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv, message", [
    (["-f", "1.5"], "--fidelity must be in [0, 1]"),
    (["-f", "-0.1"], "--fidelity must be in [0, 1]"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--io-threads", "0"], "--io-threads must be at least 1"),
    (["--max-pixels", "0"], "--max-pixels must be positive"),
    (["--detector-max-pixels", "0"], "--detector-max-pixels must be positive"),
    (["--suffix", ".."], "--suffix must be a plain name part"),
    (["--suffix", "a/b"], "--suffix must be a plain name part"),
    (["--suffix", ""], "--suffix must be a plain name part"),
])
def test_cli_usage_errors_exit_2_before_anything_is_loaded(tmp_path, capsys, argv, message):
    from vqfr.cli import EXIT_USAGE, main

    with pytest.raises(SystemExit) as exc:
        main(["-i", str(tmp_path / "missing.png"), "-o", str(tmp_path / "out"), *argv])
    assert exc.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_never_takes_hidden_or_partial_files_of_a_folder_as_inputs(tmp_path):
    """An interrupted run's temporary outputs (``.x.png.1a2b3c4d.partial.png``) and other hidden files of an input
    folder are not inputs; non-image files are counted as ignored."""
    from vqfr.cli import _collect_inputs

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "B.JPG").write_bytes(b"")
    (tmp_path / ".a.png.1a2b3c4d.partial.png").write_bytes(b"")
    (tmp_path / ".hidden.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub.png").mkdir()
    files, ignored = _collect_inputs(str(tmp_path))
    assert [f.name for f in files] == ["B.JPG", "a.png"] and ignored == 1


def test_output_names_differ_without_regard_to_case_whatever_the_input_order(tmp_path):
    """On a case-insensitive file system (macOS, Windows) ``X_png_00.png`` and ``x_png_00.png`` are one file."""
    from vqfr.cli import _output_stems

    files = [tmp_path / "a" / "X.PNG", tmp_path / "b" / "x.png", tmp_path / "c" / "X.png"]
    stems = _output_stems(files)
    assert len({s.casefold() for s in stems.values()}) == 3, stems


# ----------------------------------------------------------------------------------------------- detectors
class _Fixed(torch.nn.Module):
    """A stand-in for R-Net / O-Net: the same outputs for every crop."""

    def __init__(self, *outputs: list[float]):
        super().__init__()
        self.outputs = [torch.tensor(o, dtype=torch.float32) for o in outputs]

    def forward(self, x):
        return tuple(o.expand(x.shape[0], *o.shape) if o.dim() else o.expand(x.shape[0]) for o in self.outputs)


def _mtcnn_with(monkeypatch, candidates, rnet, onet, **kw):
    from vqfr.faces.mtcnn import MTCNN

    det = MTCNN(**kw)
    monkeypatch.setattr(det, "_proposals", lambda rgb: np.asarray(candidates, np.float32).copy())
    det.rnet, det.onet = rnet, onet
    return det


def test_mtcnn_refines_boxes_and_places_landmarks_from_its_nets_outputs(monkeypatch):
    """Stages 2 and 3 decoded by hand: each box edge moves by its regression times the box side; landmarks are
    fractions of the final square box (5 x, then 5 y), pixel centres at integers."""
    marks = [0.3, 0.7, 0.5, 0.35, 0.65, 0.4, 0.4, 0.6, 0.8, 0.8]
    det = _mtcnn_with(monkeypatch, [[50, 60, 110, 120, 0.9]], _Fixed(0.8, [0.0, 0.0, 0.0, 0.0]),
                      _Fixed(0.99, [0.1, 0.0, 0.1, 0.0], marks))
    (face,) = det.detect(np.zeros((200, 200, 3), np.uint8))
    np.testing.assert_allclose(face.box, [56, 60, 116, 120], atol=1e-4)
    assert face.score == pytest.approx(0.99)
    expected = np.stack([56 + np.array(marks[:5]) * 60, 60 + np.array(marks[5:]) * 60], 1) - 0.5
    np.testing.assert_allclose(face.landmarks, expected, atol=1e-4)
    le, re, nose, lm, rm = face.landmarks
    assert le[0] < nose[0] < re[0] and max(le[1], re[1]) < nose[1] < min(lm[1], rm[1])


def test_mtcnn_applies_each_stages_own_threshold_and_a_final_min_overlap_nms(monkeypatch):
    marks = [0.5] * 10
    # R-Net scores 0.65: above P-Net's 0.6 but below R-Net's 0.7, so nothing reaches O-Net
    det = _mtcnn_with(monkeypatch, [[50, 60, 110, 120, 0.9]], _Fixed(0.65, [0.0] * 4), _Fixed(0.99, [0.0] * 4, marks))
    assert det.detect(np.zeros((200, 200, 3), np.uint8)) == []
    # O-Net's 0.95 (not R-Net's 0.7) decides the final faces
    det = _mtcnn_with(monkeypatch, [[50, 60, 110, 120, 0.9]], _Fixed(0.8, [0.0] * 4), _Fixed(0.9, [0.0] * 4, marks))
    assert det.detect(np.zeros((200, 200, 3), np.uint8)) == []
    # a box inside another (IoU 0.06, but all of its area) is one face after the final NMS
    det = _mtcnn_with(monkeypatch, [[0, 0, 120, 120, 0.9], [30, 30, 60, 60, 0.8]], _Fixed(0.8, [0.0] * 4),
                      _Fixed(0.99, [0.0] * 4, marks))
    (face,) = det.detect(np.zeros((200, 200, 3), np.uint8))
    np.testing.assert_allclose(face.box, [0, 0, 120, 120], atol=1e-4)


def test_retinaface_feeds_its_network_the_bgr_photo_minus_the_official_bgr_mean(tmp_path):
    from vqfr.faces.retinaface import RetinaFace, RetinaFaceNet, prior_boxes

    weights = tmp_path / "detection_Resnet50_Final.pth"
    torch.save(RetinaFaceNet().state_dict(), weights)
    det = RetinaFace(weights)
    seen = []

    class Record(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            n = len(prior_boxes(*x.shape[2:]))
            return torch.zeros(1, n, 4), torch.zeros(1, n), torch.zeros(1, n, 10)

    det.net = Record()
    img = np.zeros((32, 48, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 120, 250  # B, G, R
    assert det.detect(img) == []
    (x,) = seen
    assert x.shape == (1, 3, 32, 48) and x.dtype == torch.float32
    np.testing.assert_allclose(x[0, :, 5, 7].numpy(), [10 - 104, 120 - 117, 250 - 123])


def test_the_parser_pastes_the_official_face_classes_only(tmp_path):
    """Labels 1..13 and 15 are pasted; background, hat, neck and cloth (0, 14, 16, 17, 18) are not."""
    from vqfr.faces.parsing import NetworkParser

    class Labels(torch.nn.Module):
        def forward(self, x):
            n, _, h, w = x.shape
            label = torch.arange(w).remainder(19).expand(n, h, w)  # column c has class c % 19
            return torch.nn.functional.one_hot(label, 19).permute(0, 3, 1, 2).float()

    path = tmp_path / "parser.pt"
    torch.jit.save(torch.jit.trace(Labels(), torch.zeros(1, 3, 19, 19)), path)
    parser = NetworkParser(path, size=19)
    masks = parser.regions(np.zeros((2, 19, 19, 3), np.uint8))
    assert masks.shape == (2, 19, 19)
    pasted = [c for c in range(19) if masks[0, 5, c] > 0.5]
    assert pasted == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15]


# ----------------------------------------------------------------------------------------------- sidecar
@pytest.mark.parametrize("precision", ["int8", "FP16", "float32"])
def test_a_sidecar_with_an_unknown_precision_is_refused(tmp_path, precision):
    import json

    from vqfr.sidecar import read_sidecar, sidecar_path

    engine = tmp_path / "m.onnx"
    sidecar_path(engine).write_text(json.dumps(_meta().to_dict() | {"precision": precision}))
    with pytest.raises(EngineError, match=f"precision '{precision}' is not one of"):
        read_sidecar(engine)
