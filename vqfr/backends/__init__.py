"""Inference backends behind one protocol, chosen from one table (see :mod:`vqfr.backends.base`).

The backend modules import their heavy dependency (onnxruntime, tensorrt) only when an engine is loaded.
"""

from vqfr.backends.base import (
    BACKEND_NAMES,
    BACKENDS,
    MODULE,
    Availability,
    Backend,
    BackendEntry,
    availability,
    candidates,
    engine_kind,
)

__all__ = ["BACKENDS", "BACKEND_NAMES", "MODULE", "Availability", "Backend", "BackendEntry", "availability",
           "candidates", "engine_kind"]
