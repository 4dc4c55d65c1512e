"""vqfr.Runtime: backend choice, the aligned path against the official pre/post-processing, golden parity through
the runtime, engine and weight resolution, and clear errors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import vqfr
from tests.conftest import TINY_V1, TINY_V2, golden, needs_golden, seeded_model
from vqfr.backends import BACKEND_NAMES, BACKENDS, candidates
from vqfr.backends.tensorrt import compatibility_problem
from vqfr.errors import BackendUnavailable, CheckpointError, ConfigError, EngineError, InputError
from vqfr.imaging import to_images, to_tensor
from vqfr.runtime import WEIGHTS_ENV, Runtime, find_weights
from vqfr.sidecar import EngineMeta, TensorSpec, sidecar_path, write_sidecar

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def tiny_v2():
    return seeded_model(TINY_V2, seed=1)


@pytest.fixture(scope="module")
def rt_v2(tiny_v2):
    return Runtime(tiny_v2, device="cpu")


def _faces(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _official(model, bgr: np.ndarray, fidelity: float) -> np.ndarray:
    """The official demo's processing: /255, BGR->RGB, (x-0.5)/0.5, model, clamp, (x+1)/2*255, round, RGB->BGR."""
    x = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1].astype(np.float32) / 255.0)).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = model(((x - 0.5) / 0.5), fidelity=fidelity) if fidelity is not None else model((x - 0.5) / 0.5)
    y = ((y[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()[..., ::-1]
    return (y * 255.0).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------- backend table
def test_table_is_ordered_fastest_first_and_feeds_names():
    labels = [e.label for e in BACKENDS]
    assert labels[0] == "tensorrt" and labels[-1] == "torch[cpu]"
    assert labels.index("onnxruntime[TensorRT EP]") < labels.index("onnxruntime[CUDA EP]") < labels.index(
        "torch[cuda]") < labels.index("onnxruntime[CPU]") < labels.index("torch[cpu]")
    assert set(BACKEND_NAMES) == {"auto", "tensorrt", "onnxruntime", "aoti", "torch"}
    assert [e.label for e in candidates(".onnx", "auto", "cpu")] == ["onnxruntime[CPU]"]
    assert [e.name for e in candidates(".pth")] == ["torch", "torch"]


def test_available_explains_every_no():
    rows = {a.entry.label: a for a in Runtime.available()}
    assert set(rows) == {e.label for e in BACKENDS}
    assert rows["torch[cpu]"].usable
    for a in rows.values():
        assert a.usable or a.reason, a
    if not torch.cuda.is_available():
        assert not rows["tensorrt"].usable and "CUDA" in rows["tensorrt"].reason
        assert not rows["torch[cuda]"].usable and "CUDA" in rows["torch[cuda]"].reason
        assert not rows["onnxruntime[CUDA EP]"].usable and "CUDAExecutionProvider" in rows[
            "onnxruntime[CUDA EP]"].reason
    import importlib.util

    spec = importlib.util.find_spec("tensorrt")
    if spec is None or spec.origin is None:
        assert "tensorrt is not installed (pip install 'vqfr-deploy[trt]')" in rows["tensorrt"].reason
    assert "tensorrt" in str(rows["tensorrt"])


def test_available_narrows_to_the_device_and_checks_its_name():
    assert [a.entry.label for a in Runtime.available(device="cpu")] == ["onnxruntime[CPU]", "aoti[cpu]", "torch[cpu]"]
    assert {a.entry.device for a in Runtime.available(device="cuda:1")} == {"cuda"}
    with pytest.raises(BackendUnavailable, match="unknown device"):
        Runtime.available(device="nonsense")


def test_wrong_backend_for_engine_is_refused(tmp_path, tiny_v2):
    ckpt = vqfr.save_safetensors(tiny_v2, tmp_path / "tiny.safetensors")
    with pytest.raises(BackendUnavailable, match=r"tiny.safetensors: backend=tensorrt on device=auto cannot load "
                                                 r"\.safetensors files.*load \.safetensors files: torch \(cuda, cpu\)"):
        Runtime(ckpt, backend="tensorrt")
    with pytest.raises(BackendUnavailable, match="tiny.safetensors: unknown backend 'tensorrtx'.*auto, tensorrt, "
                                                 "onnxruntime"):
        Runtime(ckpt, backend="tensorrtx")
    with pytest.raises(BackendUnavailable, match="tiny.safetensors: unknown device 'gpu'.*cuda:N"):
        Runtime(ckpt, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match=r"torch\[cuda\]: no CUDA"):
            Runtime(ckpt, device="cuda")


def test_a_backend_that_cannot_load_the_file_names_the_file_and_the_backends_that_can(tmp_path):
    """``Runtime("model.onnx", backend="torch")`` said "no torch backend on device auto loads .onnx engines", naming
    neither the file nor the backends that load it. It is refused on the suffix, before the sidecar is read."""
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"not read")
    for sidecar in (False, True):  # without a sidecar the backend is still the error reported
        if sidecar:
            write_sidecar(onnx, _meta())
        with pytest.raises(BackendUnavailable) as err:
            Runtime(onnx, backend="torch")
        assert err.value.path == onnx and str(err.value).startswith(f"{onnx}: ")
        assert "backend=torch" in err.value.reason and ".onnx" in err.value.reason
        assert "onnxruntime (cuda, cpu)" in err.value.fix and "tensorrt" not in err.value.fix
    with pytest.raises(BackendUnavailable, match=r"model\.onnx: .*backend=torch"):
        Runtime.available(onnx, backend="torch")
    sidecar_path(onnx).unlink()  # Runtime.available too reports the backend, not the missing sidecar
    with pytest.raises(BackendUnavailable, match=r"model\.onnx: .*backend=torch"):
        Runtime.available(onnx, backend="torch")
    # a backend that loads the suffix, on a device it does not run on
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not read")
    with pytest.raises(BackendUnavailable) as err:
        Runtime(engine, device="cpu")
    assert err.value.path == engine and "device=cpu" in err.value.reason and "tensorrt (cuda)" in err.value.fix
    # a suffix no backend loads
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"not read")
    with pytest.raises(BackendUnavailable) as err:
        Runtime(weights, backend="torch")
    assert err.value.path == weights and "no backend loads .bin files" in err.value.fix


def test_auto_picks_first_usable_row(rt_v2):
    usable = [a.entry for a in Runtime.available(rt_v2.engine) if a.usable]
    assert rt_v2.entry == usable[0]
    assert rt_v2.arch == "VQFRv2" and rt_v2.face_size == 64 and rt_v2.precision == "fp32"


# ----------------------------------------------------------------------------------------------- aligned path
@pytest.mark.parametrize("fidelity", [0.0, 0.7])
def test_aligned_restore_is_the_official_model_output(rt_v2, tiny_v2, fidelity):
    face = _faces(1)[0]
    got = rt_v2.restore(face, aligned=True, fidelity=fidelity)
    want = _official(tiny_v2, face, fidelity)
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want).max() <= 1


def test_aligned_v1_and_face_size():
    model = seeded_model(TINY_V1, seed=2)
    rt = Runtime(model, face_size=64)
    face = _faces(1, seed=3)[0]
    assert np.abs(rt.restore(face, aligned=True).astype(int) - _official(model, face, None)).max() <= 1
    assert rt.version == 1
    with pytest.raises(ConfigError, match="multiple of 32"):
        Runtime(model, face_size=70)


def test_the_callers_module_is_left_as_it_was():
    model = seeded_model(TINY_V2, seed=5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rt = Runtime(model, device="cpu")
    rt.restore(_faces(1, seed=6)[0], aligned=True)
    assert model.training and rt.backend.model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_aligned_resizes_squares_and_refuses_other_shapes(rt_v2, tiny_v2):
    import cv2

    big = _faces(1, size=96, seed=4)[0]
    want = _official(tiny_v2, cv2.resize(big, (64, 64), interpolation=cv2.INTER_LINEAR), 0.0)
    assert np.abs(rt_v2.restore(big, aligned=True).astype(int) - want).max() <= 1
    with pytest.raises(InputError, match="not square"):
        rt_v2.restore(np.zeros((64, 80, 3), np.uint8), aligned=True)


def test_odd_formats_are_converted(rt_v2):
    face = _faces(1, seed=5)[0]
    grey = face[:, :, 1]
    rgba = np.concatenate([face, np.full((64, 64, 1), 7, np.uint8)], axis=2)
    wide = face.astype(np.uint16) * 257
    base = rt_v2.restore(face, aligned=True)
    assert np.array_equal(rt_v2.restore(rgba, aligned=True), base)
    assert np.array_equal(rt_v2.restore(wide, aligned=True), base)
    assert np.array_equal(rt_v2.restore(grey, aligned=True), rt_v2.restore(np.repeat(grey[..., None], 3, 2),
                                                                          aligned=True))
    before = face.copy()
    rt_v2.restore(face, aligned=True)
    assert np.array_equal(face, before), "the input array must never be modified"


def test_batches_match_single_calls(tiny_v2):
    rt = Runtime(tiny_v2, max_batch=2)
    faces = list(_faces(5, seed=6))
    batch = rt.restore_batch(faces, aligned=True)
    for face, out in zip(faces, batch, strict=True):
        assert np.abs(out.astype(int) - rt.restore(face, aligned=True)).max() <= 1


def test_restore_batch_takes_an_iterator_of_paths(rt_v2, tmp_path):
    """``rt.restore_batch(folder.glob("*.png"))``: a generator is read once, like a list (it was read twice, and the
    second pass found it empty: ``ValueError: zip() argument 2 is shorter than argument 1``)."""
    import cv2

    faces = _faces(2, seed=8)
    for i, face in enumerate(faces):
        cv2.imwrite(str(tmp_path / f"{i}.png"), face)
    expected = rt_v2.restore_batch(sorted(tmp_path.glob("*.png")), aligned=True)
    for aligned in (True, False):
        got = rt_v2.restore_batch(iter(sorted(tmp_path.glob("*.png"))), aligned=aligned)
        assert len(got) == 2
    assert all(np.array_equal(a, b) for a, b in zip(
        rt_v2.restore_batch((p for p in sorted(tmp_path.glob("*.png"))), aligned=True), expected, strict=True))
    assert rt_v2.restore_faces_batch(iter([])) == []
    with pytest.raises(InputError, match="0.png: restore_batch takes several images, got one path"):
        rt_v2.restore_batch(str(tmp_path / "0.png"))  # used to read "/", "t", "m", "p" ... as files
    with pytest.raises(InputError, match=r"got one image array of shape \(64, 64, 3\)"):
        rt_v2.restore_batch(faces[0])  # its 64 rows of pixels were taken for 64 grey images
    stacked = rt_v2.restore_batch(np.stack(faces), aligned=True)  # [N, H, W, 3]: a batch
    assert all(np.array_equal(a, b) for a, b in zip(stacked, expected, strict=True))


def test_a_path_starting_with_a_tilde_is_read_from_the_home_folder(rt_v2, tmp_path, monkeypatch):
    """``Runtime("~/VQFR_v2.pth")`` expands ``~``; ``restore("~/face.png")`` said the file did not exist."""
    import cv2

    face = _faces(1, seed=9)[0]
    cv2.imwrite(str(tmp_path / "face.png"), face)
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = rt_v2.restore(face, aligned=True)
    for path in ("~/face.png", Path("~/face.png")):
        assert np.array_equal(rt_v2.restore(path, aligned=True), expected)
    assert np.array_equal(rt_v2.restore_batch(["~/face.png"], aligned=True)[0], expected)


def test_infer_takes_one_fidelity_per_face(rt_v2, tiny_v2):
    x = to_tensor(_faces(2, seed=7))
    f = torch.tensor([0.0, 1.0])
    got = rt_v2.infer(x, f)
    with torch.no_grad():
        for i in range(2):
            torch.testing.assert_close(got[i:i + 1], tiny_v2(x[i:i + 1], fidelity=float(f[i])), atol=1e-4, rtol=0)
    torch.testing.assert_close(rt_v2.infer(x.numpy(), f.numpy()), got, atol=0, rtol=0)
    with pytest.raises(InputError, match=r"infer takes \[B, 3, 64, 64\]"):
        rt_v2.infer(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ConfigError, match=r"fidelity must be in \[0, 1\]"):
        rt_v2.restore(_faces(1)[0], aligned=True, fidelity=1.5)


# ----------------------------------------------------------------------------------------------- golden parity
@needs_golden
@pytest.mark.shared
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_golden_through_the_runtime(version):
    info, ckpt, io = golden(version)
    size = info["input_shape"][-1]
    with Runtime(ckpt, config=info["network_options"], face_size=size if version == "v1" else None) as rt:
        assert rt.face_size == size
        for f in (0.0, 0.5) if version == "v2" else (None,):
            got = rt.infer(io["input"], f)
            key = f"outputs/fidelity_{f}/main_dec" if version == "v2" else "outputs/main_dec"
            torch.testing.assert_close(got, io[key], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------- weights
def test_random_weights_warn_loudly(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    rt = Runtime(config=copy.deepcopy(TINY_V2))
    assert rt.random_weights
    err = capsys.readouterr().err
    assert "RANDOM-WEIGHT VQFRv2" in err and "MEANINGLESS" in err and WEIGHTS_ENV in err
    again = Runtime(config=copy.deepcopy(TINY_V2))
    face = _faces(1)[0]
    assert np.array_equal(rt.restore(face, aligned=True), again.restore(face, aligned=True)), "seeded"
    assert "random weights" in repr(rt)


def test_weights_found_through_env(monkeypatch, tmp_path, tiny_v2, capsys):
    path = vqfr.save_safetensors(tiny_v2, tmp_path / "VQFR_v2.safetensors")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    assert find_weights("VQFRv2") == path
    rt = Runtime(config=copy.deepcopy(TINY_V2))
    assert not rt.random_weights and "RANDOM" not in capsys.readouterr().err
    face = _faces(1)[0]
    assert np.array_equal(rt.restore(face, aligned=True), Runtime(tiny_v2).restore(face, aligned=True))
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="VQFR_WEIGHTS"):
        Runtime(config=copy.deepcopy(TINY_V2))


@pytest.mark.parametrize("xdg", ["", "relative/cache"])
def test_weights_cache_ignores_an_empty_or_relative_xdg_cache_home(monkeypatch, tmp_path, tiny_v2, xdg):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.chdir(tmp_path)
    (tmp_path / xdg / "vqfr").mkdir(parents=True)
    vqfr.save_safetensors(tiny_v2, tmp_path / xdg / "vqfr" / "VQFR_v2.safetensors")
    assert find_weights("VQFRv2") is None, "a folder under the working directory is not the cache"
    home_cache = tmp_path / "home" / ".cache" / "vqfr"
    home_cache.mkdir(parents=True)
    path = vqfr.save_safetensors(tiny_v2, home_cache / "VQFR_v2.safetensors")
    assert find_weights("VQFRv2") == path


def test_missing_and_wrong_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Runtime(tmp_path / "nope.pth")
    with pytest.raises(EngineError, match="does not exist"):
        Runtime(tmp_path / "nope.onnx")
    vqgan = seeded_model(_vqgan_options())
    with pytest.raises(ConfigError, match="not a VQFR restoration model"):
        Runtime(vqgan)


def _vqgan_options() -> dict:
    opts = {k: v for k, v in copy.deepcopy(TINY_V2).items()
            if k not in ("inpfeat_dim", "align_opt", "code_selection_mode")}
    opts["type"] = "VQGANv2"
    return opts


# ----------------------------------------------------------------------------------------------- engines
def _meta(**built) -> EngineMeta:
    return EngineMeta(arch="VQFRv2", options=copy.deepcopy(TINY_V2), face_size=64, precision="fp32",
                      inputs=(TensorSpec("input", (-1, 3, 64, 64)), TensorSpec("fidelity", (-1,))),
                      outputs=(TensorSpec("output", (-1, 3, 64, 64)),), built_with=built)


def test_engine_needs_its_sidecar(tmp_path):
    engine = tmp_path / "model.onnx"
    engine.write_bytes(b"not a model")
    with pytest.raises(EngineError, match="model.onnx.json"):
        Runtime(engine)


def test_corrupt_onnx_is_a_clear_engine_error(tmp_path):
    pytest.importorskip("onnxruntime")
    engine = tmp_path / "model.onnx"
    engine.write_bytes(b"\x08\x07garbage" * 10)
    write_sidecar(engine, _meta())
    with pytest.raises(EngineError, match="model.onnx: is not a loadable ONNX model"):
        Runtime(engine, device="cpu")


def test_tensorrt_engine_compatibility_from_sidecar():
    ok = _meta(tensorrt="10.8.0.43", compute_capability="9.0", gpu="NVIDIA H100")
    assert compatibility_problem(ok, "10.8.0.43", (9, 0)) is None
    assert "TensorRT 10.8.0.43, this is TensorRT 10.9.0.34" in compatibility_problem(ok, "10.9.0.34", (9, 0))
    assert "compute capability 9.0 (NVIDIA H100), this GPU is 8.6" in compatibility_problem(ok, "10.8.0.43", (8, 6))
    relaxed = dataclass_replace(ok, extra={"version_compatible": True, "hardware_compatibility": "ampere_plus"})
    assert compatibility_problem(relaxed, "10.9.0.34", (8, 6)) is None
    assert "does not record" in compatibility_problem(_meta(), "10.8", (9, 0))
    assert "no sidecar" in compatibility_problem(None, "10.8", (9, 0))


def dataclass_replace(meta, **kw):
    import dataclasses

    return dataclasses.replace(meta, **kw)


def test_aoti_rows_follow_the_package_device():
    from vqfr.backends.aoti import AOTIBackend, package_device

    assert package_device(_meta(compute_capability="9.0")) == "cuda"
    assert package_device(dataclass_replace(_meta(), extra={"device": "cpu"})) == "cpu"
    cpu_row = next(e for e in BACKENDS if e.label == "aoti[cpu]")
    reason, _ = AOTIBackend.status(cpu_row, _meta(compute_capability="9.0"))
    assert reason == "the package was compiled for cuda"
    reason, _ = AOTIBackend.status(cpu_row, dataclass_replace(_meta(torch="1.0.0"), extra={"device": "cpu"}))
    assert "built with torch 1.0.0" in reason


def test_runtime_is_a_context_manager(tiny_v2):
    with Runtime(tiny_v2) as rt:
        assert rt.backend.loaded
    assert not rt.backend.loaded


def test_runtime_can_be_entered_again_and_used_after_close(tiny_v2):
    face = _faces(1, seed=8)[0]
    rt = Runtime(tiny_v2)
    with rt:
        first = rt.restore(face, aligned=True)
    with rt:  # a second `with` reloads the engine, as a Backend's does
        assert rt.backend.loaded
        assert np.array_equal(rt.restore(face, aligned=True), first)
    rt.close()
    assert np.array_equal(rt.restore(face, aligned=True), first)
    rt.close()


def test_empty_batches_and_bad_upscale(rt_v2):
    assert rt_v2.restore_batch([]) == [] and rt_v2.restore_batch([], aligned=True) == []
    assert rt_v2.restore_faces_batch([]) == []
    for upscale in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="upscale must be"):
            rt_v2.restore(np.zeros((16, 16, 3), np.uint8), upscale=upscale)


class _OneFace:
    """A detector that finds one face with the given landmarks."""

    def __init__(self, landmarks: np.ndarray):
        self.landmarks = landmarks.astype(np.float32)

    def detect(self, img: np.ndarray) -> list:
        from vqfr.faces.detector import Detection

        lo, hi = self.landmarks.min(0) - 20, self.landmarks.max(0) + 20
        return [Detection(np.concatenate([lo, hi]).astype(np.float32), 0.99, self.landmarks)]


@pytest.mark.parametrize("upscale", [0.75, 0.5])
def test_downscaled_photo_is_pasted_with_the_exact_scale(tiny_v2, upscale):
    """333x327 at 0.75x is 249x245: the faces go back at 249/333 and 245/327, not 0.75, which is up to one output
    pixel off towards the far corner (where the face is)."""
    from vqfr.faces.align import template
    from vqfr.faces.paste import paste_faces
    from vqfr.imaging import upscale_lanczos

    photo = np.random.default_rng(4).integers(0, 256, (327, 333, 3), dtype=np.uint8)
    landmarks = template(64) * 2.5 + np.array([170.0, 165.0])  # a 160 px face, 3 px from the far corner
    with Runtime(tiny_v2, device="cpu", detector=_OneFace(landmarks)) as rt:
        result = rt.restore_faces(photo, upscale=upscale)
    restored = np.stack([f.restored for f in result.faces])
    affines = np.stack([f.affine for f in result.faces])
    background = upscale_lanczos(photo, upscale)
    exact = paste_faces(background, restored, affines, upscale, photo_size=(333, 327))
    assert np.array_equal(result.image, exact)
    assert not np.array_equal(exact, paste_faces(background, restored, affines, upscale))  # the test can tell


def test_import_vqfr_stays_light():
    import subprocess
    import sys

    code = ("import sys, vqfr; bad = [m for m in ('onnx', 'onnxruntime', 'tensorrt', 'triton', 'cv2') "
            "if m in sys.modules]; print(bad); vqfr.Runtime")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_to_images_roundtrip_helper_matches_official(tiny_v2):
    face = _faces(1, seed=9)[0]
    with torch.no_grad():
        y = tiny_v2(to_tensor(face), fidelity=0.0)
    assert np.abs(to_images(y)[0].astype(int) - _official(tiny_v2, face, 0.0)).max() <= 1


# ----------------------------------------------------------------------------------------------- torch max mode
def test_max_mode_compiles_every_batch_size_whatever_torchs_recompile_limit():
    """torch counts compiled graphs per code object against ``torch._dynamo.config.recompile_limit`` (8 by default;
    with fullgraph=True, one more raises). Every (batch, fidelity kind) of every runner is a graph of its own, so
    none may share a code object: with the limit at 2, three batch sizes on each of two runners all compile.

    (A defect, fixed.) The limit was set with pytest's ``monkeypatch.setattr`` on ``torch._dynamo.config``, whose
    undo left ``recompile_limit`` hidden ("does not exist"): every later torch.compile in the process raised (the
    max mode's tests after this one, run in another order). torch's own ``config.patch`` restores it."""
    from torch import nn

    from vqfr.backends.torch_fast import FastOptions, FastRunner

    options = FastOptions(compile=True, compile_backend="eager", channels_last=False).resolved(torch.device("cpu"))
    models = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU()).eval() for _ in range(2)]

    def runs_every_batch_size(model: nn.Module) -> None:
        runner = FastRunner(model, "VQFRv1", torch.device("cpu"), torch.float32, options)
        for batch in (1, 2, 3):
            x = torch.rand(batch, 3, 8, 8)
            with torch.no_grad():
                torch.testing.assert_close(runner(x, torch.zeros(batch)), model(x))
        assert set(runner.prepare_s) == {(1, False), (2, False), (3, False)}
        runner.close()

    before = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=2):  # as if the process had used its 8 (or 64)
        for model in models:
            runs_every_batch_size(model)
        FastRunner(models[0], "VQFRv1", torch.device("cpu"), torch.float32, options)
        assert torch._dynamo.config.recompile_limit == 2, "a runner leaves torch's global settings alone"
    assert torch._dynamo.config.recompile_limit == before


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_max_mode_refuses_compile_modes_with_torchs_own_cuda_graphs(tiny_v2, mode):
    """Those modes make Inductor capture CUDA graphs itself, inside ours: refused with the option and the fix."""
    from vqfr.backends.torch import TorchBackend
    from vqfr.backends.torch_fast import FastOptions

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    row = next(e for e in BACKENDS if e.label == "torch[cuda]")
    with pytest.raises(ConfigError, match=rf"compile_mode '{mode}'.*max-autotune-no-cudagraphs"):
        TorchBackend(row, tiny_v2, mode="max", fast=FastOptions(compile_mode=mode))
    with pytest.raises(ConfigError, match="cuda_graphs=False"):
        FastOptions(compile=True, cuda_graphs=True, compile_mode=mode).resolved(cuda)
    # without our graphs (or without compiling) the mode is torch's business
    assert FastOptions(compile_mode=mode, cuda_graphs=False).resolved(cuda).compile_mode == mode
    assert FastOptions(compile_mode=mode, compile=False).resolved(cuda).compile_mode == mode
    assert FastOptions(compile_mode=mode).resolved(cpu).compile_mode == mode
    assert FastOptions(compile_mode="max-autotune-no-cudagraphs").resolved(cuda).cuda_graphs


def test_max_mode_refuses_an_unknown_compile_mode():
    from vqfr.backends.torch_fast import FastOptions

    with pytest.raises(ConfigError, match="unknown compile_mode 'fastest'.*max-autotune-no-cudagraphs"):
        FastOptions(compile=True, compile_mode="fastest").resolved(torch.device("cpu"))


def test_restore_of_a_truncated_png_prints_nothing_from_opencv(rt_v2, tmp_path, capfd):
    import cv2

    data = cv2.imencode(".png", _faces(1)[0])[1].tobytes()
    path = tmp_path / "trunc.png"
    path.write_bytes(data[: len(data) // 2])
    capfd.readouterr()
    with pytest.raises(InputError, match="trunc.png: is a truncated PNG file"):
        rt_v2.restore(path, aligned=True)
    assert capfd.readouterr().err == ""


def test_runtime_shared_between_threads_runs_one_batch_at_a_time_and_close_waits(tiny_v2):
    """A thread closing the runtime while another infers: the batch in flight finishes, the next reloads; batches of
    several threads never overlap (a TensorRT context or CUDA graph serves one caller at a time)."""
    import threading
    import time

    rt = Runtime(tiny_v2, device="cpu")
    x = torch.from_numpy(_faces(1, seed=3)).permute(0, 3, 1, 2).float() / 127.5 - 1
    expected = rt.infer(x, fidelity=0.5)
    backend, in_flight, most, errors, outputs = rt.backend, [0], [0], [], []
    original, entered = backend.infer, threading.Event()

    def slow_infer(*args):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        entered.set()
        time.sleep(0.2)  # a close() or a second batch from another thread lands here
        try:
            return original(*args)
        finally:
            in_flight[0] -= 1

    backend.infer = slow_infer

    def user():
        try:
            outputs.append(rt.infer(x, fidelity=0.5))
        except Exception as exc:  # noqa: BLE001 - any failure is the bug
            errors.append(exc)

    threads = [threading.Thread(target=user) for _ in range(2)]
    for t in threads:
        t.start()
    assert entered.wait(10)
    rt.close()
    for t in threads:
        t.join()
    assert errors == [] and most[0] == 1
    assert len(outputs) == 2 and all(torch.equal(o, expected) for o in outputs)
    rt.close()


def test_a_sidecar_whose_face_size_contradicts_its_input_shape_is_refused(tmp_path):
    """The runtime serves an engine at the sidecar's face_size: an edited face_size that the input shape contradicts
    (a fixed 64x64 input) is refused when the sidecar is read, not on the first batch."""
    engine = tmp_path / "model.onnx"
    engine.write_bytes(b"graph")
    write_sidecar(engine, dataclass_replace(_meta(), face_size=128))
    with pytest.raises(EngineError, match=r"model.onnx.json: sidecar face_size 128 does not fit its input shape "
                                          r"\[-1, 3, 64, 64\]"):
        Runtime(engine, device="cpu")


def test_a_face_size_the_engine_does_not_take_names_the_engine(tmp_path, tiny_v2):
    """The error named neither the file nor the CLI flag to drop."""
    import vqfr

    weights = vqfr.save_safetensors(tiny_v2, tmp_path / "v2.safetensors")
    with pytest.raises(ConfigError, match=r"v2.safetensors: face_size 128 asked, but this VQFRv2 engine works at 64. "
                                          r"Fix: leave face_size unset \(CLI: drop --face-size\)"):
        Runtime(weights, device="cpu", face_size=128)
