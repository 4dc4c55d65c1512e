"""Face alignment to the FFHQ 5-point template, as the official demo does it (OFFICIAL_VQFR.md §7).

A similarity transform (rotation, uniform scale, translation) maps the 5 detected landmarks onto the template,
fitted with ``cv2.estimateAffinePartial2D(..., method=LMEDS)``; the crop is ``cv2.warpAffine`` (bilinear) with the
constant border colour (135, 133, 132) (BGR) where the crop leaves the photo.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FFHQ_TEMPLATE_512", "BORDER_VALUE", "template", "estimate_affine", "warp_face", "align_faces"]

#: The FFHQ 5-point template at 512x512 (x, y): left eye, right eye, nose, left mouth corner, right mouth corner.
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043],
     [313.08905, 371.15118]],
    dtype=np.float32,
)

#: Border colour (BGR) of the official crops where the face is near the photo's edge.
BORDER_VALUE = (135, 133, 132)


def template(face_size: int) -> np.ndarray:
    """[5, 2] float32 template landmarks for a face_size x face_size crop (the 512 template scaled)."""
    return FFHQ_TEMPLATE_512 * np.float32(face_size / 512.0)


def _least_squares_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Closed-form least-squares similarity (Umeyama without reflection). [N,2], [N,2] -> [2,3]."""
    src, dst = src.astype(np.float64), dst.astype(np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    # Similarity as [[a, -b], [b, a]]: solve for (a, b) in the least-squares sense.
    denom = max((s ** 2).sum(), 1e-12)
    a = (s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1]).sum() / denom
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / denom
    rot = np.array([[a, -b], [b, a]])
    return np.concatenate([rot, (mu_d - rot @ mu_s)[:, None]], 1)


def estimate_affine(landmarks: np.ndarray, face_size: int) -> np.ndarray:
    """The similarity transform that takes ``landmarks`` [5, 2] (photo pixels) to the template.

    Returns:
        [2, 3] float64 affine matrix (photo -> aligned crop), as ``cv2.warpAffine`` takes it.
    """
    import cv2

    lm = np.asarray(landmarks, np.float32).reshape(5, 2)
    dst = template(face_size)
    affine, _ = cv2.estimateAffinePartial2D(lm, dst, method=cv2.LMEDS)
    if affine is None or not np.isfinite(affine).all():
        # LMEDS gives up on degenerate point sets (e.g. nearly collinear); least squares always answers.
        affine = _least_squares_similarity(lm, dst)
    return affine.astype(np.float64)


def warp_face(img: np.ndarray, affine: np.ndarray, face_size: int) -> np.ndarray:
    """Crop one aligned face: [H,W,3] uint8 BGR + [2,3] affine -> [face_size, face_size, 3] uint8."""
    import cv2

    return cv2.warpAffine(img, affine, (face_size, face_size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_VALUE)


def align_faces(img: np.ndarray, landmarks: list[np.ndarray] | np.ndarray, face_size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Align every face of one photo.

    Args:
        img: [H, W, 3] uint8 BGR photo.
        landmarks: N arrays of [5, 2] landmarks.
        face_size: side of the crops.

    Returns:
        (crops [N, S, S, 3] uint8, affines [N, 2, 3] float64).
    """
    affines = np.stack([estimate_affine(lm, face_size) for lm in landmarks]) if len(landmarks) else \
        np.zeros((0, 2, 3))
    crops = np.stack([warp_face(img, a, face_size) for a in affines]) if len(affines) else \
        np.zeros((0, face_size, face_size, 3), np.uint8)
    return crops, affines
