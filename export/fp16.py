"""Mixed-precision ONNX: fp16 weights and activations with fp32 islands written into the graph.

TensorRT 11 builds strongly typed networks (no fp16 builder flag): the precision of every tensor must be in the ONNX
file. :func:`convert_to_fp16` rewrites an fp32 graph into that form:

- every floating-point tensor becomes fp16, except inside the *fp32 islands*: nodes tagged by the export
  translations with the metadata key :data:`FP32_KEY` (GroupNorm, LayerNorm, the code-prediction Linear, the
  nearest-code distances, the deformable conv), every ``Softmax``/``Attention``/normalisation/``ArgMin``/``ArgMax``
  node, and the last convolution (the ``Conv`` that produces a graph output);
- a ``Cast`` is inserted wherever a tensor crosses from one precision to the other, once per tensor and direction;
- weights are stored in the precision of the nodes that read them (an fp32 copy and an fp16 copy when both do);
- graph inputs and outputs stay fp32, so the engine's interface does not change with its precision.

:func:`dcn_to_fp16` moves the deformable convolutions of an fp16 graph out of their islands (``--dcn-fp16``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, TypeGuard

import numpy as np

from vqfr._optional import require

if TYPE_CHECKING:
    from onnxscript import ir
else:
    ir = require("onnxscript", "mixed-precision ONNX graphs").ir

__all__ = ["FP32_KEY", "mark_fp32", "convert_to_fp16", "dcn_to_fp16", "fp32_node_names", "island_reasons"]

#: Node metadata key marking a node that must compute in fp32; the value says why (e.g. ``"group_norm"``).
FP32_KEY = "vqfr.fp32"

FLOAT, HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16
_FLOATS = (FLOAT, HALF)

#: Ops that always compute in fp32: their reductions overflow or lose the argmin/argmax in fp16. ``Attention`` is
#: how torch.onnx exports scaled-dot-product attention from opset 23 (its softmax inside).
_ALWAYS_FP32 = frozenset({"Softmax", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
                          "DeformConv", "ArgMin", "ArgMax", "Attention"})
#: Ops whose output dtype is set by an attribute, not by their inputs; they are left as they are.
_FIXED_TYPE = frozenset({"Cast", "Constant", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform",
                         "RandomNormalLike", "RandomUniformLike"})
#: Ops that only read shapes; their float inputs never need a Cast.
_SHAPE_ONLY = frozenset({"Shape", "Size"})
#: Inputs that the ONNX spec fixes to float32 whatever the data type (Resize ``roi`` and ``scales``).
_FP32_SLOTS = {"Resize": frozenset({1, 2})}


def mark_fp32(reason: str, outputs: Iterable[ir.Value | None], inputs: Iterable[ir.Value | None]) -> None:
    """Tag every node between ``inputs`` and ``outputs`` as an fp32 island (used inside export translations).

    Args:
        reason: stored as the tag's value, e.g. ``"group_norm"``.
        outputs: the values a translation returns.
        inputs: the values it was given; the walk back from ``outputs`` stops there.
    """
    stop = {id(v) for v in inputs if v is not None}
    stack = [v for v in outputs if v is not None]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        node = value.producer()
        if id(value) in stop or node is None or id(node) in seen:
            continue
        seen.add(id(node))
        node.metadata_props[FP32_KEY] = reason
        stack.extend(v for v in node.inputs if v is not None)


def _output_convs(graph: ir.Graph) -> set[int]:
    """ids of the Conv nodes that produce a graph output (the "last convolution")."""
    producers = (v.producer() for v in graph.outputs)
    return {id(node) for node in producers if node is not None and node.op_type == "Conv"}


def _is_fp32_node(node: ir.Node, last_convs: set[int], dcn_fp16: bool) -> bool:
    if node.op_type == "DeformConv" and dcn_fp16:
        return False
    return FP32_KEY in node.metadata_props or node.op_type in _ALWAYS_FP32 or id(node) in last_convs


#: The node that stands for one island of each kind when islands are counted.
_ANCHORS = {"group_norm": "InstanceNormalization", "layer_norm": "LayerNormalization", "code_prediction": "MatMul",
            "nearest_code": "ArgMin", "deform_conv": "DeformConv"}


def island_reasons(model: ir.Model) -> dict[str, int]:
    """How many fp32 islands of each kind ``model`` has (e.g. ``{"group_norm": 66, "Softmax": 4, ...}``)."""
    counts: dict[str, int] = {}
    last = _output_convs(model.graph)
    for node in model.graph:
        tag = node.metadata_props.get(FP32_KEY)
        if tag is not None:
            reason = tag if node.op_type == _ANCHORS.get(tag) else None
        elif id(node) in last:
            reason = "last_conv"
        else:
            reason = node.op_type if node.op_type in _ALWAYS_FP32 else None
        if reason is not None:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def fp32_node_names(model: ir.Model) -> set[str]:
    """Names of the nodes that :func:`convert_to_fp16` keeps in fp32 (TensorRT 10 pins their layers to fp32)."""
    last = _output_convs(model.graph)
    return {node.name for node in model.graph if node.name and _is_fp32_node(node, last, dcn_fp16=False)}


class _Caster:
    """Creates the Casts and converted weights of one graph, each at most once per tensor and dtype."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.casts: dict[tuple[int, ir.DataType], ir.Value] = {}
        self.count = 0

    def convert(self, value: ir.Value, dtype: ir.DataType, before: ir.Node) -> ir.Value:
        """``value`` in ``dtype``: a converted constant, or the output of a Cast inserted before ``before``."""
        key = (id(value), dtype)
        if key in self.casts:
            return self.casts[key]
        const = value.const_value if value.is_initializer() or _is_constant_node(value.producer()) else None
        if const is not None:
            array = np.asarray(const.numpy()).astype(dtype.numpy())
            converted = ir.Value(name=self._name(value, dtype), shape=value.shape, type=ir.TensorType(dtype),
                                 const_value=ir.tensor(array, name=self._name(value, dtype)))
            self.graph.register_initializer(converted)
        else:
            cast = _cast(value, dtype, self._name(value, dtype) + "_node")
            converted = cast.outputs[0]
            converted.name = self._name(value, dtype)
            self.graph.insert_before(before, cast)
        self.casts[key] = converted
        self.count += 1
        return converted

    @staticmethod
    def _name(value: ir.Value, dtype: ir.DataType) -> str:
        return f"{value.name}__{'fp16' if dtype == HALF else 'fp32'}"


def _cast(value: ir.Value, dtype: ir.DataType, name: str) -> ir.Node:
    node = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", dtype)], name=name)
    node.outputs[0].dtype = dtype
    node.outputs[0].shape = value.shape
    return node


def _is_constant_node(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Constant" and not node.inputs


def _remove_unused_initializers(graph: ir.Graph) -> None:
    outputs = {id(v) for v in graph.outputs}
    for name, value in list(graph.initializers.items()):
        if not value.uses() and id(value) not in outputs:
            del graph.initializers[name]


def convert_to_fp16(model: ir.Model, *, dcn_fp16: bool = False) -> int:
    """Rewrite an fp32 graph in place into fp16 with fp32 islands (see the module docstring).

    Args:
        model: an fp32 graph exported by :mod:`export.onnx`; graph inputs and outputs keep fp32.
        dcn_fp16: compute the deformable convolutions in fp16 too (TensorRT's plugin then rounds its sampling
            coordinates to fp16, about 0.25 px at 512 px).

    Returns:
        The number of Casts and converted weights created.
    """
    graph = model.graph
    graph.sort()
    last_convs = _output_convs(graph)
    caster = _Caster(graph)
    for node in list(graph):
        if node.op_type in _FIXED_TYPE:
            continue
        target = FLOAT if _is_fp32_node(node, last_convs, dcn_fp16) else HALF
        if node.op_type not in _SHAPE_ONLY:
            exempt = _FP32_SLOTS.get(node.op_type, frozenset())
            for i, value in enumerate(node.inputs):
                if value is None or i in exempt or value.dtype not in _FLOATS or value.dtype == target:
                    continue
                node.replace_input_with(i, caster.convert(value, target, before=node))
        for out in node.outputs:
            if out.dtype in _FLOATS:
                out.dtype = target
    for i, value in enumerate(graph.outputs):
        if value.dtype == HALF:
            # The fp32 tensor the user sees keeps the output's name.
            name, value.name = value.name, f"{value.name}__fp16"
            cast = _cast(value, FLOAT, f"{name}_cast")
            graph.append(cast)
            cast.outputs[0].name = name
            graph.outputs[i] = cast.outputs[0]
            caster.count += 1
    _remove_unused_initializers(graph)
    graph.sort()
    return caster.count


def _is_cast_to(node: ir.Node | None, dtype: ir.DataType) -> TypeGuard[ir.Node]:
    return node is not None and node.op_type == "Cast" and node.attributes["to"].as_int() == dtype


def dcn_to_fp16(model: ir.Model) -> int:
    """Move every fp32 ``DeformConv`` of an fp16 graph to fp16, in place; returns how many moved.

    The Casts around each one are bypassed (and dropped when nothing else reads them), its fp32 weight and bias get
    fp16 copies, and its fp16 output goes straight to the readers that used to cast it back.
    """
    graph = model.graph
    caster = _Caster(graph)
    moved = 0
    for node in list(graph):
        if node.op_type != "DeformConv" or node.outputs[0].dtype != FLOAT:
            continue
        for i, value in enumerate(node.inputs):
            if value is None or value.dtype != FLOAT:
                continue
            producer = value.producer()
            if _is_cast_to(producer, FLOAT) and (source := producer.inputs[0]) is not None and source.dtype == HALF:
                node.replace_input_with(i, source)
                if not producer.outputs[0].uses():
                    graph.remove(producer)
            else:
                node.replace_input_with(i, caster.convert(value, HALF, before=node))
        out = node.outputs[0]
        out.dtype = HALF
        for use in list(out.uses()):
            reader = use.node
            if _is_cast_to(reader, HALF):
                ir.convenience.replace_all_uses_with(reader.outputs[0], out)
                graph.remove(reader)
            else:
                reader.replace_input_with(use.idx, caster.convert(out, FLOAT, before=reader))
        node.metadata_props.pop(FP32_KEY, None)
        moved += 1
    _remove_unused_initializers(graph)
    graph.sort()
    return moved
