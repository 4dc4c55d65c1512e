"""Pre- and post-processing exactly as the official code does it (OFFICIAL_VQFR.md §6), plus image I/O.

- :func:`to_tensor`: BGR uint8 -> RGB float32 in [-1, 1]: ``float32(u / 255)`` then ``(x - 0.5) / 0.5``.
- :func:`to_images`: clamp to [-1, 1], ``(x + 1) / 2``, ``* 255``, round half to even, uint8, RGB -> BGR.
- :func:`as_bgr_uint8`: grey, BGRA and 16-bit arrays become BGR uint8 (as the official face helper reads them).
- :func:`load_image` / :func:`save_image`: validated reads, atomic writes.

cv2 is imported inside the I/O functions only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vqfr.atomic import atomic_path
from vqfr.errors import InputError, OutputError

#: Default refusal limit for decoded images (width * height); about 16k x 16k.
MAX_PIXELS = 268_435_456

__all__ = ["to_tensor", "to_images", "as_bgr_uint8", "load_image", "save_image", "upscale_lanczos", "MAX_PIXELS",
           "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def to_tensor(images: np.ndarray, device: str | torch.device = "cpu") -> Tensor:
    """BGR uint8 image(s) -> model input.

    Args:
        images: [H, W, 3] or [B, H, W, 3] uint8, BGR.

    Returns:
        [B, 3, H, W] float32 RGB in [-1, 1] (B = 1 for a single image).
    """
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise InputError(f"to_tensor takes BGR uint8 [H,W,3] or [B,H,W,3], got {arr.dtype} {arr.shape}",
                         fix="convert with vqfr.imaging.as_bgr_uint8 first")
    if arr.ndim == 3:
        arr = arr[None]
    x = (arr.astype(np.float64) / 255.0).astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(x[..., ::-1].transpose(0, 3, 1, 2)))
    return ((t - 0.5) / 0.5).to(device)


def to_images(tensor: Tensor) -> np.ndarray:
    """Model output -> BGR uint8 image(s).

    Args:
        tensor: [B, 3, H, W] or [3, H, W], RGB in [-1, 1] space (any float dtype, any device; unclamped).

    Returns:
        [B, H, W, 3] (or [H, W, 3]) uint8 BGR.
    """
    single = tensor.dim() == 3
    t = tensor.detach().float().cpu()
    t = t.unsqueeze(0) if single else t
    if t.dim() != 4 or t.shape[1] != 3:
        raise InputError(f"to_images takes [B,3,H,W] or [3,H,W], got {tuple(tensor.shape)}")
    t = (t.clamp(-1, 1) + 1) / 2
    arr = t.numpy().transpose(0, 2, 3, 1)[..., ::-1]
    out = (arr * np.float32(255.0)).round().astype(np.uint8)
    return np.ascontiguousarray(out[0] if single else out)


def as_bgr_uint8(img: np.ndarray, name: str | Path | None = None) -> np.ndarray:
    """Any readable image array -> a new BGR uint8 [H, W, 3] array (the input is never modified).

    - grey [H, W] or [H, W, 1] -> BGR; BGRA [H, W, 4] -> alpha dropped;
    - uint16 -> scaled by 255/65535 and rounded; float arrays must be finite and in [0, 1] (scaled by 255);
    - anything else (other dtypes, shapes, NaN/inf, empty) raises :class:`InputError` naming ``name``.
    """
    arr = np.asarray(img)
    if not isinstance(img, np.ndarray) and arr.dtype == object:
        raise InputError(f"expected an image array, got {type(img).__name__}", path=name,
                         fix="pass a path or an OpenCV BGR uint8 array")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or arr.size == 0:
        raise InputError(f"image array has shape {arr.shape}; expected [H,W], [H,W,3] or [H,W,4]", path=name,
                         fix="pass an HxWx3 BGR image")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.uint16:
        out = np.round(arr.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    elif arr.dtype in (np.float16, np.float32, np.float64):
        if not np.isfinite(arr).all():
            raise InputError("float image contains NaN or inf", path=name, fix="clean the array before restoring")
        if arr.min() < 0 or arr.max() > 1:
            raise InputError(f"float image values span [{arr.min():.3g}, {arr.max():.3g}], expected [0, 1]",
                             path=name, fix="scale float images to [0, 1] or pass uint8")
        out = np.round(arr.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise InputError(f"unsupported image dtype {arr.dtype}", path=name,
                         fix="pass uint8 (or uint16 / float in [0, 1]) BGR")
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    elif out.shape[2] == 4:
        out = out[:, :, :3]
    return out.copy() if np.shares_memory(out, arr) else np.ascontiguousarray(out)


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG or BMP header without decoding, or None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] == b"BM" and len(data) >= 26:
        return abs(int.from_bytes(data[18:22], "little", signed=True)), abs(int.from_bytes(data[22:26], "little",
                                                                                            signed=True))
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            seg = int.from_bytes(data[i + 2:i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
            i += 2 + seg
    return None


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image file as BGR uint8 [H, W, 3] (grey, alpha, 16-bit and CMYK are converted).

    Raises:
        InputError: missing, empty, truncated or undecodable file, or more than ``max_pixels`` pixels.
    """
    import cv2

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the file ({exc.strerror})", path=path, fix="check the path and permissions") from exc
    if not data:
        raise InputError("is empty (0 bytes)", path=path, fix="re-copy the image")
    size = _header_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise InputError(f"is {size[0]}x{size[1]} pixels, over the limit of {max_pixels}", path=path,
                         fix="downscale it first or raise max_pixels (--max-pixels)")
    buf = np.frombuffer(data, np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputError("is not a readable image (truncated, corrupt or an unsupported format)", path=path,
                         fix="re-export it as PNG or JPEG")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise InputError(f"is {img.shape[1]}x{img.shape[0]} pixels, over the limit of {max_pixels}", path=path,
                         fix="downscale it first or raise max_pixels (--max-pixels)")
    return as_bgr_uint8(img, name=path)


def save_image(path: str | Path, img: np.ndarray, quality: int = 95) -> Path:
    """Write a BGR uint8 image atomically (temporary file in the same folder, then rename). Returns the path."""
    import cv2

    path = Path(path)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix.lower() in (".jpg", ".jpeg") else []
    with atomic_path(path) as tmp:
        ok, encoded = cv2.imencode(path.suffix or ".png", img, params)
        if not ok:
            raise OutputError(f"cannot encode the image as {path.suffix or '.png'}", path=path,
                              fix="use a .png or .jpg output name")
        tmp.write_bytes(encoded.tobytes())
    return path


def upscale_lanczos(img: np.ndarray, scale: float) -> np.ndarray:
    """The default background upsampler: [H,W,3] uint8 -> [int(H*scale), int(W*scale), 3] uint8, Lanczos-4 (as the
    official demo resizes its background when it has no Real-ESRGAN). Returns a new array."""
    import cv2

    h, w = img.shape[:2]
    size = (max(int(w * scale), 1), max(int(h * scale), 1))
    if size == (w, h):
        return img.copy()
    return cv2.resize(img, size, interpolation=cv2.INTER_LANCZOS4)
