"""`export_onnx`: write a converted quantfx model as a QDQ ONNX model (or a legacy float model
with Clip ranges) plus its TIDL compile options, and verify it bit for bit in ONNX Runtime.

The ONNX graph is emitted node by node from the FX graph through a table of emitters (one per
module type, function or method), so every ONNX tensor is named after the FX node that computes
it, int16 and per-channel weights need no exporter support, and nothing in torch's exporters
(fake-quant tracing, dynamic shapes) can change the numbers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import operator
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from quantfx import modules as qm
from quantfx.convert import Quantize, QuantizedLayer
from quantfx.errors import ExportError
from quantfx.export.tidl import BitWidths, check_constraints, compile_options
from quantfx.frontend import state_of
from quantfx.passes.place import FUSABLE_ACTIVATIONS
from quantfx.qmath import scale_of

QDQ, CLIP, FLOAT = "qdq", "clip", "float"
"""Emission modes: Q/DQ pairs (TIDL prequantized), Clip ranges (legacy TIDL), plain float."""

DEFAULT_QDQ_OPSET = 13
"""Lowest opset with per-channel DequantizeLinear (depthwise weights): the widest TIDL support."""
DEFAULT_LEGACY_OPSET = 11
"""TDA4VM-era TIDL imports opset 11 float models (Clip takes its bounds as inputs from 11)."""
INT16_QDQ_OPSET = 21
"""int16/uint16 QuantizeLinear/DequantizeLinear are standard ONNX from opset 21."""
MAX_OPSET = 21
SIXTEEN_BIT_TOLERANCE_LSB = 32.0
"""Allowed difference on 16-bit outputs (1/8 of an 8-bit step): float32 sums of int16 x int16
products are not exact, so PyTorch and ONNX Runtime round them differently."""

ONNX_INT_TYPES = {
    (8, True): TensorProto.INT8,
    (8, False): TensorProto.UINT8,
    (16, True): TensorProto.INT16,
    (16, False): TensorProto.UINT16,
}
NUMPY_INT_TYPES = {(8, True): np.int8, (8, False): np.uint8, (16, True): np.int16,
                   (16, False): np.uint16}

ALIAS_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.modules.dropout._DropoutNd)
try:
    from torchvision.ops import StochasticDepth

    ALIAS_MODULES += (StochasticDepth,)
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass
ALIAS_CALLS: set[Any] = {"contiguous", "clone", "detach", torch.clone}
RESHAPE_CALLS: set[Any] = {
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "unflatten",
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
}


# ----------------------------------------------------------------------------------------------
# Report


@dataclass
class ExportReport:
    """What `export_onnx` wrote and how closely ONNX Runtime reproduces the PyTorch model."""

    path: str
    options_path: str
    opset: int
    legacy: bool
    tidl_options: dict[str, Any]
    sixteen_bit_features: list[str] = field(default_factory=list)
    sixteen_bit_params: list[str] = field(default_factory=list)
    verified: bool = False
    elements_compared: int = 0
    fraction_identical: float | None = None
    """Share of output elements that are bit-identical (QDQ) to the converted model."""
    max_lsb_diff: float | None = None
    """Largest output difference in LSBs of the output quantizer's scale."""
    argmax_agreement: float | None = None
    """Share of rows whose argmax agrees (2-D outputs only: classifiers)."""
    output_scales: list[float | None] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs and tables."""
        if not self.verified:
            return f"{self.path}: opset {self.opset}, not verified"
        argmax = "n/a" if self.argmax_agreement is None else f"{100 * self.argmax_agreement:.2f}%"
        return (f"{self.path}: opset {self.opset}, {self.elements_compared} elements, "
                f"{100 * self.fraction_identical:.3f}% bit-identical, "
                f"max {self.max_lsb_diff:g} LSB, argmax agreement {argmax}")


# ----------------------------------------------------------------------------------------------
# Recording values and shapes


@dataclass(frozen=True)
class TensorInfo:
    """Static shape and dtype of one tensor the graph computed on the export inputs."""

    shape: tuple[int, ...]
    dtype: torch.dtype


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


# ----------------------------------------------------------------------------------------------
# The graph builder


class _Builder:
    """Collects ONNX nodes and initializers while the FX graph is walked in order."""

    def __init__(self, module: fx.GraphModule, records: dict[fx.Node, Any], mode: str,
                 opset: int) -> None:
        self.module = module
        self.records = records
        self.mode = mode
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.env: dict[fx.Node, Any] = {}
        self.constants: dict[fx.Node, Tensor] = {}
        """Tensors known at export time: parameters, buffers, and nodes computed from them
        only (folded: they become initializers when a computed node uses them)."""
        self.bit_widths = BitWidths()
        self._names: set[str] = set()

    # -- helpers -------------------------------------------------------------------------------

    def constant(self, name: str, array: np.ndarray) -> str:
        """Add an initializer and return its name."""
        if name in self._names:
            raise ExportError(f"internal: duplicate ONNX tensor name '{name}'.")
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def float_constant(self, name: str, value: Any) -> str:
        return self.constant(name, np.asarray(value, dtype=np.float32))

    def int64_constant(self, name: str, values: Iterable[int]) -> str:
        return self.constant(name, np.asarray(list(values), dtype=np.int64))

    def add(self, op_type: str, inputs: list[str], outputs: list[str], name: str,
            **attributes: Any) -> None:
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attributes))

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
        return arg

    def tensor_input(self, node: fx.Node, position: int = 0) -> str:
        value = self.value(node.args[position])
        if not isinstance(value, str):
            raise ExportError(f"node '{node.name}': argument {position} is not a tensor.")
        return value

    def info(self, node: fx.Node) -> TensorInfo:
        record = self.records[node]
        if not isinstance(record, TensorInfo):
            raise ExportError(f"internal: node '{node.name}' did not produce a tensor.")
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

    def clip(self, name: str, source: str, output: str, low: float, high: float) -> None:
        self.add("Clip", [source, self.float_constant(f"{name}.min", low),
                          self.float_constant(f"{name}.max", high)], [output], name)

    def reshape(self, name: str, source: str, output: str, shape: tuple[int, ...]) -> None:
        self.add("Reshape", [source, self.int64_constant(f"{name}.shape", shape)], [output], name)


# ----------------------------------------------------------------------------------------------
# Emitters: (builder, fx node, module or None) -> None, setting builder.env[node]

Emitter = Callable[[_Builder, fx.Node, Any], None]


def _emit_quantize(b: _Builder, node: fx.Node, quantizer: Quantize) -> None:
    source = b.tensor_input(node)
    feeder = node.args[0]
    b.bit_widths.feature_bits[b.env[feeder] if isinstance(feeder, fx.Node) else node.name] = \
        quantizer.bits
    if b.mode == FLOAT:
        b.env[node] = source
        return
    scale = quantizer.scale
    if not _is_power_of_two(scale):
        raise ExportError(f"quantizer '{node.target}' has scale {scale!r}, not a power of two.")
    if b.mode == CLIP:
        b.clip(node.name, source, node.name, quantizer.qmin * scale, quantizer.qmax * scale)
    else:
        key = (quantizer.bits, quantizer.signed)
        dtype = NUMPY_INT_TYPES[key]
        scale_name = b.float_constant(f"{node.name}.scale", scale)
        zero_name = b.constant(f"{node.name}.zero_point", np.zeros((), dtype=dtype))
        quantized = f"{node.name}.{np.dtype(dtype).name}"
        b.add("QuantizeLinear", [source, scale_name, zero_name], [quantized],
              f"{node.name}.quantize")
        b.add("DequantizeLinear", [quantized, scale_name, zero_name], [node.name],
              f"{node.name}.dequantize")
    b.env[node] = node.name


def _dequantized_constant(b: _Builder, name: str, codes: Tensor, exponent: Tensor,
                          bits: int, axis: int | None, grid_values: Tensor) -> str:
    """A weight or bias: integer initializer + DequantizeLinear (QDQ), or float grid values."""
    if b.mode != QDQ:
        return b.constant(name, grid_values.detach().cpu().numpy().astype(np.float32))
    dtype = {8: np.int8, 16: np.int16, 32: np.int32}[bits]
    scale = scale_of(exponent).detach().cpu().numpy().astype(np.float32)
    per_channel = exponent.dim() > 0
    scale_name = b.constant(f"{name}_scale", scale if per_channel else scale.reshape(()))
    zero_name = b.constant(f"{name}_zero_point", np.zeros(scale.shape if per_channel else (),
                                                          dtype=dtype))
    codes_name = b.constant(f"{name}_quantized", codes.detach().cpu().numpy().astype(dtype))
    attributes = {"axis": 0} if per_channel else {}
    b.add("DequantizeLinear", [codes_name, scale_name, zero_name], [name], f"{name}.dequantize",
          **attributes)
    return name


def _layer_parameters(b: _Builder, node: fx.Node, quantized: QuantizedLayer,
                      transpose_weight: bool = False) -> tuple[str, str | None]:
    layer = quantized.layer
    weight_codes, weight_grid = quantized.weight_int, layer.weight
    if transpose_weight:
        weight_codes, weight_grid = weight_codes.t(), weight_grid.t()
    weight = _dequantized_constant(b, f"{node.name}.weight", weight_codes,
                                   quantized.weight_exponent, quantized.weight_bits,
                                   quantized.axis, weight_grid)
    bias = None
    if quantized.bias_int is not None:
        bias = _dequantized_constant(b, f"{node.name}.bias", quantized.bias_int,
                                     quantized.bias_exponent, 32, 0, layer.bias)
    return weight, bias


def _record_param_bits(b: _Builder, node: fx.Node, quantized: QuantizedLayer) -> None:
    """A 16-bit layer is named by its own output and, when an activation is fused into it, by
    the activation's output too (TIDL names a merged conv+relu layer after the relu)."""
    b.bit_widths.param_bits[node.name] = quantized.weight_bits
    if len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "call_module" and isinstance(b.module.get_submodule(user.target),
                                                   FUSABLE_ACTIVATIONS):
            b.bit_widths.param_bits[user.name] = quantized.weight_bits


def _conv_pads(layer: nn.modules.conv._ConvNd) -> list[int]:
    rank = len(layer.kernel_size)
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return [0] * (2 * rank)
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        begins = [total // 2 for total in totals]
        return begins + [total - begin for total, begin in zip(totals, begins)]
    return list(layer.padding) * 2


def _emit_quantized_layer(b: _Builder, node: fx.Node, quantized: QuantizedLayer) -> None:
    layer = quantized.layer
    source = b.tensor_input(node)
    _record_param_bits(b, node, quantized)
    if isinstance(layer, nn.Linear):
        rank = len(b.input_info(node).shape)
        if rank == 2:
            weight, bias = _layer_parameters(b, node, quantized)
            inputs = [source, weight] + ([bias] if bias else [])
            b.add("Gemm", inputs, [node.name], node.name, transB=1)
        else:
            weight, bias = _layer_parameters(b, node, quantized, transpose_weight=True)
            product = f"{node.name}.matmul" if bias else node.name
            b.add("MatMul", [source, weight], [product], f"{node.name}.matmul")
            if bias:
                b.add("Add", [product, bias], [node.name], node.name)
        b.env[node] = node.name
        return
    if not isinstance(layer, nn.modules.conv._ConvNd):
        raise ExportError(f"layer '{node.target}' ({type(layer).__name__}) has no ONNX emitter.")
    if layer.padding_mode != "zeros":
        raise ExportError(
            f"conv '{node.target}' uses padding_mode='{layer.padding_mode}'; TIDL and this "
            "exporter support zero padding only. Pad explicitly (F.pad) or use "
            "padding_mode='zeros'."
        )
    weight, bias = _layer_parameters(b, node, quantized)
    inputs = [source, weight] + ([bias] if bias else [])
    extra = {"output_padding": list(layer.output_padding)} if layer.transposed else {}
    b.add("ConvTranspose" if layer.transposed else "Conv", inputs, [node.name], node.name,
          kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
          pads=_conv_pads(layer), dilations=list(layer.dilation), group=layer.groups, **extra)
    b.env[node] = node.name


def _emit_batchnorm(b: _Builder, node: fx.Node, bn: nn.modules.batchnorm._BatchNorm) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise ExportError(f"BatchNorm '{node.target}' has no running statistics to export.")
    channels = bn.num_features
    weight = bn.weight if bn.weight is not None else torch.ones(channels)
    bias = bn.bias if bn.bias is not None else torch.zeros(channels)
    names = []
    for suffix, tensor in (("weight", weight), ("bias", bias), ("running_mean", bn.running_mean),
                           ("running_var", bn.running_var)):
        names.append(b.float_constant(f"{node.name}.{suffix}", tensor.detach().cpu().numpy()))
    b.add("BatchNormalization", [b.tensor_input(node)] + names, [node.name], node.name,
          epsilon=float(bn.eps))
    b.env[node] = node.name


def _reduce_mean(b: _Builder, source: str, output: str, axes: list[int]) -> None:
    if b.opset >= 18:
        b.add("ReduceMean", [source, b.int64_constant(f"{output}.axes", axes)], [output], output,
              keepdims=1)
    else:
        b.add("ReduceMean", [source], [output], output, axes=axes, keepdims=1)


def _emit_layer_norm(b: _Builder, node: fx.Node, norm: nn.LayerNorm) -> None:
    """LayerNorm as ReduceMean/Sub/Mul/ReduceMean/Add/Sqrt/Div (+ affine): works at any opset.

    (LayerNormalization exists only from opset 17; the result is float and the quantizer that
    follows rounds it, so float-rounding differences can move an element by 1 LSB.)
    """
    rank = len(b.input_info(node).shape)
    axes = list(range(rank - len(norm.normalized_shape), rank))
    source, name = b.tensor_input(node), node.name
    _reduce_mean(b, source, f"{name}.mean", axes)
    b.add("Sub", [source, f"{name}.mean"], [f"{name}.centered"], f"{name}.centered")
    b.add("Mul", [f"{name}.centered", f"{name}.centered"], [f"{name}.squared"], f"{name}.squared")
    _reduce_mean(b, f"{name}.squared", f"{name}.variance", axes)
    epsilon = b.float_constant(f"{name}.eps", norm.eps)
    b.add("Add", [f"{name}.variance", epsilon], [f"{name}.variance_eps"], f"{name}.variance_eps")
    b.add("Sqrt", [f"{name}.variance_eps"], [f"{name}.std"], f"{name}.std")
    normalized = name if norm.weight is None and norm.bias is None else f"{name}.normalized"
    b.add("Div", [f"{name}.centered", f"{name}.std"], [normalized], normalized)
    if normalized != name:
        weight = b.float_constant(f"{name}.weight", norm.weight.detach().cpu().numpy()
                                  if norm.weight is not None else np.ones(norm.normalized_shape))
        bias = b.float_constant(f"{name}.bias", norm.bias.detach().cpu().numpy()
                                if norm.bias is not None else np.zeros(norm.normalized_shape))
        b.add("Mul", [normalized, weight], [f"{name}.scaled"], f"{name}.scaled")
        b.add("Add", [f"{name}.scaled", bias], [name], name)
    b.env[node] = name


def _float_linear(b: _Builder, prefix: str, source: str, weight: Tensor,
                  bias: Tensor | None) -> str:
    """`source @ weight.T (+ bias)` in float (a projection inside a float island); returns the
    result's name, `prefix`."""
    product = f"{prefix}_product" if bias is not None else prefix
    weight_name = b.float_constant(f"{prefix}_weight", weight.detach().t().cpu().numpy())
    b.add("MatMul", [source, weight_name], [product], product)
    if bias is not None:
        bias_name = b.float_constant(f"{prefix}_bias", bias.detach().cpu().numpy())
        b.add("Add", [product, bias_name], [prefix], prefix)
    return prefix


def _mha_argument(node: fx.Node, position: int, keyword: str, default: Any) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword, default)


def _emit_multihead_attention(b: _Builder, node: fx.Node, attention: nn.MultiheadAttention
                              ) -> None:
    """nn.MultiheadAttention in float, as MatMul/Softmax/Transpose (quantfx quantizes only its
    output, which the following Quantize rounds: float-rounding differences can move an element
    by 1 LSB). Masks, bias_k/bias_v and add_zero_attn are refused with a clear error."""
    name = node.name
    unsupported = [keyword for position, keyword in ((3, "key_padding_mask"), (5, "attn_mask"))
                   if _mha_argument(node, position, keyword, None) is not None]
    if _mha_argument(node, 7, "is_causal", False):
        unsupported.append("is_causal")
    if attention.bias_k is not None or attention.add_zero_attn:
        unsupported.append("add_bias_kv/add_zero_attn")
    if unsupported:
        raise ExportError(
            f"cannot export MultiheadAttention '{node.target}' with {', '.join(unsupported)}: "
            "quantfx exports unmasked attention only. Fold the mask into the model's inputs or "
            "report the use case to the quantfx developers."
        )
    need_weights = bool(_mha_argument(node, 4, "need_weights", True))
    average_weights = bool(_mha_argument(node, 6, "average_attn_weights", True))
    embed, heads = attention.embed_dim, attention.num_heads
    head_dim = embed // heads
    if attention.in_proj_weight is not None:
        weights = attention.in_proj_weight.detach().split(embed)
    else:
        weights = (attention.q_proj_weight.detach(), attention.k_proj_weight.detach(),
                   attention.v_proj_weight.detach())
    biases = (attention.in_proj_bias.detach().split(embed)
              if attention.in_proj_bias is not None else (None, None, None))
    shapes = [b.input_info(node, position).shape for position in range(3)]
    if attention.batch_first or len(shapes[0]) == 2:
        batched = shapes  # (N, L, E) or unbatched (L, E)
    else:
        batched = [(shape[1], shape[0], shape[2]) for shape in shapes]

    def project(position: int, role: str) -> str:
        source = b.value(_mha_argument(node, position, ("query", "key", "value")[position], None))
        if not attention.batch_first and len(shapes[position]) == 3:
            b.add("Transpose", [source], [f"{name}.{role}_nle"], f"{name}.{role}_nle",
                  perm=[1, 0, 2])
            source = f"{name}.{role}_nle"
        projected = _float_linear(b, f"{name}.{role}_projected", source, weights[position],
                                  biases[position])
        batch = batched[position][0] if len(batched[position]) == 3 else 1
        length = batched[position][-2]
        b.reshape(f"{name}.{role}_heads", projected, f"{name}.{role}_heads",
                  (batch, length, heads, head_dim))
        perm = [0, 2, 3, 1] if role == "key" else [0, 2, 1, 3]
        b.add("Transpose", [f"{name}.{role}_heads"], [f"{name}.{role}_split"],
              f"{name}.{role}_split", perm=perm)
        return f"{name}.{role}_split"

    query, key, value = project(0, "query"), project(1, "key"), project(2, "value")
    scale = b.float_constant(f"{name}.scale", 1.0 / math.sqrt(head_dim))
    b.add("Mul", [query, scale], [f"{name}.query_scaled"], f"{name}.query_scaled")
    b.add("MatMul", [f"{name}.query_scaled", key], [f"{name}.scores"], f"{name}.scores")
    b.add("Softmax", [f"{name}.scores"], [f"{name}.probabilities"], f"{name}.probabilities",
          axis=-1)
    b.add("MatMul", [f"{name}.probabilities", value], [f"{name}.context"], f"{name}.context")
    b.add("Transpose", [f"{name}.context"], [f"{name}.context_nlhd"], f"{name}.context_nlhd",
          perm=[0, 2, 1, 3])
    batch = batched[0][0] if len(batched[0]) == 3 else 1
    length = batched[0][-2]
    b.reshape(f"{name}.context_merged", f"{name}.context_nlhd", f"{name}.context_merged",
              (batch, length, embed))
    result = _float_linear(b, f"{name}.out", f"{name}.context_merged",
                           attention.out_proj.weight, attention.out_proj.bias)
    if not attention.batch_first and len(shapes[0]) == 3:
        b.add("Transpose", [result], [name], name, perm=[1, 0, 2])
    else:
        b.reshape(name, result, name, tuple(shapes[0][:-1]) + (embed,))
    outputs: list[Any] = [name, None]
    if need_weights:
        weights_name = f"{name}.weights"
        if average_weights:
            _reduce_mean(b, f"{name}.probabilities", f"{name}.weights_mean", [1])
            record = b.records[node][1]
            b.reshape(weights_name, f"{name}.weights_mean", weights_name, record.shape)
        else:
            b.reshape(weights_name, f"{name}.probabilities", weights_name,
                      b.records[node][1].shape)
        outputs[1] = weights_name
    b.env[node] = outputs


def _simple(op_type: str, **attributes: Any) -> Emitter:
    def emit(b: _Builder, node: fx.Node, module: Any) -> None:
        b.add(op_type, [b.tensor_input(node)], [node.name], node.name, **attributes)
        b.env[node] = node.name
    return emit


def _emit_relu6(b: _Builder, node: fx.Node, module: nn.Module) -> None:
    b.clip(node.name, b.tensor_input(node), node.name, 0.0, 6.0)
    b.env[node] = node.name


def _emit_hardtanh(b: _Builder, node: fx.Node, module: nn.Hardtanh) -> None:
    b.clip(node.name, b.tensor_input(node), node.name, module.min_val, module.max_val)
    b.env[node] = node.name


def _emit_leaky_relu(b: _Builder, node: fx.Node, module: nn.LeakyReLU) -> None:
    b.add("LeakyRelu", [b.tensor_input(node)], [node.name], node.name,
          alpha=float(module.negative_slope))
    b.env[node] = node.name


def _relu6_of_shifted(b: _Builder, node: fx.Node, source: str) -> str:
    """min(max(x + 3, 0), 6), torch's exact float steps for hardswish / hardsigmoid."""
    shifted = f"{node.name}.add"
    b.add("Add", [source, b.float_constant(f"{node.name}.three", 3.0)], [shifted], shifted)
    clipped = f"{node.name}.clip"
    b.clip(clipped, shifted, clipped, 0.0, 6.0)
    return clipped


def _emit_hardswish(b: _Builder, node: fx.Node, module: nn.Module) -> None:
    # ONNX HardSwish computes x * max(0, min(1, x/6 + 1/2)): different float rounding from
    # torch's x * min(max(x + 3, 0), 6) / 6, so emit torch's steps.
    source = b.tensor_input(node)
    clipped = _relu6_of_shifted(b, node, source)
    product = f"{node.name}.mul"
    b.add("Mul", [source, clipped], [product], product)
    b.add("Div", [product, b.float_constant(f"{node.name}.six", 6.0)], [node.name], node.name)
    b.env[node] = node.name


def _emit_hardsigmoid(b: _Builder, node: fx.Node, module: nn.Module) -> None:
    clipped = _relu6_of_shifted(b, node, b.tensor_input(node))
    b.add("Div", [clipped, b.float_constant(f"{node.name}.six", 6.0)], [node.name], node.name)
    b.env[node] = node.name


def _emit_silu(b: _Builder, node: fx.Node, module: nn.Module) -> None:
    source = b.tensor_input(node)
    sigmoid = f"{node.name}.sigmoid"
    b.add("Sigmoid", [source], [sigmoid], sigmoid)
    b.add("Mul", [source, sigmoid], [node.name], node.name)
    b.env[node] = node.name


def _emit_gelu(b: _Builder, node: fx.Node, module: nn.GELU) -> None:
    source = b.tensor_input(node)
    name = node.name
    if module.approximate == "tanh":
        # 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
        cube = f"{name}.cube"
        b.add("Mul", [source, source], [f"{name}.square"], f"{name}.square")
        b.add("Mul", [f"{name}.square", source], [cube], cube)
        b.add("Mul", [cube, b.float_constant(f"{name}.k", 0.044715)], [f"{name}.kcube"],
              f"{name}.kcube")
        b.add("Add", [source, f"{name}.kcube"], [f"{name}.inner"], f"{name}.inner")
        b.add("Mul", [f"{name}.inner", b.float_constant(f"{name}.alpha", math.sqrt(2 / math.pi))],
              [f"{name}.scaled"], f"{name}.scaled")
        b.add("Tanh", [f"{name}.scaled"], [f"{name}.squash"], f"{name}.squash")
    else:
        b.add("Mul", [source, b.float_constant(f"{name}.alpha", math.sqrt(0.5))],
              [f"{name}.scaled"], f"{name}.scaled")
        b.add("Erf", [f"{name}.scaled"], [f"{name}.squash"], f"{name}.squash")
    b.add("Add", [f"{name}.squash", b.float_constant(f"{name}.one", 1.0)], [f"{name}.plus"],
          f"{name}.plus")
    b.add("Mul", [source, b.float_constant(f"{name}.half", 0.5)], [f"{name}.halfx"],
          f"{name}.halfx")
    b.add("Mul", [f"{name}.halfx", f"{name}.plus"], [name], name)
    b.env[node] = name


def _emit_softmax(b: _Builder, node: fx.Node, module: nn.Softmax) -> None:
    rank = len(b.input_info(node).shape)
    dim = module.dim
    if dim is None:  # torch's legacy implicit dim
        dim = 0 if rank in (0, 1, 3) else 1
    axis = dim % rank
    if b.opset < 13 and axis != rank - 1:
        raise ExportError(
            f"softmax '{node.target}' over dim {dim} of a rank-{rank} tensor needs opset >= 13 "
            "(older Softmax flattens the trailing dims). Export with opset=13 or later."
        )
    b.add("Softmax", [b.tensor_input(node)], [node.name], node.name, axis=axis)
    b.env[node] = node.name


def _binary(op_type: str) -> Emitter:
    def emit(b: _Builder, node: fx.Node, module: Any) -> None:
        b.add(op_type, [b.operand(node, 0), b.operand(node, 1)], [node.name], node.name)
        b.env[node] = node.name
    return emit


def _emit_cat(b: _Builder, node: fx.Node, module: qm.Cat) -> None:
    inputs = [b.value(arg) for arg in node.args]
    rank = len(b.info(node).shape)
    b.add("Concat", inputs, [node.name], node.name, axis=module.dim % rank)
    b.env[node] = node.name


def _emit_stack(b: _Builder, node: fx.Node, module: qm.Stack) -> None:
    output_shape = b.info(node).shape
    axis = module.dim % len(output_shape)
    pieces = []
    for index, arg in enumerate(node.args):
        shape = list(b.info(arg).shape)
        shape.insert(axis, 1)
        piece = f"{node.name}.unsqueeze{index}"
        b.reshape(piece, b.value(arg), piece, tuple(shape))
        pieces.append(piece)
    b.add("Concat", pieces, [node.name], node.name, axis=axis)
    b.env[node] = node.name


def _emit_mean(b: _Builder, node: fx.Node, module: qm.Mean) -> None:
    rank = len(b.input_info(node).shape)
    dims = module.dim
    dims = list(range(rank)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    axes = sorted(dim % rank for dim in dims)
    keepdims = int(module.keepdim)
    source = b.tensor_input(node)
    if b.opset >= 18:
        b.add("ReduceMean", [source, b.int64_constant(f"{node.name}.axes", axes)], [node.name],
              node.name, keepdims=keepdims)
    else:
        b.add("ReduceMean", [source], [node.name], node.name, axes=axes, keepdims=keepdims)
    b.env[node] = node.name


def _emit_amax(b: _Builder, node: fx.Node, module: Any) -> None:
    """`amax` (a max over dims: exact, and TIDL's global max pool when over H and W)."""
    rank = len(b.input_info(node).shape)
    args = [b.value(arg) for arg in node.args[1:]]
    dims = args[0] if args else node.kwargs.get("dim", ())
    keepdim = bool(args[1] if len(args) > 1 else node.kwargs.get("keepdim", False))
    dims = [dims] if isinstance(dims, int) else list(dims) or list(range(rank))
    axes = sorted(dim % rank for dim in dims)
    source = b.tensor_input(node)
    if b.opset >= 18:
        b.add("ReduceMax", [source, b.int64_constant(f"{node.name}.axes", axes)], [node.name],
              node.name, keepdims=int(keepdim))
    else:
        b.add("ReduceMax", [source], [node.name], node.name, axes=axes, keepdims=int(keepdim))
    b.env[node] = node.name


def _tuple(value: Any, rank: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [int(value)] * rank


def _emit_avgpool(b: _Builder, node: fx.Node, pool: nn.Module) -> None:
    rank = len(b.input_info(node).shape) - 2
    if getattr(pool, "divisor_override", None):
        raise ExportError(f"avg pool '{node.target}' uses divisor_override, which ONNX lacks.")
    kernel = _tuple(pool.kernel_size, rank)
    stride = _tuple(pool.stride if pool.stride else pool.kernel_size, rank)
    padding = _tuple(pool.padding, rank)
    b.add("AveragePool", [b.tensor_input(node)], [node.name], node.name, kernel_shape=kernel,
          strides=stride, pads=padding * 2, ceil_mode=int(pool.ceil_mode),
          count_include_pad=int(pool.count_include_pad))
    b.env[node] = node.name


def _emit_maxpool(b: _Builder, node: fx.Node, pool: nn.Module) -> None:
    rank = len(b.input_info(node).shape) - 2
    if pool.return_indices:
        raise ExportError(f"max pool '{node.target}' returns indices; export supports values only.")
    kernel = _tuple(pool.kernel_size, rank)
    stride = _tuple(pool.stride if pool.stride else pool.kernel_size, rank)
    attributes = dict(kernel_shape=kernel, strides=stride, pads=_tuple(pool.padding, rank) * 2,
                      ceil_mode=int(pool.ceil_mode))
    dilation = _tuple(pool.dilation, rank)
    if any(d != 1 for d in dilation):
        attributes["dilations"] = dilation
    b.add("MaxPool", [b.tensor_input(node)], [node.name], node.name, **attributes)
    b.env[node] = node.name


def _adaptive_pool(global_op: str, window_op: str) -> Emitter:
    def emit(b: _Builder, node: fx.Node, pool: nn.Module) -> None:
        in_shape = b.input_info(node).shape
        out_shape = b.info(node).shape
        source = b.tensor_input(node)
        if all(size == 1 for size in out_shape[2:]):
            b.add(global_op, [source], [node.name], node.name)
        elif all(i % o == 0 for i, o in zip(in_shape[2:], out_shape[2:])):
            kernel = [i // o for i, o in zip(in_shape[2:], out_shape[2:])]
            b.add(window_op, [source], [node.name], node.name, kernel_shape=kernel,
                  strides=kernel)
        else:
            raise ExportError(
                f"adaptive pool '{node.target}' maps {in_shape[2:]} to {out_shape[2:]}, which is "
                "not a whole-window pooling; ONNX has no adaptive pool. Choose an input size "
                "divisible by the output size, or use a plain pool."
            )
        b.env[node] = node.name
    return emit


def _emit_flatten(b: _Builder, node: fx.Node, module: Any) -> None:
    in_rank = len(b.input_info(node).shape)
    start = module.start_dim if isinstance(module, nn.Flatten) else _flatten_start(node)
    end = module.end_dim if isinstance(module, nn.Flatten) else _flatten_end(node)
    if start % in_rank >= 1 and end % in_rank == in_rank - 1 and len(b.info(node).shape) == 2:
        b.add("Flatten", [b.tensor_input(node)], [node.name], node.name, axis=start % in_rank)
    else:
        b.reshape(node.name, b.tensor_input(node), node.name, b.info(node).shape)
    b.env[node] = node.name


def _flatten_start(node: fx.Node) -> int:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)


def _flatten_end(node: fx.Node) -> int:
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)


def _emit_reshape(b: _Builder, node: fx.Node, module: Any) -> None:
    b.reshape(node.name, b.tensor_input(node), node.name, b.info(node).shape)
    b.env[node] = node.name


def _emit_alias(b: _Builder, node: fx.Node, module: Any) -> None:
    b.env[node] = b.tensor_input(node)


def _emit_interpolate(b: _Builder, node: fx.Node, module: qm.Interpolate) -> None:
    mode = module.mode
    if module.antialias:
        raise ExportError(f"resize '{node.target}' uses antialias=True, which TIDL lacks.")
    if mode in ("nearest", "nearest-exact"):
        attributes = dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                          nearest_mode="floor")
        if mode == "nearest-exact":
            attributes.update(coordinate_transformation_mode="half_pixel",
                              nearest_mode="round_prefer_ceil")
    elif mode in ("linear", "bilinear", "trilinear"):
        transform = "align_corners" if module.align_corners else "pytorch_half_pixel"
        attributes = dict(mode="linear", coordinate_transformation_mode=transform)
    else:
        raise ExportError(f"resize '{node.target}' uses mode '{mode}', which has no exact ONNX "
                          "Resize equivalent here; use nearest or (bi)linear.")
    sizes = b.int64_constant(f"{node.name}.sizes", b.info(node).shape)
    b.add("Resize", [b.tensor_input(node), "", "", sizes], [node.name], node.name, **attributes)
    b.env[node] = node.name


def _emit_pixel_shuffle(b: _Builder, node: fx.Node, module: nn.PixelShuffle) -> None:
    b.add("DepthToSpace", [b.tensor_input(node)], [node.name], node.name,
          blocksize=module.upscale_factor, mode="CRD")
    b.env[node] = node.name


def _emit_channel_shuffle(b: _Builder, node: fx.Node, module: Any) -> None:
    batch, channels, *rest = b.input_info(node).shape
    groups = module.groups
    grouped = f"{node.name}.grouped"
    b.reshape(grouped, b.tensor_input(node), grouped, (batch, groups, channels // groups, *rest))
    swapped = f"{node.name}.transpose"
    perm = [0, 2, 1] + list(range(3, 3 + len(rest)))
    b.add("Transpose", [grouped], [swapped], swapped, perm=perm)
    b.reshape(node.name, swapped, node.name, (batch, channels, *rest))
    b.env[node] = node.name


def _emit_transpose(b: _Builder, node: fx.Node, module: Any) -> None:
    rank = len(b.input_info(node).shape)
    args = [b.value(arg) for arg in node.args[1:]]
    if node.target in ("permute", torch.permute):
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        dims = dims or node.kwargs.get("dims")
        perm = [int(d) % rank for d in dims]
    elif node.target in ("t", torch.t):
        perm = list(reversed(range(rank)))
    else:
        first = args[0] if args else node.kwargs.get("dim0", node.kwargs.get("axis0"))
        second = args[1] if len(args) > 1 else node.kwargs.get("dim1", node.kwargs.get("axis1"))
        perm = list(range(rank))
        first, second = first % rank, second % rank
        perm[first], perm[second] = perm[second], perm[first]
    b.add("Transpose", [b.tensor_input(node)], [node.name], node.name, perm=perm)
    b.env[node] = node.name


def _call_arguments(node: fx.Node, names: tuple[str, ...], b: _Builder) -> list[Any]:
    """Positional-or-keyword arguments after the tensor, as static values."""
    args = [b.value(arg) for arg in node.args[1:]]
    return [args[index] if index < len(args) else b.value(node.kwargs.get(name))
            for index, name in enumerate(names)]


def _emit_roll(b: _Builder, node: fx.Node, module: Any) -> None:
    shape = b.input_info(node).shape
    shifts, dims = _call_arguments(node, ("shifts", "dims"), b)
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        raise ExportError(f"roll '{node.name}' without dims (a roll of the flattened tensor) "
                          "does not export; give dims.")
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    dims = [dims] if isinstance(dims, int) else list(dims)
    result = _roll(b, node.name, b.tensor_input(node), shape, shifts,
                   [dim % len(shape) for dim in dims])
    b.add("Identity", [result], [node.name], f"{node.name}.identity")
    b.env[node] = node.name


def _emit_flip(b: _Builder, node: fx.Node, module: Any) -> None:
    shape = b.input_info(node).shape
    (dims,) = _call_arguments(node, ("dims",), b)
    dims = [dims] if isinstance(dims, int) else list(dims)
    axes = [dim % len(shape) for dim in dims]
    _slice(b, node.name, b.tensor_input(node), [-1] * len(axes), [-(2 ** 62)] * len(axes),
           axes, [-1] * len(axes))
    b.env[node] = node.name


def _emit_movedim(b: _Builder, node: fx.Node, module: Any) -> None:
    rank = len(b.input_info(node).shape)
    source, destination = _call_arguments(node, ("source", "destination"), b)
    sources = [source] if isinstance(source, int) else list(source)
    destinations = [destination] if isinstance(destination, int) else list(destination)
    sources = [dim % rank for dim in sources]
    destinations = [dim % rank for dim in destinations]
    rest = iter(dim for dim in range(rank) if dim not in sources)
    placed = dict(zip(destinations, sources))
    perm = [placed[axis] if axis in placed else next(rest) for axis in range(rank)]
    b.add("Transpose", [b.tensor_input(node)], [node.name], node.name, perm=perm)
    b.env[node] = node.name


def _emit_unbind(b: _Builder, node: fx.Node, module: Any) -> None:
    shape = b.input_info(node).shape
    (dim,) = _call_arguments(node, ("dim",), b)
    axis = (dim or 0) % len(shape)
    pieces = [f"{node.name}.piece{index}" for index in range(shape[axis])]
    if b.opset >= 13:
        b.add("Split", [b.tensor_input(node), b.int64_constant(
            f"{node.name}.sizes", [1] * shape[axis])], pieces, node.name, axis=axis)
    else:
        b.add("Split", [b.tensor_input(node)], pieces, node.name, axis=axis,
              split=[1] * shape[axis])
    outputs = []
    for index, (piece, record) in enumerate(zip(pieces, b.records[node])):
        output = f"{node.name}.{index}"
        b.reshape(output, piece, output, record.shape)
        outputs.append(output)
    b.env[node] = outputs


def _emit_pixel_unshuffle(b: _Builder, node: fx.Node, module: Any) -> None:
    """pixel_unshuffle as Reshape/Transpose/Reshape (SpaceToDepth orders channels otherwise)."""
    factor = module.downscale_factor if module is not None else _call_arguments(
        node, ("downscale_factor",), b)[0]
    *lead, channels, height, width = b.input_info(node).shape
    batch = int(np.prod(lead)) if lead else 1
    name = node.name
    b.reshape(f"{name}.split", b.tensor_input(node), f"{name}.split",
              (batch, channels, height // factor, factor, width // factor, factor))
    b.add("Transpose", [f"{name}.split"], [f"{name}.moved"], f"{name}.moved",
          perm=[0, 1, 3, 5, 2, 4])
    b.reshape(name, f"{name}.moved", name, b.info(node).shape)
    b.env[node] = name


def _emit_split(b: _Builder, node: fx.Node, module: Any) -> None:
    in_shape = b.input_info(node).shape
    pieces = b.records[node]
    args = [b.value(arg) for arg in node.args[1:]]
    dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
    axis = int(dim) % len(in_shape)
    sizes = [piece.shape[axis] for piece in pieces]
    outputs = [f"{node.name}.{index}" for index in range(len(pieces))]
    if b.opset >= 13:
        b.add("Split", [b.tensor_input(node), b.int64_constant(f"{node.name}.sizes", sizes)],
              outputs, node.name, axis=axis)
    else:
        b.add("Split", [b.tensor_input(node)], outputs, node.name, axis=axis, split=sizes)
    b.env[node] = outputs


def _emit_getitem(b: _Builder, node: fx.Node, module: Any) -> None:
    container = b.value(node.args[0])
    index = b.value(node.args[1])
    if isinstance(container, (list, tuple)):
        b.env[node] = container[index]
        return
    if not isinstance(container, str):
        raise ExportError(f"internal: getitem '{node.name}' on a non-tensor reached the emitter.")
    _emit_slice(b, node, container, index)


def _emit_slice(b: _Builder, node: fx.Node, source: str, index: Any) -> None:
    """Basic tensor indexing (ints, slices with positive steps, None, Ellipsis) as
    Slice + Reshape to the recorded static shape."""
    in_shape = b.input_info(node).shape
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (item is None or item is Ellipsis or isinstance(item, (int, slice)))
           for item in items):
        raise ExportError(f"indexing '{node.name}' uses {index!r}; only ints, slices, None and "
                          "... export (no tensor indices).")
    if Ellipsis in items:
        position = items.index(Ellipsis)
        explicit = sum(1 for item in items if item is not None and item is not Ellipsis)
        items[position:position + 1] = [slice(None)] * (len(in_shape) - explicit)
    starts, ends, axes, steps = [], [], [], []
    dim = 0
    for item in items:
        if item is None:
            continue
        size = in_shape[dim]
        if isinstance(item, int):
            start = item % size
            starts.append(start)
            ends.append(start + 1)
            axes.append(dim)
            steps.append(1)
        elif item != slice(None):
            start, stop, step = item.indices(size)
            if step <= 0:
                raise ExportError(f"indexing '{node.name}' uses a non-positive step.")
            starts.append(start)
            ends.append(stop)
            axes.append(dim)
            steps.append(step)
        dim += 1
    current = source
    if axes:
        current = f"{node.name}.slice"
        b.add("Slice", [source, b.int64_constant(f"{node.name}.starts", starts),
                        b.int64_constant(f"{node.name}.ends", ends),
                        b.int64_constant(f"{node.name}.axes", axes),
                        b.int64_constant(f"{node.name}.steps", steps)], [current], current)
    b.reshape(node.name, current, node.name, b.info(node).shape)
    b.env[node] = node.name


def _emit_matmul(b: _Builder, node: fx.Node, module: Any) -> None:
    """matmul / @ / bmm: float MatMul between quantizers (torch and ONNX broadcast alike)."""
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    b.add("MatMul", [b.tensor_input(node), b.value(other)], [node.name], node.name)
    b.env[node] = node.name


def _emit_einsum(b: _Builder, node: fx.Node, module: Any) -> None:
    """torch.einsum as ONNX Einsum (opset >= 12), letters renamed to lowercase: ONNX Runtime
    accepts only those."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    letters: dict[str, str] = {}
    renamed = []
    for character in equation.replace(" ", ""):
        if character.isalpha():
            if character not in letters:
                if len(letters) == 26:
                    raise ExportError(f"einsum '{node.name}' uses more than 26 subscripts.")
                letters[character] = chr(ord("a") + len(letters))
            character = letters[character]
        renamed.append(character)
    if b.opset < 12:
        raise ExportError(f"einsum '{node.name}' needs opset >= 12; export with opset=13.")
    b.add("Einsum", [b.value(operand) for operand in operands], [node.name], node.name,
          equation="".join(renamed))
    b.env[node] = node.name


def _pad_end(b: _Builder, name: str, source: str, shape: tuple[int, ...],
             ends: dict[int, int]) -> tuple[str, tuple[int, ...]]:
    """Zero-pad `source` at the end of the given axes (ONNX Pad), unless nothing to pad."""
    if not any(ends.values()):
        return source, shape
    pads = [0] * len(shape) + [ends.get(axis, 0) for axis in range(len(shape))]
    b.add("Pad", [source, b.int64_constant(f"{name}.pads", pads)], [name], name)
    return name, tuple(size + ends.get(axis, 0) for axis, size in enumerate(shape))


def _slice(b: _Builder, name: str, source: str, starts: list[int], ends: list[int],
           axes: list[int], steps: list[int] | None = None) -> str:
    inputs = [source, b.int64_constant(f"{name}.starts", starts),
              b.int64_constant(f"{name}.ends", ends), b.int64_constant(f"{name}.axes", axes)]
    if steps is not None:
        inputs.append(b.int64_constant(f"{name}.steps", steps))
    b.add("Slice", inputs, [name], name)
    return name


def _roll(b: _Builder, name: str, source: str, shape: tuple[int, ...], shifts: list[int],
          axes: list[int]) -> str:
    """torch.roll as Slice + Concat per axis."""
    for shift, axis in zip(shifts, axes):
        shift %= shape[axis]
        if shift == 0:
            continue
        size = shape[axis]
        tail = _slice(b, f"{name}.axis{axis}.tail", source, [size - shift], [size], [axis])
        head = _slice(b, f"{name}.axis{axis}.head", source, [0], [size - shift], [axis])
        b.add("Concat", [tail, head], [f"{name}.axis{axis}"], f"{name}.axis{axis}", axis=axis)
        source = f"{name}.axis{axis}"
    return source


def _constant_tensor(b: _Builder, node: fx.Node, arg: Any, what: str) -> Tensor | None:
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg in b.constants:
        return b.constants[arg].detach().float()
    raise ExportError(f"'{node.name}': {what} must be a parameter or buffer to export.")


def _emit_patch_merging_pad(b: _Builder, node: fx.Node, module: Any) -> None:
    """torchvision Swin's `_patch_merging_pad`: pad H, W to even, then the four 2x2
    phases side by side on the channel axis."""
    shape = b.input_info(node).shape
    rank = len(shape)
    height, width = rank - 3, rank - 2
    source, _ = _pad_end(b, f"{node.name}.pad", b.tensor_input(node), shape,
                         {height: shape[height] % 2, width: shape[width] % 2})
    big = 2 ** 62
    phases = [_slice(b, f"{node.name}.phase{index}", source, [row, column], [big, big],
                     [height, width], [2, 2])
              for index, (row, column) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1)))]
    b.add("Concat", phases, [node.name], node.name, axis=rank - 1)
    b.env[node] = node.name


def _swin_attention_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int]
                         ) -> Tensor:
    """The shifted-window mask of torchvision's `shifted_window_attention`, (nW, N, N)."""
    mask = torch.zeros(pad_h, pad_w)
    count = 0
    for rows in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for columns in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            mask[rows[0]:rows[1], columns[0]:columns[1]] = count
            count += 1
    windows = (pad_h // window[0]) * (pad_w // window[1])
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _emit_shifted_window_attention(b: _Builder, node: fx.Node, module: Any) -> None:
    """torchvision Swin's `shifted_window_attention` (v1, and v2's cosine attention) in float
    at the export shapes: pad, roll, window partition, attention with relative position bias
    and shift mask, window merge, roll back, crop; the mask and logit scale are constants."""
    import inspect

    bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    if arguments["training"]:
        raise ExportError(f"'{node.name}': export the model in eval mode (training=True).")
    name = node.name
    batch, height, width, channels = b.input_info(node).shape
    window, heads = list(arguments["window_size"]), int(arguments["num_heads"])
    shift = list(arguments["shift_size"])
    head_dim = channels // heads
    pad_r = (window[1] - width % window[1]) % window[1]
    pad_b = (window[0] - height % window[0]) % window[0]
    source, padded = _pad_end(b, f"{name}.pad", b.tensor_input(node),
                              (batch, height, width, channels), {1: pad_b, 2: pad_r})
    pad_h, pad_w = padded[1], padded[2]
    if window[0] >= pad_h:
        shift[0] = 0
    if window[1] >= pad_w:
        shift[1] = 0
    shifted = sum(shift) > 0
    if shifted:
        source = _roll(b, f"{name}.roll", source, padded, [-shift[0], -shift[1]], [1, 2])
    rows, columns = pad_h // window[0], pad_w // window[1]
    windows, tokens = rows * columns, window[0] * window[1]
    b.reshape(f"{name}.grid", source, f"{name}.grid",
              (batch, rows, window[0], columns, window[1], channels))
    b.add("Transpose", [f"{name}.grid"], [f"{name}.windowed"], f"{name}.windowed",
          perm=[0, 1, 3, 2, 4, 5])
    b.reshape(f"{name}.windows", f"{name}.windowed", f"{name}.windows",
              (batch * windows, tokens, channels))
    qkv_weight = _constant_tensor(b, node, arguments["qkv_weight"], "qkv_weight")
    qkv_bias = _constant_tensor(b, node, arguments["qkv_bias"], "qkv_bias")
    logit_scale = _constant_tensor(b, node, arguments["logit_scale"], "logit_scale")
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        qkv_bias[channels:2 * channels] = 0
    qkv = _float_linear(b, f"{name}.qkv", f"{name}.windows", qkv_weight, qkv_bias)
    b.reshape(f"{name}.qkv_heads", qkv, f"{name}.qkv_heads",
              (batch * windows, tokens, 3, heads, head_dim))
    b.add("Transpose", [f"{name}.qkv_heads"], [f"{name}.qkv_split"], f"{name}.qkv_split",
          perm=[2, 0, 3, 1, 4])
    parts = {}
    for index, role in enumerate(("query", "key", "value")):
        piece = _slice(b, f"{name}.{role}_slice", f"{name}.qkv_split", [index], [index + 1],
                       [0])
        b.reshape(f"{name}.{role}", piece, f"{name}.{role}",
                  (batch * windows, heads, tokens, head_dim))
        parts[role] = f"{name}.{role}"
    query, key = parts["query"], parts["key"]
    if logit_scale is not None:  # cosine attention: F.normalize, then a learned scale
        for role in ("query", "key"):
            norm = f"{name}.{role}_norm"
            if b.opset < 18:
                b.add("ReduceL2", [parts[role]], [norm], norm, axes=[-1], keepdims=1)
            else:
                b.add("ReduceL2", [parts[role], b.int64_constant(f"{norm}.axes", [-1])],
                      [norm], norm, keepdims=1)
            b.add("Max", [norm, b.float_constant(f"{norm}.eps", 1e-12)], [f"{norm}.safe"],
                  f"{norm}.safe")
            b.add("Div", [parts[role], f"{norm}.safe"], [f"{name}.{role}_unit"],
                  f"{name}.{role}_unit")
        query, key = f"{name}.query_unit", f"{name}.key_unit"
        scale_value = torch.clamp(logit_scale, max=math.log(100.0)).exp().numpy()
    else:
        b.add("Mul", [query, b.float_constant(f"{name}.scale", head_dim ** -0.5)],
              [f"{name}.query_scaled"], f"{name}.query_scaled")
        query = f"{name}.query_scaled"
    b.add("Transpose", [key], [f"{name}.key_t"], f"{name}.key_t", perm=[0, 1, 3, 2])
    b.add("MatMul", [query, f"{name}.key_t"], [f"{name}.scores"], f"{name}.scores")
    scores = f"{name}.scores"
    if logit_scale is not None:
        b.add("Mul", [scores, b.float_constant(f"{name}.logit_scale", scale_value)],
              [f"{name}.scores_scaled"], f"{name}.scores_scaled")
        scores = f"{name}.scores_scaled"
    b.add("Add", [scores, b.value(arguments["relative_position_bias"])],
          [f"{name}.scores_biased"], f"{name}.scores_biased")
    scores = f"{name}.scores_biased"
    if shifted:
        mask = _swin_attention_mask(pad_h, pad_w, window, shift)
        b.reshape(f"{name}.scores_windows", scores, f"{name}.scores_windows",
                  (batch, windows, heads, tokens, tokens))
        b.add("Add", [f"{name}.scores_windows", b.float_constant(
            f"{name}.mask", mask.reshape(1, windows, 1, tokens, tokens).numpy())],
              [f"{name}.scores_masked"], f"{name}.scores_masked")
        b.reshape(f"{name}.scores_flat", f"{name}.scores_masked", f"{name}.scores_flat",
                  (batch * windows, heads, tokens, tokens))
        scores = f"{name}.scores_flat"
    b.add("Softmax", [scores], [f"{name}.probabilities"], f"{name}.probabilities", axis=-1)
    b.add("MatMul", [f"{name}.probabilities", parts["value"]], [f"{name}.context"],
          f"{name}.context")
    b.add("Transpose", [f"{name}.context"], [f"{name}.context_t"], f"{name}.context_t",
          perm=[0, 2, 1, 3])
    b.reshape(f"{name}.merged", f"{name}.context_t", f"{name}.merged",
              (batch * windows, tokens, channels))
    proj_weight = _constant_tensor(b, node, arguments["proj_weight"], "proj_weight")
    proj_bias = _constant_tensor(b, node, arguments["proj_bias"], "proj_bias")
    projected = _float_linear(b, f"{name}.projected", f"{name}.merged", proj_weight, proj_bias)
    b.reshape(f"{name}.ungrid", projected, f"{name}.ungrid",
              (batch, rows, columns, window[0], window[1], channels))
    b.add("Transpose", [f"{name}.ungrid"], [f"{name}.unwindowed"], f"{name}.unwindowed",
          perm=[0, 1, 3, 2, 4, 5])
    b.reshape(f"{name}.image", f"{name}.unwindowed", f"{name}.image",
              (batch, pad_h, pad_w, channels))
    result = f"{name}.image"
    if shifted:
        result = _roll(b, f"{name}.unroll", result, padded, shift, [1, 2])
    if pad_b or pad_r:
        result = _slice(b, f"{name}.crop", result, [0, 0], [height, width], [1, 2])
    b.add("Identity", [result], [name], name)
    b.env[node] = name


WRAPPED_EMITTERS: dict[str, Emitter] = {
    "torchvision.models.swin_transformer._patch_merging_pad": _emit_patch_merging_pad,
    "torchvision.models.swin_transformer.shifted_window_attention":
        _emit_shifted_window_attention,
}
"""`@torch.fx.wrap` functions of torchvision (leaves in quantfx's graph) -> emitter, by
qualified name (no torchvision import needed)."""


def _emit_expand(b: _Builder, node: fx.Node, module: Any) -> None:
    shape = b.int64_constant(f"{node.name}.shape", b.info(node).shape)
    b.add("Expand", [b.tensor_input(node), shape], [node.name], node.name)
    b.env[node] = node.name


MODULE_EMITTERS: list[tuple[type[nn.Module], Emitter]] = [
    (Quantize, _emit_quantize),
    (QuantizedLayer, _emit_quantized_layer),
    (nn.ReLU, _simple("Relu")),
    (nn.ReLU6, _emit_relu6),
    (nn.Hardtanh, _emit_hardtanh),
    (nn.LeakyReLU, _emit_leaky_relu),
    (nn.Hardswish, _emit_hardswish),
    (nn.Hardsigmoid, _emit_hardsigmoid),
    (nn.Sigmoid, _simple("Sigmoid")),
    (nn.Tanh, _simple("Tanh")),
    (nn.SiLU, _emit_silu),
    (nn.GELU, _emit_gelu),
    (nn.Softmax, _emit_softmax),
    (nn.modules.batchnorm._BatchNorm, _emit_batchnorm),
    (nn.LayerNorm, _emit_layer_norm),
    (nn.MultiheadAttention, _emit_multihead_attention),
    (qm.Add, _binary("Add")),
    (qm.Sub, _binary("Sub")),
    (qm.Mul, _binary("Mul")),
    (qm.Stack, _emit_stack),
    (qm.Cat, _emit_cat),
    (qm.Mean, _emit_mean),
    (qm.Interpolate, _emit_interpolate),
    (nn.modules.pooling._AvgPoolNd, _emit_avgpool),
    (nn.modules.pooling._MaxPoolNd, _emit_maxpool),
    (nn.modules.pooling._AdaptiveAvgPoolNd, _adaptive_pool("GlobalAveragePool", "AveragePool")),
    (nn.modules.pooling._AdaptiveMaxPoolNd, _adaptive_pool("GlobalMaxPool", "MaxPool")),
    (nn.Flatten, _emit_flatten),
    (nn.Unflatten, _emit_reshape),
    (nn.PixelShuffle, _emit_pixel_shuffle),
    (nn.PixelUnshuffle, _emit_pixel_unshuffle),
    (nn.ChannelShuffle, _emit_channel_shuffle),
    (ALIAS_MODULES, _emit_alias),
]
"""Module type -> emitter, first match wins (so subclasses go before their bases)."""

CALL_EMITTERS: dict[Any, Emitter] = {
    operator.getitem: _emit_getitem,
    "__getitem__": _emit_getitem,
    "transpose": _emit_transpose, torch.transpose: _emit_transpose,
    "swapaxes": _emit_transpose, torch.swapaxes: _emit_transpose,
    "swapdims": _emit_transpose, torch.swapdims: _emit_transpose,
    "permute": _emit_transpose, torch.permute: _emit_transpose,
    "t": _emit_transpose, torch.t: _emit_transpose,
    "chunk": _emit_split, torch.chunk: _emit_split,
    "split": _emit_split, torch.split: _emit_split,
    "expand": _emit_expand, "expand_as": _emit_expand,
    "amax": _emit_amax, torch.amax: _emit_amax,
    torch.matmul: _emit_matmul, operator.matmul: _emit_matmul, "matmul": _emit_matmul,
    torch.bmm: _emit_matmul, "bmm": _emit_matmul,
    torch.einsum: _emit_einsum,
    "roll": _emit_roll, torch.roll: _emit_roll,
    "flip": _emit_flip, torch.flip: _emit_flip,
    "movedim": _emit_movedim, torch.movedim: _emit_movedim,
    "unbind": _emit_unbind, torch.unbind: _emit_unbind,
    F.pixel_unshuffle: _emit_pixel_unshuffle,
    torch.flatten: _emit_flatten,
    **{target: _emit_reshape for target in RESHAPE_CALLS if target is not torch.flatten},
    **{target: _emit_alias for target in ALIAS_CALLS},
}
"""Function or Tensor-method name -> emitter for call_function / call_method nodes."""


def _emitter_for(b: _Builder, node: fx.Node) -> tuple[Emitter, Any]:
    if node.op == "call_module":
        module = b.module.get_submodule(node.target)
        for module_type, emitter in MODULE_EMITTERS:
            if isinstance(module, module_type):
                return emitter, module
        raise ExportError(
            f"cannot export node '{node.name}': module '{node.target}' of type "
            f"{type(module).__module__}.{type(module).__name__} has no ONNX emitter in quantfx. "
            "Replace it by supported layers, or report the op to the quantfx developers."
        )
    emitter = CALL_EMITTERS.get(node.target)
    if emitter is None and callable(node.target):
        qualified = f"{getattr(node.target, '__module__', '')}.{node.target.__qualname__}"
        emitter = WRAPPED_EMITTERS.get(qualified)
    if emitter is None:
        what = node.target if isinstance(node.target, str) else getattr(
            node.target, "__name__", repr(node.target))
        raise ExportError(
            f"cannot export node '{node.name}': {node.op} '{what}' has no ONNX emitter in "
            "quantfx. Rewrite it with supported ops (or wrap it in a supported module), or "
            "report the op to the quantfx developers."
        )
    return emitter, None


# ----------------------------------------------------------------------------------------------
# Building the model


def _is_power_of_two(value: float) -> bool:
    if not math.isfinite(value) or value <= 0:
        return False
    mantissa, _ = math.frexp(value)
    return mantissa == 0.5


def _flatten_outputs(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _flatten_outputs(item)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _flatten_outputs(item)]
    return [value]


def _onnx_dtype(dtype: torch.dtype) -> int:
    return {torch.float32: TensorProto.FLOAT, torch.int64: TensorProto.INT64,
            torch.int32: TensorProto.INT32, torch.bool: TensorProto.BOOL}.get(
        dtype, TensorProto.FLOAT)


def _is_constant(b: _Builder, node: fx.Node) -> bool:
    """Whether `node` computes from parameters, buffers and Python values only."""
    inputs: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), inputs.append)
    return bool(inputs) and all(
        arg in b.constants or not isinstance(b.records.get(arg), (TensorInfo, list))
        for arg in inputs)


def _evaluate(model: fx.GraphModule, b: _Builder, node: fx.Node) -> Tensor:
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


def build_model(model: fx.GraphModule, inputs: tuple[Tensor, ...], mode: str = QDQ,
                opset: int = DEFAULT_QDQ_OPSET) -> tuple[onnx.ModelProto, BitWidths]:
    """The ONNX model of converted `model` at the static shapes of `inputs` (no checks on the
    model's stage: `export_onnx` does those). `mode` is "qdq", "clip" or "float"."""
    recorder = _Recorder(model)
    try:
        with torch.no_grad():
            recorder.run(*inputs)
    except Exception as error:  # noqa: BLE001 - the model rejected the inputs
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise ExportError(
            f"the converted model fails on example_inputs of shape(s) {shapes}: "
            f"{type(error).__name__}: {error}\nFix: pass inputs as the model's forward takes "
            "them (same number, rank and channel count as at prepare time)."
        ) from error
    builder = _Builder(model, recorder.records, mode, opset)
    graph_inputs, graph_outputs = [], []
    for node in model.graph.nodes:
        record = recorder.records.get(node)
        if node.op == "placeholder":
            info = record
            graph_inputs.append(helper.make_tensor_value_info(node.name, _onnx_dtype(info.dtype),
                                                              list(info.shape)))
            builder.env[node] = node.name
        elif node.op == "get_attr":
            value = functools.reduce(getattr, node.target.split("."), model)  # param/buffer
            if not isinstance(value, torch.Tensor):
                raise ExportError(f"cannot export node '{node.name}': attribute fetch "
                                  f"'{node.target}' is not a tensor.")
            builder.constants[node] = value
        elif node.op == "output":
            outputs = _flatten_outputs(node.args[0])
            for index, out in enumerate(outputs):
                if not isinstance(out, fx.Node) or not isinstance(recorder.records[out],
                                                                   TensorInfo):
                    raise ExportError(f"model output {index} is not a tensor ({out!r}).")
                name = builder.value(out)
                if name in [value.name for value in graph_inputs + graph_outputs]:
                    alias = f"output_{index}"
                    builder.add("Identity", [name], [alias], alias)
                    name = alias
                info = recorder.records[out]
                graph_outputs.append(helper.make_tensor_value_info(
                    name, _onnx_dtype(info.dtype), list(info.shape)))
        elif not isinstance(record, (TensorInfo, list)):
            builder.env[node] = record  # sizes, indices, shape arithmetic: static constants
        elif isinstance(record, TensorInfo) and _is_constant(builder, node):
            builder.constants[node] = _evaluate(model, builder, node)
        else:
            emitter, module = _emitter_for(builder, node)
            emitter(builder, node, module)
    graph = helper.make_graph(builder.nodes, type(model).__name__, graph_inputs, graph_outputs,
                              builder.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                   producer_name="quantfx")
    onnx_model.ir_version = min(onnx_model.ir_version, 10)
    try:
        onnx.checker.check_model(onnx_model, full_check=True)
        onnx_model = onnx.shape_inference.infer_shapes(onnx_model, check_type=True,
                                                       strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"internal: the emitted ONNX graph is invalid: {error}") from error
    _check_inferred_shapes(onnx_model, recorder.records, builder.env)
    return onnx_model, builder.bit_widths


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


# ----------------------------------------------------------------------------------------------
# Verification in ONNX Runtime


def verification_session(path: str, threads: int = 1, optimized: bool = False) -> Any:
    """An ONNX Runtime session that executes the file as written: no graph rewrites.

    With optimizations on, ORT fuses DQ->Conv->Q into integer kernels (QLinearConv); on CPUs
    without VNNI its u8s8 kernels may saturate int16 intermediate sums, which changes results.
    The float path that is left computes exactly what the ONNX operators define.
    `optimized=True` gives the deployment session instead (all optimizations, integer kernels).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.use_deterministic_compute = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimized:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def _batches(data: Any, count: int) -> list[tuple[Tensor, ...]]:
    """Normalize `verify_data` to a list of input tuples."""
    if data is None:
        return []
    if isinstance(data, Tensor):
        return [(data,)]
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, Tensor) for t in data) \
            and len(data) == count:
        return [tuple(data)]
    try:
        batches = [(item,) if isinstance(item, Tensor) else tuple(item)[:count] for item in data]
    except TypeError as error:
        raise ExportError(f"verify_data must be a tensor, a tuple of tensors or an iterable of "
                          f"batches, got {type(data).__name__}.") from error
    return batches


def _split_to_export_batch(batch: tuple[Tensor, ...], shapes: list[tuple[int, ...]]
                           ) -> list[tuple[Tensor, ...]]:
    """Cut a verification batch into pieces of the exported (static) batch size."""
    if len(batch) != len(shapes):
        raise ExportError(f"verify_data batches need {len(shapes)} tensor(s), got {len(batch)}.")
    for tensor, shape in zip(batch, shapes):
        if tuple(tensor.shape[1:]) != shape[1:] or tensor.shape[0] % shape[0]:
            raise ExportError(
                f"verify_data tensor of shape {tuple(tensor.shape)} does not fit the exported "
                f"static shape {shape}: keep the non-batch dims and use a multiple of the batch "
                f"size {shape[0]}."
            )
    pieces = batch[0].shape[0] // shapes[0][0]
    return [tuple(t.split(shape[0])[index] for t, shape in zip(batch, shapes))
            for index in range(pieces)]


def _output_quantizers(model: fx.GraphModule) -> list[Quantize | None]:
    """The quantizer each model output lies on (found through shape-only ops), or None."""
    from quantfx.passes.place import first_input, is_shape_only

    output = next(node for node in model.graph.nodes if node.op == "output")
    found: list[Quantize | None] = []
    for out in _flatten_outputs(output.args[0]):
        source, quantizer = out, None
        while isinstance(source, fx.Node):
            module = model.get_submodule(source.target) if source.op == "call_module" else None
            if isinstance(module, Quantize):
                quantizer = module
                break
            if not is_shape_only(model, source):
                break
            source = first_input(source)
        found.append(quantizer)
    return found


def default_tolerance(quantizer: Quantize | None) -> float:
    """Allowed output difference in LSBs: 1 for 8-bit outputs, `SIXTEEN_BIT_TOLERANCE_LSB` for
    16-bit ones (int16 x int16 products pass 2**24, so float32 accumulation rounds in both
    PyTorch and ONNX Runtime, each in its own summation order)."""
    if quantizer is not None and quantizer.bits == 16:
        return SIXTEEN_BIT_TOLERANCE_LSB
    return 1.0


def verify(model: fx.GraphModule, path: str, batches: list[tuple[Tensor, ...]],
           reference: Callable[..., Any] | None = None, threads: int = 1,
           max_lsb_diff: float | None = None, optimized: bool = False) -> dict[str, Any]:
    """Run `path` in ONNX Runtime on `batches` and compare with `reference` (default: `model`).

    Returns the fraction of bit-identical output elements, the largest difference in LSBs of
    each output's quantizer scale, whether every output is within its tolerance (`max_lsb_diff`,
    or `default_tolerance`) and, for 2-D outputs, the share of rows with the same argmax.
    `optimized` runs ORT with all graph optimizations (its integer QDQ kernels) instead.
    """
    session = verification_session(path, threads, optimized)
    input_names = [value.name for value in session.get_inputs()]
    quantizers = _output_quantizers(model)
    scales = [q.scale if q is not None else None for q in quantizers]
    allowed = [max_lsb_diff if max_lsb_diff is not None else default_tolerance(q)
               for q in quantizers]
    reference = reference or model
    device = next(iter(model.parameters()), torch.empty(0)).device
    total = identical = 0
    max_lsb = 0.0
    within = True
    rows = agreeing_rows = 0
    for batch in batches:
        with torch.no_grad():
            expected = _flatten_outputs(reference(*(t.to(device) for t in batch)))
        feed = {name: t.detach().cpu().numpy().astype(np.float32)
                for name, t in zip(input_names, batch)}
        actual = session.run(None, feed)
        for want, got, scale, limit in zip(expected, actual, scales, allowed):
            want = want.detach().cpu().numpy().astype(np.float32)
            total += want.size
            identical += int(np.count_nonzero(want == got))
            difference = float(np.max(np.abs(want.astype(np.float64) - got))) if want.size else 0.0
            lsb = difference / scale if scale else difference
            max_lsb = max(max_lsb, lsb)
            within = within and lsb <= limit
            if want.ndim == 2:
                rows += want.shape[0]
                agreeing_rows += int(np.count_nonzero(want.argmax(1) == got.argmax(1)))
    return {
        "elements_compared": total,
        "fraction_identical": identical / total if total else 1.0,
        "max_lsb_diff": max_lsb,
        "within_tolerance": within,
        "allowed_lsb_diff": allowed,
        "argmax_agreement": agreeing_rows / rows if rows else None,
        "output_scales": scales,
    }


def _clip_simulation(model: fx.GraphModule) -> nn.Module:
    """What the legacy float file computes: the converted model with every Quantize replaced
    by a clamp to its range (no rounding)."""
    import copy

    clipped = copy.deepcopy(model)
    for name, module in list(clipped.named_modules()):
        if isinstance(module, Quantize):
            owner, _, leaf = name.rpartition(".")
            parent = clipped.get_submodule(owner) if owner else clipped
            setattr(parent, leaf, nn.Hardtanh(module.qmin * module.scale,
                                              module.qmax * module.scale))
    return clipped


# ----------------------------------------------------------------------------------------------
# Public entry point


def _check_inputs(model: fx.GraphModule, example_inputs: Any) -> tuple[Tensor, ...]:
    state = state_of(model)
    if state is None or state.stage != "converted":
        got = "a prepared (not yet converted) quantfx model" if state is not None else \
            type(model).__name__
        raise ExportError(
            f"export_onnx needs a converted model, got {got}. Run "
            "cm = quantfx.convert(quantfx.calibrate(quantfx.prepare(model, inputs), data)) and "
            "export cm."
        )
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs or not all(
            isinstance(t, Tensor) for t in example_inputs):
        raise ExportError(
            f"example_inputs must be a tensor or a non-empty tuple of tensors, got "
            f"{type(example_inputs).__name__}. Example: (torch.randn(1, 3, 224, 224),)"
        )
    placeholders = [node for node in model.graph.nodes if node.op == "placeholder"]
    if len(example_inputs) != len(placeholders):
        raise ExportError(
            f"the model takes {len(placeholders)} input(s) "
            f"({', '.join(node.name for node in placeholders)}) but example_inputs holds "
            f"{len(example_inputs)} tensor(s)."
        )
    for index, (tensor, shape) in enumerate(zip(example_inputs, state.input_shapes)):
        if not tensor.is_floating_point():
            raise ExportError(f"example input {index} has dtype {tensor.dtype}; give the float "
                              "tensors the model takes.")
        if tensor.dim() != len(shape):
            raise ExportError(
                f"example input {index} has shape {tuple(tensor.shape)} but the model was "
                f"prepared with rank-{len(shape)} inputs {shape}; give the same layout (with a "
                "batch dimension)."
            )
    return tuple(t.detach().to(torch.float32) for t in example_inputs)


def _choose_opset(opset: int | None, legacy: bool, needs_int16: bool) -> int:
    if opset is None:
        default = DEFAULT_LEGACY_OPSET if legacy else DEFAULT_QDQ_OPSET
        return max(default, INT16_QDQ_OPSET) if needs_int16 and not legacy else default
    if not isinstance(opset, int) or not 11 <= opset <= MAX_OPSET:
        raise ExportError(f"opset={opset!r} is not supported; use 11..{MAX_OPSET} (or None for "
                          "the TIDL default).")
    if not legacy and opset < 13:
        raise ExportError(f"QDQ export needs opset >= 13 (per-channel DequantizeLinear), got "
                          f"{opset}. Use opset=None or legacy=True.")
    if needs_int16 and not legacy and opset < INT16_QDQ_OPSET:
        raise ExportError(
            f"this model has 16-bit tensors, whose QuantizeLinear/DequantizeLinear need opset "
            f">= {INT16_QDQ_OPSET}; got opset={opset}. Use opset=None or {INT16_QDQ_OPSET}."
        )
    return opset


def options_path_for(path: str | os.PathLike) -> str:
    """Where the TIDL options of the model at `path` go: `model.onnx` -> `model.tidl.json`."""
    root, _ = os.path.splitext(os.fspath(path))
    return root + ".tidl.json"


def _temporary_path(final: str) -> str:
    directory = os.path.dirname(os.path.abspath(final))
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(final)}.",
                                         suffix=".tmp", dir=directory)
    os.close(handle)
    return temporary


def export_onnx(
    model: fx.GraphModule,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    verify: bool = True,
    verify_data: Any = None,
    legacy: bool = False,
    max_lsb_diff: float | None = None,
    threads: int = 1,
) -> ExportReport:
    """Write converted `model` to `path` as QDQ ONNX (or, with `legacy=True`, float ONNX with
    Clip ranges for pre-QDQ TIDL) and its TIDL options to `<path stem>.tidl.json`.

    The shapes are static, taken from `example_inputs`. With `verify` (the default) the file is
    run in ONNX Runtime on `example_inputs` (and `verify_data`) and compared with `model`; if an
    output differs by more than `max_lsb_diff` LSBs (default: 1 for 8-bit outputs, 32 for
    16-bit ones) nothing is written and `ExportError` is raised. Writes are atomic: a failed
    export leaves no file behind.
    """
    inputs = _check_inputs(model, example_inputs)
    path = os.fspath(path)
    needs_int16 = any(
        (isinstance(module, Quantize) and module.bits == 16)
        or (isinstance(module, QuantizedLayer) and module.weight_bits == 16)
        for module in model.modules()
    )
    chosen_opset = _choose_opset(opset, legacy, needs_int16)
    model.eval()
    onnx_model, bit_widths = build_model(model, inputs, CLIP if legacy else QDQ, chosen_opset)
    problems = check_constraints(onnx_model)
    if problems:
        raise ExportError("the exported graph breaks TIDL constraints: " + "; ".join(problems))
    options = compile_options(bit_widths, legacy)
    options_path = options_path_for(path)
    report = ExportReport(
        path=path, options_path=options_path, opset=chosen_opset, legacy=legacy,
        tidl_options=options, sixteen_bit_features=bit_widths.sixteen_bit_features(),
        sixteen_bit_params=bit_widths.sixteen_bit_params(),
    )
    temporary_model = _temporary_path(path)
    temporary_options = _temporary_path(options_path)
    try:
        onnx.save(onnx_model, temporary_model)
        with open(temporary_options, "w", encoding="utf-8") as handle:
            json.dump(options, handle, indent=2)
            handle.write("\n")
        if verify:
            _verify_file(model, temporary_model, inputs, verify_data, legacy, max_lsb_diff,
                         threads, report)
        os.replace(temporary_options, options_path)
        os.replace(temporary_model, path)
    finally:
        for leftover in (temporary_model, temporary_options):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
    return report


def _verify_file(model: fx.GraphModule, temporary_model: str, inputs: tuple[Tensor, ...],
                 verify_data: Any, legacy: bool, max_lsb_diff: float | None, threads: int,
                 report: ExportReport) -> None:
    shapes = [tuple(t.shape) for t in inputs]
    batches = [inputs]
    for batch in _batches(verify_data, len(inputs)):
        batches.extend(_split_to_export_batch(batch, shapes))
    reference = _clip_simulation(model) if legacy else model
    figures = verify(model, temporary_model, batches, reference, threads, max_lsb_diff)
    report.verified = True
    report.elements_compared = figures["elements_compared"]
    report.fraction_identical = figures["fraction_identical"]
    report.max_lsb_diff = figures["max_lsb_diff"]
    report.argmax_agreement = figures["argmax_agreement"]
    report.output_scales = figures["output_scales"]
    if not figures["within_tolerance"]:
        allowed = ", ".join(f"{limit:g}" for limit in figures["allowed_lsb_diff"])
        against = "its clip simulation" if legacy else "the converted model"
        float_ops = _float_rounding_ops(model)
        if float_ops:
            advice = (
                f"The graph computes {float_ops} in float between quantizers: ONNX Runtime's "
                "float kernels round differently from PyTorch's, the next quantizer turns that "
                "into 1-LSB flips, and deep networks amplify them. Check the ONNX file's task "
                "accuracy instead: export with a larger max_lsb_diff or verify=False."
            )
        else:
            advice = "Please report this model to the quantfx developers."
        error = ExportError(
            f"ONNX Runtime's outputs differ from {against} by up to {report.max_lsb_diff:g} "
            f"LSB (allowed: {allowed}); {100 * report.fraction_identical:.3f}% of "
            f"{report.elements_compared} elements are identical. No file was written. {advice}"
        )
        error.report = report  # type: ignore[attr-defined] - the figures, for tools
        raise error


FLOAT_ROUNDING_MODULES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.MultiheadAttention, nn.GELU, nn.Softmax, nn.Sigmoid, nn.Tanh, nn.SiLU,
    nn.modules.batchnorm._BatchNorm,
)
"""Modules exported as float math whose rounding ONNX Runtime need not reproduce exactly."""


def _float_rounding_ops(model: nn.Module) -> str:
    """'LayerNorm x25, MultiheadAttention x12' for the float-rounding modules of `model`."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, FLOAT_ROUNDING_MODULES):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return ", ".join(f"{name} x{count}" for name, count in counts.items())
