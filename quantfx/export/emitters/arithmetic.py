"""Elementwise arithmetic, concatenation and the batched products of attention blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch.fx as fx

from quantfx import modules as standins
from quantfx.errors import ExportError
from quantfx.export.builder import Builder

EINSUM_OPSET = 12


def binary(op_type: str) -> Callable[[Builder, fx.Node, Any], None]:
    """An emitter of a two-operand op (Add, Sub, Mul); a Python number becomes a constant."""
    def emit(b: Builder, node: fx.Node, module: Any) -> None:
        b.emit(node, op_type, [b.operand(node, 0), b.operand(node, 1)])
    return emit


def emit_cat(b: Builder, node: fx.Node, module: standins.Cat) -> None:
    rank = len(b.info(node).shape)
    b.emit(node, "Concat", [b.value(arg) for arg in node.args], axis=module.dim % rank)


def emit_stack(b: Builder, node: fx.Node, module: standins.Stack) -> None:
    axis = module.dim % len(b.info(node).shape)
    pieces = []
    for index, arg in enumerate(node.args):
        shape = list(b.info(arg).shape)
        shape.insert(axis, 1)
        piece = f"{node.name}.unsqueeze{index}"
        b.reshape(piece, b.value(arg), piece, tuple(shape))
        pieces.append(piece)
    b.emit(node, "Concat", pieces, axis=axis)


def emit_matmul(b: Builder, node: fx.Node, module: Any) -> None:
    """matmul / @ / bmm: float MatMul between quantizers (torch and ONNX broadcast alike)."""
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    b.emit(node, "MatMul", [b.tensor_input(node), b.value(other)])


def emit_einsum(b: Builder, node: fx.Node, module: Any) -> None:
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
    if b.opset < EINSUM_OPSET:
        raise ExportError(f"einsum '{node.name}' needs opset >= {EINSUM_OPSET}; export with "
                          "opset=13.")
    b.emit(node, "Einsum", [b.value(operand) for operand in operands],
           equation="".join(renamed))


def call_binary(op_type: str) -> Callable[[Builder, fx.Node, Any], None]:
    """A two-operand function or Tensor method left as a call (x / 3, torch.maximum(a, b))."""
    def emit(b: Builder, node: fx.Node, module: Any) -> None:
        b.emit(node, op_type, [b.operand(node, 0), b.operand(node, 1)])
    return emit


def call_unary(op_type: str) -> Callable[[Builder, fx.Node, Any], None]:
    """A one-operand function or Tensor method (-x, x.abs(), torch.exp(x))."""
    def emit(b: Builder, node: fx.Node, module: Any) -> None:
        b.emit(node, op_type, [b.tensor_input(node)])
    return emit


def emit_pow(b: Builder, node: fx.Node, module: Any) -> None:
    """x ** p: torch computes p = 2, 3, 0.5 and -1 as x*x, x*x*x, sqrt and reciprocal, so
    those are written the same way (bit-exact); other exponents as Pow."""
    exponent = b.value(node.args[1]) if len(node.args) > 1 else node.kwargs.get("exponent")
    source = b.tensor_input(node)
    if exponent == 2:
        b.emit(node, "Mul", [source, source])
    elif exponent == 3:
        b.op("Mul", [source, source], f"{node.name}.square")
        b.emit(node, "Mul", [f"{node.name}.square", source])
    elif exponent == 0.5:
        b.emit(node, "Sqrt", [source])
    elif exponent == -1:
        b.emit(node, "Reciprocal", [source])
    else:
        b.emit(node, "Pow", [source, b.operand(node, 1)])


def emit_clamp(b: Builder, node: fx.Node, module: Any) -> None:
    """torch.clamp / clip / clamp_min / clamp_max with constant bounds as Clip."""
    name = node.target if isinstance(node.target, str) else node.target.__name__
    one_bound = {"clamp_min": "min", "clamp_max": "max"}.get(name.rstrip("_"))
    if one_bound is None:
        low, high = b.call_arguments(node, ("min", "max"))
    else:
        (bound,) = b.call_arguments(node, (one_bound,))
        low, high = (bound, None) if one_bound == "min" else (None, bound)
    if any(isinstance(bound, str) for bound in (low, high)):
        raise ExportError(f"clamp '{node.name}' has tensor bounds; only constant bounds export.")
    # An open bound is float32's extreme: the same function, and TIDL takes a Clip only with
    # both bounds constant (min <= 0 < max).
    widest = float(np.finfo(np.float32).max)
    inputs = [b.tensor_input(node)]
    for suffix, bound, open_bound in (("min", low, -widest), ("max", high, widest)):
        inputs.append(b.float_constant(f"{node.name}.{suffix}",
                                       open_bound if bound is None else float(bound)))
    b.emit(node, "Clip", inputs)
