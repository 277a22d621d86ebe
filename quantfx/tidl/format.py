"""TIDL's number format as an ONNX file carries it, in one place: symmetric power-of-2 Q/DQ
(zero point 0), Clip with constant bounds min <= 0 < max, static input and output shapes.
The checker reports what breaks it (per target, `quantfx.tidl.checker`); export refuses to
write a file that breaks it (quantfx writes only this format: a break there is a bug)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from quantfx.qmath import is_power_of_two

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def qdq_problems(zero: np.ndarray | None, scale: np.ndarray | None) -> list[str]:
    """What makes one Q/DQ other than symmetric power-of-2: a zero point other than 0, a
    scale (any of a per-channel one) that is not a power of 2."""
    problems = []
    if zero is not None and zero.size and bool(np.any(zero != 0)):
        problems.append(f"asymmetric Q/DQ (zero point {int(zero.flat[0])})")
    if scale is None or not scale.size or not all(
            is_power_of_two(float(value)) for value in np.ravel(scale)):
        shown = "not a constant" if scale is None or not scale.size else (
            f"{float(scale.flat[0]):.6g}")
        problems.append(f"scale {shown} is not a power of 2")
    return problems


def clip_problem(low: np.ndarray | None, high: np.ndarray | None) -> str | None:
    """Clip bounds TIDL cannot take: not constants, or not min <= 0 < max."""
    if low is None or high is None or not float(low) <= 0.0 < float(high):
        return "Clip without constant bounds min <= 0 < max"
    return None


def format_problems(model: onnx.ModelProto) -> list[str]:
    """Every break of the format in `model`, as messages (empty when it holds)."""
    constants = {tensor.name: numpy_helper.to_array(tensor)
                 for tensor in model.graph.initializer}
    problems: list[str] = []
    for node in model.graph.node:
        if node.op_type in QDQ_OPS:
            zero = constants.get(node.input[2]) if len(node.input) > 2 else None
            problems += [f"{node.op_type} '{node.name}': {problem}"
                         for problem in qdq_problems(zero, constants.get(node.input[1]))]
        elif node.op_type == "Clip" and len(node.input) >= 3:
            problem = clip_problem(constants.get(node.input[1]), constants.get(node.input[2]))
            if problem:
                problems.append(f"Clip '{node.name}': {problem}")
    for value in list(model.graph.input) + list(model.graph.output):
        tensor_type = value.type.tensor_type  # a scalar's shape is there, with no dims
        if not tensor_type.HasField("shape") or any(
                not dim.HasField("dim_value") for dim in tensor_type.shape.dim):
            problems.append(f"tensor '{value.name}' has no static shape")
    return problems
