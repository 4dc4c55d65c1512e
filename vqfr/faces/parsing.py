"""Optional face-parsing networks for the paste-back mask, loaded by path (no parsing weights ship with vqfr).

A parser returns, for aligned faces, the region to paste: the official demo runs facexlib's ParseNet and pastes the
19-class CelebAMask-HQ labels {1..13, 15} (skin, nose, glasses, eyes, brows, ears, mouth, lips, hair, earrings),
leaving background, hat, neck and cloth (0, 14, 16, 17, 18) to the background.

Files accepted by :func:`load_parser`:

- ``.onnx``: run with onnxruntime (CPU, or CUDA when available);
- ``.pt`` / ``.ts`` / ``.jit``: TorchScript (``torch.jit.save`` of a traced or scripted parser).

The network takes [N, 3, 512, 512] float32 RGB in [-1, 1] and returns [N, 19, 512, 512] class logits (the ParseNet
convention). Export facexlib's ``parsing_parsenet.pth`` once with ``torch.jit.trace`` (or ``torch.onnx.export``)
where facexlib is installed, and pass the file with ``--parser``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from vqfr.errors import ConfigError

__all__ = ["FaceParser", "NetworkParser", "load_parser", "FACE_CLASSES"]

#: CelebAMask-HQ labels that the official demo pastes.
FACE_CLASSES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15)


@runtime_checkable
class FaceParser(Protocol):
    """``regions(faces [N,S,S,3] uint8 BGR) -> [N,S,S] float32 in [0, 1]``: 1 where the face should be pasted."""

    def regions(self, faces: np.ndarray) -> np.ndarray: ...


class NetworkParser:
    """A 19-class parsing network from an ONNX or TorchScript file (see the module docstring).

    Args:
        path: the file.
        device: ``"cpu"`` or ``"cuda"``.
        size: the network's input side (512 for ParseNet).
    """

    def __init__(self, path: str | Path, device: str = "cpu", size: int = 512):
        self.path, self.size, self.device = Path(path).expanduser(), size, device
        if not self.path.is_file():
            raise ConfigError("parsing network file not found", path=self.path,
                              fix="pass the path of a parser exported to .onnx or TorchScript (see vqfr.faces.parsing)")
        suffix = self.path.suffix.lower()
        if suffix == ".onnx":
            from vqfr._optional import require

            ort = require("onnxruntime", "running an ONNX face-parsing network")
            providers = ["CPUExecutionProvider"]
            if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            try:
                self._session = ort.InferenceSession(str(self.path), providers=providers)
            except Exception as exc:  # onnxruntime raises its own pybind error types
                raise ConfigError(f"cannot load the ONNX parser ({exc})", path=self.path,
                                  fix="re-export the parsing network") from exc
            self._run = self._run_onnx
        elif suffix in (".pt", ".ts", ".jit"):
            try:
                self._module = torch.jit.load(str(self.path), map_location=device).eval()
            except (RuntimeError, ValueError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
                raise ConfigError(f"is not a TorchScript file ({first})", path=self.path,
                                  fix="save the parser with torch.jit.save(torch.jit.trace(net, x), path)") from exc
            self._run = self._run_torch
        else:
            raise ConfigError(f"unsupported parser file type {suffix!r}", path=self.path,
                              fix="export the parser to .onnx or TorchScript (.pt)")

    def _run_onnx(self, x: np.ndarray) -> np.ndarray:
        inp = self._session.get_inputs()[0]
        batch = inp.shape[0]
        if not isinstance(batch, int) or batch <= 0 or batch == len(x):
            return self._session.run(None, {inp.name: x})[0]
        # torch.onnx.export fixes the batch size unless given dynamic axes: feed such a model that many faces at once
        outs = []
        for i in range(0, len(x), batch):
            part = x[i:i + batch]
            padded = np.concatenate([part, np.zeros((batch - len(part), *part.shape[1:]), part.dtype)])
            outs.append(self._session.run(None, {inp.name: padded})[0][:len(part)])
        return np.concatenate(outs)

    @torch.no_grad()
    def _run_torch(self, x: np.ndarray) -> np.ndarray:
        out = self._module(torch.from_numpy(x).to(self.device))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.float().cpu().numpy()

    def regions(self, faces: np.ndarray) -> np.ndarray:
        """[N,S,S,3] uint8 BGR -> [N,S,S] float32 masks (1 on the official face classes)."""
        import cv2

        side = faces.shape[1]
        if not len(faces):
            return np.zeros((0, side, side), np.float32)
        resized = np.stack([cv2.resize(f, (self.size, self.size), interpolation=cv2.INTER_LINEAR) for f in faces])
        x = ((resized[..., ::-1].astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)
        logits = self._run(np.ascontiguousarray(x))
        if logits.ndim != 4 or logits.shape[0] != len(faces) or logits.shape[1] < max(FACE_CLASSES) + 1:
            raise ConfigError(f"parser returned shape {logits.shape} for {len(faces)} faces, expected [N, 19, H, W] "
                              "logits", path=self.path,
                              fix="export a 19-class CelebAMask-HQ parser such as facexlib's ParseNet")
        labels = logits.argmax(1)
        masks = np.isin(labels, FACE_CLASSES).astype(np.float32)
        return np.stack([cv2.resize(m, (side, side), interpolation=cv2.INTER_LINEAR) for m in masks])


def load_parser(spec: str | Path | FaceParser | None, device: str = "cpu") -> FaceParser | None:
    """None -> None (feathered masks); a path -> :class:`NetworkParser`; a FaceParser object -> itself."""
    if spec is None:
        return None
    if isinstance(spec, FaceParser) and not isinstance(spec, (str, Path)):
        return spec
    return NetworkParser(spec, device=device)
