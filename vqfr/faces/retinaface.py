"""RetinaFace-R50 (Deng et al., "RetinaFace: Single-stage Dense Face Localisation in the Wild", CVPR 2020), the
detector of the official VQFR demo, for users who already have facexlib's ``detection_Resnet50_Final.pth``.

No RetinaFace weights ship with vqfr (facexlib downloads them at run time; we never do). Pass the file with
``--detector retinaface:PATH`` or ``Runtime(detector="retinaface:PATH")``. The module names below reproduce that
file's state-dict keys (``body.*`` = a torchvision-style ResNet-50 up to ``layer4``, ``fpn.*``, ``ssh1..3.*``,
``ClassHead/BboxHead/LandmarkHead.{0,1,2}.conv1x1``), so it loads strictly; a ``module.`` prefix is stripped.

Detection, as the demo runs it: the photo at full resolution, BGR minus the mean (104, 117, 123); features at
strides 8/16/32 through an FPN and SSH context modules; 2 square anchors per cell (16/32, 64/128, 256/512 px);
SSD-style decoding with variances (0.1, 0.2); score threshold 0.97; NMS at IoU 0.4. One difference: a photo over
``max_pixels`` (16 MP) is searched on an area-downscaled copy, as the network needs about 0.26 GB a megapixel (12 GB
for a 48 MP photo at full resolution); faces under about 16 px of that copy are then missed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqfr.errors import ConfigError
from vqfr.faces.detector import Detection, nms

__all__ = ["RetinaFace", "RetinaFaceNet", "prior_boxes", "decode_boxes", "decode_landmarks"]

MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCES = (0.1, 0.2)
MEAN_BGR = (104.0, 117.0, 123.0)


# ----------------------------------------------------------------------------------------------- backbone
class Bottleneck(nn.Module):
    """ResNet-50 v1.5 bottleneck (stride on the 3x3 conv); keys conv1-3, bn1-3, downsample.{0,1}."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50Body(nn.Module):
    """Stem + layer1..4; returns the stride-8, 16 and 32 features (512, 1024, 2048 channels)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        cin, layers = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers.append(nn.Sequential(*(Bottleneck(cin if i == 0 else width * 4, width, stride if i == 0 else 1)
                                          for i in range(blocks))))
            cin = width * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


# ----------------------------------------------------------------------------------------------- neck and heads
def _conv_bn(cin: int, cout: int, k: int, relu: bool) -> nn.Sequential:
    """Conv (no bias) + BN [+ ReLU]: indices 0, 1 (and 2), as in the checkpoint."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, 1, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class FPN(nn.Module):
    """Lateral 1x1s (``output1..3``), top-down nearest upsampling, 3x3 ``merge1..2``."""

    def __init__(self, cins: tuple[int, int, int], cout: int):
        super().__init__()
        self.output1, self.output2, self.output3 = (_conv_bn(c, cout, 1, True) for c in cins)
        self.merge1, self.merge2 = _conv_bn(cout, cout, 3, True), _conv_bn(cout, cout, 3, True)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        p3, p4, p5 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        p4 = self.merge2(p4 + F.interpolate(p5, size=p4.shape[2:], mode="nearest"))
        p3 = self.merge1(p3 + F.interpolate(p4, size=p3.shape[2:], mode="nearest"))
        return [p3, p4, p5]


class SSH(nn.Module):
    """Context module: 3x3 (c/2) | 5x5 as two 3x3 (c/4) | 7x7 as three 3x3 (c/4), concatenated, ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv3X3 = _conv_bn(c, c // 2, 3, False)
        self.conv5X5_1 = _conv_bn(c, c // 4, 3, True)
        self.conv5X5_2 = _conv_bn(c // 4, c // 4, 3, False)
        self.conv7X7_2 = _conv_bn(c // 4, c // 4, 3, True)
        self.conv7x7_3 = _conv_bn(c // 4, c // 4, 3, False)

    def forward(self, x: Tensor) -> Tensor:
        mid = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(mid), self.conv7x7_3(self.conv7X7_2(mid))], 1))


class _Head(nn.Module):
    def __init__(self, c: int, per_anchor: int, anchors: int = 2):
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(c, anchors * per_anchor, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.per_anchor)


class RetinaFaceNet(nn.Module):
    """[B,3,H,W] BGR minus mean -> (box offsets [B,N,4], face probability [B,N], landmark offsets [B,N,10]); N
    priors in the order of :func:`prior_boxes`."""

    def __init__(self, channels: int = 256):
        super().__init__()
        self.body = ResNet50Body()
        self.fpn = FPN((512, 1024, 2048), channels)
        self.ssh1, self.ssh2, self.ssh3 = SSH(channels), SSH(channels), SSH(channels)
        self.ClassHead = nn.ModuleList(_Head(channels, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(channels, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(channels, 10) for _ in range(3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feats = [ssh(f) for ssh, f in zip((self.ssh1, self.ssh2, self.ssh3), self.fpn(self.body(x)), strict=True)]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats, strict=True)], 1)
        conf = torch.cat([h(f) for h, f in zip(self.ClassHead, feats, strict=True)], 1)
        marks = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats, strict=True)], 1)
        return loc, conf.softmax(-1)[..., 1], marks


# ----------------------------------------------------------------------------------------------- decoding
def prior_boxes(height: int, width: int) -> np.ndarray:
    """[N, 4] float32 priors (cx, cy, w, h) as fractions of the image: per level (strides 8, 16, 32), row-major
    cells, then the level's two anchor sizes."""
    out = []
    for step, sizes in zip(STEPS, MIN_SIZES, strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * step / height, (np.arange(cols) + 0.5) * step / width,
                             indexing="ij")
        per = [np.stack([cx, cy, np.full_like(cx, s / width), np.full_like(cy, s / height)], -1) for s in sizes]
        out.append(np.stack(per, 2).reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def decode_boxes(loc: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """SSD decoding: [N,4] offsets + [N,4] priors -> [N,4] (x1, y1, x2, y2) as fractions of the image."""
    centre = priors[:, :2] + loc[:, :2] * VARIANCES[0] * priors[:, 2:]
    size = priors[:, 2:] * np.exp(loc[:, 2:] * VARIANCES[1])
    return np.concatenate([centre - size / 2, centre + size / 2], 1)


def decode_landmarks(marks: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """[N,10] offsets + [N,4] priors -> [N,5,2] landmarks as fractions of the image."""
    return priors[:, None, :2] + marks.reshape(-1, 5, 2) * VARIANCES[0] * priors[:, None, 2:]


class RetinaFace:
    """RetinaFace-R50 detector with facexlib's weights (see the module docstring).

    Args:
        weights: path of ``detection_Resnet50_Final.pth`` (or a safetensors copy).
        device: torch device.
        threshold: face score threshold (official demo: 0.97).
        nms_iou: NMS overlap (0.4).
        max_pixels: larger photos are searched on a copy downscaled to this many pixels (bounds memory).
    """

    def __init__(self, weights: str | Path, *, device: str | torch.device = "cpu", threshold: float = 0.97,
                 nms_iou: float = 0.4, max_pixels: int = 16_000_000):
        from vqfr.checkpoint import read_weights

        path = Path(weights)
        sd = read_weights(path, "RetinaFace weights", "pass facexlib's detection_Resnet50_Final.pth")
        self.net = RetinaFaceNet()
        try:
            self.net.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"does not hold RetinaFace-R50 weights ({str(exc).splitlines()[0]})", path=path,
                              fix="pass facexlib's detection_Resnet50_Final.pth (the ResNet-50 model)") from exc
        self.device = torch.device(device)
        self.net.eval().to(self.device)
        self.threshold, self.nms_iou, self.max_pixels = threshold, nms_iou, max_pixels

    def __repr__(self) -> str:
        return f"RetinaFace(R50, threshold={self.threshold}, device={self.device})"

    @torch.no_grad()
    def detect(self, img: np.ndarray) -> list[Detection]:
        """BGR uint8 [H,W,3] -> detections sorted by score (see :class:`~vqfr.faces.detector.Detection`)."""
        h, w = img.shape[:2]
        if h * w > self.max_pixels:
            import cv2

            f = math.sqrt(self.max_pixels / (h * w))
            img = cv2.resize(img, (max(int(w * f), 1), max(int(h * f), 1)), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(img.astype(np.float32) - np.array(MEAN_BGR, np.float32)).permute(2, 0, 1)[None]
        loc, score, marks = (t[0].float().cpu().numpy() for t in self.net(x.to(self.device)))
        keep = score > self.threshold
        if not keep.any():
            return []
        priors = prior_boxes(*img.shape[:2])[keep]
        scale = np.array([w, h], np.float32)  # decoded positions are fractions of the image: the photo's pixels
        boxes = decode_boxes(loc[keep], priors) * np.tile(scale, 2)
        lms = decode_landmarks(marks[keep], priors) * scale
        score = score[keep]
        order = nms(boxes, score, self.nms_iou)
        return [Detection(boxes[i].astype(np.float32), float(score[i]), lms[i].astype(np.float32)) for i in order]
