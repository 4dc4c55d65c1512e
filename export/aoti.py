"""Export VQFR as an AOTInductor package: ``python -m export.aoti --weights VQFR_v2.pth -o vqfr_v2.pt2``.

``torch.export`` traces the model with our custom ops (``vqfr::modulated_deform_conv2d``, ``vqfr::nearest_code``)
as single nodes, and ``torch._inductor.aoti_compile_and_package`` compiles it ahead of time into a ``.pt2``
package (C++ on the CPU, Triton and C++ on CUDA). A custom op registered with ``torch.library.triton_op`` is
compiled into the package; one with an opaque implementation stays a call through the dispatcher, so the process
that loads the package must import ``kernels.ops`` first (the runtime does).

Inductor plans memory from each op's fake (meta) kernel, so an op whose real output layout differs from its fake
one gives silently wrong results. Every export first checks both ops with ``torch.library.opcheck`` and its own
comparison of output strides (torch 2.11's opcheck compares none), and refuses to build when they disagree.

``--precision fp16`` stores weights and activations in fp16; the code-prediction head (v2 ``feat2index``) and the
last convolution stay fp32 modules, and GroupNorm, LayerNorm, softmax, the nearest-code distances and the DCN
sampling coordinates accumulate in fp32 inside their kernels. Inputs and output stay fp32.
"""

from __future__ import annotations

import argparse
import copy
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from export import metadata, source
from vqfr.atomic import atomic_path
from vqfr.errors import BackendUnavailable, ConfigError, EngineError, VQFRError, run_command
from vqfr.models import Network
from vqfr.sidecar import write_sidecar

__all__ = ["export_aoti", "trace_engine", "custom_op_problems", "fp16_model", "main"]

PRECISIONS = ("fp32", "fp16")
#: The FutureWarning torch 2.11-2.13 give on every compilation (see :func:`export_aoti`), as a filter's regex.
_LEAFSPEC_WARNING = re.escape("`isinstance(treespec, LeafSpec)` is deprecated")
#: Modules kept in fp32 by ``--precision fp16``, per architecture: the last convolution and the code predictor.
FP32_MODULES = {"VQFRv1": ("main_decoder.conv_out.0",), "VQFRv2": ("decoder.conv_out.2", "feat2index")}


def _probe_args(device: str) -> dict[str, tuple[Any, ...]]:
    """Small inputs for each custom op, with a batch of 2 (layouts that depend on the batch show up)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    import kernels.ops  # noqa: F401 - registers torch.ops.vqfr.*

    return {
        "vqfr::modulated_deform_conv2d": (
            torch.ops.vqfr.modulated_deform_conv2d.default,
            (randn(2, 8, 5, 6), randn(2, 36, 5, 6), randn(2, 18, 5, 6).sigmoid(), randn(8, 8, 3, 3), randn(8),
             [1, 1], [1, 1], [1, 1]),
        ),
        "vqfr::nearest_code": (torch.ops.vqfr.nearest_code.default, (randn(7, 4), randn(5, 4))),
    }


def custom_op_problems(device: str = "cpu", probes: dict[str, tuple[Any, tuple[Any, ...]]] | None = None) -> list[str]:
    """Custom ops whose real outputs disagree with their fake kernels (shape, dtype or strides), as messages.

    Inductor allocates and indexes op outputs by their fake kernel, so any disagreement corrupts results.

    Args:
        device: where to run the ops.
        probes: {name: (op overload, example args)}; default: VQFR's two custom ops on small inputs.
    """
    problems = []
    for name, (op, args) in (probes if probes is not None else _probe_args(device)).items():
        result = torch.library.opcheck(op, args, test_utils=("test_faketensor",), raise_exception=False)
        if result["test_faketensor"] != "SUCCESS":
            problems.append(f"{name}: {result['test_faketensor']}")
        elif mismatch := _layout_mismatch(op, args):  # opcheck of torch 2.11 compares no strides
            problems.append(f"{name}: {mismatch}")
    return problems


def _layout_mismatch(op: Any, args: tuple[Any, ...]) -> str | None:
    """How the real outputs of ``op(*args)`` differ from its fake kernel's in shape, dtype or strides (None: alike).
    Strides of size-1 dimensions do not count: nothing is indexed along them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_flatten, tree_map_only

    def strides(t: Tensor) -> tuple[int, ...]:
        return tuple(st for st, n in zip(t.stride(), t.shape, strict=True) if n != 1)

    real, _ = tree_flatten(op(*args))
    with FakeTensorMode() as mode:
        fake, _ = tree_flatten(op(*tree_map_only(Tensor, mode.from_tensor, args)))
    if len(real) != len(fake):
        return f"the kernel gives {len(real)} outputs, its fake kernel {len(fake)}"
    for i, (r, f) in enumerate(zip(real, fake, strict=True)):
        if not isinstance(r, Tensor):
            continue
        if (r.shape, r.dtype, strides(r)) != (f.shape, f.dtype, strides(f)):
            return (f"output {i}: the kernel gives shape {tuple(r.shape)}, {r.dtype}, strides {r.stride()}; its "
                    f"fake kernel declares {tuple(f.shape)}, {f.dtype}, strides {f.stride()}")
    return None


class _Fp32(nn.Module):
    """Runs ``inner`` (kept in fp32) on an fp32 copy of its input."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner.float()

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.float())


class _Fp16Io(Network):
    """fp32 input -> fp16 ``model`` -> fp32 output; keeps ``options`` and ``patch`` so it wraps like a model."""

    def __init__(self, model: Network):
        super().__init__()
        self.model = model
        self.options, self.patch = model.options, model.patch

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        return self.model(x.half(), **kwargs).float()


def fp16_model(model: Network) -> Network:
    """A copy of ``model`` in fp16 with the modules of :data:`FP32_MODULES` kept in fp32."""
    half = copy.deepcopy(model).half()
    for path in FP32_MODULES[model.options["type"]]:
        parent_path, _, child = path.rpartition(".")
        parent = half.get_submodule(parent_path) if parent_path else half
        setattr(parent, child, _Fp32(getattr(parent, child)))
    return half


def trace_engine(model: Network, spec: source.ExportSpec, precision: str, device: str) -> Any:
    """``torch.export`` of the engine module (fp32, or fp16 with fp32 islands) on ``device``."""
    engine = source.engine_module(_Fp16Io(fp16_model(model)) if precision == "fp16" else model).to(device)
    inputs = tuple(t.to(device) for t in spec.example_inputs())
    with torch.no_grad():
        return torch.export.export(engine, inputs, dynamic_shapes=spec.dynamic_shapes(model.patch), strict=False)


def export_aoti(
    weights: str | Path | None,
    output: str | Path,
    *,
    config: Any = None,
    precision: str = "fp32",
    device: str = "cuda",
    batch: int | None = None,
    size: int | None = None,
    dynamic_size: bool = False,
    random_weights: int | None = None,
    inductor_configs: dict[str, Any] | None = None,
) -> Path:
    """Compile a VQFR model into an AOTInductor package, with its sidecar ``<output>.json``.

    Args:
        weights: a released checkpoint (None only with ``random_weights``).
        output: the ``.pt2`` path to write (atomically).
        config: model options as for :func:`vqfr.load_model`.
        precision: ``"fp32"`` or ``"fp16"`` (see the module docstring).
        device: ``"cuda"`` or ``"cpu"``; the package runs on that device type only.
        batch: a fixed batch size, or None for a dynamic batch.
        size: v1: the input side, a multiple of 32 (default 512); v2: fixed by its configuration.
        dynamic_size: v1 only: dynamic H and W.
        random_weights: export seeded random weights with this seed (testing only; recorded in the sidecar).
        inductor_configs: extra ``torch._inductor`` options for the compilation.

    Returns:
        The path written. The package takes ``input`` [B,3,H,W] float32 (and ``fidelity`` [B] float32 for v2) on
        ``device`` and returns ``output`` [B,3,H,W] float32.

    Raises:
        ConfigError: bad options, or an ``output`` not named ``.pt2``. BackendUnavailable: no CUDA for
        ``device="cuda"``. EngineError: a custom op's fake kernel disagrees with its real output, or the compilation
        failed. OutputError: ``output`` would overwrite ``weights`` or the ``config`` file, or its folder does not
        exist.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}", fix="pass fp32 or fp16")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be cuda or cpu, got {device!r}", fix="pass --device cuda or --device cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("AOTInductor export for CUDA needs a CUDA GPU, and torch sees none",
                                 fix="run on a GPU machine, or pass --device cpu")
    output = source.check_output(output, "aoti", weights, source.config_file(config))
    problems = custom_op_problems(device)
    if problems:
        raise EngineError("a custom op's real output disagrees with its fake kernel, so AOTInductor would compute "
                          "wrong results: " + "; ".join(problems),
                          fix="make the op return the layout its fake kernel declares (e.g. .contiguous())")
    model = source.load_source_model(weights, config, random_weights)
    spec = source.export_spec(model, batch, size, dynamic_size)
    try:
        program = trace_engine(model, spec, precision, device)
        with atomic_path(output) as tmp, warnings.catch_warnings():
            # torch 2.11-2.13 deep-copy the graph while compiling (torch._dynamo.repro.after_aot), and copying the
            # pytree LeafSpec its codegen holds warns that LeafSpec is deprecated: torch's own use, not a call of
            # ours, and no other API compiles a package. torch 2.14 copies it without the warning.
            warnings.filterwarnings("ignore", message=_LEAFSPEC_WARNING, category=FutureWarning)
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp),
                                                     inductor_configs=inductor_configs or {})
    except VQFRError:
        raise
    except Exception as exc:  # torch.export and Inductor raise many types; keep the cause
        raise EngineError(f"AOTInductor export failed ({type(exc).__name__}: {exc})",
                          fix="report this with the torch version") from exc
    built_with = {"device": device, **(metadata.gpu_info() if device == "cuda" else {})}
    meta = metadata.engine_meta(model, spec, precision=precision, weights=weights, random_weights=random_weights,
                                packages=("torch", "triton"), built_with=built_with,
                                extra={"format": "aoti", "fp32_modules": list(FP32_MODULES[model.options["type"]])
                                       if precision == "fp16" else []})
    write_sidecar(output, meta)
    return output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.aoti", description=__doc__.split("\n\n")[0])
    source.add_model_arguments(parser, PRECISIONS)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .pt2 package to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: "wrote " + str(export_aoti(
        args.weights, args.output, config=args.config, precision=args.precision, device=args.device,
        batch=args.batch, size=args.size, dynamic_size=args.dynamic_size, random_weights=args.random_weights)))


if __name__ == "__main__":
    from vqfr.errors import exit_status

    raise SystemExit(exit_status(main))
