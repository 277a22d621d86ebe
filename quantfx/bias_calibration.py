"""Bias calibration: shift each layer's bias so its quantized output keeps the float mean.

Quantizing weights and inputs biases a layer's output (the errors do not average to zero per
channel); the next layers inherit that shift. For each conv/linear layer, in graph order, the
per-channel mean of its output over the calibration data is measured twice: with everything
float, and with everything quantized (upstream layers already corrected), and the difference
is added to the bias. Layers at the same depth (none feeds another) are corrected in the same
pass. Means are sums over all data divided by counts, so the result does not depend on batch
size beyond float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantfx.frontend import quantizers, set_quant_mode
from quantfx.modules import QuantLayer
from quantfx.passes.graph_utils import module_of


class _StopForwardError(Exception):
    """Raised by a hook once the last layer of interest has run: the rest is not needed."""


def _channel_axis(layer: nn.Module) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1


def _channel_sums(output: Tensor, axis: int) -> tuple[Tensor, int]:
    """Per-channel sum of `output` (float64) and the number of values summed per channel."""
    moved = output.detach().movedim(axis, 0)
    flat = moved.reshape(moved.shape[0], -1).to(torch.float64)
    return flat.sum(dim=1), flat.shape[1]


def layer_depths(graph_module: fx.GraphModule) -> dict[str, int]:
    """Depth of each weight layer: 1 + the largest depth of the layers upstream of it."""
    depth_of_node: dict[fx.Node, int] = {}
    layer_depth: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        inputs: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), inputs.append)
        depth = max((depth_of_node[arg] for arg in inputs), default=0)
        if isinstance(module_of(graph_module, node), QuantLayer):
            depth += 1
            layer_depth[node.target] = depth
        depth_of_node[node] = depth
    return layer_depth


class _MeanRecorder:
    """Forward hooks that sum each watched layer's output per channel."""

    def __init__(self, layers: dict[str, QuantLayer], stop_after: str | None = None) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.handles = [
            layer.register_forward_hook(self._hook(name, name == stop_after))
            for name, layer in layers.items()
        ]

    def _hook(self, name: str, stop: bool):
        def record(module: QuantLayer, _inputs, output: Tensor) -> None:
            sums, count = _channel_sums(output, _channel_axis(module.layer))
            self.sums[name] = self.sums.get(name, 0) + sums
            self.counts[name] = self.counts.get(name, 0) + count
            if stop:
                raise _StopForwardError

        return record

    def means(self) -> dict[str, Tensor]:
        return {name: self.sums[name] / self.counts[name] for name in self.sums}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _run(model: fx.GraphModule, batches: Sequence[tuple[Tensor, ...]]) -> None:
    for inputs in batches:
        with contextlib.suppress(_StopForwardError):
            model(*inputs)


def calibrate_biases(
    model: fx.GraphModule, batches: Sequence[tuple[Tensor, ...]], progress: bool = True
) -> int:
    """Correct the bias of every conv/linear layer of a calibrated prepared model.

    Needs frozen ranges (every quantizer's exponent computed). Leaves all quantizers in
    observe mode afterwards. Returns the number of layers corrected.
    """
    layers = {
        node.target: module_of(model, node)
        for node in model.graph.nodes
        if isinstance(module_of(model, node), QuantLayer)
    }
    if not layers or not batches:
        return 0
    order = list(layers)
    with torch.no_grad():
        set_quant_mode(model, observe=False, quantize=False)
        recorder = _MeanRecorder(layers)
        try:
            _run(model, batches)
        finally:
            recorder.remove()
        float_means = recorder.means()
        set_quant_mode(model, observe=False, quantize=True)
        depths = layer_depths(model)
        levels = sorted(set(depths.values()))
        bar = tqdm(
            levels,
            desc="bias calibration",
            unit="level",
            leave=False,
            disable=None if progress else True,
        )
        for depth in bar:
            level = {name: layers[name] for name in order if depths[name] == depth}
            recorder = _MeanRecorder(level, stop_after=[n for n in order if n in level][-1])
            try:
                _run(model, batches)
            finally:
                recorder.remove()
            for name, quant_mean in recorder.means().items():
                _shift_bias(level[name].layer, float_means[name] - quant_mean)
    for _, quantizer in quantizers(model):
        quantizer.set_mode(observe=True, quantize=False)
    return len(layers)


def _shift_bias(layer: nn.Module, shift: Tensor) -> None:
    """Add `shift` to the layer's bias (creating a zero bias if the layer had none)."""
    shift = shift.to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros_like(shift), requires_grad=layer.weight.requires_grad)
    layer.bias.data += shift.to(layer.bias.device)
