"""The CLI end to end on temporary folders, with a tiny model saved as a checkpoint (face size 64)."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

import vqfr
from tests.conftest import FACES, GOLDEN, ROOT, TINY_V2, needs_faces, needs_golden, seeded_model
from vqfr.cli import EXIT_ERROR, EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, main


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny_v2.safetensors"
    return vqfr.save_safetensors(seeded_model(TINY_V2, seed=3), path)


def _face(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _folder_with_bad_files(root):
    inputs = root / "in"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "good_a.png"), _face(1))
    cv2.imwrite(str(inputs / "good_b.jpg"), _face(2, 96))  # resized to the face size
    cv2.imwrite(str(inputs / "grey_c.png"), _face(3)[:, :, 0])  # converted
    (inputs / "text.jpg").write_text("not an image")
    (inputs / "empty.png").write_bytes(b"")
    png = cv2.imencode(".png", _face(4))[1].tobytes()
    (inputs / "truncated.png").write_bytes(png[: len(png) // 2])
    cv2.imwrite(str(inputs / "wide.png"), np.zeros((64, 80, 3), np.uint8))  # not square: not an aligned face
    (inputs / "notes.txt").write_text("ignored: not an image suffix")
    return inputs


@pytest.mark.parametrize("spec", ["folder", "glob"])
def test_folder_run_survives_bad_files(tmp_path, weights, capsys, spec):
    # -i 'in/*' is the folder in/: its notes.txt used to be read as an image, and fail
    inputs = _folder_with_bad_files(tmp_path)
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    out = tmp_path / "out"
    code = main(["-i", str(inputs if spec == "folder" else inputs / "*"), "-o", str(out), "--weights", str(weights),
                 "--aligned", "--batch", "2", "-q"])
    captured = capsys.readouterr()
    assert code == EXIT_SOME_FAILED
    failed = [line for line in captured.err.splitlines() if line.startswith("vqfr: FAILED")]
    assert len(failed) == 4, captured.err
    for name in ("text.jpg", "empty.png", "truncated.png", "wide.png"):
        assert sum(name in line for line in failed) == 1, name
    assert "Traceback" not in captured.err
    assert "3 images, 3 faces restored, 4 failed, 1 non-image files ignored" in captured.out
    for stem in ("good_a", "good_b", "grey_c"):
        for group in ("restored_faces", "cropped_faces", "cmp"):
            img = cv2.imread(str(out / group / f"{stem}_00.png"))
            assert img is not None and img.shape == ((64, 128, 3) if group == "cmp" else (64, 64, 3)), (stem, group)
    assert not (out / "restored_imgs").exists() or not any((out / "restored_imgs").iterdir())
    assert sorted(p.name for p in out.rglob("*") if p.is_file() and p.name.startswith(".")) == []  # no temp files
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before, "inputs must never change"


def test_outputs_match_the_api_and_resume(tmp_path, weights, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    face = _face(7)
    cv2.imwrite(str(inputs / "face.png"), face)
    out = tmp_path / "out"
    args = ["-i", str(inputs / "*.png"), "-o", str(out), "--weights", str(weights), "--aligned", "-q",
            "--suffix", "v2", "-f", "0.0"]
    assert main(args) == EXIT_OK
    restored = cv2.imread(str(out / "restored_faces" / "face_00_v2.png"))
    assert np.array_equal(restored, vqfr.Runtime(weights).restore(face, aligned=True))
    capsys.readouterr()
    assert main([*args, "--skip-existing"]) == EXIT_OK
    assert "0 images, 0 faces restored, 0 failed, 1 skipped (existing)" in capsys.readouterr().out


def test_a_complete_run_resumed_loads_no_model(tmp_path, weights, capsys, monkeypatch):
    """--skip-existing over a finished run has nothing to restore: it says so without loading the model (a compile
    or engine load of seconds to minutes); one input left to do loads it as usual."""
    for seed in (1, 2):
        cv2.imwrite(str(tmp_path / f"face{seed}.png"), _face(seed))
    args = ["-i", str(tmp_path / "face*.png"), "-o", str(tmp_path / "out"), "--weights", str(weights), "--aligned",
            "-q", "--skip-existing"]
    assert main(args) == EXIT_OK
    capsys.readouterr()
    loads = []
    real_init = vqfr.Runtime.__init__
    monkeypatch.setattr(vqfr.Runtime, "__init__", lambda self, *a, **k: loads.append(1) or real_init(self, *a, **k))
    assert main(args) == EXIT_OK and not loads
    assert capsys.readouterr().out.startswith("vqfr: 0 images, 0 faces restored, 0 failed, 2 skipped (existing); "
                                              "nothing left to restore, so no model was loaded; outputs in ")
    (tmp_path / "out" / "restored_faces" / "face2_00.png").unlink()
    assert main(args) == EXIT_OK and loads == [1]
    assert "1 images, 1 faces restored, 0 failed, 1 skipped (existing)" in capsys.readouterr().out


def test_photo_options_given_with_aligned_are_named_as_ignored(tmp_path, weights, capsys):
    """With --aligned nothing is detected or pasted back, so a --detector or --parser file was silently unused, even
    a bad one: the run says which options it ignores, and restores the faces as without them."""
    face = tmp_path / "face.png"
    cv2.imwrite(str(face), _face(4))
    (tmp_path / "bad.pth").write_bytes(b"not weights")
    args = ["-i", str(face), "-o", str(tmp_path / "out"), "--weights", str(weights), "--aligned", "-q"]
    assert main(args) == EXIT_OK
    assert "not used with --aligned" not in capsys.readouterr().err
    assert main([*args, "--detector", str(tmp_path / "bad.pth"), "--parser", str(tmp_path / "bad.pth"),
                 "--only-center-face"]) == EXIT_OK
    assert ("vqfr: note: --detector, --parser, --only-center-face are not used with --aligned (aligned faces are "
            "neither detected nor pasted back); ignored") in capsys.readouterr().err
    assert main([*args, "--detector-max-pixels", "1000"]) == EXIT_OK
    assert "note: --detector-max-pixels is not used with --aligned" in capsys.readouterr().err
    assert len(list((tmp_path / "out" / "restored_faces").iterdir())) == 1


@needs_faces
@pytest.mark.shared
def test_whole_photo_run(tmp_path, weights, capsys):
    out = tmp_path / "out"
    code = main(["-i", str(FACES / "whole"), "-o", str(out), "--weights", str(weights), "-s", "2", "-q",
                 "--ext", "png"])
    assert code == EXIT_OK
    photo = cv2.imread(str(FACES / "whole" / "Blake_Lively.jpg"))
    restored = cv2.imread(str(out / "restored_imgs" / "Blake_Lively.png"))
    assert restored.shape == (photo.shape[0] * 2, photo.shape[1] * 2, 3)
    assert sorted(p.name for p in (out / "restored_faces").iterdir()) == ["Blake_Lively_00.png", "Blake_Lively_01.png"]
    assert "1 images, 2 faces restored, 0 failed" in capsys.readouterr().out


def test_detector_max_pixels_reaches_the_detector(tmp_path, weights, capsys, monkeypatch):
    """--detector-max-pixels caps the photo the detector's network sees (MTCNN: its pyramid's largest level)."""
    import vqfr.faces.detector

    built = []
    real = vqfr.faces.detector.load_detector
    monkeypatch.setattr(vqfr.faces.detector, "load_detector", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    cv2.imwrite(str(tmp_path / "photo.png"), _face(5, size=96))
    code = main(["-i", str(tmp_path / "photo.png"), "-o", str(tmp_path / "out"), "--weights", str(weights), "-q",
                 "--detector-max-pixels", "5000"])
    assert code == EXIT_OK and [d.max_level_pixels for d in built] == [5000]
    with pytest.raises(SystemExit) as exit_:
        main(["-i", str(tmp_path / "photo.png"), "-o", str(tmp_path / "out"), "--detector-max-pixels", "0"])
    assert exit_.value.code == EXIT_USAGE and "--detector-max-pixels must be positive" in capsys.readouterr().err


def test_output_never_overwrites_an_input(tmp_path, weights, capsys):
    out = tmp_path / "out"
    (out / "restored_imgs").mkdir(parents=True)
    src = out / "restored_imgs" / "photo.png"
    cv2.imwrite(str(src), _face(9, 80))
    before = src.read_bytes()
    code = main(["-i", str(src), "-o", str(out), "--weights", str(weights), "-q", "-s", "1"])
    assert code == EXIT_SOME_FAILED
    assert "would overwrite its own input" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_setup_and_usage_errors(tmp_path, weights, capsys):
    cv2.imwrite(str(tmp_path / "a.png"), _face(1))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["-i", str(tmp_path), "-o", str(blocker / "out"), "--weights", str(weights)]) == EXIT_ERROR
    assert "cannot create the output folder" in capsys.readouterr().err
    assert main(["-i", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--weights",
                 str(tmp_path / "missing.pth")]) == EXIT_ERROR
    assert "missing.pth: does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["-i", str(tmp_path / "nothing*.png"), "-o", str(tmp_path / "o"), "--weights", str(weights)])
    assert exc.value.code == EXIT_USAGE
    assert "no input images found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["-i", str(tmp_path), "-f", "2"])
    assert exc.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as exc:
        main(["-i", str(tmp_path), "-s", "inf"])
    assert exc.value.code == EXIT_USAGE and "--upscale must be" in capsys.readouterr().err
    assert main(["-i", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--weights", str(weights), "-v",
                 "1"]) == EXIT_ERROR
    assert "-v 1 was asked but" in capsys.readouterr().err


def test_long_file_names_and_home_globs(tmp_path, weights, capsys, monkeypatch):
    """Outputs whose names the folder takes are written (their temporary names are longer); names it cannot take
    fail that input alone, before any of its outputs is written, and --skip-existing resumes without a traceback.
    A quoted glob starting with ~ is expanded like a path."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    fits, too_long = "f" * 240, "g" * 248  # restored face names with --suffix v2: 250 and 258 bytes
    cv2.imwrite(str(inputs / f"{fits}.png"), _face(5))
    cv2.imwrite(str(inputs / f"{too_long}.png"), _face(6))
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "out"
    args = ["-i", "~/in/*.png", "-o", str(out), "--weights", str(weights), "--aligned", "-q", "--suffix", "v2"]
    for resume in ([], ["--skip-existing"]):
        assert main([*args, *resume]) == EXIT_SOME_FAILED
        captured = capsys.readouterr()
        failed = [line for line in captured.err.splitlines() if line.startswith("vqfr: FAILED")]
        assert len(failed) == 1 and too_long in failed[0] and "too long" in failed[0], captured.err
        assert "Traceback" not in captured.err
    assert "0 images, 0 faces restored, 1 failed, 1 skipped (existing)" in captured.out
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == [f"cmp/{fits}_00.png", f"cropped_faces/{fits}_00.png", f"restored_faces/{fits}_00_v2.png"]


def test_output_folder_given_with_a_tilde_is_in_the_home_folder(tmp_path, weights, capsys, monkeypatch):
    """``--output=~/restored`` reaches the CLI unexpanded (the shell expands ~ only at the start of a word): the
    outputs go to the home folder, as for -i and --weights, not to a folder named "~" in the working directory."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    cv2.imwrite(str(tmp_path / "face.png"), _face(8))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert main(["-i", str(tmp_path / "face.png"), "--output=~/restored", "--weights", str(weights), "--aligned",
                 "-q"]) == EXIT_OK
    assert (home / "restored" / "restored_faces" / "face_00.png").is_file()
    assert list(work.iterdir()) == []
    assert f"outputs in {home / 'restored'}/" in capsys.readouterr().out


def test_an_input_path_that_cannot_be_looked_at_is_a_usage_error(tmp_path, capsys):
    """-i naming a path the system refuses to look at (a name too long; a folder that may not be entered) is a usage
    error naming it, not a traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(["-i", str(tmp_path / f"{'x' * 300}.png"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == EXIT_USAGE and f"{'x' * 300}.png" in err and "Traceback" not in err, err


def test_an_output_that_cannot_be_encoded_leaves_no_file_of_its_input(tmp_path, weights, capsys, monkeypatch):
    """The restored photo is the last output encoded: its encoder failing (as JPEG does past 65,500 pixels) must not
    leave the face, crop and comparison files of a FAILED input behind."""
    real = cv2.imencode

    def no_jpeg(ext, img, params=()):
        if ext == ".jpg":
            raise cv2.error("maximum supported image dimension is 65500 pixels")
        return real(ext, img, params)

    monkeypatch.setattr(cv2, "imencode", no_jpeg)
    out = tmp_path / "out"
    assert main(["-o", str(out), "--weights", str(weights), "-q", "--ext", "jpg"]) == EXIT_SOME_FAILED
    err = capsys.readouterr().err
    assert "FAILED" in err and "astronaut_degraded.jpg" in err and "cannot encode" in err, err
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_module_entry_point_lists_backends():
    out = subprocess.run([sys.executable, "-m", "vqfr", "--list-backends"], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    assert out.returncode == EXIT_OK, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("tensorrt") and lines[-1].startswith("torch[cpu]")
    assert any(line.startswith("torch[cpu]") and " yes " in line for line in lines)


def test_default_input_is_the_embedded_demo_photo(tmp_path, weights, capsys):
    """The README's main job: no -i restores the packaged public-domain photo (one face), needing no ../shared."""
    out = tmp_path / "out"
    assert main(["-o", str(out), "--weights", str(weights), "-q"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "no -i given" in captured.err and "astronaut_degraded.jpg" in captured.err
    assert "1 images, 1 faces restored, 0 failed" in captured.out
    restored = cv2.imread(str(out / "restored_imgs" / "astronaut_degraded.jpg"))
    assert restored.shape == (1024, 1024, 3)  # the official demo's default upscale, 2
    assert [p.name for p in (out / "restored_faces").iterdir()] == ["astronaut_degraded_00.png"]


def test_weights_help_names_every_folder_searched(tmp_path, monkeypatch):
    """--help lists where the default weights are looked for: the folders vqfr.runtime.find_weights searches."""
    from vqfr.cli import build_parser
    from vqfr.runtime import WEIGHTS_ENV, find_weights

    help_text = " ".join(build_parser().format_help().split())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for folder, shown in (("experiments/pretrained_models", "./experiments/pretrained_models"),
                          ("weights", "./weights"), ("home/.cache/vqfr", "~/.cache/vqfr")):
        path = tmp_path / folder / "VQFR_v2.pth"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        found = find_weights("VQFRv2")
        assert found is not None and found.resolve() == path.resolve()
        assert shown in help_text, shown
        path.unlink()
    assert f"${WEIGHTS_ENV}" in help_text


def test_weights_from_the_environment_load_like_weights_given_with_the_flag(tmp_path, weights, monkeypatch, capsys):
    """$VQFR_WEIGHTS names a safetensors file of a small architecture: its stored options are used, as with
    --weights (not the default v2 options), and -v is checked against it the same way."""
    from vqfr.runtime import WEIGHTS_ENV

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))
    cv2.imwrite(str(tmp_path / "face.png"), _face(11))
    args = ["-i", str(tmp_path / "face.png"), "--aligned", "-q"]
    assert main([*args, "-o", "env"]) == EXIT_OK, capsys.readouterr().err
    assert main([*args, "-o", "flag", "--weights", str(weights)]) == EXIT_OK
    assert "RANDOM" not in capsys.readouterr().err
    env, flag = (cv2.imread(str(tmp_path / out / "restored_faces" / "face_00.png")) for out in ("env", "flag"))
    assert env is not None and np.array_equal(env, flag)
    assert main([*args, "-o", "v1", "-v", "1"]) == EXIT_ERROR
    assert f"-v 1 was asked but {weights} is a VQFRv2 model" in capsys.readouterr().err


def _released_small_v2(tmp_path):
    """A released-layout .pth of the tiny v2 (no options inside) and the options, as a JSON file shaped like the
    golden models' description."""
    import json

    from vqfr.checkpoint import save_released

    ckpt = save_released(tmp_path / "small_v2.pth", seeded_model(TINY_V2, seed=4).state_dict())
    config = tmp_path / "small_v2.json"
    config.write_text(json.dumps({"arch": "VQFRv2", "network_options": TINY_V2, "input_shape": [1, 3, 64, 64]}))
    return ckpt, config


def test_a_checkpoint_of_other_sizes_needs_config_and_takes_a_json_description(tmp_path, capsys):
    ckpt, config = _released_small_v2(tmp_path)
    cv2.imwrite(str(tmp_path / "face.png"), _face(12))
    args = ["-i", str(tmp_path / "face.png"), "-o", str(tmp_path / "out"), "--weights", str(ckpt), "--aligned", "-q"]
    assert main(args) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("vqfr: error:") and err.count("\n") == 1 and len(err) < 700, err
    assert "shape mismatches" in err and "--config FILE.yml" in err
    assert main([*args, "--config", str(config)]) == EXIT_OK, capsys.readouterr().err
    assert cv2.imread(str(tmp_path / "out" / "restored_faces" / "face_00.png")).shape == (64, 64, 3)


@needs_golden
@pytest.mark.shared
def test_golden_small_model_runs_from_its_own_json(tmp_path, capsys):
    cv2.imwrite(str(tmp_path / "face.png"), _face(13, 128))
    args = ["-i", str(tmp_path / "face.png"), "-o", str(tmp_path / "out"), "--aligned", "-q",
            "--weights", str(GOLDEN / "vqfr_v2_small.pth")]
    assert main(args) == EXIT_ERROR
    err = capsys.readouterr().err
    assert len(err) < 700 and "--config FILE.yml" in err, err
    assert main([*args, "--config", str(GOLDEN / "vqfr_v2_small.json")]) == EXIT_OK, capsys.readouterr().err
    assert cv2.imread(str(tmp_path / "out" / "restored_faces" / "face_00.png")).shape == (128, 128, 3)


def test_a_run_that_cannot_start_leaves_no_output_folders(tmp_path, weights, capsys):
    """The output folders are made (and tried) before the model loads; a run that then cannot start (here an unknown
    device) used to leave them behind, empty. Folders that were there before, and anything in them, stay."""
    cv2.imwrite(str(tmp_path / "face.png"), _face(9))
    args = ["-i", str(tmp_path / "face.png"), "--weights", str(weights), "--aligned", "-q", "--device", "gpu"]
    assert main([*args, "-o", str(tmp_path / "new" / "out")]) == EXIT_ERROR
    assert "unknown device 'gpu'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    (kept / "cmp").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    assert main([*args, "-o", str(kept)]) == EXIT_ERROR
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*")) == ["cmp", "notes.txt"]


def test_a_failed_line_names_the_input_even_when_the_error_names_another_file(tmp_path, weights, capsys, monkeypatch):
    """An error that names another file (the engine, when the model returns NaN for one photo's face) must still say
    which input failed: the FAILED line starts with the input, then the engine's message and its fix."""
    from vqfr.backends.torch import TorchBackend

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        cv2.imwrite(str(inputs / f"f{i}.png"), np.full((64, 64, 3), 0 if i == 1 else 100 + i, np.uint8))
    real = TorchBackend.infer

    def nan_for_black_faces(self, x, fidelity):
        out = real(self, x, fidelity).clone()
        out[(x == -1).flatten(1).all(1)] = float("nan")
        return out

    monkeypatch.setattr(TorchBackend, "infer", nan_for_black_faces)
    code = main(["-i", str(inputs), "-o", str(tmp_path / "out"), "--weights", str(weights), "--aligned", "-q",
                 "--backend", "torch", "--device", "cpu"])
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("vqfr: FAILED")]
    assert code == EXIT_SOME_FAILED and len(failed) == 1, err
    assert failed[0].startswith(f"vqfr: FAILED {inputs / 'f1.png'}: {weights}: the model returned NaN"), err
    assert "Fix: " in failed[0]
