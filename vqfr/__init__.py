"""VQFR blind face restoration: the exact PyTorch reference and a fast runtime.

Public API: :class:`Runtime` (restore photos and faces on the fastest backend), :func:`build_model`,
:func:`load_model`, :func:`save_safetensors`, and the error types.

Importing ``vqfr`` is cheap: the error types are plain Python, and the rest (and torch with it) is imported on first
use, so that Ctrl-C while ``python -m vqfr`` starts is a clean exit (see :mod:`vqfr.__main__`). Importing ``vqfr``
never imports onnx, onnxruntime, tensorrt, triton nor cv2.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from vqfr.errors import (
    BackendUnavailable,
    CheckpointError,
    ConfigError,
    EngineError,
    InputError,
    OutputError,
    VQFRError,
)

if TYPE_CHECKING:
    from vqfr.checkpoint import load_model, save_safetensors
    from vqfr.models import build_model
    from vqfr.runtime import Runtime

# Public name -> the module that defines it, imported on first access (PEP 562).
_LAZY = {"Runtime": "vqfr.runtime", "build_model": "vqfr.models", "load_model": "vqfr.checkpoint",
         "save_safetensors": "vqfr.checkpoint"}

__all__ = ["Runtime", "build_model", "load_model", "save_safetensors", "VQFRError", "InputError", "CheckpointError",
           "ConfigError", "EngineError", "BackendUnavailable", "OutputError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        # a submodule (`import vqfr; vqfr.models.official_options(...)`, as when this file imported them eagerly)
        if name.isidentifier() and not name.startswith("_") and importlib.util.find_spec(f"vqfr.{name}"):
            return importlib.import_module(f"vqfr.{name}")
        raise AttributeError(f"module 'vqfr' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
