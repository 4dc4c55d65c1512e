"""Image-quality metrics on 8-bit BGR images, computed as the official training/evaluation code does (basicsr).

- :func:`psnr` and :func:`ssim` (validation during training): all channels or the Y channel, optional border crop;
  SSIM with an 11x11 Gaussian window (sigma 1.5) on the valid region, averaged over channels.
- :func:`correct_mean_var`: the official evaluation script's correction of each channel's mean and standard
  deviation to the reference's, applied before PSNR and SSIM (``--correct-mean-var``).
- :func:`niqe` (offline, no reference): the Y channel (BT.601), 96x96 blocks, two scales (the second by MATLAB-style
  bicubic, antialiased halving), against the pristine-model parameters in ``training/weights`` (see its README).

Command line::

    python -m training.metrics psnr-ssim --restored results/ --gt hq/ [--crop-border 0] [--test-y-channel]
                                         [--correct-mean-var]
    python -m training.metrics niqe results/ [--crop-border 0]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from training.arguments import whole_number

__all__ = ["psnr", "ssim", "niqe", "bgr_to_y", "correct_mean_var", "finite_mean", "imresize_half", "main"]


def _check_pair(img: np.ndarray, ref: np.ndarray) -> None:
    if img.shape != ref.shape:
        raise ValueError(f"image shapes differ: {img.shape} vs {ref.shape}")


def _crop(img: np.ndarray, border: int) -> np.ndarray:
    """``img`` without ``border`` pixels on each side; a negative border, or one that leaves nothing, is refused
    (a negative one used to give a NaN PSNR)."""
    if border < 0:
        raise ValueError(f"crop_border must be 0 or more, got {border}")
    if border and 2 * border >= min(img.shape[:2]):
        raise ValueError(f"crop_border {border} leaves nothing of a {img.shape[1]}x{img.shape[0]} image; use at most "
                         f"{(min(img.shape[:2]) - 1) // 2}")
    return img[border:-border, border:-border] if border else img


def _channels(img: np.ndarray, test_y_channel: bool) -> np.ndarray:
    """The image itself, or its Y channel (:func:`bgr_to_y`) for a BGR image when ``test_y_channel`` (as basicsr:
    a grey image stays as it is)."""
    return bgr_to_y(img) if test_y_channel and img.ndim == 3 and img.shape[2] == 3 else img


def psnr(img: np.ndarray, ref: np.ndarray, crop_border: int = 0, test_y_channel: bool = False) -> float:
    """PSNR in dB of two uint8 (or [0, 255] float) images of equal shape, on all channels or (``test_y_channel``)
    on BT.601 luma; ``inf`` when identical."""
    _check_pair(img, ref)
    img, ref = _channels(img, test_y_channel), _channels(ref, test_y_channel)
    a = _crop(img, crop_border).astype(np.float64)
    b = _crop(ref, crop_border).astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    import cv2

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = cv2.getGaussianKernel(11, 1.5)
    window = g @ g.T

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.filter2D(x, -1, window)[5:-5, 5:-5]  # the valid region only

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def ssim(img: np.ndarray, ref: np.ndarray, crop_border: int = 0, test_y_channel: bool = False) -> float:
    """SSIM of two uint8 (or [0, 255] float) images [H, W] or [H, W, C], mean over channels (or on BT.601 luma
    with ``test_y_channel``). The images must hold at least one 11x11 window (after the crop)."""
    _check_pair(img, ref)
    img, ref = _channels(img, test_y_channel), _channels(ref, test_y_channel)
    a = _crop(img, crop_border).astype(np.float64)
    b = _crop(ref, crop_border).astype(np.float64)
    if min(a.shape[:2]) < 11:
        raise ValueError(f"SSIM needs an image of at least 11x11 pixels, got {a.shape[1]}x{a.shape[0]}")
    if a.ndim == 2:
        return _ssim_channel(a, b)
    return float(np.mean([_ssim_channel(a[..., c], b[..., c]) for c in range(a.shape[2])]))


def bgr_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma of a BGR uint8 (or [0, 255] float) image, as MATLAB's rgb2ycbcr: float64 [H, W] in [16, 235]."""
    x = img.astype(np.float64) / 255.0
    return (x @ np.array([24.966, 128.553, 65.481]) + 16.0)


def correct_mean_var(img: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``img`` with each channel's mean and standard deviation set to ``ref``'s, as the official evaluation script
    (``scripts/metrics/calculate_psnr_ssim.py``, where it is always on) does before PSNR and SSIM.

    Per channel, twice over: shift the mean to the reference's, then scale by the ratio of the standard deviations
    (which moves the mean again, hence the second round). In float64 (the script: float32 on [0, 1], the same
    arithmetic up to rounding); neither clipped nor rounded. A flat channel (deviation under 1e-6), which no scale
    can give a spread, is only shifted (the script divides by its zero deviation).

    Args:
        img: [H, W] or [H, W, C] uint8 (or [0, 255] float), the restored image.
        ref: the reference, of the same shape.

    Returns:
        float64 array of ``img``'s shape, on the [0, 255] scale.
    """
    _check_pair(img, ref)
    out = img.astype(np.float64)
    target = ref.astype(np.float64)
    axes = (0, 1)
    mean, std = target.mean(axes), target.std(axes)
    for _ in range(2):
        out = out - out.mean(axes) + mean
        spread = out.std(axes)
        flat = spread < 1e-6  # the shift leaves a rounding-level spread on a flat channel: do not blow it up
        out = out * np.where(flat, 1, std / np.where(flat, 1, spread))
    return out


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    near = (1.5 * ax**3 - 2.5 * ax**2 + 1) * (ax <= 1)
    far = (-0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return near + far


def _resize_matrix(n: int, scale: float) -> np.ndarray:
    """[ceil(n*scale), n] MATLAB bicubic resampling (antialiased when shrinking, symmetric edge padding)."""
    m = math.ceil(n * scale)
    width = 4.0 / scale if scale < 1 else 4.0
    u = np.arange(1, m + 1) / scale + 0.5 * (1 - 1 / scale)  # output pixel centres in 1-based input coordinates
    left = np.floor(u - width / 2)
    taps = left[:, None] + np.arange(math.ceil(width) + 2)[None, :]
    dist = u[:, None] - taps
    w = scale * _cubic(dist * scale) if scale < 1 else _cubic(dist)
    w /= w.sum(1, keepdims=True)
    idx = taps.astype(np.int64) - 1  # 0-based; mirror outside [0, n) with the edge pixel repeated
    idx = np.where(idx < 0, -idx - 1, idx)
    idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
    mat = np.zeros((m, n))
    np.add.at(mat, (np.repeat(np.arange(m), idx.shape[1]), idx.ravel()), w.ravel())
    return mat


def imresize_half(img: np.ndarray) -> np.ndarray:
    """MATLAB ``imresize(img, 0.5)`` (bicubic, antialiased) of a 2-D float image."""
    return _resize_matrix(img.shape[0], 0.5) @ img @ _resize_matrix(img.shape[1], 0.5).T


@lru_cache(maxsize=1)
def _aggd_table() -> tuple[np.ndarray, np.ndarray]:
    gam = np.arange(0.2, 10.001, 0.001)
    gamma = np.vectorize(math.gamma)
    return gam, gamma(2 / gam) ** 2 / (gamma(1 / gam) * gamma(3 / gam))


def _aggd(x: np.ndarray) -> tuple[float, float, float]:
    """Asymmetric generalised Gaussian fit by moment matching: (alpha, beta_left, beta_right)."""
    gam, r_gam = _aggd_table()
    x = x.ravel()
    left = math.sqrt(np.mean(x[x < 0] ** 2)) if np.any(x < 0) else math.nan
    right = math.sqrt(np.mean(x[x > 0] ** 2)) if np.any(x > 0) else math.nan
    gammahat = left / right
    rhat = np.mean(np.abs(x)) ** 2 / np.mean(x**2)
    rhatnorm = rhat * (gammahat**3 + 1) * (gammahat + 1) / (gammahat**2 + 1) ** 2
    alpha = float(gam[np.argmin((r_gam - rhatnorm) ** 2)])
    ratio = math.sqrt(math.gamma(1 / alpha) / math.gamma(3 / alpha))
    return alpha, left * ratio, right * ratio


def _block_features(block: np.ndarray) -> list[float]:
    """The 18 NIQE features of one normalised block: the AGGD fit of the coefficients, then of the products with
    the four neighbours (right, down, down-right, down-left)."""
    alpha, bl, br = _aggd(block)
    feats = [alpha, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        alpha, bl, br = _aggd(block * np.roll(block, shift, axis=(0, 1)))
        feats += [alpha, (br - bl) * math.gamma(2 / alpha) / math.gamma(1 / alpha), bl, br]
    return feats


@lru_cache(maxsize=1)
def _pristine() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from safetensors.numpy import load

    data = load(resources.files("training.weights").joinpath("niqe_pris_params.safetensors").read_bytes())
    return data["mu_pris_param"].ravel(), data["cov_pris_param"], data["gaussian_window"]


def niqe(img: np.ndarray, crop_border: int = 0, block: int = 96) -> float:
    """NIQE of a BGR uint8 image [H, W, 3] (or a grey/Y image [H, W] in [0, 255]); lower is better.

    The image must hold at least one ``block`` x ``block`` block (it is cropped to whole blocks).
    """
    import cv2

    y = bgr_to_y(img) if img.ndim == 3 else img.astype(np.float64)
    y = np.round(_crop(y, crop_border))
    nh, nw = y.shape[0] // block, y.shape[1] // block
    if nh == 0 or nw == 0:
        raise ValueError(f"NIQE needs an image of at least {block}x{block} pixels, got {y.shape[1]}x{y.shape[0]}")
    y = y[: nh * block, : nw * block]
    mu_p, cov_p, window = _pristine()
    per_scale = []
    for scale in (1, 2):
        mu = cv2.filter2D(y, -1, window, borderType=cv2.BORDER_REPLICATE)
        sigma = np.sqrt(np.abs(cv2.filter2D(y * y, -1, window, borderType=cv2.BORDER_REPLICATE) - mu * mu))
        norm = (y - mu) / (sigma + 1)
        b = block // scale
        per_scale.append(np.array([_block_features(norm[i * b:(i + 1) * b, j * b:(j + 1) * b])
                                   for j in range(nw) for i in range(nh)]))
        if scale == 1:
            y = imresize_half(y / 255.0) * 255.0
    feats = np.concatenate(per_scale, axis=1)
    mu_d = np.nanmean(feats, axis=0)
    cov_d = np.cov(feats[~np.isnan(feats).any(axis=1)], rowvar=False)
    diff = mu_p - mu_d
    return float(np.sqrt(diff @ np.linalg.pinv((cov_p + cov_d) / 2) @ diff))


def _pairs(restored: Path, gt: Path) -> list[tuple[Path, Path]]:
    """Each restored image with the reference of the same name; ``<name>_00``, as ``python -m vqfr --aligned``
    names the face it restores from ``<name>``, pairs with ``<name>`` too. Unpaired files are reported on stderr."""
    from training.data import list_images

    refs = {p.stem: p for p in list_images(gt)}
    pairs, unpaired = [], []
    for p in list_images(restored):
        stem = p.stem if p.stem in refs else p.stem.removesuffix("_00")
        if stem in refs:
            pairs.append((p, refs[stem]))
        else:
            unpaired.append(p.name)
    if not pairs:
        raise SystemExit(f"error: no file in {restored} has a namesake in {gt} (as <name> or <name>_00)")
    if unpaired:
        print(f"note: {len(unpaired)} files in {restored} have no namesake in {gt} and are left out (e.g. "
              f"{unpaired[:3]})", file=sys.stderr)
    return pairs


def finite_mean(values: list[float], empty: float = math.inf) -> float:
    """The mean of the finite values (an image identical to its reference has an infinite PSNR, which would make
    any mean infinite); ``empty`` when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else empty


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def main(argv: list[str] | None = None) -> int:
    from training.data import list_images
    from vqfr.errors import VQFRError
    from vqfr.imaging import load_image

    json_help = "print one JSON object instead of a table"
    parser = argparse.ArgumentParser(prog="python -m training.metrics", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help=json_help)
    # --json after the command too; SUPPRESS keeps a --json given before it (a default would overwrite it).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=json_help)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("psnr-ssim", parents=[common], help="PSNR and SSIM of restored images against references of "
                       "the same name (or <name>_00, as python -m vqfr --aligned names them)")
    p.add_argument("--restored", type=Path, required=True)
    p.add_argument("--gt", type=Path, required=True)
    p.add_argument("--crop-border", type=whole_number(0), default=0)
    p.add_argument("--test-y-channel", action="store_true", help="PSNR and SSIM on BT.601 luma (Y) only")
    p.add_argument("--correct-mean-var", action="store_true",
                   help="first match each channel's mean and standard deviation of the restored image to the "
                        "reference's, as the official evaluation script always does")
    n = sub.add_parser("niqe", parents=[common], help="NIQE (no reference) of every image in a folder")
    n.add_argument("folder", type=Path)
    n.add_argument("--crop-border", type=whole_number(0), default=0)
    args = parser.parse_args(argv)

    rows: list[dict] = []
    a: Path | None = None
    try:
        if args.command == "psnr-ssim":
            for a, b in _pairs(args.restored, args.gt):
                img, ref = load_image(a), load_image(b)
                scored = correct_mean_var(img, ref) if args.correct_mean_var else img
                rows.append({"name": a.stem, "psnr": psnr(scored, ref, args.crop_border, args.test_y_channel),
                             "ssim": ssim(scored, ref, args.crop_border, args.test_y_channel)})
        else:
            for a in list_images(args.folder):
                rows.append({"name": a.stem, "niqe": niqe(load_image(a), args.crop_border)})
    except (VQFRError, ValueError) as exc:  # a missing folder, an unreadable image, or one a metric cannot measure
        where = "" if isinstance(exc, VQFRError) or a is None else f"{a}: "
        print(f"error: {where}{exc}", file=sys.stderr)
        return 1
    keys = [k for k in rows[0] if k != "name"]
    mean = {k: finite_mean([r[k] for r in rows]) for k in keys}
    if args.json:  # strict JSON: an infinite PSNR (an image identical to its reference) is written as null
        print(json.dumps({"images": [{k: _json_number(v) for k, v in r.items()} for r in rows],
                          "mean": {k: _json_number(v) for k, v in mean.items()}}, allow_nan=False))
        return 0
    for r in rows:
        print(f"{r['name']:40s} " + " ".join(f"{k} {r[k]:8.4f}" for k in keys))
    print(f"{'mean (' + str(len(rows)) + ' images)':40s} " + " ".join(f"{k} {mean[k]:8.4f}" for k in keys))
    return 0


if __name__ == "__main__":
    from vqfr.errors import exit_status

    raise SystemExit(exit_status(main))
