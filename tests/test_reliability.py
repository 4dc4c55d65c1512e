"""The bad-input table (docs/RELIABILITY.md): every case through the Python API and through the CLI.

The corpus is generated here (no binary files are committed). The model is the micro VQFRv2 of deploy.soak (16 px
faces, seeded weights): the real architecture and pipeline, milliseconds a face.

For each case the API raises the listed vqfr.errors type with a message naming the file (when there is one), the
listed fragment and a fix; or, for valid odd formats, restores the image. The CLI prints one line per failing input
(no traceback), writes every good output, and exits 3 when some inputs failed; setup errors (engine, weights, output
folder) exit 1 with one line.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

import vqfr
from deploy.soak import BAD_KINDS, FACE_SIZE, MICRO_V2, huge_png_header
from tests.conftest import FACES, ROOT, TINY_V1, needs_faces, seeded_model
from vqfr.cli import EXIT_ERROR, EXIT_OK, EXIT_SOME_FAILED, main
from vqfr.errors import BackendUnavailable, CheckpointError, ConfigError, EngineError, InputError, OutputError
from vqfr.imaging import save_image
from vqfr.sidecar import EngineMeta, TensorSpec, write_sidecar

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

S = FACE_SIZE


def _face(seed: int, size: int = S) -> np.ndarray:
    small = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def _jpeg(img: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", img)[1].tobytes()


def _cmyk_jpeg(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[:, :, ::-1].copy()).convert("CMYK").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _huge_jpeg_header() -> bytes:
    """A real small JPEG whose frame header is patched to claim 30000x30000."""
    data = bytearray(_jpeg(_face(0)))
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5:sof + 9] = (30000).to_bytes(2, "big") * 2
    return bytes(data)


def _meta(**built) -> EngineMeta:
    return EngineMeta(arch="VQFRv2", options=copy.deepcopy(MICRO_V2), face_size=S, precision="fp32",
                      inputs=(TensorSpec("input", (-1, 3, S, S)), TensorSpec("fidelity", (-1,))),
                      outputs=(TensorSpec("output", (-1, 3, S, S)),), built_with=built)


def _engine(tmp: Path, name: str, data: bytes, change: Callable[[bytes], bytes] | None = None, **built) -> Path:
    """An engine file with its sidecar (which records the file's size and hash); ``change`` alters it after."""
    path = tmp / name
    path.write_bytes(data)
    write_sidecar(path, _meta(**built))
    if change is not None:
        path.write_bytes(change(data))
    return path


class _RunsCode:
    def __reduce__(self):
        return (eval, ("open(__import__('os').environ['VQFR_PWNED'], 'w').write('pwned')",))


def _evil_pickle(tmp: Path) -> Path:
    path = tmp / "evil.pth"
    torch.save({"params": {"x": torch.zeros(1)}, "payload": _RunsCode()}, path)
    return path


def _missing_keys(tmp: Path, weights: Path) -> Path:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(weights))
    dropped = sorted(sd)[:3]
    path = tmp / "missing_keys.safetensors"
    save_file({k: v for k, v in sd.items() if k not in dropped}, str(path),
              metadata={"options": __import__("json").dumps(MICRO_V2)})
    return path


def _other_version(tmp: Path) -> Path:
    return vqfr.save_safetensors(seeded_model(TINY_V1, seed=2), tmp / "tiny_v1.safetensors")


def _fake_tensorrt(monkeypatch, version: str = "10.8.0.43", capability=(9, 0)) -> None:
    """Pretend TensorRT and a GPU are here, so the sidecar comparison runs (no TensorRT on this machine)."""
    import vqfr.backends.tensorrt as trt_backend

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(trt_backend, "missing_package", lambda *a: None)
    monkeypatch.setattr(trt_backend, "cuda_missing", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")


class _ManyFaces:
    """A detector that reports a grid of n faces (their landmarks at the template), to test batching and paste."""

    def __init__(self, n: int, cell: int = 24):
        self.n, self.cell = n, cell

    def detect(self, img):
        from vqfr.faces.align import template
        from vqfr.faces.detector import Detection

        cols = img.shape[1] // self.cell
        out = []
        for i in range(self.n):
            x, y = (i % cols) * self.cell, (i // cols) * self.cell
            lm = template(self.cell) + np.float32([x, y])
            out.append(Detection(np.float32([x, y, x + self.cell, y + self.cell]), 0.99, lm))
        return out


# ------------------------------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Case:
    """One row of docs/RELIABILITY.md.

    ``make(tmp, weights)`` builds the input; ``api(rt, thing)`` calls the API on it; for a valid input (``error``
    None) ``check(rt, thing, result)`` checks the result. ``cli`` is a key of :data:`CLI_TEXT`: ``fail`` (one FAILED
    line, others go on, exit 3), ``restored`` (converted, outputs written), ``setup`` (one error line, exit 1;
    ``cli_args(thing, weights)`` gives the run), ``array`` (API only), ``no-face`` / ``many-faces`` (photo tests
    below), ``overwrite`` (CLI only: the API writes files only through ``save_image``, where it is told to).
    """

    id: str
    error: type | None
    fragment: str
    cli: str
    make: Callable[[Path, Path], Any]
    api: Callable[[Any, Any], Any] | None
    cli_args: Callable[[Any, Path], list[str]] | None = None
    cli_fragment: str | None = None
    fake_tensorrt: bool = False
    check: Callable[[Any, Any, Any], None] | None = None
    whole_photo: bool = False  # the CLI run is without --aligned (detector and parser are built only then)


def _aligned(rt, thing):
    return rt.restore(thing, aligned=True)


def _converted_like_cv2_imread(rt, thing, out):
    assert out.shape == (S, S, 3) and out.dtype == np.uint8
    official = cv2.imread(str(thing), cv2.IMREAD_COLOR)  # the official demo's reader
    loaded = rt.read(thing)
    assert loaded.shape == official.shape and np.abs(loaded.astype(int) - official).max() <= 1
    assert np.array_equal(out, rt.restore(loaded, aligned=True)), "a path restores like its array"


def _cmyk_colours(rt, thing, out):
    _converted_like_cv2_imread(rt, thing, out)
    # Pillow writes Adobe (inverted) CMYK, as Photoshop does: the colours must come back, not their negative
    assert np.abs(rt.read(thing).astype(int) - _face(8)).mean() < 6


def _no_face(rt, thing, result):
    assert result.faces == [] and result.image.shape == (180, 240, 3)


def _crowd(rt, thing):
    """Restore the crowd photo with 11 detected faces and max_batch 4; returns (result, inference batch sizes)."""
    runtime = vqfr.Runtime(rt.engine, detector=_ManyFaces(11), max_batch=4)
    calls, infer = [], runtime.backend.infer
    runtime.backend.infer = lambda x, f: calls.append(x.shape[0]) or infer(x, f)
    return runtime.restore_faces(thing), calls


def _many_faces(rt, thing, out):
    result, calls = out
    assert len(result.faces) == 11 and all(f.restored.shape == (S, S, 3) for f in result.faces)
    assert calls == [4, 4, 3] and result.image.shape == (72, 96, 3)
    for face in result.faces:  # each restored face is pasted back where its crop came from
        x0, y0 = face.box[:2].astype(int) + 6
        assert not np.array_equal(result.image[y0:y0 + 12, x0:x0 + 12], rt.read(thing)[y0:y0 + 12, x0:x0 + 12])


def _file(name: str, data: Callable[[], bytes]) -> Callable[[Path, Path], Path]:
    def make(tmp: Path, _weights: Path) -> Path:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data())
        return tmp / name
    return make


def _array(arr: Callable[[], Any]) -> Callable[[Path, Path], Any]:
    return lambda tmp, weights: arr()


def _runtime(rt, thing):
    return vqfr.Runtime(thing)


def _two_inputs(tmp: Path) -> Path:
    """restored_faces/b.png and restored_faces/b_00.png: with -o at their grandparent, b.png's restored face would
    be written over b_00.png."""
    _file("restored_faces/b_00.png", lambda: _png(_face(2)))(tmp, tmp)
    return _file("restored_faces/b.png", lambda: _png(_face(3)))(tmp, tmp)


def _weights_args(thing, weights):
    return ["--weights", str(thing)]


def _engine_args(thing, weights):
    return ["--engine", str(thing)]


_TRUNC = {"truncated.png": lambda: _png(_face(1))[:-40], "truncated.jpg": lambda: _jpeg(_face(2))[:150]}
_R = InputError

CASES = [
    # image files: refused with a reason, the run goes on
    Case("truncated PNG", _R, "is a truncated PNG file", "fail", _file("truncated.png", _TRUNC["truncated.png"]),
         _aligned),
    Case("truncated JPEG", _R, "is a truncated JPEG file", "fail", _file("truncated.jpg", _TRUNC["truncated.jpg"]),
         _aligned),
    Case("zero-byte file", _R, "is empty (0 bytes)", "fail", _file("zero.png", lambda: b""), _aligned),
    Case("text file named .jpg", _R, "is not an image: it starts with text", "fail",
         _file("notes.jpg", lambda: b"shopping list: eggs, milk\n"), _aligned),
    Case("PNG header claims 30000x30000", _R, "its header says 30000x30000 = 900,000,000 pixels, over the limit",
         "fail", _file("huge.png", huge_png_header), _aligned),
    Case("JPEG header claims 30000x30000", _R, "its header says 30000x30000", "fail",
         _file("huge.jpg", _huge_jpeg_header), _aligned),
    Case("float TIFF holding NaN", _R, "float image contains NaN or inf", "fail",
         _file("nan.tif", lambda: cv2.imencode(".tiff", np.full((S, S, 3), np.nan, np.float32))[1].tobytes()),
         _aligned),
    Case("non-square input with --aligned", _R, "is 16x13, not square", "fail",
         _file("wide.png", lambda: _png(_face(3)[:13])), _aligned),
    # valid odd formats: converted and restored
    Case("16-bit PNG", None, "", "restored", _file("deep16.png", lambda: _png(_face(4).astype(np.uint16) * 257)),
         _aligned, check=_converted_like_cv2_imread),
    Case("greyscale PNG", None, "", "restored", _file("grey.png", lambda: _png(_face(5)[:, :, 0])), _aligned,
         check=_converted_like_cv2_imread),
    Case("RGBA PNG", None, "", "restored", _file("rgba.png", lambda: _png(np.dstack([_face(6), _face(7)[:, :, :1]]))),
         _aligned, check=_converted_like_cv2_imread),
    Case("CMYK JPEG", None, "", "restored", _file("cmyk.jpg", lambda: _cmyk_jpeg(_face(8))), _aligned,
         check=_cmyk_colours),
    Case("1x1 image", None, "", "restored", _file("dot.png", lambda: _png(np.full((1, 1, 3), 90, np.uint8))),
         _aligned, check=_converted_like_cv2_imread),
    # photos
    Case("photo with no face", None, "", "no-face",
         _file("landscape.png", lambda: _png(np.tile(np.linspace(0, 255, 120, dtype=np.uint8)[None, :, None],
                                                     (90, 1, 3)))),
         lambda rt, thing: rt.restore_faces(thing, upscale=2), check=_no_face),
    Case("photo with many faces", None, "", "many-faces",
         _file("crowd.png", lambda: _png(np.full((72, 96, 3), 128, np.uint8))), _crowd, check=_many_faces),
    # arrays (API only)
    Case("float array with NaN", _R, "float image contains NaN or inf", "array",
         _array(lambda: np.full((S, S, 3), np.nan, np.float32)), _aligned),
    Case("float array with inf", _R, "float image contains NaN or inf", "array",
         _array(lambda: np.where(np.eye(S)[:, :, None] > 0, np.inf, 0.5).repeat(3, 2)), _aligned),
    Case("float array outside [0, 1]", _R, "expected [0, 1]", "array", _array(lambda: np.full((S, S, 3), 255.0)),
         _aligned),
    Case("array of the wrong dtype (int64)", _R, "unsupported image dtype int64", "array",
         _array(lambda: np.zeros((S, S, 3), np.int64)), _aligned),
    Case("array of the wrong shape (H, W, 5)", _R, "image array has shape (16, 16, 5)", "array",
         _array(lambda: np.zeros((S, S, 5), np.uint8)), _aligned),
    Case("empty array", _R, "image array has shape (0, 16, 3)", "array", _array(lambda: np.zeros((0, S, 3), np.uint8)),
         _aligned),
    Case("not an image array (a list of objects)", _R, "expected an image array", "array",
         _array(lambda: [[object()]]), _aligned),
    # engines
    Case("corrupt .onnx", EngineError, "is not a loadable ONNX model", "setup",
         lambda tmp, w: _engine(tmp, "corrupt.onnx", b"\x08\x07" + bytes(range(256)) * 8), _runtime, _engine_args),
    Case(".onnx changed after export", EngineError, "has changed since export (its sha256 differs", "setup",
         lambda tmp, w: _engine(tmp, "changed.onnx", bytes(2048), lambda d: d[:1000] + b"\x01" + d[1001:]),
         _runtime, _engine_args),
    Case("truncated .engine", EngineError,
         "is shorter than exported (truncated or replaced): 1,000 bytes, but 4,096 were written", "setup",
         lambda tmp, w: _engine(tmp, "cut.engine", bytes(4096), lambda d: d[:1000], tensorrt="10.8.0.43",
                                compute_capability="9.0"), _runtime, _engine_args),
    Case(".engine without its sidecar", EngineError, "has no readable sidecar nosidecar.engine.json", "setup",
         _file("nosidecar.engine", lambda: bytes(64)), _runtime, _engine_args),
    Case(".engine on a machine without TensorRT", BackendUnavailable, "tensorrt is not installed", "setup",
         lambda tmp, w: _engine(tmp, "here.engine", bytes(64), tensorrt="10.8.0.43", compute_capability="9.0"),
         _runtime, _engine_args),
    Case("engine built with another TensorRT", EngineError, "engine built with TensorRT 10.0.1.6, this is TensorRT "
         "10.8.0.43; rebuild it here", "setup",
         lambda tmp, w: _engine(tmp, "old.engine", bytes(64), tensorrt="10.0.1.6", compute_capability="9.0",
                                gpu="NVIDIA H100 80GB HBM3"),
         _runtime, _engine_args, fake_tensorrt=True),
    Case("engine built for another GPU", EngineError, "engine built for compute capability 8.0 (NVIDIA A100-SXM4-80GB),"
         " this GPU is 9.0", "setup",
         lambda tmp, w: _engine(tmp, "a100.engine", bytes(64), tensorrt="10.8.0.43", compute_capability="8.0",
                                gpu="NVIDIA A100-SXM4-80GB"),
         _runtime, _engine_args, fake_tensorrt=True),
    Case("AOTInductor package compiled for another device", EngineError, "aoti[cpu]: the package was compiled for "
         "cuda", "setup", lambda tmp, w: _engine(tmp, "gpu.pt2", bytes(64), torch=torch.__version__,
                                                   compute_capability="9.0", device="cuda"), _runtime, _engine_args),
    # checkpoints
    Case("checkpoint of the other VQFR version", CheckpointError, "does not match VQFRv2 (the file looks like VQFRv1)",
         "setup", lambda tmp, w: _other_version(tmp),
         lambda rt, thing: vqfr.Runtime(thing, config=copy.deepcopy(MICRO_V2)),
         lambda thing, w: ["--weights", str(thing), "--config", str(_micro_yml(thing.parent))]),
    Case("checkpoint with missing keys", CheckpointError, "3 missing keys", "setup",
         lambda tmp, w: _missing_keys(tmp, w), _runtime, _weights_args),
    Case("pickle that would run code", CheckpointError, "refused: its pickle calls builtins.eval", "setup",
         lambda tmp, w: _evil_pickle(tmp), _runtime, _weights_args),
    Case("truncated checkpoint", CheckpointError, "is not a readable safetensors file", "setup",
         lambda tmp, w: _file("cut.safetensors", lambda: w.read_bytes()[:5000])(tmp, w), _runtime, _weights_args),
    Case("detector weights that would run code", ConfigError, "cannot read detector weights: refused: its pickle "
         "calls builtins.eval", "setup", lambda tmp, w: _evil_pickle(tmp),
         lambda rt, thing: vqfr.Runtime(rt.engine, detector=thing).detector,
         lambda thing, w: ["--weights", str(w), "--detector", str(thing)], whole_photo=True),
    Case("face-parsing file that is not TorchScript", ConfigError, "is not a TorchScript file", "setup",
         _file("parser.pt", lambda: b"PK\x03\x04 not really a zip"),
         lambda rt, thing: vqfr.Runtime(rt.engine, parser=thing).parser,
         lambda thing, w: ["--weights", str(w), "--parser", str(thing)], whole_photo=True),
    # outputs
    Case("unwritable output folder", OutputError, "cannot be written", "setup",
         lambda tmp, w: Path("/proc/vqfr-no-such-folder/out.png"),
         lambda rt, thing: save_image(thing, _face(0)),
         lambda thing, w: ["--weights", str(w), "-o", str(thing.parent)],
         cli_fragment="cannot create the output folder"),
    Case("output path equal to an input path", OutputError, "an output would overwrite its own input", "overwrite",
         lambda tmp, w: _file("restored_imgs/photo.png", lambda: _png(_face(1)))(tmp, w), None,
         lambda thing, w: ["-i", str(thing), "-s", "1"]),
    Case("output path equal to another input", OutputError, "an output would overwrite another input of this run",
         "overwrite", lambda tmp, w: _two_inputs(tmp), None,
         lambda thing, w: ["-i", str(thing.parent), "--aligned"]),
]
CASE_IDS = [c.id for c in CASES]
BY_ID = {c.id: c for c in CASES}


def _micro_yml(folder: Path) -> Path:
    import yaml

    path = folder / "micro_v2.yml"
    path.write_text(yaml.safe_dump({"network_sr": copy.deepcopy(MICRO_V2)}))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "micro_v2.safetensors"
    return vqfr.save_safetensors(seeded_model(MICRO_V2, seed=5), path)


@pytest.fixture(scope="module")
def rt(weights):
    with vqfr.Runtime(weights, device="cpu") as runtime:
        yield runtime


# ------------------------------------------------------------------------------------------------- API
def _prepare(case: Case, tmp_path: Path, weights: Path, monkeypatch) -> Any:
    monkeypatch.setenv("VQFR_PWNED", str(tmp_path / "pwned"))
    if case.fake_tensorrt:
        _fake_tensorrt(monkeypatch)
    elif case.id == ".engine on a machine without TensorRT" and vqfr.backends.base.missing_package("tensorrt", "trt") \
            is None:
        pytest.skip("TensorRT is installed here")
    return case.make(tmp_path, weights)


@pytest.mark.parametrize("case", [c for c in CASES if c.api], ids=[c.id for c in CASES if c.api])
def test_api(case: Case, rt, weights, tmp_path, monkeypatch):
    thing = _prepare(case, tmp_path, weights, monkeypatch)
    before = _hashes(tmp_path)
    if case.error is None:
        case.check(rt, thing, case.api(rt, thing))
    else:
        with pytest.raises(case.error) as info:
            case.api(rt, thing)
        message = str(info.value)
        assert case.fragment in message, message
        assert type(info.value) is case.error
        assert "Fix: " in message and len(message.split("Fix: ")[1]) > 10, f"no fix in: {message}"
        if isinstance(thing, Path):
            assert str(thing) in message or info.value.path == thing, f"file not named: {message}"
    assert not (tmp_path / "pwned").exists(), "the pickle ran code"
    assert _hashes(tmp_path) == before, "inputs must never change"


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_pixel_limit_is_configurable(rt, weights, tmp_path):
    path = tmp_path / "face.png"
    path.write_bytes(_png(_face(9)))
    with pytest.raises(InputError, match=r"16x16 = 256 pixels, over the limit of 255.*--max-pixels"):
        vqfr.imaging.load_image(path, max_pixels=255)
    assert vqfr.imaging.load_image(path, max_pixels=256).shape == (S, S, 3)
    small = vqfr.Runtime(weights, max_pixels=255)
    with pytest.raises(InputError, match="over the limit of 255"):
        small.restore(_face(9), aligned=True)
    with pytest.raises(InputError, match=r"upscaled 2x it would be 32x32 = 1,024 pixels, over the limit of 1,000"):
        vqfr.Runtime(weights, max_pixels=1000).restore(_face(9), upscale=2)
    assert main(["-i", str(path), "-o", str(tmp_path / "o"), "--weights", str(weights), "--aligned", "-q",
                 "--max-pixels", "255"]) == EXIT_SOME_FAILED


def test_opencv_own_limit_is_an_input_error(tmp_path):
    """With our limit raised past OpenCV's (2^30 pixels), OpenCV's check raises cv2.error: still an InputError."""
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png_header(40000, 40000))
    with pytest.raises(InputError, match="huge.png: cannot be decoded: it is larger than OpenCV's own limit"):
        vqfr.imaging.load_image(path, max_pixels=40000 * 40000)


def test_exif_orientation_is_applied_like_cv2_imread(tmp_path):
    from PIL import Image

    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(img).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    loaded = vqfr.imaging.load_image(tmp_path / "phone.jpg")
    assert loaded.shape == (40, 20, 3)
    assert np.abs(loaded.astype(int) - cv2.imread(str(tmp_path / "phone.jpg")).astype(int)).max() <= 1


def test_nan_output_is_an_engine_error(weights):
    class Broken(torch.nn.Module):
        options = {"type": "VQFRv2", **{k: v for k, v in MICRO_V2.items() if k != "type"}}

        def forward(self, x, fidelity=0.0):
            return x * float("nan")

    with pytest.raises(EngineError, match="the model returned NaN or inf"):
        vqfr.Runtime(Broken()).restore(_face(1), aligned=True)


def test_infer_refuses_bad_tensors(rt):
    with pytest.raises(InputError, match="float tensor"):
        rt.infer(torch.zeros(1, 3, S, S, dtype=torch.int64))
    with pytest.raises(InputError, match="NaN or inf"):
        rt.infer(torch.full((1, 3, S, S), float("nan")))
    with pytest.raises(InputError, match=r"infer takes \[B, 3, 16, 16\]"):
        rt.infer(np.zeros((1, 3, S, S + 1), np.float32))
    with pytest.raises(ConfigError, match="fidelity"):
        rt.infer(torch.zeros(1, 3, S, S), fidelity="high")


def test_engine_compatibility_is_listed_by_available(tmp_path, monkeypatch):
    _fake_tensorrt(monkeypatch)
    engine = _engine(tmp_path, "old.engine", bytes(64), tensorrt="10.0.1.6", compute_capability="9.0")
    (row,) = vqfr.Runtime.available(engine)
    assert not row.usable and "engine built with TensorRT 10.0.1.6, this is TensorRT 10.8.0.43" in row.reason


def test_sidecar_tool_records_a_deliberate_change(tmp_path, capsys):
    from vqfr.inspect_engine import main as sidecar_main

    engine = _engine(tmp_path, "m.onnx", bytes(100), lambda d: d + b"more")
    assert sidecar_main([str(engine)]) == 1
    assert "has changed since export" in capsys.readouterr().err
    assert sidecar_main([str(engine), "--update"]) == 0
    assert sidecar_main([str(engine)]) == 0
    assert "ok: the engine matches its sidecar" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, weights):
    """One CLI run (--aligned) over a folder with every file case, good and bad, plus plain good faces."""
    root = tmp_path_factory.mktemp("folder_run")
    inputs = root / "in"
    inputs.mkdir()
    paths = {c.id: c.make(inputs, weights) for c in CASES if c.cli in ("fail", "restored")}
    for i in range(3):
        (inputs / f"good_{i}.png").write_bytes(_png(_face(20 + i)))
    before = _hashes(inputs)
    out = root / "out"
    code, stdout, stderr = _run_cli(["-i", str(inputs), "-o", str(out), "--weights", str(weights), "--aligned",
                                     "--batch", "3", "-q"])
    return types.SimpleNamespace(inputs=inputs, out=out, paths=paths, code=code, stdout=stdout, stderr=stderr,
                                 before=before)


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.mark.parametrize("case", [c for c in CASES if c.cli in ("fail", "restored")],
                         ids=[c.id for c in CASES if c.cli in ("fail", "restored")])
def test_cli_folder(case: Case, folder_run):
    path = folder_run.paths[case.id]
    failed = [line for line in folder_run.stderr.splitlines() if line.startswith("vqfr: FAILED")]
    mine = [line for line in failed if f"{path}:" in line]
    outputs = [folder_run.out / group / f"{path.stem}_00.png" for group in ("restored_faces", "cropped_faces", "cmp")]
    if case.cli == "fail":
        assert len(mine) == 1 and case.fragment in mine[0] and "Fix: " in mine[0], failed
        assert not any(p.exists() for p in outputs)
    else:
        assert mine == []
        images = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in outputs]
        assert [img.shape for img in images] == [(S, S, 3), (S, S, 3), (S, 2 * S, 3)]


def test_cli_folder_summary(folder_run):
    n_fail = sum(c.cli == "fail" for c in CASES)
    n_good = sum(c.cli == "restored" for c in CASES) + 3
    assert folder_run.code == EXIT_SOME_FAILED
    assert f"{n_good} images, {n_good} faces restored, {n_fail} failed" in folder_run.stdout
    assert "Traceback" not in folder_run.stderr
    # one line per failing file and nothing else: no decoder chatter, no warnings
    lines = [line for line in folder_run.stderr.splitlines() if line.strip()]
    assert all(line.startswith("vqfr: ") for line in lines), lines
    assert sum(line.startswith("vqfr: FAILED") for line in lines) == n_fail
    for i in range(3):
        assert (folder_run.out / "restored_faces" / f"good_{i}_00.png").is_file()
    assert _hashes(folder_run.inputs) == folder_run.before, "inputs must never change"
    assert [p.name for p in folder_run.out.rglob(".*")] == [], "no temporary files left"


@pytest.mark.parametrize("case", [c for c in CASES if c.cli == "setup" and c.cli_args],
                         ids=[c.id for c in CASES if c.cli == "setup" and c.cli_args])
def test_cli_setup_error(case: Case, weights, tmp_path, monkeypatch):
    thing = _prepare(case, tmp_path, weights, monkeypatch)
    face = tmp_path / "face.png"
    face.write_bytes(_png(_face(1)))
    argv = ["-i", str(face), "-o", str(tmp_path / "out"), "-q", *case.cli_args(thing, weights)]
    argv += [] if case.whole_photo else ["--aligned"]
    code, stdout, stderr = _run_cli(argv)
    assert code == EXIT_ERROR
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vqfr: error: "), stderr
    assert (case.cli_fragment or case.fragment) in lines[0] and "Fix: " in lines[0], stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "pwned").exists()


def test_cli_debug_shows_the_traceback(folder_run, weights, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    code, _, stderr = _run_cli(["-i", str(bad), "-o", str(tmp_path / "o"), "--weights", str(weights), "--aligned",
                                "-q", "--debug"])
    assert code == EXIT_SOME_FAILED and "Traceback" in stderr and "InputError" in stderr


def test_cli_version_mismatch_is_a_config_error(weights, tmp_path):
    face = tmp_path / "face.png"
    face.write_bytes(_png(_face(1)))
    code, _, stderr = _run_cli(["-i", str(face), "-o", str(tmp_path / "o"), "--weights", str(weights), "-v", "1",
                                "--aligned", "-q"])
    assert code == EXIT_ERROR and "-v 1 was asked but" in stderr and "is a VQFRv2 model. Fix: drop -v" in stderr


@pytest.mark.parametrize("case", [c for c in CASES if c.cli == "overwrite"],
                         ids=[c.id for c in CASES if c.cli == "overwrite"])
def test_cli_overwrite(case: Case, weights, tmp_path):
    """-o is the inputs' grandparent, so an output folder is the input folder."""
    thing = case.make(tmp_path, weights)
    before = _hashes(thing.parent)
    code, _, stderr = _run_cli(["-o", str(tmp_path), "--weights", str(weights), "-q", *case.cli_args(thing, weights)])
    assert code == EXIT_SOME_FAILED, stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("vqfr: FAILED")]
    assert case.fragment in line and "Fix: " in line, stderr
    after = _hashes(thing.parent)
    assert {k: after[k] for k in before} == before, "inputs must never change"


def test_cli_unwritable_existing_folder(weights, tmp_path):
    import os

    face = tmp_path / "face.png"
    face.write_bytes(_png(_face(1)))
    if os.geteuid() == 0:  # permissions do not bind root; /proc exists but takes no folders, even from root
        code, _, stderr = _run_cli(["-i", str(face), "-o", "/proc", "--weights", str(weights), "--aligned", "-q"])
        assert code == EXIT_ERROR and "/proc/restored_faces: cannot create the output folder" in stderr
        return
    out = tmp_path / "ro"
    for group in ("restored_faces", "cropped_faces", "cmp"):
        (out / group).mkdir(parents=True)
        (out / group).chmod(0o555)
    code, _, stderr = _run_cli(["-i", str(face), "-o", str(out), "--weights", str(weights), "--aligned", "-q"])
    assert code == EXIT_ERROR and "cannot write into the output folder" in stderr


# ------------------------------------------------------------------------------------------------- photos
def test_photo_without_a_face(weights, tmp_path):
    photo = np.tile(np.linspace(0, 255, 120, dtype=np.uint8)[None, :, None], (90, 1, 3))
    result = vqfr.Runtime(weights).restore_faces(photo, upscale=2)
    assert result.faces == [] and result.image.shape == (180, 240, 3)
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "landscape.png"), photo)
    cv2.imwrite(str(tmp_path / "in" / "dot.png"), np.full((1, 1, 3), 7, np.uint8))
    code, stdout, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--weights", str(weights),
                                     "-q", "-s", "2"])
    assert code == EXIT_OK
    assert "2 images, 0 faces restored, 0 failed, 2 without faces" in stdout
    assert stderr.count("vqfr: no face found in") == 2
    assert cv2.imread(str(tmp_path / "o" / "restored_imgs" / "landscape.png")).shape == (180, 240, 3)
    assert cv2.imread(str(tmp_path / "o" / "restored_imgs" / "dot.png")).shape == (2, 2, 3)


@needs_faces
@pytest.mark.shared
def test_group_photo_through_the_cli(weights, tmp_path):
    faces = [cv2.imread(str(p)) for p in sorted((FACES / "aligned").glob("*.png"))][:5]
    canvas = np.full((200, 640, 3), 120, np.uint8)
    for i, face in enumerate(faces):
        canvas[40:160, 10 + 125 * i:130 + 125 * i] = cv2.resize(face, (120, 120), interpolation=cv2.INTER_AREA)
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "group.png"), canvas)
    code, stdout, _ = _run_cli(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--weights", str(weights),
                                "-q", "-s", "1", "--batch", "2"])
    assert code == EXIT_OK and "1 images, 5 faces restored, 0 failed" in stdout
    assert sorted(p.name for p in (tmp_path / "o" / "restored_faces").iterdir()) == [
        f"group_{i:02d}.png" for i in range(5)]


# ------------------------------------------------------------------------------------------------- docs
def test_docs_table_matches_the_cases():
    text = (ROOT / "docs" / "RELIABILITY.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in BY_ID:
            rows[cells[0]] = cells
    assert sorted(rows) == sorted(CASE_IDS), set(CASE_IDS) ^ set(rows)
    for case_id, (_, error, fragment, cli) in rows.items():
        case = BY_ID[case_id]
        assert error.strip("`") == (case.error.__name__ if case.error else "none: restored"), case_id
        assert fragment.strip("`") == case.fragment or (not case.fragment and fragment == "-"), case_id
        assert cli.startswith(_CLI_TEXT[case.cli]), (case_id, cli)


_CLI_TEXT = {"fail": "one FAILED line, run goes on, exit 3", "restored": "converted and restored",
             "setup": "one error line, exit 1", "array": "API only", "no-face": "a note line, the photo upscaled",
             "many-faces": "every face restored", "overwrite": "one FAILED line, input untouched, exit 3"}


def test_soak_generators_cover_the_file_cases():
    # the soak's bad files are the same kinds as the table's, so the 1,000-image run exercises them too
    assert {"truncated_png", "truncated_jpeg", "empty", "text_as_jpg", "huge_header", "not_square",
            "nan_tiff"} == set(BAD_KINDS)
