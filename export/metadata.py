"""Builds the engine sidecar (:class:`vqfr.sidecar.EngineMeta`) that every exporter writes beside its file."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import torch

from export.source import ExportSpec
from vqfr.checkpoint import file_sha256
from vqfr.models import Network
from vqfr.sidecar import RANDOM_WEIGHTS_NOTE, EngineMeta

__all__ = ["package_versions", "gpu_info", "engine_meta"]


def package_versions(*packages: str) -> dict[str, str]:
    """Installed versions of ``packages`` (distribution names); missing ones are left out.

    torch's is ``torch.__version__``, whose local part names the build (``2.14.1+cu130``, ``2.13.0+cpu``): the
    distribution metadata of PyPI's CUDA wheels says only ``2.14.1``.
    """
    found: dict[str, str] = {}
    for name in packages:
        if name == "torch":
            found[name] = str(torch.__version__)
            continue
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def gpu_info(device: int = 0) -> dict[str, str]:
    """``{"gpu": name, "compute_capability": "9.0"}`` of a CUDA device, or {} without one."""
    import torch

    if not torch.cuda.is_available():
        return {}
    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def engine_meta(
    model: Network,
    spec: ExportSpec,
    *,
    precision: str,
    weights: str | Path | None,
    random_weights: int | None = None,
    opset: int | None = None,
    packages: tuple[str, ...] = ("torch",),
    built_with: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> EngineMeta:
    """The sidecar of an engine exported from ``model`` with the shapes of ``spec``.

    Args:
        model: the exported model (``model.options`` is recorded).
        spec: the export's shapes (inputs, outputs, face size).
        precision: ``"fp32"`` or ``"fp16"`` (the engine's compute precision; its inputs and outputs are fp32).
        weights: the checkpoint, whose sha256 is recorded; None for random weights.
        random_weights: the seed of random weights, recorded so nobody mistakes the engine for a trained model.
        opset: the ONNX opset, if any.
        packages: distributions whose versions go into ``built_with``.
        built_with: more ``built_with`` entries (TensorRT version, GPU, ...).
        extra: free-form details (precision islands, profiles, check results).
    """
    inputs, outputs = spec.tensor_specs()
    details: dict[str, Any] = {"dynamic_batch": spec.batch is None, "dynamic_size": spec.dynamic_size,
                               "input_range": [-1.0, 1.0]}
    if weights is not None:
        details["weights"] = Path(weights).name
    else:
        details["weights"] = f"{RANDOM_WEIGHTS_NOTE}{random_weights}); NOT a trained model, for testing only"
    details.update(extra or {})
    return EngineMeta(
        arch=model.options["type"],
        options=model.options,
        face_size=spec.face_size,
        precision=precision,
        inputs=inputs,
        outputs=outputs,
        weights_sha256=None if weights is None else file_sha256(weights),
        opset=opset,
        built_with={**package_versions(*packages), **(built_with or {})},
        extra=details,
    )
