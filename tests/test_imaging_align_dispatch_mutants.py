"""Mutation round 22: image I/O and pre-processing, FFHQ alignment, the kernel dispatch switch.

Each test here failed with a bug planted in ``vqfr/imaging.py``, ``vqfr/faces/align.py`` or ``kernels/dispatch.py``
that the rest of the suite let through, and passes on the real code. They pin:

- imaging: ``to_tensor`` returns a contiguous tensor on the device asked for; ``to_images`` post-processes fp16 and bf16
  outputs in float32; the pixel limit is inclusive (from the header and after decoding); the file-size guard allows 64
  MiB of metadata and refuses more from the size alone; ``upscale_lanczos`` truncates its size (at least one pixel) and
  resizes with Lanczos-4; 16-bit levels are scaled by 255/65535 (not 65536); signed integer and bool images are refused;
  what numpy cannot make an array of is one InputError; each suffix is written in its own format; a JPEG's Huffman
  tables ahead of its frame header are not read as the frame size;
- alignment: the template scales with any face size (above 512 too); crop i is the warp of face i's affine; the affine
  is float64; a non-finite LMEDS answer takes the least-squares fallback;
- dispatch: ``TRITON_INTERPRET`` and version parsing; the reasons Triton is not chosen (traced, meta, several devices;
  None skipped); ``check_floating`` for every integer and bool dtype; ``check_same_device`` telling ``cuda:0`` from
  ``cuda:1``; ``launchable`` never wrapping an interpreted kernel; the compiled and interpreted copies of a kernel
  module kept apart; a refused forced launch is not counted in LAUNCHES; ``kernels.use`` is per thread and restores the
  mode when its block raises; float32 dots are exact under torch's default precision.

Expected values are written out (numpy, direct OpenCV calls, hand arithmetic), not taken from the code under test.
CPU only: fake and meta tensors stand in for GPUs, Triton's interpreter for the compiler.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from kernels import dispatch
from vqfr.errors import InputError
from vqfr.imaging import as_bgr_uint8, load_image, to_tensor, upscale_lanczos

cv2 = pytest.importorskip("cv2")


def _img(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- imaging
def test_to_tensor_hands_over_a_contiguous_nchw_tensor():
    """Backends pass ``data_ptr()`` or ``.numpy()`` of the input on: a permuted view would be read in NHWC order."""
    for images in (_img(5, 7), np.stack([_img(5, 7, seed) for seed in range(2)])):
        t = to_tensor(images)
        assert t.is_contiguous() and t.stride()[-1] == 1 and t.stride()[1] == 5 * 7


def test_to_tensor_returns_the_tensor_on_the_device_asked_for():
    """``device=`` is honoured without a GPU too (meta: shapes and dtypes only); the GPU test is skipped on CPU CI."""
    t = to_tensor(np.stack([_img(5, 7, seed) for seed in range(2)]), device="meta")
    assert t.device.type == "meta" and t.shape == (2, 3, 5, 7) and t.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_output_is_post_processed_in_float32(dtype):
    """An fp16/bf16 output is converted as the official tensor2img does: ``.float()`` first, then clamp, (x+1)/2,
    *255 and round in float32 (in half precision, *255 is off by up to a level)."""
    from vqfr.imaging import to_images

    out = (torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1).to(dtype)
    x = out.float().numpy()[0]
    want = np.round((np.clip(x, -1, 1) + 1) / 2 * np.float32(255)).astype(np.uint8).transpose(1, 2, 0)[:, :, ::-1]
    assert np.array_equal(to_images(out)[0], want)


@pytest.mark.parametrize("suffix", [".png", ".ppm"], ids=["size from the header", "size after decoding"])
def test_an_image_of_exactly_max_pixels_loads_and_a_limit_one_lower_refuses_it(suffix, tmp_path):
    """The limit is inclusive: 7x3 = 21 pixels load with ``max_pixels=21`` and are refused with 20 (PPM has no
    header the size is read from, so it is checked after decoding)."""
    img = _img(3, 7)
    path = tmp_path / f"x{suffix}"
    path.write_bytes(cv2.imencode(suffix, img)[1].tobytes())
    assert np.array_equal(load_image(path, max_pixels=21), img)
    with pytest.raises(InputError, match="7x3 = 21 pixels, over the limit of 20"):
        load_image(path, max_pixels=20)


def test_the_file_size_guard_allows_64_mib_of_metadata_beyond_8_bytes_a_pixel(tmp_path):
    """A 16x16 PNG carrying 3 MB of metadata (an embedded preview, a depth map) loads under a 256-pixel limit; a
    file over 8 * 256 + 64 MiB bytes is refused from its size alone (a sparse file: nothing is read)."""
    import zlib

    img = _img(16, 16)
    png = cv2.imencode(".png", img)[1].tobytes()
    text = b"Comment\0" + b"x" * (3 << 20)
    chunk = len(text).to_bytes(4, "big") + b"tEXt" + text + (zlib.crc32(b"tEXt" + text) & 0xFFFFFFFF).to_bytes(4, "big")
    iend = png.rindex(b"IEND") - 4
    path = tmp_path / "tagged.png"
    path.write_bytes(png[:iend] + chunk + png[iend:])
    assert np.array_equal(load_image(path, max_pixels=256), img)
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(8 * 256 + (64 << 20) + 1)
    with pytest.raises(InputError, match=f"is {8 * 256 + (64 << 20) + 1:,} bytes, too large for an image of at most "
                                         "256 pixels"):
        load_image(huge, max_pixels=256)


def test_upscale_truncates_the_size_and_resizes_with_lanczos4():
    """3x7 by 2.7: 8.1 x 18.9 pixels give 8 x 18 (int(), as the official demo), resized by OpenCV's Lanczos-4."""
    img = _img(3, 7)
    out = upscale_lanczos(img, 2.7)
    assert out.shape == (8, 18, 3)
    assert np.array_equal(out, cv2.resize(img, (18, 8), interpolation=cv2.INTER_LANCZOS4))


def test_upscale_to_less_than_a_pixel_keeps_one_pixel():
    """A scale that gives 0.3 x 0.7 pixels gives 1 x 1, not an OpenCV error about an empty size."""
    assert upscale_lanczos(_img(3, 7), 0.1).shape == (1, 1, 3)


def test_16_bit_levels_near_half_a_step_round_by_255_over_65535():
    """65407 / 65535 * 255 = 254.50195 rounds to 255 (65536 in the divisor would give 254.498, so 254); 129 gives
    0.50195, so 1; 128 gives 0.498, so 0."""
    arr = np.array([65407, 129, 128, 65535, 0], np.uint16).reshape(1, 5)
    assert as_bgr_uint8(arr)[0, :, 0].tolist() == [255, 1, 0, 255, 0]


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.bool_])
def test_signed_integer_and_bool_images_are_refused(dtype):
    """Only uint8 and uint16 are integer images: int8 pixels (-128..127) were taken for uint8 levels unchanged."""
    with pytest.raises(InputError, match="unsupported image dtype"):
        as_bgr_uint8(np.zeros((2, 2, 3), dtype))


@pytest.mark.parametrize("image", [torch.zeros(2, 2, 3, requires_grad=True), [[0, 1], [2]]],
                         ids=["a tensor that requires grad", "a ragged list"])
def test_arrays_numpy_cannot_make_are_an_input_error_with_the_fix(image):
    """``np.asarray`` raises RuntimeError for a tensor that requires grad and ValueError for a ragged list: each
    becomes one InputError naming the image, not a traceback from numpy or torch."""
    with pytest.raises(InputError, match=r"photo: cannot be read as an image array.*Fix: pass a path"):
        as_bgr_uint8(image, name="photo")
    assert np.array_equal(as_bgr_uint8(torch.zeros(2, 2, 3, dtype=torch.uint8)), np.zeros((2, 2, 3), np.uint8))


@pytest.mark.parametrize("name,fmt", [("a.webp", "WebP"), ("a.bmp", "BMP"), ("a.tif", "TIFF"), ("a.tiff", "TIFF"),
                                      ("a.PNG", "PNG"), ("a.Webp", "WebP")])
def test_every_suffix_is_written_in_its_own_format_losslessly(name, fmt):
    """The suffix picks the format (any case); WebP at OpenCV's default is lossless, as are BMP, TIFF and PNG."""
    from vqfr.imaging import encode_image, sniff_format

    img = _img(5, 7)
    data = encode_image(name, img)
    assert sniff_format(data) == fmt
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), img)


def _segments(data: bytes) -> list[bytes]:
    """A JPEG's marker segments from SOI up to SOS (each with its marker and length), then the rest as one."""
    out, i = [data[:2]], 2
    while data[i + 1] != 0xDA:
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        out.append(data[i:end])
        i = end
    return [*out, data[i:]]


def test_a_jpeg_with_its_huffman_tables_before_the_frame_header_has_the_frame_size():
    """Tables may come in any order before the scan: a DHT segment (0xFFC4) ahead of the SOF0 is not the frame
    header, whose size bytes come later (OpenCV writes DHT after SOF0; other encoders write it first)."""
    img = _img(13, 21)
    parts = _segments(cv2.imencode(".jpg", img)[1].tobytes())
    dht = [p for p in parts if p[:2] == b"\xff\xc4"]
    markers = [p[1] for p in parts[1:-1]]
    assert dht and markers.index(0xC0) < markers.index(0xC4)  # as OpenCV writes it: SOF0, then DHT
    reordered = b"".join([parts[0], *dht, *(p for p in parts[1:] if p[:2] != b"\xff\xc4")])
    from vqfr.imaging import header_size

    assert header_size(reordered) == (21, 13)
    assert np.array_equal(cv2.imdecode(np.frombuffer(reordered, np.uint8), cv2.IMREAD_COLOR).shape, (13, 21, 3))


# ----------------------------------------------------------------------------------------------- alignment
@pytest.mark.parametrize("face_size", [1024, 300, 64])
def test_the_template_scales_with_any_face_size(face_size):
    """The 512 template times face_size / 512, also above 512 and for sizes that are not a power of two; a face
    placed on the 512 template is mapped onto it at that size."""
    from vqfr.faces.align import FFHQ_TEMPLATE_512, estimate_affine, template

    want = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043],
                     [313.08905, 371.15118]]) * face_size / 512
    assert template(face_size).dtype == np.float32
    np.testing.assert_allclose(template(face_size), want, rtol=1e-6)
    affine = estimate_affine(FFHQ_TEMPLATE_512, face_size)
    np.testing.assert_allclose(affine, [[face_size / 512, 0, 0], [0, face_size / 512, 0]], atol=1e-4)


def test_each_crop_is_the_warp_of_its_own_faces_affine():
    """align_faces returns crops and affines in the order of the landmarks: crop i is warped with affine i (a face
    pasted back with another face's affine lands on the wrong face). Expected: OpenCV's LMEDS fit and bilinear warp
    called directly, with the official border colour."""
    from vqfr.faces.align import FFHQ_TEMPLATE_512, align_faces

    photo = _img(120, 160)
    faces = [FFHQ_TEMPLATE_512 * 0.15 + shift for shift in ((10.0, 5.0), (80.0, 40.0), (30.0, 60.0))]
    crops, affines = align_faces(photo, faces, 64)
    dst = FFHQ_TEMPLATE_512 * np.float32(64 / 512)
    for lms, crop, affine in zip(faces, crops, affines, strict=True):
        want, _ = cv2.estimateAffinePartial2D(lms.astype(np.float32), dst, method=cv2.LMEDS)
        np.testing.assert_allclose(affine, want, atol=1e-9)
        assert np.array_equal(crop, cv2.warpAffine(photo, want, (64, 64), flags=cv2.INTER_LINEAR,
                                                   borderMode=cv2.BORDER_CONSTANT, borderValue=(135, 133, 132)))


def test_the_affine_is_float64_as_documented():
    """[2, 3] float64, as ``cv2.warpAffine`` and the paste-back take it (the photo -> crop map of a face at 1000 px)."""
    from vqfr.faces.align import FFHQ_TEMPLATE_512, estimate_affine

    affine = estimate_affine(FFHQ_TEMPLATE_512 * 0.5 + 1000.0, 512)
    assert affine.dtype == np.float64 and affine.shape == (2, 3)
    np.testing.assert_allclose(affine, [[2.0, 0.0, -2000.0], [0.0, 2.0, -2000.0]], atol=1e-3)


def test_a_non_finite_lmeds_answer_takes_the_least_squares_fallback(monkeypatch):
    """OpenCV may return a matrix of NaN rather than None; the crop must still come from a finite fit."""
    from vqfr.faces.align import FFHQ_TEMPLATE_512, estimate_affine

    monkeypatch.setattr(cv2, "estimateAffinePartial2D", lambda *a, **k: (np.full((2, 3), np.nan), None))
    lms = FFHQ_TEMPLATE_512.astype(np.float64) * 0.25 + (40.0, 10.0)  # the template at a quarter, shifted
    affine = estimate_affine(lms, 128)
    np.testing.assert_allclose(affine, [[1.0, 0.0, -40.0], [0.0, 1.0, -10.0]], atol=1e-6)


# ----------------------------------------------------------------------------------------------- kernels.dispatch
@pytest.fixture
def no_switches(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("VQFR_KERNELS", raising=False)
    return monkeypatch


INTERPRET_VALUES = [("1", True), ("true", True), ("TRUE", True), ("on", True), ("On", True), ("yes", True),
                    ("Y", True), ("0", False), ("", False), ("false", False), ("off", False), ("no", False),
                    (" 1", False), ("1 ", False)]


@pytest.mark.parametrize("value,on", INTERPRET_VALUES)
def test_triton_interpret_is_read_as_triton_reads_it(value, on, no_switches):
    """1, true, on, yes and y (any case, no spaces) turn the interpreter on, as Triton 3.6 to 3.9 read the variable
    (checked on each); anything else leaves it off. Before, ``yes`` was off here and on for Triton, and ``" 1"`` the
    other way round."""
    no_switches.setenv("TRITON_INTERPRET", value)
    assert dispatch.interpreting() is on


@pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed (extra 'gpu')")
@pytest.mark.parametrize("value,on", INTERPRET_VALUES)
def test_triton_interpret_agrees_with_the_installed_triton(value, on, no_switches):
    """The installed Triton's own reading of the variable (``triton.knobs``, read on each access) is ours."""
    knobs = pytest.importorskip("triton.knobs")
    no_switches.setenv("TRITON_INTERPRET", value)
    assert knobs.runtime.interpret is dispatch.interpreting() is on


def test_triton_interpret_unset_means_compiled(no_switches):
    assert dispatch.interpreting() is False


@pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed (extra 'gpu')")
def test_absent_tensors_are_skipped_when_choosing(no_switches):
    """An op without a bias (None) is decided by the tensors it has: None is neither a dtype nor a device."""
    no_switches.setenv("TRITON_INTERPRET", "1")
    if dispatch.interpreter_problem():
        pytest.skip(dispatch.interpreter_problem())
    assert dispatch.why_not_triton(torch.ones(2), None, bias=None) is None
    assert dispatch.why_not_triton(torch.ones(2), bias=None, w=torch.ones(2).double()) == \
        "w has dtype torch.float64, not one of float16, bfloat16, float32"


@pytest.mark.parametrize("version,want", [("3.6.0", (3, 6)), ("2.14.1+cu130", (2, 14)), ("2.4.0rc1", (2, 4)),
                                          ("3.10", (3, 10)), ("4", (4,))])
def test_release_is_major_and_minor_as_numbers(version, want):
    """3.10 is newer than 3.9 (numbers, not text); local and pre-release tags are dropped."""
    assert dispatch.release(version) == want


@pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed (extra 'gpu')")
def test_tensors_being_traced_take_the_reference_under_the_interpreter(no_switches):
    """The interpreter runs eagerly only: fake CPU tensors (export, compile) get the reason, not a launch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    no_switches.setenv("TRITON_INTERPRET", "1")
    if dispatch.interpreter_problem():
        pytest.skip(dispatch.interpreter_problem())
    with FakeTensorMode():
        fake = torch.empty(2, 3)
    assert "not under torch.compile/export tracing" in dispatch.why_not_triton(fake)
    assert dispatch.why_not_triton(torch.empty(2, 3)) is None


@pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed (extra 'gpu')")
def test_meta_tensors_and_mixed_devices_are_not_given_to_triton(no_switches):
    """Only CUDA (and CPU under the interpreter) run the kernels: a meta tensor or a CPU/meta mix is named."""
    no_switches.setenv("TRITON_INTERPRET", "1")
    assert dispatch.why_not_triton(torch.empty(2, device="meta")) == \
        "device meta is not supported by the Triton kernels"
    assert dispatch.why_not_triton(torch.empty(2), w=torch.empty(2, device="meta")) == \
        "tensors are on several devices: ['cpu', 'meta']"
    dispatch.LAUNCHES.clear()
    assert not dispatch.use_triton("op", torch.empty(2, device="meta"))
    assert dispatch.LAUNCHES == {"op:reference": 1}


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool])
def test_check_floating_refuses_every_integer_and_bool_dtype(dtype):
    with pytest.raises(TypeError, match=f"op: mask has dtype {dtype}"):
        dispatch.check_floating("op", x=torch.ones(2), bias=None, mask=torch.ones(2, dtype=dtype))
    dispatch.check_floating("op", x=torch.ones(2, dtype=torch.float16), bias=None)  # floats and None pass


def test_check_same_device_tells_one_gpu_from_another():
    """``cuda:1`` beside ``cuda:0`` is another device (fake tensors: no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        x, w = torch.empty(2, device="cuda:0"), torch.empty(2, device="cuda:1")
    with pytest.raises(ValueError, match="w is on cuda:1 but x is on cuda:0"):
        dispatch.check_same_device(x=x, w=w)


def test_launchable_never_wraps_an_interpreted_kernel(no_switches):
    """``wrap_triton`` does not take the interpreter's kernels: under TRITON_INTERPRET the kernel is returned as
    it is even when the ops are triton_ops."""
    kernel = object()
    no_switches.setattr(dispatch, "TRACEABLE_LAUNCHES", True)
    no_switches.setenv("TRITON_INTERPRET", "1")
    assert dispatch.launchable(kernel) is kernel


def test_a_forced_launch_that_cannot_run_is_not_counted(no_switches):
    """LAUNCHES counts what ran: mode triton refusing CPU tensors (no interpreter) raises and counts nothing; auto
    counts the fallback under the name the caller gives it."""
    dispatch.LAUNCHES.clear()
    x = torch.ones(2)
    with dispatch.use("triton"), pytest.raises(RuntimeError, match="CPU tensors need TRITON_INTERPRET=1"):
        dispatch.use_triton("op", x)
    assert not dispatch.LAUNCHES
    assert not dispatch.use_triton("op", x, fallback="grid_sample")
    assert dispatch.LAUNCHES == {"op:grid_sample": 1}


def test_kernels_use_restores_the_mode_when_its_block_raises(no_switches):
    """An exception inside ``with kernels.use(...)`` (a failed restore caught by a server) leaves no forced mode."""
    no_switches.setenv("VQFR_KERNELS", "reference")
    with pytest.raises(KeyError):
        with dispatch.use("triton"):
            with dispatch.use("auto"):
                raise KeyError("boom")
    assert dispatch.active_mode() == "reference"
    no_switches.delenv("VQFR_KERNELS")
    assert dispatch.active_mode() == "auto"


def test_float32_dots_are_exact_unless_tf32_is_allowed():
    """torch's default ("none": no TF32) keeps the kernels' float32 dots exact ("ieee"), like torch's own matmuls;
    only an explicit TF32 setting (either API) gives "tf32"."""
    saved = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.fp32_precision = "none"
        torch.backends.cuda.matmul.fp32_precision = "none"
        assert dispatch.dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dispatch.dot_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert dispatch.dot_precision(torch.float32) == "ieee"
    finally:
        torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


@pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed (extra 'gpu')")
def test_the_compiled_and_interpreted_copies_of_a_kernel_module_are_kept_apart(no_switches):
    """``@triton.jit`` reads TRITON_INTERPRET when it decorates: a module loaded interpreted must not be handed to
    a compiled-mode call (GPU tensors would run in the interpreter), nor the other way round."""
    no_switches.setenv("TRITON_INTERPRET", "1")
    interpreted = dispatch.triton_module("nearest_code_triton")
    no_switches.delenv("TRITON_INTERPRET")
    compiled = dispatch.triton_module("nearest_code_triton")
    assert compiled is not interpreted
    assert (interpreted.__name__, compiled.__name__) == ("kernels.nearest_code_triton__interpreted",
                                                         "kernels.nearest_code_triton")


def test_kernels_use_in_one_thread_is_not_seen_by_another(no_switches):
    """The forced mode is a context variable: a server thread inside ``kernels.use("reference")`` does not switch
    the other threads, and a new thread starts from the environment, not from its parent's block."""
    entered, leave, seen = threading.Event(), threading.Event(), []

    def hold_reference():
        with dispatch.use("reference"):
            entered.set()
            leave.wait(10)

    holder = threading.Thread(target=hold_reference)
    holder.start()
    try:
        assert entered.wait(10)
        assert dispatch.active_mode() == "auto"
    finally:
        leave.set()
        holder.join()
    with dispatch.use("reference"):
        child = threading.Thread(target=lambda: seen.append(dispatch.active_mode()))
        child.start()
        child.join()
    assert seen == ["auto"]
