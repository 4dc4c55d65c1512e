"""The synthetic degradation of the VQFR recipe (OFFICIAL_VQFR.md §8): blur, downscale, noise, JPEG, resize back.

All randomness comes from one ``numpy.random.Generator`` per sample (:func:`sample_rng`), derived from a seed, the
epoch and the sample index, so a sample's degradation is reproducible in any process, worker or rank.

Images are BGR float32 [H, W, 3] in [0, 1], as in the official pipeline.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from vqfr.errors import ConfigError

__all__ = ["DegradationParams", "PRESETS", "sample_rng", "gaussian_kernel", "sample_blur_kernel", "degrade"]


@dataclass(frozen=True)
class DegradationParams:
    """One parameter set of the degradation. Ranges are ``(low, high)`` of a uniform draw.

    Attributes:
        blur_kernel_size: odd side of the square Gaussian kernel (41 in both official sets).
        kernel_list: kernel kinds, ``"iso"`` and/or ``"aniso"``.
        kernel_prob: probability of each kind.
        blur_sigma: range of the standard deviations (pixels); an anisotropic kernel draws x and y separately.
        downsample_range: range of the downscale factor s; the image is resized to ``(int(w // s), int(h // s))``.
        noise_range: range of the Gaussian noise standard deviation, in 8-bit levels (divided by 255).
        jpeg_range: range of the JPEG quality.
    """

    blur_kernel_size: int = 41
    kernel_list: tuple[str, ...] = ("iso", "aniso")
    kernel_prob: tuple[float, ...] = (0.5, 0.5)
    blur_sigma: tuple[float, float] = (1.0, 15.0)
    downsample_range: tuple[float, float] = (1.0, 30.0)
    noise_range: tuple[float, float] | None = (0.0, 20.0)
    jpeg_range: tuple[float, float] | None = (30.0, 90.0)

    def __post_init__(self):
        if self.blur_kernel_size % 2 != 1 or self.blur_kernel_size < 1:
            raise ValueError(f"blur_kernel_size must be a positive odd number, got {self.blur_kernel_size}")
        if set(self.kernel_list) - {"iso", "aniso"}:
            raise ValueError(f"kernel_list may hold 'iso' and 'aniso' only, got {list(self.kernel_list)}")
        if (len(self.kernel_prob) != len(self.kernel_list) or not math.isclose(sum(self.kernel_prob), 1.0)
                or any(p < 0 for p in self.kernel_prob)):
            raise ValueError(f"kernel_prob {list(self.kernel_prob)} must match kernel_list, be probabilities (>= 0) "
                             "and sum to 1")
        for name in ("blur_sigma", "downsample_range", "noise_range", "jpeg_range"):
            rng = getattr(self, name)
            if rng is not None and (not isinstance(rng, (tuple, list)) or len(rng) != 2 or rng[0] > rng[1]):
                raise ValueError(f"{name} must be [low, high] with low <= high, got {rng}")
        if self.blur_sigma[0] <= 0 or self.downsample_range[0] <= 0:
            raise ValueError("blur_sigma and downsample_range must be positive")
        if self.noise_range is not None and self.noise_range[0] < 0:
            raise ValueError(f"noise_range must be >= 0 (a standard deviation in 8-bit levels), got {self.noise_range}")
        if self.jpeg_range is not None and not 0 <= self.jpeg_range[0] <= self.jpeg_range[1] <= 100:
            raise ValueError(f"jpeg_range must lie in [0, 100] (JPEG qualities), got {self.jpeg_range}")

    @classmethod
    def from_options(cls, opt: dict, where: str = "datasets.train") -> DegradationParams:
        """Build from official dataset option names; ``degradation: v1|v2`` starts from a preset.

        Raises:
            ConfigError: an unknown preset or a value the parameter set refuses, named as ``where.<option>``.
        """
        preset = opt.get("degradation")
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"{where}.degradation is {preset!r}",
                              fix=f"use one of {sorted(PRESETS)}, or leave it out and give every range")
        base = cls() if preset is None else PRESETS[preset]
        names = {f.name for f in dataclasses.fields(cls)}
        updates: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in opt.items() if k in names}
        try:
            return dataclasses.replace(base, **updates)
        except (TypeError, ValueError) as exc:  # __post_init__ names the option
            fix = "write it as the official ymls do (kernel_list: [iso, aniso], ranges as [low, high])"
            raise ConfigError(f"{where}: {exc}", fix=fix) from exc


#: The two official parameter sets (train_vqfr_v1_B16_200K.yml and train_vqfr_v2_B16_200K.yml).
PRESETS = {
    "v1": DegradationParams(blur_sigma=(0.1, 10.0), downsample_range=(0.8, 8.0), noise_range=(0.0, 20.0),
                            jpeg_range=(60.0, 100.0)),
    "v2": DegradationParams(blur_sigma=(1.0, 15.0), downsample_range=(1.0, 30.0), noise_range=(0.0, 20.0),
                            jpeg_range=(30.0, 90.0)),
}


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample: independent streams for every (seed, epoch, index)."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """A normalised bivariate Gaussian on a ``size`` x ``size`` grid centred on the middle pixel.

    The covariance is ``R diag(sigma_x^2, sigma_y^2) R^T`` with R the rotation by ``theta`` (radians); x runs
    along columns and y along rows.

    Returns:
        float64 [size, size], summing to 1.
    """
    r = np.arange(size, dtype=np.float64) - size // 2
    xx, yy = np.meshgrid(r, r)
    c, s = math.cos(theta), math.sin(theta)
    cov = np.array([[c, -s], [s, c]]) @ np.diag([sigma_x**2, sigma_y**2]) @ np.array([[c, s], [-s, c]])
    inv = np.linalg.inv(cov)
    quad = inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy
    k = np.exp(-0.5 * quad)
    return k / k.sum()


def sample_blur_kernel(rng: np.random.Generator, params: DegradationParams) -> tuple[np.ndarray, dict]:
    """Draw the kind (by ``kernel_prob``), the sigmas and the rotation ~ U(-pi, pi) of a blur kernel.

    Returns:
        (kernel float64 [K, K], {"kind", "sigma_x", "sigma_y", "theta"}).
    """
    kind = params.kernel_list[int(rng.choice(len(params.kernel_list), p=np.asarray(params.kernel_prob)))]
    sigma_x = float(rng.uniform(*params.blur_sigma))
    if kind == "iso":
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y = float(rng.uniform(*params.blur_sigma))
        theta = float(rng.uniform(-math.pi, math.pi))
    kernel = gaussian_kernel(params.blur_kernel_size, sigma_x, sigma_y, theta)
    return kernel, {"kind": kind, "sigma_x": sigma_x, "sigma_y": sigma_y, "theta": theta}


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip of a BGR float image in [0, 1] at integer ``quality`` (rounded to 8 bits for encoding)."""
    import cv2

    u8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", u8, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV could not JPEG-encode an image of shape {img.shape}")
    decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if decoded is None:
        raise RuntimeError(f"OpenCV could not decode its own JPEG of an image of shape {img.shape}")
    return decoded.astype(np.float32) / 255.0


def degrade(img: np.ndarray, rng: np.random.Generator, params: DegradationParams) -> tuple[np.ndarray, dict]:
    """Degrade one high-quality image.

    Steps: blur (``cv2.filter2D``, reflect-101 borders), bilinear downscale by s to ``(int(w // s), int(h // s))``
    (at least 1 pixel), per-channel Gaussian noise clipped to [0, 1], JPEG at ``int(q)`` (OpenCV >= 5 refuses the
    float quality that the official code passes), bilinear resize back, rounding to 8 bits.

    Args:
        img: BGR float32 [H, W, 3] in [0, 1]; not modified.
        rng: the sample's generator (:func:`sample_rng`).
        params: the parameter set.

    Returns:
        (degraded BGR float32 [H, W, 3], multiples of 1/255 in [0, 1]; the drawn parameters as a dict).
    """
    import cv2

    h, w = img.shape[:2]
    kernel, info = sample_blur_kernel(rng, params)
    out = cv2.filter2D(img, -1, kernel)
    scale = float(rng.uniform(*params.downsample_range))
    size = (max(1, int(w // scale)), max(1, int(h // scale)))
    out = cv2.resize(out, size, interpolation=cv2.INTER_LINEAR)
    info.update(scale=scale, low_size=size)
    if params.noise_range is not None:
        sigma = float(rng.uniform(*params.noise_range))
        noise = rng.standard_normal(out.shape, dtype=np.float32) * np.float32(sigma / 255.0)
        out = np.clip(out + noise, 0.0, 1.0)
        info["noise_sigma"] = sigma
    if params.jpeg_range is not None:
        quality = int(rng.uniform(*params.jpeg_range))
        out = jpeg(out, quality)
        info["jpeg_quality"] = quality
    out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
    out = np.clip(np.rint(out * 255.0), 0, 255).astype(np.float32) / 255.0
    return out, info
