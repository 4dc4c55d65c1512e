"""The one way to import an optional heavy dependency: an ImportError that names the pip extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from kernels.dispatch import TRITON_MINIMUM, release

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


#: The oldest release of each optional package that the code works with: the floors of the extras in
#: pyproject.toml (tests/test_optional.py keeps the two equal). onnxscript 0.5 lacks the API torch >= 2.11 calls.
MINIMUM = {"onnx": "1.17", "onnxscript": "0.6", "onnxruntime": "1.25", "polygraphy": "0.49", "tensorrt": "10.1",
           "matplotlib": "3.7", "triton": TRITON_MINIMUM, "scipy": "1.10"}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise ImportError saying which extra provides it, or that it is older than
    :data:`MINIMUM` allows.

    Args:
        module: e.g. ``"onnxruntime"``.
        purpose: what it is needed for, e.g. ``"running .onnx engines"``.
    """
    top = module.split(".")[0]
    extra = _EXTRAS.get(module, _EXTRAS.get(top, "dev"))
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is needed for {purpose} but is not installed ({exc}). "
            f"Install it with: pip install 'vqfr-deploy[{extra}]'"
        ) from exc
    version = getattr(importlib.import_module(top), "__version__", None) if top in MINIMUM else None
    if isinstance(version, str) and release(version) < release(MINIMUM[top]):
        raise ImportError(f"{top} {version} is too old for {purpose} (vqfr-deploy needs >= {MINIMUM[top]}). "
                          f"Upgrade it with: pip install -U 'vqfr-deploy[{extra}]'")
    return imported


def available(module: str) -> bool:
    """True when ``module`` can be imported (without importing it twice)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
