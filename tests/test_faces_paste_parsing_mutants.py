"""Behaviours of the paste-back, the face-parsing mask and the detector front end that the other test files left
unchecked (found by mutation round 20): the default mask's feather width (the parser mask's blur at 256 px, also
found here, is a case of the 512 px test in tests/test_imaging_faces_mutants.py); each axis's own scale; which face
owns a pixel when faces are turned; each face's own parsed region; the far photo edges of an upscaled paste given no
``photo_size``; the anti-aliasing blur just under a 2x shrink, and none for a turned face at its own scale; what a
parsing network is fed, which of its outputs is read, its eval mode, upper-case file suffixes, ONNX batches (fixed
and larger than the faces, or dynamic) and providers, too few classes, and no faces; no parser for None; and the
device and a pixel cap of 0 for a detector built by name or path."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from tests.test_core_behaviours import _landmarks
from tests.test_faces import RedSkin
from vqfr.errors import ConfigError
from vqfr.faces.align import BORDER_VALUE, align_faces
from vqfr.faces.detector import check_max_pixels
from vqfr.faces.parsing import NetworkParser, load_parser
from vqfr.faces.paste import feather_mask, paste_faces


# ----------------------------------------------------------------------------------------------- masks
def test_the_feathered_mask_ramps_over_a_twentieth_of_the_square():
    """A 100 px square: 1 px of interpolated rim dropped (98 px left), feather width w = 98 // 20 = 4, so the core
    is eroded by 4 more (to columns 25..114) and blurred over 2w + 1 = 9 pixels: 0 up to column 20, rising from
    column 21, exactly 1 from column 29 (the blur's reach of 4 past the core's edge), symmetric on the far side."""
    coverage = np.zeros((140, 140), np.float32)
    coverage[20:120, 20:120] = 1
    mask = feather_mask(coverage)
    for line in (mask[70], mask[:, 70]):
        assert not line[:21].any() and line[21] > 0, line[16:30]
        assert line[28] < 1 and (line[29:111] == 1).all(), line[24:34]
        assert line[118] > 0 and not line[119:].any(), line[110:124]
    core = np.zeros(140, np.float32)
    core[25:115] = 1
    ramp = cv2.GaussianBlur(core[None], (9, 1), 0)[0]  # the 9-tap Gaussian (sigma 1.7) across the core's edge
    np.testing.assert_allclose(mask[70], ramp, atol=1e-6)


# ----------------------------------------------------------------------------------------------- paste-back
def test_a_turned_face_owns_the_pixels_nearer_its_own_face_centre_not_its_squares():
    """Where two faces overlap, a pixel goes to the face whose centre (the landmarks' mean, 20 px below the square's
    centre in a 200 px upright face) is nearer, in face sizes. A face lying on its side has that centre beside its
    square's centre, so the seam on the row through both squares' centres moves off their midpoint (x = 200): for
    equal faces it lies where the two landmark means are equally far."""
    photo = np.full((200, 400, 3), 128, np.uint8)
    lms = [_landmarks(140.0, 100.0, 200 / 512, -90.0),  # on its side (turned counter-clockwise on screen)
           _landmarks(260.0, 100.0, 200 / 512, 0.0)]
    crops, affines = align_faces(photo, lms, 128)
    restored = np.stack([np.full(crops.shape[1:], 20, np.uint8), np.full(crops.shape[1:], 230, np.uint8)])
    row = paste_faces(photo, restored, affines, 1)[100, :, 0].astype(np.float64)
    xs = np.arange(400, dtype=np.float64)
    near = [np.hypot(xs - m[0], 100 - m[1]) for m in (lm.mean(0) for lm in lms)]
    expected = xs[np.argmin(np.abs(near[0] - near[1])[160:241]) + 160]  # equally far, between the faces
    rise = np.nonzero(row[160:241] >= 125)[0][0] + 160  # first pixel past half-way from 20 to 230
    assert abs(rise - expected) <= 2, (rise, expected, row[180:225])
    assert abs(expected - 200) >= 8, expected  # the test can tell the landmarks' centre from the square's


def test_each_face_is_pasted_through_its_own_parsed_region_even_after_a_face_off_the_photo():
    """``regions[i]`` is face i's mask: of two white faces on a grey photo, the one whose region is full is pasted
    and the one whose region is empty leaves the photo as it was, also when an earlier face lies wholly outside the
    photo (and is skipped)."""
    photo = np.full((120, 240, 3), 90, np.uint8)
    lms = [_landmarks(-400.0, -400.0, 60 / 512, 0.0), _landmarks(60.0, 60.0, 100 / 512, 0.0),
           _landmarks(180.0, 60.0, 100 / 512, 0.0)]
    crops, affines = align_faces(photo, lms, 64)
    regions = np.stack([np.zeros((64, 64), np.float32), np.ones((64, 64), np.float32),
                        np.zeros((64, 64), np.float32)])
    out = paste_faces(photo, np.full_like(crops, 255), affines, 1, regions=regions)
    assert (out[45:75, 45:75] == 255).all()  # face 1: its full region
    assert (out[:, 120:] == 90).all()  # face 2: its empty region


@pytest.mark.parametrize("edge", ["bottom", "right"])
def test_an_upscaled_paste_without_the_photo_size_keeps_the_border_colour_off_the_far_edges(edge):
    """Without ``photo_size`` the photo's size is the background's over the scale; the crop's pixels beyond the
    photo's bottom and right edges (the grey border colour) are then replicated from the photo's edge, as with it:
    the upscaled photo's last row or column does not blend the grey in."""
    from vqfr.imaging import upscale_lanczos

    h, w, s = 120, 130, 2
    noise = cv2.GaussianBlur(np.random.default_rng(4).normal(0, 40, (h, w, 3)), (0, 0), 3)
    photo = np.clip(228 + noise, 0, 255).astype(np.uint8)  # bright and smooth: grey blended in would show
    centre = {"bottom": (65.0, h - 30.0), "right": (w - 30.0, 60.0)}[edge]
    crops, affines = align_faces(photo, [_landmarks(*centre, 110 / 512, 0.0)], 128)
    assert (crops[0] == np.array(BORDER_VALUE, np.uint8)).all(2).any(), "the test needs a crop leaving the photo"
    background = upscale_lanczos(photo, s)
    out = paste_faces(background, crops, affines, s).astype(int)
    last = {"bottom": np.s_[-1, 30 * s:100 * s], "right": np.s_[30 * s:90 * s, -1]}[edge]
    diff = out[last] - background[last]
    assert abs(diff.mean()) <= 1.0 and np.abs(diff).max() <= 12, (diff.mean(), np.abs(diff).max())


def _blob_face(centre: tuple[float, float], sigma: float, size: int) -> np.ndarray:
    """A flat crop (level 100) with a bright Gaussian blob whose centre is known to the sub-pixel."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    blob = 100 + 150 * np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma ** 2))
    return np.repeat(np.rint(blob).astype(np.uint8)[:, :, None], 3, axis=2)


def test_a_background_scaled_differently_on_each_axis_takes_each_axiss_own_scale():
    """Given ``photo_size``, x is scaled by the background's width over the photo's and y by its height over the
    photo's: a 120 x 100 photo pasted into a 240 x 150 background puts photo pixel (x, y) at (2x + 0.5, 1.5y + 0.25)
    (half-pixel centres): the two scales are not swapped."""
    k = 128 / 60  # a 60 px face, its square's corner at photo (30, 20)
    affine = np.array([[k, 0, -k * 30], [0, k, -k * 20]])
    marker = (70.0, 60.0)
    out = paste_faces(np.full((150, 240, 3), 100, np.uint8), _blob_face(marker, 6.0, 128)[None], affine[None], 2,
                      photo_size=(120, 100))
    px, py = 30 + marker[0] / k, 20 + marker[1] / k
    weight = np.clip(out[..., 0].astype(np.float64) - 100, 0, None)
    ys, xs = np.mgrid[:150, :240]
    centroid = np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
    np.testing.assert_allclose(centroid, [2 * px + 0.5, 1.5 * py + 0.25], atol=0.1)


def test_a_turned_face_at_the_photos_own_scale_is_pasted_unblurred():
    """A crop pasted back at its own scale (no shrink), turned 60 degrees, is one bicubic warp and no low-pass: the
    anti-aliasing blur is sized by the warp's area scale (here 1), not by one coefficient of its matrix (cos 60 =
    0.5 would read as a 2x shrink and blur fine detail)."""
    rng = np.random.default_rng(8)
    face = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    c, s = 0.5, np.sqrt(0.75)
    to_photo = np.array([[c, -s, 60.0 + 32 * (s - c)], [s, c, 60.0 - 32 * (s + c)]])  # crop -> photo, centred at 60
    out = paste_faces(np.zeros((120, 120, 3), np.uint8), face[None], cv2.invertAffineTransform(to_photo)[None], 1)
    want = cv2.warpAffine(face, to_photo, (120, 120), flags=cv2.INTER_CUBIC)
    centre = np.zeros((120, 120), bool)
    centre[45:76, 45:76] = True  # over 10 px inside the square, where the mask is 1
    assert np.abs(out[centre].astype(int) - want[centre]).max() <= 1


def test_detail_shrunk_just_under_twofold_is_low_passed_before_the_warp():
    """The anti-aliasing blur starts at any shrink over 1, not at 2: restored detail at the crop's pixel scale,
    shrunk 1.9x on the way back, comes out close to an 8x supersampled rendering (box-filtered) of the crop: 29.0 dB
    here; warped unfiltered, it aliases (24.2 dB)."""
    rng = np.random.default_rng(5)
    base = cv2.GaussianBlur(rng.normal(128, 60, (128, 128, 3)), (0, 0), 6)
    face = np.clip(base + rng.normal(0, 30, (128, 128, 3)), 0, 255).astype(np.uint8)
    side = int(128 / 1.9 + 30)
    to_photo = np.array([[1 / 1.9, 0, 15.3], [0, 1 / 1.9, 14.6]])
    out = paste_faces(np.zeros((side, side, 3), np.uint8), face[None], cv2.invertAffineTransform(to_photo)[None], 1)
    fine = to_photo.copy()
    fine[:, :2] *= 8
    fine[:, 2] = 8 * to_photo[:, 2] + 3.5  # pixel centres of the 8x grid
    ref = cv2.resize(cv2.warpAffine(face, fine, (8 * side, 8 * side), flags=cv2.INTER_CUBIC), (side, side),
                     interpolation=cv2.INTER_AREA)
    err = (out.astype(np.float64) - ref)[25:side - 25, 25:side - 25] ** 2
    assert 10 * np.log10(255 ** 2 / err.mean()) >= 27.5


# ----------------------------------------------------------------------------------------------- parsing
def _parser_file(tmp_path, module: torch.nn.Module, name: str = "parser.pt"):
    path = tmp_path / name
    torch.jit.save(torch.jit.script(module), str(path))
    return path


class _Skin(torch.nn.Module):
    """Class 1 (skin) everywhere, of ``classes`` classes."""

    def __init__(self, classes: int = 19):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.classes, x.shape[2], x.shape[3])
        logits[:, 1] = 1.0
        return logits


def test_a_parser_is_fed_rgb_in_minus_one_to_one_bilinearly_resized_to_its_input(tmp_path):
    """As the official demo feeds ParseNet: the BGR face resized to the network's side with bilinear interpolation,
    turned to RGB and scaled to [-1, 1] (v / 127.5 - 1), [N, 3, S, S] float32."""
    path = _parser_file(tmp_path, _Skin())
    assert NetworkParser(path).size == 512  # ParseNet's input side by default
    parser = NetworkParser(path, size=64)
    seen = []

    def run(x):
        seen.append(x)
        return np.zeros((len(x), 19, 64, 64), np.float32)

    parser._run = run
    rng = np.random.default_rng(3)
    faces = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    faces[1, ..., 0], faces[1, ..., 2] = 0, 255  # blue 0, red 255
    parser.regions(faces)
    (x,) = seen
    assert x.shape == (2, 3, 64, 64) and x.dtype == np.float32
    for face, got in zip(faces, x, strict=True):
        big = cv2.resize(face, (64, 64), interpolation=cv2.INTER_LINEAR).astype(np.float64)
        want = (big[..., ::-1] / 127.5 - 1).transpose(2, 0, 1)
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert (x[1, 0] == 1).all() and (x[1, 2] == -1).all()  # red first


class _ParseNetLike(torch.nn.Module):
    """facexlib's ParseNet answers (class logits, a reconstructed image): skin everywhere, and an image."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 19, x.shape[2], x.shape[3])
        logits[:, 1] = 1.0
        return logits, torch.zeros_like(x)


def test_a_parser_answering_logits_and_an_image_is_read_for_its_logits(tmp_path):
    masks = load_parser(_parser_file(tmp_path, _ParseNetLike())).regions(np.zeros((2, 16, 16, 3), np.uint8))
    assert masks.shape == (2, 16, 16) and (masks == 1).all()


def test_no_parser_spec_means_no_parser():
    assert load_parser(None) is None


class _SkinWhenEvaluating(torch.nn.Module):
    """Skin everywhere in eval mode, background in training mode (a network saved without ``.eval()``)."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 19, x.shape[2], x.shape[3])
        logits[:, 0 if self.training else 1] = 1.0
        return logits


def test_a_torchscript_parser_saved_in_training_mode_is_run_in_eval_mode(tmp_path):
    """BatchNorm and dropout must use their inference behaviour: the parser is put in eval mode when loaded."""
    path = _parser_file(tmp_path, _SkinWhenEvaluating().train())
    assert load_parser(path).regions(np.zeros((1, 16, 16, 3), np.uint8)).min() == 1


def test_a_parser_file_with_an_upper_case_suffix_loads(tmp_path):
    path = _parser_file(tmp_path, _Skin(), name="PARSENET.PT")
    assert load_parser(path).regions(np.zeros((1, 16, 16, 3), np.uint8)).min() == 1


def test_an_onnx_parser_with_a_fixed_batch_larger_than_the_faces_parses_them(tmp_path):
    """A parser exported for 2 faces at once, given a photo with 1 face: the face is padded to the batch, not fed
    alone (onnxruntime refuses a batch of 1 there)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")

    path = tmp_path / "parser.onnx"
    torch.onnx.export(RedSkin(), (torch.zeros(2, 3, 64, 64),), str(path), dynamo=False)
    faces = np.zeros((1, 16, 16, 3), np.uint8)
    faces[..., 2] = 255  # red (BGR)
    masks = NetworkParser(path, size=64).regions(faces)
    assert masks.shape == (1, 16, 16) and (masks == 1).all()


@pytest.mark.parametrize(("device", "providers"), [("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
                                                   ("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
                                                   ("cpu", ["CPUExecutionProvider"])])
def test_an_onnx_parser_runs_on_cuda_only_when_asked(tmp_path, monkeypatch, device, providers):
    """``device="cuda"`` puts onnxruntime's CUDA provider first (where onnxruntime has it), CPU as the fallback;
    ``device="cpu"`` keeps the parser on the CPU even where CUDA is available."""
    ort = pytest.importorskip("onnxruntime")
    asked = []

    class Session:
        def __init__(self, path, providers):
            asked.append(providers)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    path = tmp_path / "parser.onnx"
    path.write_bytes(b"not read by the stand-in session")
    NetworkParser(path, device=device)
    assert asked == [providers]


def test_an_onnx_parser_with_a_dynamic_batch_parses_any_number_of_faces_at_once(tmp_path):
    """Exported with a dynamic batch axis (its input's batch is a name, not a number), the parser takes every face in
    one run, in order."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")

    path = tmp_path / "parser.onnx"
    torch.onnx.export(RedSkin(), (torch.zeros(1, 3, 64, 64),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "faces"}})
    faces = np.zeros((3, 16, 16, 3), np.uint8)
    faces[1, ..., 2] = 255  # the middle face is red (BGR)
    masks = NetworkParser(path, size=64).regions(faces)
    assert masks.shape == (3, 16, 16)
    assert masks[1].min() == 1 and masks[0].max() == 0 and masks[2].max() == 0


def test_a_parser_of_too_few_classes_is_a_config_error(tmp_path):
    """A two-class segmentation network is not a 19-class face parser: refused, not read as skin/background."""
    with pytest.raises(ConfigError, match=r"parser returned shape \(1, 2, 512, 512\) for 1 faces"):
        load_parser(_parser_file(tmp_path, _Skin(classes=2))).regions(np.zeros((1, 16, 16, 3), np.uint8))


def test_parsing_no_faces_gives_no_masks(tmp_path):
    """A photo without faces: aligning gives [0, S, S, 3] crops and pasting them returns the photo; parsing them must
    give [0, S, S] masks too (np.stack of no masks raised a ValueError)."""
    masks = load_parser(_parser_file(tmp_path, _Skin())).regions(np.zeros((0, 32, 32, 3), np.uint8))
    assert masks.shape == (0, 32, 32) and masks.dtype == np.float32


# ----------------------------------------------------------------------------------------------- detector
@pytest.mark.parametrize("value", [0, -1])
def test_a_pixel_cap_of_zero_or_less_is_refused(value):
    with pytest.raises(ConfigError, match=rf"max_pixels must be a positive integer, got {value}"):
        check_max_pixels(value, "mtcnn")


def test_a_detector_named_or_found_by_its_weights_is_built_on_the_device_asked(tmp_path, monkeypatch):
    """``load_detector("NAME:PATH", device)`` and a bare weights path hand the device (and pixel cap) to the
    detector's factory, so a GPU runtime's detector runs on the GPU."""
    from vqfr.faces import detector

    built = []

    def factory(path, device, max_pixels):
        built.append((device, max_pixels))

    monkeypatch.setitem(detector.DETECTORS, "mtcnn", factory)
    weights = tmp_path / "mtcnn.pth"
    torch.save({"pnet.conv1.weight": torch.zeros(1)}, weights)
    detector.load_detector(f"mtcnn:{weights}", device="cuda:1", max_pixels=1000)
    detector.load_detector(weights, device="cuda:1", max_pixels=1000)
    assert built == [("cuda:1", 1000), ("cuda:1", 1000)]
