"""Behaviours of the core package that the other test files left unchecked (found by mutation testing): the
checkpoint's ``param_key`` and non-tensor entries, 16-bit scaling, the bytes ``save_image`` writes, exact paste-back
arithmetic, the caller's background left alone, and the runtime's face selection and default fidelity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vqfr
from tests.conftest import TINY_V2, seeded_model
from vqfr.checkpoint import read_state_dict, save_released
from vqfr.faces.align import align_faces
from vqfr.faces.detector import Detection
from vqfr.faces.paste import paste_faces
from vqfr.imaging import as_bgr_uint8, encode_image, save_image, to_images, to_tensor
from vqfr.runtime import Runtime

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------------------------------- checkpoints
def test_read_state_dict_param_key_picks_that_entry_over_params_ema(tmp_path):
    """The official ``param_key_g: params`` loads ``params`` even where the file also holds ``params_ema`` (which
    wins only when no key is asked for)."""
    sd = seeded_model(TINY_V2).state_dict()
    ema = {k: v + 1 for k, v in sd.items()}
    path = save_released(tmp_path / "net.pth", sd, ema)
    picked, _ = read_state_dict(path, "params")
    assert all(torch.equal(picked[k], sd[k]) for k in sd)
    default, _ = read_state_dict(path)
    assert all(torch.equal(default[k], ema[k]) for k in sd)


def test_a_non_tensor_entry_is_a_checkpoint_error_naming_it(tmp_path):
    """A state dict whose entry is a list (weights_only loads it) is refused as such, naming the file and the entry,
    not an AttributeError from deep inside the shape check."""
    sd = dict(seeded_model(TINY_V2).state_dict())
    sd["feat2index.1.bias"] = [0.0] * 32
    path = tmp_path / "odd.pth"
    torch.save({"params": sd}, path)
    with pytest.raises(vqfr.CheckpointError, match=r"odd\.pth.*'feat2index\.1\.bias' is a list, not a tensor"):
        vqfr.load_model(path, TINY_V2)


# ----------------------------------------------------------------------------------------------- imaging
def test_uint16_levels_are_scaled_by_255_over_65535_and_rounded():
    """Every 16-bit level, not only multiples of 257: round(v * 255 / 65535) (a shift by 8 bits, as OpenCV's
    conversion truncates, is up to one level darker)."""
    levels = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    img = np.stack([levels, levels[::-1], levels.T], axis=2)
    expected = np.round(img.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(as_bgr_uint8(img), expected)


def test_save_image_writes_the_bytes_encode_image_gives(tmp_path):
    """``encode_image`` is documented as the bytes ``save_image`` writes (the CLI encodes first, then writes): the
    same JPEG quality by default, and for an explicit one."""
    img = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    for name, kwargs in (("a.jpg", {}), ("b.jpg", {"quality": 60}), ("c.png", {})):
        path = save_image(tmp_path / name, img, **kwargs)
        assert path.read_bytes() == encode_image(path, img, **kwargs), name


# ----------------------------------------------------------------------------------------------- paste-back
def _landmarks(cx: float, cy: float, scale: float, degrees: float) -> np.ndarray:
    from vqfr.faces.align import template

    t = template(512).astype(np.float64) - 256
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return (t @ (scale * np.array([[c, s], [-s, c]]))) + (cx, cy)


@pytest.mark.parametrize("upscale", [1, 2])
def test_an_unchanged_face_on_a_flat_photo_changes_no_pixel(upscale):
    """Blending faces equal to the background gives the background back exactly, at every mask value and where two
    faces meet: the blend is rounded, not truncated (truncation darkens the feathered rims by a level)."""
    for level in (37, 128, 201, 254):
        photo = np.full((150, 170, 3), level, np.uint8)
        lms = [_landmarks(80, 70, 0.15, 12.0), _landmarks(100, 85, 0.12, -20.0)]
        crops, affines = align_faces(photo, lms, 128)
        background = np.full((150 * upscale, 170 * upscale, 3), level, np.uint8)
        out = paste_faces(background, crops, affines, upscale, photo_size=(170, 150))
        assert np.array_equal(out, background), level


@pytest.mark.parametrize("face_size,upscale", [(32, 1), (64, 2), (512, 2)])
def test_unchanged_faces_cut_by_the_photo_corner_or_overlapping_leave_a_flat_photo_as_it_was(face_size, upscale):
    """Where a face's square is cut by the photo's edge (its mask there is not eroded: the face goes on beyond the
    photo) or a neighbour's share reaches past its own mask, the warped-back face must not hold the warp's border
    fill: blending unchanged faces leaves a flat photo exactly as it was. (The warp back filled with black beyond
    the square, 6 levels off at a 512 px face in the photo's corner and up to 34 at 32 px.)"""
    level, (h, w) = 30, (150, 170)
    photo = np.full((h, w, 3), level, np.uint8)
    lms = [_landmarks(160, 10, 0.6, 20.0),  # its square cut by the photo's top-right corner
           _landmarks(80, 70, 0.3, 12.0), _landmarks(100, 85, 0.24, -20.0)]  # two overlapping, cut by the edges
    crops, affines = align_faces(photo, lms, face_size)
    background = np.full((h * upscale, w * upscale, 3), level, np.uint8)
    out = paste_faces(background, crops, affines, upscale, photo_size=(w, h))
    assert np.abs(out.astype(int) - level).max() == 0


def test_the_feathered_mask_ramps_from_the_square_edge_to_one_inside():
    """The default mask fades in over the feather width (about 1/20 of the face's side), so the pasted square
    leaves no hard seam: 0 at the square's edge, 1 well inside, and no jump of more than a third between pixels."""
    from vqfr.faces.paste import feather_mask

    coverage = np.zeros((140, 140), np.float32)
    coverage[20:120, 20:120] = 1
    mask = feather_mask(coverage)
    for line in (mask[70], mask[:, 70]):
        assert line[20] == 0 and line[119] == 0 and line[70] == 1
        assert np.abs(np.diff(line)).max() < 0.34
        assert ((line > 0) & (line < 1)).sum() >= 8  # a ramp on each side, not a step


def test_a_parsed_region_reaching_the_crop_edge_still_fades_out_before_it():
    """As the official demo: the parser's region is blurred and its outer border (10 px at 512) set to 0, so the
    crop's own edge is never pasted even when the region covers the whole crop."""
    from vqfr.faces.paste import parse_mask

    for size in (128, 512):
        soft = parse_mask(np.ones((size, size), np.float32))
        border = round(10 * size / 512)
        for edge in (soft[:border], soft[-border:], soft[:, :border], soft[:, -border:]):
            assert not edge.any()
        assert soft[size // 2, size // 2] > 0.99


@pytest.mark.parametrize("edge", ["top", "bottom", "left", "right"])
@pytest.mark.parametrize("upscale", [1, 2])
def test_a_face_cut_by_any_photo_edge_pastes_no_border_colour_along_it(edge, upscale):
    """Where a face's square leaves the photo, its crop holds the grey border colour (about 133); warped back
    unchanged, the photo's outermost row or column must not blend that grey in, on every side of the photo."""
    from vqfr.faces.align import BORDER_VALUE
    from vqfr.imaging import upscale_lanczos

    h, w = 240, 260
    import cv2

    noise = cv2.GaussianBlur(np.random.default_rng(4).normal(0, 40, (h, w, 3)), (0, 0), 3)
    photo = np.clip(228 + noise, 0, 255).astype(np.uint8)  # bright and smooth: grey blended in would show
    centre = {"top": (130, 60), "bottom": (130, h - 60), "left": (60, 120), "right": (w - 60, 120)}[edge]
    crops, affines = align_faces(photo, [_landmarks(*centre, 0.43, 0.0)], 256)
    assert (crops[0] == np.array(BORDER_VALUE, np.uint8)).all(2).any(), "the test needs a crop leaving the photo"
    background = upscale_lanczos(photo, upscale)
    out = paste_faces(background, crops, affines, upscale, photo_size=(w, h)).astype(int)
    s = upscale
    last = {"top": out[0, 80 * s:180 * s], "bottom": out[-1, 80 * s:180 * s], "left": out[70 * s:170 * s, 0],
            "right": out[70 * s:170 * s, -1]}[edge]
    ref = {"top": background[0, 80 * s:180 * s], "bottom": background[-1, 80 * s:180 * s],
           "left": background[70 * s:170 * s, 0], "right": background[70 * s:170 * s, -1]}[edge]
    diff = last - ref
    assert abs(diff.mean()) <= 1.0 and np.abs(diff).max() <= 12, (diff.mean(), np.abs(diff).max())


# ----------------------------------------------------------------------------------------------- runtime
class _Identity(torch.nn.Module):
    """A restorer that returns its input (taken for a v1 model, any face size)."""

    arch = "VQFRv1"

    def forward(self, x):
        return x.clone()


class _Fixed:
    """A detector that answers the given detections (highest score first)."""

    def __init__(self, dets):
        self.dets = dets

    def detect(self, img):
        return list(self.dets)


def _detection(cx: float, cy: float, scale: float, score: float) -> Detection:
    lms = _landmarks(cx, cy, scale, 0.0).astype(np.float32)
    half = 256 * scale
    return Detection(np.array([cx - half, cy - half, cx + half, cy + half], np.float32), score, lms)


def _photo(h: int = 160, w: int = 200) -> np.ndarray:
    return np.random.default_rng(2).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_faces_with_eyes_closer_than_the_threshold_are_skipped():
    """The official demo skips faces whose eyes are under 5 pixels apart (``eye_dist_threshold``)."""
    big = _detection(60, 70, 0.25, 0.99)  # eyes ~31 px apart
    tiny = _detection(150, 80, 0.03, 0.98)  # eyes ~3.8 px apart
    assert big.eye_distance > 5 > tiny.eye_distance
    rt = Runtime(_Identity(), device="cpu", face_size=64, detector=_Fixed([big, tiny]))
    result = rt.restore_faces(_photo())
    assert len(result.faces) == 1
    assert np.array_equal(result.faces[0].landmarks, big.landmarks)
    rt = Runtime(_Identity(), device="cpu", face_size=64, detector=_Fixed([big, tiny]), eye_dist_threshold=2.0)
    assert len(rt.restore_faces(_photo()).faces) == 2


def test_only_center_face_keeps_the_face_nearest_the_centre():
    photo = _photo()
    off = _detection(45, 40, 0.2, 0.99)  # highest score, near a corner
    centre = _detection(102, 83, 0.2, 0.9)
    far = _detection(170, 130, 0.2, 0.8)
    rt = Runtime(_Identity(), device="cpu", face_size=64, detector=_Fixed([off, centre, far]))
    faces = rt.restore_faces(photo, only_center_face=True).faces
    assert len(faces) == 1 and np.array_equal(faces[0].landmarks, centre.landmarks)
    assert len(rt.restore_faces(photo).faces) == 3


def test_the_runtime_default_fidelity_is_used_when_a_call_gives_none():
    model = seeded_model(TINY_V2, seed=1)
    face = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        want = {f: to_images(model(to_tensor(face), fidelity=f))[0] for f in (0.0, 0.7)}
    assert not np.array_equal(want[0.0], want[0.7])
    rt = Runtime(model, device="cpu", fidelity=0.7)
    assert np.array_equal(rt.restore(face, aligned=True), want[0.7])
    assert np.array_equal(rt.restore(face, aligned=True, fidelity=0.0), want[0.0])  # a call's own wins


# ----------------------------------------------------------------------------------------------- CLI
def test_skip_existing_resumes_by_the_restored_photo_written_last(tmp_path, capsys):
    """``--skip-existing`` takes an input as done when its restored photo, the last output written, exists: a photo
    without faces (no face files at all) is skipped on the next run, and one whose face crops alone were written
    before an interruption is restored again."""
    import cv2

    from vqfr.cli import EXIT_OK, main

    weights = vqfr.save_safetensors(seeded_model(TINY_V2, seed=3), tmp_path / "tiny_v2.safetensors")
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    ramp = np.linspace(60, 190, 96 * 80).reshape(80, 96).astype(np.uint8)
    for name in ("plain.png", "cut.png"):
        cv2.imwrite(str(inputs / name), np.stack([ramp] * 3, 2))
    (out / "cropped_faces").mkdir(parents=True)
    cv2.imwrite(str(out / "cropped_faces" / "cut_00.png"), np.zeros((64, 64, 3), np.uint8))  # left by a cut run
    args = ["-i", str(inputs), "-o", str(out), "--weights", str(weights), "-s", "1", "-q", "--skip-existing"]
    assert main(args) == EXIT_OK
    assert "vqfr: 2 images, 0 faces restored, 0 failed, 2 without faces" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "restored_imgs").iterdir()) == ["cut.png", "plain.png"]
    assert main(args) == EXIT_OK
    assert "vqfr: 0 images, 0 faces restored, 0 failed, 2 skipped (existing)" in capsys.readouterr().out


@pytest.mark.parametrize("upscale", [2, 1.5])
def test_a_photo_without_faces_comes_back_upscaled_as_the_official_demo_does(upscale):
    """The official demo resizes the background with Lanczos-4 when it has no Real-ESRGAN: with no face found the
    result is exactly that resize."""
    import cv2

    photo = _photo(61, 83)
    rt = Runtime(_Identity(), device="cpu", face_size=64, detector=_Fixed([]))
    size = (int(83 * upscale), int(61 * upscale))
    assert np.array_equal(rt.restore(photo, upscale=upscale),
                          cv2.resize(photo, size, interpolation=cv2.INTER_LANCZOS4))


def test_an_aligned_input_reports_the_transform_to_its_crop():
    """For an aligned input of another size, the face's ``affine`` takes input pixels to the crop (as for detected
    faces): its landmarks land exactly on the template at the face size (scaling the template by the sizes was
    (scale-1)/2 px off), and warping the input with it gives the crop."""
    import cv2

    from vqfr.faces.align import template, warp_face

    rng = np.random.default_rng(5)
    photo = np.clip(cv2.GaussianBlur(rng.normal(128, 70, (96, 96, 3)), (0, 0), 4), 0, 255).astype(np.uint8)
    face = Runtime(_Identity(), device="cpu", face_size=64).restore_faces(photo, aligned=True).faces[0]
    mapped = np.c_[face.landmarks, np.ones(5)] @ face.affine.T
    np.testing.assert_allclose(mapped, template(64), atol=1e-4)  # the landmarks are the affine's, not a second scale
    # the crop is cv2.resize's: the affine is its exact transform (a pure scale was 1/6 px off: 0.28 levels)
    assert np.abs(warp_face(photo, face.affine, 64).astype(int) - face.cropped).mean() < 0.15
