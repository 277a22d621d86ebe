"""`doctor`: "is my model ready to quantize?" in one call, as TI's guides would answer it.

Checks a float model (and its optimizer) against what the guides say users get wrong before
quantization starts: convs without BatchNorm, weight decay missing on biases / BN / depthwise
weights, non-SGD optimizers, depthwise layers, weights with extreme outlier channels after BN
folding, activations without a bound (long calibrated tails), untraceable code, reused modules
and functionals, and ops that export or TIDL would leave in float. Each finding has a
severity, the module it is about, why it matters and the fix.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from quantfx.config import QuantConfig, resolve_config
from quantfx.convert import convert
from quantfx.errors import ConfigError, QuantFxError, QuantFxWarning
from quantfx.export.onnx import build_export
from quantfx.export.registry import unexportable
from quantfx.frontend import as_input_tuple, build_graph, private_copy
from quantfx.layers import batchnorm_affine, is_depthwise
from quantfx.observers import HistogramObserver
from quantfx.ops import BATCHNORMS, BOUNDED_ACTIVATIONS, WEIGHT_LAYERS
from quantfx.partial import model_inputs, prepare_parts, resolve_parts, whole_or_parts
from quantfx.passes.fuse import fold_batchnorm, forward_fold_target
from quantfx.passes.graph_utils import is_shape_only, module_of
from quantfx.passes.normalize import REWRITES
from quantfx.ptc import calibrate, prepare
from quantfx.ptc.calibration_check import unlogged_calibrations
from quantfx.qmath import per_tensor_cost
from quantfx.quantizers import CalibrationQuantizer
from quantfx.ranks import this_process_only
from quantfx.state import FLOAT, require_state
from quantfx.tidl.checker import check_model
from quantfx.tidl.profiles import COARSE_CODES
from quantfx.tidl.rules import FALLBACK
from quantfx.trace import trace

ERROR, WARNING, INFO = "error", "warning", "info"
TAIL_RATIO = 8.0
TAIL_SHARE = 0.99
"""An activation whose largest calibrated value is `TAIL_RATIO` times the magnitude that
`TAIL_SHARE` of its values stay below has a long tail: 99 % of its values share an eighth of
its levels, or the tail saturates."""
OUTLIER_RATIO = 16.0
"""A layer whose largest output channel's weight range is this many times its median
channel's wastes most of a per-tensor power-of-2 scale on one channel."""
WEIGHT_DECAY = 1e-4
"""TI's recommended weight decay, on every parameter."""


@dataclass(frozen=True)
class Finding:
    """One thing to look at: how serious, where, what, why it matters, how to fix it."""

    severity: str
    where: str
    what: str
    why: str
    fix: str

    def __str__(self) -> str:
        return (f"[{self.severity}] {self.where}: {self.what}\n    why: {self.why}\n"
                f"    fix: {self.fix}")


@dataclass
class DoctorReport:
    """What `doctor` found; `ok` when nothing is a warning or an error."""

    model: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity in (ERROR, WARNING) for f in self.findings)

    def __str__(self) -> str:
        if not self.findings:
            return f"{self.model}: nothing to fix before quantization."
        counts = {kind: sum(f.severity == kind for f in self.findings)
                  for kind in (ERROR, WARNING, INFO)}
        head = f"{self.model}: " + ", ".join(f"{n} {k}(s)" for k, n in counts.items() if n)
        return "\n".join([head] + [str(f) for f in self.findings])

    def to_markdown(self) -> str:
        rows = ["| severity | where | what | why | fix |", "|---|---|---|---|---|"]
        rows += [f"| {f.severity} | {f.where} | {f.what} | {f.why} | {f.fix} |"
                 for f in self.findings]
        return f"# doctor: {self.model}\n\n" + "\n".join(rows) + "\n"

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "ok": self.ok,
                           "findings": [asdict(f) for f in self.findings]}, indent=2)


def _convs_without_batchnorm(graph: fx.GraphModule) -> list[Finding]:
    layers = [n for n in graph.graph.nodes if isinstance(module_of(graph, n), WEIGHT_LAYERS)]
    downstream: set[fx.Node] = set()  # layers with another weight layer after them
    for node in reversed(list(graph.graph.nodes)):
        if isinstance(module_of(graph, node), WEIGHT_LAYERS) or node in downstream:
            fx.node.map_arg((node.args, node.kwargs), downstream.add)
    findings = []
    for node in layers:  # a final prediction layer (nothing downstream) may skip BatchNorm
        if isinstance(module_of(graph, node), nn.Linear) or node not in downstream:
            continue
        if not any(isinstance(module_of(graph, user), BATCHNORMS) for user in node.users):
            findings.append(Finding(
                WARNING, node.target, "convolution without BatchNorm after it",
                "TI's guidelines: BatchNorm right after every convolution (except the final "
                "prediction layer) keeps feature maps in a range fixed point represents well; "
                "without it 8-bit accuracy can drop, depthwise layers most",
                "add nn.BatchNorm2d after it and retrain (float), then quantize"))
    return findings


def _structure(graph: fx.GraphModule, config: QuantConfig) -> list[Finding]:
    findings = []
    for node in graph.graph.nodes:
        module = module_of(graph, node)
        if isinstance(module, BATCHNORMS):
            producer = node.args[0] if node.args else None
            if not isinstance(module_of(graph, producer) if isinstance(producer, fx.Node)
                              else None, WEIGHT_LAYERS):
                findings.append(_standalone_batchnorm(graph, node, module))
    depthwise = [n.target for n in graph.graph.nodes if is_depthwise(module_of(graph, n))]
    if depthwise:
        if config.depthwise_per_channel:
            mode, fix = "per channel", ("none needed; if accuracy drops, check 16 bit first "
                                        "(compare_bit_depths), then QAT")
        else:
            mode, fix = "per tensor (one scale each)", (
                "keep equalization on (the default here), train with weight decay on the "
                "depthwise weights, or use QAT; per_channel_depthwise=True where the target "
                "allows it")
        names = ", ".join(map(str, depthwise[:3])) + (", ..." if len(depthwise) > 3 else "")
        findings.append(Finding(
            INFO, f"{len(depthwise)} depthwise conv(s) ({names})", "depthwise convolutions",
            "TI: models with depthwise convs are harder to quantize; expect a larger accuracy "
            f"drop. Their weights are quantized {mode} here", fix))
    return findings


def _reuse_and_functionals(raw: fx.GraphModule) -> list[Finding]:
    """From the graph as traced (before quantfx rewrites it): reused modules, functionals."""
    findings = []
    sites: dict[str, int] = {}
    for node in raw.graph.nodes:
        if node.op == "call_module":
            sites[node.target] = sites.get(node.target, 0) + 1
    reused = {target: count for target, count in sites.items() if count > 1}
    if reused:
        names = list(reused)
        where = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        counts = sorted(set(reused.values()))
        findings.append(Finding(
            INFO, where, f"{len(names)} module(s) called at {'/'.join(map(str, counts))} "
            "sites", "each call site is its own layer in the engine with its own range: "
            "quantfx un-shares it (parameters stay tied), so nothing is needed", "none (or one "
            "module per use, as TI advises, to keep the model's own code clear)"))
    functionals = sorted({getattr(n.target, "__name__", str(n.target)) for n in raw.graph.nodes
                          if n.op in ("call_function", "call_method")
                          and n.target in _REWRITTEN and not is_shape_only(raw, n)
                          and getattr(n.target, "__module__", "") != "_operator"})  # x + y
    if functionals:
        findings.append(Finding(
            INFO, "forward", f"functionals: {', '.join(functionals)}", "each call becomes a "
            "module with its own quantizer (quantfx does this for you)",
            "none (modules instead of functionals make the model's intent explicit)"))
    return findings


_REWRITTEN = {target for rule in REWRITES for target in rule.targets}


def _outliers(graph: fx.GraphModule) -> list[Finding]:
    findings = []
    for node in graph.graph.nodes:
        layer = module_of(graph, node)
        if not isinstance(layer, WEIGHT_LAYERS) or layer.weight.shape[0] < 4:
            continue
        ranges = layer.weight.detach().abs().flatten(1).amax(dim=1)
        median = float(ranges.median())
        ratio = float(ranges.max()) / median if median > 0 else float("inf")
        if ratio > OUTLIER_RATIO:
            findings.append(Finding(
                WARNING, node.target, f"an output channel's weight range is {ratio:.0f}x the "
                "median channel's (after BatchNorm folding)", "one per-tensor power-of-2 scale "
                "must fit the largest channel, leaving the others a few levels",
                "QuantConfig(equalization=True), per-channel weights (per_channel_weights / "
                "per_channel_depthwise), weight decay on every parameter, or QAT"))
    return findings


def _percentile(observer: HistogramObserver, share: float) -> float:
    """The magnitude below which `share` of the observed values lie (from the histogram)."""
    cumulative = torch.cumsum(observer.histogram, dim=0)
    index = int(torch.searchsorted(cumulative, cumulative[-1] * share))
    return (index + 1) * 2.0 ** int(observer.range_exponent) / observer.bins


def _long_tails(prepared: fx.GraphModule) -> list[Finding]:
    """Activations (not inputs, not bounded ones) whose calibrated maximum is far beyond where
    almost all their values lie: where ReLU6 or learned clipping would give the range a bound."""
    findings = []
    for node in prepared.graph.nodes:
        quantizer = module_of(prepared, node)
        source = node.args[0] if node.args else None
        if (not isinstance(quantizer, CalibrationQuantizer)
                or not isinstance(quantizer.observer, HistogramObserver)
                or not isinstance(source, fx.Node) or source.op == "placeholder"
                or isinstance(module_of(prepared, source), BOUNDED_ACTIVATIONS)
                or float(quantizer.observer.histogram.sum()) == 0):
            continue
        bulk = _percentile(quantizer.observer, TAIL_SHARE)
        largest = float(quantizer.observer.max_abs().max())
        if bulk > 0 and largest > TAIL_RATIO * bulk:
            findings.append(Finding(
                INFO, source.name, f"activation without a bound: its largest value is "
                f"{largest / bulk:.0f}x its {100 * TAIL_SHARE:g}th percentile",
                "a long tail forces a choice between saturating it and a coarse step for "
                "every other value, and the range depends on which images calibrate it",
                "a bounded activation there (ReLU6 / Hardtanh), or QAT, whose learned "
                "clipping (PACT2-style) bounds it in training"))
    return findings


def _standalone_batchnorm(graph: fx.GraphModule, node: fx.Node, bn: nn.Module) -> Finding:
    """A BatchNorm no conv/linear precedes: folded forward when exact, else what running it
    with one per-tensor weight scale (as TIDL does) costs its channel scales."""
    what = "BatchNorm that does not follow a conv/linear"
    if forward_fold_target(graph, node) is not None:
        return Finding(INFO, node.target, what, "quantfx folds it forward into the conv/linear "
                       "that follows (exact: no zero padding, only pools, means or a flatten "
                       "between)", "none needed")
    cost = ""
    if bn.running_var is not None:
        scale, _ = batchnorm_affine(bn)
        sqnr, codes = per_tensor_cost(scale)
        coarse = int((codes.abs() < COARSE_CODES).sum())
        cost = (f": here its {len(scale)} channel scales span {float(scale.abs().min()):.3g}.."
                f"{float(scale.abs().max()):.3g}, kept at {sqnr:.1f} dB, {coarse} channel(s) "
                f"with fewer than {COARSE_CODES} codes")
    return Finding(
        WARNING, node.target, what,
        "it runs as a layer of its own with one per-tensor 8-bit weight scale for all its "
        f"channels (as TIDL runs it){cost}; its outputs need a scale of their own",
        "put the BatchNorm right after the conv (conv -> BN -> ReLU) and retrain, "
        "or give the next conv no padding so it folds forward")


def _optimizer(model: nn.Module, optimizer: Any) -> list[Finding]:
    if optimizer is None:
        return []
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got "
                          f"{type(optimizer).__name__}.")
    findings = []
    if not isinstance(optimizer, torch.optim.SGD):
        findings.append(Finding(
            INFO, type(optimizer).__name__, "optimizer other than SGD", "TI: SGD produces models "
            "that are friendlier to quantization than Adam/AdamW",
            "train with SGD (momentum 0.9) if you can, and use the same optimizer for QAT"))
    names = {id(p): n for n, p in model.named_parameters()}
    held = sum(1 for group in optimizer.param_groups for p in group["params"] if id(p) in names)
    if held == 0:
        return findings + [Finding(
            ERROR, type(optimizer).__name__, f"the optimizer holds none of the model's "
            f"{len(names)} parameters", "it would train another model (typically one built "
            "before a copy, e.g. before prepare_qat, which returns a new model)",
            "pass the optimizer that trains this model: torch.optim.SGD(model.parameters(), "
            "...) built on the model given to doctor")]
    held_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held_ids]
    if left:
        findings.append(Finding(
            WARNING, type(optimizer).__name__, f"the optimizer holds {held} of the model's "
            f"{len(names)} parameters; not {', '.join(left[:4])}{' ...' if len(left) > 4 else ''}",
            "parameters that require grad but no optimizer updates stay at their values",
            "add them to the optimizer, or set requires_grad=False on those you freeze"))
    kinds = {}
    for module in model.modules():
        kind = ("BatchNorm" if isinstance(module, nn.modules.batchnorm._NormBase)
                else "depthwise" if is_depthwise(module) else "")
        for parameter in module.parameters(recurse=False):
            kinds[id(parameter)] = kind
    for index, group in enumerate(optimizer.param_groups):
        decay = float(group.get("weight_decay", 0.0))
        if decay >= WEIGHT_DECAY:
            continue
        params = [p for p in group["params"] if id(p) in names]
        if not params:
            continue
        labelled = [f"{names[id(p)]} ({kinds.get(id(p)) or names[id(p)].rpartition('.')[2]})"
                    for p in params]
        special = [label for label in labelled if "(weight)" not in label]
        shown = (special or labelled)[:6]
        findings.append(Finding(
            WARNING, f"optimizer param group {index}", f"weight decay {decay:g} on "
            f"{len(params)} parameter(s): {', '.join(shown)}{' ...' if len(labelled) > 6 else ''}",
            "TI: weight decay 1e-4 on every parameter, biases, BatchNorm and depthwise weights "
            "included, keeps them compact; skipping it costs several points in fixed point",
            "weight_decay=1e-4 on every parameter group"))
    return findings


def _export_and_tidl(model: nn.Module, inputs: tuple[torch.Tensor, ...],
                     config: QuantConfig) -> list[Finding]:
    config = replace(config, progress=False)  # a check on one example: no calibration bars
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantFxWarning)  # its findings say it
        prepared = prepare(model, inputs, config)
    findings = [Finding(WARNING, item, "export_onnx has no ONNX emitter for this op",
                        "prepare, calibrate and convert work, but export_onnx refuses it",
                        "rewrite it with supported ops (docs/export.md)")
                for item in unexportable(prepared)]
    if findings:
        return findings
    with unlogged_calibrations():
        calibrate(prepared, [inputs])
    converted = convert(prepared)
    findings = _long_tails(prepared)
    try:
        built = build_export(converted.cpu(), tuple(t.cpu() for t in inputs))
    except QuantFxError as error:
        return findings + [Finding(WARNING, "export", str(error).splitlines()[0],
                                   "export_onnx would fail", "see the message")]
    report = check_model(built.model, config.target)
    return findings + [Finding(
        WARNING, f.node, f"runs on the ARM cores of {config.target}: {f.rule}",
        f"TIDL's operator rules ({f.source}); the rest of the network waits for it",
        "replace the op or change its parameters to a supported form")
            for f in report.findings if f.severity == FALLBACK]


def doctor(model: nn.Module, example_inputs: Any, optimizer: Any = None,
           config: QuantConfig | None = None) -> DoctorReport:
    """Check `model` (and the `optimizer` that trains it) against TI's quantization guidelines.

    Returns a `DoctorReport`: `str()` to read, `to_markdown()`, `to_json()`, `ok`. Runs the
    model once on `example_inputs` (and a short calibration on them) to see what export and
    the TIDL checker of `config.target` would say. With `config.quantize_only`, each part is
    checked on the inputs it receives, its findings named by module path.
    """
    config = resolve_config(config)
    require_state(model, "doctor", ConfigError, (FLOAT,), "the float model (a torch.nn.Module)",
                  "doctor checks the float model, before quantfx.prepare or prepare_qat.")
    report = DoctorReport(type(model).__name__)
    report.findings += _optimizer(model, optimizer)
    config = whole_or_parts(model, example_inputs, config)
    with this_process_only():  # its calibration is a check: nothing waits for other ranks
        report.findings += (_part_findings(model, example_inputs, config) if config.quantize_only
                            else _model_findings(model, as_input_tuple(example_inputs), config))
    return report


def _model_findings(model: nn.Module, inputs: tuple[torch.Tensor, ...],
                    config: QuantConfig) -> list[Finding]:
    """Everything `doctor` checks on a model that traces whole."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", QuantFxWarning)  # its findings say it
            graph, _ = build_graph(model, inputs, config, training=False)
    except QuantFxError as error:
        return [Finding(
            ERROR, "trace", str(error).splitlines()[0], "quantfx traces the model with torch.fx "
            "to place quantizers", "\n".join(str(error).splitlines()[1:]).removeprefix("Fix: ")
            or "see the message")]
    findings = _convs_without_batchnorm(graph) + _structure(graph, config)
    findings += _reuse_and_functionals(trace(private_copy(model).eval(), config))
    findings += _outliers(fold_batchnorm(graph))
    return findings + _export_and_tidl(model, inputs, config)


def _part_findings(model: nn.Module, example_inputs: Any, config: QuantConfig) -> list[Finding]:
    """Each part `config.quantize_only` names, checked on the arguments it receives."""
    findings: list[Finding] = []
    names: list[str] = []

    def check(part: nn.Module, arguments: tuple, part_config: QuantConfig) -> nn.Module:
        prefix = names.pop(0)  # prepare_parts prepares them in this order
        findings.extend(replace(finding, where=f"{prefix}.{finding.where}")
                        for finding in _model_findings(part, arguments, part_config))
        return part
    names += resolve_parts(model, model_inputs(example_inputs), config)[0]  # once: "auto"
    try:  # traces every submodule; prepare_parts then gets the parts by name
        prepare_parts(model, example_inputs, replace(config, quantize_only=tuple(names)), check,
                      training=False)
    except QuantFxError as error:
        findings.append(Finding(ERROR, "parts", str(error).splitlines()[0], "quantfx quantizes "
                                "the parts quantize_only names", "see the message"))
    return findings
