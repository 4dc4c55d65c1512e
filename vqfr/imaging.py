"""Pre- and post-processing exactly as the official code does it (OFFICIAL_VQFR.md §6), plus image I/O.

- :func:`to_tensor`: BGR uint8 -> RGB float32 in [-1, 1]: ``float32(u / 255)`` then ``(x - 0.5) / 0.5``.
- :func:`to_images`: clamp to [-1, 1], ``(x + 1) / 2``, ``* 255``, round half to even, uint8, RGB -> BGR.
- :func:`as_bgr_uint8`: grey, BGRA and 16-bit arrays become BGR uint8 (as the official face helper reads them).
- :func:`load_image` / :func:`save_image` (:func:`encode_image`): validated reads, atomic writes.

cv2 is imported inside the I/O functions only.
"""

from __future__ import annotations

import contextlib
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from vqfr.atomic import atomic_write_bytes
from vqfr.errors import InputError, OutputError

#: Default refusal limit for decoded images (width * height); about 16k x 16k.
MAX_PIXELS = 268_435_456

__all__ = ["to_tensor", "to_images", "as_bgr_uint8", "load_image", "save_image", "encode_image", "upscale_lanczos",
           "header_size", "sniff_format", "quiet_opencv", "MAX_PIXELS", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def to_tensor(images: np.ndarray, device: str | torch.device = "cpu") -> Tensor:
    """BGR uint8 image(s) -> model input, converted on ``device`` (only the uint8 pixels cross to it).

    The values are exactly the official ones: ``img / 255.`` in float64, rounded to float32, then normalised with
    mean and std 0.5.

    Args:
        images: [H, W, 3] or [B, H, W, 3] uint8, BGR.
        device: where the returned tensor lives.

    Returns:
        [B, 3, H, W] float32 RGB in [-1, 1] (B = 1 for a single image).
    """
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise InputError(f"to_tensor takes BGR uint8 [H,W,3] or [B,H,W,3], got {arr.dtype} {arr.shape}",
                         fix="convert with vqfr.imaging.as_bgr_uint8 first")
    if arr.ndim == 3:
        arr = arr[None]
    pixels = torch.from_numpy(np.ascontiguousarray(arr)).to(device)  # only read: flip() below makes the copy
    rgb = pixels.flip(-1).permute(0, 3, 1, 2)
    unit = (rgb.to(torch.float64) / 255.0).to(torch.float32)
    return ((unit - 0.5) / 0.5).contiguous()


def to_images(tensor: Tensor) -> np.ndarray:
    """Model output -> BGR uint8 image(s), converted where the tensor lives (only uint8 pixels come back).

    The official post-processing: clamp to [-1, 1], map to [0, 1], scale by 255 in float32, round half to even.

    Args:
        tensor: [B, 3, H, W] or [3, H, W], RGB in [-1, 1] space (any float dtype, any device; unclamped).

    Returns:
        [B, H, W, 3] (or [H, W, 3]) uint8 BGR.
    """
    single = tensor.dim() == 3
    t = tensor.detach().float()
    t = t.unsqueeze(0) if single else t
    if t.dim() != 4 or t.shape[1] != 3:
        raise InputError(f"to_images takes [B,3,H,W] or [3,H,W], got {tuple(tensor.shape)}")
    if not torch.isfinite(t).all():
        raise InputError("model output contains NaN or inf", fix="run the model in fp32 (precision='fp32')")
    levels = ((t.clamp(-1, 1) + 1) / 2 * 255.0).round().to(torch.uint8)
    out = levels.permute(0, 2, 3, 1).flip(-1).cpu().numpy()
    return np.ascontiguousarray(out[0] if single else out)


def as_bgr_uint8(img: np.ndarray, name: str | Path | None = None) -> np.ndarray:
    """Any readable image array -> a new BGR uint8 [H, W, 3] array (the input is never modified).

    - grey [H, W] or [H, W, 1] -> BGR; BGRA [H, W, 4] -> alpha dropped;
    - uint16 -> scaled by 255/65535 and rounded; float arrays must be finite and in [0, 1] (scaled by 255);
    - anything else (other dtypes, shapes, NaN/inf, empty) raises :class:`InputError` naming ``name``.
    """
    arr = np.asarray(img) if isinstance(img, np.ndarray) else _as_array(img, name)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or arr.size == 0:
        raise InputError(f"image array has shape {arr.shape}; expected [H,W], [H,W,3] (BGR) or [H,W,4] (BGRA)",
                         path=name, fix="pass an HxWx3 BGR image")
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if kind == "u" and size == 1:
        out = arr
    elif kind == "u" and size == 2:
        out = np.round(arr.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    elif kind == "f" and size in (2, 4, 8):
        values = arr.astype(np.float64)
        if not np.isfinite(values).all():
            raise InputError("float image contains NaN or inf", path=name,
                             fix="replace the NaN/inf values (e.g. np.nan_to_num) before restoring")
        low, high = np.min(values), np.max(values)
        if low < 0 or high > 1:
            raise InputError(f"float image values span [{low:.3g}, {high:.3g}], expected [0, 1]", path=name,
                             fix="scale float images to [0, 1], or pass uint8")
        out = np.round(values * 255.0).astype(np.uint8)
    else:
        raise InputError(f"unsupported image dtype {arr.dtype}", path=name,
                         fix="pass uint8 BGR (or uint16, or float in [0, 1])")
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    elif out.shape[2] == 4:
        out = out[:, :, :3]
    return out.copy() if np.shares_memory(out, arr) else np.ascontiguousarray(out)


def _as_array(img, name: str | Path | None) -> np.ndarray:
    """A non-ndarray image (a list, a torch tensor ...) as an array, or InputError."""
    if any(cls.__module__.startswith("PIL.") for cls in type(img).__mro__):
        # np.asarray gives its RGB channels (or a palette's indices), which would be taken for BGR without a word
        raise InputError(f"expected an OpenCV BGR array, got a PIL image (mode {getattr(img, 'mode', '?')}), whose "
                         "channels are in RGB order", path=name,
                         fix="pass the file's path, or np.asarray(img.convert('RGB'))[:, :, ::-1] (RGB -> BGR)")
    try:
        arr = np.asarray(img)
    except (TypeError, ValueError, RuntimeError) as exc:  # ragged lists, tensors that need .cpu() or .detach()
        raise InputError(f"cannot be read as an image array ({exc})", path=name,
                         fix="pass a path or an OpenCV BGR uint8 numpy array") from exc
    if arr.dtype == object:
        raise InputError(f"expected an image array, got {type(img).__name__}", path=name,
                         fix="pass a path or an OpenCV BGR uint8 numpy array")
    return arr


#: What OpenCV decodes, recognised from the first bytes (the format of IMAGE_SUFFIXES, whatever the file's suffix).
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
               (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"))


def sniff_format(data: bytes) -> str | None:
    """The image format of a file's first bytes: PNG, JPEG, BMP, WebP, TIFF, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header (SOFn), walking the marker segments before it."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:  # extended: 24-bit canvas width - 1, height - 1
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:  # lossless: 14-bit width - 1, height - 1
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":  # lossy key frame
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first IFD of a classic TIFF (tags 256 and 257)."""
    order: Literal["little", "big"] = "little" if data[:2] == b"II" else "big"
    if int.from_bytes(data[2:4], order) != 42 or len(data) < 8:
        return None
    ifd = int.from_bytes(data[4:8], order)
    if ifd + 2 > len(data):
        return None
    size = {}
    for k in range(int.from_bytes(data[ifd:ifd + 2], order)):
        entry = data[ifd + 2 + 12 * k:ifd + 14 + 12 * k]
        if len(entry) < 12:
            break
        tag, kind = int.from_bytes(entry[0:2], order), int.from_bytes(entry[2:4], order)
        if tag in (256, 257):
            size[tag] = int.from_bytes(entry[8:10] if kind == 3 else entry[8:12], order)
    return (size[256], size[257]) if len(size) == 2 else None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from a PNG, JPEG, BMP, WebP or TIFF header without decoding; None when unknown."""
    fmt = sniff_format(data)
    if fmt == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if fmt == "BMP" and len(data) >= 26:
        if int.from_bytes(data[14:18], "little") == 12:  # OS/2 core header: 16-bit sizes
            return int.from_bytes(data[18:20], "little"), int.from_bytes(data[20:22], "little")
        return (abs(int.from_bytes(data[18:22], "little", signed=True)),
                abs(int.from_bytes(data[22:26], "little", signed=True)))
    if fmt == "JPEG":
        return _jpeg_size(data)
    if fmt == "WebP":
        return _webp_size(data)
    if fmt == "TIFF":
        return _tiff_size(data)
    return None


def _png_complete(data: bytes) -> bool:
    """True when the PNG's chunks run, length by length, up to IEND."""
    i = 8
    while i + 8 <= len(data):
        length, kind = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8]
        i += 12 + length
        if kind == b"IEND":
            return i <= len(data)
    return False


def _undecodable(data: bytes) -> str:
    """Why OpenCV could not decode ``data``, as precisely as the bytes tell."""
    fmt = sniff_format(data)
    if fmt is None:
        head = data[:24]
        if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
            return (f"is not an image: it starts with text ({head.decode('ascii')!r}), not with the signature of a "
                    "PNG, JPEG, BMP, WebP or TIFF file")
        return "is not an image in a format this reads (PNG, JPEG, BMP, WebP, TIFF): its first bytes match none"
    if (fmt == "PNG" and not _png_complete(data)) or (fmt == "JPEG" and b"\xff\xd9" not in data[-4096:]):
        return f"is a truncated {fmt} file ({len(data)} bytes; its end marker is missing)"
    return f"is a corrupt or unsupported {fmt} file (OpenCV cannot decode it)"


class _QuietOpenCV:
    """OpenCV's log level is process-wide: the first caller in silences it, the last one out restores it, so
    overlapping decodes in several threads never leave it silenced (or restore it while another still decodes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        import cv2

        with self._lock:
            if not self._depth:
                self._saved = cv2.utils.logging.getLogLevel()
                cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if not self._depth:
                    cv2.utils.logging.setLogLevel(self._saved)


#: ``with quiet_opencv(): cv2.imdecode(...)``: no ``[ WARN:...]``/``[ERROR:...]`` lines from OpenCV inside (a file
#: that fails to decode gets one InputError instead). What libpng and libjpeg print themselves is not covered.
quiet_opencv = _QuietOpenCV()


def _pixel_limit_error(path: Path, width: int, height: int, max_pixels: int, what: str) -> InputError:
    return InputError(f"{what} {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}",
                      path=path, fix="downscale it first, or raise the limit (max_pixels=, CLI --max-pixels)")


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image file as BGR uint8 [H, W, 3], like ``cv2.imread(path, IMREAD_COLOR)`` (the official demo):
    EXIF orientation applied, grey and grey+alpha expanded, alpha dropped, CMYK converted, 16-bit scaled by
    255/65535 and rounded (OpenCV truncates; at most 1 level apart). The file is only read.

    The pixel count is checked against ``max_pixels`` from the header (PNG, JPEG, BMP, WebP, TIFF) before anything
    is decoded, and again after decoding for other formats. OpenCV's own log is silenced around the decode
    (:data:`quiet_opencv`), so a file that fails gets the InputError alone.

    Raises:
        InputError: missing, not a regular file, empty, not an image, truncated, corrupt, or too large.
    """
    import cv2

    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise InputError(f"cannot read the file ({exc.strerror})", path=path,
                         fix="check the path and permissions") from exc
    if not stat.S_ISREG(info.st_mode):
        raise InputError("is not a regular file", path=path, fix="pass an image file")
    if info.st_size == 0:
        raise InputError("is empty (0 bytes)", path=path, fix="re-copy the image from its source")
    # No image within the pixel limit needs more than 8 bytes a pixel (16-bit RGBA, uncompressed) plus metadata.
    if info.st_size > 8 * max_pixels + (64 << 20):
        raise InputError(f"is {info.st_size:,} bytes, too large for an image of at most {max_pixels:,} pixels",
                         path=path, fix="downscale it first, or raise the limit (max_pixels=, CLI --max-pixels)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the file ({exc.strerror})", path=path,
                         fix="check the path and permissions") from exc
    size = header_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise _pixel_limit_error(path, *size, max_pixels, "its header says")
    try:
        # ANYCOLOR|ANYDEPTH = IMREAD_COLOR's EXIF rotation and CMYK conversion, keeping 16-bit (IMREAD_UNCHANGED
        # would skip the rotation).
        with quiet_opencv():
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
    except cv2.error as exc:  # OpenCV's own checks (e.g. its pixel limit) raise instead of returning None
        text = str(exc).strip().splitlines()[-1]
        if "CV_IO_MAX_IMAGE_PIXELS" in text:
            raise InputError("cannot be decoded: it is larger than OpenCV's own limit (CV_IO_MAX_IMAGE_PIXELS, "
                             "2^30 pixels by default)", path=path,
                             fix="downscale it first, or raise the environment variable CV_IO_MAX_IMAGE_PIXELS"
                             ) from exc
        raise InputError(f"cannot be decoded ({text})", path=path, fix="re-export it as PNG or JPEG") from exc
    if img is None:
        raise InputError(_undecodable(data), path=path, fix="re-copy or re-export it (as PNG or JPEG)")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise _pixel_limit_error(path, img.shape[1], img.shape[0], max_pixels, "is")
    return as_bgr_uint8(img, name=path)


def save_image(path: str | Path, img: np.ndarray, quality: int = 95) -> Path:
    """Write a BGR uint8 image atomically (temporary file in the same folder, fsync, then rename). Returns the path.

    Raises:
        OutputError: the image cannot be encoded in the suffix's format (e.g. wider than JPEG's 65,500 pixels) or
            the folder cannot be written.
    """
    path = Path(path)
    atomic_write_bytes(path, encode_image(path, img, quality))
    return path


def encode_image(path: str | Path, img: np.ndarray, quality: int = 95) -> bytes:
    """The bytes :func:`save_image` would write to ``path``: ``img`` (BGR uint8) encoded in the format of its suffix
    (PNG without one).

    Raises:
        OutputError: the image cannot be encoded in that format (e.g. wider than JPEG's 65,500 pixels).
    """
    import cv2

    path = Path(path)
    suffix = path.suffix or ".png"
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if suffix.lower() in (".jpg", ".jpeg") else []
    try:
        ok, encoded = cv2.imencode(suffix, img, params)
        detail = ""
    except cv2.error as exc:
        ok, detail = False, f" ({str(exc).strip().splitlines()[-1]})"
    if not ok:
        raise OutputError(f"cannot encode a {img.shape[1]}x{img.shape[0]} image as {suffix}{detail}", path=path,
                          fix="write PNG (--ext png) or use a smaller --upscale")
    return encoded.tobytes()


def upscale_lanczos(img: np.ndarray, scale: float) -> np.ndarray:
    """The default background upsampler: [H,W,3] uint8 -> [int(H*scale), int(W*scale), 3] uint8, Lanczos-4 (as the
    official demo resizes its background when it has no Real-ESRGAN). Returns a new array."""
    import cv2

    h, w = img.shape[:2]
    size = (max(int(w * scale), 1), max(int(h * scale), 1))
    if size == (w, h):
        return img.copy()
    return cv2.resize(img, size, interpolation=cv2.INTER_LANCZOS4)
