"""`check_tidl`: for an exported ONNX file, what a TIDL device runs on its accelerator.

Node by node: offloaded, or falling back to the ARM cores and why (the rule of TI's operator
table it breaks, with the document); then what TIDL's quantization needs of the whole graph:
Q/DQ on every tensor it holds in fixed point (except the documented fusions), 8-bit Q/DQ for
pre-quantized import, biases within the device's width, per-channel weights only where the
device takes them, the opset TI validated.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from quantfx.errors import ConfigError, warn
from quantfx.tidl.format import QDQ_OPS, qdq_problems
from quantfx.tidl.profiles import (
    COARSE_CODES,
    FUSE_INTO_ACTIVATION,
    FUSED_ACTIVATIONS,
    NO_QDQ_OPS,
    PROFILES,
    TARGET_ALIASES,
    TARGETS,
    resolve_target,
)
from quantfx.tidl.rules import FALLBACK, QUANTIZATION, WARNING, Finding, Graph, check_node
from quantfx.tidl.scope import dynamic_input_findings, without_post_processing

FUSIONS = {
    "SiLU": collections.Counter({"Sigmoid": 1, "Mul": 1}),
    "GELU": collections.Counter({"Mul": 3, "Erf": 1, "Add": 1}),
    "LayerNorm": collections.Counter({"ReduceMean": 2, "Sub": 1, "Mul": 1, "Add": 1, "Sqrt": 1,
                                      "Div": 1}),
    "LayerNorm (affine)": collections.Counter({"ReduceMean": 2, "Sub": 1, "Mul": 2, "Add": 2,
                                               "Sqrt": 1, "Div": 1}),
}
"""Patterns TIDL runs as one layer with Q/DQ only at the end [T11.2 quantization.md]: op
counts of the nodes joined by unquantized tensors (shape-only ops left out)."""
UNFUSED_PATTERNS = {
    "GELU of the tanh formula": (
        collections.Counter({"Mul": 6, "Add": 2, "Tanh": 1}),
        "TIDL's GELU fusion is the erf formula; nn.GELU() (approximate='none') differs from the "
        "tanh formula by at most 5e-4 and exports as that fusion"),
}
"""Float islands that look like a fusion TIDL lacks: one finding with the fix, not one per
tensor."""
MAX_VALIDATED_OPSET = 21
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.BFLOAT16)
DYNAMIC_OPS = frozenset({"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"})
"""ONNX Runtime's quantize_dynamic: integer ops whose input scales are computed per run."""


@dataclass
class TidlReport:
    """What `check_tidl` found, node by node and for the graph."""

    target: str
    opset: int
    nodes: list[tuple[str, str, bool]] = field(default_factory=list)
    """(node name, op type, offloaded) of every node other than Q/DQ."""
    findings: list[Finding] = field(default_factory=list)
    detection_post_processing: int = 0
    """Decode + NMS nodes of `export_onnx(detection=...)` left out: TIDL's detection layer
    (the prototxt beside the file) replaces them."""

    @property
    def total(self) -> int:
        return len(self.nodes)

    @property
    def offloaded(self) -> int:
        return sum(1 for _, _, offloaded in self.nodes if offloaded)

    @property
    def fully_offloaded(self) -> bool:
        """True when every node runs on the accelerator."""
        return self.offloaded == self.total

    def warnings(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.severity == WARNING]

    def summary(self) -> str:
        """One line: offloaded / total, what falls back, how many warnings."""
        fallback = collections.Counter(op for _, op, offloaded in self.nodes if not offloaded)
        falls = (", ".join(f"{op} x{count}" for op, count in fallback.most_common())
                 if fallback else "none")
        post = (f"; {self.detection_post_processing} decode/NMS nodes left to TIDL's "
                "detection layer" if self.detection_post_processing else "")
        return (f"{self.target}: {self.offloaded}/{self.total} nodes offloaded to the "
                f"accelerator (ARM fallback: {falls}){post}; {len(self.warnings())} warning(s)")

    def __str__(self) -> str:
        """The summary, then each finding; one line for a rule broken at several nodes (a
        file exported for another device repeats the same rule at every layer)."""
        groups: dict[tuple[str, str, str], list[str]] = {}
        for finding in self.findings:
            groups.setdefault((finding.severity, finding.rule, finding.source),
                              []).append(finding.node)
        lines = [self.summary()]
        for (severity, rule, source), nodes in groups.items():
            where = nodes[0] if len(nodes) == 1 else (
                f"{len(nodes)} nodes ({', '.join(nodes[:3])}{', ...' if len(nodes) > 3 else ''})")
            lines.append(f"  [{severity}] {where}: {rule} ({source})")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        rows = ["| node | op | runs on | why |", "|---|---|---|---|"]
        reasons = collections.defaultdict(list)
        for finding in self.findings:
            reasons[finding.node].append(f"{finding.rule} [{finding.source}]")
        for name, op, offloaded in self.nodes:
            where = "accelerator" if offloaded else "ARM"
            rows.append(f"| {name} | {op} | {where} | {'; '.join(reasons.get(name, []))} |")
        return f"{self.summary()}\n\n" + "\n".join(rows) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "opset": self.opset, "offloaded": self.offloaded,
                "total": self.total, "summary": self.summary(),
                "detection_post_processing": self.detection_post_processing,
                "findings": [vars(finding) for finding in self.findings]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _on_grid(name: str, graph: Graph, memo: dict[str, bool]) -> bool:
    """Whether tensor `name` is held on a quantization grid: a DequantizeLinear output or a
    constant, or a shape-only op's output whose input is on a grid."""
    if name in memo:
        return memo[name]
    producer = graph.producers.get(name)
    if producer is None:
        result = graph.is_constant(name)
    elif producer.op_type == "DequantizeLinear":
        result = True
    elif producer.op_type in NO_QDQ_OPS:
        result = _on_grid(producer.input[0], graph, memo)
    else:
        consumers = graph.consumers.get(name, [])
        result = bool(consumers) and all(c.op_type == "QuantizeLinear" for c in consumers)
    memo[name] = result
    return result


def _key(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _unquantized_regions(graph: Graph) -> list[tuple[list[onnx.NodeProto], list[str]]]:
    """Groups of nodes joined by float tensors without Q/DQ, with those tensors."""
    memo: dict[str, bool] = {}
    outputs = {value.name for value in graph.model.graph.output}
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    loose: list[str] = []
    for node in graph.model.graph.node:
        if node.op_type in QDQ_OPS + tuple(NO_QDQ_OPS) or node.domain not in ("", "ai.onnx"):
            continue  # a custom-domain op (com.microsoft's QLinear*) is refused as an op
        for tensor in node.output:
            if tensor in outputs or _on_grid(tensor, graph, memo) or graph.element_types.get(
                    tensor, 0) not in (0, *FLOAT_TYPES):  # integer codes (QLinearConv)
                continue
            loose.append(tensor)
            for user in _users_through_shape_ops(tensor, graph):
                parent[find(_key(user))] = find(_key(node))
            find(_key(node))
    regions: dict[str, tuple[list[onnx.NodeProto], list[str]]] = {}
    by_key = {_key(node): node for node in graph.model.graph.node}
    for name in parent:
        nodes, _ = regions.setdefault(find(name), ([], []))
        nodes.append(by_key[name])
    for tensor in loose:
        regions[find(_key(graph.producers[tensor]))][1].append(tensor)
    return list(regions.values())


def _users_through_shape_ops(tensor: str, graph: Graph) -> list[onnx.NodeProto]:
    users = []
    for user in graph.consumers.get(tensor, []):
        if user.op_type in NO_QDQ_OPS:
            users += _users_through_shape_ops(user.output[0], graph)
        elif user.op_type != "QuantizeLinear":
            users.append(user)
    return users


def _qdq_findings(graph: Graph) -> list[Finding]:
    """Float tensors TIDL would have to quantize itself. For a TIDL device that is undocumented
    for a pre-quantized file (it picks a scale of its own, or refuses the layer): counted as a
    fallback of the node that computes the tensor, never beside "fully offloaded"."""
    findings = []
    severity = FALLBACK if graph.profile.tidl else WARNING
    for nodes, tensors in _unquantized_regions(graph):
        kinds = collections.Counter(node.op_type for node in nodes)
        if len(nodes) == 2 and {n.op_type for n in nodes} & FUSED_ACTIVATIONS and (
                {n.op_type for n in nodes} & FUSE_INTO_ACTIVATION):
            continue  # conv/add/bn + relu: one layer, Q/DQ after the activation
        if kinds in FUSIONS.values():
            continue
        unfused = [(name, advice) for name, (pattern, advice) in UNFUSED_PATTERNS.items()
                   if kinds == pattern]
        if unfused and tensors:
            name, advice = unfused[0]
            findings.append(Finding(
                severity, _key(graph.producers[tensors[0]]), f"{name}: its {len(tensors)} inner "
                f"tensors have no Q/DQ and TIDL has no such fusion, so the device holds them at "
                f"scales of its own choosing. {advice}", QUANTIZATION))
            continue
        for tensor in tensors:
            findings.append(Finding(
                severity, _key(graph.producers[tensor]),
                f"float tensor without Q/DQ ({graph.producers[tensor].op_type} output "
                f"'{tensor}'): TIDL holds it in fixed point at a scale of its own choosing, "
                "not one the file fixes, so the device computes something else than the "
                "file's quantization says", QUANTIZATION))
    return findings


def _quantization_findings(graph: Graph) -> list[Finding]:
    findings = []
    profile = graph.profile
    for node in graph.model.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        zero = graph.constants.get(node.input[2]) if len(node.input) > 2 else None
        scale = graph.constants.get(node.input[1])
        if graph.code_type(node).itemsize == 2 and profile.tidl and (
                not profile.int16_qdq_importable):
            findings.append(Finding(WARNING, node.name, "16-bit Q/DQ: pre-quantized import is "
                                    "documented as 8-bit only; the layer is also named in the "
                                    "options' 16-bit lists", "T11.0 docs"))
        findings += _power_of_two_findings(node, zero, scale, profile)
        per_channel = scale is not None and scale.size > 1
        users = graph.consumers.get(node.output[0], [])
        weight_of = [user for user in users if len(user.input) > 1 and user.input[1]
                     == node.output[0]]
        if per_channel and node.op_type == "QuantizeLinear":
            findings.append(Finding(FALLBACK, node.name, "per-channel activation Q/DQ (TIDL: "
                                    "default axis 1 only)", "T11.2 operators.md"))
        if per_channel and weight_of and not profile.per_channel_weights:
            findings.append(Finding(WARNING, node.name, f"per-channel weights on "
                                    f"{profile.name}, which runs power-of-2 per-tensor weights",
                                    "MO README"))
        codes = graph.constants.get(node.input[0])
        bias_of = [user for user in users if len(user.input) > 2 and user.input[2]
                   == node.output[0] and user.op_type in ("Conv", "ConvTranspose", "Gemm")]
        bias_bits = max((_bias_bits(graph, user) for user in bias_of), default=32)
        if bias_of and codes is not None and codes.size and (
                int(abs(codes).max()) > 2 ** (bias_bits - 1) - 1):
            findings.append(Finding(WARNING, node.name, f"bias codes up to "
                                    f"{int(abs(codes).max())} exceed {bias_bits} bit: "
                                    "TIDL clips them and changes the weight scale", "BM"))
    return findings


def _power_of_two_findings(node: onnx.NodeProto, zero: np.ndarray | None,
                           scale: np.ndarray | None, profile: Any) -> list[Finding]:
    """TDA4VM (scale type 1) runs symmetric power-of-2 scales only: an asymmetric or
    non-power-of-2 Q/DQ (ONNX Runtime's quantize_static writes both) is re-quantized there."""
    if profile.scale_type != 1 or scale is None:
        return []
    return [Finding(WARNING, node.name, f"{problem}: {profile.name} follows TIDL's scale type "
                    "1, symmetric power-of-2 scales only (others are re-quantized on the device)",
                    "T11.2, MO") for problem in qdq_problems(zero, scale)]


def _batchnorm_findings(graph: Graph) -> list[Finding]:
    """A standalone BatchNormalization runs on TIDL with one per-tensor weight scale: how many
    of its channel scales that leaves with 3 bits or fewer in this file."""
    findings = []
    for node in graph.model.graph.node:
        producer = (graph.producers.get(node.input[1])
                    if node.op_type == "BatchNormalization" and len(node.input) > 1 else None)
        codes = (graph.constants.get(producer.input[0])
                 if producer is not None and producer.op_type == "DequantizeLinear" else None)
        if codes is None or codes.size < 2:
            continue
        coarse = int((abs(codes.astype(np.int64)) < COARSE_CODES).sum())
        if coarse:
            findings.append(Finding(
                WARNING, node.name or node.output[0], f"standalone BatchNorm with one "
                f"per-tensor weight scale (as TIDL runs it): {coarse} of its {codes.size} "
                f"channel scales keep fewer than {COARSE_CODES} codes (6 % rounding error or "
                "more); fold it into a conv (conv -> BN) or keep it at 16 bit", "T11.2"))
    return findings


def _bias_bits(graph: Graph, layer: onnx.NodeProto) -> int:
    """The bias width of `layer` on the graph's device: by the width of its weight codes."""
    bits = graph.code_bits(layer.input[1])
    return graph.profile.bias_bits_for(8 if bits == 32 else bits)  # float weights: as 8 bit


def check_model(model: onnx.ModelProto, target: str = "generic") -> TidlReport:
    """The TIDL report of an ONNX model for `target` (a name of `quantfx.tidl.profiles`)."""
    target = resolve_target(target)
    if target not in PROFILES:
        raise ConfigError(f"target={target!r} is not one of {TARGETS} (TI's names "
                          f"{', '.join(TARGET_ALIASES)} work too).")
    _require_valid(model)
    model, post_processing = without_post_processing(model)
    typed = {value.name for value in (*model.graph.value_info, *model.graph.input,
                                      *model.graph.output)}
    if any(output and output not in typed for node in model.graph.node for output in node.output):
        model = onnx.shape_inference.infer_shapes(model)  # shapes and element types it lacks
    graph = Graph.of(model, PROFILES[target])
    opset = next((item.version for item in model.opset_import if item.domain in ("", "ai.onnx")),
                 0)
    report = TidlReport(target, opset, detection_post_processing=post_processing)
    if opset > MAX_VALIDATED_OPSET:
        report.findings.append(Finding(WARNING, "model", f"opset {opset} is newer than TIDL "
                                       f"validated ({MAX_VALIDATED_OPSET})", "T11.2"))
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS:
            report.findings += check_node(node, graph)
    if any(node.op_type in QDQ_OPS for node in model.graph.node):
        report.findings += _qdq_findings(graph) + _quantization_findings(graph)
    elif graph.profile.tidl and {node.op_type for node in model.graph.node} & DYNAMIC_OPS:
        report.findings.append(Finding(WARNING, "model", "dynamically quantized (scales computed "
                                       "at run time, DynamicQuantizeLinear), which TIDL does not "
                                       "run: quantize statically, e.g. quantfx.export_onnx",
                                       "T11.2"))
    elif graph.profile.tidl:
        report.findings.append(Finding(WARNING, "model", "no Q/DQ: a float model, which TIDL "
                                       "quantizes with its own calibration (not as quantfx "
                                       "simulated); export it with quantfx.export_onnx", "T11.2"))
    if graph.profile.tidl:
        report.findings += _batchnorm_findings(graph) + dynamic_input_findings(model)
    falling = {finding.node for finding in report.findings if finding.severity == FALLBACK}
    report.nodes = [(_key(node), node.op_type, _key(node) not in falling)
                    for node in model.graph.node if node.op_type not in QDQ_OPS]
    return report


def _require_valid(model: onnx.ModelProto) -> None:
    """An empty or structurally broken model is an error, not a clean report of 0/0 nodes."""
    if not model.graph.node:
        raise ConfigError("the ONNX model has no nodes (an empty or truncated file?): nothing "
                          "to check. Give the file quantfx.export_onnx wrote.")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as error:
        first = (str(error).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"the ONNX model is not valid ONNX ({first}): TIDL's import would "
                          "refuse it too. Export it again (quantfx.export_onnx checks its "
                          "files).") from error


def recorded_target(model: onnx.ModelProto) -> str:
    """The target quantfx recorded in an exported file's metadata ("generic" if none, or, with
    a warning, if this version does not know it)."""
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    recorded = metadata.get("quantfx.target", "generic")
    if resolve_target(recorded) not in PROFILES:
        warn(f"the file records target {recorded!r}, which this quantfx does not know: checked "
             f"for 'generic'; give target= (one of {TARGETS}) to check for a device.")
        return "generic"
    return recorded


def check_tidl(model: str | os.PathLike | onnx.ModelProto, target: str | None = None
               ) -> TidlReport:
    """What TIDL would do with an exported model (a path or an `onnx.ModelProto`) on `target`
    (default: the target the file was exported for, as quantfx recorded it; else "generic").

    Returns a `TidlReport`: `summary()`, `str()` (every finding), `to_markdown()` (a table of
    every node), `to_json()`; `fully_offloaded` says whether everything runs on the
    accelerator.
    """
    if not isinstance(model, onnx.ModelProto):
        model = _read_model(model)
    return check_model(model, recorded_target(model) if target is None else target)


def _read_model(path: Any) -> onnx.ModelProto:
    """The ONNX file at `path`, or a ConfigError saying what `path` is instead."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"check_tidl needs an ONNX file path or an onnx.ModelProto, got a "
                          f"{type(path).__name__}.")
    if os.path.isdir(path):
        raise ConfigError(f"{os.fspath(path)!r} is a folder: give the path of an ONNX file.")
    if not os.path.isfile(path):
        raise ConfigError(f"{os.fspath(path)!r} does not exist: give an ONNX file's path.")
    try:  # the binary format whatever the suffix (onnx.load reads .json / .txt as text)
        return onnx.load(os.fspath(path), format="protobuf")
    except Exception as error:  # noqa: BLE001 - not an ONNX file
        raise ConfigError(f"{os.fspath(path)!r} is not an ONNX model: {error}") from error
