"""Export VQFR to ONNX: ``python -m export.onnx --weights VQFR_v2.pth -o vqfr_v2.onnx``.

The dynamo-based ``torch.onnx.export`` (opset >= 19) traces the model; custom translations map our ops to ONNX
(an opset newer than the installed onnx defines, or one torch.onnx fails to convert the graph to, is refused):

- ``vqfr::modulated_deform_conv2d`` -> ``DeformConv`` (opset 19; inputs X, W, offset, B, mask; ``offset_group`` = 4).
  onnxruntime runs it on the CPU and CUDA; TensorRT >= 10.1 imports it as its ``ModulatedDeformConv2d`` plugin.
- ``vqfr::nearest_code`` (v1) -> the official distances ``sum(z^2) + sum(e^2) - 2 z e^T`` and ``ArgMin`` with
  ``select_last_index=0``, so ties keep the lowest index as ``torch.argmin`` does.
- ``aten::group_norm`` -> ``Reshape [B, 32, -1]``, ``InstanceNormalization`` (unit scale, zero bias), ``Reshape``
  back, then the per-channel affine ``Mul``/``Add``. Both TensorRT (10.x: its native normalisation layer) and
  onnxruntime run it; opset-18 ``GroupNormalization`` has per-group affines (wrong for GroupNorm) and the corrected
  opset-21 form needs TensorRT >= 10.9.
- ``aten::layer_norm`` -> ``LayerNormalization``; ``aten::linear`` -> ``MatMul`` + ``Add``.

These translations tag their nodes as fp32 islands, which ``--precision fp16`` keeps in fp32 (see
:mod:`export.fp16`). The graph is constant-folded by the onnxscript optimizer. A sidecar JSON
(``model.onnx.json``) records the model, shapes, precision, opset, tool versions and the weights' sha256.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export import metadata, source
from export.compare import Agreement, agreement
from vqfr._optional import require
from vqfr.atomic import atomic_path
from vqfr.errors import ConfigError, EngineError, run_command
from vqfr.models import Network
from vqfr.sidecar import EngineMeta, write_sidecar

try:
    from export import fp16

    onnxscript = require("onnxscript", "exporting ONNX graphs")
except ImportError as exc:  # missing or too old
    if __name__ != "__main__":
        raise
    sys.exit(f"error: {exc}")  # `python -m export.onnx`: one line naming the fix, as run_command prints errors
ir = onnxscript.ir
op = onnxscript.opset19

__all__ = ["export_onnx", "translation_table", "run_onnxruntime", "check_onnx", "main", "DEFAULT_OPSET",
           "FP32_TOLERANCE", "FP16_MIN_PSNR"]

DEFAULT_OPSET = 19
#: ``--check`` passes when fp32 engines are within this max abs error of PyTorch fp32 (times the output's peak
#: magnitude when that exceeds 1: random full-size weights give outputs up to ~4, and fp32 rounding then differs by
#: ~2e-4 between PyTorch's and onnxruntime's convolutions) ...
FP32_TOLERANCE = 1e-4
#: ... and fp16 engines reach this PSNR (dB) against PyTorch fp32.
FP16_MIN_PSNR = 45.0
PRECISIONS = ("fp32", "fp16")


def _fp32_constant(values: list[float]) -> Any:
    return op.Constant(value=ir.tensor(np.asarray(values, dtype=np.float32)))


def _deform_conv(x, offset, mask, weight, bias, stride, padding, dilation):
    """vqfr::modulated_deform_conv2d -> DeformConv (same channel layout as torchvision; see kernels.deform_conv)."""
    kh, kw = weight.shape[2], weight.shape[3]
    y = op.DeformConv(x, weight, offset, bias, mask, dilations=list(dilation), group=1, kernel_shape=[kh, kw],
                      offset_group=offset.shape[1] // (2 * kh * kw), pads=[*padding, *padding], strides=list(stride))
    fp16.mark_fp32("deform_conv", [y], [x, offset, mask, weight, bias])
    return y


def _nearest_code(z, codebook):
    """vqfr::nearest_code -> ([N] int64 index of the nearest row, [N] its squared distance)."""
    zz = op.ReduceSum(op.Mul(z, z), op.Constant(value_ints=[1]), keepdims=1)
    ee = op.ReduceSum(op.Mul(codebook, codebook), op.Constant(value_ints=[1]), keepdims=0)
    ze = op.MatMul(z, op.Transpose(codebook, perm=[1, 0]))
    distance = op.Sub(op.Add(zz, ee), op.Mul(_fp32_constant([2.0]), ze))
    idx = op.ArgMin(distance, axis=1, keepdims=1, select_last_index=0)
    dist = op.GatherElements(distance, idx, axis=1)
    axis = op.Constant(value_ints=[1])
    idx, dist = op.Squeeze(idx, axis), op.Squeeze(dist, axis)
    fp16.mark_fp32("nearest_code", [idx, dist], [z, codebook])
    return idx, dist


def _group_norm(input, num_groups: int, weight=None, bias=None, eps: float = 1e-5, cudnn_enabled: bool = True):
    """aten::group_norm -> Reshape, InstanceNormalization, Reshape, per-channel Mul/Add (see module docstring)."""
    grouped = op.Reshape(input, op.Constant(value_ints=[0, num_groups, -1]))
    normed = op.InstanceNormalization(grouped, _fp32_constant([1.0] * num_groups),
                                      _fp32_constant([0.0] * num_groups), epsilon=eps)
    trailing = list(input.shape)[1:]
    if all(isinstance(d, int) for d in trailing):
        # 0 copies the (dynamic) batch; static trailing dims need no Shape op.
        y = op.Reshape(normed, op.Constant(value_ints=[0, *trailing]))
    else:
        y = op.Reshape(normed, op.Shape(input))
    channel_axes = op.Constant(value_ints=list(range(1, len(input.shape) - 1)))
    if weight is not None:
        y = op.Mul(y, op.Unsqueeze(weight, channel_axes))
    if bias is not None:
        y = op.Add(y, op.Unsqueeze(bias, channel_axes))
    fp16.mark_fp32("group_norm", [y], [input, weight, bias])
    return y


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5, cudnn_enable: bool = True):
    """aten::layer_norm -> LayerNormalization (only its first output, as TensorRT requires)."""
    if weight is None:
        weight = _fp32_constant([1.0] * int(np.prod(normalized_shape)))
    # The unused Mean and InvStdDev outputs are dropped by the optimizer; TensorRT only takes Y.
    y = op.LayerNormalization(input, weight, bias, axis=-len(normalized_shape), epsilon=eps)[0]
    fp16.mark_fp32("layer_norm", [y], [input, weight, bias])
    return y


def _linear(input, weight, bias=None):
    """aten::linear -> MatMul (+ Add). VQFR's only Linear is v2's code-prediction head, kept in fp32."""
    y = op.MatMul(input, op.Transpose(weight, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, bias)
    fp16.mark_fp32("code_prediction", [y], [input, weight, bias])
    return y


def translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export``: our ops and the fp32-island ops."""
    import kernels.ops  # noqa: F401 - registers torch.ops.vqfr.*

    return {
        torch.ops.vqfr.modulated_deform_conv2d.default: _deform_conv,
        torch.ops.vqfr.nearest_code.default: _nearest_code,
        torch.ops.aten.group_norm.default: _group_norm,
        torch.ops.aten.layer_norm.default: _layer_norm,
        torch.ops.aten.linear.default: _linear,
    }


#: Per-node metadata the exporter writes that is bulky or machine-specific (stack traces hold local paths).
_DROPPED_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notices that do not concern the user (torchvision ops it skips, pytree deprecations,
    the shared batch axis being named once)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
            yield
    finally:
        registration.setLevel(level)


def _trace(model: Network, spec: source.ExportSpec, opset: int) -> Any:
    """torch.onnx.export (dynamo) -> the optimised fp32 ``ir.Model``."""
    engine = source.engine_module(model)
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                engine, spec.example_inputs(), dynamo=True, opset_version=opset, input_names=spec.input_names,
                output_names=["output"], dynamic_shapes=spec.dynamic_shapes(model.patch),
                custom_translation_table=translation_table(), optimize=True, verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; keep the cause and say what was being exported
        raise EngineError(f"torch.onnx.export failed for {model.options['type']} ({type(exc).__name__}: {exc})",
                          fix="report this with the torch and onnxscript versions") from exc
    assert program is not None  # None only for the TorchScript exporter (dynamo=False)
    graph = program.model.graph
    for node in graph:
        for key in _DROPPED_METADATA:
            node.metadata_props.pop(key, None)
    return program.model


def run_onnxruntime(path: str | Path, inputs: tuple[torch.Tensor, ...], names: list[str]) -> np.ndarray:
    """Run an exported graph with onnxruntime on the CPU; returns its (first) output as float32."""
    ort = require("onnxruntime", "running ONNX graphs")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {name: t.detach().cpu().numpy().astype(np.float32) for name, t in zip(names, inputs, strict=True)}
    return session.run(None, feed)[0].astype(np.float32)


def check_onnx(path: str | Path, model: Network, spec: source.ExportSpec, precision: str, *,
               name: str | Path | None = None) -> Agreement:
    """Compare onnxruntime (CPU) on a fixed input with the PyTorch fp32 model.

    v2 graphs are checked at fidelity 0 and 1 (both branches), also when their batch is fixed at 1.

    Args:
        path: the graph to run.
        model, spec, precision: what it was exported from, its shapes and its precision.
        name: the file errors name (default ``path``; the exporter checks a temporary file before moving it there).

    Raises:
        EngineError: onnxruntime cannot run the graph, fp32 beyond :data:`FP32_TOLERANCE` max abs (times the
            output's peak if above 1), or fp16 below :data:`FP16_MIN_PSNR` dB.
    """
    from vqfr.backends.onnxruntime import ort_errors

    name = path if name is None else name
    errors = ort_errors(require("onnxruntime", "checking ONNX graphs"))
    batches = [source.check_inputs(spec)]
    if spec.takes_fidelity and spec.batch == 1:  # one image per call: one call per branch
        x = batches[0][0]
        batches = [(x, torch.zeros(1)), (x, torch.ones(1))]
    outputs, references = [], []
    for inputs in batches:
        with torch.no_grad():
            references.append(source.engine_module(model)(*inputs))
        try:
            outputs.append(run_onnxruntime(path, inputs, spec.input_names))
        except errors as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            text = text.replace(str(path), str(name))  # onnxruntime names the temporary file
            raise EngineError(f"onnxruntime cannot run the exported graph ({text})", path=name,
                              fix="report this with the torch, onnxscript and onnxruntime versions") from exc
    reference = torch.cat(references)
    result = agreement(np.concatenate(outputs), reference)
    tolerance = FP32_TOLERANCE * max(1.0, float(reference.abs().max()))
    if precision == "fp32" and not result.max_abs <= tolerance:
        raise EngineError(f"onnxruntime differs from PyTorch: {result} (fp32 tolerance {tolerance:.3g})", path=name,
                          fix="report this with the torch, onnxscript and onnxruntime versions")
    if precision == "fp16" and not result.psnr_db >= FP16_MIN_PSNR:
        raise EngineError(f"fp16 onnxruntime output is too far from PyTorch fp32: {result} "
                          f"(needs >= {FP16_MIN_PSNR} dB)", path=name, fix="export with --precision fp32")
    return result


def _max_opset() -> int:
    """The newest opset the installed onnx defines."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


def export_onnx(
    weights: str | Path | None,
    output: str | Path,
    *,
    config: Any = None,
    precision: str = "fp32",
    batch: int | None = None,
    size: int | None = None,
    dynamic_size: bool = False,
    opset: int = DEFAULT_OPSET,
    check: bool = False,
    random_weights: int | None = None,
) -> Path:
    """Export a VQFR model to ONNX, with its sidecar ``<output>.json``.

    Args:
        weights: a released ``.pth`` or ``.safetensors`` checkpoint (None only with ``random_weights``).
        output: the ``.onnx`` path to write (atomically).
        config: model options as for :func:`vqfr.load_model` (``"v1"``, ``"v2"``, a dict or a yml path).
        precision: ``"fp32"``, or ``"fp16"`` (fp16 weights and activations, fp32 islands; inputs and outputs
            stay fp32).
        batch: a fixed batch size, or None for a dynamic batch.
        size: v1: the input side, a multiple of 32 (default 512); v2: fixed by its configuration.
        dynamic_size: v1 only: dynamic H and W (multiples of 32).
        opset: ONNX opset, >= 19 (DeformConv).
        check: compare onnxruntime (CPU) with PyTorch on a fixed input before writing: fp32 within
            :data:`FP32_TOLERANCE` max abs (times the output's peak if above 1), fp16 at least
            :data:`FP16_MIN_PSNR` dB PSNR against fp32.
        random_weights: export seeded random weights with this seed (testing only; recorded in the sidecar).

    Returns:
        The path written. Engine inputs: ``input`` [B,3,H,W] float32 in [-1,1], plus ``fidelity`` [B] float32 for
        v2; output ``output`` [B,3,H,W] float32.

    Raises:
        ConfigError: bad options or shapes, an ``output`` not named ``.onnx``, or an opset torch.onnx cannot
        convert the graph to. CheckpointError: unreadable weights. EngineError: export or check failed.
        OutputError: ``output`` would overwrite ``weights`` or the ``config`` file, its folder does not exist, or it
        cannot be written.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}", fix="pass fp32 or fp16")
    if opset < 19:
        raise ConfigError(f"opset {opset} has no DeformConv (it was added in opset 19)", fix="pass --opset 19 or more")
    if opset > _max_opset():
        raise ConfigError(f"opset {opset} is newer than the installed onnx knows (it defines opsets up to "
                          f"{_max_opset()})", fix=f"pass --opset {DEFAULT_OPSET} (the default)")
    output = source.check_output(output, "onnxruntime", weights, source.config_file(config))
    model = source.load_source_model(weights, config, random_weights)
    spec = source.export_spec(model, batch, size, dynamic_size)
    graph_model = _trace(model, spec, opset)
    traced_opset = graph_model.opset_imports.get("")
    if traced_opset != opset:  # torch.onnx logs a failed version conversion and returns the graph unconverted
        raise ConfigError(f"torch.onnx could not convert the graph to opset {opset} (it came out declaring opset "
                          f"{traced_opset}, which is not a valid model)",
                          fix=f"pass --opset {DEFAULT_OPSET} (the default)")
    islands = fp16.island_reasons(graph_model)
    if precision == "fp16":
        fp16.convert_to_fp16(graph_model)
        onnxscript.optimizer.optimize(graph_model)
    graph_model.metadata_props.update({"vqfr.arch": model.options["type"], "vqfr.precision": precision})
    extra: dict[str, Any] = {"fp32_islands": islands if precision == "fp16" else {}}
    with atomic_path(output) as tmp:
        ir.save(graph_model, tmp)
        if check:
            result = check_onnx(tmp, model, spec, precision, name=output)
            extra["check"] = {"onnxruntime_cpu_vs_pytorch_fp32": result.to_dict()}
    meta = metadata.engine_meta(model, spec, precision=precision, weights=weights, random_weights=random_weights,
                                opset=opset, packages=("torch", "onnx", "onnxscript", "onnx-ir"), extra=extra)
    write_sidecar(output, meta)
    return output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source.add_model_arguments(parser, PRECISIONS)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, from 19 (DeformConv) to the installed onnx's newest; one torch.onnx cannot "
                             f"convert the graph to is refused (default: {DEFAULT_OPSET})")
    parser.add_argument("--check", action="store_true",
                        help=f"compare onnxruntime (CPU) with PyTorch: fp32 within {FP32_TOLERANCE} max abs, "
                             f"fp16 >= {FP16_MIN_PSNR} dB PSNR")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    return parser


def _summary(path: Path, meta: EngineMeta) -> str:
    shapes = ", ".join(f"{t.name} {list(t.shape)}" for t in meta.inputs + meta.outputs)
    line = f"wrote {path} ({meta.arch}, {meta.precision}, opset {meta.opset}; {shapes})"
    if "check" in meta.extra:
        line += f"\ncheck: {meta.extra['check']}"
    return line


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def export() -> str:
        from vqfr.sidecar import read_sidecar

        path = export_onnx(args.weights, args.output, config=args.config, precision=args.precision, batch=args.batch,
                           size=args.size, dynamic_size=args.dynamic_size, opset=args.opset, check=args.check,
                           random_weights=args.random_weights)
        return _summary(path, read_sidecar(path))

    return run_command(export)


if __name__ == "__main__":
    from vqfr.errors import exit_status

    raise SystemExit(exit_status(main))
