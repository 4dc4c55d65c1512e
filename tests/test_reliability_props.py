"""Property tests: arbitrary bytes and arrays never end the process with anything but the documented exceptions.

- ``load_image`` on any file content returns a BGR uint8 [H, W, 3] array or raises InputError: random bytes, random
  bytes behind each format's signature, and real PNG/JPEG/BMP/WebP/TIFF files truncated, bit-flipped or spliced.
- ``header_size`` never raises.
- ``as_bgr_uint8``, ``Runtime.read`` and ``to_tensor`` on any array (every dtype, 0 to 5 dimensions, NaN/inf,
  either byte order) return a valid result or raise InputError; ``to_images`` on any float tensor likewise.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import vqfr
from deploy.soak import MICRO_V2
from tests.conftest import seeded_model
from vqfr.errors import InputError
from vqfr.imaging import as_bgr_uint8, header_size, load_image, to_images, to_tensor

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_IMG = cv2.resize(np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8), (12, 9))
SEEDS = {ext: cv2.imencode(ext, _IMG)[1].tobytes() for ext in (".png", ".jpg", ".bmp", ".webp", ".tiff")}
SEEDS[".png16"] = cv2.imencode(".png", _IMG.astype(np.uint16) * 257)[1].tobytes()
SIGNATURES = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"RIFF\0\0\0\0WEBPVP8 ", b"II*\0", b"MM\0*"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("props") / "input.img"


def _check_load(path, data: bytes):
    path.write_bytes(data)
    try:
        img = load_image(path)
    except InputError as exc:
        assert str(path) in str(exc) and "Fix: " in str(exc)
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.flags.c_contiguous
    assert path.read_bytes() == data, "the input file must not change"


@SETTINGS
@given(data=st.binary(max_size=2048))
def test_random_bytes(scratch, data):
    _check_load(scratch, data)


@SETTINGS
@given(sig=st.sampled_from(SIGNATURES), tail=st.binary(max_size=512))
def test_random_bytes_behind_a_signature(scratch, sig, tail):
    _check_load(scratch, sig + tail)
    assert header_size(sig + tail) is None or all(isinstance(v, int) for v in header_size(sig + tail))


@st.composite
def _mutated(draw):
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "splice", "zero", "header"]))
        at = draw(st.integers(0, len(data) - 1))
        if op == "header" and len(data) > 16:  # where sizes live (PNG IHDR, BMP, WebP, TIFF): huge or zero sizes
            at = draw(st.integers(12, min(len(data), 40) - 1))
            data[at:at + 2] = draw(st.sampled_from([b"\xff\xff", b"\x7f\xff", b"\0\0", b"\x40\0"]))
        elif op == "truncate":
            data = data[:at]
        elif op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at:at + draw(st.integers(1, 64))] = b"\0" * len(data[at:at + 64])
        if not data:
            break
    return bytes(data)


@SETTINGS
@given(data=_mutated())
def test_damaged_real_images(scratch, data):
    _check_load(scratch, data)


_DTYPES = [np.dtype(t) for t in ("bool", "int8", "uint8", "int16", "uint16", ">u2", "int32", "uint32", "int64",
                                 "float16", "float32", "float64", ">f4", "complex64")]


@st.composite
def _arrays(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6))
    if draw(st.booleans()) and len(shape) >= 2:  # often image-like
        shape = shape[:2] + (draw(st.sampled_from([1, 2, 3, 4, 5])),)
    elements = None
    if dtype.kind == "f":
        elements = st.floats(width=8 * min(dtype.itemsize, 4) if dtype.itemsize < 8 else 64, allow_nan=True,
                             allow_infinity=True) | st.floats(0, 1, width=16)
    return draw(hnp.arrays(dtype, shape, elements=elements))


@SETTINGS
@given(arr=_arrays())
def test_arbitrary_arrays(arr):
    before = arr.copy()
    try:
        out = as_bgr_uint8(arr, name="arr")
    except InputError as exc:
        assert "Fix: " in str(exc)
    else:
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.shape[:2] == arr.shape[:2]
        assert not np.shares_memory(out, arr)
    np.testing.assert_array_equal(arr, before)
    try:
        t = to_tensor(arr)
    except InputError:
        return
    assert t.dtype == torch.float32 and t.dim() == 4 and float(t.abs().max()) <= 1.0 if t.numel() else True


@pytest.fixture(scope="module")
def rt():
    return vqfr.Runtime(seeded_model(MICRO_V2), max_pixels=64)


@settings(SETTINGS, max_examples=60)
@given(arr=_arrays())
def test_runtime_read_of_arrays(rt, arr):
    try:
        out = rt.read(arr)
    except InputError:
        return
    assert out.dtype == np.uint8 and out.shape[0] * out.shape[1] <= 64


@SETTINGS
@given(t=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=5, max_side=5),
                    elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_to_images_of_arbitrary_tensors(t):
    try:
        out = to_images(torch.from_numpy(t))
    except InputError:
        return
    assert out.dtype == np.uint8 and out.shape[-1] == 3
