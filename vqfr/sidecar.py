"""The engine sidecar: one JSON file beside every exported engine (``model.onnx`` -> ``model.onnx.json``).

It records what the runtime needs to serve the engine without the model code (architecture, options, face size,
input and output names and shapes, precision) and what it was built with, so that an engine built for another
TensorRT version or GPU is refused with a clear message instead of failing deep inside the runtime.

Schema (``format: vqfr-engine/1``)::

    {"format": "vqfr-engine/1", "arch": "VQFRv2", "options": {...}, "face_size": 512, "precision": "fp16",
     "inputs": [{"name": "input", "shape": [-1, 3, 512, 512], "dtype": "float32"},
                {"name": "fidelity", "shape": [-1], "dtype": "float32"}],
     "outputs": [{"name": "output", "shape": [-1, 3, 512, 512], "dtype": "float32"}],
     "weights_sha256": "...", "opset": 19,
     "built_with": {"torch": "...", "onnx": "...", "onnxscript": "...", "tensorrt": "...", "gpu": "...",
                    "compute_capability": "9.0"},
     "extra": {...}}

Dimensions of -1 are dynamic.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from vqfr.atomic import atomic_write_bytes
from vqfr.errors import EngineError

FORMAT = "vqfr-engine/1"
PRECISIONS = ("fp32", "fp16", "bf16")

__all__ = ["EngineMeta", "TensorSpec", "sidecar_path", "write_sidecar", "read_sidecar", "FORMAT"]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """An engine input or output: name, shape (-1 = dynamic) and dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclasses.dataclass(frozen=True)
class EngineMeta:
    """The parsed sidecar. See the module docstring for the fields."""

    arch: str
    options: dict[str, Any]
    face_size: int
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weights_sha256: str | None = None
    opset: int | None = None
    built_with: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def takes_fidelity(self) -> bool:
        return "fidelity" in self.input_names

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "arch": self.arch,
            "options": self.options,
            "face_size": self.face_size,
            "precision": self.precision,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "weights_sha256": self.weights_sha256,
            "opset": self.opset,
            "built_with": self.built_with,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | Path | None = None) -> EngineMeta:
        fix = "re-export the engine with python -m export.onnx / export.trt / export.aoti"
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise EngineError(f"sidecar format is {d.get('format') if isinstance(d, dict) else None!r}, "
                              f"expected {FORMAT!r}", path=path, fix=fix)
        try:
            meta = cls(
                arch=str(d["arch"]),
                options=dict(d["options"]),
                face_size=int(d["face_size"]),
                precision=str(d["precision"]),
                inputs=tuple(TensorSpec(t["name"], tuple(int(s) for s in t["shape"]), t.get("dtype", "float32"))
                             for t in d["inputs"]),
                outputs=tuple(TensorSpec(t["name"], tuple(int(s) for s in t["shape"]), t.get("dtype", "float32"))
                              for t in d["outputs"]),
                weights_sha256=d.get("weights_sha256"),
                opset=d.get("opset"),
                built_with=dict(d.get("built_with") or {}),
                extra=dict(d.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"sidecar is missing or has a malformed field ({exc!r})", path=path, fix=fix) from exc
        if meta.precision not in PRECISIONS:
            raise EngineError(f"sidecar precision {meta.precision!r} is not one of {PRECISIONS}", path=path, fix=fix)
        return meta


def sidecar_path(engine: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (so ``model.onnx`` and ``model.engine`` never share a sidecar)."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def write_sidecar(engine: str | Path, meta: EngineMeta) -> Path:
    """Write the sidecar of ``engine`` atomically; returns its path."""
    path = sidecar_path(engine)
    atomic_write_bytes(path, (json.dumps(meta.to_dict(), indent=2, sort_keys=False) + "\n").encode())
    return path


def read_sidecar(engine: str | Path) -> EngineMeta:
    """Read and validate the sidecar of ``engine``.

    Raises:
        EngineError: missing, unreadable or malformed sidecar; the message names the file and how to fix it.
    """
    path = sidecar_path(engine)
    try:
        text = path.read_text()
    except OSError as exc:
        raise EngineError(f"has no readable sidecar {path.name} ({exc.strerror})", path=engine,
                          fix="keep the .json written by the exporter beside the engine, or re-export it") from exc
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EngineError(f"sidecar is not valid JSON ({exc})", path=path, fix="re-export the engine") from exc
    return EngineMeta.from_dict(d, path=path)
