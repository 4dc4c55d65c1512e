"""Nothing lost: atomic outputs, interrupted runs (a real SIGINT to ``python -m vqfr``), resume, determinism."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

import vqfr
from deploy.soak import FACE_SIZE, MICRO_V2
from tests.conftest import FACES, ROOT, needs_faces, seeded_model
from vqfr.atomic import atomic_path, atomic_write_bytes
from vqfr.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, main
from vqfr.errors import ConfigError, OutputError, run_command

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

GROUPS = ("restored_faces", "cropped_faces", "cmp")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return vqfr.save_safetensors(seeded_model(MICRO_V2, seed=5),
                                 tmp_path_factory.mktemp("weights") / "micro_v2.safetensors")


@pytest.fixture(autouse=True)
def sigint_handler():
    """Every test starts with SIGINT as in a terminal (pytest started in the background, by ``&`` in a script,
    inherits it ignored, and the CLI rightly keeps it so); yields a setter, and the test process's own handler
    comes back after the test."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield lambda handler: signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGINT, before)


def _sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` for a CLI subprocess that gets SIGINT: not ignored, whatever this process inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _faces(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        face = cv2.resize(small, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_CUBIC)
        paths.append(folder / f"face{i:04d}.png")
        cv2.imwrite(str(paths[-1]), face)
    return paths


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


def _complete_sets(out: Path, inputs: list[Path]) -> tuple[int, list[str]]:
    """(inputs with all three outputs, problems: partial sets, undecodable outputs, temporary files)."""
    problems, done = [], 0
    for src in inputs:
        paths = [out / g / f"{src.stem}_00.png" for g in GROUPS]
        present = [p.is_file() for p in paths]
        if all(present):
            if any(cv2.imread(str(p)) is None for p in paths):
                problems.append(f"{src.name}: an output does not decode")
            done += 1
        elif any(present):
            problems.append(f"{src.name}: partial output set {present}")
    temps = [p.name for p in out.rglob("*") if p.name.startswith(".")]
    if temps:
        problems.append(f"temporary files left: {temps[:3]}")
    return done, problems


# --------------------------------------------------------------------------------------------- atomic writes
def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "out.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("encoder died")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_atomic_path_syncs_the_file_before_the_rename(tmp_path, monkeypatch):
    """Writers that take a path (torch.save of checkpoints and training states) get the same durability as
    atomic_write_bytes: the temporary file reaches the disk before it is renamed over the old one."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(a).stat().st_ino)),
                                                     real_replace(a, b)))
    with atomic_path(tmp_path / "1.state") as tmp:
        tmp.write_bytes(b"state")
        inode = tmp.stat().st_ino
    assert ("fsync", inode) in events and ("replace", inode) in events
    assert events.index(("fsync", inode)) < events.index(("replace", inode))
    assert (tmp_path / "1.state").read_bytes() == b"state"


def test_atomic_write_gives_normal_permissions(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    with open(tmp_path / "b.bin", "wb") as f:
        f.write(b"x")
    mode = stat.S_IMODE((tmp_path / "a.bin").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.bin").stat().st_mode), oct(mode)


def test_atomic_write_takes_every_name_the_folder_takes(tmp_path):
    """The temporary file's name is longer than the output's; near the 255-byte limit it is shortened."""
    names = ["a" * 251 + ".png", "é" * 125 + ".png"]  # 255 and 254 bytes
    for name in names:
        atomic_write_bytes(tmp_path / name, b"x")
        assert (tmp_path / name).read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temporary file left


def test_write_errors_become_output_errors(tmp_path):
    with pytest.raises(OutputError, match="cannot be written") as info:
        atomic_write_bytes(tmp_path / "missing-folder" / "x.png", b"x")
    assert info.value.errno == 2
    with pytest.raises(OutputError, match="cannot encode a 70000x1 image as .jpg"):
        vqfr.imaging.save_image(tmp_path / "wide.jpg", np.zeros((1, 70000, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_disk_full_stops_the_run(weights, tmp_path, monkeypatch):
    """ENOSPC on an output ends the run with exit 1 (every later input would fail the same way)."""
    import vqfr.atomic

    inputs = _faces(tmp_path / "in", 3)
    real = vqfr.atomic.atomic_write_bytes

    def full(path, data):
        if "face0001" in Path(path).name:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(vqfr.atomic, "atomic_write_bytes", lambda p, d: _raise_as_output(full, p, d))
    code, stdout, stderr = _run_cli(["-i", str(inputs[0].parent), "-o", str(tmp_path / "out"), "--weights",
                                     str(weights), "--aligned", "-q", "--batch", "1"])
    assert code == 1 and "stopped:" in stderr and "No space left on device" in stderr
    assert "1 images" in stdout  # face0000 was written before the disk filled up


def _raise_as_output(fn, path, data):
    with atomic_path(path) as tmp:
        fn(path, data)
        tmp.write_bytes(data)


# --------------------------------------------------------------------------------------------- interrupts
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, EXIT_TERMINATED)])
def test_signal_during_a_write_waits_for_the_whole_set(weights, tmp_path, monkeypatch, sig, code):
    """The signal arrives between the first and second output file of an input: all three are still written."""
    import vqfr.atomic

    inputs = _faces(tmp_path / "in", 4)
    real, writes = vqfr.atomic.atomic_write_bytes, []

    def write_then_signal(path, data):
        real(path, data)
        writes.append(Path(path).name)
        if len(writes) == 4:  # the first output of the second input
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(vqfr.atomic, "atomic_write_bytes", write_then_signal)
    out = tmp_path / "out"
    result, _, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(out), "--weights", str(weights),
                                  "--aligned", "-q", "--batch", "1"])
    assert result == code
    assert ("terminated" if sig == signal.SIGTERM else "interrupted") in stderr
    done, problems = _complete_sets(out, inputs)
    assert done == 2 and problems == [], problems


def test_a_write_that_fails_while_a_signal_waits_is_still_reported(weights, tmp_path, monkeypatch):
    """Ctrl-C arrives during the first output of the second input, and its next output cannot be written: the run
    stops as interrupted, and the failed write is reported (file and reason), not hidden by the interrupt."""
    import vqfr.atomic

    inputs = _faces(tmp_path / "in", 3)
    real, writes = vqfr.atomic.atomic_write_bytes, []

    def signal_then_fail(path, data):
        writes.append(Path(path).name)
        if len(writes) == 5:  # the second output of the second input
            raise PermissionError(13, "Permission denied")
        real(path, data)
        if len(writes) == 4:  # the first output of the second input
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(vqfr.atomic, "atomic_write_bytes", lambda p, d: _raise_as_output(signal_then_fail, p, d))
    out = tmp_path / "out"
    code, stdout, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(out), "--weights", str(weights),
                                     "--aligned", "-q", "--batch", "1"])
    assert code == EXIT_INTERRUPTED and "interrupted" in stderr
    failed = [line for line in stderr.splitlines() if line.startswith("vqfr: FAILED")]
    assert len(failed) == 1 and writes[4] in failed[0] and "Permission denied" in failed[0], stderr
    assert "1 images" in stdout and "1 failed" in stdout
    assert len(writes) == 5, "nothing is written after the interrupt"
    assert _complete_sets(out, inputs)[0] == 1


def test_a_full_disk_while_a_signal_waits_is_reported_as_the_stop(weights, tmp_path, monkeypatch):
    """Ctrl-C, then the disk fills up during the outputs being finished: the run exits as interrupted and says the
    output folder stopped taking files (not one more FAILED input)."""
    import vqfr.atomic

    _faces(tmp_path / "in", 3)
    real, writes = vqfr.atomic.atomic_write_bytes, []

    def signal_then_full(path, data):
        writes.append(Path(path).name)
        if len(writes) == 5:
            raise OSError(28, "No space left on device")
        real(path, data)
        if len(writes) == 4:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(vqfr.atomic, "atomic_write_bytes", lambda p, d: _raise_as_output(signal_then_full, p, d))
    code, stdout, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
                                     str(weights), "--aligned", "-q", "--batch", "1"])
    assert code == EXIT_INTERRUPTED and "interrupted" in stderr
    assert "stopped:" in stderr and "No space left on device" in stderr and "FAILED" not in stderr, stderr
    assert "1 images" in stdout and "0 failed" in stdout


def test_signal_while_the_model_loads(weights, tmp_path, monkeypatch):
    import vqfr.runtime

    def interrupted_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(vqfr.runtime, "Runtime", interrupted_load)
    _faces(tmp_path / "in", 1)
    code, _, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights", str(weights),
                                "--aligned", "-q"])
    assert code == EXIT_INTERRUPTED and stderr.strip() == "vqfr: interrupted before any input was restored"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the CLI restores the handlers it set"


def test_an_ignored_sigint_stays_ignored(weights, tmp_path, monkeypatch, sigint_handler):
    """Started with SIGINT ignored (``&`` in a script), the CLI keeps ignoring it and finishes the run."""
    import vqfr.runtime

    real_runtime = vqfr.runtime.Runtime

    def interrupted_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_runtime(*args, **kwargs)

    sigint_handler(signal.SIG_IGN)
    monkeypatch.setattr(vqfr.runtime, "Runtime", interrupted_load)
    inputs = _faces(tmp_path / "in", 1)
    code, _, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights", str(weights),
                                "--aligned", "-q"])
    assert code == 0, stderr
    assert _complete_sets(tmp_path / "out", inputs)[0] == 1
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_output_names_never_collide(tmp_path):
    from vqfr.cli import _output_stems

    files = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "c" / "X.PNG", tmp_path / "d" / "p.jpg",
             tmp_path / "d" / "p.png", tmp_path / "d" / "p_png.png", tmp_path / "d" / "q.png"]
    stems = _output_stems(files)
    assert len({v.casefold() for v in stems.values()}) == len(files)
    assert stems[files[-1]] == "q" and stems[files[3]] == "p_jpg"


def test_sigint_to_a_real_run_then_resume(weights, tmp_path):
    """SIGINT to ``python -m vqfr`` mid-run: exit 130, only complete outputs; --skip-existing finishes the set,
    and what the other process wrote is byte-identical to this process's result for the same batches."""
    inputs = _faces(tmp_path / "in", 40, seed=1)
    before = _hashes(tmp_path / "in")
    out = tmp_path / "out"
    argv = ["-i", str(tmp_path / "in"), "-o", str(out), "--weights", str(weights), "--aligned", "-q", "--batch", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "vqfr", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_as_in_a_terminal)
    deadline = time.monotonic() + 120
    faces = out / "restored_faces"
    while time.monotonic() < deadline and proc.poll() is None:
        if faces.is_dir() and sum(not name.startswith(".") for name in os.listdir(faces)) >= 4:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "interrupted; every output written so far is complete" in stderr and "Traceback" not in stderr
    done, problems = _complete_sets(out, inputs)
    assert problems == [] and 4 <= done < len(inputs), (done, problems)  # stopped mid-run, not at the end
    written_there = {p.name: p.read_bytes() for p in (out / "restored_faces").iterdir()}

    code, resumed, _ = _run_cli([*argv, "--skip-existing"])
    assert code == EXIT_OK
    assert f"{len(inputs) - done} images" in resumed and f"{done} skipped (existing)" in resumed
    assert _complete_sets(out, inputs) == (len(inputs), [])
    assert _hashes(tmp_path / "in") == before

    # Same inputs in the same batches (--batch 2 from the start), same backend, another process: same bytes.
    here = vqfr.Runtime(weights, max_batch=2).restore_batch(inputs[:4], aligned=True)
    for src, img in zip(inputs[:4], here, strict=True):
        mine = vqfr.imaging.save_image(tmp_path / f"{src.stem}_00.png", img).read_bytes()
        assert mine == written_there[f"{src.stem}_00.png"]


def test_sigint_while_the_cli_starts_is_a_clean_exit(tmp_path):
    """Ctrl-C during the seconds ``python -m vqfr`` spends importing torch: exit 130 with one line, no traceback,
    nothing written. The signal is sent once the import of torch is under way (``-X importtime`` reports it)."""
    out = tmp_path / "out"
    argv = [sys.executable, "-X", "importtime", "-m", "vqfr", "-i", str(tmp_path), "-o", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_as_in_a_terminal)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:  # importtime reports each module as its import ends
        lines.append(line)
        if line.rstrip().endswith("torch._utils_internal"):
            break
    assert any("torch._utils_internal" in line for line in lines), "".join(lines[-5:])
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    stderr = "".join(line for line in [*lines, *rest.splitlines(True)] if not line.startswith("import time:"))
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr, stderr
    assert not out.exists()


def test_the_vqfr_command_runs_the_cli_through_the_guarded_entry(monkeypatch, capsys):
    """The ``vqfr`` console script (pyproject) goes through ``vqfr.__main__.run``, which guards the start-up."""
    import importlib
    import tomllib

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["vqfr"]
    module, _, name = target.partition(":")
    entry = getattr(importlib.import_module(module), name)
    assert target == "vqfr.__main__:run"
    monkeypatch.setattr(sys, "argv", ["vqfr", "--help"])
    with pytest.raises(SystemExit) as exit_:
        entry()
    assert exit_.value.code == 0 and "usage: vqfr" in capsys.readouterr().out


def test_import_vqfr_leaves_torch_until_first_use():
    """``import vqfr`` (and so ``python -m vqfr`` before its CLI loads) imports no torch; the public names still
    resolve, and ``from vqfr import *`` gets them all."""
    code = ("import sys, vqfr; print('torch' in sys.modules); from vqfr import *; "
            "print('torch' in sys.modules, Runtime.__module__, load_model.__module__, sorted(set(vqfr.__all__) - "
            "set(dir(vqfr))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["False", "True vqfr.runtime vqfr.checkpoint []"]
    with pytest.raises(AttributeError, match="no attribute 'Runtim'"):
        vqfr.Runtim  # noqa: B018


def test_import_vqfr_still_gives_its_submodules_as_attributes():
    """``import vqfr`` used to import vqfr.models, vqfr.runtime, vqfr.checkpoint (and what they import), so
    ``vqfr.models.official_options(...)`` worked after a bare ``import vqfr`` (deploy.roofline does this). The lazy
    package loads a submodule on first access too; an unknown name is still an AttributeError."""
    code = ("import sys, vqfr; print('torch' in sys.modules); "
            "print(vqfr.models.official_options('v2')['type'], vqfr.runtime.Runtime is vqfr.Runtime, "
            "vqfr.checkpoint.load_model is vqfr.load_model, bool(vqfr.backends.BACKENDS)); "
            "print(hasattr(vqfr, 'nonexistent'), hasattr(vqfr, 'a.b'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split("\n")[:3] == ["False", "VQFRv2 True True True", "False False"], out.stderr[-2000:]


# --------------------------------------------------------------------------------------------- I/O threads
def test_outputs_are_written_while_the_model_runs_on_the_next_chunk(weights, tmp_path, monkeypatch):
    """Encoding and writing PNGs takes longer than a GPU forward: a chunk's outputs must be written on other threads
    while the model runs on the next chunk, and a chunk's images read side by side."""
    import threading

    import vqfr.atomic
    import vqfr.runtime

    inputs = _faces(tmp_path / "in", 4)
    second_chunk = threading.Event()
    real_write, real_restore, real_read = (vqfr.atomic.atomic_write_bytes, vqfr.runtime.Runtime.restore_faces_batch,
                                           vqfr.runtime.Runtime.read)
    overlapped, calls, reading = [], [], threading.Barrier(2, timeout=10)

    def restore(self, images, **kwargs):
        calls.append(len(images))
        if len(calls) == 2:
            second_chunk.set()
        return real_restore(self, images, **kwargs)

    def write(path, data):
        if "face0000" in Path(path).name:  # the first chunk's outputs wait for the model to start on the second
            overlapped.append(second_chunk.wait(timeout=10))
        real_write(path, data)

    def read(self, img):
        if "face000" in str(img) and len(calls) == 0:  # both images of the first chunk are read at once
            reading.wait()
        return real_read(self, img)

    monkeypatch.setattr(vqfr.atomic, "atomic_write_bytes", write)
    monkeypatch.setattr(vqfr.runtime.Runtime, "restore_faces_batch", restore)
    monkeypatch.setattr(vqfr.runtime.Runtime, "read", read)
    code, stdout, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
                                     str(weights), "--aligned", "-q", "--batch", "2", "--io-threads", "2"])
    assert code == EXIT_OK and "4 images" in stdout, stderr
    assert calls == [2, 2] and overlapped == [True] * 3, overlapped
    assert _complete_sets(tmp_path / "out", inputs) == (4, [])


def test_any_number_of_io_threads_writes_the_same_bytes(weights, tmp_path):
    inputs = _faces(tmp_path / "in", 5, seed=4)
    runs = []
    for threads in (1, 3):
        out = tmp_path / f"out{threads}"
        code, stdout, stderr = _run_cli(["-i", str(inputs[0].parent), "-o", str(out), "--weights", str(weights),
                                         "--aligned", "-q", "--batch", "2", "--io-threads", str(threads)])
        assert code == EXIT_OK and "5 images, 5 faces restored, 0 failed" in stdout, stderr
        runs.append({str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))})
    assert len(runs[0]) == 15 and runs[0] == runs[1]


# --------------------------------------------------------------------------------------------- determinism
def test_cli_runs_are_byte_identical(weights, tmp_path):
    inputs = _faces(tmp_path / "in", 3, seed=2)
    runs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        assert _run_cli(["-i", str(inputs[0].parent), "-o", str(out), "--weights", str(weights), "--aligned", "-q",
                         "--batch", "2"])[0] == EXIT_OK
        runs.append({str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))})
    assert len(runs[0]) == 9 and runs[0] == runs[1]


def test_api_is_deterministic(weights):
    """Including the main branch (fidelity > 0: deformable convolutions)."""
    rng = np.random.default_rng(3)
    faces = list(rng.integers(0, 256, (2, FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8))
    a = vqfr.Runtime(weights, max_batch=2).restore_batch(faces, aligned=True, fidelity=0.3)
    b = vqfr.Runtime(weights, max_batch=2).restore_batch(faces, aligned=True, fidelity=0.3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@needs_faces
@pytest.mark.shared
def test_whole_photo_is_deterministic(weights):
    photo = FACES / "whole" / "Blake_Lively.jpg"
    rt = vqfr.Runtime(weights)
    first, second = rt.restore_faces(photo, upscale=1), rt.restore_faces(photo, upscale=1)
    assert len(first.faces) == 2 and np.array_equal(first.image, second.image)


def test_export_commands_report_errors_and_missing_extras_without_a_traceback(capsys):
    """The export CLIs' shared exit path: our errors and a missing extra print one line and give 1; a bug raises."""
    assert run_command(lambda: "wrote x.onnx") == 0 and capsys.readouterr().out == "wrote x.onnx\n"

    def bad_config():
        raise ConfigError("unknown model version 'v7'", fix="use v1 or v2")

    def missing_extra():
        raise ImportError("onnxscript is needed for ONNX export but is not installed. Fix: pip install 'vqfr[onnx]'")

    for action, words in ((bad_config, "Fix: use v1 or v2"), (missing_extra, "pip install")):
        assert run_command(action) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        run_command(lambda: str(1 / 0))


@pytest.mark.parametrize("installed", [None, types.SimpleNamespace(__version__="0.5.7")], ids=["missing", "too-old"])
def test_onnx_export_command_without_a_usable_onnxscript_prints_one_line(installed):
    """``python -m export.onnx`` imports onnxscript at module level: without it (or with one too old) the command
    still ends in one line naming the pip command, not a traceback."""
    stub = "None" if installed is None else "types.SimpleNamespace(__version__='0.5.7')"
    script = (f"import runpy, sys, types; sys.modules['onnxscript'] = {stub}; "
              "sys.argv = ['export.onnx', '--random-weights', '-o', 'x.onnx']; "
              "runpy.run_module('export.onnx', run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: onnxscript") and "pip install" in lines[0] and "vqfr-deploy[onnx]" in lines[0]


# --------------------------------------------------------------------------------------------- signals and threads
def test_signal_while_a_chunk_is_read_waits_for_its_reads(weights, tmp_path, monkeypatch, capfd):
    """Ctrl-C while the reader threads decode: the run stops, but only once the chunk's reads are over, so no reader
    thread outlives main() (tests and callers run it many times in one process) and no decoder chatter reaches
    stderr after the CLI stopped silencing it."""
    import threading

    import vqfr.runtime

    inputs = _faces(tmp_path / "in", 4)
    real_read, returned = vqfr.runtime.Runtime.read, threading.Event()

    def read(self, img):
        if "face0001" in str(img):
            os.kill(os.getpid(), signal.SIGINT)
            returned.wait(timeout=2)  # still decoding when main() returns, unless main() waits for it
            os.write(2, b"libpng warning: chatter from a read\n")
        return real_read(self, img)

    monkeypatch.setattr(vqfr.runtime.Runtime, "read", read)
    try:
        code, stdout, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
                                         str(weights), "--aligned", "-q", "--batch", "2", "--io-threads", "2"])
        alive = [t.name for t in threading.enumerate() if t.name.startswith("vqfr-")]
    finally:
        returned.set()
    assert code == EXIT_INTERRUPTED and "interrupted; every output written so far is complete" in stderr, stderr
    assert alive == [], alive
    assert "chatter" not in capfd.readouterr().err
    assert "0 images" in stdout and _complete_sets(tmp_path / "out", inputs) == (0, [])


def test_a_second_signal_never_raises_inside_the_first_ones_clean_up(sigint_handler):
    """Only the first signal becomes a KeyboardInterrupt; a second one (Ctrl-C pressed twice) waits like it. Raised
    again while the first unwinds, it escaped the clean-up (the summary and the wait for the writes were skipped),
    or landed inside ``threading``'s own clean-up and broke a lock (``RuntimeError: release unlocked lock``)."""
    from vqfr.cli import _Signals

    signals = _Signals()
    signals.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
            time.sleep(0)
        try:
            signal.raise_signal(signal.SIGINT)  # the second: recorded, not raised
            time.sleep(0)
            with signals.protect():
                signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pytest.fail("a second signal raised KeyboardInterrupt again")
        assert signals.received == signal.SIGTERM  # the first one decides the exit code
    finally:
        signals.restore()


def test_a_signal_while_the_run_reports_is_ignored(weights, tmp_path, monkeypatch):
    """Every input written, Ctrl-C while the engine is released: the run was not cut short, so it is reported as
    done, not as 'interrupted before any input was restored' without a summary."""
    import vqfr.runtime

    inputs = _faces(tmp_path / "in", 2)
    real_close = vqfr.runtime.Runtime.close

    def close(self):
        os.kill(os.getpid(), signal.SIGINT)
        real_close(self)

    monkeypatch.setattr(vqfr.runtime.Runtime, "close", close)
    code, stdout, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
                                     str(weights), "--aligned", "-q", "--batch", "2"])
    assert code == EXIT_OK and "2 images, 2 faces restored, 0 failed" in stdout, stderr
    assert "interrupted" not in stderr and _complete_sets(tmp_path / "out", inputs) == (2, [])


def test_a_full_disk_met_by_several_inputs_of_a_chunk_is_one_stop(weights, tmp_path, monkeypatch):
    """A chunk's outputs are written side by side, so a disk that fills up fails several of its inputs at once: the
    run stops once (exit 1), without one FAILED line per input that met the same full disk."""
    import vqfr.atomic

    _faces(tmp_path / "in", 4)
    real = vqfr.atomic.atomic_write_bytes

    def full(path, data):
        if "face0001" in Path(path).name or "face0002" in Path(path).name:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(vqfr.atomic, "atomic_write_bytes", lambda p, d: _raise_as_output(full, p, d))
    code, stdout, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
                                     str(weights), "--aligned", "-q", "--batch", "4", "--io-threads", "4"])
    assert code == 1 and "stopped:" in stderr and "No space left on device" in stderr
    assert "FAILED" not in stderr and "0 failed" in stdout, stderr
