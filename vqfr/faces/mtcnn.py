"""MTCNN face detector with 5 landmarks (Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks", 2016), the embedded default detector.

The weights (``weights/mtcnn.safetensors``, 1.9 MB, MIT) come from the facenet-pytorch wheel; see
``weights/PROVENANCE.md``. The networks and the cascade below are written from the paper's description:

1. P-Net, a 12x12 fully convolutional proposal net, slides over an image pyramid (scale step ``factor``, smallest
   face ``min_face`` pixels); every cell above ``thresholds[0]`` proposes a box, refined by its regression.
2. R-Net rescores 24x24 crops of the surviving (squared) boxes and refines them.
3. O-Net rescores 48x48 crops and refines the boxes; a second O-Net pass on the final, squared boxes predicts the
   5 landmarks.

Non-maximum suppression follows each stage. Inputs are RGB, normalised as ``(u - 127.5) / 128``; crops are resized
with area interpolation and zero-padded where a box leaves the image.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqfr.errors import ConfigError
from vqfr.faces.detector import Detection, nms, square_boxes

__all__ = ["MTCNN", "PNet", "RNet", "ONet", "default_weights"]


def default_weights() -> Path:
    """Path of the embedded MTCNN weights."""
    return Path(str(resources.files("vqfr.faces.weights").joinpath("mtcnn.safetensors")))


class PNet(nn.Module):
    """Proposal net. [B,3,H,W] -> (face probability [B,h,w], box regression [B,4,h,w]); stride 2, 12x12 cells."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_1(x).softmax(1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    """Refinement net. [B,3,24,24] -> (face probability [B], box regression [B,4])."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu4(self.dense4(self.prelu3(self.conv3(x)).flatten(1)))
        return self.dense5_1(x).softmax(1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output net. [B,3,48,48] -> (face probability [B], box regression [B,4], landmarks [B,10] = 5 x then 5 y,
    as fractions of the box)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu5(self.dense5(self.prelu4(self.conv4(x)).flatten(1)))
        return self.dense6_1(x).softmax(1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def _normalise(img_rgb: np.ndarray) -> np.ndarray:
    return (img_rgb.astype(np.float32) - 127.5) * np.float32(1 / 128)


def _crops(img: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Square boxes [N,4] of an RGB uint8 [H,W,3] image -> [N,3,size,size] normalised float32, black outside the
    image (as the original MTCNN pads)."""
    import cv2

    h, w = img.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(np.round(boxes).astype(np.int64)):
        if x2 <= x1 or y2 <= y1:
            continue
        patch = np.zeros((y2 - y1, x2 - x1, 3), np.float32)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        if sx2 > sx1 and sy2 > sy1:
            patch[sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = img[sy1:sy2, sx1:sx2]
        out[i] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return _normalise(out).transpose(0, 3, 1, 2)


def _refine(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Apply box regression: each edge moves by its offset times the box width or height."""
    wh = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
    return boxes + reg * wh


class MTCNN:
    """The embedded default detector.

    Args:
        weights: path of an MTCNN ``.safetensors`` file (``pnet.*``, ``rnet.*``, ``onet.*``); None = the embedded one.
        device: torch device for the three networks.
        min_face: smallest face side searched, in pixels.
        thresholds: per-stage score thresholds (P-Net, R-Net, O-Net). The final 0.95 (stricter than the paper's 0.7)
            keeps textures and clutter from being reported as faces.
        factor: pyramid scale step.
        batch: crops per R-Net / O-Net call.
        max_level_pixels: the largest pyramid level P-Net runs on; on bigger photos the smallest face searched
            grows accordingly (a 16000x16000 photo is searched for faces from 96 px up), which bounds memory.
    """

    def __init__(self, weights: str | Path | None = None, *, device: str | torch.device = "cpu", min_face: int = 20,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.95), factor: float = 0.709, batch: int = 256,
                 max_level_pixels: int = 4_000_000):
        from vqfr.checkpoint import read_weights

        path = Path(weights) if weights is not None else default_weights()
        sd = read_weights(path, "MTCNN weights",
                          "pass an MTCNN .safetensors, or reinstall vqfr-deploy for the embedded weights")
        self.device = torch.device(device)
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for name, net in (("pnet", self.pnet), ("rnet", self.rnet), ("onet", self.onet)):
            part = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
            try:
                net.load_state_dict(part, strict=True)
            except RuntimeError as exc:
                raise ConfigError(f"is not an MTCNN weights file ({str(exc).splitlines()[0]})", path=path,
                                  fix="pass the embedded weights (weights=None)") from exc
            net.eval().to(self.device)
        self.min_face, self.thresholds, self.factor, self.batch = min_face, tuple(thresholds), factor, batch
        self.max_level_pixels = max_level_pixels

    def __repr__(self) -> str:
        return f"MTCNN(min_face={self.min_face}, thresholds={self.thresholds}, device={self.device})"

    def _run(self, net: nn.Module, crops: np.ndarray) -> list[np.ndarray]:
        outs: list[list[np.ndarray]] = []
        for i in range(0, len(crops), self.batch):
            res = net(torch.from_numpy(crops[i:i + self.batch]).to(self.device))
            outs.append([r.float().cpu().numpy() for r in res])
        return [np.concatenate(parts) for parts in zip(*outs, strict=True)]

    def _proposals(self, img: np.ndarray) -> np.ndarray:
        """Stage 1 over the pyramid of an RGB uint8 image -> [N, 5] (x1, y1, x2, y2, score), refined, squared."""
        import cv2

        h, w = img.shape[:2]
        scale = min(12.0 / self.min_face, float(np.sqrt(self.max_level_pixels / (h * w))))
        found = []
        while min(h, w) * scale >= 12:
            sh, sw = int(np.ceil(h * scale)), int(np.ceil(w * scale))
            level = _normalise(cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA))
            prob, reg = self.pnet(torch.from_numpy(level.transpose(2, 0, 1)[None]).to(self.device))
            prob, reg = prob[0].float().cpu().numpy(), reg[0].float().cpu().numpy()
            ys, xs = np.nonzero(prob >= self.thresholds[0])
            if len(ys):
                # Cell (y, x) of the map sees the 12x12 window at (2x, 2y) of this pyramid level.
                boxes = np.stack([2 * xs, 2 * ys, 2 * xs + 12, 2 * ys + 12], 1) / np.array([sw / w, sh / h] * 2)
                score = prob[ys, xs]
                keep = nms(boxes, score, 0.5)
                found.append(np.concatenate([_refine(boxes, reg[:, ys, xs].T)[keep], score[keep, None]], 1))
            scale *= self.factor
        if not found:
            return np.zeros((0, 5), np.float32)
        cand = np.concatenate(found)
        cand = cand[nms(cand[:, :4], cand[:, 4], 0.7)]
        cand[:, :4] = square_boxes(cand[:, :4])
        return cand

    @torch.no_grad()
    def detect(self, img: np.ndarray) -> list[Detection]:
        """Find faces in a BGR uint8 [H,W,3] image.

        Returns:
            Detections sorted by score, highest first (box, score, landmarks [5,2] as in
            :class:`~vqfr.faces.detector.Detection`).
        """
        rgb = np.ascontiguousarray(img[:, :, ::-1])
        cand = self._proposals(rgb)
        if len(cand):
            prob, reg = self._run(self.rnet, _crops(rgb, cand[:, :4], 24))
            ok = prob > self.thresholds[1]
            cand, reg = np.concatenate([cand[ok, :4], prob[ok, None]], 1), reg[ok]
            keep = nms(cand[:, :4], cand[:, 4], 0.7)
            cand = cand[keep]
            cand[:, :4] = square_boxes(_refine(cand[:, :4], reg[keep]))
        if not len(cand):
            return []
        prob, reg, _ = self._run(self.onet, _crops(rgb, cand[:, :4], 48))
        ok = prob > self.thresholds[2]
        boxes, prob = _refine(cand[ok, :4], reg[ok]), prob[ok]
        keep = nms(boxes, prob, 0.7, mode="min")
        if not len(keep):
            return []
        boxes, prob = boxes[keep], prob[keep]
        # Landmarks from a second O-Net pass on the final (squared) boxes: O-Net locates landmarks best in a
        # well-centred crop, and this removes the outliers of the first pass's looser boxes.
        squares = square_boxes(boxes)
        _, _, marks = self._run(self.onet, _crops(rgb, squares, 48))
        side = (squares[:, 2] - squares[:, 0])[:, None, None]
        # Landmarks are fractions of the box; pixel centres sit at integer coordinates, hence the -0.5.
        lms = squares[:, None, :2] + np.stack([marks[:, :5], marks[:, 5:]], 2) * side - 0.5
        return [Detection(b.astype(np.float32), float(p), lm.astype(np.float32)) for b, p, lm in zip(boxes, prob, lms,
                                                                                                         strict=True)]
