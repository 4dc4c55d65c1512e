"""PyTorch backend: the reference model from a ``.pth`` / ``.safetensors`` checkpoint or an in-memory module.

On CUDA the model's deformable convolution and nearest-code search dispatch to the Triton kernels in ``kernels/``
(pure torch elsewhere). ``precision="fp16"`` / ``"bf16"`` casts the weights on CUDA, keeping GroupNorm, LayerNorm,
attention, code selection and the last convolution in fp32 (:mod:`vqfr.backends.torch_fast`); on the CPU only fp32
is offered. ``"auto"`` is fp32: exact against the official outputs.

Two modes (``mode=`` or ``$VQFR_TORCH_MODE``):

- ``eager`` (default): the model as it is, ready at once.
- ``max``: the fastest path (:mod:`vqfr.backends.torch_fast`): fp16 with fp32 islands by default on CUDA,
  channels_last, torch.compile per batch size and CUDA graphs. The first batch of each size (and, for v2, each
  fidelity kind: all 0 or not) compiles and captures, which takes a minute or more; later ones replay.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from typing import Any

import torch
from torch import Tensor, nn

from vqfr.backends.base import Backend, BackendEntry, cuda_missing
from vqfr.backends.torch_fast import FastOptions, FastRunner, with_fp32_islands, with_fused_group_norm
from vqfr.errors import ConfigError
from vqfr.sidecar import EngineMeta

__all__ = ["TorchBackend", "MODES", "MODE_ENV"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Valid ``mode`` values.
MODES = ("eager", "max")
#: Environment variable giving the default mode.
MODE_ENV = "VQFR_TORCH_MODE"


class TorchBackend(Backend):
    """Runs a VQFR ``nn.Module`` (see :class:`~vqfr.backends.base.Backend` for the protocol).

    Args:
        mode: ``"eager"`` or ``"max"`` (None: ``$VQFR_TORCH_MODE``, else eager).
        fast: options of the max mode (:class:`~vqfr.backends.torch_fast.FastOptions`).
        *args, **kwargs: as :class:`~vqfr.backends.base.Backend`.
    """

    def __init__(self, *args: Any, mode: str | None = None, fast: FastOptions | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        mode = (mode or os.environ.get(MODE_ENV, "") or "eager").strip().lower()
        if mode not in MODES:
            raise ConfigError(f"unknown torch backend mode {mode!r}", fix=f"use one of {', '.join(MODES)} "
                              f"(argument mode= or ${MODE_ENV})")
        self.mode = mode
        self.fast = (fast or FastOptions()).resolved(self.device)
        self.runner: FastRunner | None = None

    @classmethod
    def check(cls, entry: BackendEntry, meta: EngineMeta | None) -> tuple[str | None, str]:
        if entry.device == "cuda":
            reason = cuda_missing()
            if reason:
                return reason, ""
            kernels = "Triton kernels" if importlib.util.find_spec("triton") else "reference kernels (no triton)"
            return None, f"{torch.cuda.get_device_name()}, {kernels}"
        threads = torch.get_num_threads()
        return None, f"torch {torch.__version__}, {threads} thread{'s' if threads != 1 else ''}"

    def _precision(self) -> str:
        if self.requested_precision == "auto":
            return "fp16" if self.mode == "max" and self.device.type == "cuda" else "fp32"
        if self.requested_precision not in _DTYPES:
            raise ConfigError(f"unknown precision {self.requested_precision!r}",
                              fix=f"use one of auto, {', '.join(_DTYPES)}")
        # The max mode lets the CPU run reduced precision too (bf16 on CPUs that have it; tests use it).
        if self.requested_precision != "fp32" and self.device.type != "cuda" and self.mode != "max":
            raise ConfigError(f"precision {self.requested_precision} needs a CUDA device; the CPU runs fp32",
                              fix="use precision='auto' (or --precision fp32) on the CPU")
        return self.requested_precision

    def load(self) -> None:
        from vqfr.checkpoint import load_model

        precision = self._precision()
        dtype = _DTYPES[precision]
        model = self.engine
        if not isinstance(model, nn.Module):
            model = load_model(model, options=self.options, device="cpu")
        opts: dict[str, Any] = getattr(model, "options", None) or {}
        self.arch = opts.get("type", getattr(model, "arch", type(model).__name__))
        self.face_size = _face_size(opts)
        # Casts, moves, eval() and layout changes work on a copy: never change the caller's module in place.
        if self.mode == "max" and self.fast.fused_group_norm:  # before the islands: these compute in fp32 already
            model = with_fused_group_norm(model)
        if dtype != torch.float32 and (self.mode == "eager" or self.fast.fp32_islands):
            model = with_fp32_islands(model, dtype)
        elif dtype != torch.float32 or self.mode == "max" or model is self.engine:
            model = copy.deepcopy(model).to(dtype)
        model = model.to(device=self.device).eval()
        if self.mode == "max":
            if self.fast.channels_last:
                model = model.to(memory_format=torch.channels_last)
            self.runner = FastRunner(model, str(self.arch), self.device, dtype, self.fast)
        self.model: nn.Module | None = model
        self.precision = precision
        self.dtype = dtype
        self.loaded = True

    @torch.inference_mode()
    def infer(self, x: Tensor, fidelity: Tensor) -> Tensor:
        assert self.model is not None, "load() the backend first"
        if self.device.type != "cuda":
            return self._infer(x, fidelity)
        # The Triton launches and the CUDA-graph captures run on the current device: make it this backend's, for a
        # model on another GPU than the current one (cuda:1 while cuda:0 is current).
        with torch.cuda.device(self.device):
            return self._infer(x, fidelity)

    def _infer(self, x: Tensor, fidelity: Tensor) -> Tensor:
        assert self.model is not None
        if self.runner is not None:
            return self.runner(x, fidelity.detach().to("cpu", torch.float32).reshape(-1))
        x = x.to(device=self.device, dtype=self.dtype)
        if self.arch != "VQFRv2":
            return self.model(x)
        f = fidelity.detach().to("cpu", torch.float32)
        # One Python float when uniform: lets the model skip the main branch at 0 without a device sync.
        fid: float | Tensor = float(f[0]) if bool((f == f[0]).all()) else f.to(self.device, self.dtype)
        return self.model(x, fidelity=fid)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.runner = None
        self.model = None
        super().close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.entry.label}, {self.device}, {self.precision}, mode={self.mode})"


def _face_size(opts: dict) -> int | None:
    """The face size the options imply: v2 Predict mode is fixed to ``spatial_size * 32``; v1 takes any multiple of
    32 (None: the caller's choice, 512 for the released model)."""
    if opts.get("type") == "VQFRv2" and opts.get("code_selection_mode", "Predict") == "Predict":
        patch = 2 ** (len(opts["channel_multipliers"]) - 1)
        return int(opts["quantizer_opt"]["spatial_size"][0]) * patch
    return None
