"""The one way to import an optional heavy dependency: an ImportError that names the pip extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

#: module name -> (pip extra, what the user installs)
_EXTRAS = {
    "onnx": "onnx",
    "onnxscript": "onnx",
    "onnxruntime": "onnx",
    "polygraphy": "onnx",
    "tensorrt": "trt",
    "triton": "gpu",
    "matplotlib": "bench",
    "tensorboard": "train",
    "torch.utils.tensorboard": "train",
    "scipy": "train",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise ImportError saying which extra provides it.

    Args:
        module: e.g. ``"onnxruntime"``.
        purpose: what it is needed for, e.g. ``"running .onnx engines"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRAS.get(module, _EXTRAS.get(module.split(".")[0], "dev"))
        raise ImportError(
            f"{module} is needed for {purpose} but is not installed ({exc}). "
            f"Install it with: pip install 'vqfr-deploy[{extra}]'"
        ) from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported (without importing it twice)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
