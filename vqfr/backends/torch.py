"""PyTorch backend: the reference model from a ``.pth`` / ``.safetensors`` checkpoint or an in-memory module.

On CUDA the model's deformable convolution and nearest-code search dispatch to the Triton kernels in ``kernels/``
(the reference implementation elsewhere). ``precision="fp16"`` / ``"bf16"`` casts the weights on CUDA; on the CPU only
fp32 is offered. ``"auto"`` is fp32: exact against the official outputs.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

import torch
from torch import Tensor, nn

from vqfr.backends.base import Backend, BackendEntry, cuda_missing
from vqfr.errors import ConfigError
from vqfr.sidecar import EngineMeta

__all__ = ["TorchBackend"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend(Backend):
    """Runs a VQFR ``nn.Module`` (see :class:`~vqfr.backends.base.Backend` for the protocol)."""

    @classmethod
    def check(cls, entry: BackendEntry, meta: EngineMeta | None) -> tuple[str | None, str]:
        if entry.device == "cuda":
            reason = cuda_missing()
            if reason:
                return reason, ""
            kernels = "Triton kernels" if importlib.util.find_spec("triton") else "reference kernels (no triton)"
            return None, f"{torch.cuda.get_device_name()}, {kernels}"
        return None, f"torch {torch.__version__}, {torch.get_num_threads()} threads"

    def load(self) -> None:
        from vqfr.checkpoint import load_model

        precision = "fp32" if self.requested_precision == "auto" else self.requested_precision
        if precision not in _DTYPES:
            raise ConfigError(f"unknown precision {precision!r}", fix=f"use one of auto, {', '.join(_DTYPES)}")
        if precision != "fp32" and self.device.type != "cuda":
            raise ConfigError(f"precision {precision} needs a CUDA device; the CPU runs fp32",
                              fix="use precision='auto' (or --precision fp32) on the CPU")
        model = self.engine
        if isinstance(model, nn.Module):
            if precision != "fp32":
                model = copy.deepcopy(model)  # never change the caller's module in place
        else:
            model = load_model(model, options=self.options, device="cpu")
        self.model: nn.Module | None = model.to(device=self.device, dtype=_DTYPES[precision]).eval()
        self.precision = precision
        self.dtype = _DTYPES[precision]
        opts: dict[str, Any] = getattr(model, "options", None) or {}
        self.arch = opts.get("type", getattr(model, "arch", type(model).__name__))
        self.face_size = _face_size(opts)
        self.loaded = True

    @torch.inference_mode()
    def infer(self, x: Tensor, fidelity: Tensor) -> Tensor:
        assert self.model is not None, "load() the backend first"
        x = x.to(device=self.device, dtype=self.dtype)
        if self.arch != "VQFRv2":
            return self.model(x)
        f = fidelity.detach().to("cpu", torch.float32)
        # One Python float when uniform: lets the model skip the main branch at 0 without a device sync.
        fid: float | Tensor = float(f[0]) if bool((f == f[0]).all()) else f.to(self.device, self.dtype)
        return self.model(x, fidelity=fid)

    def close(self) -> None:
        self.model = None
        super().close()


def _face_size(opts: dict) -> int | None:
    """The face size the options imply: v2 Predict mode is fixed to ``spatial_size * 32``; v1 takes any multiple of
    32 (None: the caller's choice, 512 for the released model)."""
    if opts.get("type") == "VQFRv2" and opts.get("code_selection_mode", "Predict") == "Predict":
        patch = 2 ** (len(opts["channel_multipliers"]) - 1)
        return int(opts["quantizer_opt"]["spatial_size"][0]) * patch
    return None
