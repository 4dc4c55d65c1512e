"""Which implementation runs: the Triton kernels or the pure-torch references.

The choice is made per call, from the tensors and one switch:

- ``VQFR_KERNELS=auto|triton|reference`` (environment, read at every call; default ``auto``), overridden inside a
  ``with kernels.use("reference"):`` block (a context variable, so threads and tasks do not see each other's choice).
- ``auto`` runs Triton where it can run and the reference elsewhere, except float32 deformable convs, which take the
  faster ``grid_sample`` forward (within about 1e-5 of the reference). ``triton`` raises where Triton cannot run.
- Triton can run on CUDA tensors of dtype float16, bfloat16 or float32 when the ``triton`` package is installed, and on
  CPU tensors too while ``TRITON_INTERPRET=1`` is set (Triton's interpreter; this is how CI tests the kernels).
  float64 (in any tensor of the call, not only x), other devices and tensors being traced by torch.compile on the
  CPU always take the reference. The first tensor (x, z) sets the dtype the kernels compute in, as in the
  references, so mixed supported dtypes (an fp32 weight beside fp16 activations under autocast) run on Triton.

Triton is imported lazily, on the first call that runs a kernel. ``TRITON_INTERPRET`` only matters when a kernel is
decorated, so each Triton module is loaded once per mode (compiled and interpreted) and both copies can live in one
process. :data:`LAUNCHES` counts what ran, so tests can prove that the Triton path really executed.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["MODES", "LAUNCHES", "use", "active_mode", "interpreting", "interpreter_problem", "triton_installed",
           "why_not_triton", "use_triton", "use_grid_sample", "dot_precision", "Launch", "launchable", "triton_module",
           "release", "check_same_device", "check_floating", "is_traced"]

#: Valid values of ``VQFR_KERNELS`` and of :func:`use`.
MODES = ("auto", "triton", "reference")
ENV_VAR = "VQFR_KERNELS"
#: Supported dtypes of the Triton kernels (computation in fp32 whatever the storage dtype).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: ``"<op>:triton"`` / ``"<op>:reference"`` -> number of eager calls (or traces) that took that path.
LAUNCHES: collections.Counter[str] = collections.Counter()

#: Set by :mod:`kernels.ops` when it registered the ops with ``torch.library.triton_op``.
TRACEABLE_LAUNCHES = False

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("vqfr_kernels_mode", default=None)
_modules: dict[tuple[str, bool], ModuleType] = {}


def _check_mode(mode: str, source: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{source}={mode!r} is not a kernel mode; use one of {', '.join(MODES)}")
    return mode


def active_mode() -> str:
    """The mode in force: the innermost :func:`use` block, else ``$VQFR_KERNELS``, else ``"auto"``."""
    forced = _forced.get()
    if forced is not None:
        return forced
    return _check_mode(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@contextlib.contextmanager
def use(mode: str) -> Iterator[None]:
    """Force an implementation inside a ``with`` block: ``"auto"``, ``"triton"`` or ``"reference"``.

    Example:
        >>> with kernels.use("reference"):
        ...     y = model(x)
    """
    token = _forced.set(_check_mode(mode, "kernels.use(mode)"))
    try:
        yield
    finally:
        _forced.reset(token)


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is on, parsed as Triton 3.6 to 3.9 parse it: 1, true, on, yes or y in any
    case, with no surrounding spaces (``" 1"`` is off for Triton, so it is off here too)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


def triton_installed() -> bool:
    """True when the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as ``3.6.0``, ``2.14.1+cu130`` or ``2.4.0rc1``."""
    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in version.split(".")[:2])


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run our kernels with the installed packages (None when it can).

    Triton 3.6's interpreter turns a scalar kernel argument into a one-element array and calls ``int()`` on it in a
    ``range()`` loop; numpy 2.4 refuses that conversion (TypeError). Triton 3.7 and later are fine. Compiled GPU runs
    are not affected.
    """
    import importlib.metadata

    try:
        triton_version, numpy_version = (importlib.metadata.version(n) for n in ("triton", "numpy"))
    except importlib.metadata.PackageNotFoundError:
        return None
    if release(triton_version) < (3, 7) and release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter fails with numpy {numpy_version} (numpy >= 2.4 refuses its "
                "scalar conversions); install triton >= 3.7 or numpy < 2.4")
    return None


#: The oldest triton the kernels are written and tested for: the floor of the ``[gpu]`` extra in pyproject.toml.
TRITON_MINIMUM = "3.6"


@functools.cache
def triton_too_old() -> str | None:
    """Why the installed triton is too old for the kernels (None when it is not, or its version is unknown)."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None
    if release(version) < release(TRITON_MINIMUM):
        return (f"triton {version} is older than {TRITON_MINIMUM}, the oldest these kernels support "
                "(pip install -U 'vqfr-deploy[gpu]')")
    return None


def is_traced(t: Tensor) -> bool:
    """True for fake (or functionalized fake) tensors and inside torch.compile: nothing real to launch on."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t) or torch.compiler.is_compiling()


def why_not_triton(*tensors: Tensor | None, **named: Tensor | None) -> str | None:
    """Why the Triton kernels cannot take these tensors (None when they can).

    Every tensor is checked, not only the first: each must be float16, bfloat16 or float32 (a float64 or integer
    tensor anywhere, say a float64 codebook beside fp32 tokens, takes the reference) and all must be on one device.
    The first tensor (x, z) sets the device and the dtype the kernels compute in, as in the references: mixed
    supported dtypes, such as an fp32 weight beside fp16 activations under autocast, run on Triton (the others are
    read in their own dtype). Tensors passed by keyword are named in the reason; None is skipped.
    """
    present = [(name, t) for name, t in [*((f"tensor {i}", t) for i, t in enumerate(tensors)), *named.items()]
               if t is not None]
    lead_name, lead = present[0]
    if not triton_installed():
        return "the triton package is not installed (pip install 'vqfr-deploy[gpu]')"
    if too_old := triton_too_old():  # its language and autotuner APIs differ: failures deep inside a launch
        return too_old
    for name, t in present:
        if t.dtype not in TRITON_DTYPES:
            return f"{name} has dtype {t.dtype}, not one of float16, bfloat16, float32"
    devices = {t.device for _, t in present}
    if len(devices) != 1:
        return f"tensors are on several devices: {sorted(map(str, devices))}"
    if lead.device.type == "cuda":
        return None
    if lead.device.type == "cpu":
        if not interpreting():
            return "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)"
        if is_traced(lead):
            return "the interpreter only runs eagerly, not under torch.compile/export tracing"
        if lead.dtype == torch.bfloat16:  # the kernels compute in the first one's dtype (the others load as they are)
            return f"{lead_name} is bfloat16 and the interpreter has no bfloat16 (numpy lacks it)"
        return interpreter_problem()
    return f"device {lead.device} is not supported by the Triton kernels"


def check_same_device(**tensors: Tensor | None) -> None:
    """Raise ValueError naming the first tensor that is not on the device of the first one (None is skipped).

    Without this check a tensor on another device reached torch with no name (``Expected all tensors to be on the
    same device``), and a ``meta`` tensor beside CPU ones silently gave uninitialised memory as the result.
    """
    present = [(name, t) for name, t in tensors.items() if t is not None]
    lead_name, lead = present[0]
    for name, t in present[1:]:
        if t.device != lead.device:
            raise ValueError(f"{name} is on {t.device} but {lead_name} is on {lead.device}; move every tensor to "
                             f"{lead.device}")


def check_floating(op: str, **tensors: Tensor | None) -> None:
    """Raise TypeError naming the first tensor that is not floating point (None is skipped).

    Like torchvision, the ops take float16, bfloat16, float32 or float64 only: an integer x, mask or codebook used to
    be computed with (integer arithmetic in the reference, a silent conversion in the Triton kernels).
    """
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{op}: {name} has dtype {t.dtype}, but only floating-point tensors are taken (float16, "
                            f"bfloat16, float32, float64); convert it first, e.g. {name}.float()")


def use_grid_sample(x: Tensor) -> bool:
    """True when a deformable conv that does not run on Triton should take the ``grid_sample`` forward
    (:func:`kernels.deform_conv.deform_conv2d_grid_sample`) rather than the reference: mode ``auto`` and float32.
    Mode ``reference`` always gets the reference, and other dtypes too (grid_sample's fp16 coordinates would be
    wrong by up to 0.25 px at 512; float64 stays the exact specification)."""
    return active_mode() == "auto" and x.dtype == torch.float32


def use_triton(op: str, *tensors: Tensor | None, fallback: str = "reference", **named: Tensor | None) -> bool:
    """Decide the implementation of one call of ``op`` and count it in :data:`LAUNCHES` (as ``"<op>:triton"``, or
    ``"<op>:<fallback>"`` when the caller will run its fallback). The tensors are those of :func:`why_not_triton`.

    Raises:
        RuntimeError: in mode ``triton`` when the kernels cannot take these tensors (says why and the fix).
    """
    mode = active_mode()
    reason = "mode is 'reference'" if mode == "reference" else why_not_triton(*tensors, **named)
    if mode == "triton" and reason is not None:
        raise RuntimeError(f"{op}: the Triton kernel was forced ({ENV_VAR}=triton or kernels.use('triton')) but "
                           f"cannot run: {reason}. Fix: run on a CUDA GPU, set TRITON_INTERPRET=1 for CPU tensors, "
                           "or use mode 'auto'")
    chosen = reason is None
    LAUNCHES[f"{op}:{'triton' if chosen else fallback}"] += 1
    return chosen


def dot_precision(dtype: torch.dtype) -> str | None:
    """The ``input_precision`` of the kernels' ``tl.dot`` for inputs of ``dtype``: for float32, ``"tf32"`` when
    torch's matmul setting allows TF32 and ``"ieee"`` (exact) otherwise; None (the default) for fp16 and bf16.

    It reads ``torch.backends.cuda.matmul.fp32_precision`` (what Inductor reads), which reflects both of torch's APIs:
    ``torch.set_float32_matmul_precision`` / ``allow_tf32`` and the newer ``fp32_precision`` (its own or inherited
    from ``torch.backends.fp32_precision``). ``torch.get_float32_matmul_precision()`` raises once the newer API is used.
    """
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "ieee"


class Launch(NamedTuple):
    """One kernel launch: the autotuned kernel, its grid function, its positional arguments and constexpr keywords.

    The launchers build these; :mod:`kernels.aot_check` compiles exactly the same thing from meta tensors.
    """

    kernel: Any
    grid: Callable[[dict], tuple[int, ...]]
    args: list
    constexprs: dict


def launchable(kernel):
    """``kernel`` as the launchers should call it: through ``torch.library.wrap_triton`` when the ops are
    ``triton_op``s (so torch.compile and AOTInductor see the launch), directly otherwise (eager custom ops, or the
    interpreter, whose kernels wrap_triton does not take on every torch version)."""
    if TRACEABLE_LAUNCHES and not interpreting():
        return torch.library.wrap_triton(kernel)
    return kernel


def triton_module(name: str) -> ModuleType:
    """Import ``kernels.<name>`` (the module holding ``@triton.jit`` kernels) for the current interpreter mode.

    ``@triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, so the interpreted copy is loaded separately, under
    the name ``kernels.<name>__interpreted``; the compiled copy is the ordinary module.
    """
    interpret = interpreting()
    key = (name, interpret)
    module = _modules.get(key)
    if module is None:
        if not interpret:
            module = importlib.import_module(f"kernels.{name}")
        else:
            qualified = f"kernels.{name}__interpreted"
            spec = importlib.util.spec_from_file_location(qualified, Path(__file__).with_name(f"{name}.py"))
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[qualified] = module
            spec.loader.exec_module(module)
        _modules[key] = module
    return module
