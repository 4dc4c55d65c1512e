"""The engine sidecar: one JSON file beside every exported engine (``model.onnx`` -> ``model.onnx.json``).

It records what the runtime needs to serve the engine without the model code (architecture, options, face size,
input and output names and shapes, precision) and what it was built with, so that an engine built for another
TensorRT version or GPU is refused with a clear message instead of failing deep inside the runtime.

Schema (``format: vqfr-engine/1``)::

    {"format": "vqfr-engine/1", "arch": "VQFRv2", "options": {...}, "face_size": 512, "precision": "fp16",
     "inputs": [{"name": "input", "shape": [-1, 3, 512, 512], "dtype": "float32"},
                {"name": "fidelity", "shape": [-1], "dtype": "float32"}],
     "outputs": [{"name": "output", "shape": [-1, 3, 512, 512], "dtype": "float32"}],
     "weights_sha256": "...", "opset": 19, "file_size": 123456789, "file_sha256": "...",
     "built_with": {"torch": "...", "onnx": "...", "onnxscript": "...", "tensorrt": "...", "gpu": "...",
                    "compute_capability": "9.0"},
     "extra": {...}}

Dimensions of -1 are dynamic. ``file_size`` and ``file_sha256`` describe the engine file itself; :func:`write_sidecar`
fills them in, and :func:`verify_engine_file` refuses an engine that was truncated or changed since (older sidecars
without them are not checked). ``python -m vqfr.inspect_engine ENGINE [--update]`` shows and checks a
sidecar, or records the current file after a deliberate change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from vqfr.atomic import atomic_write_bytes
from vqfr.errors import EngineError

FORMAT = "vqfr-engine/1"
#: How ``extra["weights"]`` begins for an engine exported from seeded random weights (``--random-weights``);
#: for a checkpoint it is the file's name.
RANDOM_WEIGHTS_NOTE = "random (seed "
PRECISIONS = ("fp32", "fp16", "bf16")

__all__ = ["EngineMeta", "TensorSpec", "sidecar_path", "write_sidecar", "read_sidecar", "verify_engine_file",
           "FORMAT", "RANDOM_WEIGHTS_NOTE"]


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
    file_size: int | None = None
    file_sha256: str | None = None

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def takes_fidelity(self) -> bool:
        return "fidelity" in self.input_names

    @property
    def from_random_weights(self) -> bool:
        """Exported from seeded random weights (testing only), not from a checkpoint."""
        return str(self.extra.get("weights", "")).startswith(RANDOM_WEIGHTS_NOTE)

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
            "file_size": self.file_size,
            "file_sha256": self.file_sha256,
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
                file_size=None if d.get("file_size") is None else int(d["file_size"]),
                file_sha256=None if d.get("file_sha256") is None else str(d["file_sha256"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"sidecar is missing or has a malformed field ({exc!r})", path=path, fix=fix) from exc
        if meta.precision not in PRECISIONS:
            raise EngineError(f"sidecar precision {meta.precision!r} is not one of {PRECISIONS}", path=path, fix=fix)
        image = meta.inputs[0].shape if meta.inputs else ()
        # The runtime serves the engine at face_size; a fixed input size says what that must be.
        if len(image) != 4 or any(0 <= d != meta.face_size for d in image[2:]):
            raise EngineError(f"sidecar face_size {meta.face_size} does not fit its input shape {list(image)} (an "
                              "engine input is [B, 3, face_size, face_size], -1 where dynamic)", path=path, fix=fix)
        return meta


def sidecar_path(engine: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (so ``model.onnx`` and ``model.engine`` never share a sidecar)."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_sidecar(engine: str | Path, meta: EngineMeta) -> Path:
    """Write the sidecar of ``engine`` atomically; returns its path.

    When the engine file exists (exporters write it first), its size and sha256 are recorded in the sidecar
    (replacing any in ``meta``), so a truncated or altered engine is caught before it is loaded.
    """
    engine = Path(engine)
    if engine.is_file():
        meta = dataclasses.replace(meta, file_size=engine.stat().st_size, file_sha256=_sha256(engine))
    else:
        meta = dataclasses.replace(meta, file_size=None, file_sha256=None)
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
        data = path.read_bytes()
    except OSError as exc:
        raise EngineError(f"has no readable sidecar {path.name} ({exc.strerror})", path=engine,
                          fix="keep the .json written by the exporter beside the engine, or re-export it") from exc
    try:
        d = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for binary bytes
        raise EngineError(f"sidecar is not valid JSON ({exc})", path=path, fix="re-export the engine") from exc
    return EngineMeta.from_dict(d, path=path)


def verify_engine_file(engine: str | Path, meta: EngineMeta) -> None:
    """Check that ``engine`` is the file its sidecar describes (size, then sha256); a no-op for sidecars that do
    not record them.

    Raises:
        EngineError: the engine is shorter than written (truncated or replaced), its size or content changed since
            export, or it cannot be read.
    """
    engine = Path(engine)
    fix = (f"re-export it; if you changed {engine.name} on purpose, record the new file with "
           f"python -m vqfr.inspect_engine --update {engine}")
    try:
        if meta.file_size is not None:
            size = engine.stat().st_size
            if size < meta.file_size:
                raise EngineError(f"is shorter than exported (truncated or replaced): {size:,} bytes, but "
                                  f"{meta.file_size:,} were written at export (sidecar {sidecar_path(engine).name})",
                                  path=engine, fix=fix)
            if size != meta.file_size:
                raise EngineError(f"has changed since export: {size:,} bytes, the sidecar says {meta.file_size:,}",
                                  path=engine, fix=fix)
        if meta.file_sha256 is not None and _sha256(engine) != meta.file_sha256:
            raise EngineError("has changed since export (its sha256 differs from the sidecar's): corrupt or "
                              "modified", path=engine, fix=fix)
    except OSError as exc:  # missing (moved away from its sidecar) or unreadable
        raise EngineError(f"cannot read the engine ({exc.strerror})", path=engine,
                          fix="check the path: the engine file belongs next to its sidecar") from exc


if __name__ == "__main__":  # the command moved (this module is imported by the package): point old scripts to it
    raise SystemExit("vqfr: `python -m vqfr.sidecar` is now `python -m vqfr.inspect_engine`, with the same arguments")
