"""The engine sidecar: round trip, validation and clear errors."""

import dataclasses
import json
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from vqfr.errors import EngineError
from vqfr.sidecar import EngineMeta, TensorSpec, read_sidecar, sidecar_path, write_sidecar


def _meta():
    return EngineMeta(arch="VQFRv2", options={"type": "VQFRv2"}, face_size=512, precision="fp16",
                      inputs=(TensorSpec("input", (-1, 3, 512, 512)), TensorSpec("fidelity", (-1,))),
                      outputs=(TensorSpec("output", (-1, 3, 512, 512)),), weights_sha256="ab" * 32, opset=19,
                      built_with={"torch": "2.13.0"})


def test_round_trip(tmp_path):
    engine = tmp_path / "m.onnx"
    path = write_sidecar(engine, _meta())
    assert path == sidecar_path(engine) == tmp_path / "m.onnx.json"
    meta = read_sidecar(engine)
    assert meta == _meta() and meta.takes_fidelity and meta.input_names == ["input", "fidelity"]


def test_only_an_export_of_random_weights_counts_as_random_weights():
    """The runtime's random-weights warning for engines reads this: the note ``export --random-weights`` writes, not a
    checkpoint whose file name happens to begin with "random"."""
    from export.metadata import engine_meta
    from export.source import ExportSpec
    from tests.conftest import TINY_V2, seeded_model

    model, spec = seeded_model(TINY_V2), ExportSpec(1, 32, 32, False, True)
    assert engine_meta(model, spec, precision="fp32", weights=None, random_weights=3).from_random_weights
    for name in ("VQFR_v2.pth", "random_faces_v2.safetensors"):
        meta = dataclasses.replace(_meta(), extra={"weights": name})
        assert not meta.from_random_weights, name
    assert not _meta().from_random_weights  # a sidecar without the note


def test_missing_and_malformed(tmp_path):
    engine = tmp_path / "m.onnx"
    with pytest.raises(EngineError, match="no readable sidecar"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        read_sidecar(engine)
    d = _meta().to_dict()
    del d["face_size"]
    sidecar_path(engine).write_text(json.dumps(d))
    with pytest.raises(EngineError, match="face_size"):
        read_sidecar(engine)
    d = _meta().to_dict() | {"format": "other/9"}
    sidecar_path(engine).write_text(json.dumps(d))
    with pytest.raises(EngineError, match="format"):
        read_sidecar(engine)


def test_binary_sidecar_and_missing_engine_are_engine_errors(tmp_path, capsys):
    from vqfr.inspect_engine import main
    from vqfr.sidecar import verify_engine_file

    engine = tmp_path / "m.onnx"
    sidecar_path(engine).write_bytes(b"\xff\xfe\x00\x81 not text")  # e.g. an engine copied over its sidecar
    with pytest.raises(EngineError, match="not valid JSON"):
        read_sidecar(engine)
    engine.write_bytes(b"engine bytes")
    write_sidecar(engine, _meta())
    engine.unlink()  # moved away, its sidecar left behind
    with pytest.raises(EngineError, match="cannot read the engine"):
        verify_engine_file(engine, read_sidecar(engine))
    before = sidecar_path(engine).read_bytes()
    for argv in ([str(engine)], [str(engine), "--update"]):
        assert main(argv) == 1
        assert "m.onnx: cannot read the engine" in capsys.readouterr().err
    assert sidecar_path(engine).read_bytes() == before, "--update must not drop the recorded hash"


def test_inspect_engine_prints_errors_on_stderr_and_its_report_on_stdout(tmp_path, capsys):
    """Errors went to stdout with exit status 1, so ``inspect_engine m.onnx > report.json`` hid them in the
    report. They go to stderr (exit 1); the sidecar and the verdict stay on stdout."""
    from vqfr.inspect_engine import main

    engine = tmp_path / "m.onnx"
    assert main([str(engine)]) == 1  # no sidecar
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and "m.onnx.json" in err and "Fix:" in err
    engine.write_bytes(b"engine bytes")
    write_sidecar(engine, _meta())
    assert main([str(engine)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.endswith("}\nok: the engine matches its sidecar\n")
    assert json.loads(out.rsplit("\n", 2)[0])["arch"] == "VQFRv2"
    engine.write_bytes(b"engine bytes, changed")
    assert main([str(engine)]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and "has changed since export" in err
    assert json.loads(out)["arch"] == "VQFRv2"  # the report alone
    assert main([str(engine), "--update"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("updated ") and err == ""


def test_the_command_the_error_names_runs_without_a_warning(tmp_path):
    """The fix of a changed engine names a command; run as written it records the change, and Python prints no
    RuntimeWarning about the module being imported twice (``python -m`` of a module the package imports)."""
    from vqfr.sidecar import verify_engine_file

    engine = tmp_path / "m.onnx"
    engine.write_bytes(b"engine bytes")
    write_sidecar(engine, _meta())
    engine.write_bytes(b"engine bytes, changed on purpose")
    with pytest.raises(EngineError) as err:
        verify_engine_file(engine, read_sidecar(engine))
    command = shlex.split(err.value.fix.split("record the new file with ")[1])
    assert command[:2] == ["python", "-m"]
    for argv in (command[2:], [command[2], str(engine)]):  # --update, then the check
        proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Warning" not in proc.stderr, proc.stderr
    assert "ok: the engine matches its sidecar" in proc.stdout


def test_the_old_sidecar_command_points_to_its_new_name(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vqfr.sidecar", str(tmp_path / "m.onnx")], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 1 and "python -m vqfr.inspect_engine" in done.stderr


@pytest.mark.parametrize("module", ["vqfr.inspect_engine", "training.metrics"])
def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path, module):
    """``python -m vqfr.inspect_engine ENGINE | head -1``: the reader closes the pipe before the report is written,
    and the command ends with 141 (128 + SIGPIPE, as ``cat`` would) and nothing on stderr, not a BrokenPipeError
    traceback."""
    engine = tmp_path / "m.onnx"
    engine.write_bytes(b"engine bytes")
    write_sidecar(engine, _meta())
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "a.png").write_bytes((ROOT / "vqfr" / "demo" / "astronaut_degraded.jpg").read_bytes())
    argv = [str(engine)] if module == "vqfr.inspect_engine" else ["psnr-ssim", "--restored", str(faces), "--gt",
                                                                  str(faces)]
    proc = subprocess.Popen([sys.executable, "-m", module, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command has written anything: its first write finds the pipe closed
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, stderr
    assert stderr == ""
