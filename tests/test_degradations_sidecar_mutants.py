"""What mutation testing of ``training/degradations.py``, ``vqfr/sidecar.py``, ``vqfr/atomic.py`` and
``export/metadata.py`` found unchecked: the whole degradation of a non-square image step by step against the official
recipe written out here (the sample's draws in order, the low-resolution size ``(int(w // s), int(h // s))`` with the
width first, the noise of sigma / 255 clipped to [0, 1] before the resize back, the JPEG quality truncated to an
integer and the image rounded, not truncated, to 8 bits for the encoder, the resize back to (w, h)); a downscale below
one pixel kept at one pixel; every refusal of a bad parameter set (a negative kernel size, an unknown kernel kind,
probabilities that do not match the kinds or are negative, a range of the wrong length or with low above high, a zero
blur sigma or downscale factor, negative noise, JPEG qualities outside [0, 100]) and, from a config, an unknown preset
or a value of the wrong type as a ConfigError; the v1 and v2 presets against the official table; a sidecar without
``options`` refused, one without ``built_with`` or ``extra`` read as empty, a fixed input of size 0 refused; an engine
changed beyond its first MiB refused, and a longer engine reported with both sizes; the temporary file's name (hidden,
``.partial``, the final suffix, in the output's folder), a name already taken by another writer left alone and another
name tried, an OSError of an ``atomic_write_with`` writer reported as an OutputError with its errno, the old file kept;
and the sidecar built by ``engine_meta`` keeping the model's whole options and the exporter's ``built_with`` entries.
Expected values are written out in each test (the official steps done with OpenCV and NumPy directly, hand-made
files, hand arithmetic), on tiny inputs, on the CPU."""

from __future__ import annotations

import json
import math
import types

import cv2
import numpy as np
import pytest
import torch

import vqfr.atomic
from export import metadata, source
from training.degradations import PRESETS, DegradationParams, degrade, sample_rng
from vqfr.atomic import atomic_path, atomic_write_bytes, atomic_write_with
from vqfr.errors import ConfigError, EngineError, OutputError
from vqfr.sidecar import EngineMeta, TensorSpec, read_sidecar, sidecar_path, verify_engine_file, write_sidecar


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors; two threads only spin on a busy 2-core machine


# ------------------------------------------------------------------------------------------------- degradations
def _photo(h: int, w: int) -> np.ndarray:
    """Random 8-bit colours with a black and a white band, so that the noise is clipped at both ends."""
    img = np.random.default_rng(11).integers(0, 256, (h, w, 3)).astype(np.float32) / 255.0
    img[:, :5] = 0.0
    img[:, -5:] = 1.0
    return img


def _official(img: np.ndarray, seed: int, epoch: int, index: int, p: DegradationParams) -> tuple[np.ndarray, tuple]:
    """OFFICIAL_VQFR.md section 8 with a 1x1 kernel (the blur is pinned elsewhere), drawing from the sample's generator
    in the documented order: kind, sigma_x, (sigma_y, theta), scale, noise sigma, noise, JPEG quality."""
    rng = np.random.default_rng([seed, epoch, index])
    kind = p.kernel_list[int(rng.choice(len(p.kernel_list), p=np.asarray(p.kernel_prob)))]
    rng.uniform(*p.blur_sigma)
    if kind == "aniso":
        rng.uniform(*p.blur_sigma)
        rng.uniform(-math.pi, math.pi)
    h, w = img.shape[:2]
    s = rng.uniform(*p.downsample_range)
    low = (int(w // s), int(h // s))  # cv2 sizes are (width, height)
    out = cv2.resize(img, low, interpolation=cv2.INTER_LINEAR)
    sigma = rng.uniform(*p.noise_range)
    out = np.clip(out + rng.standard_normal(out.shape, dtype=np.float32) * np.float32(sigma / 255.0), 0.0, 1.0)
    q = None
    if p.jpeg_range is not None:
        q = int(rng.uniform(*p.jpeg_range))  # OpenCV >= 5 takes integer qualities only
        u8 = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
        out = cv2.imdecode(cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, q])[1], cv2.IMREAD_COLOR)
        out = out.astype(np.float32) / 255.0
    out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.float32) / 255.0, (low, q)


@pytest.mark.parametrize("jpeg_range", [(40.0, 80.0), None])
def test_a_non_square_image_is_degraded_step_by_step_as_the_official_recipe(jpeg_range):
    img = _photo(20, 36)
    params = DegradationParams(blur_kernel_size=1, blur_sigma=(1.0, 3.0), downsample_range=(2.2, 3.7),
                               noise_range=(5.0, 20.0), jpeg_range=jpeg_range)
    for index in range(6):
        out, info = degrade(img, sample_rng(4, 1, index), params)
        expected, (low, q) = _official(img, 4, 1, index, params)
        assert info["low_size"] == low and low[0] > low[1]  # wider than high
        assert info.get("jpeg_quality") == q
        assert out.shape == (20, 36, 3)
        np.testing.assert_array_equal(out, expected)


def test_the_jpeg_quality_is_truncated_and_the_encoder_gets_rounded_8bit_values():
    img = np.full((16, 16, 3), 100.6 / 255.0, np.float32)  # rounds to 101, truncates to 100
    params = DegradationParams(blur_kernel_size=1, kernel_list=("iso",), kernel_prob=(1.0,),
                               downsample_range=(1.0, 1.0), noise_range=None, jpeg_range=(95.8, 95.8))
    out, info = degrade(img, sample_rng(0, 0, 0), params)
    assert info["jpeg_quality"] == 95
    u8 = np.full((16, 16, 3), 101, np.uint8)
    expected = cv2.imdecode(cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, 95])[1], cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(out * 255.0, expected.astype(np.float32))
    assert np.all(expected == 101)  # a flat grey survives JPEG: 100 would mean the encoder saw truncated values


def test_a_downscale_below_one_pixel_keeps_one_pixel():
    img = _photo(16, 12)
    params = DegradationParams(blur_kernel_size=1, kernel_list=("iso",), kernel_prob=(1.0,),
                               downsample_range=(30.0, 30.0), noise_range=None, jpeg_range=None)
    out, info = degrade(img, sample_rng(0, 0, 0), params)
    assert info["low_size"] == (1, 1)  # int(12 // 30) == 0
    assert out.shape == (16, 12, 3) and np.all(out == out[0, 0])  # one pixel resized back: flat


@pytest.mark.parametrize("bad", [
    {"blur_kernel_size": -1},
    {"kernel_list": ("iso", "gauss")},
    {"kernel_list": ("iso",), "kernel_prob": (0.5, 0.5)},
    {"kernel_prob": (1.5, -0.5)},
    {"blur_sigma": (1.0, 2.0, 3.0)},
    {"blur_sigma": (5.0, 1.0)},
    {"downsample_range": (4.0, 2.0)},
    {"blur_sigma": (0.0, 2.0)},
    {"downsample_range": (0.0, 2.0)},
    {"noise_range": (-1.0, 5.0)},
    {"jpeg_range": (-10.0, 50.0)},
    {"jpeg_range": (50.0, 120.0)},
])
def test_a_bad_parameter_set_is_refused(bad):
    with pytest.raises(ValueError):
        DegradationParams(**bad)


def test_an_unknown_preset_or_a_value_of_the_wrong_type_in_a_config_is_a_config_error():
    with pytest.raises(ConfigError, match=r"datasets\.train\.degradation is 'v3'"):
        DegradationParams.from_options({"degradation": "v3"})
    with pytest.raises(ConfigError, match=r"datasets\.train"):
        DegradationParams.from_options({"blur_kernel_size": "41"})  # a quoted number in the yml


def test_the_presets_are_the_official_table():
    for name, (blur, down, noise, jpeg) in {"v1": ((0.1, 10.0), (0.8, 8.0), (0.0, 20.0), (60.0, 100.0)),
                                            "v2": ((1.0, 15.0), (1.0, 30.0), (0.0, 20.0), (30.0, 90.0))}.items():
        p = PRESETS[name]
        assert (p.blur_sigma, p.downsample_range, p.noise_range, p.jpeg_range) == (blur, down, noise, jpeg), name
        assert (p.blur_kernel_size, p.kernel_list, p.kernel_prob) == (41, ("iso", "aniso"), (0.5, 0.5)), name


# ----------------------------------------------------------------------------------------------------- sidecar
def _meta(**changes) -> EngineMeta:
    base = EngineMeta(arch="VQFRv2", options={"type": "VQFRv2"}, face_size=64, precision="fp32",
                      inputs=(TensorSpec("input", (-1, 3, 64, 64)), TensorSpec("fidelity", (-1,))),
                      outputs=(TensorSpec("output", (-1, 3, 64, 64)),))
    return EngineMeta(**{**base.__dict__, **changes})


def test_a_sidecar_without_options_is_refused_and_one_without_built_with_or_extra_reads_as_empty(tmp_path):
    engine = tmp_path / "m.onnx"
    d = _meta(built_with={"torch": "2.13.0"}, extra={"x": 1}).to_dict()
    del d["built_with"], d["extra"]
    sidecar_path(engine).write_text(json.dumps(d))
    meta = read_sidecar(engine)
    assert meta.built_with == {} and meta.extra == {}
    del d["options"]
    sidecar_path(engine).write_text(json.dumps(d))
    with pytest.raises(EngineError, match="options"):
        read_sidecar(engine)


def test_a_fixed_input_of_size_zero_is_refused(tmp_path):
    engine = tmp_path / "m.onnx"
    sidecar_path(engine).write_text(json.dumps(_meta(inputs=(TensorSpec("input", (1, 3, 0, 0)),)).to_dict()))
    with pytest.raises(EngineError, match="does not fit its input shape"):
        read_sidecar(engine)


def test_an_engine_changed_beyond_its_first_mib_is_refused(tmp_path):
    engine = tmp_path / "m.onnx"
    data = bytes((1 << 20) + 100)
    engine.write_bytes(data)
    write_sidecar(engine, _meta())
    engine.write_bytes(data[:-1] + b"\x01")  # same size, last byte changed
    with pytest.raises(EngineError, match="sha256 differs"):
        verify_engine_file(engine, read_sidecar(engine))


def test_a_longer_engine_is_reported_with_both_sizes(tmp_path):
    engine = tmp_path / "m.onnx"
    engine.write_bytes(b"x" * 1000)
    write_sidecar(engine, _meta())
    engine.write_bytes(b"x" * 1500)
    with pytest.raises(EngineError, match="has changed since export: 1,500 bytes, the sidecar says 1,000"):
        verify_engine_file(engine, read_sidecar(engine))


# ------------------------------------------------------------------------------------------------------ atomic
def test_the_temporary_file_is_hidden_marked_partial_and_keeps_the_suffix_in_the_output_folder(tmp_path):
    path = tmp_path / "face.png"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".face.png.") and ".partial" in tmp.name and tmp.suffix == ".png"
        tmp.write_bytes(b"png")
    assert path.read_bytes() == b"png"


def test_a_temporary_name_taken_by_another_writer_is_left_alone(tmp_path, monkeypatch):
    other = tmp_path / ".out.bin.deadbeef.partial.bin"
    other.write_bytes(b"another writer's data")
    tokens = iter(["deadbeef", "cafef00d"])
    monkeypatch.setattr(vqfr.atomic.secrets, "token_hex", lambda n: next(tokens))
    atomic_write_bytes(tmp_path / "out.bin", b"mine")
    assert (tmp_path / "out.bin").read_bytes() == b"mine"
    assert other.read_bytes() == b"another writer's data"
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "out.bin"]


def test_an_oserror_of_a_writer_is_an_output_error_with_its_errno_and_the_old_file_stays(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"old")

    def writer(tmp):
        tmp.write_bytes(b"half")
        raise PermissionError(13, "Permission denied")

    with pytest.raises(OutputError, match="Permission denied") as info:
        atomic_write_with(path, writer)
    assert info.value.errno == 13
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.pth"]


# ---------------------------------------------------------------------------------------------------- metadata
def test_engine_meta_keeps_the_models_whole_options_and_the_exporters_built_with():
    options = {"type": "VQFRv2", "base_channels": 32, "channel_multipliers": [1, 2]}
    model = types.SimpleNamespace(options=options)  # engine_meta reads only the options
    meta = metadata.engine_meta(model, source.ExportSpec(None, 64, 64, False, True), precision="fp32",
                                weights=None, random_weights=0, built_with={"device": "cpu", "tensorrt": "10.8.0.43"})
    assert meta.options == options and meta.arch == "VQFRv2"
    assert meta.built_with == {"torch": str(torch.__version__), "device": "cpu", "tensorrt": "10.8.0.43"}
