"""Face geometry and detection: FFHQ alignment, paste-back round trip, the embedded MTCNN on real and degraded faces
and on face-free images, detector and parser loading."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import FACES, needs_faces
from vqfr.errors import ConfigError
from vqfr.faces.align import BORDER_VALUE, FFHQ_TEMPLATE_512, align_faces, estimate_affine, template, warp_face
from vqfr.faces.detector import Detection, load_detector, nms, square_boxes
from vqfr.faces.mtcnn import MTCNN
from vqfr.faces.paste import inverse_affine, paste_faces
from vqfr.imaging import upscale_lanczos


@pytest.fixture(scope="module")
def mtcnn():
    return MTCNN()


def _psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    err = ((a.astype(np.float64) - b.astype(np.float64)) ** 2)[mask].mean()
    return 10 * math.log10(255.0 ** 2 / max(err, 1e-12))


def _similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * math.cos(math.radians(degrees)), scale * math.sin(math.radians(degrees))
    return np.array([[c, -s, tx], [s, c, ty]])


def _smooth_photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photo-like image: low-pass noise at two scales, no face."""
    rng = np.random.default_rng(seed)
    coarse = cv2.GaussianBlur(rng.normal(128, 60, (h, w, 3)), (0, 0), 6)
    fine = cv2.GaussianBlur(rng.normal(0, 25, (h, w, 3)), (0, 0), 1.5)
    return np.clip(coarse + fine, 0, 255).astype(np.uint8)


def _sample_faces() -> list[np.ndarray]:
    return [cv2.imread(str(p)) for p in sorted((FACES / "aligned").glob("*.png"))]


def _on_canvas(face: np.ndarray, side: int, fill: int = 110) -> tuple[np.ndarray, tuple[int, int]]:
    canvas = np.full((side, side, 3), fill, np.uint8)
    off = (side - face.shape[0]) // 2
    canvas[off:off + face.shape[0], off:off + face.shape[1]] = face
    return canvas, (off, off)


# ----------------------------------------------------------------------------------------------- alignment
def test_template_is_the_official_one():
    assert FFHQ_TEMPLATE_512[0].tolist() == pytest.approx([192.98138, 239.94708])
    assert FFHQ_TEMPLATE_512[4].tolist() == pytest.approx([313.08905, 371.15118])
    np.testing.assert_allclose(template(256), FFHQ_TEMPLATE_512 / 2, rtol=1e-6)
    assert BORDER_VALUE == (135, 133, 132)


def test_estimate_affine_recovers_a_similarity():
    # landmarks = the template seen through a known similarity; the fitted transform must undo it
    forward = _similarity(0.4, 17.0, 80.0, 30.0)
    lms = FFHQ_TEMPLATE_512 @ forward[:, :2].T + forward[:, 2]
    affine = estimate_affine(lms, 512)
    mapped = lms @ affine[:, :2].T + affine[:, 2]
    np.testing.assert_allclose(mapped, FFHQ_TEMPLATE_512, atol=1e-2)
    scale = math.sqrt(abs(np.linalg.det(affine[:, :2])))
    assert scale == pytest.approx(1 / 0.4, rel=1e-4)


def test_collinear_landmarks_still_align():
    lms = np.stack([np.linspace(10, 50, 5), np.linspace(10, 50, 5)], 1)
    assert np.isfinite(estimate_affine(lms, 64)).all()


def test_crop_border_is_the_official_colour():
    img = np.zeros((100, 100, 3), np.uint8)
    crop = warp_face(img, np.array([[1.0, 0, -200], [0, 1.0, -200]]), 32)
    assert (crop == np.array(BORDER_VALUE, np.uint8)).all()


@pytest.mark.parametrize("degrees", [0.0, 12.0])
def test_align_paste_round_trip_keeps_the_photo(degrees):
    photo = _smooth_photo(360, 420)
    forward = _similarity(0.45, degrees, 100.0, 60.0)
    lms = FFHQ_TEMPLATE_512 @ forward[:, :2].T + forward[:, 2]
    crops, affines = align_faces(photo, [lms], 512)
    out = paste_faces(photo, crops, affines, upscale=1)
    face_region = np.zeros(photo.shape[:2], bool)
    x0, y0 = np.floor(lms.min(0) - 40).astype(int)
    x1, y1 = np.ceil(lms.max(0) + 40).astype(int)
    face_region[y0:y1, x0:x1] = True
    assert _psnr(out, photo, face_region) >= 40
    far = np.ones(photo.shape[:2], bool)
    corners = np.array([[0, 0], [512, 0], [0, 512], [512, 512]], np.float64)
    inv = inverse_affine(affines[0])
    pts = corners @ inv[:, :2].T + inv[:, 2]
    far[int(pts[:, 1].min()) - 2:int(pts[:, 1].max()) + 3, int(pts[:, 0].min()) - 2:int(pts[:, 0].max()) + 3] = False
    assert np.array_equal(out[far], photo[far]), "pixels outside the pasted square must not change"


def test_paste_is_consistent_with_the_upscaled_background():
    photo = _smooth_photo(240, 260, seed=1)
    forward = _similarity(0.3, -8.0, 60.0, 40.0)
    lms = FFHQ_TEMPLATE_512 @ forward[:, :2].T + forward[:, 2]
    crops, affines = align_faces(photo, [lms], 512)
    background = upscale_lanczos(photo, 2)
    out = paste_faces(background, crops, affines, upscale=2)
    region = np.zeros(background.shape[:2], bool)
    x0, y0 = np.floor(2 * lms.min(0) - 60).astype(int)
    x1, y1 = np.ceil(2 * lms.max(0) + 60).astype(int)
    region[y0:y1, x0:x1] = True
    # the crop is pasted where the upscaled photo has the same content: no half-pixel shift
    assert _psnr(out, background, region) >= 38


@pytest.mark.parametrize(("height", "width", "upscale"), [(257, 263, 1.5), (333, 333, 3.3)])
def test_paste_matches_a_background_upscaled_by_a_non_integer_factor(height, width, upscale):
    # 333 px at 3.3x is 1098 px (1098.9): the background is scaled 3.297x, and a paste at 3.3x drifted by up to one
    # output pixel towards the far corner, where the face is
    rng = np.random.default_rng(2)
    photo = np.clip(cv2.GaussianBlur(rng.normal(128, 60, (height, width, 3)), (0, 0), 1.2), 0, 255).astype(np.uint8)
    forward = _similarity(0.25, 10.0, width - 140.0, height - 140.0)
    lms = FFHQ_TEMPLATE_512 @ forward[:, :2].T + forward[:, 2]
    crops, affines = align_faces(photo, [lms], 512)
    background = upscale_lanczos(photo, upscale)
    out = paste_faces(background, crops, affines, upscale=upscale)
    region = np.zeros(background.shape[:2], bool)
    x0, y0 = np.floor(upscale * (lms.min(0) - 10)).astype(int)
    x1, y1 = np.ceil(upscale * (lms.max(0) + 10)).astype(int)
    region[y0:y1, x0:x1] = True
    assert _psnr(out, background, region) >= 44  # 38.6 and 39.6 dB with the nominal scale


@pytest.mark.parametrize(("width", "height", "upscale"), [(333, 327, 0.75), (301, 299, 0.5)])
def test_downscaled_paste_lands_where_the_exact_scale_puts_it(width, height, upscale):
    # 333 px at 0.75x is 249 px (249.75): the exact scale is 249/333. Downscaling, the background's size alone does
    # not tell the photo's (332 and 333 px both give 249), so the nominal scale put the face up to 0.55 px off.
    size = (int(width * upscale), int(height * upscale))
    background = np.full((size[1], size[0], 3), 100, np.uint8)
    s = 512 / 200  # a 200 px face towards the far corner, where the error of the scale adds up
    affine = np.array([[s, 0, -s * (width - 215.0)], [0, s, -s * (height - 212.0)]])
    marker = np.array([370.0, 360.0])  # a Gaussian blob on a flat crop of the background's colour
    yy, xx = np.mgrid[:512, :512].astype(np.float64)
    blob = 100 + 150 * np.exp(-((xx - marker[0]) ** 2 + (yy - marker[1]) ** 2) / (2 * 12.0 ** 2))
    face = np.repeat(np.rint(blob).astype(np.uint8)[:, :, None], 3, axis=2)
    out = paste_faces(background, face[None], affine[None], upscale, photo_size=(width, height))
    weight = np.clip(out[..., 0].astype(np.float64) - 100, 0, None)
    ys, xs = np.mgrid[:size[1], :size[0]]
    centroid = np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
    exact = inverse_affine(affine, (size[0] / width, size[1] / height)) @ np.array([*marker, 1.0])
    assert np.abs(centroid - exact).max() < 0.1, (centroid, exact)  # 0.02-0.06 px of resampling; nominal: 0.2-0.55


@pytest.mark.parametrize("degrees", [0.0, 30.0])
def test_small_face_paste_leaves_no_dark_rim(degrees):
    # an unchanged crop of a flat photo pastes back unchanged: the mask must stay inside the warped square, whose
    # outside is black (a 2x2 erosion kept the right and bottom rim, which came out 47 levels too dark)
    photo = np.full((120, 120, 3), 200, np.uint8)
    forward = _similarity(0.05, degrees, 40.0, 40.0)  # a 26 px face
    crops, affines = align_faces(photo, [FFHQ_TEMPLATE_512 @ forward[:, :2].T + forward[:, 2]], 512)
    out = paste_faces(photo, crops, affines, upscale=1)
    assert np.abs(out.astype(int) - photo).max() <= 8  # bicubic ringing of the crop's own edge, no more


def _textured_photo(h: int, w: int, base: float = 128.0, seed: int = 0) -> np.ndarray:
    """A photo with detail up to the pixel scale: smooth colour, a halftone-like screen at 0.3 cycles/px, grain."""
    rng = np.random.default_rng(seed)
    coarse = cv2.GaussianBlur(rng.normal(base, 40, (h, w, 3)), (0, 0), 6)
    yy, xx = np.mgrid[0:h, 0:w]
    screen = 25 * np.sin(2 * np.pi * 0.3 * xx + 1.0) * np.sin(2 * np.pi * 0.3 * yy)
    grain = cv2.GaussianBlur(rng.normal(0, 20, (h, w, 3)), (0, 0), 0.7)
    return np.clip(coarse + screen[:, :, None] + grain, 0, 255).astype(np.uint8)


def _square_from(centre: tuple[float, float], side: float, degrees: float) -> np.ndarray:
    """Landmarks of a face whose aligned square has ``side`` photo pixels, centred at ``centre``, rotated."""
    forward = _similarity(side / 512, degrees, 0.0, 0.0)
    forward[:, 2] = np.asarray(centre) - forward[:, :2] @ [256.0, 256.0]
    return FFHQ_TEMPLATE_512 @ forward[:, :2].T + forward[:, 2]


@pytest.mark.parametrize("side", [265.0, 300.0])
def test_unchanged_shrunk_crop_pastes_back_at_least_as_well_as_the_official_bilinear_warp(side):
    """A face whose 512 crop covers 265-300 photo pixels (shrink 1.7-1.9 on the way back, as the sample photo's
    child) must paste back, unchanged, no blurrier than the official bilinear warp. An area resize followed by a
    second, bicubic resampling lost 4-5 dB against it (29.0 vs 33.5 dB here; 26.1 vs 30.8 dB on the sample photo's
    child). (Shrunk more, the anti-aliasing costs unchanged content more than the official's unfiltered warp: 31.3
    vs 35.6 dB at 2.6x; test_detail_finer_than_the_output_pixels_does_not_alias is what it buys.)"""
    photo = _textured_photo(300, 320)
    lms = _square_from((160.0, 150.0), side, 15.0)
    crops, affines = align_faces(photo, [lms], 512)
    out = paste_faces(photo, crops, affines, upscale=1)
    official = cv2.warpAffine(crops[0], inverse_affine(affines[0]), (320, 300), flags=cv2.INTER_LINEAR)
    region = np.zeros(photo.shape[:2], bool)
    x0, y0 = np.floor(lms.min(0) - 25).astype(int)
    x1, y1 = np.ceil(lms.max(0) + 25).astype(int)
    region[y0:y1, x0:x1] = True
    assert _psnr(out, photo, region) >= _psnr(official, photo, region) - 0.2


@pytest.mark.parametrize("shrink", [3.0, 10.0])
def test_detail_finer_than_the_output_pixels_does_not_alias(shrink):
    """Restored detail at the crop's pixel scale, shrunk 3x and 10x on the way back, comes out close to an 8x
    supersampled rendering (box-filtered): unfiltered, it aliases (bicubic 24.5 and 23.3 dB; bilinear, as facexlib,
    27.2 and 25.4 dB)."""
    rng = np.random.default_rng(5)
    face = np.clip(_smooth_photo(512, 512, seed=4).astype(np.float64) + rng.normal(0, 20, (512, 512, 3)), 0,
                   255).astype(np.uint8)
    side = int(512 / shrink * 1.3 + 40)
    affine = _similarity(1 / shrink, 10.0, 20.3, 10.7)  # crop -> photo
    out = paste_faces(np.zeros((side, side, 3), np.uint8), face[None], cv2.invertAffineTransform(affine)[None],
                      upscale=1)
    fine = affine.copy()
    fine[:, :2] *= 8
    fine[:, 2] = 8 * affine[:, 2] + 3.5  # pixel centres of the 8x grid
    ref = cv2.resize(cv2.warpAffine(face, fine, (8 * side, 8 * side), flags=cv2.INTER_CUBIC), (side, side),
                     interpolation=cv2.INTER_AREA)
    inside = cv2.erode(cv2.warpAffine(np.ones((512, 512), np.float32), affine, (side, side)),
                       np.ones((3 * int(side / 40) + 7,) * 2, np.uint8)) > 0.99  # where the feathered mask is 1
    assert _psnr(out, ref, inside) >= 38.5  # 40.1 and 43.9 dB; area resize + bicubic: 35.1 dB at 3x


@pytest.mark.parametrize("upscale", [1, 2])
def test_face_cut_by_the_photo_edge_pastes_no_border_colour_into_it(upscale):
    """The crop of a face cut by the photo's top edge holds the border colour (135, 133, 132) above the photo.
    Warped back, the photo's edge pixels must not blend it in: the official warp (and ours before) drew a grey line
    along the edge (on the sample photo's adult face at 2x: 8 levels off on average, 30 at most)."""
    photo = np.clip(_smooth_photo(240, 260, seed=3).astype(int) + 100, 0, 255).astype(np.uint8)  # bright, ~228
    lms = _square_from((130.0, 60.0), 220.0, 8.0)  # the square reaches 50 px above the top edge
    crops, affines = align_faces(photo, [lms], 512)
    assert (crops[0][:20] == np.array(BORDER_VALUE, np.uint8)).all(), "the test needs a crop leaving the photo"
    background = upscale_lanczos(photo, upscale)
    out = paste_faces(background, crops, affines, upscale=upscale)
    diff = out.astype(int)[:, 60 * upscale:200 * upscale] - background[:, 60 * upscale:200 * upscale]
    for row in range(2 * upscale):
        assert abs(diff[row].mean()) <= 1.0 and np.abs(diff[row]).max() <= 12, (row, diff[row].mean())


def test_parsed_region_reaches_the_photo_edge_where_the_face_does():
    """A parser labels the crop's border colour as background; the region mask must still reach the photo's edge
    where the face is cut by it (else the unrestored face shows along the edge)."""
    photo = np.full((240, 260, 3), 60, np.uint8)
    lms = _square_from((130.0, 60.0), 220.0, 0.0)
    crops, affines = align_faces(photo, [lms], 512)
    outside = (crops[0] == np.array(BORDER_VALUE, np.uint8)).all(2)
    region = (~outside).astype(np.float32)[None]  # everything of the photo is face
    white = np.full_like(crops, 255)
    out = paste_faces(photo, white, affines, 1, regions=region)
    assert out[0, 100:160].min() >= 250, out[0, 100:160, 0]
    assert out[20, 100:160].min() >= 250


@pytest.mark.parametrize("parsed", [False, True])
def test_overlapping_faces_each_keep_their_own_face_whatever_the_order(parsed):
    """Two people side by side: each aligned square reaches over the other's face. Pasted one after the other, the
    second square (feathered square or parser region alike) covered the first face with its crop's view of it; each
    face's pixels must come from its own crop, and the result must not depend on the order."""
    photo = _smooth_photo(300, 420, seed=5)
    lms = [_square_from((150.0, 150.0), 260.0, -5.0), _square_from((280.0, 160.0), 230.0, 10.0)]
    crops, affines = align_faces(photo, lms, 512)
    colours = np.array([[40, 90, 220], [210, 160, 30]], np.uint8)
    restored = np.broadcast_to(colours[:, None, None], crops.shape).copy()
    regions = np.ones(crops.shape[:3], np.float32) if parsed else None
    out = paste_faces(photo, restored, affines, 1, regions=regions)
    flipped = paste_faces(photo, restored[::-1], affines[::-1], 1, regions=None if regions is None else regions[::-1])
    assert np.abs(out.astype(int) - flipped).max() <= 1
    for face, colour in zip(lms, colours, strict=True):
        eyes_to_mouth = face.astype(int)  # every landmark, and the face between them, is that face's colour
        x0, y0 = eyes_to_mouth.min(0)
        x1, y1 = eyes_to_mouth.max(0)
        assert np.abs(out[y0:y1 + 1, x0:x1 + 1].astype(int) - colour).max() <= 1, colour


def test_overlapping_faces_meet_in_a_soft_seam_midway():
    """Between two equal faces the seam lies midway between their centres and is a blend, not a cut."""
    photo = np.full((200, 400, 3), 128, np.uint8)
    lms = [_square_from((140.0, 100.0), 200.0, 0.0), _square_from((260.0, 100.0), 200.0, 0.0)]
    crops, affines = align_faces(photo, lms, 512)
    restored = np.zeros_like(crops)
    restored[1] = 200
    row = paste_faces(photo, restored, affines, 1)[100, :, 0].astype(int)
    assert row[150] <= 2 and row[250] >= 198, (row[150], row[250])
    assert 60 <= row[200] <= 140, row[200]  # half-way: a blend of both
    assert (np.diff(row[160:241]) >= 0).all(), row[160:241]  # one smooth rise from face 0 to face 1


def test_paste_without_faces_returns_a_copy():
    bg = _smooth_photo(50, 60)
    out = paste_faces(bg, np.zeros((0, 64, 64, 3), np.uint8), np.zeros((0, 2, 3)), 1)
    assert np.array_equal(out, bg) and out is not bg


@needs_faces
@pytest.mark.shared
def test_round_trip_on_the_sample_photo(mtcnn):
    photo = cv2.imread(str(FACES / "whole" / "Blake_Lively.jpg"))
    dets = mtcnn.detect(photo)
    best = dets[0]
    crops, affines = align_faces(photo, [best.landmarks], 512)
    out = paste_faces(photo, crops, affines, 1)
    region = np.zeros(photo.shape[:2], bool)
    x0, y0, x1, y1 = best.box.astype(int)
    region[y0:y1, x0:x1] = True
    assert _psnr(out, photo, region) >= 40


def _shift(a: np.ndarray, b: np.ndarray, sigma: float) -> np.ndarray:
    """(dx, dy) by which BGR image ``b`` is ``a`` moved, to first order, both low-passed (one Lucas-Kanade step;
    cv2.phaseCorrelate reads half a pixel on some sizes)."""
    a, b = (cv2.GaussianBlur(cv2.cvtColor(x, cv2.COLOR_BGR2GRAY).astype(np.float64), (0, 0), sigma)[8:-8, 8:-8]
            for x in (a, b))
    gy, gx = np.gradient(a)
    return np.linalg.lstsq(np.stack([gx.ravel(), gy.ravel()], 1), (a - b).ravel(), rcond=None)[0]


class _Identity(torch.nn.Module):
    """A restorer that returns its input: the runtime takes it for a v1 model at 512 (``arch``)."""

    arch = "VQFRv1"

    def forward(self, x):
        return x.clone()


@needs_faces
@pytest.mark.shared
@pytest.mark.parametrize("upscale", [1, 2])
def test_runtime_with_an_identity_model_gives_the_sample_photo_back(upscale):
    """The whole pipeline (read, detect, align, to_tensor, model, to_images, paste) with a model that changes
    nothing: colours survive, each face comes back in place (no sub-pixel shift), nothing outside the pasted squares
    changes, and the photo's top edge, which cuts the adult's square, gets no border colour. Measured: faces 46.8
    and 31.1 dB at 1x (the child's halftone print was 26.1 dB with an area resize before the bicubic warp), top row
    0.2 levels off on average (2.4; 8.5 at 2x)."""
    from vqfr.runtime import Runtime

    path = FACES / "whole" / "Blake_Lively.jpg"
    photo = cv2.imread(str(path))
    with Runtime(_Identity(), device="cpu") as rt:
        result = rt.restore_faces(path, upscale=upscale)
    background = upscale_lanczos(photo, upscale)
    assert len(result.faces) == 2 and result.image.shape == background.shape
    untouched = np.ones(background.shape[:2], bool)
    for face in result.faces:
        assert np.array_equal(face.restored, face.cropped)
        x0, y0, x1, y1 = np.clip(face.box * upscale, 0, None).astype(int)
        region = np.zeros(background.shape[:2], bool)
        region[y0:y1, x0:x1] = True
        assert _psnr(result.image, background, region) >= 30, face.box
        dx, dy = _shift(background[y0:y1, x0:x1], result.image[y0:y1, x0:x1], sigma=upscale)
        assert abs(dx) < 0.05 and abs(dy) < 0.05, (face.box, dx, dy)  # measured: below 0.002
        corners = np.array([[0, 0, 1], [512, 0, 1], [0, 512, 1], [512, 512, 1]], np.float64) @ inverse_affine(
            face.affine, background.shape[1] / photo.shape[1]).T
        lo, hi = np.floor(corners.min(0)).astype(int) - 3, np.ceil(corners.max(0)).astype(int) + 3
        untouched[max(lo[1], 0):hi[1], max(lo[0], 0):hi[0]] = False
    assert np.array_equal(result.image[untouched], background[untouched])
    assert np.abs(result.image[0].astype(int) - background[0]).mean() <= 1.0


# ----------------------------------------------------------------------------------------------- detection
def test_nms_and_squares():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 4, 4]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 0, 2]
    assert nms(boxes, scores, 0.5, mode="min").tolist() == [3, 2]
    sq = square_boxes(np.array([[0, 0, 10, 4]], np.float32))
    np.testing.assert_allclose(sq, [[0, -3, 10, 7]])


@needs_faces
@pytest.mark.shared
def test_finds_both_faces_in_the_sample_photo(mtcnn):
    # The sample photo holds two faces: a child (left) and an adult (right).
    photo = cv2.imread(str(FACES / "whole" / "Blake_Lively.jpg"))
    dets = mtcnn.detect(photo)
    assert len(dets) == 2
    centres = sorted(float((d.box[0] + d.box[2]) / 2) for d in dets)
    assert centres[0] < 350 < centres[1]
    for d in dets:
        le, re, nose, lm, rm = d.landmarks
        assert le[0] < nose[0] < re[0] and lm[0] < rm[0]
        assert max(le[1], re[1]) < nose[1] < min(lm[1], rm[1])
        assert d.box[0] <= nose[0] <= d.box[2] and d.box[1] <= nose[1] <= d.box[3]


def _degradations(canvas: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
    def jpeg(img, q):
        return cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1], cv2.IMREAD_COLOR)

    side = canvas.shape[0]
    down = cv2.resize(canvas, (side // 4, side // 4), interpolation=cv2.INTER_AREA)
    return {
        "clean": (canvas, 1.0),
        "down4": (down, 0.25),
        "blur": (cv2.GaussianBlur(canvas, (0, 0), 5), 1.0),
        "jpeg20": (jpeg(canvas, 20), 1.0),
        "down4+blur+jpeg30": (jpeg(cv2.GaussianBlur(down, (0, 0), 1.5), 30), 0.25),
    }


@needs_faces
@pytest.mark.shared
def test_finds_aligned_faces_on_a_canvas_even_degraded(mtcnn):
    """Each FFHQ-aligned sample (at 256 px on a 384 px canvas), clean and degraded, is found exactly once, and the
    alignment from its landmarks is close to the sample's own (official RetinaFace) alignment: scale within 15%,
    rotation within 6 degrees, centre within 4% of the face size."""
    faces = _sample_faces()
    assert faces
    for i, face in enumerate(faces):
        canvas, (ox, oy) = _on_canvas(cv2.resize(face, (256, 256), interpolation=cv2.INTER_AREA), 384)
        for name, (img, scale) in _degradations(canvas).items():
            dets = mtcnn.detect(img)
            assert len(dets) == 1, (i, name, [d.score for d in dets])
            lms = (dets[0].landmarks / scale - np.array([ox, oy])) * 2  # back to the 512 frame
            affine = estimate_affine(lms, 512)  # identity for a perfect detection
            zoom = math.sqrt(abs(np.linalg.det(affine[:, :2])))
            angle = math.degrees(math.atan2(affine[1, 0], affine[0, 0]))
            shift = np.linalg.norm(affine[:, :2] @ [256, 256] + affine[:, 2] - 256)
            assert abs(zoom - 1) < 0.15 and abs(angle) < 6 and shift < 0.04 * 512, (i, name, zoom, angle, shift)


@needs_faces
@pytest.mark.shared
def test_group_of_faces_gives_one_detection_each(mtcnn):
    faces = _sample_faces()
    group = np.full((620, 260 * len(faces) + 40, 3), 150, np.uint8)
    for i, face in enumerate(faces):
        side = (200, 160, 240, 130, 180)[i % 5]
        y = 40 + (i % 2) * 300
        group[y:y + side, 30 + i * 260:30 + i * 260 + side] = cv2.resize(face, (side, side),
                                                                          interpolation=cv2.INTER_AREA)
    assert len(mtcnn.detect(group)) == len(faces)


def _face_free() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    h, w = 360, 480
    yy, xx = np.mgrid[0:h, 0:w]
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    blobs = np.full((h, w, 3), 200, np.uint8)
    for _ in range(60):
        centre = tuple(int(v) for v in rng.integers(0, w, 2))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        cv2.circle(blobs, centre, int(rng.integers(5, 40)), colour, -1)
    return {
        "noise": noise,
        "smooth noise": cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 8), None, 0, 255, cv2.NORM_MINMAX),
        "gradient": np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], 2).astype(np.uint8),
        "checker": np.repeat((((xx // 24 + yy // 24) % 2) * 255).astype(np.uint8)[..., None], 3, 2),
        "sines": np.repeat(((np.sin(xx / 7.0) * np.cos(yy / 11.0) * 0.5 + 0.5) * 255).astype(np.uint8)[..., None],
                           3, 2),
        "blobs": blobs,
        "photo-like": _smooth_photo(h, w, seed=3),
        "flat": np.full((h, w, 3), 128, np.uint8),
    }


def test_no_faces_in_face_free_images(mtcnn):
    for name, img in _face_free().items():
        assert mtcnn.detect(img) == [], name


def test_tiny_and_odd_images_do_not_crash(mtcnn):
    for shape in [(1, 1, 3), (11, 11, 3), (12, 300, 3), (300, 13, 3)]:
        assert mtcnn.detect(np.zeros(shape, np.uint8)) == []


# ----------------------------------------------------------------------------------------------- loading
def test_load_detector_by_name_path_and_object(tmp_path):
    assert isinstance(load_detector(None), MTCNN) and isinstance(load_detector("mtcnn"), MTCNN)

    class Fixed:
        def detect(self, img):
            return [Detection(np.array([0, 0, 4, 4], np.float32), 1.0, np.zeros((5, 2), np.float32))]

    fixed = Fixed()
    assert load_detector(fixed) is fixed
    with pytest.raises(ConfigError, match="neither a detector name nor an existing weights file"):
        load_detector(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    torch.save({"conv.weight": torch.zeros(1)}, junk)
    with pytest.raises(ConfigError, match="holds weights of no detector known here"):
        load_detector(junk)
    with pytest.raises(ConfigError, match="needs its weights file"):
        load_detector("retinaface")


def test_load_detector_caps_the_pixels_mtcnn_sees(tmp_path):
    """``max_pixels`` (``Runtime(detector_max_pixels=)``) is the largest image a detector's network sees: MTCNN's
    first pyramid level. A detector object was built by the caller, who sets it there: refused, not ignored."""
    from vqfr.runtime import Runtime

    assert load_detector("mtcnn").max_level_pixels == 4_000_000
    assert load_detector(None, max_pixels=1_000_000).max_level_pixels == 1_000_000
    assert load_detector("mtcnn", max_pixels=1_000_000).max_level_pixels == 1_000_000

    class Fixed:
        def detect(self, img):
            return []

    with pytest.raises(ConfigError, match=r"max_pixels=1000000 .*detector object.*Fix: set the limit on the"):
        load_detector(Fixed(), max_pixels=1_000_000)
    assert Runtime(_Identity(), device="cpu", detector=Fixed(), detector_max_pixels=None).detector is not None
    with pytest.raises(ConfigError, match=r"detector_max_pixels=1000000 cannot be applied to a detector object"):
        Runtime(_Identity(), device="cpu", detector=Fixed(), detector_max_pixels=1_000_000)


def test_detector_and_parser_paths_starting_with_a_tilde_are_in_the_home_folder(tmp_path, monkeypatch):
    """``--detector=mtcnn:~/m.safetensors`` and ``--parser=~/p.pt`` reach vqfr unexpanded (the shell expands ~ only
    at the start of a word): they name files in the home folder, as ``--weights=~/...`` does."""
    import shutil

    from vqfr.faces.mtcnn import default_weights
    from vqfr.faces.parsing import load_parser

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(default_weights(), tmp_path / "m.safetensors")
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 19, 1)), str(tmp_path / "p.pt"))
    for spec in ("mtcnn:~/m.safetensors", "~/m.safetensors"):
        assert isinstance(load_detector(spec), MTCNN), spec
    assert load_parser("~/p.pt").regions(np.zeros((1, 64, 64, 3), np.uint8)).shape == (1, 64, 64)


def test_parser_by_path(tmp_path):
    from vqfr.faces.parsing import FACE_CLASSES, load_parser

    with pytest.raises(ConfigError, match="parsing network file not found"):
        load_parser(tmp_path / "parsenet.pt")

    class CentreSkin(torch.nn.Module):
        """Class 1 (skin) in the centre quarter, 0 (background) elsewhere."""

        def forward(self, x):
            logits = torch.zeros(x.shape[0], 19, x.shape[2], x.shape[3])
            logits[:, 0] = 1.0
            h, w = x.shape[2] // 4, x.shape[3] // 4
            logits[:, 1, h:3 * h, w:3 * w] = 2.0
            return logits

    path = tmp_path / "parser.pt"
    torch.jit.save(torch.jit.script(CentreSkin()), str(path))
    parser = load_parser(path)
    masks = parser.regions(np.zeros((2, 64, 64, 3), np.uint8))
    assert masks.shape == (2, 64, 64) and 1 in FACE_CLASSES
    assert masks[0, 32, 32] == 1.0 and masks[0, 2, 2] == 0.0
    photo = _smooth_photo(200, 200)
    forward = _similarity(0.2, 0.0, 50.0, 50.0)
    crops, affines = align_faces(photo, [FFHQ_TEMPLATE_512 @ forward[:, :2].T + forward[:, 2]], 64)
    white = np.full_like(crops, 255)
    out = paste_faces(photo, white, affines, 1, regions=parser.regions(white))
    assert out[int(50 + 0.2 * 256), int(50 + 0.2 * 256)].min() > 200  # centre pasted
    assert np.array_equal(out[52, 52], photo[52, 52])  # background class kept


class RedSkin(torch.nn.Module):
    """A stand-in face-parsing network: class 1 (skin) where the red channel is bright, 0 (background) elsewhere;
    19 classes."""

    def forward(self, x):
        red = x[:, :1]
        return torch.cat([-red, red, -red.repeat(1, 17, 1, 1)], 1)


@pytest.mark.parametrize("batch", [1, 2])
def test_onnx_parser_exported_with_a_fixed_batch_size(tmp_path, batch):
    # torch.onnx.export without dynamic axes fixes the batch: a photo with 3 faces must still be parsed, in order
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from vqfr.faces.parsing import load_parser

    path = tmp_path / "parser.onnx"
    torch.onnx.export(RedSkin(), (torch.zeros(batch, 3, 512, 512),), str(path), dynamo=False)
    faces = np.zeros((3, 32, 32, 3), np.uint8)
    faces[1, :, :, 2] = 255  # the middle face is red (BGR)
    masks = load_parser(path).regions(faces)
    assert masks.shape == (3, 32, 32)
    assert masks[1].min() == 1.0 and masks[0].max() == 0.0 and masks[2].max() == 0.0


def test_parser_answering_for_another_number_of_faces_is_a_config_error(tmp_path):
    from vqfr.faces.parsing import load_parser

    class OneFace(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(1, 19, x.shape[2], x.shape[3])

    path = tmp_path / "parser.pt"
    torch.jit.save(torch.jit.script(OneFace()), str(path))
    with pytest.raises(ConfigError, match="for 2 faces"):
        load_parser(path).regions(np.zeros((2, 32, 32, 3), np.uint8))


def test_faces_whose_masks_do_not_overlap_blend_bit_for_bit_as_alone():
    """Two faces turned 45 degrees: their bounding rectangles overlap, their masks do not. Pasted together they must
    give exactly what pasting each alone gives (the blend of faces that do not overlap is unchanged); the overlap
    weights, computed in float32, were off by a rounding on a few pixels."""
    lms = [_square_from((80.0, 80.0), 100.0, 45.0), _square_from((216.0, 80.0), 100.0, 45.0)]
    for seed in range(60, 90):
        rng = np.random.default_rng(seed)
        photo = rng.integers(0, 256, (160, 320, 3), dtype=np.uint8)
        crops, affines = align_faces(photo, lms, 64)
        restored = rng.integers(0, 256, crops.shape, dtype=np.uint8)
        alone = paste_faces(paste_faces(photo, restored[:1], affines[:1], 1), restored[1:], affines[1:], 1)
        assert np.array_equal(paste_faces(photo, restored, affines, 1), alone), seed
