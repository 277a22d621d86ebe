"""Measured mixed precision (`QuantConfig.widen_sensitive_layers`): which few layers run 16 bit.

Once calibration has every range, each layer's own 8-bit rounding -- its weights and its
output, nothing else quantized -- is measured at each of the model's outputs on a few
calibration samples. A layer that alone holds an output below `SENSITIVE_DB` gets 16-bit
weights and a 16-bit output (TIDL's `params_16bit_names_list` /
`output_feature_16bit_names_list`; on a target with 16-bit biases, TDA4VM, the weights only),
the worst first, at most `MAX_WIDENED_SHARE` of the layers. A layer whose own result is a model
output is held to `OUTPUT_DB` on that output, besides that share: among several outputs on any
target, a lone output where the target imports 16-bit Q/DQ (the generic one; a part of a partly
quantized model is measured on its outputs joined, against `SENSITIVE_DB`). Other quantized
tensors (a residual add's output, a standalone BatchNorm's) are candidates too, by their graph
node name. A 16-bit activation makes the next layer's float32 sums inexact in ONNX Runtime's
reference kernels; the export verifies such files step by step (`quantfx.export.stepwise`).
Layers are measured in halving groups (`own_rounding_db`), so a model with few sensitive layers
costs a few dozen forwards. The widths are buffers (`Quantizer.width`), so a state_dict carries
the choice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor
from tqdm.auto import tqdm

from quantfx.config import QuantConfig
from quantfx.inputs import first_samples
from quantfx.layers import FakeQuantLayer
from quantfx.ops import FUSABLE_ACTIVATIONS
from quantfx.passes.graph_utils import first_input, flatten_values, module_of
from quantfx.passes.place import MAX_WIDENED_SHARE
from quantfx.ptc.calibration_check import output_rows
from quantfx.qmath import sqnr_db
from quantfx.quantizers import CalibrationQuantizer, quant_mode
from quantfx.state import state_of

SENSITIVE_DB = 30.0
"""A layer whose own 8-bit rounding (weights and output) alone leaves the model's output below
this SQNR is widened (most layers measure above 30 dB on the real models of docs/benchmarks.md; the
BN-folded early layers of EfficientNet-Lite 17-30 dB)."""
MEASURE_SAMPLES = 8
"""Calibration samples each layer's own rounding is measured on."""
OUTPUT_DB = 45.0
"""A layer or tensor whose own result is a model output is widened below this SQNR on that
output, outside the share: it is the last layer, one per output and cheap at 16 bit (TI advises
a 16-bit last layer), and its 8-bit step is a floor under everything the output is judged by:
the YOLOX-style detector's box / objectness / class outputs measure 35 dB and cost 0.8 mAP at
8 bit; EfficientNet-Lite2's 8-bit logits (34 dB) held per-channel weights at 23.8 dB
(24.9 at 16 bit) on held-apart photos."""
WIDE_BITS = 16
LOG = logging.getLogger(__name__)


@dataclass
class PrecisionUnit:
    """What widens together: a layer's weight and output quantizers, or one tensor's."""

    name: str
    quantizers: list[CalibrationQuantizer]


def precision_units(model: fx.GraphModule, outputs: bool = True) -> list[PrecisionUnit]:
    """Each conv/linear (module path) with its weight and output quantizers (the output after a
    fused activation), then each other quantized op output (node name, as `analyze` names
    it); network inputs are the data's own precision and never widen. Without `outputs`, the
    weights alone."""
    units: dict[str, PrecisionUnit] = {}
    for node in model.graph.nodes:
        module = module_of(model, node)
        if isinstance(module, FakeQuantLayer):
            unit = units.setdefault(str(node.target), PrecisionUnit(str(node.target), []))
            unit.quantizers.append(module.weight_quantizer)
        elif isinstance(module, CalibrationQuantizer) and outputs:
            source = _producer(model, node)
            if source is not None:
                name = (str(source.target) if isinstance(module_of(model, source), FakeQuantLayer)
                        else source.name)
                units.setdefault(name, PrecisionUnit(name, [])).quantizers.append(module)
    return list(units.values())


def measured_units(model: fx.GraphModule) -> list[str]:
    """The units calibration widened by measurement, in graph order, as the quantizers'
    `measured` buffers (part of the state_dict) say."""
    return [unit.name for unit in precision_units(model)
            if any(bool(quantizer.measured) and quantizer.bits != quantizer.placed_bits
                   for quantizer in unit.quantizers)]


def follow_loaded_widths(model: fx.GraphModule, incompatible_keys: object) -> None:
    """`load_state_dict` post-hook of a prepared model: the widths came with the state_dict, so
    the measured list follows them, and the last calibration check (measured on other
    weights) no longer describes the model."""
    state = state_of(model)
    if state is not None:
        state.measured_sixteen_bit = measured_units(model)
        state.calibration_check = None


def _producer(model: fx.GraphModule, quantizer: fx.Node) -> fx.Node | None:
    """The node whose output `quantizer` holds: the layer under a fused activation, the op;
    None for a network input."""
    source = first_input(quantizer)
    if source is None or source.op == "placeholder":
        return None
    if isinstance(module_of(model, source), FUSABLE_ACTIVATIONS):
        layer = first_input(source)
        if layer is not None and isinstance(module_of(model, layer), FakeQuantLayer):
            return layer
    return source


def _outputs(model: fx.GraphModule, batches: Sequence[tuple[Tensor, ...]],
             per_output: bool = True) -> list[Tensor | None]:
    """Each output leaf of `model` on `batches`, flattened and joined across batches (None for
    a leaf that is not a floating-point tensor), in the order of the graph's output leaves;
    without `per_output`, one tensor of every floating-point output's batch rows."""
    with torch.no_grad():
        if not per_output:
            return [torch.cat([leaf.flatten() for inputs in batches
                               for leaf in output_rows(model(*inputs), inputs[0].shape[0])]
                              or [torch.zeros(0)])]
        runs = [flatten_values(model(*inputs)) for inputs in batches]
    joined: list[Tensor | None] = []
    for leaves in zip(*runs):
        floating = all(isinstance(leaf, Tensor) and leaf.is_floating_point() for leaf in leaves)
        joined.append(torch.cat([leaf.detach().flatten() for leaf in leaves]) if floating
                      else None)
    return joined


def held_outputs(model: fx.GraphModule, units: list[PrecisionUnit], lone: bool
                 ) -> dict[int, list[int]]:
    """Unit index -> the positions of the model's output leaves that unit's quantizers hold and
    that hold it to OUTPUT_DB: with several outputs, each; a lone output only where `lone`
    (the target imports 16-bit Q/DQ: a TIDL file gains an int16 tensor only where it must)."""
    owner = {id(quantizer): index for index, unit in enumerate(units)
             for quantizer in unit.quantizers}
    output = next(node for node in model.graph.nodes if node.op == "output")
    leaves = flatten_values(output.args[0])
    held: dict[int, list[int]] = {}
    for position, leaf in enumerate(leaves if len(leaves) > 1 or lone else []):
        index = owner.get(id(module_of(model, leaf))) if isinstance(leaf, fx.Node) else None
        if index is not None:
            held.setdefault(index, []).append(position)
    return held


@dataclass(frozen=True)
class OwnRounding:
    """A unit's own 8-bit rounding, measured: `sensitive` when some output falls below its bar
    (`db`: the lowest such output's SQNR), else `db` is the lowest output SQNR."""

    db: float
    sensitive: bool


def own_rounding_db(model: fx.GraphModule, units: list[PrecisionUnit],
                    batches: Sequence[tuple[Tensor, ...]], progress: bool,
                    per_output: bool = True, held: dict[int, list[int]] | None = None
                    ) -> list[OwnRounding]:
    """Per unit, each output's SQNR against float with only its quantizers quantizing, read
    against its bar: SENSITIVE_DB, or OUTPUT_DB on the outputs `held` names for it (by default
    an output it produces among several); without `per_output`, the outputs joined into one,
    against SENSITIVE_DB.

    Units are measured in groups first: rounding noise adds, so a group with no output below
    its bar has no member below it and is not split (its members get the group's figure, a
    lower bound of their own). Groups below are halved down to single units, which get their
    exact figure: about (sensitive units) x log2(units) forwards, not one per unit (a model
    that 8 bit serves: one forward)."""
    measured = [OwnRounding(float("inf"), False)] * len(units)
    with quant_mode(model, observe=False, quantize=False):
        reference = _outputs(model, batches, per_output)
        kept = [index for index, leaf in enumerate(reference)
                if leaf is not None and bool(leaf.ne(0).any())]
        if not kept:  # no float output, or all zero: nothing to rank
            return measured
        bars = [[SENSITIVE_DB] * len(reference) for _ in units]
        if per_output:
            for index, positions in (held_outputs(model, units, False) if held is None
                                     else held).items():
                for position in positions:
                    bars[index][position] = OUTPUT_DB
        pending = [list(range(len(units)))] if units else []
        with tqdm(desc="mixed precision", unit="pass", leave=False,
                  disable=None if progress else True) as bar:
            while pending:
                group = pending.pop()
                dbs = _group_db(model, [units[index] for index in group], batches, reference,
                                per_output)
                below = [dbs[leaf] for leaf in kept
                         if dbs[leaf] < max(bars[index][leaf] for index in group)]
                bar.update(1)
                if not below or len(group) == 1:
                    result = OwnRounding(min(below or [dbs[leaf] for leaf in kept]), bool(below))
                    for index in group:
                        measured[index] = result
                else:
                    pending += [group[len(group) // 2:], group[:len(group) // 2]]
    return measured


def _group_db(model: fx.GraphModule, group: list[PrecisionUnit],
              batches: Sequence[tuple[Tensor, ...]], reference: list[Tensor | None],
              per_output: bool) -> list[float]:
    """Each output's SQNR with only `group`'s quantizers quantizing (all off again after)."""
    members = [quantizer for unit in group for quantizer in unit.quantizers]
    for quantizer in members:
        quantizer.set_mode(observe=False, quantize=quantizer.observed)
    try:
        dbs = [float("inf") if expected is None else sqnr_db(expected, got)
               for expected, got in zip(reference, _outputs(model, batches, per_output))]
    finally:
        for quantizer in members:
            quantizer.set_mode(observe=False, quantize=False)
    what = group[0].name if len(group) == 1 else f"{len(group)} layers and tensors together"
    LOG.debug("mixed precision: %s at 8 bit: %s dB", what,
              ", ".join(f"{db:.1f}" for db in dbs))
    return dbs


def restore_placed_widths(model: fx.GraphModule) -> None:
    """Undo an earlier calibration's widening: a new calibration measures afresh."""
    for module in model.modules():
        if isinstance(module, CalibrationQuantizer) and module.bits != module.placed_bits:
            module.widen(module.placed_bits)


def widen_sensitive_layers(model: fx.GraphModule, config: QuantConfig,
                           batches: Sequence[tuple[Tensor, ...]]) -> list[str]:
    """Widen to 16 bit the units whose own rounding costs most (see the module text); returns
    their names, worst first. Every exponent must be computed already."""
    if not (config.widen_sensitive_layers and batches and config.weight_bits == 8
            and config.activation_bits == 8):
        return []
    # A 16-bit output makes the next layer's bias step tiny: a 16-bit bias (TDA4VM's, for
    # 8-bit weights) cannot hold it, so there only weights widen (their biases are 32 bit).
    outputs = config.profile.bias_bits_for(config.weight_bits) >= 32
    units = [unit for unit in precision_units(model, outputs)
             if any(quantizer.bits < WIDE_BITS for quantizer in unit.quantizers)]
    layers = sum(isinstance(m, FakeQuantLayer) for m in model.modules())
    budget = max(1, int(MAX_WIDENED_SHARE * layers))
    samples = first_samples(batches, MEASURE_SAMPLES)
    # A part's outputs are features that flow on into float modules: joined, as one output.
    # The layers that produce the model's outputs are few and cheap at 16 bit: outside the tenth.
    owners = ({} if config.quantize_only
              else held_outputs(model, units, config.profile.int16_qdq_importable))
    measured = own_rounding_db(model, units, samples, config.progress,
                               per_output=not config.quantize_only, held=owners)
    ranked = sorted((rounding.db, index) for index, rounding in enumerate(measured)
                    if rounding.sensitive and index not in owners)
    heads = [(measured[index].db, index) for index in owners if measured[index].sensitive]
    chosen = [units[index] for _, index in sorted(heads + ranked[:budget])]
    for quantizer in (quantizer for unit in chosen for quantizer in unit.quantizers):
        quantizer.widen(WIDE_BITS)
        if hasattr(quantizer.observer, "choose"):  # a search's 8-bit exponent: not at 16 bit
            quantizer.observer.choose(None)
        if quantizer.observed:
            quantizer.compute_exponent()
    return [unit.name for unit in chosen]
