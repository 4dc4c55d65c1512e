"""Real exported engines: ONNX Runtime CPU determinism, and a real .onnx truncated or changed after export.

One micro VQFRv2 (16 px faces, see deploy.soak) is exported once for the module with ``export.onnx.export_onnx``.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import vqfr
from deploy.soak import FACE_SIZE, MICRO_V2
from tests.conftest import seeded_model
from vqfr.cli import EXIT_ERROR, EXIT_OK, main
from vqfr.errors import EngineError
from vqfr.inspect_engine import main as sidecar_main
from vqfr.sidecar import sidecar_path

pytest.importorskip("onnxruntime")
export_onnx = pytest.importorskip("export.onnx", reason="the export package is not in this checkout").export_onnx
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("onnx")
    weights = vqfr.save_safetensors(seeded_model(MICRO_V2, seed=5), folder / "micro_v2.safetensors")
    return export_onnx(weights, folder / "micro_v2.onnx")


def _faces(n: int, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, (n, FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8))


def _copy(engine: Path, folder: Path) -> Path:
    target = folder / engine.name
    shutil.copy(engine, target)
    shutil.copy(sidecar_path(engine), sidecar_path(target))
    return target


def _run_cli(argv: list[str]) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stderr.getvalue()


def test_onnxruntime_cpu_is_deterministic(engine, tmp_path):
    faces = _faces(3)
    first = vqfr.Runtime(engine, device="cpu", max_batch=2)
    assert first.entry.label == "onnxruntime[CPU]"
    a = first.restore_batch(faces, aligned=True, fidelity=0.5)
    b = vqfr.Runtime(engine, device="cpu", max_batch=2).restore_batch(faces, aligned=True, fidelity=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    (tmp_path / "in").mkdir()
    for i, face in enumerate(faces):
        cv2.imwrite(str(tmp_path / "in" / f"f{i}.png"), face)
    runs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        code, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(out), "--engine", str(engine), "--aligned",
                                 "-q", "--batch", "2", "-f", "0.5"])
        assert code == EXIT_OK, stderr
        runs.append({str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))})
    assert len(runs[0]) == 9 and runs[0] == runs[1]


def test_truncated_onnx_is_refused_before_loading(engine, tmp_path):
    cut = _copy(engine, tmp_path)
    cut.write_bytes(engine.read_bytes()[: engine.stat().st_size // 2])
    with pytest.raises(EngineError, match=r"micro_v2.onnx: is shorter than exported \(truncated or replaced\): .* "
                                          r"bytes, but .* were written at export"):
        vqfr.Runtime(cut)
    cv2.imwrite(str(tmp_path / "face.png"), _faces(1)[0])
    code, stderr = _run_cli(["-i", str(tmp_path / "face.png"), "-o", str(tmp_path / "out"), "--engine", str(cut),
                             "--aligned", "-q"])
    assert code == EXIT_ERROR and stderr.count("\n") == 1 and "is shorter than exported" in stderr
    # recorded as deliberate, the cut file reaches onnxruntime, which cannot parse it: still a clear EngineError
    with contextlib.redirect_stdout(io.StringIO()):
        assert sidecar_main([str(cut), "--update"]) == 0
    with pytest.raises(EngineError, match="micro_v2.onnx: is not a loadable ONNX model"):
        vqfr.Runtime(cut)


def test_changed_onnx_is_refused(engine, tmp_path):
    """A flipped byte in the weights still loads in onnxruntime and silently changes the output: the sidecar's
    hash is what catches it."""
    import onnx

    changed = _copy(engine, tmp_path)
    data = bytearray(engine.read_bytes())
    largest = max(onnx.load(str(engine)).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    # the top byte of a float32 in the middle of a weight tensor: the file stays a valid model, the weight x4
    start = data.find(largest[:64])
    assert start > 0 and data.count(largest[:64]) == 1
    data[start + (len(largest) // 8) * 4 + 3] ^= 0x01
    changed.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="has changed since export"):
        vqfr.Runtime(changed)
    with contextlib.redirect_stdout(io.StringIO()):
        assert sidecar_main([str(changed), "--update"]) == 0
    face = _faces(1, seed=4)
    altered = vqfr.Runtime(changed).infer(vqfr.imaging.to_tensor(face[0]), 0.5)
    original = vqfr.Runtime(engine).infer(vqfr.imaging.to_tensor(face[0]), 0.5)
    assert not np.array_equal(altered.numpy(), original.numpy())  # it ran, on other numbers, and nothing else noticed


def test_fixed_batch_onnx_serves_any_number_of_faces(engine, tmp_path):
    """``export.onnx --batch 2`` takes exactly 2 faces: the runtime sends at most 2 per call and pads a single face
    (onnxruntime used to refuse every call of another batch: "Got invalid dimensions for input")."""
    fixed = export_onnx(engine.with_name("micro_v2.safetensors"), tmp_path / "micro_v2_b2.onnx", batch=2)
    x = vqfr.imaging.to_tensor(np.stack(_faces(3, seed=2)))
    f = torch.tensor([0.0, 1.0, 0.5])
    dynamic = vqfr.Runtime(engine, device="cpu").infer(x, f)
    rt = vqfr.Runtime(fixed, device="cpu", max_batch=4)
    assert rt.batch_size == 2
    for n in (1, 3):
        np.testing.assert_allclose(rt.infer(x[:n], f[:n]).numpy(), dynamic[:n].numpy(), atol=1e-5, rtol=0)


def test_an_engine_exported_from_random_weights_warns_as_random_weights_do(engine, tmp_path, capsys):
    """``export.onnx --random-weights`` is for testing the pipeline; its sidecar says so. An engine of real weights
    runs quietly; one of random weights gets the random-weights banner, ``random_weights`` and the CLI's warning, so
    nobody deploys it by mistake."""
    rt = vqfr.Runtime(engine)
    assert not rt.random_weights and "RANDOM" not in capsys.readouterr().err
    rt.close()
    random_engine = export_onnx(None, tmp_path / "random_v2.onnx", config=MICRO_V2, random_weights=3)
    capsys.readouterr()
    rt = vqfr.Runtime(random_engine)
    err = capsys.readouterr().err
    assert rt.random_weights and repr(rt).startswith(f"Runtime({random_engine} (random weights): VQFRv2")
    assert "random_v2.onnx WAS EXPORTED FROM RANDOM WEIGHTS (its sidecar says so)" in err and "MEANINGLESS" in err
    assert "python -m export.onnx --weights VQFR_v2.pth" in err
    rt.close()
    cv2.imwrite(str(tmp_path / "face.png"), _faces(1)[0])
    code, stderr = _run_cli(["-i", str(tmp_path / "face.png"), "-o", str(tmp_path / "out"), "--engine",
                             str(random_engine), "--aligned", "-q"])
    assert code == EXIT_OK
    assert stderr.rstrip().splitlines()[-1].startswith("vqfr: WARNING: these outputs come from RANDOM weights")
