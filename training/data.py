"""Training and validation data: a folder of high-quality faces (FFHQ layout) and paired LQ/HQ sets.

Samples are dicts of tensors in the model's convention: RGB, [3, H, W], float32 in [-1, 1] (``lq``, ``gt``), plus
``index`` (and, for training, ``skipped``: the unreadable files a sample replaced). Every random choice of a sample
(flip, degradation) comes from :func:`training.degradations.sample_rng` with (seed, epoch, index), so the data
stream is the same for any number of workers, processes or resumes.

A root is a folder, ``"synthetic"`` / ``"synthetic:N"`` (N procedural faces, for smoke tests), or a list of such
candidates of which the first that exists is used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from training.degradations import DegradationParams, degrade, sample_rng
from vqfr.errors import ConfigError, InputError

__all__ = ["IMAGE_SUFFIXES", "MAX_DRAWS", "list_images", "resolve_root", "synthetic_count", "synthetic_face",
           "FaceDataset", "PairedDataset", "EpochSampler", "to_model_tensor"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SYNTHETIC_DEFAULT_COUNT = 16
#: Images one training sample tries: an unreadable file is replaced by another file drawn at random, up to this many
#: in all, before the sample fails.
MAX_DRAWS = 10


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively, so both ``ffhq_512/00000.png`` and ``images1024x1024/00000/``
    layouts work), sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError("is not a folder", path=folder, fix="point dataroot_gt / dataroot_lq at a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"holds no images ({', '.join(IMAGE_SUFFIXES)})", path=folder,
                          fix="check the path, or use 'synthetic' for a smoke test")
    return files


def synthetic_count(root: str, key: str = "dataroot_gt") -> int | None:
    """N for a root that is exactly ``"synthetic"`` (the default count) or ``"synthetic:N"``; None for anything else,
    such as a folder named ``synthetic_faces``. A ``synthetic:`` count that is not a positive integer is refused."""
    if root == "synthetic":
        return SYNTHETIC_DEFAULT_COUNT
    if not root.startswith("synthetic:"):
        return None
    count = root.split(":", 1)[1]
    if not count.strip().isdigit() or int(count) < 1:
        raise ConfigError(f"{key}: {root!r} needs a positive whole number of faces after 'synthetic:'",
                          fix="write for example 'synthetic:16', or just 'synthetic'")
    return int(count)


def resolve_root(spec: str | Sequence[str], key: str = "dataroot_gt") -> str:
    """The first usable entry of ``spec``: an existing folder, or ``synthetic[:N]``. ``key`` is the config option
    that gave ``spec``, for the error."""
    candidates = [spec] if isinstance(spec, (str, Path)) else list(spec)
    for c in candidates:
        c = str(c)
        if synthetic_count(c, key) is not None or Path(c).is_dir():
            return c
    raise ConfigError(f"{key}: none of the data roots {[str(c) for c in candidates]} exists",
                      fix=f"point {key} at a folder of faces, or add 'synthetic' as a last candidate for a smoke test")


def synthetic_face(index: int, size: int, seed: int = 0) -> np.ndarray:
    """A procedural face-like BGR uint8 image (skin ellipse, eyes, brows, mouth, textured hair), deterministic in
    (index, seed). It only stands in for real faces in smoke tests."""
    import cv2

    rng = np.random.default_rng([int(seed), 7919, int(index)])
    s = size / 512.0
    bg = rng.uniform(40, 220, 3)
    ramp = np.linspace(0.7, 1.2, size, dtype=np.float32)[:, None, None]
    img = np.clip(bg[None, None, :] * ramp * np.ones((size, size, 3), np.float32), 0, 255)
    skin = rng.uniform([90, 120, 160], [150, 170, 230])
    cx, cy = size / 2 + rng.uniform(-8, 8) * s, size * 0.55 + rng.uniform(-8, 8) * s
    axes = (int(150 * s * rng.uniform(0.9, 1.1)), int(200 * s * rng.uniform(0.9, 1.1)))
    hair = np.clip(rng.uniform(10, 120) + rng.normal(0, 25, (size, size)), 0, 255).astype(np.float32)
    hair_mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(hair_mask, (int(cx), int(cy - 40 * s)), (axes[0] + int(25 * s), axes[1] + int(20 * s)), 0, 0, 360,
                255, -1)
    img[hair_mask > 0] = hair[hair_mask > 0, None] * np.array([0.6, 0.7, 0.9])
    cv2.ellipse(img, (int(cx), int(cy)), axes, 0, 0, 360, skin.tolist(), -1, cv2.LINE_AA)
    eye_y = int(cy - 40 * s)
    for side in (-1, 1):
        ex = int(cx + side * 60 * s)
        cv2.ellipse(img, (ex, eye_y), (int(26 * s) + 1, int(12 * s) + 1), 0, 0, 360, (245, 245, 245), -1, cv2.LINE_AA)
        cv2.circle(img, (ex, eye_y), int(9 * s) + 1, rng.uniform(20, 120, 3).tolist(), -1, cv2.LINE_AA)
        cv2.line(img, (ex - int(30 * s), eye_y - int(30 * s)), (ex + int(30 * s), eye_y - int(34 * s)),
                 (40, 40, 60), max(1, int(7 * s)), cv2.LINE_AA)
    cv2.ellipse(img, (int(cx), int(cy + 95 * s)), (int(45 * s) + 1, int(15 * s) + 1), 0, 0, 180,
                (70, 60, rng.uniform(140, 200)), max(1, int(8 * s)), cv2.LINE_AA)
    cv2.line(img, (int(cx), eye_y + int(15 * s)), (int(cx - 10 * s), int(cy + 45 * s)), (skin * 0.8).tolist(),
             max(1, int(4 * s)), cv2.LINE_AA)
    img += rng.normal(0, 3, img.shape).astype(np.float32)  # skin and background texture
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _load_square(path: Path, size: int) -> np.ndarray:
    """BGR float32 [size, size, 3] in [0, 1] from an image file (resized when its side differs)."""
    import cv2

    from vqfr.imaging import load_image

    img = load_image(path)
    h, w = img.shape[:2]
    if h != w:
        raise InputError(f"is {w}x{h}; training faces must be square, aligned crops", path=path,
                         fix="align and crop the faces first (FFHQ alignment), or remove the file")
    if h != size:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if h > size else cv2.INTER_LINEAR)
    return img.astype(np.float32) / 255.0


def to_model_tensor(img: np.ndarray) -> Tensor:
    """BGR float [H, W, 3] in [0, 1] -> RGB float32 [3, H, W] in [-1, 1] (the official normalisation)."""
    rgb = np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1), dtype=np.float32)
    return torch.from_numpy(rgb).sub_(0.5).div_(0.5)


class _ImageSource:
    """Either a list of image files or N synthetic faces, read as square BGR float images."""

    def __init__(self, root: str, size: int):
        self.root, self.size = root, size
        count = synthetic_count(root)
        if count is not None:
            self.files: list[Path] | None = None
            self.count = count
        else:
            self.files = list_images(root)
            self.count = len(self.files)

    def __len__(self) -> int:
        return self.count

    def name(self, index: int) -> str:
        return f"synthetic_{index:05d}" if self.files is None else self.files[index].stem

    def read(self, index: int) -> np.ndarray:
        if self.files is None:
            return synthetic_face(index, self.size).astype(np.float32) / 255.0
        return _load_square(self.files[index], self.size)


class FaceDataset(Dataset):
    """High-quality faces with random horizontal flips and, for stage 2, the synthetic degradation.

    Args:
        root: a folder, ``synthetic[:N]``, or a list of candidates (see :func:`resolve_root`).
        out_size: side the faces are read at (resized when a file differs).
        use_hflip: flip with probability 0.5.
        degradation: parameters of the LQ synthesis; None gives ``gt`` only (stage 1).
        seed: the data seed.

    Items: ``{"gt": [3,S,S], "lq": [3,S,S] (with a degradation), "index": int, "skipped": str}``, float32 in
    [-1, 1]. A file that cannot be read (corrupt, cut off, not square ...) is replaced by another one drawn at random
    (the same one for the same seed, epoch and index); ``skipped`` is a JSON list of ``[file, reason]`` of the files
    replaced, ``"[]"`` for most items, for the trainer to report and count. Good files cost nothing more.

    Raises:
        InputError: (on reading an item) none of :data:`MAX_DRAWS` files drawn for it could be read.
    """

    def __init__(self, root: str | Sequence[str], out_size: int, use_hflip: bool = True,
                 degradation: DegradationParams | None = None, seed: int = 0):
        self.root = resolve_root(root)
        self.source = _ImageSource(self.root, out_size)
        self.use_hflip = use_hflip
        self.degradation = degradation
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the random stream of ``epoch`` (call before iterating a DataLoader over a new epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def _read_readable(self, index: int) -> tuple[np.ndarray, list[list[str]]]:
        """The image ``index``, or when its file cannot be read one drawn in its place; with ``[file, reason]`` of
        each file that could not be read."""
        skipped: list[list[str]] = []
        current, draws = index, None
        for _ in range(MAX_DRAWS):
            try:
                return self.source.read(current), skipped
            except InputError as exc:
                skipped.append([str(exc.path or self.source.name(current)), exc.reason])
            if draws is None:  # a stream of its own: the sample's flips and degradation stay as they were
                draws = np.random.default_rng([self.seed, self.epoch, index, 1])
            n = len(self.source)
            current = (current + 1 + int(draws.integers(n - 1))) % n if n > 1 else current
        files = {file: reason for file, reason in skipped}  # a small folder repeats files
        named = "; ".join(f"{file}: {reason}" for file, reason in list(files.items())[:3])
        raise InputError(f"{MAX_DRAWS} training images drawn in a row could not be read ({named}"
                         f"{' ...' if len(files) > 3 else ''})",
                         path=self.root, fix="check that dataroot_gt holds the aligned, square face images, and "
                         "re-copy or remove the files that cannot be read")

    def __getitem__(self, index: int) -> dict:
        rng = sample_rng(self.seed, self.epoch, index)
        gt, skipped = self._read_readable(index)
        if self.use_hflip and rng.random() < 0.5:
            gt = np.ascontiguousarray(gt[:, ::-1])
        item = {"gt": to_model_tensor(gt), "index": index, "skipped": json.dumps(skipped)}
        if self.degradation is not None:
            lq, _ = degrade(gt, rng, self.degradation)
            item["lq"] = to_model_tensor(lq)
        return item


class PairedDataset(Dataset):
    """A validation set of LQ/HQ pairs matched by file stem.

    With ``dataroot_lq`` the LQ images are read from it (the official PairedImageDataset; for stage 1 both roots
    may be the same folder). Without it the LQ images are synthesised from the HQ ones with ``degradation`` and a
    fixed seed, so every validation sees the same inputs. Items: ``{"lq", "gt": [3,S,S], "name": str}``.
    """

    def __init__(self, dataroot_gt: str | Sequence[str], out_size: int, dataroot_lq: str | None = None,
                 degradation: DegradationParams | None = None, seed: int = 1234, max_images: int | None = None):
        self.gt = _ImageSource(resolve_root(dataroot_gt), out_size)
        self.size = out_size
        self.degradation, self.seed = degradation, seed
        self.indices = list(range(len(self.gt)))[:max_images]
        self.lq_files: dict[str, Path] | None = None
        if dataroot_lq is not None:
            lq_files = {p.stem: p for p in list_images(dataroot_lq)}
            missing = [self.gt.name(i) for i in self.indices if self.gt.name(i) not in lq_files]
            if missing:
                raise ConfigError(f"has no LQ image for {len(missing)} HQ images (e.g. {missing[:3]})",
                                  path=dataroot_lq, fix="give LQ and HQ files the same names")
            self.lq_files = lq_files

    def __len__(self) -> int:
        return len(self.indices)

    def drop_unreadable(self) -> dict[str, str]:
        """Read every pair once and leave out of the set those with a file that cannot be read (corrupt, cut off,
        not square ...), so that a bad file shows at the start of a run, not at its first validation hours later,
        and every validation scores the same images.

        Returns:
            ``{file: reason}`` of the files left out, in file order.
        """
        dropped: dict[str, str] = {}
        kept = []
        for index in self.indices:
            try:
                self._read_pair(index)
            except InputError as exc:
                dropped[str(exc.path or self.gt.name(index))] = exc.reason
            else:
                kept.append(index)
        self.indices = kept
        return dropped

    def _read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(HQ, LQ read from ``dataroot_lq`` or None) of the image ``index``."""
        gt = self.gt.read(index)
        lq = None if self.lq_files is None else _load_square(self.lq_files[self.gt.name(index)], self.size)
        return gt, lq

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        name = self.gt.name(index)
        gt, lq = self._read_pair(index)
        if lq is None and self.degradation is not None:
            lq, _ = degrade(gt, sample_rng(self.seed, 0, index), self.degradation)
        elif lq is None:
            lq = gt
        return {"lq": to_model_tensor(lq), "gt": to_model_tensor(gt), "name": name}


class EpochSampler(Sampler[list[int]]):
    """Batches of one rank for one epoch: a seeded permutation cut into global batches, of which rank r takes
    the r-th slice of ``batch_size`` indices. One process with batch B*W sees the same global batches as W ranks
    with batch B. Incomplete global batches are dropped.

    Args:
        length: dataset size.
        batch_size: per-rank batch size.
        world_size, rank: the process group layout.
        seed: shuffling seed; the permutation of epoch e uses (seed, e).
        shuffle: False keeps the file order.
    """

    def __init__(self, length: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True):
        self.length, self.batch_size = length, batch_size
        self.world_size, self.rank = world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0
        if self.batches_per_epoch == 0:
            raise ConfigError(f"the training set has {length} images, fewer than one global batch of "
                              f"{batch_size} x {world_size} GPUs", fix="add images or lower batch_size_per_gpu")

    @property
    def batches_per_epoch(self) -> int:
        return self.length // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch and skip its first ``start_batch`` batches (exact resume)."""
        self.epoch, self.start = int(epoch), int(start_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        global_batch = self.batch_size * self.world_size
        for b in range(self.start, self.batches_per_epoch):
            first = b * global_batch + self.rank * self.batch_size
            yield order[first:first + self.batch_size]
