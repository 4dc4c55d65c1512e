"""How the benchmark measures: timed calls (CUDA events or a synchronised host clock) and output errors.

Nothing here knows about backends: :func:`time_calls` times any ``call(i)``, the comparisons take outputs and the
fp32 reference outputs on the same inputs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vqfr.errors import VQFRError

__all__ = ["Timing", "time_calls", "percentile", "psnr", "compare_outputs", "compare_images"]


@dataclasses.dataclass
class Timing:
    """Milliseconds of the timed calls, their process CPU time, and the first call's seconds (None: not separate)."""

    ms: list[float]
    cpu_ms: list[float]
    first_s: float | None


def time_calls(call: Callable[[int], Any], *, warmup: int, iters: int, device: torch.device, events: bool = True,
               row_seconds: float | None = None, on_warm: Callable[[], None] | None = None) -> Timing:
    """Time ``call(i)`` (``i`` counts calls, so the caller can rotate inputs with ``i % n``).

    With ``warmup`` >= 1 the first call is timed on its own (``first_s``), then ``warmup - 1`` more run untimed;
    with 0 every call is timed. On CUDA with ``events``, each timed call sits between two CUDA events; otherwise the
    host clock is read after ``torch.cuda.synchronize()``. ``row_seconds`` lowers ``iters`` (to at least 3) when the
    warm calls show that ``iters`` would take longer. ``on_warm()`` runs between the warm-up and the timed calls.
    """
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    first_s, i, last = None, 0, None
    for i in range(warmup):
        sync()
        start = time.perf_counter()
        call(i)
        sync()
        last = time.perf_counter() - start
        if i == 0:
            first_s = last
    i = warmup
    if row_seconds is not None and last is not None and last > 0:
        iters = max(min(iters, int(row_seconds / last)), min(iters, 3))
    ms: list[float] = []
    cpu_ms: list[float] = []
    if on_warm is not None:
        sync()
        on_warm()
    if cuda and events:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        sync()
        for j in range(iters):
            starts[j].record()
            call(i + j)
            ends[j].record()
        sync()
        ms = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    else:
        for j in range(iters):
            sync()
            c0, t0 = time.process_time(), time.perf_counter()
            call(i + j)
            sync()
            ms.append((time.perf_counter() - t0) * 1e3)
            cpu_ms.append((time.process_time() - c0) * 1e3)
    return Timing(ms, cpu_ms, first_s)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def psnr(mse: float, peak: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def compare_outputs(outputs: Sequence[Tensor], references: Sequence[Tensor]) -> tuple[float, float]:
    """(max abs error, PSNR dB) of model outputs against the fp32 reference outputs on the same inputs.

    The max abs error is taken on the raw outputs ([-1, 1] space, unclamped); the PSNR on the images they become
    (clamped to [-1, 1], mapped to [0, 1], peak 1), over all sets together. An output holding NaN or inf gives
    (inf, 0 dB).
    """
    err, sq, count, finite = 0.0, 0.0, 0, True
    for out, ref in zip(outputs, references, strict=True):
        out, ref = out.double(), ref.double()
        if out.shape != ref.shape:
            raise VQFRError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
        diff = float((out - ref).abs().max())
        finite = finite and math.isfinite(diff)  # max(0.0, nan) is 0.0: a NaN would read as exact
        err = max(err, diff)
        a, b = (out.clamp(-1, 1) + 1) / 2, (ref.clamp(-1, 1) + 1) / 2
        sq += float(((a - b) ** 2).sum())
        count += a.numel()
    if not finite:
        return math.inf, 0.0
    return err, psnr(sq / count, 1.0)


def compare_images(outputs: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> tuple[float, float]:
    """(max abs error in 8-bit levels, PSNR dB with peak 255) of uint8 images against the reference's."""
    err, sq, count = 0.0, 0.0, 0
    for out, ref in zip(outputs, references, strict=True):
        d = out.astype(np.float64) - ref.astype(np.float64)
        err = max(err, float(np.abs(d).max()))
        sq += float((d * d).sum())
        count += d.size
    return err, psnr(sq / count, 255.0)
