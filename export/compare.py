"""Numerical comparison of engine outputs with a reference: max abs error and PSNR.

PSNR is measured on the images users see: outputs clamped to [-1, 1] and mapped to [0, 1] (peak 1), like
``vqfr.imaging.to_images`` before its 8-bit rounding.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["Agreement", "agreement", "psnr"]


def _as_array(a) -> np.ndarray:
    return np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a, dtype=np.float64)


def psnr(a, b) -> float:
    """PSNR in dB of two [B, 3, H, W] outputs in [-1, 1] space (inf when identical)."""
    x = (np.clip(_as_array(a), -1, 1) + 1) / 2
    y = (np.clip(_as_array(b), -1, 1) + 1) / 2
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How closely an engine output matches its reference."""

    max_abs: float
    psnr_db: float

    def to_dict(self) -> dict[str, float | str]:
        return {"max_abs": self.max_abs, "psnr_db": "inf" if math.isinf(self.psnr_db) else round(self.psnr_db, 2)}

    def __str__(self) -> str:
        return f"max abs error {self.max_abs:.3g}, PSNR {self.psnr_db:.2f} dB"


def agreement(output, reference) -> Agreement:
    """Max abs error (unclamped) and PSNR of ``output`` against ``reference`` (arrays or tensors, same shape)."""
    out, ref = _as_array(output), _as_array(reference)
    if out.shape != ref.shape:
        raise ValueError(f"output shape {out.shape} differs from the reference's {ref.shape}")
    return Agreement(float(np.max(np.abs(out - ref))), psnr(out, ref))
