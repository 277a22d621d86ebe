"""The ONNX graph under construction, and the opset-aware helpers every emitter shares.

`Builder` collects nodes and initializers while the FX graph is walked in order; `env` maps
each FX node to the name of the ONNX tensor that holds its value (or a list of names, or a
Python constant). Helpers whose ONNX form depends on the opset (reductions, Split, Slice, Pad)
are written here once, so an emitter never branches on the opset itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import helper, numpy_helper
from torch import Tensor

from quantfx.errors import ExportError, InternalError

AXES_AS_INPUT_OPSET = 18
"""From opset 18, Reduce* ops take their axes as an input instead of an attribute."""
SUM_AXES_AS_INPUT_OPSET = 13
"""ReduceSum took its axes as an input five opsets before the other reductions."""
SPLIT_AS_INPUT_OPSET = 13
"""From opset 13, Split takes its sizes as an input instead of an attribute."""
OPTIONAL_RESIZE_INPUTS_OPSET = 13
"""Before opset 13, Resize's roi and scales are required inputs (empty when sizes is given)."""
END = 2**62
"""A Slice end past any dimension ("to the end")."""


@dataclass(frozen=True)
class TensorInfo:
    """Static shape and dtype of one tensor the graph computed on the export inputs."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class Builder:
    """Collects ONNX nodes and initializers while the FX graph is walked in order."""

    def __init__(self, module: fx.GraphModule, records: dict[fx.Node, Any], legacy: bool,
                 opset: int) -> None:
        self.module = module
        self.records = records
        self.legacy = legacy
        """Legacy (pre-QDQ TIDL) files carry ranges as Clip nodes and float weights."""
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.env: dict[fx.Node, Any] = {}
        self.constants: dict[fx.Node, Tensor] = {}
        """Tensors known at export time: parameters, buffers, and nodes computed from them
        only (folded: they become initializers when a computed node uses them)."""
        self.emitted: list[fx.Node] = []
        """The FX nodes an emitter wrote ONNX nodes for, in order."""
        self.quantized_by_producer: set[fx.Node] = set()
        """Quantizer nodes whose Q/DQ the producing layer already wrote (inside it, before a
        trailing Reshape): they export as no node."""
        self._names: set[str] = set()

    # -- initializers -------------------------------------------------------------------------

    def constant(self, name: str, array: np.ndarray) -> str:
        """Add an initializer and return its name."""
        if name in self._names:
            raise InternalError(f"duplicate ONNX tensor name '{name}'.")
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def float_constant(self, name: str, value: Any) -> str:
        return self.constant(name, np.asarray(value, dtype=np.float32))

    def int64_constant(self, name: str, values: Iterable[int]) -> str:
        return self.constant(name, np.asarray(list(values), dtype=np.int64))

    # -- nodes --------------------------------------------------------------------------------

    def add(self, op_type: str, inputs: list[str], outputs: list[str], name: str,
            **attributes: Any) -> None:
        """Add one ONNX node."""
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attributes))

    def op(self, op_type: str, inputs: list[str], name: str, **attributes: Any) -> str:
        """Add one ONNX node whose one output has the node's `name`; returns that name."""
        self.add(op_type, inputs, [name], name, **attributes)
        return name

    def emit(self, node: fx.Node, op_type: str, inputs: list[str], **attributes: Any) -> None:
        """Add the ONNX node that computes `node` (node and output named after it)."""
        self.op(op_type, inputs, node.name, **attributes)
        self.env[node] = node.name

    # -- reading FX arguments -----------------------------------------------------------------

    def value(self, arg: Any) -> Any:
        """The ONNX tensor name (or Python constant) of an FX argument; a constant tensor
        becomes an initializer the first time a node uses it."""
        if isinstance(arg, fx.Node):
            if arg not in self.env and arg in self.constants:
                array = self.constants[arg].detach().cpu().numpy()
                self.env[arg] = self.constant(arg.name, array)
            return self.env[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(item) for item in arg)
        if isinstance(arg, slice):  # bounds from shape arithmetic (`x[:, :x.shape[1] // 2]`)
            return slice(self.value(arg.start), self.value(arg.stop), self.value(arg.step))
        return arg

    def tensor_input(self, node: fx.Node, position: int = 0) -> str:
        """The ONNX name of `node`'s tensor argument at `position`."""
        value = self.value(node.args[position])
        if not isinstance(value, str):
            raise ExportError(f"node '{node.name}': argument {position} is not a tensor.")
        return value

    def info(self, node: fx.Node) -> TensorInfo:
        """Static shape and dtype of the tensor `node` computed."""
        record = self.records[node]
        if not isinstance(record, TensorInfo):
            raise InternalError(f"node '{node.name}' did not produce a tensor.")
        return record

    def input_info(self, node: fx.Node, position: int = 0) -> TensorInfo:
        return self.info(node.args[position])

    def operand(self, node: fx.Node, position: int) -> str:
        """A tensor operand, or a Python number turned into a float32 scalar initializer."""
        value = self.value(node.args[position])
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float, bool)):
            return self.float_constant(f"{node.name}.operand{position}", float(value))
        raise ExportError(f"node '{node.name}': operand {position} is {value!r}, neither a tensor "
                          "nor a number.")

    def call_arguments(self, node: fx.Node, names: tuple[str, ...]) -> list[Any]:
        """Positional-or-keyword arguments after the tensor, as static values."""
        args = [self.value(arg) for arg in node.args[1:]]
        return [args[index] if index < len(args) else self.value(node.kwargs.get(name))
                for index, name in enumerate(names)]

    def constant_tensor(self, node: fx.Node, arg: Any, what: str) -> Tensor | None:
        """The value of an argument that must be a parameter or buffer (None stays None)."""
        if arg is None:
            return None
        if isinstance(arg, fx.Node) and arg in self.constants:
            return self.constants[arg].detach().float()
        raise ExportError(f"'{node.name}': {what} must be a parameter or buffer to export.")

    # -- opset-aware helpers ------------------------------------------------------------------

    def clip(self, name: str, source: str, output: str, low: float, high: float) -> None:
        self.add("Clip", [source, self.float_constant(f"{name}.min", low),
                          self.float_constant(f"{name}.max", high)], [output], name)

    def reshape(self, name: str, source: str, output: str, shape: tuple[int, ...]) -> None:
        self.add("Reshape", [source, self.int64_constant(f"{name}.shape", shape)], [output],
                 name)

    def reduce(self, op_type: str, source: str, output: str, axes: list[int],
               keepdims: int = 1) -> None:
        """A Reduce* node named `output` over `axes` (an input from opset 18; ReduceSum's
        from opset 13)."""
        if self.opset >= (SUM_AXES_AS_INPUT_OPSET if op_type == "ReduceSum"
                          else AXES_AS_INPUT_OPSET):
            self.op(op_type, [source, self.int64_constant(f"{output}.axes", axes)], output,
                    keepdims=keepdims)
        else:
            self.op(op_type, [source], output, axes=axes, keepdims=keepdims)

    def split(self, name: str, source: str, outputs: list[str], axis: int,
              sizes: list[int]) -> None:
        """A Split node into pieces of `sizes` along `axis` (sizes an input from opset 13)."""
        if self.opset >= SPLIT_AS_INPUT_OPSET:
            self.add("Split", [source, self.int64_constant(f"{name}.sizes", sizes)], outputs,
                     name, axis=axis)
        else:
            self.add("Split", [source], outputs, name, axis=axis, split=sizes)

    def resize_inputs(self, name: str, sizes: tuple[int, ...]) -> list[str]:
        """Resize's roi, scales and sizes inputs for an output of `sizes` (roi and scales
        empty tensors before opset 13, where they are required)."""
        if self.opset >= OPTIONAL_RESIZE_INPUTS_OPSET:
            return ["", "", self.int64_constant(f"{name}.sizes", sizes)]
        return [self.float_constant(f"{name}.roi", []), self.float_constant(f"{name}.scales", []),
                self.int64_constant(f"{name}.sizes", sizes)]

    def slice(self, name: str, source: str, starts: list[int], ends: list[int],
              axes: list[int], steps: list[int] | None = None, prefix: str | None = None) -> str:
        """A Slice node named `name` (its constants named after `prefix`, default `name`);
        returns its output's name."""
        prefix = prefix or name
        inputs = [source, self.int64_constant(f"{prefix}.starts", starts),
                  self.int64_constant(f"{prefix}.ends", ends),
                  self.int64_constant(f"{prefix}.axes", axes)]
        if steps is not None:
            inputs.append(self.int64_constant(f"{prefix}.steps", steps))
        self.op("Slice", inputs, name)
        return name

    def pad_end(self, name: str, source: str, shape: tuple[int, ...],
                ends: dict[int, int]) -> tuple[str, tuple[int, ...]]:
        """Zero-pad `source` at the end of the given axes (ONNX Pad), unless nothing to pad;
        returns the result's name and shape."""
        if not any(ends.values()):
            return source, shape
        pads = [0] * len(shape) + [ends.get(axis, 0) for axis in range(len(shape))]
        self.op("Pad", [source, self.int64_constant(f"{name}.pads", pads)], name)
        return name, tuple(size + ends.get(axis, 0) for axis, size in enumerate(shape))

    def roll(self, name: str, source: str, shape: tuple[int, ...], shifts: list[int],
             axes: list[int]) -> str:
        """torch.roll as Slice + Concat per axis; returns the result's name."""
        for shift, axis in zip(shifts, axes):
            shift %= shape[axis]
            if shift == 0:
                continue
            size = shape[axis]
            tail = self.slice(f"{name}.axis{axis}.tail", source, [size - shift], [size], [axis])
            head = self.slice(f"{name}.axis{axis}.head", source, [0], [size - shift], [axis])
            self.op("Concat", [tail, head], f"{name}.axis{axis}", axis=axis)
            source = f"{name}.axis{axis}"
        return source

    def float_linear(self, prefix: str, source: str, weight: Tensor,
                     bias: Tensor | None) -> str:
        """`source @ weight.T (+ bias)` in float (a projection inside a float island); returns
        the result's name, `prefix`."""
        product = f"{prefix}_product" if bias is not None else prefix
        weight_name = self.float_constant(f"{prefix}_weight", weight.detach().t().cpu().numpy())
        self.op("MatMul", [source, weight_name], product)
        if bias is not None:
            bias_name = self.float_constant(f"{prefix}_bias", bias.detach().cpu().numpy())
            self.op("Add", [product, bias_name], prefix)
        return prefix
