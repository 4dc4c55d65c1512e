"""VQFR blind face restoration: the exact PyTorch reference and a fast runtime.

Public API: :class:`Runtime` (restore photos and faces on the fastest backend), :func:`build_model`,
:func:`load_model`, :func:`save_safetensors`, and the error types. Importing ``vqfr`` imports neither onnx,
onnxruntime, tensorrt, triton nor cv2.
"""

from vqfr.checkpoint import load_model, save_safetensors
from vqfr.errors import (
    BackendUnavailable,
    CheckpointError,
    ConfigError,
    EngineError,
    InputError,
    OutputError,
    VQFRError,
)
from vqfr.models import build_model
from vqfr.runtime import Runtime

__all__ = ["Runtime", "build_model", "load_model", "save_safetensors", "VQFRError", "InputError", "CheckpointError",
           "ConfigError", "EngineError", "BackendUnavailable", "OutputError"]
__version__ = "0.1.0"
