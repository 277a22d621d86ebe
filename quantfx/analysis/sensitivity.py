"""Per-tensor sensitivity, `analyze`'s measurement: each quantized tensor's SQNR against float
in the quantized model, what its own rounding (and its layer's weight rounding) costs alone,
and its float value histogram, from one float and one quantized pass per batch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn

from quantfx.layers import FakeQuantLayer, layer_forward
from quantfx.ops import FUSABLE_ACTIVATIONS
from quantfx.partial import quantized_parts
from quantfx.passes.graph_utils import module_of
from quantfx.ptc.learned_rounding import float_parameters
from quantfx.quantizers import CalibrationQuantizer, set_quant_mode
from quantfx.state import state_of

HISTOGRAM_BINS = 48
"""Bins of each tensor's float value histogram, over twice its quantizer's range either side."""




@dataclass
class TensorSensitivity:
    """One quantized tensor: how far from float it ends up, and what its own rounding costs."""

    tensor: str
    """The graph node whose output this is (a name `sixteen_bit_layers` takes)."""
    layer: str | None
    """The conv/linear whose output this is (a name `sixteen_bit_layers` takes), if any."""
    bits: int
    sqnr_in_model_db: float
    """This tensor in the fully quantized model against the float model's."""
    activation_alone_db: float
    """Its quantizer's rounding of the float tensor, nothing else quantized."""
    weight_alone_db: float | None = None
    """Its layer's output with only the layer's weights quantized (float input)."""
    clip: float = 0.0
    """The largest magnitude its quantizer represents (qmax * 2**exponent)."""
    histogram: list[int] = field(default_factory=list)
    """Float value counts in `HISTOGRAM_BINS` bins over [-2 clip, 2 clip] (edges hold the rest)."""

    @property
    def alone_db(self) -> float:
        """The worse of the two errors it adds on its own."""
        return min(self.activation_alone_db, self.weight_alone_db or math.inf)


def power_sqnr(signal: float, noise: float) -> float:
    """10 log10(signal / noise): inf without noise, -inf without signal."""
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


class Sums:
    """Signal and noise power, summed over batches."""

    def __init__(self) -> None:
        self.signal: dict[str, float] = {}
        self.noise: dict[str, float] = {}

    def add(self, name: str, reference: Tensor, value: Tensor) -> None:
        reference = reference.detach().double()
        self.signal[name] = self.signal.get(name, 0.0) + float(reference.pow(2).sum())
        self.noise[name] = self.noise.get(name, 0.0) + float(
            (value.detach().double() - reference).pow(2).sum())

    def sqnr(self, name: str) -> float:
        return power_sqnr(self.signal.get(name, 0.0), self.noise.get(name, 0.0))


def quantized_graphs(prepared: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """The graphs of a prepared model with the prefix of their module paths: the model itself,
    or each quantized part of a partly quantized one ("backbone.", a name
    `sixteen_bit_layers` takes)."""
    parts = quantized_parts(state_of(prepared))
    if not parts:
        return [("", prepared)]
    return [(f"{part}.", prepared.get_submodule(part)) for part in parts]


def quantizer_nodes(prepared: nn.Module) -> dict[str, tuple[str, fx.GraphModule, fx.Node]]:
    """Every activation quantizer by module path: its graph's prefix, the graph, its node."""
    return {prefix + node.target: (prefix, graph_module, node)
            for prefix, graph_module in quantized_graphs(prepared)
            for node in graph_module.graph.nodes
            if isinstance(module_of(graph_module, node), CalibrationQuantizer)}


def _producing_layer(model: fx.GraphModule, node: fx.Node) -> str | None:
    source = node.args[0] if node.args else None
    if isinstance(source, fx.Node) and isinstance(module_of(model, source), FUSABLE_ACTIVATIONS):
        source = source.args[0]
    if isinstance(source, fx.Node) and isinstance(module_of(model, source), FakeQuantLayer):
        return source.target
    return None


def tensor_statistics(prepared: nn.Module, converted: nn.Module,
                      batches: list[tuple[Tensor, ...]]) -> list[TensorSensitivity]:
    """One float pass (prepared model, quantizers off) and one quantized pass per batch."""
    quantizers = quantizer_nodes(prepared)
    frozen = {name: converted.get_submodule(name) for name in quantizers}
    in_model, alone, weights = Sums(), Sums(), Sums()
    clips = {name: float(frozen[name].qmax) * 2.0 ** float(frozen[name].exponent)
             for name in quantizers}
    histograms = {name: torch.zeros(HISTOGRAM_BINS, dtype=torch.float64) for name in quantizers}
    captured: dict[str, Tensor] = {}
    hooks = [prepared.get_submodule(name).register_forward_hook(
        lambda module, args, output, name=name: captured.__setitem__(name, args[0]))
        for name in quantizers]
    layers = {prefix + node.target: module_of(graph_module, node)
              for prefix, graph_module in quantized_graphs(prepared)
              for node in graph_module.graph.nodes
              if isinstance(module_of(graph_module, node), FakeQuantLayer)}
    integer = {name: converted.get_submodule(name).layer for name in layers}
    hooks += [layer.register_forward_hook(
        lambda module, args, output, name=name: weights.add(name, output, layer_forward(
            module.layer, args[0], integer[name].weight, integer[name].bias)))
        for name, layer in layers.items()]
    quantized: dict[str, Tensor] = {}
    hooks += [frozen[name].register_forward_hook(
        lambda module, args, output, name=name: quantized.__setitem__(name, output))
        for name in quantizers]

    try:
        with torch.no_grad(), float_parameters(prepared):  # the float pass: float weights
            for batch in batches:
                set_quant_mode(prepared, observe=False, quantize=False)
                prepared(*batch)
                converted(*batch)
                for name in quantizers:
                    reference = captured[name]
                    in_model.add(name, reference, quantized[name])
                    alone.add(name, reference, frozen[name](reference))
                    edge = 2.0 * clips[name]
                    histograms[name] += torch.histc(
                        reference.detach().double().clamp(-edge, edge), HISTOGRAM_BINS, -edge,
                        edge)
    finally:
        for hook in hooks:
            hook.remove()
        set_quant_mode(prepared, observe=True, quantize=False)
    results = []
    for name, (prefix, graph_module, node) in quantizers.items():
        layer = _producing_layer(graph_module, node)
        layer = None if layer is None else prefix + layer
        source = node.args[0]
        results.append(TensorSensitivity(
            prefix + source.name if isinstance(source, fx.Node) else name, layer,
            frozen[name].bits,
            in_model.sqnr(name),
            alone.sqnr(name), weights.sqnr(layer) if layer in weights.signal else None,
            clips[name], [int(count) for count in histograms[name].tolist()]))
    return sorted(results, key=lambda item: item.alone_db)
