"""Per-operator rules of TIDL (what the accelerator runs), each with the TI document it is from.

A rule looks at one ONNX node (with the graph's shapes, constants and producers at hand) and
returns findings: "fallback" (the node runs on the ARM cores through ONNX Runtime, often ten
times slower) or "warning" (it runs, but the device may compute something other than quantfx
simulated, or TI has not validated that case).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantfx.tidl.format import clip_problem
from quantfx.tidl.profiles import (
    DEPTHWISE_KERNELS,
    NO_QDQ_OPS,
    ONLY_INSIDE_FUSIONS,
    SUPPORTED_OPS,
    DeviceProfile,
)

FALLBACK, WARNING = "fallback", "warning"
OPERATORS = "T11.2 operators.md"
QUANTIZATION = "T11.2 quantization.md"


@dataclass(frozen=True)
class Finding:
    """One broken rule: where, how serious, what the rule says, and TI's document."""

    severity: str
    node: str
    rule: str
    source: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.node}: {self.rule} ({self.source})"


@dataclass
class Graph:
    """What the rules need to know about the model around a node."""

    model: onnx.ModelProto
    profile: DeviceProfile
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    element_types: dict[str, int] = field(default_factory=dict)
    """ONNX element type of each tensor shape inference knows (TensorProto.FLOAT, ...)."""

    def code_bits(self, tensor: str) -> int:
        """8 * the byte width of the codes `tensor` was dequantized from (32 if float)."""
        producer = self.producers.get(tensor)
        if producer is None or producer.op_type != "DequantizeLinear":
            return 32
        return 8 * self.code_type(producer).itemsize

    def code_type(self, node: onnx.NodeProto) -> np.dtype:
        """The integer type of a QuantizeLinear's or DequantizeLinear's codes: its zero
        point's, a QuantizeLinear's `output_dtype` (opset 21 files carry no zero point), the
        codes a DequantizeLinear reads (an initializer, or its QuantizeLinear's), else uint8,
        ONNX's default."""
        if len(node.input) > 2 and node.input[2] in self.constants:
            return self.constants[node.input[2]].dtype
        if node.op_type == "QuantizeLinear":
            dtype = attribute(node, "output_dtype", 0)
            return helper.tensor_dtype_to_np_dtype(dtype) if dtype else np.dtype(np.uint8)
        if node.input[0] in self.constants:
            return self.constants[node.input[0]].dtype
        producer = self.producers.get(node.input[0])
        if producer is not None and producer.op_type == "QuantizeLinear":
            return self.code_type(producer)
        return np.dtype(np.uint8)

    @classmethod
    def of(cls, model: onnx.ModelProto, profile: DeviceProfile) -> Graph:
        graph = cls(model, profile)
        graph.constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
        for value in values:
            dims = value.type.tensor_type.shape.dim
            graph.shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else -1
                                             for d in dims)
            graph.element_types[value.name] = value.type.tensor_type.elem_type
        for node in model.graph.node:
            for output in node.output:
                graph.producers[output] = node
            for name in node.input:
                graph.consumers.setdefault(name, []).append(node)
        return graph

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer, or of a DequantizeLinear of initializers."""
        if name in self.constants:
            return self.constants[name]
        producer = self.producers.get(name)
        if producer is not None and producer.op_type == "DequantizeLinear":
            codes = self.constants.get(producer.input[0])
            scale = self.constants.get(producer.input[1])
            if codes is not None and scale is not None:
                return codes  # the codes are what the rules look at (bias range)
        return None

    def is_constant(self, name: str) -> bool:
        return not name or self.constant(name) is not None


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for item in node.attribute:
        if item.name == name:
            value = helper.get_attribute_value(item)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _finding(node: onnx.NodeProto, rule: str, severity: str = FALLBACK,
             source: str = OPERATORS) -> Finding:
    return Finding(severity, node.name or node.output[0], rule, source)


def _variable_inputs(node: onnx.NodeProto, graph: Graph) -> list[str]:
    return [name for name in node.input if name and not graph.is_constant(name)]


def _conv(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    findings = []
    kernel = tuple(attribute(node, "kernel_shape", ()))
    strides = tuple(attribute(node, "strides", (1,) * len(kernel)))
    group = attribute(node, "group", 1)
    in_shape = graph.shapes.get(node.input[0], ())
    if len(in_shape) > 4:
        findings.append(_finding(node, f"{len(in_shape)}-D conv (TIDL: at most 4-D)"))
    if len(set(strides)) > 1:
        findings.append(_finding(node, f"strides {strides}: TIDL needs stride H = W"))
    stride = strides[0] if strides else 1
    if kernel and max(kernel) > 7 and stride == 2:
        findings.append(_finding(node, f"kernel {kernel} with stride 2 (TIDL: k > 7 only at s1)"))
    if stride == 4 and kernel != (11, 11):
        findings.append(_finding(node, f"stride 4 with kernel {kernel} (TIDL: s4 only 11x11)"))
    channels = in_shape[1] if len(in_shape) > 1 else 0
    if group > 1 and group == channels and (kernel, stride) not in DEPTHWISE_KERNELS:
        findings.append(_finding(node, f"depthwise {kernel} stride {stride}: TIDL runs only "
                                       "1x3 s1, 3x3/5x5/7x7 s1 or s2"))
    if graph.profile.no_3x3_stride_3 and kernel == (3, 3) and stride == 3:
        findings.append(_finding(node, f"3x3 stride 3 is not supported on {graph.profile.name}"))
    if len(_variable_inputs(node, graph)) > 1:
        findings.append(_finding(node, "weights computed at run time (TIDL: 1 variable input)"))
    return findings


def _conv_transpose(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    kernel = tuple(attribute(node, "kernel_shape", ()))
    strides = tuple(attribute(node, "strides", (1,) * len(kernel)))
    dilations = tuple(attribute(node, "dilations", (1,) * len(kernel)))
    findings = []
    if kernel not in ((4, 4), (3, 3), (2, 2)) or strides != (2, 2):
        findings.append(_finding(node, f"ConvTranspose kernel {kernel} stride {strides}: TIDL "
                                       "runs 4x4, 3x3, 2x2 at stride 2"))
    if any(d != 1 for d in dilations):
        findings.append(_finding(node, "dilated ConvTranspose (TIDL: dilation 1)"))
    if not graph.profile.conv_transpose_16bit and graph.code_bits(node.input[0]) == 16:
        findings.append(_finding(node, f"16-bit ConvTranspose is not supported on "
                                       f"{graph.profile.name}"))
    return findings


def _pool(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    kernel = tuple(attribute(node, "kernel_shape", ()))
    strides = tuple(attribute(node, "strides", (1,) * len(kernel)))
    validated = kernel in ((3, 3), (2, 2), (1, 1)) and strides in ((1, 1), (2, 2)) and not (
        kernel == (2, 2) and strides == (1, 1))
    if not validated:
        return [_finding(node, f"{node.op_type} {kernel} stride {strides} is outside TI's "
                               "validated 3x3/2x2/1x1 at s1/s2 (not 2x2 s1)", WARNING)]
    return []


def _global_pool(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    shape = graph.shapes.get(node.input[0], ())
    area = int(np.prod(shape[2:])) if len(shape) > 2 else 0
    if area > 1024:
        return [_finding(node, f"global pool over {area} positions (TIDL: H x W <= 1024)")]
    return []


def _softmax(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    rank = len(graph.shapes.get(node.input[0], ()))
    axis = attribute(node, "axis", -1) % max(rank, 1)
    if rank and axis not in (rank - 1, rank - 2):
        return [_finding(node, f"softmax over axis {axis} of a rank-{rank} tensor (TIDL: W or "
                               "H only)")]
    return []


def _concat(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    rank = len(graph.shapes.get(node.output[0], ()))
    axis = attribute(node, "axis", 0) % max(rank, 1)
    if rank and (axis == 0 or axis < rank - 3):
        return [_finding(node, f"concat on axis {axis} of a rank-{rank} tensor (TIDL: only the "
                               "last three axes, never batch)")]
    return []


def _resize(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    findings = []
    mode = attribute(node, "mode", "nearest")
    transform = attribute(node, "coordinate_transformation_mode", "half_pixel")
    in_shape = graph.shapes.get(node.input[0], ())
    out_shape = graph.shapes.get(node.output[0], ())
    if mode not in ("nearest", "linear"):
        findings.append(_finding(node, f"resize mode {mode!r} (TIDL: nearest or linear)"))
    if transform not in ("half_pixel", "pytorch_half_pixel", "asymmetric") or (
            transform == "asymmetric" and mode == "linear"):
        findings.append(_finding(node, f"coordinate_transformation_mode {transform!r} with "
                                       f"{mode} (TIDL: half_pixel / pytorch_half_pixel, or "
                                       "asymmetric for nearest)"))
    if len(in_shape) == 4 and len(out_shape) == 4 and in_shape[2] and in_shape[3]:
        scales = (out_shape[2] / in_shape[2], out_shape[3] / in_shape[3])
        power = scales[0] >= 1 and float(scales[0]).is_integer() and (
            int(scales[0]) & (int(scales[0]) - 1)) == 0
        if scales[0] != scales[1] or not power or in_shape[:2] != out_shape[:2]:
            findings.append(_finding(node, f"resize by {scales} (TIDL: H and W only, same "
                                           "power-of-2 factor >= 1)"))
    return findings


def _pad(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    mode = attribute(node, "mode", "constant")
    pads = graph.constant(node.input[1]) if len(node.input) > 1 else None
    value = graph.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    findings = []
    if mode != "constant" or (value is not None and np.any(value != 0)):
        findings.append(_finding(node, "pad other than constant zero (TIDL: constant 0 only)"))
    if pads is not None:
        rank = len(pads) // 2
        moved = [axis for axis in range(rank) if pads[axis] or pads[axis + rank]]
        if any(axis < rank - 2 for axis in moved):
            findings.append(_finding(node, f"pads axes {moved} (TIDL: H and W only)"))
    return findings


def _gemm(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    findings = []
    if attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0 or attribute(
            node, "beta", 1.0) != 1.0:
        findings.append(_finding(node, "Gemm with transA or alpha/beta != 1"))
    if len(_variable_inputs(node, graph)) > 1:
        findings.append(_finding(node, "Gemm with a computed B (TIDL: 1 variable input)"))
    return findings


def _reduce_min_max(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    rank = len(graph.shapes.get(node.input[0], ()))
    axes = attribute(node, "axes")
    if axes is None and len(node.input) > 1:
        axes = graph.constant(node.input[1])
    axes = [int(a) % max(rank, 1) for a in (axes if axes is not None else range(rank))]
    if axes != [rank - 2] or not attribute(node, "keepdims", 1):
        return [_finding(node, f"{node.op_type} over axes {axes} (TIDL: the H axis, keepdims 1)")]
    return []


def _clip(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    low = graph.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    high = graph.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    problem = clip_problem(low, high)
    return [_finding(node, problem)] if problem else []


def _matmul(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    if graph.profile.signed_unsigned_matmul:
        return []
    kinds = set()
    for name in node.input:
        producer = graph.producers.get(name)
        while producer is not None and producer.op_type in NO_QDQ_OPS:
            producer = graph.producers.get(producer.input[0])
        if producer is not None and producer.op_type == "DequantizeLinear":
            kinds.add(graph.code_type(producer).kind)
    if {"i", "u"} <= kinds:
        return [_finding(node, f"signed x unsigned MatMul is not supported on "
                               f"{graph.profile.name}")]
    return []


def _fusion_only(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    if node.op_type == "Erf":
        producer = graph.producers.get(node.input[0])
        users = graph.consumers.get(node.output[0], [])
        if producer is not None and producer.op_type in ("Mul", "Div") and users and all(
                user.op_type == "Add" for user in users):
            return []  # inside the GELU pattern
    return [_finding(node, f"{node.op_type} runs only inside a fusion (GELU)")]


def _cast(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    inputs = {value.name for value in graph.model.graph.input}
    outputs = {value.name for value in graph.model.graph.output}
    if node.input[0] not in inputs and node.output[0] not in outputs:
        return [_finding(node, "Cast inside the network (TIDL: only at inputs and outputs)")]
    return []


OPTIMIZER = "TI tidl_onnx_model_optimizer src/batchnorm.py"


def _batchnorm(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    """BatchNormalization: 4-D (NCHW) input only; on a dequantized input, a scale or shift that
    is a float initializer is quantized by TIDL itself (per tensor), not as the file says."""
    findings = []
    rank = len(graph.shapes.get(node.input[0], ()))
    if rank and rank != 4:
        findings.append(_finding(node, f"BatchNormalization of a rank-{rank} tensor (TIDL: "
                                       "4-D NCHW only)", source=OPTIMIZER))
    float_parameters = [name for name in node.input[1:3] if name in graph.constants]
    source = graph.producers.get(node.input[0])
    if graph.profile.tidl and float_parameters and (
            source is not None and source.op_type == "DequantizeLinear"):
        findings.append(_finding(
            node, f"float scale/shift {float_parameters}: TIDL quantizes them itself (per "
                  "tensor), so the device computes other values than the file", WARNING,
            QUANTIZATION))
    return findings


MAX_RANK = 6
"""Reshape, Transpose and eltwise ops take at most this many dimensions [T11.2]."""


def _data_movement(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    """Reshape/Transpose: at most 6-D; a Transpose above 4-D must not move the width (the
    last axis) to output axis 0 or 1."""
    rank = max(len(graph.shapes.get(node.input[0], ())), len(graph.shapes.get(node.output[0], ())))
    if rank > MAX_RANK:
        return [_finding(node, f"{node.op_type} of a rank-{rank} tensor (TIDL: at most "
                               f"{MAX_RANK}-D)")]
    perm = list(attribute(node, "perm", []) or [])
    if node.op_type == "Transpose" and len(perm) > 4 and len(perm) - 1 in perm[:2]:
        return [_finding(node, f"{len(perm)}-D Transpose {perm} moves the width to output axis "
                               f"{perm.index(len(perm) - 1)} (TIDL: not to axis 0 or 1)")]
    return []


Rule = Callable[[onnx.NodeProto, Graph], list[Finding]]
RULES: dict[str, Rule] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "AveragePool": _pool, "MaxPool": _pool,
    "GlobalAveragePool": _global_pool, "GlobalMaxPool": _global_pool, "Softmax": _softmax,
    "Concat": _concat, "Resize": _resize, "Pad": _pad, "Gemm": _gemm,
    "ReduceMax": _reduce_min_max, "ReduceMin": _reduce_min_max, "Clip": _clip,
    "MatMul": _matmul, "Cast": _cast, "Reshape": _data_movement, "Transpose": _data_movement,
    "BatchNormalization": _batchnorm,
    **{op: _fusion_only for op in ONLY_INSIDE_FUSIONS},
}
"""ONNX op type -> its TIDL rule (ops not listed have no constraint quantfx checks)."""


LUT_OPS = frozenset({"Sigmoid", "HardSigmoid", "Gelu", "Tanh", "Softmax", "Elu"})
"""Activations TIDL accelerates with look-up tables where the device has them [T11.0]."""


def check_node(node: onnx.NodeProto, graph: Graph) -> list[Finding]:
    """Everything TIDL's operator table says about `node` (an op of another domain than ONNX's
    own is not TIDL's, whatever its op type)."""
    if node.domain not in ("", "ai.onnx"):
        return [_finding(node, f"{node.domain}.{node.op_type} (a custom-domain op) is not a "
                               "TIDL operator: it runs on the ARM cores")]
    if node.op_type not in SUPPORTED_OPS:
        return [_finding(node, f"{node.op_type} is not a TIDL operator: it runs on the ARM "
                               "cores")]
    rule = RULES.get(node.op_type)
    findings = rule(node, graph) if rule else []
    if node.op_type in LUT_OPS and not graph.profile.lut_activations:
        findings.append(_finding(node, f"{node.op_type} runs without LUT acceleration on "
                                       f"{graph.profile.name} (slower)", WARNING, "T11.0"))
    return findings
