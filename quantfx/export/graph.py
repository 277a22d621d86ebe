"""Graph assembly: run the converted model once to record static shapes, walk its FX graph
through the emitters, fold constant subgraphs, and check the result with ONNX's own tools.

The ONNX graph is emitted node by node from the FX graph, so every ONNX tensor is named after
the FX node that computes it, int16 and per-channel weights need no exporter support, and
nothing in torch's exporters (fake-quant tracing, dynamic shapes) can change the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper
from torch import Tensor

from quantfx.errors import ExportError, InternalError, QuantFxError
from quantfx.export.builder import Builder, TensorInfo
from quantfx.export.emitters.quantized import requantize
from quantfx.export.registry import emitter_for
from quantfx.export.runtime_grids import hold_grids_after_shape_ops
from quantfx.passes.graph_utils import (
    builds_a_tuple,
    fetch_attribute,
    grid_quantizer,
    is_shape_only,
    output_values,
)
from quantfx.quantizers import FrozenQuantizer
from quantfx.tidl.profiles import NO_QDQ_OPS

MAX_IR_VERSION = 10
"""The newest ONNX IR version TIDL's tools (ONNX 1.14 / ORT 1.23) are validated with."""


@dataclass
class BuiltGraph:
    """An emitted ONNX model and how its tensors relate to the FX graph it came from."""

    model: onnx.ModelProto
    names: dict[fx.Node, Any]
    """FX node -> ONNX tensor name (or list of names, or a Python constant)."""
    emitted: list[fx.Node]
    """The FX nodes that became ONNX nodes (not folded into constants), in order."""


class _Recorder(fx.Interpreter):
    """Runs the converted model once (like ShapeProp), keeping each node's static shape and
    the value of every non-tensor node (sizes, indices), which become ONNX constants."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.records: dict[fx.Node, Any] = {}

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        self.records[node] = _describe(result)
        return result


def _describe(value: Any) -> Any:
    if isinstance(value, Tensor):
        return TensorInfo(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)) and any(isinstance(item, Tensor) for item in value):
        return [_describe(item) for item in value]
    return value


def _onnx_dtype(dtype: torch.dtype) -> int:
    return {torch.float32: TensorProto.FLOAT, torch.int64: TensorProto.INT64,
            torch.int32: TensorProto.INT32, torch.bool: TensorProto.BOOL}.get(
        dtype, TensorProto.FLOAT)


def _is_constant(b: Builder, node: fx.Node) -> bool:
    """Whether `node` computes from parameters, buffers and Python values only."""
    inputs: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), inputs.append)
    return bool(inputs) and all(
        arg in b.constants or not isinstance(b.records.get(arg), (TensorInfo, list))
        for arg in inputs)


def _evaluate(model: fx.GraphModule, b: Builder, node: fx.Node) -> Tensor:
    """The value of constant `node`, computed as the converted model computes it."""
    def fetch(arg: fx.Node) -> Any:
        return b.constants[arg] if arg in b.constants else b.env[arg]

    args = fx.node.map_arg(node.args, fetch)
    kwargs = fx.node.map_arg(node.kwargs, fetch)
    with torch.no_grad():
        if node.op == "call_module":
            return model.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


def _record(model: fx.GraphModule, inputs: tuple[Tensor, ...]) -> dict[fx.Node, Any]:
    recorder = _Recorder(model)
    try:
        with torch.no_grad():
            recorder.run(*inputs)
    except Exception as error:  # noqa: BLE001 - the model rejected the inputs
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        reason = (str(error).strip().splitlines() or [""])[0][:300]
        raise ExportError(
            f"the converted model fails on example_inputs of shape(s) {shapes}: "
            f"{type(error).__name__}: {reason}\nFix: pass inputs as the model's forward takes "
            "them (same number, rank and channel count as at prepare time)."
        ) from error
    return recorder.records


def _graph_outputs(b: Builder, taken: list[str]) -> list[onnx.ValueInfoProto]:
    outputs = []
    for index, out in enumerate(output_values(b.module)):
        if not isinstance(out, fx.Node) or not isinstance(b.records[out], TensorInfo):
            value = b.records[out] if isinstance(out, fx.Node) else out
            what = "None" if value is None else f"a value of type {type(value).__name__}"
            raise ExportError(
                f"model output {index} (forward's outputs flattened in order: tuple and list "
                f"items, dict values) is {what}, not a tensor: an ONNX file has tensor outputs "
                "only. Return tensors "
                "only (e.g. wrap the model in a module whose forward drops the others), then "
                "prepare, calibrate and convert that.")
        name = b.value(out)
        if name in taken + [value.name for value in outputs]:
            name = _alias(b, name, f"output_{index}")
        info = b.records[out]
        outputs.append(helper.make_tensor_value_info(name, _onnx_dtype(info.dtype),
                                                     list(info.shape)))
    return outputs


def _alias(b: Builder, name: str, alias: str) -> str:
    """A second graph output with the values of tensor `name`: a second DequantizeLinear of
    the same codes where `name` is dequantized (TIDL runs Q/DQ, while an Identity is an op it
    takes only inside a fusion), else an Identity."""
    producer = next((node for node in reversed(b.nodes) if name in node.output), None)
    if producer is not None and producer.op_type == "DequantizeLinear":
        b.add("DequantizeLinear", list(producer.input), [alias], alias,
              **{attribute.name: helper.get_attribute_value(attribute)
                 for attribute in producer.attribute})
    else:
        b.op("Identity", [name], alias)
    return alias


def _requantize_grid_keeping_ops(b: Builder, model: fx.GraphModule, node: fx.Node,
                                 written: list[onnx.NodeProto]) -> None:
    """A shape-only FX node keeps its input's grid, so the simulation needs no quantizer after
    it; when it is written with ONNX ops TIDL wants Q/DQ after (MaxPool, Concat, Tile, ...),
    add that Q/DQ on the same grid (an exact identity), so TIDL holds the tensor as quantfx
    does."""
    if all(item.op_type in NO_QDQ_OPS for item in written):
        return
    quantizer = grid_quantizer(model, node)
    if not isinstance(quantizer, FrozenQuantizer):
        return
    value = b.env[node]
    names = value if isinstance(value, list) else [value]
    produced = {output for item in written for output in item.output}
    renamed = [requantize(b, name, quantizer) if name in produced else name for name in names]
    b.env[node] = renamed if isinstance(value, list) else renamed[0]


def _emit(b: Builder, model: fx.GraphModule, node: fx.Node, legacy: bool) -> None:
    """Write `node` with its emitter; an emitter's own failure is an `InternalError` that names
    the node, not a bare traceback from inside the exporter."""
    emitter, module = emitter_for(b, node)
    first = len(b.nodes)
    try:
        emitter(b, node, module)
    except QuantFxError:
        raise
    except Exception as error:  # noqa: BLE001 - a case the emitter does not handle
        what = node.target if isinstance(node.target, str) else getattr(
            node.target, "__name__", repr(node.target))
        raise InternalError(f"exporting node '{node.name}' ({node.op} '{what}') failed: "
                            f"{type(error).__name__}: {error}.") from error
    b.emitted.append(node)
    if not legacy and is_shape_only(model, node):
        _requantize_grid_keeping_ops(b, model, node, b.nodes[first:])


def build_model(model: fx.GraphModule, inputs: tuple[Tensor, ...], legacy: bool,
                opset: int) -> BuiltGraph:
    """The ONNX model of converted `model` at the static shapes of `inputs` (no checks on the
    model's stage: `export_onnx` does those)."""
    records = _record(model, inputs)
    b = Builder(model, records, legacy, opset)
    graph_inputs: list[onnx.ValueInfoProto] = []
    graph_outputs: list[onnx.ValueInfoProto] = []
    for node in model.graph.nodes:
        record = records.get(node)
        if node.op == "placeholder" and isinstance(record, list):  # forward(self, *inputs)
            names = [f"{node.name}_{index}" for index in range(len(record))]
            graph_inputs += [helper.make_tensor_value_info(name, _onnx_dtype(info.dtype),
                                                           list(info.shape))
                             for name, info in zip(names, record)]
            b.env[node] = names
        elif node.op == "placeholder" and not isinstance(record, TensorInfo):
            b.env[node] = record  # an input left at its (non-tensor) default: a constant
        elif node.op == "placeholder":
            graph_inputs.append(helper.make_tensor_value_info(
                node.name, _onnx_dtype(record.dtype), list(record.shape)))
            b.env[node] = node.name
        elif node.op == "get_attr":
            value = fetch_attribute(model, node.target)  # a parameter or buffer
            if not isinstance(value, torch.Tensor):
                raise ExportError(f"cannot export node '{node.name}': attribute fetch "
                                  f"'{node.target}' is not a tensor.")
            b.constants[node] = value
        elif node.op == "output":
            graph_outputs = _graph_outputs(b, [value.name for value in graph_inputs])
        elif builds_a_tuple(node):
            continue  # a namedtuple of outputs: its fields are the graph's outputs
        elif not isinstance(record, (TensorInfo, list)):
            b.env[node] = record  # sizes, indices, shape arithmetic: static constants
        elif isinstance(record, TensorInfo) and _is_constant(b, node):
            b.constants[node] = _evaluate(model, b, node)
        else:
            _emit(b, model, node, legacy)
    nodes = b.nodes if legacy else hold_grids_after_shape_ops(
        b.nodes, opset, {value.name for value in graph_outputs})
    graph = helper.make_graph(nodes, type(model).__name__, graph_inputs, graph_outputs,
                              b.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                   producer_name="quantfx")
    onnx_model.ir_version = min(onnx_model.ir_version, MAX_IR_VERSION)
    try:
        onnx.checker.check_model(onnx_model, full_check=True)
        onnx_model = onnx.shape_inference.infer_shapes(onnx_model, check_type=True,
                                                       strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise InternalError(f"the emitted ONNX graph is invalid: {error}.") from error
    _check_inferred_shapes(onnx_model, records, b.env)
    return BuiltGraph(onnx_model, b.env, b.emitted)


def _check_inferred_shapes(onnx_model: onnx.ModelProto, records: dict[fx.Node, Any],
                           env: dict[fx.Node, Any]) -> None:
    """ONNX's shape inference must agree with the shapes torch computed, node by node (this
    catches pooling/padding conventions that differ between the two)."""
    inferred = {value.name: value for value in list(onnx_model.graph.value_info)
                + list(onnx_model.graph.output)}
    for node, record in records.items():
        name = env.get(node)
        if not isinstance(record, TensorInfo) or not isinstance(name, str) or name not in inferred:
            continue
        dims = inferred[name].type.tensor_type.shape.dim
        shape = tuple(dim.dim_value if dim.HasField("dim_value") else -1 for dim in dims)
        if shape != record.shape:
            raise ExportError(
                f"node '{node.name}': ONNX infers shape {shape} but PyTorch computed "
                f"{record.shape}; this op's attributes do not translate exactly."
            )
