"""Weight exponents chosen by the error they cause in the layer's output, on calibration data.

The weight-error search (`qmath.least_error_exponent`) treats every weight alike. A layer's
output error weighs each weight by the input it multiplies, and a channel by what it carries
after the fused ReLU: a channel that rarely fires (a near-dead one a BatchNorm scaled up) may
then be clipped to give every other channel of a per-tensor grid its bits back. Among the same
candidates (the never-clipping exponent and `WEIGHT_SEARCH_DEPTH` below it), each layer keeps
the one with the least squared output error over `SEARCH_SAMPLES` calibration samples, per
output channel for per-channel weights. Cost: one float pass, each layer run once per candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from quantfx.layers import FakeQuantLayer, layer_forward
from quantfx.observers import WeightMSEObserver
from quantfx.ops import FUSABLE_ACTIVATIONS
from quantfx.passes.graph_utils import input_quantizer, module_of
from quantfx.qmath import (
    WEIGHT_SEARCH_DEPTH,
    fake_quantize,
    fit_bias_exponent,
    never_clipping_exponent,
)
from quantfx.quantizers import quant_mode

SEARCH_SAMPLES = 16
"""Calibration samples the output errors are measured on."""
SEARCHED_BITS = 8
"""Wider weights keep the weight-error exponent: at 16 bit a step below the never-clipping
one buys nothing measurable, while the output search, which sees only calibration samples,
clipped channels those samples never fire and other images do (EfficientNet-Lite2, 16-bit
everything: 33.6 dB on held-apart photos against 56.4 dB never clipping)."""


def _fused_activation(model: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    users = list(node.users)
    module = module_of(model, users[0]) if len(users) == 1 else None
    return module if isinstance(module, FUSABLE_ACTIVATIONS) else None


class _LayerErrors:
    """Accumulates one layer's output error at every candidate exponent, per channel."""

    def __init__(self, layer: FakeQuantLayer, activation: nn.Module | None) -> None:
        self.layer, self.activation = layer, activation
        quantizer = layer.weight_quantizer
        no_clip = never_clipping_exponent(layer.layer.weight, quantizer.qmax, quantizer.axis)
        self.candidates = [no_clip - step for step in range(WEIGHT_SEARCH_DEPTH + 1)]
        self.errors = torch.zeros(len(self.candidates), no_clip.numel(), dtype=torch.float64)

    def _channel_sums(self, error: Tensor) -> Tensor:
        if self.layer.weight_quantizer.axis is None:
            return error.sum().reshape(1)
        channel_dim = error.dim() - 1 if isinstance(self.layer.layer, nn.Linear) else 1
        return error.transpose(0, channel_dim).reshape(error.shape[channel_dim], -1).sum(1)

    def __call__(self, _module: nn.Module, args: tuple, output: Tensor) -> None:
        layer, quantizer = self.layer.layer, self.layer.weight_quantizer
        act = self.activation if self.activation is not None else (lambda value: value)
        target = act(output)
        for index, exponent in enumerate(self.candidates):
            weight = fake_quantize(layer.weight, exponent, quantizer.qmin, quantizer.qmax,
                                   quantizer.axis)
            error = (act(layer_forward(layer, args[0], weight, layer.bias)) - target).pow(2)
            self.errors[index] += self._channel_sums(error.double()).cpu()

    def best(self) -> Tensor:
        """The candidate with the least error (per channel); ties keep the larger exponent."""
        stacked = torch.stack([c.reshape(-1) for c in self.candidates])
        choice = torch.argmin(self.errors, dim=0)  # first minimum: the larger exponent
        picked = stacked.gather(0, choice.to(stacked.device).unsqueeze(0)).squeeze(0)
        return picked.reshape(self.candidates[0].shape)


def choose_weight_exponents(model: fx.GraphModule,
                            batches: Sequence[tuple[Tensor, ...]]) -> int:
    """Fix every MSE-observed weight quantizer's exponent by output error on the first
    `SEARCH_SAMPLES` samples of `batches` (float pass, exponents of activations untouched).
    Returns the number of layers searched."""
    searches: dict[FakeQuantLayer, _LayerErrors] = {}
    for node in model.graph.nodes:
        layer = module_of(model, node)
        if isinstance(layer, FakeQuantLayer) and isinstance(
                layer.weight_quantizer.observer, WeightMSEObserver) and (
                layer.weight_quantizer.bits <= SEARCHED_BITS):
            layer.weight_quantizer.observer.choose(None)
            searches[layer] = _LayerErrors(layer, _fused_activation(model, node))
    if not searches or not batches:
        return 0
    handles = [layer.register_forward_hook(search) for layer, search in searches.items()]
    try:
        with torch.no_grad(), quant_mode(model, observe=False, quantize=False):
            seen = 0
            for inputs in batches:
                if seen >= SEARCH_SAMPLES:
                    break
                model(*(tensor[:SEARCH_SAMPLES - seen] for tensor in inputs))
                seen += min(inputs[0].shape[0], SEARCH_SAMPLES - seen)
    finally:
        for handle in handles:
            handle.remove()
    for layer, search in searches.items():
        if bool(search.errors.sum() > 0):
            layer.weight_quantizer.observer.choose(search.best())
            layer.weight_quantizer.compute_exponent()
    return len(searches)


def fit_bias_exponents(model: fx.GraphModule, bias_bits_for: Callable[[int], int]) -> list[str]:
    """Raise each weight exponent where the layer's bias would not fit the engine's bias width
    at input x weight scale (TDA4VM keeps the biases of 8-bit layers in 16 bit), as `convert`
    and the device will: calibration's later steps (measured mixed precision, bias
    calibration) then see the arithmetic the file computes. Returns the raised layers."""
    raised = []
    for node in model.graph.nodes:
        layer = module_of(model, node)
        quantizer = layer.weight_quantizer if isinstance(layer, FakeQuantLayer) else None
        bias_bits = bias_bits_for(quantizer.bits) if quantizer is not None else 32
        source = input_quantizer(model, node) if bias_bits < 32 else None
        if source is None or not getattr(source, "observed", True) or not quantizer.observed:
            continue
        fitted = fit_bias_exponent(quantizer.exponent, source.exponent, layer.layer.bias,
                                   bias_bits)
        if bool((fitted != quantizer.exponent).any()):
            quantizer.exponent.copy_(fitted)
            raised.append(str(node.target))
    return raised
