"""Paste restored faces back into the (upscaled) photo with the inverse warp and a soft mask.

Geometry: a face crop was taken with ``crop = A @ photo``; in a photo upscaled ``s`` times by a half-pixel-centred
resize (cv2, Lanczos), photo pixel ``p`` sits at ``s * p + (s - 1) / 2``. The inverse warp is therefore
``s * A^-1`` plus ``(s - 1) / 2`` on the translation. (The official facexlib helper adds ``s / 2``, which shifts
upscaled pastes by half an output pixel against the background; we use the exact offset.) ``s`` is the exact ratio of
the sizes, per axis: ``int(W * upscale) / W`` is not ``upscale`` when ``W * upscale`` is not whole. Pass the photo's
size (``photo_size=``) to get it exactly; without it, it is worked out from the background's size and ``upscale``,
which is exact when upscaling only.

Masks:

- default: :func:`feather_mask`, the whole aligned square, its edge eroded and blurred in output pixels (feather
  width about 1/20 of the face's side), as face helpers do when no parsing network is available;
- with a :class:`~vqfr.faces.parsing.FaceParser`: the parser's face-region mask, blurred and warped back
  (:func:`parse_mask`, as the official demo does with ParseNet).

Overlaps: where two faces' masks overlap, each pixel goes to the face whose centre is nearest in its own aligned
frame (a soft seam, :func:`_weight`), so a later face's square never covers an earlier face and the order does not
matter; faces that do not overlap blend exactly as a lone face does.

Where a crop left the photo (a face cut by the photo's edge), it holds the border colour: the photo's edge is
replicated over that part of the restored crop (and of a parser's region) before the warp back, so the edge pixels
do not blend the grey in.

Resampling: one bicubic warp per face, low-passed first when the warp shrinks the crop (:func:`_warp_face_back`),
so restored detail finer than the output pixels does not alias.

Work is done inside each face's bounding rectangle only, so many faces on a large photo stay cheap.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from vqfr.faces.align import template

__all__ = ["inverse_affine", "feather_mask", "parse_mask", "paste_faces", "OWNERSHIP_SOFTNESS"]

#: Width of the seam where two faces' masks overlap, in units of the crop's side (:func:`paste_faces`).
OWNERSHIP_SOFTNESS = 0.02


def inverse_affine(affine: np.ndarray, upscale: float | tuple[float, float] = 1.0) -> np.ndarray:
    """[2,3] photo -> crop affine  ->  [2,3] crop -> upscaled-photo affine (see the module docstring); ``upscale``
    is s, or (sx, sy) per axis."""
    import cv2

    scale = np.broadcast_to(np.asarray(upscale, np.float64), (2,))
    inv = cv2.invertAffineTransform(np.asarray(affine, np.float64)) * scale[:, None]
    inv[:, 2] += (scale - 1) / 2
    return inv


def _axis_scale(side: int, upscale: float) -> float:
    """The exact scale of a background axis of ``side = max(int(n * upscale), 1)`` pixels (the runtime's size) made
    from n photo pixels: side / n (1.5x of 333 px is 499 px, 1.4985x). Upscaling, one n fits. Downscaling, several
    may: ``upscale`` is kept (within one output pixel), as for a background sized otherwise."""
    if upscale < 1:
        return upscale
    guess = int(np.ceil(side / upscale))
    fits = [n for n in (guess - 1, guess, guess + 1) if n >= 1 and max(int(n * upscale), 1) == side]
    return side / fits[0] if fits else upscale


def _roi(inv: np.ndarray, face_size: int, width: int, height: int, pad: int) -> tuple[int, int, int, int] | None:
    """Bounding rectangle (x0, y0, x1, y1) of the warped crop in the output, padded and clipped, or None."""
    corners = np.array([[0, 0, 1], [face_size, 0, 1], [0, face_size, 1], [face_size, face_size, 1]], np.float64)
    pts = corners @ inv.T
    x0, y0 = np.floor(pts.min(0)).astype(int) - pad
    x1, y1 = np.ceil(pts.max(0)).astype(int) + pad
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _outside_photo(affine: np.ndarray, face_size: int, photo_size: tuple[float, float]) -> np.ndarray | None:
    """[S, S] bool: the crop pixels that :func:`~vqfr.faces.align.warp_face` sampled (partly) outside the photo,
    i.e. from its border colour; None when there are none."""
    inv = np.linalg.inv(np.vstack([np.asarray(affine, np.float64), [0, 0, 1]]))[:2]
    grid = np.arange(face_size, dtype=np.float64)
    px = inv[0, 0] * grid[None, :] + inv[0, 1] * grid[:, None] + inv[0, 2]
    py = inv[1, 0] * grid[None, :] + inv[1, 1] * grid[:, None] + inv[1, 2]
    eps = 1e-6
    outside = (px < -eps) | (px > photo_size[0] - 1 + eps) | (py < -eps) | (py > photo_size[1] - 1 + eps)
    return outside if outside.any() else None


def _extend_from_inside(img: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """``img`` ([S, S] or [S, S, C]) with every ``outside`` pixel set to the nearest inside one (the photo's edge
    replicated in the crop frame); unchanged when nothing is inside."""
    import cv2

    if outside.all():
        return img
    _, labels = cv2.distanceTransformWithLabels(outside.astype(np.uint8), cv2.DIST_L2, 5,
                                                labelType=cv2.DIST_LABEL_PIXEL)
    ys, xs = np.nonzero(~outside)
    lut = np.zeros((int(np.max(labels)) + 1, 2), np.intp)
    lut[labels[ys, xs]] = np.stack([ys, xs], 1)
    src = lut[labels]
    return img[src[..., 0], src[..., 1]]


def feather_mask(coverage: np.ndarray, upscale: float = 1.0) -> np.ndarray:
    """Soft mask from the warped square's coverage ([h, w] float32 in [0, 1]) -> [h, w] float32 in [0, 1].

    The coverage is eroded by about ``upscale`` pixels on each side (dropping the interpolated rim), then by a
    feather width ``w = sqrt(area) // 20``, and blurred with a ``2w + 1`` Gaussian: 0 at the square's edge, 1 inside.
    """
    import cv2

    # odd kernels erode every side alike (an even one spares the right and bottom rim, and the mask then reached the
    # black outside the warped square)
    core = cv2.erode(coverage, np.ones((2 * max(int(upscale), 1) + 1,) * 2, np.uint8))
    edge = max(int(np.sqrt(float(core.sum()))) // 20, 1)
    core = cv2.erode(core, np.ones((2 * edge + 1, 2 * edge + 1), np.uint8))
    return np.clip(cv2.GaussianBlur(core, (2 * edge + 1, 2 * edge + 1), 0), 0, 1)


def parse_mask(region: np.ndarray) -> np.ndarray:
    """A parser's face region in the aligned frame ([S, S] float32 in [0, 1]) -> the soft mask to warp back.

    As the official demo: blurred twice with a 101x101 (sigma 11) Gaussian at 512 (scaled with the face size),
    then a 10-pixel border (scaled) set to 0.
    """
    import cv2

    size = region.shape[0]
    k = max(int(round(101 * size / 512)) | 1, 3)
    sigma = 11 * size / 512
    soft = cv2.GaussianBlur(cv2.GaussianBlur(region.astype(np.float32), (k, k), sigma), (k, k), sigma)
    border = max(int(round(10 * size / 512)), 1)
    soft[:border], soft[-border:], soft[:, :border], soft[:, -border:] = 0, 0, 0, 0
    return soft


def _warp_face_back(face: np.ndarray, local: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Warp a restored crop into the output rectangle with one bicubic resampling, low-passed first when the warp
    shrinks it by r > 1 (restored detail finer than the output pixels would alias): a Gaussian of sigma (r - 1) / 2
    crop pixels (the usual anti-aliasing sigma of a resize), after an area reduction by about the integer factor
    r // 2 when r >= 4 (it leaves a shrink of 2 to 4, and a blur small enough to be cheap).

    Beyond the square the crop's edge is replicated, not filled with black: the mask can be non-zero within the
    cubic's reach of the square's edge (where the edge crosses the photo's border, the mask is not eroded, and where
    faces overlap, a face's share may reach past its own mask), and a fill there darkened a flat photo by up to 6
    levels at 512 px (34 at 32 px)."""
    import cv2

    side = face.shape[0]
    shrink = 1.0 / np.sqrt(abs(np.linalg.det(local[:, :2])))
    factor = int(shrink // 2)
    if factor >= 2:
        small = max(int(round(side / factor)), 1)
        r = side / small
        face = cv2.resize(face, (small, small), interpolation=cv2.INTER_AREA)
        # small-crop pixel c' sits at c = r * c' + (r - 1) / 2 of the full crop (half-pixel centres)
        local = local @ np.array([[r, 0, (r - 1) / 2], [0, r, (r - 1) / 2], [0, 0, 1]])
        shrink /= r
    if shrink > 1:
        face = cv2.GaussianBlur(face, (0, 0), (shrink - 1) / 2)
    return cv2.warpAffine(face, local, size, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)


class _Piece(NamedTuple):
    """One face ready to blend: its output rectangle, restored crop, warp into the rectangle and mask there."""

    roi: tuple[int, int, int, int]
    face: np.ndarray
    local: np.ndarray
    mask: np.ndarray


def _claim(piece: _Piece, face_size: int) -> np.ndarray:
    """[h, w] float32 ``mask * exp(-d / OWNERSHIP_SOFTNESS)`` over the face's output rectangle, ``d`` the distance of
    each pixel from the face's centre (the template's mean) in its aligned frame, in units of the crop's side (so a
    large face claims proportionally more of the photo). The mask is 0 beyond about 0.78 crop sides, where the
    exponential (e^-39) is still a normal float32."""
    import cv2

    mask = piece.mask
    to_crop = cv2.invertAffineTransform(piece.local)
    xs = np.arange(mask.shape[1], dtype=np.float64)[None, :]
    ys = np.arange(mask.shape[0], dtype=np.float64)[:, None]
    centre = template(face_size).astype(np.float64).mean(0)
    cx = to_crop[0, 0] * xs + to_crop[0, 1] * ys + to_crop[0, 2] - centre[0]
    cy = to_crop[1, 0] * xs + to_crop[1, 1] * ys + to_crop[1, 2] - centre[1]
    d = np.hypot(cx, cy) / face_size
    return (mask * np.exp(-np.minimum(d / OWNERSHIP_SOFTNESS, 80.0))).astype(np.float32)


def _overlap(piece: _Piece, roi: tuple[int, int, int, int]) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Where ``piece``'s mask reaches into the output rectangle ``roi``: the (rows, columns) slices of ``roi`` and of
    ``piece``'s own rectangle there, or None when it does not (rectangles apart, or the mask 0 where they meet)."""
    x0, y0, x1, y1 = roi
    px0, py0, px1, py1 = piece.roi
    ix0, iy0, ix1, iy1 = max(x0, px0), max(y0, py0), min(x1, px1), min(y1, py1)
    if ix1 <= ix0 or iy1 <= iy0:
        return None
    own = (slice(iy0 - py0, iy1 - py0), slice(ix0 - px0, ix1 - px0))
    if not piece.mask[own].any():
        return None
    return (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0)), own


def _weight(pieces: list[_Piece], k: int, claims: dict[int, np.ndarray], face_size: int) -> np.ndarray:
    """[h, w] blending weight of face ``k`` over its rectangle, for the back-to-front "over" blend of all faces.

    Alone, a face's weight is its mask. Where masks overlap, each pixel goes to the faces that own it: the final
    output there is ``alpha * F + (1 - alpha) * photo``, with ``alpha = 1 - prod(1 - m_j)`` (the masks' union) and
    ``F`` the faces' average weighted by their claims ``c_j = m_j * exp(-d_j / OWNERSHIP_SOFTNESS)`` (:func:`_claim`).
    So a face's square never covers a nearer face, whatever their order; the seam is soft over a few hundredths of a
    face. Face k's share of the output is ``alpha * c_k / C`` (C the sum of the claims); the weight returned divides
    it by what the faces blended after it leave, ``1 - alpha * C_later / C``, so that blending the faces in order
    gives that output: ``alpha * c_k / (C - alpha * C_later)``. Where no other mask reaches, it is the mask itself,
    bit for bit. The claims are computed once per face that overlaps another (``claims``, by index, filled as needed);
    each overlap then costs a few sums over it.
    """
    piece = pieces[k]
    overlaps = [(j, ov) for j, other in enumerate(pieces) if j != k and (ov := _overlap(other, piece.roi)) is not None]
    if not overlaps:
        return piece.mask
    for j in (k, *(j for j, _ in overlaps)):
        if j not in claims:
            claims[j] = _claim(pieces[j], face_size)
    total = claims[k].copy()
    keep = 1 - piece.mask  # prod(1 - m_j): what the union leaves of the photo
    later = np.zeros_like(total)
    reached = np.zeros(total.shape, bool)
    for j, (here, own) in overlaps:
        other = pieces[j]
        total[here] += claims[j][own]
        keep[here] *= 1 - other.mask[own]
        reached[here] |= other.mask[own] > 0
        if j > k:
            later[here] += claims[j][own]
    alpha = 1 - keep
    rest = total - alpha * later
    weight = np.divide(alpha * claims[k], rest, out=np.zeros_like(rest), where=rest > 1e-6 * total)
    return np.where(reached, np.clip(weight, 0, 1), piece.mask)


def paste_faces(background: np.ndarray, faces: np.ndarray, affines: np.ndarray, upscale: float = 1.0,
                regions: np.ndarray | None = None, *, photo_size: tuple[int, int] | None = None) -> np.ndarray:
    """Blend restored faces into the upscaled photo. Where faces' masks overlap, each pixel goes to the face whose
    centre is nearest (relative to the face's size), with a soft seam, whatever the order of the faces.

    Args:
        background: [int(H*s), int(W*s), 3] uint8 BGR, the photo already upscaled by ``upscale`` (not modified).
        faces: [N, S, S, 3] uint8 BGR restored crops.
        affines: [N, 2, 3] photo -> crop affines used to cut them.
        upscale: s.
        regions: optional [N, S, S] float32 face-region masks in the aligned frame (from a parser); None = feathered
            squares.
        photo_size: (W, H) of the photo the affines refer to. Given, the scale is exact on each axis (the
            background's size over it); None derives it from ``upscale``, exact when upscaling but within one
            output pixel when downscaling (several photo sizes shrink to the same background).

    Returns:
        [H*s, W*s, 3] uint8 BGR, a new array.
    """
    import cv2

    out = background.copy()
    height, width = out.shape[:2]
    face_size = faces.shape[1] if len(faces) else 0
    if photo_size is None:
        scale = (_axis_scale(width, upscale), _axis_scale(height, upscale))
    else:
        scale = (width / photo_size[0], height / photo_size[1])
    photo = photo_size if photo_size is not None else (width / scale[0], height / scale[1])
    pieces = []
    for i, (face, affine) in enumerate(zip(faces, affines, strict=True)):
        inv = inverse_affine(affine, scale)
        roi = _roi(inv, face_size, width, height, pad=2)
        if roi is None:
            continue
        region = None if regions is None else regions[i]
        # Where the crop left the photo it holds the border colour (and the model's answer to it): replicate the
        # photo's edge over it, so the warp back (and the parser's region) does not blend it into the edge pixels.
        outside = _outside_photo(affine, face_size, photo)
        if outside is not None:
            face = _extend_from_inside(face, outside)
            region = None if region is None else _extend_from_inside(region, outside)
        x0, y0, x1, y1 = roi
        local = inv.copy()
        local[:, 2] -= (x0, y0)
        size = (x1 - x0, y1 - y0)
        if region is None:
            coverage = cv2.warpAffine(np.ones((face_size, face_size), np.float32), local, size,
                                      flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
            mask = feather_mask(coverage, upscale)
        else:
            mask = cv2.warpAffine(parse_mask(region), local, size, flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT)
        pieces.append(_Piece(roi, face, local, mask))
    claims: dict[int, np.ndarray] = {}
    for k, piece in enumerate(pieces):
        x0, y0, x1, y1 = piece.roi
        warped = _warp_face_back(piece.face, piece.local, (x1 - x0, y1 - y0))
        m = _weight(pieces, k, claims, face_size)[:, :, None]
        patch = out[y0:y1, x0:x1].astype(np.float32)
        out[y0:y1, x0:x1] = np.clip(np.rint(m * warped.astype(np.float32) + (1 - m) * patch), 0, 255).astype(np.uint8)
    return out
