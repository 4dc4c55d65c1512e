"""The face-detector protocol, the detection record, box utilities, and :func:`load_detector`.

A detector takes a BGR uint8 photo and returns :class:`Detection` records (box, score, 5 landmarks in the order
left eye, right eye, nose, left mouth corner, right mouth corner, "left" meaning the image's left, i.e. the order of
the FFHQ template in :mod:`vqfr.faces.align`), sorted by score, highest first.

Detectors available by name or path (one table, :data:`DETECTORS`):

- ``"mtcnn"`` (default): the embedded MTCNN, weights inside the package (:mod:`vqfr.faces.mtcnn`).
- a path to facexlib's ``detection_Resnet50_Final.pth`` (RetinaFace-R50, the detector of the official demo) or
  ``"retinaface:PATH"`` (:mod:`vqfr.faces.retinaface`).
- any object with a ``detect(img) -> list[Detection]`` method.

``load_detector(..., max_pixels=N)`` (``Runtime(detector_max_pixels=N)``) caps the photo a detector built from a name
or path runs on; None keeps each detector's own limit.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vqfr.errors import ConfigError

__all__ = ["Detection", "Detector", "DETECTORS", "check_max_pixels", "load_detector", "nms", "square_boxes"]


@dataclasses.dataclass(frozen=True)
class Detection:
    """One face.

    Attributes:
        box: [4] float32 (x1, y1, x2, y2) in pixels of the input image.
        score: detector confidence in [0, 1].
        landmarks: [5, 2] float32 (x, y): left eye, right eye, nose, left mouth, right mouth (image left/right).
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def eye_distance(self) -> float:
        return float(np.linalg.norm(self.landmarks[1] - self.landmarks[0]))


@runtime_checkable
class Detector(Protocol):
    """Anything that finds faces: ``detect(img [H,W,3] uint8 BGR) -> list[Detection]`` sorted by score."""

    def detect(self, img: np.ndarray) -> list[Detection]: ...


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression.

    Args:
        boxes: [N, 4] (x1, y1, x2, y2), continuous coordinates (area = (x2 - x1) * (y2 - y1)).
        scores: [N].
        iou: overlap above which the lower-scoring box is dropped.
        mode: ``"union"`` (intersection over union) or ``"min"`` (intersection over the smaller area).

    Returns:
        [K] int64 indices of the kept boxes, highest score first.
    """
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    area = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
        overlap = inter / np.maximum(denom, 1e-12)
        order = rest[overlap <= iou]
    return np.asarray(keep, np.int64)


def square_boxes(boxes: np.ndarray) -> np.ndarray:
    """[N, 4] boxes -> the squares with the same centres and side max(width, height)."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + (w - side) / 2
    out[:, 1] = boxes[:, 1] + (h - side) / 2
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _mtcnn(path: str | None, device: str, max_pixels: int | None) -> Detector:
    from vqfr.faces.mtcnn import MTCNN

    if max_pixels is None:
        return MTCNN(path, device=device)
    return MTCNN(path, device=device, max_level_pixels=max_pixels)


def _retinaface(path: str | None, device: str, max_pixels: int | None) -> Detector:
    from vqfr.faces.retinaface import RetinaFace

    if path is None:
        raise ConfigError("the RetinaFace detector needs its weights file",
                          fix="pass --detector retinaface:/path/to/detection_Resnet50_Final.pth (facexlib's file)")
    if max_pixels is None:
        return RetinaFace(path, device=device)
    return RetinaFace(path, device=device, max_pixels=max_pixels)


#: name -> factory(weights path or None, device, max_pixels or None): what ``load_detector`` and the CLI's
#: ``--detector NAME[:PATH]`` accept.
DETECTORS = {"mtcnn": _mtcnn, "retinaface": _retinaface}


def check_max_pixels(max_pixels: Any, spec: Any = None, *, name: str = "max_pixels") -> int | None:
    """``max_pixels`` of :func:`load_detector`, checked against ``spec``: None, or a positive integer for a detector
    built here from a name or path (a detector object was built by the caller, who sets its own limit).

    Args:
        max_pixels: the value given.
        spec: the detector spec it goes with.
        name: the argument's name in the error (``Runtime`` calls it ``detector_max_pixels``).

    Raises:
        ConfigError: not a positive integer, or given with a detector object.
    """
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral) or max_pixels < 1:
        raise ConfigError(f"{name} must be a positive integer, got {max_pixels!r}",
                          fix="pass the most pixels of a photo the detector's network may see (e.g. 16000000), or "
                              "None for the detector's own limit")
    if isinstance(spec, Detector) and not isinstance(spec, (str, Path)):
        raise ConfigError(f"{name}={max_pixels} cannot be applied to a detector object ({type(spec).__name__}): "
                          "it was built by the caller",
                          fix=f"set the limit on the object (e.g. RetinaFace(path, max_pixels=N)), or drop {name}")
    return int(max_pixels)


def load_detector(spec: str | Path | Detector | None = None, device: str = "cpu", *,
                  max_pixels: int | None = None) -> Detector:
    """Resolve a detector.

    Args:
        spec: None or ``"mtcnn"`` (the embedded default), ``"NAME:PATH"`` for a detector in :data:`DETECTORS` with
            weights at PATH, a bare weights path (the kind is read from the file's keys), or a Detector object.
        device: torch device for the detector's networks.
        max_pixels: the most pixels of a photo the detector's network sees; a larger photo is searched on a
            downscaled copy (this bounds the detector's memory; faces that become too small there are missed).
            RetinaFace: its ``max_pixels`` (default 16 MP, the photo it runs on); MTCNN: its ``max_level_pixels``
            (default 4 MP, its largest pyramid level). None: the detector's default. Not for a Detector object.

    Raises:
        ConfigError: an unknown name, a file that is no detector's weights, or a bad ``max_pixels`` (see
            :func:`check_max_pixels`).
    """
    max_pixels = check_max_pixels(max_pixels, spec)
    if spec is None:
        return _mtcnn(None, device, max_pixels)
    if isinstance(spec, Detector) and not isinstance(spec, (str, Path)):
        return spec
    text = str(spec)
    name, _, path = text.partition(":") if text.split(":", 1)[0] in DETECTORS else ("", "", text)
    path = os.path.expanduser(path)  # the shell leaves the ~ of --detector=retinaface:~/x.pth to us
    if name:
        return DETECTORS[name](path or None, device, max_pixels)
    file = Path(path)
    if not file.is_file():
        raise ConfigError("is neither a detector name nor an existing weights file", path=text,
                          fix=f"use one of {sorted(DETECTORS)} or NAME:PATH, "
                              "e.g. retinaface:detection_Resnet50_Final.pth")
    return DETECTORS[_guess_kind(file)](str(file), device, max_pixels)


def _guess_kind(path: Path) -> str:
    from vqfr.checkpoint import read_weights

    sd = read_weights(path, "detector weights",
                      "pass facexlib's detection_Resnet50_Final.pth or an MTCNN .safetensors")
    keys = {k.removeprefix("module.") for k in sd}
    if any(k.startswith("pnet.") for k in keys):
        return "mtcnn"
    if any(k.startswith("body.") for k in keys) and any(k.startswith("LandmarkHead.") for k in keys):
        return "retinaface"
    raise ConfigError("holds weights of no detector known here", path=path,
                      fix=f"use one of {sorted(DETECTORS)}: MTCNN (pnet./rnet./onet. keys) or facexlib RetinaFace-R50")
