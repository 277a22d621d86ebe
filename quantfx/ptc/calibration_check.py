"""The last step of `calibrate`: the quantized model measured against float on calibration
samples it already has, so that a collapse is never silent.

The float outputs are recorded during calibration's observing pass (quantization is off there:
no extra float forward); the check itself converts the model (what `convert` will return, the
device's bias rule included) and runs it once over `CHECK_SAMPLES` samples. Only when the
output is below `COLLAPSE_DB` does it spend one float and one quantized pass over
`DIAGNOSIS_SAMPLES` samples to find the tensor that loses most, to name it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor

from quantfx.errors import warn
from quantfx.layers import FakeQuantLayer
from quantfx.passes.graph_utils import flatten_values, module_of
from quantfx.qmath import sqnr_db
from quantfx.quantizers import Quantizer, quant_mode, set_quant_mode

CHECK_SAMPLES = 32
"""Calibration samples whose float outputs are kept and run again quantized."""
DIAGNOSIS_SAMPLES = 4
"""Samples the worst-tensor search runs on (it keeps every quantized tensor of them)."""
COLLAPSE_DB = 6.0
"""Output SQNR below which calibration warns. Measured (docs/benchmarks.md, real_models): the
8-bit configs of real models land at 7.4 dB (EfficientNet-Lite1 on TDA4VM, per-tensor weights)
to 40 dB; a collapsed one (chance agreement) at 0-2 dB."""
SOURCE_REFERENCE_DB = 40.0
"""What a tensor with no quantized tensor upstream (a network input) is measured against."""


@dataclass
class CalibrationCheck:
    """How far the calibrated model is from float on calibration samples."""

    output_sqnr_db: float
    samples: int
    worst_tensor: str | None = None
    """The tensor (module path or node name) that loses most, named only after a collapse."""
    worst_loss_db: float | None = None
    """How many dB the model's SQNR drops at that tensor against the tensors it reads."""
    sixteen_bit: list[str] = field(default_factory=list)
    """The layers and tensors calibration widened to 16 bit by measurement, worst first."""

    @property
    def collapsed(self) -> bool:
        """Far below what 8 bit gives: the quantized model no longer computes the float one."""
        return self.output_sqnr_db < COLLAPSE_DB

    def summary(self) -> str:
        text = (f"calibration check: output SQNR {self.output_sqnr_db:.1f} dB against float on "
                f"{self.samples} calibration samples")
        if self.worst_tensor is not None:
            text += f"; worst tensor {self.worst_tensor} (-{self.worst_loss_db:.1f} dB there)"
        if self.sixteen_bit:
            text += f"; 16 bit by measurement: {', '.join(self.sixteen_bit)}"
        return text


def output_rows(output: object, rows: int) -> list[Tensor]:
    """The first `rows` rows of each floating-point tensor among a model's outputs."""
    return [leaf.detach()[:rows] for leaf in flatten_values(output)
            if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.is_floating_point()]


def check_calibration(model: fx.GraphModule, batches: list[tuple[Tensor, ...]],
                      float_outputs: list[list[Tensor]], sixteen_bit: Sequence[str] = ()
                      ) -> CalibrationCheck | None:
    """Output SQNR of the calibrated model on `batches` against `float_outputs`; after a
    collapse, the worst tensor too, and a warning. None when there is nothing to compare."""
    batches = batches[:len(float_outputs)]
    if not batches:
        return None
    from quantfx.convert import convert  # the model the user will get, biases fitted and all

    converted = convert(model)
    with torch.no_grad():
        quantized = [output_rows(converted(*inputs), inputs[0].shape[0]) for inputs in batches]
    del converted
    pairs = [(f.flatten(), q.flatten()) for fs, qs in zip(float_outputs, quantized)
             for f, q in zip(fs, qs) if q.shape == f.shape]
    if not pairs:
        return None
    sqnr = sqnr_db(torch.cat([f for f, _ in pairs]), torch.cat([q for _, q in pairs]))
    check = CalibrationCheck(sqnr, sum(inputs[0].shape[0] for inputs in batches),
                             sixteen_bit=list(sixteen_bit))
    if check.collapsed and math.isfinite(sqnr):
        check.worst_tensor, check.worst_loss_db = worst_tensor(model, batches)
        warn(_collapse_message(check))
    return check


def _collapse_message(check: CalibrationCheck) -> str:
    worst = (f" The tensor that loses most is {check.worst_tensor!r} (the model drops "
             f"{check.worst_loss_db:.1f} dB there)." if check.worst_tensor else "")
    keep = (f" QuantConfig(sixteen_bit_layers=[{check.worst_tensor!r}]) keeps it at 16 bit;"
            if check.worst_tensor else "")
    return (f"the calibrated model is {check.output_sqnr_db:.1f} dB from float on "
            f"{check.samples} calibration samples (8 bit normally gives 20-40 dB): its outputs "
            f"have collapsed.{worst} Try:{keep} QuantConfig(per_channel_weights=True); "
            "quantfx.analyze(...) for every tensor's loss; and check that calibration data has "
            "the model's preprocessing.")


def _tensor_name(model: fx.GraphModule, quantizer_node: fx.Node) -> str:
    producer = quantizer_node.args[0] if quantizer_node.args else None
    if isinstance(producer, fx.Node):
        return str(producer.target) if producer.op == "call_module" else producer.name
    return quantizer_node.name


def _upstream_quantizers(model: fx.GraphModule, node: fx.Node) -> set[fx.Node]:
    """The nearest quantizer nodes that `node`'s inputs come from."""
    found, stack, seen = set(), list(node.all_input_nodes), set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if isinstance(module_of(model, current), Quantizer):
            found.add(current)
        else:
            stack.extend(current.all_input_nodes)
    return found


def _capture(model: fx.GraphModule, nodes: list[fx.Node], batch: tuple[Tensor, ...],
             inputs: bool) -> dict[fx.Node, Tensor]:
    """Each quantizer node's input (`inputs`) or output on `batch`."""
    captured: dict[fx.Node, Tensor] = {}
    handles = []
    for node in nodes:
        def hook(_module, args, output, node=node):
            captured[node] = (args[0] if inputs else output).detach().double()
        handles.append(module_of(model, node).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*batch)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _float_pass(model: fx.GraphModule, nodes: list[fx.Node], batch: tuple[Tensor, ...]
                ) -> dict[fx.Node, Tensor]:
    """The float model's tensors: quantizers off, float biases and weights put back."""
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLayer)]
    saved = [(m.layer.bias.detach().clone() if m.layer.bias is not None else None,
              m.layer.weight.detach().clone()) for m in layers]
    with torch.no_grad():
        for module in layers:
            if module.float_bias is not None and module.layer.bias is not None:
                module.layer.bias.copy_(module.float_bias)
            if module.float_weight is not None:
                module.layer.weight.copy_(module.float_weight)
    set_quant_mode(model, observe=False, quantize=False)
    try:
        return _capture(model, nodes, batch, inputs=True)
    finally:
        with torch.no_grad():
            for module, (bias, weight) in zip(layers, saved):
                if bias is not None:
                    module.layer.bias.copy_(bias)
                module.layer.weight.copy_(weight)


def worst_tensor(model: fx.GraphModule, batches: list[tuple[Tensor, ...]]
                 ) -> tuple[str | None, float | None]:
    """The activation tensor where the model's SQNR against float drops most, and the drop."""
    batch = tuple(tensor[:DIAGNOSIS_SAMPLES] for tensor in batches[0])
    nodes = [node for node in model.graph.nodes
             if node.op == "call_module" and isinstance(module_of(model, node), Quantizer)]
    float_values = _float_pass(model, nodes, batch)
    with quant_mode(model, observe=False, quantize=True):
        quantized = _capture(model, nodes, batch, inputs=False)
    sqnr = {node: sqnr_db(float_values[node], quantized[node]) for node in nodes
            if node in float_values and node in quantized}
    best: tuple[str | None, float | None] = (None, None)
    for node, value in sqnr.items():
        upstream = [sqnr[up] for up in _upstream_quantizers(model, node) if up in sqnr]
        reference = min(upstream) if upstream else SOURCE_REFERENCE_DB
        loss = min(reference, SOURCE_REFERENCE_DB * 2) - value
        if best[1] is None or loss > best[1]:
            best = (_tensor_name(model, node), loss)
    return best


@contextlib.contextmanager
def unlogged_calibrations() -> Iterator[None]:
    """Calibrations a tool runs for its own measurement (doctor, analyze, compare_bit_depths)
    log no calibration check: the user reads the tool's report, not lines about models they
    never made (`quantfx doctor` printed "output SQNR 90.6 dB on 1 calibration samples")."""
    logger = logging.getLogger("quantfx.ptc")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
