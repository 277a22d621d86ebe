"""Activation functions, each written with the same float steps as torch computes them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch import nn

from quantfx import modules as standins
from quantfx.errors import ExportError
from quantfx.export.builder import Builder


def unary(op_type: str, **attributes: Any) -> Callable[[Builder, fx.Node, Any], None]:
    """An emitter of one ONNX op on the node's tensor input (Relu, Sigmoid, Tanh, ...)."""
    def emit(b: Builder, node: fx.Node, module: Any) -> None:
        b.emit(node, op_type, [b.tensor_input(node)], **attributes)
    return emit


def emit_relu6(b: Builder, node: fx.Node, module: nn.Module) -> None:
    b.clip(node.name, b.tensor_input(node), node.name, 0.0, 6.0)
    b.env[node] = node.name


def emit_hardtanh(b: Builder, node: fx.Node, module: nn.Hardtanh) -> None:
    b.clip(node.name, b.tensor_input(node), node.name, module.min_val, module.max_val)
    b.env[node] = node.name


def emit_leaky_relu(b: Builder, node: fx.Node, module: nn.LeakyReLU) -> None:
    b.emit(node, "LeakyRelu", [b.tensor_input(node)], alpha=float(module.negative_slope))


def _relu6_of_shifted(b: Builder, node: fx.Node, source: str) -> str:
    """min(max(x + 3, 0), 6), torch's exact float steps for hardswish / hardsigmoid."""
    shifted = f"{node.name}.add"
    b.op("Add", [source, b.float_constant(f"{node.name}.three", 3.0)], shifted)
    clipped = f"{node.name}.clip"
    b.clip(clipped, shifted, clipped, 0.0, 6.0)
    return clipped


def emit_hardswish(b: Builder, node: fx.Node, module: nn.Module) -> None:
    """An nn.Hardswish subclass quantfx did not replace: torch's float steps, decomposed.
    (ONNX HardSwish computes ..., see below.)"""
    # ONNX HardSwish computes x * max(0, min(1, x/6 + 1/2)): different float rounding from
    # torch's x * min(max(x + 3, 0), 6) / 6, so emit torch's steps.
    source = b.tensor_input(node)
    clipped = _relu6_of_shifted(b, node, source)
    product = f"{node.name}.mul"
    b.op("Mul", [source, clipped], product)
    b.emit(node, "Div", [product, b.float_constant(f"{node.name}.six", 6.0)])


def emit_hardsigmoid(b: Builder, node: fx.Node, module: nn.Module) -> None:
    clipped = _relu6_of_shifted(b, node, b.tensor_input(node))
    b.emit(node, "Div", [clipped, b.float_constant(f"{node.name}.six", 6.0)])


HARD_SWISH_OPSET = 14
"""ONNX HardSwish exists from opset 14."""


def emit_hard_sigmoid(b: Builder, node: fx.Node, module: standins.HardSigmoid) -> None:
    """One HardSigmoid (alpha 1/6, beta 1/2): the stand-in computes its exact float steps."""
    b.emit(node, "HardSigmoid", [b.tensor_input(node)], alpha=standins.ONE_SIXTH, beta=0.5)


def emit_hard_swish(b: Builder, node: fx.Node, module: standins.HardSwish) -> None:
    """One HardSwish from opset 14 (TIDL runs it as one layer, Q/DQ only around it); below,
    ONNX's own steps x * Clip(x * alpha + 1/2, 0, 1)."""
    source = b.tensor_input(node)
    if b.opset >= HARD_SWISH_OPSET:
        b.emit(node, "HardSwish", [source])
        return
    name = node.name
    b.op("Mul", [source, b.float_constant(f"{name}.alpha", standins.ONE_SIXTH)], f"{name}.scaled")
    b.op("Add", [f"{name}.scaled", b.float_constant(f"{name}.half", 0.5)], f"{name}.shifted")
    b.clip(f"{name}.gate", f"{name}.shifted", f"{name}.gate", 0.0, 1.0)
    b.emit(node, "Mul", [source, f"{name}.gate"])


def emit_silu(b: Builder, node: fx.Node, module: nn.Module) -> None:
    source = b.tensor_input(node)
    sigmoid = f"{node.name}.sigmoid"
    b.op("Sigmoid", [source], sigmoid)
    b.emit(node, "Mul", [source, sigmoid])


def emit_gelu(b: Builder, node: fx.Node, module: nn.GELU) -> None:
    source = b.tensor_input(node)
    name = node.name
    if module.approximate == "tanh":
        # 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
        cube = f"{name}.cube"
        b.op("Mul", [source, source], f"{name}.square")
        b.op("Mul", [f"{name}.square", source], cube)
        b.op("Mul", [cube, b.float_constant(f"{name}.k", 0.044715)], f"{name}.kcube")
        b.op("Add", [source, f"{name}.kcube"], f"{name}.inner")
        alpha = b.float_constant(f"{name}.alpha", math.sqrt(2 / math.pi))
        b.op("Mul", [f"{name}.inner", alpha], f"{name}.scaled")
        b.op("Tanh", [f"{name}.scaled"], f"{name}.squash")
    else:
        b.op("Mul", [source, b.float_constant(f"{name}.alpha", math.sqrt(0.5))], f"{name}.scaled")
        b.op("Erf", [f"{name}.scaled"], f"{name}.squash")
    b.op("Add", [f"{name}.squash", b.float_constant(f"{name}.one", 1.0)], f"{name}.plus")
    b.op("Mul", [source, b.float_constant(f"{name}.half", 0.5)], f"{name}.halfx")
    b.emit(node, "Mul", [f"{name}.halfx", f"{name}.plus"])


def emit_softmax(b: Builder, node: fx.Node, module: nn.Softmax) -> None:
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
    b.emit(node, "Softmax", [b.tensor_input(node)], axis=axis)
