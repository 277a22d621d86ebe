"""Q/DQ after the shape ops ONNX Runtime's optimizer would otherwise move a DequantizeLinear
through, in opset-21 files, so that the file loads in a default (optimized) session.

ONNX Runtime's QDQ propagation (ORT_ENABLE_EXTENDED and above) moves a DequantizeLinear forward
past Reshape, Transpose, Squeeze, Unsqueeze and Slice by inserting a Q/DQ pair after each of
them (`qdq_propagation.cc`). In an opset-21 graph, 1.32 gives the inserted QuantizeLinear an
`output_dtype` beside the zero point and its own type inference then refuses the node for any
type but uint8 ("output_dtype INT8 does not match y_zero_point type UINT8"): the session does
not start. A Q/DQ pair that is already there (the same scale and zero point: an exact identity)
leaves it nothing to insert. Files below opset 21 are unaffected and left as they are.
"""

from __future__ import annotations

import onnx
from onnx import helper

PROPAGATED_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice"})
"""The ops ONNX Runtime moves Q/DQ pairs through (besides MaxPool, which export already
follows with Q/DQ: TIDL wants it there)."""
AFFECTED_OPSET = 21


def hold_grids_after_shape_ops(nodes: list[onnx.NodeProto], opset: int,
                               outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` (in order) with a copy of the input's Q/DQ pair after every propagated shape op
    that reads a DequantizeLinear (directly, or through shape ops held so) and has a reader
    other than a QuantizeLinear; graph `outputs` keep their names."""
    if opset < AFFECTED_OPSET:
        return nodes
    readers: dict[str, list[onnx.NodeProto]] = {}
    taken = {name for node in nodes for name in (*node.input, *node.output)}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    dequantized = {node.output[0]: node for node in nodes if node.op_type == "DequantizeLinear"}
    held: list[onnx.NodeProto] = []
    for node in nodes:
        held.append(node)
        source = dequantized.get(node.input[0]) if node.input else None
        if node.op_type not in PROPAGATED_OPS or source is None or len(source.input) < 3:
            continue
        output = node.output[0]
        users = readers.get(output, [])
        if output not in outputs and all(user.op_type == "QuantizeLinear" for user in users):
            continue
        moved = fresh_name(f"{output}.ungridded", taken)
        node.output[0] = moved
        scale, zero = source.input[1], source.input[2]
        codes = fresh_name(f"{output}.held", taken)
        held.append(helper.make_node("QuantizeLinear", [moved, scale, zero], [codes],
                                     name=f"{codes}.quantize"))
        dequantize = helper.make_node("DequantizeLinear", [codes, scale, zero], [output],
                                      name=f"{codes}.dequantize")
        held.append(dequantize)
        dequantized[output] = dequantize
    return held


def fresh_name(name: str, taken: set[str]) -> str:
    """`name`, or `name.2`, `name.3`, ... : the first not in `taken` (which it joins)."""
    candidate, count = name, 1
    while candidate in taken:
        count += 1
        candidate = f"{name}.{count}"
    taken.add(candidate)
    return candidate
