"""The Python API's promises that a user builds on, each checked against an independent reference: which face of
which photo a restored crop and its fidelity belong to in list inputs, ``only_center_face`` through every entry
point, the per-call ``aligned`` and ``fidelity`` over the runtime's defaults, the ``upsampler`` and ``parser``
options, the frame of an aligned face's box, and the similarity transform of the alignment (its least-squares
fallback included) with its bilinear crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import TINY_V2, seeded_model
from tests.test_core_behaviours import _detection, _Fixed, _Identity
from tests.test_runtime import _official
from vqfr.faces.align import BORDER_VALUE, estimate_affine, template, warp_face
from vqfr.faces.paste import paste_faces
from vqfr.imaging import to_tensor, upscale_lanczos
from vqfr.runtime import Runtime

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def model():
    return seeded_model(TINY_V2, seed=1)


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    """A photo with structure at the faces' scale (random noise would make every crop look alike to the eye)."""
    import cv2

    rng = np.random.default_rng(seed)
    return np.clip(cv2.GaussianBlur(rng.normal(128, 80, (h, w, 3)), (0, 0), 2), 0, 255).astype(np.uint8)


def _check_faces_and_image(model, photo: np.ndarray, result, dets, fidelity: float, upscale: float) -> None:
    """Every face of ``result`` is the detector's, cut with the official alignment, restored by the model at
    ``fidelity`` with the official pre/post-processing, and pasted back at its own place."""
    assert len(result.faces) == len(dets)
    for face, det in zip(result.faces, dets, strict=True):
        np.testing.assert_array_equal(face.box, det.box)  # input pixels, whatever the upscale
        np.testing.assert_array_equal(face.landmarks, det.landmarks)
        np.testing.assert_allclose(face.affine, estimate_affine(det.landmarks, 64), atol=1e-9)
        assert np.array_equal(face.cropped, warp_face(photo, face.affine, 64))
        assert np.abs(face.restored.astype(int) - _official(model, face.cropped, fidelity)).max() <= 1
    restored = np.stack([f.restored for f in result.faces])
    affines = np.stack([f.affine for f in result.faces])
    want = paste_faces(upscale_lanczos(photo, upscale), restored, affines, upscale,
                       photo_size=(photo.shape[1], photo.shape[0]))
    assert np.array_equal(result.image, want)


# ----------------------------------------------------------------------------------------------- list inputs
@pytest.mark.parametrize("fidelity", [None, 0.6])
def test_each_photo_of_a_list_gets_its_own_faces_restored_at_the_calls_fidelity(model, fidelity):
    """``restore_faces_batch`` shares inference batches between photos (3 faces a batch over 2 photos of 2 faces):
    each photo's faces must still be its own crops, restored at the call's fidelity (not the runtime's default)
    and pasted where they were found, in the order given, as one photo at a time."""
    dets = [_detection(60, 60, 0.2, 0.99), _detection(150, 70, 0.18, 0.9)]
    photos = [_smooth(130, 200, seed) for seed in (1, 2)]
    rt = Runtime(model, device="cpu", max_batch=3, detector=_Fixed(dets), fidelity=0.0)
    results = rt.restore_faces_batch(photos, fidelity=fidelity, upscale=2)
    assert len(results) == 2
    for photo, result in zip(photos, results, strict=True):
        _check_faces_and_image(model, photo, result, dets, fidelity or 0.0, 2)
        alone = rt.restore_faces(photo, fidelity=fidelity, upscale=2)
        assert np.abs(alone.image.astype(int) - result.image).max() <= 1  # other batches: float rounding
    if fidelity:  # the test can tell the fidelity apart
        face = results[0].faces[0].cropped
        assert not np.array_equal(_official(model, face, 0.0), _official(model, face, fidelity))


def test_infer_gives_each_face_its_own_fidelity_across_batches(model):
    """``infer(x, [f0, f1, f2])`` with ``max_batch=2``: the third face runs in a second batch and must get f2 (not
    the first batch's values)."""
    faces = np.random.default_rng(11).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    x = to_tensor(faces)
    fid = [0.0, 1.0, 0.5]
    got = Runtime(model, device="cpu", max_batch=2).infer(x, np.array(fid, np.float32))
    with torch.no_grad():
        for i, f in enumerate(fid):
            torch.testing.assert_close(got[i:i + 1], model(x[i:i + 1], fidelity=f), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------- face selection
def test_only_center_face_is_honoured_by_every_entry_point(model):
    """The face nearest the centre of a 240x120 photo is the one whose box centre is nearest (120, 60): a big face
    above the centre, not a small one lower left (nearer (60, 120), the centre with x and y swapped, and with the
    top-left corner of its box nearer the centre). ``restore``, ``restore_batch`` and ``restore_faces_batch`` keep
    it alone, as ``restore_faces`` does; with two faces too, not only three."""
    photo = _smooth(120, 240, seed=3)
    centre, other = _detection(120, 40, 0.3, 0.8), _detection(60, 100, 0.1, 0.99)
    rt = Runtime(model, device="cpu", detector=_Fixed([other, centre]))
    result = rt.restore_faces(photo, only_center_face=True)
    _check_faces_and_image(model, photo, result, [centre], 0.0, 1)
    assert np.array_equal(rt.restore(photo, only_center_face=True), result.image)
    assert np.array_equal(rt.restore_batch([photo], only_center_face=True)[0], result.image)
    assert len(rt.restore_faces_batch([photo], only_center_face=True)[0].faces) == 1
    assert not np.array_equal(rt.restore(photo), result.image)  # both faces pasted differ: the test can tell


# ----------------------------------------------------------------------------------------------- options
def test_a_calls_aligned_false_overrides_the_runtimes_aligned_default(model):
    """``Runtime(aligned=True)`` sets the default only: ``restore(img, aligned=False)`` detects (here: no face, so
    the photo comes back as it was), and a call without ``aligned`` restores the whole square as one face."""
    face = _smooth(64, 64, seed=4)
    rt = Runtime(model, device="cpu", aligned=True, detector=_Fixed([]))
    assert np.array_equal(rt.restore(face, aligned=False), face)
    assert np.abs(rt.restore(face).astype(int) - _official(model, face, 0.0)).max() <= 1


def test_an_aligned_face_reports_its_box_crop_and_restored_face_in_their_frames(model):
    """For a 96 px aligned input: the box is the whole input (input pixels, not the face size), the score 1, the
    crop is the official bilinear resize to the face size, and ``restored`` is the model's output, the image
    returned."""
    import cv2

    photo = _smooth(96, 96, seed=5)
    result = Runtime(model, device="cpu").restore_faces(photo, aligned=True)
    face = result.faces[0]
    np.testing.assert_array_equal(face.box, [0, 0, 96, 96])
    assert face.score == 1.0
    assert np.array_equal(face.cropped, cv2.resize(photo, (64, 64), interpolation=cv2.INTER_LINEAR))
    assert np.abs(face.restored.astype(int) - _official(model, face.cropped, 0.0)).max() <= 1
    assert np.array_equal(result.image, face.restored)


def test_a_custom_upsampler_makes_the_background(model):
    """``upsampler=fn``: the background is what ``fn(photo, scale)`` returns (resized to the exact output size when
    it is off by a pixel), not the default Lanczos."""
    import cv2

    photo = _smooth(50, 70, seed=6)
    calls = []

    def upsampler(img, scale):
        calls.append(scale)
        return np.full((int(img.shape[0] * scale), int(img.shape[1] * scale) + 1, 3), 77, np.uint8)

    rt = Runtime(_Identity(), device="cpu", face_size=64, detector=_Fixed([]), upsampler=upsampler)
    out = rt.restore(photo, upscale=2)
    assert calls == [2] and np.array_equal(out, cv2.resize(upsampler(photo, 2), (140, 100),
                                                           interpolation=cv2.INTER_LANCZOS4))


class _Regions:
    """A parser object answering the same region for every face."""

    def __init__(self, value: float):
        self.value = value

    def regions(self, faces: np.ndarray) -> np.ndarray:
        return np.full(faces.shape[:3], self.value, np.float32)


def test_a_parsers_regions_decide_where_restored_faces_are_pasted(model):
    """``parser=obj``: its regions are the paste masks: an empty region leaves the (upscaled) photo as it was, a
    full one pastes the face as the feathered square does at its centre."""
    photo = _smooth(100, 120, seed=7)
    det = _detection(60, 50, 0.2, 0.99)
    background = upscale_lanczos(photo, 1)
    empty = Runtime(model, device="cpu", detector=_Fixed([det]), parser=_Regions(0.0)).restore(photo)
    assert np.array_equal(empty, background)
    full = Runtime(model, device="cpu", detector=_Fixed([det]), parser=_Regions(1.0)).restore(photo)
    assert not np.array_equal(full, background)


# ----------------------------------------------------------------------------------------------- alignment
def _through(points: np.ndarray, scale: float, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return points @ (scale * np.array([[c, s], [-s, c]])) + shift


def test_the_alignment_is_a_similarity_even_for_noisy_landmarks():
    """The official alignment fits rotation, one scale and a shift (no shear, no independent axis scales): with
    landmarks off the template's shape, the affine keeps the form [[a, -b], [b, a]]."""
    rng = np.random.default_rng(8)
    lms = _through(template(512).astype(np.float64), 0.3, 10.0, (90.0, 70.0)) + rng.normal(0, 3, (5, 2))
    a = estimate_affine(lms, 64)
    assert a[0, 0] == pytest.approx(a[1, 1], abs=1e-9) and a[0, 1] == pytest.approx(-a[1, 0], abs=1e-9)


def test_the_least_squares_fallback_maps_the_landmarks_onto_the_template(monkeypatch):
    """When OpenCV's LMEDS gives up (None), the closed-form fallback must still take the landmarks onto the template
    (checked for a rotated face, where a wrong sign of the rotation shows)."""
    import cv2

    monkeypatch.setattr(cv2, "estimateAffinePartial2D", lambda *a, **k: (None, None))
    lms = _through(template(512).astype(np.float64), 0.4, 25.0, (120.0, 40.0))
    a = estimate_affine(lms, 64)
    np.testing.assert_allclose(lms @ a[:, :2].T + a[:, 2], template(64), atol=1e-3)


def test_the_crop_is_a_bilinear_warp():
    """The official crop samples bilinearly: half a pixel's shift gives the mean of each two neighbours (a bicubic
    crop overshoots on a noisy photo), and outside the photo the border colour."""
    img = np.random.default_rng(9).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    crop = warp_face(img, np.array([[1.0, 0, -0.5], [0, 1.0, 0]]), 32).astype(int)
    want = (img[:32, :32].astype(int) + img[:32, 1:33]) / 2
    assert np.abs(crop - want).max() <= 0.5
    assert (warp_face(img, np.array([[1.0, 0, 30.0], [0, 1.0, 0]]), 32)[:, :29] == BORDER_VALUE).all()


# ----------------------------------------------------------------------------------------------- conversions
def test_half_and_double_float_images_convert_as_float32_does():
    """``as_bgr_uint8`` takes float arrays in [0, 1] of any width (a half-precision tensor's ``.numpy()`` included):
    float16 and float64 give the levels float32 gives (127.5 and the ends included)."""
    from vqfr.imaging import as_bgr_uint8

    levels = np.array([0, 1, 17, 128, 200, 254, 255], np.float64)[None, :, None].repeat(3, 2) / 255
    levels[0, 3] = 0.5  # 127.5 rounds to 128
    want = as_bgr_uint8(levels.astype(np.float32))
    for dtype in (np.float16, np.float64):
        assert np.array_equal(as_bgr_uint8(levels.astype(dtype)), want), dtype
