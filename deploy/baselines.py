"""The baselines of every benchmark run, and the seeded weights used without a checkpoint.

- :class:`EagerBaseline`: the reference model as the official code runs it: eager, ``model.to(dtype)`` (no fp32
  islands), the reference kernels (``kernels.use("reference")``: no Triton, no grid_sample), or
- with :func:`torchvision_deform`, ``torchvision.ops.deform_conv2d`` swapped in as the official ``DCNv2Pack`` calls
  it. torchvision is optional and never needed otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import Tensor, nn

import kernels
from vqfr.models import Network

__all__ = ["SEED", "DTYPES", "seeded_weights_", "EagerBaseline", "torchvision_deform", "torchvision_problem"]

SEED = 0
M = TypeVar("M", bound=nn.Module)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def seeded_weights_(model: M, seed: int = SEED) -> M:
    """Seeded, non-trivial random weights, in place: ``export.source.randomize_`` (conv/linear weights N(0, 1/fan_in),
    biases N(0, 0.05), norm scales 1 + N(0, 0.1), codebooks N(0, 1)), so that engines exported with
    ``--random-weights`` hold the same weights.

    The official initialisation (std 0.02, zero biases) makes activations vanish, the deformable offsets ~0 and every
    error look small; these weights keep activations and offsets of realistic size.
    """
    from export.source import randomize_

    return randomize_(model, seed)


@contextlib.contextmanager
def torchvision_deform() -> Iterator[None]:
    """Swap ``torchvision.ops.deform_conv2d`` in for ``kernels.modulated_deform_conv2d`` inside the block, called as
    the official ``DCNv2Pack`` calls it (positional arguments, and the ``mean(|offset|) > 50`` check that syncs the
    host on every call). torchvision is optional and never needed otherwise.

    Raises:
        ImportError: torchvision is not installed or does not import beside this torch.
    """
    ops = importlib.import_module("torchvision.ops")
    original = kernels.modulated_deform_conv2d

    def official(x, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1):
        _ = bool(torch.mean(torch.abs(offset)) > 50)  # the official check (it logs when true): a host sync per call
        return ops.deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)

    kernels.modulated_deform_conv2d = official
    try:
        yield
    finally:
        kernels.modulated_deform_conv2d = original


def torchvision_problem(device: torch.device | None = None, precision: str = "fp32") -> str | None:
    """None when torchvision's deform_conv2d can run here, else why not.

    With ``device``, a 3x3 call in ``precision`` on it tells too: torchvision has no bf16 kernel on the CPU, for one.
    """
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed (it is optional; install one built for this torch to add these rows)"
    try:
        ops = importlib.import_module("torchvision.ops")
    except (ImportError, RuntimeError, OSError) as exc:  # a torchvision built for another torch fails here
        return f"torchvision does not import beside this torch ({str(exc).splitlines()[0]})"
    if device is None:
        return None
    zeros = functools.partial(torch.zeros, device=device, dtype=DTYPES[precision])
    try:
        ops.deform_conv2d(zeros(1, 1, 3, 3), zeros(1, 18, 3, 3), zeros(1, 1, 3, 3), None, 1, 1, 1, zeros(1, 9, 3, 3))
    except (RuntimeError, NotImplementedError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"torchvision's deform_conv2d does not run in {precision} on {device.type}: {reason[-120:]}"
    return None


class EagerBaseline:
    """The reference model as the official code runs it: eager, ``model.to(dtype)`` (no fp32 islands), the
    reference kernels (``kernels.use("reference")``) or torchvision's deformable conv. Backend-like: ``infer``,
    ``close``, ``max_batch``, ``device``."""

    max_batch = None

    def __init__(self, model: Network, device: torch.device, precision: str, deform: str = "reference"):
        self.device, self.precision, self.deform = device, precision, deform
        self.dtype = DTYPES[precision]
        self.arch = model.options["type"]
        self.model: nn.Module | None = copy.deepcopy(model).to(device=device, dtype=self.dtype).eval()

    @torch.inference_mode()
    def infer(self, x: Tensor, fidelity: Tensor) -> Tensor:
        assert self.model is not None
        with contextlib.ExitStack() as stack:
            stack.enter_context(kernels.use("reference"))
            if self.deform == "torchvision":
                stack.enter_context(torchvision_deform())
            x = x.to(self.device, self.dtype)
            if self.arch != "VQFRv2":
                return self.model(x)
            f = fidelity.detach().float().cpu()
            fid = float(f[0]) if bool((f == f[0]).all()) else f.to(self.device, self.dtype)
            return self.model(x, fidelity=fid)

    def close(self) -> None:
        self.model = None
