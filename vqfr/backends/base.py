"""The backend protocol and THE table of backends.

A backend runs the restoration network on a batch: ``infer(x [B,3,S,S] float32 in [-1,1], fidelity [B] float32)
-> [B,3,S,S]`` (unclamped, [-1,1] space). It is built from a table entry and an engine (a file, or an in-memory
``nn.Module`` for the torch backend), loads it in :meth:`Backend.load`, and releases it in :meth:`Backend.close`
(also as a context manager).

:data:`BACKENDS` lists every backend, fastest first. ``backend="auto"`` takes the first entry that loads the
engine's file type and is usable here; :func:`availability` says for every entry whether it is usable and why not.
The CLI's ``--backend`` choices and the error listing valid names come from the same table.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import importlib.util
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vqfr.errors import BackendUnavailable
from vqfr.sidecar import EngineMeta

__all__ = ["Backend", "BackendEntry", "Availability", "BACKENDS", "BACKEND_NAMES", "MODULE", "engine_kind",
           "availability", "candidates", "missing_package", "cuda_missing", "reasons", "pad_batch"]

#: The "suffix" of an in-memory nn.Module engine.
MODULE = "nn.Module"


@dataclasses.dataclass(frozen=True)
class BackendEntry:
    """One row of the table.

    Attributes:
        name: what ``backend=`` takes: ``tensorrt``, ``onnxruntime``, ``aoti`` or ``torch``.
        device: ``cuda`` or ``cpu``.
        suffixes: engine kinds it loads (file suffixes, or :data:`MODULE`).
        target: ``"module:Class"`` of the backend class (imported only when needed).
        provider: the onnxruntime execution provider, for onnxruntime rows.
    """

    name: str
    device: str
    suffixes: tuple[str, ...]
    target: str
    provider: str | None = None

    @property
    def label(self) -> str:
        """Unique, readable id: ``tensorrt``, ``onnxruntime[TensorRT EP]``, ``torch[cpu]`` ..."""
        if self.provider:
            return f"{self.name}[{_PROVIDER_LABELS.get(self.provider, self.provider)}]"
        return self.name if self.name == "tensorrt" else f"{self.name}[{self.device}]"

    def backend_class(self) -> type[Backend]:
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)


_PROVIDER_LABELS = {"TensorrtExecutionProvider": "TensorRT EP", "CUDAExecutionProvider": "CUDA EP",
                    "CPUExecutionProvider": "CPU"}
_ORT = "vqfr.backends.onnxruntime:OnnxRuntimeBackend"
_TORCH = "vqfr.backends.torch:TorchBackend"
_AOTI = "vqfr.backends.aoti:AOTIBackend"
_WEIGHTS = (".pth", ".safetensors", MODULE)

#: Every backend, fastest first (DESIGN.md, "Choosing a backend").
BACKENDS: tuple[BackendEntry, ...] = (
    BackendEntry("tensorrt", "cuda", (".engine", ".plan"), "vqfr.backends.tensorrt:TensorRTBackend"),
    BackendEntry("onnxruntime", "cuda", (".onnx",), _ORT, provider="TensorrtExecutionProvider"),
    BackendEntry("onnxruntime", "cuda", (".onnx",), _ORT, provider="CUDAExecutionProvider"),
    BackendEntry("aoti", "cuda", (".pt2",), _AOTI),
    BackendEntry("torch", "cuda", _WEIGHTS, _TORCH),
    BackendEntry("onnxruntime", "cpu", (".onnx",), _ORT, provider="CPUExecutionProvider"),
    BackendEntry("aoti", "cpu", (".pt2",), _AOTI),
    BackendEntry("torch", "cpu", _WEIGHTS, _TORCH),
)

#: Valid ``backend=`` values.
BACKEND_NAMES: tuple[str, ...] = ("auto", *dict.fromkeys(e.name for e in BACKENDS))
DEVICES = ("auto", "cuda", "cpu")


@dataclasses.dataclass(frozen=True)
class Availability:
    """Whether ``entry`` can run here (and, given an engine, run that engine); ``reason`` says why not."""

    entry: BackendEntry
    usable: bool
    reason: str = ""
    note: str = ""

    def __str__(self) -> str:
        state = "yes" if self.usable else "no "
        detail = self.note if self.usable else self.reason
        return f"{self.entry.label:<26} {state}  {detail}".rstrip()


def engine_kind(engine: Any) -> str:
    """The table's key for an engine: the lower-case suffix of a path, or :data:`MODULE`."""
    if engine is None or isinstance(engine, nn.Module):
        return MODULE
    return Path(engine).suffix.lower()


def missing_package(module: str, extra: str) -> str | None:
    """None if ``module`` is importable, else the reason, naming the pip extra (without importing the module)."""
    spec = importlib.util.find_spec(module)
    # A namespace package (no __init__, e.g. what type-stub packages leave behind) is not the real module.
    if spec is not None and spec.origin is not None:
        return None
    return f"{module} is not installed (pip install 'vqfr-deploy[{extra}]')"


def reasons(*found: str | None) -> str | None:
    """Join the non-empty reasons with "; " (None when there are none)."""
    text = "; ".join(r for r in found if r)
    return text or None


def cuda_missing() -> str | None:
    """None if a CUDA GPU is visible to torch, else the reason."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"no CUDA: this torch ({torch.__version__}) is a CPU-only build"
    return "no CUDA GPU visible (torch.cuda.is_available() is False)"


def candidates(kind: str | None, backend: str = "auto", device: str = "auto", *,
               path: str | Path | None = None) -> list[BackendEntry]:
    """Table rows matching ``backend`` and ``device`` that load ``kind`` (None: any kind), in table order.

    Args:
        kind: an :func:`engine_kind`, or None.
        backend: a name of :data:`BACKEND_NAMES`.
        device: ``auto``, ``cuda``, ``cuda:N`` or ``cpu``.
        path: the engine file, which the error names (None: an in-memory module, or no engine).

    Raises:
        BackendUnavailable: unknown backend or device name, or no row loads this kind of engine (the error names
            the backends that do, with their devices).
    """
    if backend not in BACKEND_NAMES:
        raise BackendUnavailable(f"unknown backend {backend!r}", path=path,
                                 fix=f"use one of {', '.join(BACKEND_NAMES)}")
    # cuda:N as torch.device takes it; anything else would fail later inside torch, without the valid forms.
    if device not in DEVICES and not re.fullmatch(r"cuda:(0|[1-9][0-9]*)", device):
        raise BackendUnavailable(f"unknown device {device!r}", path=path,
                                 fix=f"use one of {', '.join(DEVICES)} or cuda:N")
    dev = device.split(":")[0]
    rows = [e for e in BACKENDS if backend in ("auto", e.name) and dev in ("auto", e.device)]
    if kind is not None:
        rows_for_kind = [e for e in rows if kind in e.suffixes]
        if not rows_for_kind:
            reason, fix = _cannot_load(kind, backend, device)
            raise BackendUnavailable(reason, path=path, fix=fix)
        rows = rows_for_kind
    return rows


def _cannot_load(kind: str, backend: str, device: str) -> tuple[str, str]:
    """(reason, fix) for an engine kind that no row of ``backend`` on ``device`` loads."""
    what = "an in-memory nn.Module" if kind == MODULE else f"{kind} files"
    reason = f"backend={backend} on device={device} cannot load {what}"
    devices: dict[str, dict[str, None]] = {}
    for e in BACKENDS:
        if kind in e.suffixes:
            devices.setdefault(e.name, {})[e.device] = None
    if not devices:
        loaders = "; ".join(sorted({f"{e.name} ({', '.join(e.suffixes)})" for e in BACKENDS}))
        return reason, f"no backend loads {what}; backends and what they load: {loaders}"
    loaders = "; ".join(f"{name} ({', '.join(devs)})" for name, devs in devices.items())
    return reason, (f"backends that load {what}: {loaders}; pass one of them or auto, with a device it runs on "
                    "(CLI: --backend, --device)")


def pad_batch(x: Tensor, fidelity: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Repeat the last face up to ``batch`` faces, for engines that take no smaller batch (a fixed batch, or a
    TensorRT profile whose minimum is above 1); the caller keeps the first ``n`` outputs.

    Args:
        x: [n, 3, S, S] faces.
        fidelity: [n] fidelities.
        batch: the smallest batch the engine takes.

    Returns:
        x [max(n, batch), 3, S, S] and fidelity [max(n, batch)]; unchanged when ``n >= batch``.
    """
    missing = batch - x.shape[0]
    if missing <= 0 or x.shape[0] == 0:
        return x, fidelity
    return (torch.cat([x, x[-1:].expand(missing, *x.shape[1:])]),
            torch.cat([fidelity, fidelity[-1:].expand(missing)]))


def availability(engine: Any = None, meta: EngineMeta | None = None, backend: str = "auto",
                 device: str = "auto") -> list[Availability]:
    """Check every matching row of the table (all rows when ``engine`` is None)."""
    kind = None if engine is None else engine_kind(engine)
    path = None if engine is None or isinstance(engine, nn.Module) else engine
    out = []
    for entry in candidates(kind, backend, device, path=path):
        reason, note = entry.backend_class().status(entry, meta)
        out.append(Availability(entry, reason is None, reason or "", note))
    return out


class Backend(abc.ABC):
    """Base class of every backend: ``load()``, ``infer(x, fidelity)``, ``close()``; a context manager.

    Args:
        entry: its row of :data:`BACKENDS`.
        engine: a file path, or an nn.Module (torch backend only).
        meta: the engine's sidecar (None for checkpoints and modules).
        precision: ``auto``, ``fp32``, ``fp16`` or ``bf16``.
        options: model options for checkpoints (as ``vqfr.load_model`` takes them).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
    """

    def __init__(self, entry: BackendEntry, engine: Any, *, meta: EngineMeta | None = None, precision: str = "auto",
                 options: Any = None, device: str | None = None):
        self.entry, self.engine, self.meta, self.options = entry, engine, meta, options
        self.requested_precision = precision
        self.device = torch.device(device or entry.device)
        #: architecture name (``VQFRv1`` / ``VQFRv2``), face size and precision, known after load()
        self.arch: str | None = meta.arch if meta else None
        # An engine with dynamic H and W (v1 exported with --dynamic-size) takes any face size, like a checkpoint; its
        # sidecar's face_size is only the size it was traced at.
        shape = meta.inputs[0].shape if meta is not None and meta.inputs else ()
        dynamic_size = len(shape) == 4 and min(shape[2:]) < 0
        self.face_size: int | None = meta.face_size if meta and not dynamic_size else None
        self.precision: str = meta.precision if meta else "fp32"
        self.loaded = False

    @classmethod
    @abc.abstractmethod
    def check(cls, entry: BackendEntry, meta: EngineMeta | None) -> tuple[str | None, str]:
        """(reason this row cannot run here: a missing package or device, or None; a short note when it can)."""

    @classmethod
    def engine_problem(cls, entry: BackendEntry, meta: EngineMeta | None) -> str | None:
        """Why the engine described by ``meta`` cannot run on this row although ``check`` passed, i.e. the row's
        packages and device are here (built for another TensorRT version, GPU, torch or device), or None. The
        runtime raises :class:`~vqfr.errors.EngineError` rather than BackendUnavailable when it is the cause."""
        return None

    @classmethod
    def status(cls, entry: BackendEntry, meta: EngineMeta | None) -> tuple[str | None, str]:
        """(reason this row cannot run the engine here, or None; a short note when it can): :meth:`check`, then
        :meth:`engine_problem` once the packages and the device are there."""
        reason, note = cls.check(entry, meta)
        if reason:
            return reason, note
        problem = cls.engine_problem(entry, meta)
        return (problem, "") if problem else (None, note)

    @abc.abstractmethod
    def load(self) -> None:
        """Load the engine. Raises EngineError (bad file), BackendUnavailable (cannot run here)."""

    @abc.abstractmethod
    def infer(self, x: Tensor, fidelity: Tensor) -> Tensor:
        """x [B,3,S,S] float32 in [-1,1] (any device), fidelity [B] float32 -> [B,3,S,S] float (any device)."""

    def close(self) -> None:
        """Release the engine (idempotent)."""
        self.loaded = False

    @property
    def fixed_batch(self) -> int | None:
        """The only batch an engine exported with a fixed batch (``--batch N``) takes, from its sidecar; None when
        the batch is dynamic. :meth:`infer` pads smaller batches up to it (see :func:`pad_batch`)."""
        shape = self.meta.inputs[0].shape if self.meta is not None and self.meta.inputs else ()
        return shape[0] if shape and shape[0] > 0 else None

    @property
    def max_batch(self) -> int | None:
        """Largest batch the engine accepts (None: no limit)."""
        return self.fixed_batch

    @property
    def takes_fidelity(self) -> bool:
        return self.arch == "VQFRv2"

    def __enter__(self) -> Backend:
        if not self.loaded:
            self.load()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.entry.label}, {self.device}, {self.precision})"
