"""Behaviours of image I/O, face alignment and paste-back, checkpoint loading and the engine sidecar that the other
test files left unchecked (found by mutation testing): header sizes of every format and byte order, refusals of
arrays and files with the file named, JPEG quality and default format on write, OpenCV's log level under nesting,
paste-back geometry at strong shrinks and downscales, the parser mask and seam of the official formulas, the pickle
scan's report, and the sidecar's validation."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zlib

import cv2
import numpy as np
import pytest
import torch

import vqfr
from tests.conftest import TINY_V2, seeded_model
from vqfr.errors import CheckpointError, ConfigError, EngineError, InputError
from vqfr.imaging import encode_image, header_size, load_image, save_image, sniff_format, to_images, to_tensor

# torch.load notes a hand-made pickle of protocol 4 (the pickle-scan tests write them)
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


def _img(h: int = 13, w: int = 21, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- conversions
def test_to_tensor_refuses_images_that_are_not_three_channel():
    """A BGRA or grey array given straight to the model input would become a 4- or 1-channel tensor (and fail deep
    in the network, or be taken for colour): refused, pointing to as_bgr_uint8."""
    for arr in (np.zeros((8, 8, 4), np.uint8), np.zeros((2, 8, 8, 1), np.uint8)):
        with pytest.raises(InputError, match=r"to_tensor takes BGR uint8.*Fix: convert with vqfr\.imaging\.as_bgr"):
            to_tensor(arr)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_to_images_refuses_nan_and_inf_with_the_fix(bad):
    """A model output holding NaN or inf (fp16 overflow) must not be cast to arbitrary uint8 levels: it is an
    InputError that names the fp32 fix."""
    t = torch.zeros(1, 3, 4, 4)
    t[0, 1, 2, 3] = bad
    with pytest.raises(InputError, match=r"NaN or inf.*precision='fp32'"):
        to_images(t)


def test_a_float_image_below_zero_is_refused_and_left_unchanged():
    """Float images must lie in [0, 1]: negative values (a [-1, 1] normalised array) would wrap around to bright
    levels when cast to uint8."""
    arr = np.linspace(-0.2, 1.0, 4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3)
    before = arr.copy()
    with pytest.raises(InputError, match=r"arr: float image values span \[-0\.2, 1\], expected \[0, 1\]"):
        vqfr.imaging.as_bgr_uint8(arr, name="arr")
    assert np.array_equal(arr, before)


# ----------------------------------------------------------------------------------------------- headers
def _webp(img: np.ndarray, quality: int) -> bytes:
    return cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, quality])[1].tobytes()


def _big_endian_grey_tiff(grey: np.ndarray) -> bytes:
    """A minimal uncompressed 8-bit grey TIFF in Motorola (big-endian) byte order, sizes as SHORT values."""
    h, w = grey.shape
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 0),
               (277, 3, 1, 1), (278, 3, 1, h), (279, 4, 1, w * h)]
    data_at = 8 + 2 + 12 * len(entries) + 4
    ifd = len(entries).to_bytes(2, "big")
    for tag, kind, count, value in entries:
        value = data_at if tag == 273 else value
        field = value.to_bytes(2, "big") + b"\0\0" if kind == 3 else value.to_bytes(4, "big")
        ifd += tag.to_bytes(2, "big") + kind.to_bytes(2, "big") + count.to_bytes(4, "big") + field
    return b"MM\x00*" + (8).to_bytes(4, "big") + ifd + b"\0\0\0\0" + grey.tobytes()


def _top_down_bmp(img: np.ndarray) -> bytes:
    """A BMP whose height is negative (rows stored top to bottom), as many writers other than OpenCV make them."""
    data = cv2.imencode(".bmp", img)[1].tobytes()
    h, w = img.shape[:2]
    offset, stride = int.from_bytes(data[10:14], "little"), (w * 3 + 3) // 4 * 4
    rows = [data[offset + i * stride:offset + (i + 1) * stride] for i in range(h)]
    return data[:22] + (-h).to_bytes(4, "little", signed=True) + data[26:offset] + b"".join(rows[::-1])


def _jpeg_with_fill_bytes(img: np.ndarray) -> bytes:
    """A JPEG with 0xFF fill bytes before its frame header (allowed before any marker)."""
    data = cv2.imencode(".jpg", img)[1].tobytes()
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xC0)
    return data[:sof] + b"\xff\xff\xff" + data[sof:]


@pytest.mark.parametrize("kind", ["png", "jpeg", "jpeg with fill bytes", "bmp", "top-down bmp", "webp lossy",
                                  "webp lossless", "webp with alpha", "tiff", "big-endian tiff"])
def test_header_size_is_width_by_height_for_every_format(kind, tmp_path):
    """The pixel limit is checked from the header before decoding: ``header_size`` must give (width, height) of a
    non-square image in every format and layout it reads (each WebP chunk kind, both TIFF byte orders, top-down
    BMPs, JPEG fill bytes), and the file decodes to those sizes."""
    img = _img()
    data = {
        "png": lambda: cv2.imencode(".png", img)[1].tobytes(),
        "jpeg": lambda: cv2.imencode(".jpg", img)[1].tobytes(),
        "jpeg with fill bytes": lambda: _jpeg_with_fill_bytes(img),
        "bmp": lambda: cv2.imencode(".bmp", img)[1].tobytes(),
        "top-down bmp": lambda: _top_down_bmp(img),
        "webp lossy": lambda: _webp(img, 90),
        "webp lossless": lambda: _webp(img, 101),
        "webp with alpha": lambda: _webp(np.dstack([img, np.full(img.shape[:2], 200, np.uint8)]), 90),
        "tiff": lambda: cv2.imencode(".tiff", img)[1].tobytes(),
        "big-endian tiff": lambda: _big_endian_grey_tiff(img[:, :, 0]),
    }[kind]()
    assert header_size(data) == (21, 13)
    path = tmp_path / "image.img"
    path.write_bytes(data)
    loaded = load_image(path, max_pixels=21 * 13)
    assert loaded.shape == (13, 21, 3)
    if kind in ("png", "bmp", "top-down bmp", "webp lossless", "tiff"):
        assert np.array_equal(loaded, img)
    if kind == "big-endian tiff":
        assert np.array_equal(loaded, np.repeat(img[:, :, :1], 3, axis=2))
    with pytest.raises(InputError, match=r"its header says 21x13 = 273 pixels, over the limit of 272"):
        load_image(path, max_pixels=21 * 13 - 1)


def test_a_riff_file_that_is_not_webp_is_not_called_a_webp():
    """Only RIFF files of form WEBP are WebP: a WAV file given as an image is 'not an image', not a 'corrupt WebP'."""
    wav = b"RIFF" + (36).to_bytes(4, "little") + b"WAVEfmt " + bytes(24)
    assert sniff_format(wav) is None
    assert sniff_format(_webp(_img(), 90)) == "WebP"


def test_a_riff_wav_given_as_an_image_is_called_not_an_image(tmp_path):
    """The error for a WAV file saved as .webp says what it is not (an image in a format read here)."""
    path = tmp_path / "sound.webp"
    path.write_bytes(b"RIFF" + (36).to_bytes(4, "little") + b"WAVEfmt " + bytes(24))
    with pytest.raises(InputError, match=r"sound\.webp: is not an image in a format this reads"):
        load_image(path)


def test_a_complete_but_corrupt_png_is_called_corrupt_not_truncated(tmp_path):
    """A PNG whose chunks all arrive up to IEND but whose data is damaged is 'corrupt', so the user does not hunt for
    a partial download; the message names the file."""
    data = bytearray(cv2.imencode(".png", _img(16, 16))[1].tobytes())
    data[data.index(b"IDAT") + 10] ^= 0xFF
    path = tmp_path / "damaged.png"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"damaged\.png: is a corrupt or unsupported PNG file"):
        load_image(path)


def test_a_format_without_a_known_header_is_held_to_the_pixel_limit_after_decoding(tmp_path):
    """A PPM has no header this reads; the pixel limit still holds, checked on the decoded image."""
    img = _img(16, 16)
    path = tmp_path / "frame.ppm"
    path.write_bytes(cv2.imencode(".ppm", img)[1].tobytes())
    assert header_size(path.read_bytes()) is None
    with pytest.raises(InputError, match=r"frame\.ppm: is 16x16 = 256 pixels, over the limit of 255.*--max-pixels"):
        load_image(path, max_pixels=255)
    assert np.array_equal(load_image(path, max_pixels=256), img)


def test_a_small_image_with_large_metadata_is_not_refused_for_its_file_size(tmp_path):
    """The file-size guard allows metadata beyond the pixels (a phone photo's EXIF or ICC profile): a 16x16 PNG with
    a 4 KB text chunk loads under a 256-pixel limit."""
    img = _img(16, 16)
    png = cv2.imencode(".png", img)[1].tobytes()
    text = b"Comment\0" + b"x" * 4096
    chunk = len(text).to_bytes(4, "big") + b"tEXt" + text
    chunk += (zlib.crc32(b"tEXt" + text) & 0xFFFFFFFF).to_bytes(4, "big")
    iend = png.rindex(b"IEND") - 4
    path = tmp_path / "tagged.png"
    path.write_bytes(png[:iend] + chunk + png[iend:])
    assert path.stat().st_size > 8 * 256
    assert np.array_equal(load_image(path, max_pixels=256), img)


# ----------------------------------------------------------------------------------------------- writing
@pytest.mark.parametrize("name", ["out.jpg", "out.JPG", "out.jpeg", "out.JPEG"])
def test_the_jpeg_quality_is_applied_whatever_the_suffix_case(name, tmp_path):
    """``--quality`` reaches the encoder for every spelling of the JPEG suffix: the bytes are OpenCV's at that
    quality (and differ from the default 95)."""
    img = _img(32, 40)
    want = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 40])[1].tobytes()
    assert encode_image(tmp_path / name, img, quality=40) == want
    assert save_image(tmp_path / name, img, quality=40).read_bytes() == want
    assert want != cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def test_a_path_without_a_suffix_is_written_as_png(tmp_path):
    """``save_image`` to a name without a suffix writes a PNG (lossless), not an OutputError."""
    img = _img()
    path = save_image(tmp_path / "restored", img)
    data = path.read_bytes()
    assert sniff_format(data) == "PNG"
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), img)


def test_upscale_by_one_returns_a_new_array():
    """The background upsampler's result is pasted into: at scale 1 it must still be a copy, never the photo."""
    img = _img()
    out = vqfr.imaging.upscale_lanczos(img, 1.0)
    assert np.array_equal(out, img) and not np.shares_memory(out, img)


def test_quiet_opencv_keeps_the_log_silenced_until_the_outermost_exit():
    """Overlapping decodes (threads) nest: leaving an inner block must not restore the log level while an outer one
    still decodes; leaving the outermost restores the level found on entry."""
    level = cv2.utils.logging.getLogLevel()
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_WARNING)
        with vqfr.imaging.quiet_opencv():
            with vqfr.imaging.quiet_opencv():
                assert cv2.utils.logging.getLogLevel() == cv2.utils.logging.LOG_LEVEL_SILENT
            assert cv2.utils.logging.getLogLevel() == cv2.utils.logging.LOG_LEVEL_SILENT
        assert cv2.utils.logging.getLogLevel() == cv2.utils.logging.LOG_LEVEL_WARNING
    finally:
        cv2.utils.logging.setLogLevel(level)


# ----------------------------------------------------------------------------------------------- alignment
def test_the_alignment_is_opencvs_lmeds_fit_as_in_the_official_demo():
    """With noisy landmarks and one far off (a misplaced mouth corner), the fit is OpenCV's LMEDS partial affine,
    as the official demo computes it (another robust method gives another crop)."""
    from vqfr.faces.align import estimate_affine, template

    rng = np.random.default_rng(3)
    c, s = 0.3 * np.cos(0.2), 0.3 * np.sin(0.2)
    lms = (template(512).astype(np.float64) @ np.array([[c, s], [-s, c]]) + (90, 70) + rng.normal(0, 4, (5, 2)))
    lms[4] += (25, -18)
    want, _ = cv2.estimateAffinePartial2D(lms.astype(np.float32), template(256), method=cv2.LMEDS)
    np.testing.assert_allclose(estimate_affine(lms, 256), want, rtol=0, atol=1e-9)


def test_aligning_no_faces_gives_empty_uint8_crops():
    """No landmarks: empty crops of the documented shape and dtype, so a caller's batch concatenation still works."""
    from vqfr.faces.align import align_faces

    crops, affines = align_faces(_img(), [], 64)
    assert crops.shape == (0, 64, 64, 3) and crops.dtype == np.uint8 and affines.shape == (0, 2, 3)


# ----------------------------------------------------------------------------------------------- paste-back
def _blob_face(centre: tuple[float, float], sigma: float, size: int = 512) -> np.ndarray:
    """A flat crop (level 100) with a bright Gaussian blob whose centre is known to the sub-pixel."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    blob = 100 + 150 * np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma ** 2))
    return np.repeat(np.rint(blob).astype(np.uint8)[:, :, None], 3, axis=2)


def _centroid(out: np.ndarray) -> np.ndarray:
    weight = np.clip(out[..., 0].astype(np.float64) - 100, 0, None)
    ys, xs = np.mgrid[:out.shape[0], :out.shape[1]]
    return np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()


def test_a_face_shrunk_tenfold_on_the_way_back_lands_where_its_affine_puts_it():
    """A 512 crop pasted into ~51 px (area-reduced, then blurred, then warped) keeps its geometry: the reduction's
    half-pixel centres are accounted for, so detail lands within a few hundredths of a pixel of the exact spot
    (without, 0.15 px off)."""
    from vqfr.faces.paste import paste_faces

    crop_to_photo = np.array([[0.1, 0, 30.3], [0, 0.1, 20.7]])
    marker = (300.0, 280.0)
    out = paste_faces(np.full((120, 120, 3), 100, np.uint8), _blob_face(marker, 40.0)[None],
                      cv2.invertAffineTransform(crop_to_photo)[None], 1)
    exact = crop_to_photo @ np.array([*marker, 1.0])
    assert np.abs(_centroid(out) - exact).max() < 0.05, (_centroid(out), exact)


def test_a_downscaled_paste_without_the_photo_size_keeps_the_nominal_scale():
    """Downscaling, the background's size does not tell the photo's; without ``photo_size`` the paste uses
    ``upscale`` itself (here 0.6), not the first photo size that would shrink to the background (0.5996 on y)."""
    from vqfr.faces.paste import inverse_affine, paste_faces

    width, height, upscale = 501, 497, 0.6
    background = np.full((int(height * upscale), int(width * upscale), 3), 100, np.uint8)
    s = 512 / 200
    affine = np.array([[s, 0, -s * (width - 215.0)], [0, s, -s * (height - 212.0)]])
    marker = (370.0, 360.0)
    out = paste_faces(background, _blob_face(marker, 12.0)[None], affine[None], upscale)
    exact = inverse_affine(affine, upscale) @ np.array([*marker, 1.0])
    assert np.abs(_centroid(out) - exact).max() < 0.05, (_centroid(out), exact)


def _square(centre: tuple[float, float], side: float) -> np.ndarray:
    """Landmarks of an upright face whose aligned square has ``side`` photo pixels, centred at ``centre``."""
    from vqfr.faces.align import FFHQ_TEMPLATE_512

    return FFHQ_TEMPLATE_512.astype(np.float64) * side / 512 + np.asarray(centre) - 256 * side / 512


@pytest.mark.parametrize("face_size", [64, 256])
def test_the_seam_between_overlapping_faces_is_a_few_hundredths_of_a_face_whatever_the_crop_size(face_size):
    """Two overlapping 120 px faces, restored as flat 20 and 230: the seam midway between their centres spans the
    pixels where neither claim is 19x the other (distances within 0.02 * ln 19 crop sides: about 7 px here) at any
    crop size, since distances are measured in crop sides (measured in 512ths of a crop, a 64 px crop's seam was
    4x wider)."""
    from vqfr.faces.align import align_faces
    from vqfr.faces.paste import paste_faces

    photo = np.full((200, 300, 3), 128, np.uint8)
    crops, affines = align_faces(photo, [_square((110.0, 100.0), 120.0), _square((190.0, 100.0), 120.0)], face_size)
    restored = np.stack([np.full(crops.shape[1:], 20, np.uint8), np.full(crops.shape[1:], 230, np.uint8)])
    row = paste_faces(photo, restored, affines, 1)[100, 110:191, 0].astype(int)
    seam = np.nonzero((row > 30) & (row < 220))[0] + 110
    assert 4 <= len(seam) <= 10, row
    assert abs(seam.mean() - 150) <= 2, row  # midway between the faces' centres


@pytest.mark.parametrize("size,kernel,sigma,border,face,ear", [
    (512, 101, 11, 10, np.s_[120:420, 140:380], np.s_[200:260, 40:140]),
    # mutation round 20: at 256 px the recipe is halved (101 / 2 = 50.5 -> 51, odd), so the soft mask reaches as
    # far, in face sizes, as at 512
    (256, 51, 5.5, 5, np.s_[60:210, 70:190], np.s_[100:130, 10:70]),
])
def test_the_parsed_region_is_softened_exactly_as_the_official_demo_does(size, kernel, sigma, border, face, ear):
    """facexlib's paste with a parsing network: at 512 px two 101x101 Gaussian blurs of sigma 11, then a 10-pixel
    border set to 0 (OFFICIAL_VQFR.md §7), scaled with the face size; the soft mask decides how far restored skin
    reaches into the photo."""
    from vqfr.faces.paste import parse_mask

    region = np.zeros((size, size), np.float32)
    region[face] = 1
    region[ear] = 1  # an ear reaching towards the border
    want = cv2.GaussianBlur(cv2.GaussianBlur(region, (kernel, kernel), sigma), (kernel, kernel), sigma)
    want[:border], want[-border:], want[:, :border], want[:, -border:] = 0, 0, 0, 0
    np.testing.assert_allclose(parse_mask(region), want, rtol=0, atol=1e-6)


def test_the_feathered_mask_stays_off_the_interpolated_rim_of_an_upscaled_square():
    """Upscaled s times, the warped square's rim is interpolated over about s pixels: the mask is 0 on the outer s
    pixels (then ramps in), so the crop's blurred edge is not pasted."""
    from vqfr.faces.paste import feather_mask

    coverage = np.zeros((160, 160), np.float32)
    coverage[20:140, 20:140] = 1
    for upscale in (1, 3):
        line = feather_mask(coverage, upscale)[80]
        assert not line[20:20 + upscale].any() and line[20 + upscale] > 0, (upscale, line[18:30])
        assert not line[140 - upscale:140].any() and line[139 - upscale] > 0


@pytest.mark.parametrize("upscale", [2, 3])
def test_an_upscaled_paste_leaves_the_interpolated_rim_of_the_square_alone(upscale):
    """Pasted into a background upscaled s times, the warped square's edge is interpolated over about s output
    pixels: a white face on black changes no pixel within s pixels of where the square's coverage is 0 (the mask is
    eroded by s there, not by 1)."""
    from vqfr.faces.paste import inverse_affine, paste_faces

    c, s = 64 / 40 * np.cos(0.3), 64 / 40 * np.sin(0.3)
    rot = np.array([[c, s], [-s, c]])
    affine = np.concatenate([rot, (32 - rot @ [50.0, 50.0])[:, None]], 1)  # a 40 px face at the photo's centre
    background = np.zeros((100 * upscale, 100 * upscale, 3), np.uint8)
    out = paste_faces(background, np.full((1, 64, 64, 3), 255, np.uint8), affine[None], upscale)
    coverage = cv2.warpAffine(np.ones((64, 64), np.float32), inverse_affine(affine, upscale), (100 * upscale,) * 2)
    rim = cv2.dilate((coverage <= 0).astype(np.uint8), np.ones((2 * upscale + 1,) * 2, np.uint8)) > 0
    assert out[rim].max() == 0 and out[~rim].max() == 255


# ----------------------------------------------------------------------------------------------- checkpoints
def test_a_params_entry_that_is_not_a_mapping_is_a_checkpoint_error_naming_the_file(tmp_path):
    """``{"params": [...]}`` (weights_only loads lists) is refused as a checkpoint error about that entry, not an
    AttributeError."""
    path = tmp_path / "odd.pth"
    torch.save({"params": [torch.zeros(2)]}, path)
    with pytest.raises(CheckpointError, match=r"odd\.pth: entry 'params' is a list, not a tensor.*Fix:"):
        vqfr.checkpoint.read_state_dict(path)


@pytest.mark.parametrize("name", ["empty.pth", "empty.safetensors"])
def test_an_empty_checkpoint_is_called_empty(name, tmp_path):
    """A 0-byte weights file (an interrupted download) says so, with the fix, in either format."""
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{name}: is empty \(0 bytes\)\. Fix: re-download"):
        vqfr.load_model(path)


@pytest.mark.parametrize("stored,match", [("[1, 2]", "has model options of type list in its metadata, not a mapping"),
                                          ("{\"type\": ", "has malformed model options in its metadata")])
def test_unreadable_options_in_safetensors_metadata_are_a_checkpoint_error(tmp_path, stored, match):
    """Options in a safetensors file's metadata that are not a JSON mapping are the file's fault: a CheckpointError
    naming it and how to pass options instead."""
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in seeded_model(TINY_V2).state_dict().items()}, str(path),
              metadata={"format": "vqfr-weights/1", "options": stored})
    with pytest.raises(CheckpointError) as err:
        vqfr.load_model(path)
    assert match in err.value.reason and err.value.path == path and "options=" in (err.value.fix or "")


def test_a_pickles_report_names_every_global_it_calls_in_order(tmp_path):
    """The refusal names what the pickle would call, read statically: with protocol 4, module and name are pushed
    as strings (the module's the second time from the memo), and both calls are named as module.name."""

    class System:
        def __reduce__(self):
            return os.system, ("true",)

    class Remove:
        def __reduce__(self):
            return os.remove, (str(tmp_path / "never"),)

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"params": {"a": System(), "b": Remove()}}, protocol=4))
    module = os.system.__module__
    with pytest.raises(CheckpointError, match=rf"refused: its pickle calls {module}\.system, {module}\.remove, "):
        vqfr.checkpoint.read_state_dict(path)


def test_explicit_invalid_options_are_a_config_error_not_blamed_on_the_file(tmp_path):
    """Options the caller passes are the caller's: invalid ones raise ConfigError, not a CheckpointError about the
    file's metadata."""
    path = vqfr.save_safetensors(seeded_model(TINY_V2), tmp_path / "ok.safetensors")
    with pytest.raises(ConfigError) as err:
        vqfr.load_model(path, {**TINY_V2, "bogus": 1})
    assert not isinstance(err.value, CheckpointError) and "metadata" not in str(err.value)


def test_a_loaded_model_records_its_weights_path_and_the_file_records_its_arch(tmp_path):
    """``model.weights_path`` is the checkpoint loaded (the runtime reports it); a saved safetensors file carries its
    format and architecture in its metadata."""
    from safetensors import safe_open

    path = vqfr.save_safetensors(seeded_model(TINY_V2), tmp_path / "w.safetensors")
    assert vqfr.load_model(path).weights_path == str(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "vqfr-weights/1" and meta["arch"] == "VQFRv2"
    assert json.loads(meta["options"]) == TINY_V2


def test_a_checkpoint_of_no_known_architecture_without_options_names_the_file(tmp_path):
    """Without options, a state dict with none of the VQFR/VQGAN keys is a CheckpointError saying so, not a
    KeyError."""
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"other\.pth: has none of the keys of a VQFR or VQGAN model.*Fix:"):
        vqfr.load_model(path)


def test_file_sha256_hashes_the_whole_file(tmp_path):
    """The weights' hash covers every byte, also past the first 1 MiB chunk."""
    data = np.random.default_rng(1).integers(0, 256, (5 << 19) + 7, dtype=np.uint8).tobytes()
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert vqfr.checkpoint.file_sha256(path) == hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------- sidecar
def _meta(**changes):
    from vqfr.sidecar import EngineMeta, TensorSpec

    fields = dict(arch="VQFRv2", options={"type": "VQFRv2"}, face_size=512, precision="fp16",
                  inputs=(TensorSpec("input", (-1, 3, 512, 512)), TensorSpec("fidelity", (-1,))),
                  outputs=(TensorSpec("output", (-1, 3, 512, 512)),))
    return EngineMeta(**{**fields, **changes})


@pytest.mark.parametrize("shape", [[-1, 3, 256, 256], [-1, 3, 512, 256], [-1, 3, 256, 512], [3, 512, 512]])
def test_a_sidecar_whose_face_size_does_not_fit_its_input_is_refused(tmp_path, shape):
    """The runtime feeds face_size x face_size crops: a fixed input height or width of another size (or an input
    that is not [B, 3, H, W]) is refused when the sidecar is read, naming it."""
    from vqfr.sidecar import read_sidecar, sidecar_path

    engine = tmp_path / "m.onnx"
    d = _meta().to_dict()
    d["inputs"][0]["shape"] = shape
    sidecar_path(engine).write_text(json.dumps(d))
    with pytest.raises(EngineError, match=r"m\.onnx\.json: sidecar face_size 512 does not fit its input shape"):
        read_sidecar(engine)
    d["inputs"][0]["shape"] = [-1, 3, -1, 512]  # dynamic where not fixed
    sidecar_path(engine).write_text(json.dumps(d))
    assert read_sidecar(engine).face_size == 512


def test_a_sidecar_written_without_its_engine_records_no_stale_size_or_hash(tmp_path):
    """The size and hash describe the engine file: with no file there (yet), any carried over from another meta are
    dropped, so a later check does not refuse the real engine for another file's hash."""
    from vqfr.sidecar import read_sidecar, write_sidecar

    engine = tmp_path / "m.onnx"
    write_sidecar(engine, _meta(file_size=123, file_sha256="ab" * 32))
    meta = read_sidecar(engine)
    assert meta.file_size is None and meta.file_sha256 is None


def test_sidecar_defaults_and_fidelity_input(tmp_path):
    """A tensor without a dtype is float32 (older sidecars); an engine without a ``fidelity`` input does not take
    one (the runtime must not feed it)."""
    from vqfr.sidecar import TensorSpec, read_sidecar, sidecar_path

    engine = tmp_path / "m.onnx"
    d = _meta(inputs=(TensorSpec("input", (-1, 3, 512, 512)),)).to_dict()
    for spec in d["inputs"] + d["outputs"]:
        del spec["dtype"]
    sidecar_path(engine).write_text(json.dumps(d))
    meta = read_sidecar(engine)
    assert [t.dtype for t in meta.inputs + meta.outputs] == ["float32", "float32"]
    assert not meta.takes_fidelity and _meta().takes_fidelity


@pytest.mark.parametrize("change", ["file_size not a number", "no format", "a list"])
def test_a_malformed_sidecar_is_an_engine_error_naming_it(tmp_path, change):
    """A hand-edited sidecar with a non-numeric size, no ``format`` or not a JSON object is refused on reading, as an
    EngineError naming the sidecar and the re-export fix (not a ValueError, nor a crash at the size check)."""
    from vqfr.sidecar import read_sidecar, sidecar_path

    engine = tmp_path / "m.onnx"
    d = _meta().to_dict()
    if change == "file_size not a number":
        d["file_size"] = "12 MB"
    elif change == "no format":
        del d["format"]
    else:
        d = [d]
    sidecar_path(engine).write_text(json.dumps(d))
    with pytest.raises(EngineError, match=r"m\.onnx\.json: sidecar .*Fix: re-export the engine"):
        read_sidecar(engine)


def test_a_16_bit_png_is_scaled_by_255_over_65535_and_rounded(tmp_path):
    """A 16-bit PNG whose levels are not multiples of 257: each becomes round(v * 255 / 65535), as documented
    (OpenCV's own conversion truncates, v >> 8; the two differ by at most one level). Levels chosen on both sides of
    each rounding boundary."""
    levels = np.array([0, 128, 129, 256, 385, 386, 32767, 32896, 65279, 65407, 65408, 65535], np.uint16)
    img = np.stack([levels, levels[::-1], np.roll(levels, 5)], -1).reshape(3, 4, 3)
    path = tmp_path / "deep.png"
    assert cv2.imwrite(str(path), img)
    want = np.floor(img.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    got = load_image(path)
    assert np.array_equal(got, want)
    assert not np.array_equal(got, (img >> 8).astype(np.uint8))  # not OpenCV's truncation
