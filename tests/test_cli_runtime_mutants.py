"""The command line's and ``vqfr.Runtime``'s promises where mutation testing (round 19) found the other tests silent:
the documented defaults (4 faces per inference call, version 2 weights), options at the edge of their range, the
batching of faces across the inputs of a chunk, ``--skip-existing`` only when asked, the summary's notes and the
random-weights warning, the exit code of a run stopped by SIGTERM, and the weights search order."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest

import vqfr
from deploy.soak import FACE_SIZE, MICRO_V2
from tests.conftest import seeded_model
from tests.test_reliability import _ManyFaces
from tests.test_reliability_cli import _faces, _run_cli
from vqfr.cli import EXIT_OK, EXIT_TERMINATED
from vqfr.runtime import WEIGHTS_ENV, Runtime, find_weights

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def model():
    return seeded_model(MICRO_V2, seed=5)


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory) -> Path:
    return vqfr.save_safetensors(model, tmp_path_factory.mktemp("weights") / "micro_v2.safetensors")


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """No $VQFR_WEIGHTS, and an empty working directory and cache: :func:`find_weights` finds nothing."""
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)


@pytest.fixture
def calls(monkeypatch):
    """Records how many images each ``restore_faces_batch`` call gets (``images``) and how many faces each
    inference call of the backend gets (``faces``)."""
    from vqfr.backends.torch import TorchBackend

    seen: dict[str, list[int]] = {"images": [], "faces": []}
    real_batch, real_infer = Runtime.restore_faces_batch, TorchBackend.infer

    def restore_faces_batch(self, images, **kwargs):
        images = list(images)
        seen["images"].append(len(images))
        return real_batch(self, images, **kwargs)

    def infer(self, x, fidelity):
        seen["faces"].append(int(x.shape[0]))
        return real_infer(self, x, fidelity)

    monkeypatch.setattr(Runtime, "restore_faces_batch", restore_faces_batch)
    monkeypatch.setattr(TorchBackend, "infer", infer)
    return seen


def _many_faces(monkeypatch, n: int) -> None:
    """Whole-photo runs find ``n`` faces of 32 px (eyes ~8 px apart, over the 5 px threshold) in a grid."""
    import vqfr.faces.detector

    monkeypatch.setattr(vqfr.faces.detector, "load_detector", lambda *a, **k: _ManyFaces(n, cell=32))


def _photo(path: Path, h: int = 64, w: int = 96, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    return path


# ----------------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("batch, chunks", [
    ([], [4, 1]),  # the documented default: 4; 5 inputs are one chunk of 4 and one of 1
    (["--batch", "1"], [1, 1, 1, 1, 1]),  # the smallest batch allowed
    (["--batch", "2"], [2, 2, 1]),
])
def test_batch_sets_how_many_aligned_inputs_share_an_inference_call(weights, tmp_path, calls, batch, chunks):
    """``--batch N`` (default 4): the inputs are taken N at a time, every one of them exactly once, and each chunk's
    faces (one per aligned input) go through the model in one call."""
    inputs = _faces(tmp_path / "in", 5)
    code, stdout, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
                                     str(weights), "--aligned", "-q", *batch])
    assert code == EXIT_OK, stderr
    assert "5 images, 5 faces restored, 0 failed" in stdout
    assert calls["images"] == chunks and calls["faces"] == chunks
    assert sorted(p.name for p in (tmp_path / "out" / "restored_faces").iterdir()) == [
        f"{p.stem}_00.png" for p in inputs]


def test_batch_caps_the_faces_of_one_photo_per_inference_call(weights, tmp_path, monkeypatch, calls):
    """A photo with 5 faces and ``--batch 2``: the model gets them 2, 2 and 1 at a time (not all 5 at once, the
    runtime's own default of 4 included)."""
    _many_faces(monkeypatch, 5)
    _photo(tmp_path / "group.png")
    code, stdout, stderr = _run_cli(["-i", str(tmp_path / "group.png"), "-o", str(tmp_path / "out"), "--weights",
                                     str(weights), "-q", "-s", "1", "--batch", "2"])
    assert code == EXIT_OK, stderr
    assert "1 images, 5 faces restored" in stdout
    assert calls["faces"] == [2, 2, 1]


def test_faces_of_several_photos_in_a_chunk_share_inference_calls(weights, tmp_path, monkeypatch, calls):
    """Two photos of 3 faces each, ``--batch 4``: both photos form one chunk, and their 6 faces go through the
    model as 4 then 2 (faces of different photos in one call), not 3 and 3."""
    _many_faces(monkeypatch, 3)
    for i in range(2):
        _photo(tmp_path / "in" / f"p{i}.png", seed=i)
    code, stdout, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
                                     str(weights), "-q", "-s", "1", "--batch", "4"])
    assert code == EXIT_OK, stderr
    assert "2 images, 6 faces restored" in stdout
    assert calls["images"] == [2] and calls["faces"] == [4, 2]
