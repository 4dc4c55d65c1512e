"""The restore path's error handling and file safety where mutation testing (round 2) found the other tests silent:
an output folder that takes no files (refused before any input; turning read-only mid-run stops the run),
``--suffix``/``--ext`` in the restored photo's name, the ``--skip-existing`` marker written last, out-of-memory and
unexpected errors naming the file and the fix, one bad input or failed write costing only that input, symlinked
inputs (restored, and their targets never overwritten), globs over sub-folders and files too large to read."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

import vqfr
from deploy.soak import FACE_SIZE, MICRO_V2
from tests.conftest import seeded_model
from tests.test_reliability import _ManyFaces, _png
from tests.test_reliability_cli import _faces, _hashes, _raise_as_output, _run_cli
from vqfr.cli import EXIT_ERROR, EXIT_OK, EXIT_SOME_FAILED
from vqfr.imaging import sniff_format

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return vqfr.save_safetensors(seeded_model(MICRO_V2, seed=5),
                                 tmp_path_factory.mktemp("weights") / "micro_v2.safetensors")


@pytest.fixture
def one_face_detector(monkeypatch):
    """Whole-photo runs find one face (a stand-in detector: MTCNN finds none in random pixels)."""
    import vqfr.faces.detector

    monkeypatch.setattr(vqfr.faces.detector, "load_detector", lambda *a, **k: _ManyFaces(1, cell=32))


def _photo(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    ok, data = cv2.imencode(path.suffix if path.suffix.lower() != ".jpeg" else ".jpg", img)
    assert ok
    path.write_bytes(data.tobytes())
    return path


# ------------------------------------------------------------------------------------------- output folder
def test_an_existing_output_folder_that_takes_no_files_is_a_setup_error(weights, tmp_path, read_only_folder):
    """A read-only output folder is found by the write probe before the model loads: one error line naming the
    folder and the fix, exit 1, nothing written, instead of a run that fails (or seems to succeed) input by input."""
    inputs = _faces(tmp_path / "in", 2)
    out = tmp_path / "out"
    for group in ("restored_faces", "cropped_faces", "cmp"):
        (out / group).mkdir(parents=True)
    read_only_folder(out / "cropped_faces")
    before = _hashes(inputs[0].parent)
    code, stdout, stderr = _run_cli(["-i", str(inputs[0].parent), "-o", str(out), "--weights", str(weights),
                                     "--aligned", "-q"])
    assert code == EXIT_ERROR, stderr
    assert f"{out / 'cropped_faces'}: cannot write into the output folder" in stderr and "Fix: " in stderr, stderr
    assert [p for p in out.rglob("*") if p.is_file()] == []
    assert _hashes(inputs[0].parent) == before


def test_a_read_only_file_system_met_mid_run_stops_the_run(weights, tmp_path, monkeypatch):
    """A file system that turns read-only (EROFS) fails every later write too: the run stops with exit 1 and says
    why, as for a full disk, instead of one FAILED line per remaining input."""
    import vqfr.atomic

    inputs = _faces(tmp_path / "in", 3)
    real = vqfr.atomic.atomic_write_bytes

    def read_only(path, data):
        if "face0000" not in Path(path).name:
            raise OSError(errno.EROFS, "Read-only file system")
        real(path, data)

    monkeypatch.setattr(vqfr.atomic, "atomic_write_bytes", lambda p, d: _raise_as_output(read_only, p, d))
    code, stdout, stderr = _run_cli(["-i", str(inputs[0].parent), "-o", str(tmp_path / "out"), "--weights",
                                     str(weights), "--aligned", "-q", "--batch", "1"])
    assert code == EXIT_ERROR and "stopped:" in stderr and "Read-only file system" in stderr, stderr
    assert "FAILED" not in stderr and "1 images, 1 faces restored, 0 failed" in stdout


# ------------------------------------------------------------------------------------------- links
def test_a_symlinked_image_in_an_input_folder_is_restored(weights, tmp_path):
    """A folder of links to photos kept elsewhere (a curated selection) is a folder of inputs: each link is
    restored like a file, and its target is left unchanged."""
    originals = _faces(tmp_path / "library", 2)
    picks = tmp_path / "picks"
    picks.mkdir()
    for src in originals:
        (picks / src.name).symlink_to(src)
    before = _hashes(originals[0].parent)
    code, stdout, stderr = _run_cli(["-i", str(picks), "-o", str(tmp_path / "out"), "--weights", str(weights),
                                     "--aligned", "-q"])
    assert code == EXIT_OK and "2 images, 2 faces restored, 0 failed" in stdout, stderr
    assert _hashes(originals[0].parent) == before


def test_an_output_that_is_the_target_of_a_linked_input_is_refused(weights, tmp_path):
    """The input ``in/face.png`` is a link to ``out/restored_faces/face_00.png``: writing that output would replace
    the linked photo. It is refused (the input's own file, whatever path leads to it) and the photo kept."""
    target = _faces(tmp_path / "out" / "restored_faces", 1)[0].rename(tmp_path / "out" / "restored_faces" /
                                                                        "face_00.png")
    before = target.read_bytes()
    (tmp_path / "in").mkdir()
    link = tmp_path / "in" / "face.png"
    link.symlink_to(target)
    code, _, stderr = _run_cli(["-i", str(link), "-o", str(tmp_path / "out"), "--weights", str(weights), "--aligned",
                                "-q"])
    assert code == EXIT_SOME_FAILED and "an output would overwrite its own input" in stderr, stderr
    assert target.read_bytes() == before and os.path.islink(link)


# ------------------------------------------------------------------------------------------- output names
def test_suffix_names_the_restored_photo_and_faces_but_not_the_crops(weights, tmp_path, one_face_detector):
    """``--suffix v2`` gives ``restored_imgs/{stem}_v2.{ext}`` and ``restored_faces/{stem}_00_v2.png`` (the
    official demo's names); a run with another suffix is not taken as done by ``--skip-existing``."""
    src = _photo(tmp_path / "in" / "photo.png")
    out = tmp_path / "out"
    args = ["-i", str(src), "-o", str(out), "--weights", str(weights), "-s", "1", "-q", "--skip-existing"]
    code, stdout, stderr = _run_cli([*args, "--suffix", "v2"])
    assert code == EXIT_OK and "1 images, 1 faces restored, 0 failed" in stdout, stderr
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["cmp/photo_00.png", "cropped_faces/photo_00.png", "restored_faces/photo_00_v2.png",
                     "restored_imgs/photo_v2.png"]
    code, stdout, _ = _run_cli([*args, "--suffix", "v3"])
    assert code == EXIT_OK and "1 images, 1 faces restored" in stdout and "skipped" not in stdout
    assert (out / "restored_imgs" / "photo_v3.png").is_file()


@pytest.mark.parametrize("name, ext, written", [("shot.JPEG", "auto", "shot.jpeg"), ("scan.PNG", "auto", "scan.png"),
                                                 ("shot.jpg", "png", "shot.png")])
def test_the_restored_photo_keeps_the_inputs_format_whatever_the_suffixs_case(weights, tmp_path, one_face_detector,
                                                                              name, ext, written):
    """``--ext auto`` writes the restored photo in its input's format, for ``.JPEG`` as for ``.jpg``; ``--ext``
    overrides it. The file's bytes are in the format its name says."""
    src = _photo(tmp_path / "in" / name)
    out = tmp_path / "out"
    code, _, stderr = _run_cli(["-i", str(src), "-o", str(out), "--weights", str(weights), "-s", "1", "-q",
                                "--ext", ext])
    assert code == EXIT_OK, stderr
    assert [p.name for p in (out / "restored_imgs").iterdir()] == [written]
    want = {".jpeg": "JPEG", ".jpg": "JPEG", ".png": "PNG"}[Path(written).suffix]
    assert sniff_format((out / "restored_imgs" / written).read_bytes()) == want


# ------------------------------------------------------------------------------------------- one input's failure
def test_a_failed_write_leaves_no_marker_so_skip_existing_restores_the_input_again(weights, tmp_path,
                                                                                  one_face_detector, monkeypatch):
    """The restored photo, the output ``--skip-existing`` looks for, is written last: when an earlier output of the
    input cannot be written, the input FAILS naming the file and the fix, the others are written, and a resumed run
    restores that input instead of skipping it as done."""
    import vqfr.atomic

    inputs = tmp_path / "in"
    for i in range(3):
        _photo(inputs / f"p{i}.png", seed=i)
    out = tmp_path / "out"
    real = vqfr.atomic.atomic_write_bytes

    def refuse_one(path, data):
        if Path(path).name == "p1_00.png" and Path(path).parent.name == "restored_faces":
            raise vqfr.atomic._output_error(Path(path), PermissionError(13, "Permission denied"))
        real(path, data)

    monkeypatch.setattr(vqfr.atomic, "atomic_write_bytes", refuse_one)
    args = ["-i", str(inputs), "-o", str(out), "--weights", str(weights), "-s", "1", "-q", "--batch", "1",
            "--skip-existing"]
    code, stdout, stderr = _run_cli(args)
    assert code == EXIT_SOME_FAILED and "2 images, 2 faces restored, 1 failed" in stdout, stderr
    failed = [line for line in stderr.splitlines() if line.startswith("vqfr: FAILED")]
    assert len(failed) == 1 and "p1_00.png: cannot be written (Permission denied). Fix: " in failed[0], stderr
    assert sorted(p.name for p in (out / "restored_imgs").iterdir()) == ["p0.png", "p2.png"]
    monkeypatch.setattr(vqfr.atomic, "atomic_write_bytes", real)
    code, stdout, stderr = _run_cli(args)
    assert code == EXIT_OK and "1 images, 1 faces restored, 0 failed, 2 skipped (existing)" in stdout, stderr
    assert sorted(p.name for p in (out / "restored_imgs").iterdir()) == ["p0.png", "p1.png", "p2.png"]


def test_a_bad_input_in_a_chunk_costs_only_itself(weights, tmp_path):
    """A non-square --aligned input restored in one chunk with good faces spoils the shared batch; the chunk is redone
    input by input, so the good faces beside it are restored and only it FAILS (exit 3)."""
    inputs = _faces(tmp_path / "in", 3)
    odd = inputs[0].with_name("face0000b.png")  # sorts between face0000 and face0001: the same chunk of 4
    odd.write_bytes(_png(np.zeros((FACE_SIZE, FACE_SIZE - 3, 3), np.uint8)))
    out = tmp_path / "out"
    code, stdout, stderr = _run_cli(["-i", str(odd.parent), "-o", str(out), "--weights", str(weights), "--aligned",
                                     "-q", "--batch", "4"])
    assert code == EXIT_SOME_FAILED and "3 images, 3 faces restored, 1 failed" in stdout, stderr
    failed = [line for line in stderr.splitlines() if line.startswith("vqfr: FAILED")]
    assert len(failed) == 1 and f"{odd}: is 13x16, not square" in failed[0], stderr
    assert sorted(p.name for p in (out / "restored_faces").iterdir()) == [f"{p.stem}_00.png" for p in inputs]


@pytest.mark.parametrize("error, fragment", [(MemoryError(), "out of memory. Fix: lower --batch or --max-pixels"),
                                             (ZeroDivisionError("boom"), "unexpected ZeroDivisionError: boom (a bug")])
def test_a_non_vqfr_error_of_one_input_names_that_file_and_what_to_do(weights, tmp_path, monkeypatch, error,
                                                                       fragment):
    """Out of memory (a huge photo) or a bug hit by one input: its FAILED line names the file and what to do, and
    the folder run goes on with the others (exit 3)."""
    inputs = _faces(tmp_path / "in", 3)
    real = vqfr.Runtime.read

    def read(self, img):
        if isinstance(img, Path) and img.name == inputs[1].name:  # the CLI reads paths, then restores arrays
            raise error
        return real(self, img)

    monkeypatch.setattr(vqfr.Runtime, "read", read)
    code, stdout, stderr = _run_cli(["-i", str(inputs[0].parent), "-o", str(tmp_path / "out"), "--weights",
                                     str(weights), "--aligned", "-q"])
    assert code == EXIT_SOME_FAILED and "2 images, 2 faces restored, 1 failed" in stdout, stderr
    failed = [line for line in stderr.splitlines() if line.startswith("vqfr: FAILED")]
    assert failed == [f"vqfr: FAILED {inputs[1]}: {fragment}" + failed[0].split(fragment, 1)[-1]], stderr


# ------------------------------------------------------------------------------------------- unusual images


def test_a_file_too_large_for_any_image_within_the_limit_is_refused_unread(tmp_path, monkeypatch):
    """A file larger than any image within the pixel limit could be (8 bytes a pixel plus 64 MiB) is refused by its
    size, naming the file and the fix, without reading it into memory (a multi-gigabyte file named .png)."""
    from vqfr.errors import InputError
    from vqfr.imaging import load_image

    big = tmp_path / "huge.png"
    with open(big, "wb") as f:
        f.truncate((64 << 20) + 8 * 1000 + 1)  # sparse: no disk space
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} was read"))
    with pytest.raises(InputError) as info:
        load_image(big, max_pixels=1000)
    assert str(info.value).startswith(f"{big}: is 67,116,865 bytes, too large for an image of at most 1,000 pixels")
    assert "Fix: " in str(info.value)


def test_a_glob_takes_the_files_it_matches_not_the_folders(weights, tmp_path):
    """``-i 'photos/*'`` over a folder holding sub-folders restores the photos; the sub-folders (even one named like
    an image) are neither inputs that FAIL nor 'non-image files ignored'."""
    inputs = _faces(tmp_path / "in", 2)
    (tmp_path / "in" / "2019").mkdir()
    (tmp_path / "in" / "album.jpg").mkdir()
    code, stdout, stderr = _run_cli(["-i", str(tmp_path / "in" / "*"), "-o", str(tmp_path / "out"), "--weights",
                                     str(weights), "--aligned", "-q"])
    assert code == EXIT_OK and "FAILED" not in stderr, stderr
    assert "2 images, 2 faces restored, 0 failed in" in stdout and "ignored" not in stdout, stdout
    assert sorted(p.name for p in (tmp_path / "out" / "restored_faces").iterdir()) == [f"{p.stem}_00.png"
                                                                                       for p in inputs]


def test_a_fifo_is_refused_as_not_a_regular_file(tmp_path):
    """A named pipe (or a device) given as an image is refused for what it is, naming it and the fix, instead of
    being read (which blocks on a pipe) or called an empty image to re-copy."""
    from vqfr.errors import InputError
    from vqfr.imaging import load_image

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(InputError) as info:
        load_image(fifo)
    assert str(info.value) == f"{fifo}: is not a regular file. Fix: pass an image file"


def test_a_photo_whose_upscaled_result_is_too_large_names_the_file_through_the_api(weights, tmp_path):
    """``restore(path, upscale=...)`` refusing a result over ``max_pixels`` says which file, the size and the fix:
    in a loop over paths the caller must know which photo to downscale."""
    from vqfr.errors import InputError

    src = _photo(tmp_path / "big.png")  # 48x40: 1,920 pixels, 30,720 at 4x
    rt = vqfr.Runtime(weights, max_pixels=10_000)
    with pytest.raises(InputError) as info:
        rt.restore(src, upscale=4)
    assert str(info.value).startswith(f"{src}: upscaled 4x it would be 192x160 = 30,720 pixels, over the limit of "
                                      "10,000. Fix: lower the upscale")
