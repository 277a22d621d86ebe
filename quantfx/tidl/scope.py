"""What of an ONNX file the TIDL checker judges: the graph TIDL compiles.

`export_onnx(detection=...)` appends decode and NMS as float ONNX ops, every node named under
`DETECTION_PREFIX`; TIDL replaces them with its own detection layer, built from the
meta-architecture prototxt written beside the file, so the checker stops at the head tensors
they read. And TIDL compiles one input shape: inputs with free dims are a finding.
"""

from __future__ import annotations

import onnx
from onnx import helper

from quantfx.tidl.rules import WARNING, Finding

DETECTION_PREFIX = "detection_output/"
"""Name prefix of the detection post-processing nodes (and constants) `export_onnx` appends."""


def without_post_processing(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model` without its detection post-processing nodes, the head tensors they read as its
    outputs (in order); and how many nodes were left out (0: `model` itself)."""
    graph = model.graph
    post = [node for node in graph.node if node.name.startswith(DETECTION_PREFIX)]
    if not post:
        return model, 0
    kept = [node for node in graph.node if not node.name.startswith(DETECTION_PREFIX)]
    produced = {name for node in kept for name in node.output} | {
        value.name for value in graph.input}
    heads = list(dict.fromkeys(name for node in post for name in node.input if name in produced))
    typed = {value.name: value for value in (*graph.value_info, *graph.output, *graph.input)}
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    del pruned.graph.node[:], pruned.graph.output[:]
    pruned.graph.node.extend(kept)
    pruned.graph.output.extend(typed.get(name) or helper.make_empty_tensor_value_info(name)
                               for name in heads)
    constants = [item for item in pruned.graph.initializer
                 if not item.name.startswith(DETECTION_PREFIX)]
    del pruned.graph.initializer[:]
    pruned.graph.initializer.extend(constants)
    return pruned, len(post)


def dynamic_input_findings(model: onnx.ModelProto) -> list[Finding]:
    """Graph inputs whose shape is not fixed: TIDL compiles one input shape, and the rules
    that need a shape (pool sizes, Pad axes, ...) cannot be checked on such a file."""
    constants = {initializer.name for initializer in model.graph.initializer}
    findings = []
    for value in model.graph.input:
        if value.name in constants:
            continue
        dims = value.type.tensor_type.shape.dim
        free = [dim.dim_param or "?" for dim in dims if not dim.HasField("dim_value")]
        if free or not value.type.tensor_type.HasField("shape"):
            findings.append(Finding(
                WARNING, value.name, f"input '{value.name}' has dynamic dims "
                f"({', '.join(free) or 'no shape'}): TIDL compiles fixed input shapes, and the "
                "rules that need a tensor's shape were not checked on this file. Export with "
                "fixed sizes (or fix them with onnxruntime.tools.make_dynamic_shape_fixed)",
                "T11.2"))
    return findings
