"""The command line's and ``vqfr.Runtime``'s promises where mutation testing (round 19) found the other tests silent:
the documented defaults (4 faces per inference call, the version 2 weights, the I/O threads), options at the edge of
their range or passed on to the runtime (``-f 1``, ``--batch 1``, ``--precision``, ``--face-size``, ``--parser``,
``--only-center-face``), faces batched across the photos of a chunk and capped by the engine, ``--skip-existing`` only
when asked, the report (FAILED lines in input order, the runtime line, the rates, the random-weights warning, exit
143 on SIGTERM, ``--list-backends``), output names (clash numbers, ``**`` globs, PNG for an input without a suffix),
the weights search order and the random model's architecture, the pixel limits and the eye threshold at their
boundary, and a runtime that builds its detector and parser once and releases an engine it refuses."""

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


# ----------------------------------------------------------------------------------------------- options
def test_fidelity_one_is_accepted_and_restores_at_full_fidelity(weights, tmp_path):
    """``-f 1`` is the end of the documented range [0, 1]: the run restores at fidelity 1, as ``restore`` does."""
    face = cv2.imread(str(_faces(tmp_path / "in", 1)[0]))
    code, _, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights", str(weights),
                                "--aligned", "-q", "-f", "1"])
    assert code == EXIT_OK, stderr
    rt = Runtime(weights, device="cpu")
    want = rt.restore(face, aligned=True, fidelity=1.0)
    assert not np.array_equal(want, rt.restore(face, aligned=True, fidelity=0.0))  # the test can tell them apart
    assert np.array_equal(cv2.imread(str(tmp_path / "out" / "restored_faces" / "face0000_00.png")), want)


def test_a_v2_model_gets_no_note_that_fidelity_is_ignored(weights, tmp_path):
    """The note that ``-f`` is ignored is for v1 models only: a v2 model uses it."""
    _faces(tmp_path / "in", 1)
    code, _, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights", str(weights),
                                "--aligned", "-q", "-f", "0.5"])
    assert code == EXIT_OK and "fidelity" not in stderr, stderr


def test_the_runtime_line_says_what_runs_where(weights, tmp_path):
    """Before the inputs, one line says which weights run at which face size, on which backend, device and
    precision (checkpoints run in fp32 unless asked otherwise)."""
    _faces(tmp_path / "in", 1)
    code, _, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights", str(weights),
                                "--aligned", "-q", "--device", "cpu"])
    assert code == EXIT_OK
    assert f"vqfr: Runtime({weights}: VQFRv2 at {FACE_SIZE}px on torch[cpu] cpu, fp32)" in stderr.splitlines()


@pytest.mark.parametrize("option, message", [
    (["--precision", "fp16"], "precision fp16 needs a CUDA device"),  # --precision reaches the backend
    (["--face-size", "32"], "face_size 32 asked, but this VQFRv2 engine works at 16"),  # --face-size reaches it
    (["--parser", "missing.onnx"], "missing.onnx"),  # --parser is built before the first input
])
def test_model_options_reach_the_runtime_and_their_errors_stop_the_run_before_any_input(weights, tmp_path, option,
                                                                                         message):
    """``--precision``, ``--face-size`` and ``--parser`` are passed on to the runtime: a value it cannot honour on
    this machine or model is a setup error (exit 1, one error line), not a run that silently ignores it."""
    _faces(tmp_path / "in", 1)
    code, stdout, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
                                     str(weights), "-q", "--device", "cpu", *option])
    assert code == 1, stderr
    assert stderr.startswith("vqfr: error:") and message in stderr, stderr
    assert stdout == "" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("cpus, threads", [(32, 8), (3, 3), (None, 1)])
def test_io_threads_default_to_the_cpu_count_at_most_8(monkeypatch, cpus, threads):
    """``--io-threads`` defaults to the CPU count, capped at 8 (and 1 where the count is unknown)."""
    from vqfr.cli import build_parser

    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert build_parser().parse_args([]).io_threads == threads


def test_only_center_face_through_the_cli_restores_one_face(weights, tmp_path, monkeypatch):
    """``--only-center-face`` on a photo with 3 faces found: one face restored and written."""
    _many_faces(monkeypatch, 3)
    _photo(tmp_path / "group.png")
    code, stdout, stderr = _run_cli(["-i", str(tmp_path / "group.png"), "-o", str(tmp_path / "out"), "--weights",
                                     str(weights), "-q", "-s", "1", "--only-center-face"])
    assert code == EXIT_OK, stderr
    assert "1 images, 1 faces restored" in stdout
    assert [p.name for p in (tmp_path / "out" / "restored_faces").iterdir()] == ["group_00.png"]


# ----------------------------------------------------------------------------------------------- resume
def test_without_skip_existing_every_input_is_restored_again(weights, tmp_path):
    """Outputs left by an earlier run are replaced unless ``--skip-existing`` is given."""
    _faces(tmp_path / "in", 1)
    out = tmp_path / "out"
    args = ["-i", str(tmp_path / "in"), "-o", str(out), "--weights", str(weights), "--aligned", "-q"]
    assert _run_cli(args)[0] == EXIT_OK
    restored = out / "restored_faces" / "face0000_00.png"
    want = restored.read_bytes()
    cv2.imwrite(str(restored), np.zeros((FACE_SIZE, FACE_SIZE, 3), np.uint8))  # stale
    code, stdout, _ = _run_cli(args)
    assert code == EXIT_OK and "1 images, 1 faces restored, 0 failed in" in stdout and "skipped" not in stdout
    assert restored.read_bytes() == want


# ----------------------------------------------------------------------------------------------- report
def test_failed_lines_come_in_the_order_of_the_inputs(weights, tmp_path, monkeypatch):
    """Inputs of one chunk whose outputs cannot be written fail each with its own line, in input order."""
    import vqfr.atomic

    def refused(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(vqfr.atomic, "atomic_write_bytes", refused)
    inputs = _faces(tmp_path / "in", 3)
    code, stdout, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
                                     str(weights), "--aligned", "-q", "--batch", "3"])
    failed = [line for line in stderr.splitlines() if line.startswith("vqfr: FAILED")]
    assert code == 3 and "0 images, 0 faces restored, 3 failed" in stdout, stderr
    assert [next(p.name for p in inputs if str(p) in line) for line in failed] == [p.name for p in inputs]


def test_random_weights_get_a_warning_after_the_summary(no_weights_anywhere, tmp_path):
    """No weights given or found: the run goes on with random weights (``--config`` picks the architecture), and a
    last line warns that the outputs are meaningless, below the summary, where it is seen."""
    import json

    config = tmp_path / "micro.json"
    config.write_text(json.dumps(MICRO_V2))
    _faces(tmp_path / "in", 1)
    code, stdout, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--config",
                                     str(config), "--aligned", "-q"])
    assert code == EXIT_OK, stderr
    assert "1 images, 1 faces restored" in stdout
    assert stderr.splitlines()[-1].startswith("vqfr: WARNING: these outputs come from RANDOM weights"), stderr


def test_weights_given_get_no_random_weights_warning(weights, tmp_path):
    _faces(tmp_path / "in", 1)
    code, _, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights", str(weights),
                                "--aligned", "-q"])
    assert code == EXIT_OK and "RANDOM" not in stderr, stderr


def test_sigterm_while_the_model_loads_exits_143(weights, tmp_path, monkeypatch):
    """SIGTERM (a job scheduler stopping the run) before any input is restored exits 143, not 130 (Ctrl-C)."""
    import vqfr.runtime

    monkeypatch.setattr(vqfr.runtime, "Runtime", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    _faces(tmp_path / "in", 1)
    code, _, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights", str(weights),
                                "--aligned", "-q"])
    assert code == EXIT_TERMINATED and stderr.strip() == "vqfr: interrupted before any input was restored"


# ----------------------------------------------------------------------------------------------- --list-backends
def test_list_backends_narrows_to_the_device(capsys):
    """``--list-backends --device cpu`` lists the CPU rows only (every row's label names the CPU or its provider)."""
    from vqfr.cli import main

    assert main(["--list-backends", "--device", "cpu"]) == EXIT_OK
    labels = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert labels and labels[-1] == "torch[cpu]"
    assert all("cpu" in label.lower() for label in labels), labels


def test_list_backends_for_a_file_no_backend_loads_is_exit_1(tmp_path, capsys):
    """``--list-backends --backend aoti --weights x.pth``: AOTInductor loads .pt2 files only, so this is an error
    (exit 1) naming the file, not an empty table and exit 0."""
    from vqfr.cli import main

    assert main(["--list-backends", "--backend", "aoti", "--weights", str(tmp_path / "x.pth")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vqfr: error:") and "x.pth" in err, err


# ----------------------------------------------------------------------------------------------- weights
def test_without_v_the_version_2_weights_of_a_folder_are_taken(weights, tmp_path, monkeypatch):
    """$VQFR_WEIGHTS names a folder holding both versions: no ``-v`` takes VQFR_v2 (the documented default);
    ``-v 1`` takes VQFR_v1 (here a broken file, so the error names it)."""
    import shutil

    folder = tmp_path / "released"
    folder.mkdir()
    shutil.copy(weights, folder / "VQFR_v2.safetensors")
    (folder / "VQFR_v1.pth").write_bytes(b"not a checkpoint")
    monkeypatch.setenv(WEIGHTS_ENV, str(folder))
    _faces(tmp_path / "in", 1)
    args = ["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--aligned", "-q"]
    code, stdout, stderr = _run_cli(args)
    assert code == EXIT_OK and "1 images, 1 faces restored" in stdout, stderr
    assert f"Runtime({folder / 'VQFR_v2.safetensors'}: VQFRv2" in stderr
    code, _, stderr = _run_cli([*args, "-v", "1"])
    assert code == 1 and str(folder / "VQFR_v1.pth") in stderr, stderr


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_the_weights_environment_folder_is_searched_before_the_working_directorys(tmp_path, monkeypatch):
    """$VQFR_WEIGHTS is the user's explicit choice: its folder wins over ./weights holding the same file name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _touch(tmp_path / "weights" / "VQFR_v2.pth")
    mine = _touch(tmp_path / "mine" / "VQFR_v2.pth")
    monkeypatch.setenv(WEIGHTS_ENV, str(mine.parent))
    assert find_weights("VQFRv2") == mine


def test_the_first_folder_holding_any_released_name_wins_over_a_preferred_name_in_a_later_folder(tmp_path,
                                                                                                monkeypatch):
    """The folders are searched in their documented order (./experiments/pretrained_models before ./weights); the
    preference among names (VQFR_v2.pth before .safetensors) applies within one folder only."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = _touch(tmp_path / "experiments" / "pretrained_models" / "VQFR_v2.safetensors")
    _touch(tmp_path / "weights" / "VQFR_v2.pth")
    assert find_weights("VQFRv2") == Path("experiments/pretrained_models/VQFR_v2.safetensors")
    assert first.is_file()


def test_a_random_weight_model_leaves_the_callers_random_numbers_alone(no_weights_anywhere):
    """Building the seeded random-weight model must not reseed torch's global generator: the caller's next random
    numbers are those it would have drawn without the runtime."""
    import torch

    torch.manual_seed(1234)
    torch.rand(3)
    want = torch.rand(5)
    torch.manual_seed(1234)
    torch.rand(3)
    rt = Runtime(config=dict(MICRO_V2), device="cpu")
    assert rt.random_weights
    assert torch.equal(torch.rand(5), want)


# ----------------------------------------------------------------------------------------------- runtime
def test_max_batch_zero_is_refused(model):
    from vqfr.errors import ConfigError

    with pytest.raises(ConfigError, match="max_batch must be at least 1, got 0"):
        Runtime(model, device="cpu", max_batch=0)


def test_an_engine_built_for_fewer_faces_than_max_batch_gets_at_most_its_own_batch(model, monkeypatch, calls):
    """``max_batch=4`` with an engine that takes at most 2 faces: 5 faces go as 2, 2 and 1."""
    from vqfr.backends.torch import TorchBackend

    monkeypatch.setattr(TorchBackend, "max_batch", property(lambda self: 2))
    rt = Runtime(model, device="cpu", max_batch=4)
    assert rt.batch_size == 2
    faces = np.random.default_rng(3).integers(0, 256, (5, FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)
    out = rt.restore_batch(list(faces), aligned=True)
    assert calls["faces"] == [2, 2, 1] and len(out) == 5


@pytest.mark.parametrize("limit, ok", [(32 * 24, True), (32 * 24 - 1, False)])
def test_an_image_of_exactly_max_pixels_is_taken(model, limit, ok):
    """``max_pixels`` is the largest size taken: a 32x24 image (768 px) passes a limit of 768 and fails 767."""
    from tests.test_core_behaviours import _Fixed
    from vqfr.errors import InputError

    rt = Runtime(model, device="cpu", detector=_Fixed([]), max_pixels=limit)
    img = np.full((24, 32, 3), 90, np.uint8)
    if ok:
        assert rt.restore(img).shape == (24, 32, 3)
    else:
        with pytest.raises(InputError, match="over the limit"):
            rt.restore(img)


@pytest.mark.parametrize("limit, ok", [(40 * 30, True), (40 * 30 - 1, False)])
def test_an_upscaled_result_of_exactly_max_pixels_is_made(model, limit, ok):
    """A 20x15 photo upscaled 2x is 40x30 = 1200 px: a limit of 1200 makes it, 1199 refuses it."""
    from tests.test_core_behaviours import _Fixed
    from vqfr.errors import InputError

    rt = Runtime(model, device="cpu", detector=_Fixed([]), max_pixels=limit)
    img = np.full((15, 20, 3), 90, np.uint8)
    if ok:
        assert rt.restore(img, upscale=2).shape == (30, 40, 3)
    else:
        with pytest.raises(InputError, match="upscaled 2x"):
            rt.restore(img, upscale=2)


def test_a_face_whose_eyes_are_exactly_the_threshold_apart_is_restored(model):
    """``eye_dist_threshold`` skips faces whose eyes are closer than it: a face exactly that far apart is kept."""
    from tests.test_core_behaviours import _detection, _Fixed

    det = _detection(50, 50, 0.1, 0.99)
    rt = Runtime(model, device="cpu", detector=_Fixed([det]), eye_dist_threshold=float(det.eye_distance))
    photo = np.random.default_rng(4).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    assert len(rt.restore_faces(photo).faces) == 1


def test_a_backend_is_closed_when_the_runtime_refuses_its_model(model, monkeypatch):
    """A face size the model does not take is refused after the engine was loaded: the engine is released (on a
    GPU it holds memory), not left behind in a runtime the caller never gets."""
    from vqfr.backends.torch import TorchBackend
    from vqfr.errors import ConfigError

    closed, real = [], TorchBackend.close
    monkeypatch.setattr(TorchBackend, "close", lambda self: closed.append(self) or real(self))
    with pytest.raises(ConfigError, match="face_size 32 asked"):
        Runtime(model, device="cpu", face_size=32)
    assert len(closed) == 1 and not closed[0].loaded


def test_the_nan_error_names_the_faces_of_the_batch_that_returned_it():
    """The model returns NaN for every face; with 2 faces a call, the first call's faces are 0 and 1."""
    import torch

    from vqfr.errors import EngineError

    class Broken(torch.nn.Module):
        options = dict(MICRO_V2)

        def forward(self, x, fidelity=0.0):
            return x * float("nan")

    faces = np.zeros((3, FACE_SIZE, FACE_SIZE, 3), np.uint8)
    with pytest.raises(EngineError, match=r"NaN or inf for faces 0\.\.1 of the batch"):
        Runtime(Broken(), device="cpu", max_batch=2).restore_batch(list(faces), aligned=True)


def test_the_detector_and_parser_are_built_once_for_many_photos(model, monkeypatch):
    """Building the detector or loading the parsing network takes a while: a runtime does it once, not per photo."""
    import vqfr.faces.detector
    import vqfr.faces.parsing
    from tests.test_runtime_api_mutants import _Regions

    built = {"detector": 0, "parser": 0}

    def load_detector(*a, **k):
        built["detector"] += 1
        return _ManyFaces(1, cell=32)

    def load_parser(*a, **k):
        built["parser"] += 1
        return _Regions(1.0)

    monkeypatch.setattr(vqfr.faces.detector, "load_detector", load_detector)
    monkeypatch.setattr(vqfr.faces.parsing, "load_parser", load_parser)
    rt = Runtime(model, device="cpu", parser="parser.onnx")
    for seed in range(3):
        rt.restore(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert built == {"detector": 1, "parser": 1}


def test_the_summary_rates_count_the_model_time_of_every_chunk(weights, tmp_path, monkeypatch):
    """The summary's "the model alone" rate is all faces over the model's time summed over the chunks: with a clock
    that only the model advances, 10 s a chunk, 3 chunks of one face are 3 faces in 30 s = 0.10 faces/s, as the
    overall rate (not 3 faces over the last chunk's 10 s)."""
    import types

    import vqfr.cli

    clock = [0.0]
    real = Runtime.restore_faces_batch

    def ten_seconds(self, images, **kwargs):
        clock[0] += 10.0
        return real(self, images, **kwargs)

    monkeypatch.setattr(vqfr.cli, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(Runtime, "restore_faces_batch", ten_seconds)
    _faces(tmp_path / "in", 3)
    code, stdout, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
                                     str(weights), "--aligned", "-q", "--batch", "1"])
    assert code == EXIT_OK, stderr
    assert "3 faces restored, 0 failed in 30.0 s (0.10 faces/s; the model alone 0.10)" in stdout, stdout


def test_inputs_of_one_name_in_several_folders_are_numbered_from_2():
    """x.png in three folders: the shared stem gets the extension (x_png), and the clash left is numbered with the
    next free number from 2 (x_png_2, x_png_3), as the first extra copy of a name usually is."""
    from vqfr.cli import _output_stems

    files = [Path("a/x.png"), Path("b/x.png"), Path("c/x.png")]
    assert list(_output_stems(files).values()) == ["x_png", "x_png_2", "x_png_3"]


def test_a_double_star_glob_takes_images_at_every_depth(tmp_path):
    """``-i 'photos/**/*.png'`` is the recursive glob: images at the top and in sub-sub-folders, sorted, are inputs
    (not only those one folder down)."""
    from vqfr.cli import _collect_inputs

    for rel in ("top.png", "a/one.png", "a/b/two.png", "a/b/notes.txt"):
        _touch(tmp_path / rel)
    files, ignored = _collect_inputs(str(tmp_path / "**" / "*.png"))
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/b/two.png", "a/one.png", "top.png"]
    assert ignored == 0


def test_a_v1_face_size_must_be_a_multiple_of_32():
    """v1 halves the face five times: a face size of 48 (a multiple of 16, not 32) is refused up front."""
    from tests.test_core_behaviours import _Identity
    from vqfr.errors import ConfigError

    assert Runtime(_Identity(), device="cpu", face_size=96).face_size == 96
    with pytest.raises(ConfigError, match="positive multiple of 32, got 48"):
        Runtime(_Identity(), device="cpu", face_size=48)


def test_config_picks_the_architecture_of_the_random_weight_model(no_weights_anywhere):
    """With no weights found, ``config`` says which model the random weights fill: the micro v2 options give a
    16 px model, not the released 512 px v2."""
    rt = Runtime(config=dict(MICRO_V2), device="cpu")
    assert rt.random_weights and rt.arch == "VQFRv2" and rt.face_size == FACE_SIZE


def test_a_restored_photo_whose_input_has_no_image_suffix_is_a_png(weights, tmp_path, monkeypatch):
    """``-i scan`` (a PNG without a suffix, read by its content): with ``--ext auto`` there is no input format to
    keep, so the restored photo is written lossless as PNG, not JPEG."""
    _many_faces(monkeypatch, 1)
    scan = _photo(tmp_path / "scan.png").rename(tmp_path / "scan")
    code, _, stderr = _run_cli(["-i", str(scan), "-o", str(tmp_path / "out"), "--weights", str(weights), "-q",
                                "-s", "1"])
    assert code == EXIT_OK, stderr
    written = tmp_path / "out" / "restored_imgs" / "scan.png"
    assert [p.name for p in written.parent.iterdir()] == ["scan.png"]
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
