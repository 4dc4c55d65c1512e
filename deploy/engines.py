"""Engines for the benchmark: exported once with the ``export`` package, cached in ``<out>/engines``, reused.

A cached engine is reused when its file name matches: architecture, the first 12 hex digits of the weights'
sha256 (of the checkpoint file; for random weights, of their options and tensors, since a ``.safetensors`` file's
header order differs from one save to the next), precision, device and batch profile. The build time of a fresh
engine is reported; a reused one reports None (``--rebuild`` rebuilds).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch

from vqfr.checkpoint import file_sha256, save_safetensors
from vqfr.errors import BackendUnavailable
from vqfr.models import Network

__all__ = ["EngineCache"]


def _exporter(module: str) -> Any:
    """``export.<module>``, or BackendUnavailable when this checkout has no ``export`` package."""
    if importlib.util.find_spec("export") is None or importlib.util.find_spec(f"export.{module}") is None:
        raise BackendUnavailable(f"the export package (export/{module}.py) is not in this checkout",
                                 fix="use a checkout that has export/, or drop this backend from --backends")
    return importlib.import_module(f"export.{module}")


class EngineCache:
    """Builds (or reuses) the engine files one model needs.

    Args:
        folder: where engines and, for random weights, the weights file live.
        model: the benchmarked model (CPU, fp32); saved as ``.safetensors`` when ``weights`` is None.
        weights: the checkpoint the model was loaded from, or None (random weights).
        rebuild: ignore cached engines.
    """

    def __init__(self, folder: str | Path, model: Network, weights: str | Path | None, rebuild: bool = False):
        self.folder = Path(folder)
        self.model, self.rebuild = model, rebuild
        self._weights = Path(weights) if weights is not None else None
        self.arch = model.options["type"]
        self._digest: str | None = None

    def weights_file(self) -> Path:
        """The checkpoint the exporters read: the user's file, or the random weights saved once."""
        if self._weights is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._weights = save_safetensors(self.model, self.folder / f"random-{self.arch}.safetensors")
        return self._weights

    def digest(self) -> str:
        """The first 12 hex digits of the weights' sha256: of the user's file, or of the random weights' options and
        tensors (the bytes of their saved file are not the same from one run to the next)."""
        if self._digest is None:
            if self._weights is not None:
                self._digest = file_sha256(self._weights)[:12]
            else:
                h = hashlib.sha256(json.dumps(self.model.options, sort_keys=True).encode())
                for name, t in sorted(self.model.state_dict().items()):
                    t = t.detach().cpu().contiguous()
                    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                self._digest = h.hexdigest()[:12]
        return self._digest

    def _path(self, kind: str, precision: str, suffix: str, extra: str = "") -> Path:
        return self.folder / f"{self.arch}-{self.digest()}-{kind}-{precision}{extra}{suffix}"

    def _build(self, path: Path, build) -> tuple[Path, float | None]:
        if path.is_file() and Path(str(path) + ".json").is_file() and not self.rebuild:
            return path, None
        self.folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        written = Path(build(path))
        return written, time.perf_counter() - start

    def onnx(self, precision: str) -> tuple[Path, float | None]:
        """(ONNX file with a dynamic batch, build seconds or None when cached)."""
        exporter = _exporter("onnx")
        path = self._path("onnx", precision, ".onnx")
        return self._build(path, lambda p: exporter.export_onnx(self.weights_file(), p, config=self.model.options,
                                                                precision=precision))

    def tensorrt(self, precision: str, max_batch: int) -> tuple[Path, float | None]:
        """(TensorRT engine for batches 1..max_batch, build seconds (with its ONNX) or None when cached)."""
        trt = _exporter("trt")
        onnx_path, onnx_s = self.onnx(precision)
        path = self._path("trt", precision, ".engine", f"-b{max_batch}")
        options = trt.BuildOptions(min_batch=1, opt_batch=max_batch, max_batch=max_batch)
        path, build_s = self._build(path, lambda p: trt.build_engine(onnx_path, p, options))
        return path, None if build_s is None else build_s + (onnx_s or 0.0)

    def aoti(self, precision: str, device: torch.device) -> tuple[Path, float | None]:
        """(AOTInductor package with a dynamic batch for ``device``, build seconds or None when cached)."""
        exporter = _exporter("aoti")
        path = self._path("aoti", precision, ".pt2", f"-{device.type}")
        return self._build(path, lambda p: exporter.export_aoti(self.weights_file(), p, config=self.model.options,
                                                                precision=precision, device=device.type))
