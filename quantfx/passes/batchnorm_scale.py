"""A BatchNorm that cannot fold backwards (it follows a ReLU) hands its scale to the layer
before the ReLU, so that what stays of it is a shift and a sign.

`bn(relu(layer(x)))` with per-channel scale a = gamma / sqrt(var + eps) equals
`bn'(relu(k * layer(x)))` for k = |a| > 0, where bn' has scale sign(a): ReLU (and the other
positive-homogeneous ops between) commute with a positive per-channel factor. Three things
follow for a per-tensor power-of-2 engine (Keras-style nets, raw 0..255 inputs):

- the layer's output channels, which such nets leave with ranges apart by orders of magnitude,
  come out normalized, so one activation scale fits them all;
- what is left of the BatchNorm has weights of +-1, which every power-of-2 grid holds exactly;
- folding it forward into the next conv/linear leaves that layer's weights as they were.

Where the layer's weights share one scale (per-tensor), a near-dead channel's large factor
would stretch that grid: the factor is capped at `SPREAD` x the median channel's weight range,
and the rest of the scale stays in the BatchNorm (the Keras-style CNN of `benchmarks/`:
0.9 dB -> 30.1 dB output SQNR in the default config).

A channel whose variance is below `DEAD_VARIANCE` x eps is constant on the data the statistics
came from (a dead ReLU): its scale is set to sign(a) as well, exact at that constant (its
running mean), since a scale of 1/sqrt(eps) would otherwise set every other channel's grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn

from quantfx.layers import BatchNormLayer
from quantfx.ops import BATCHNORMS, POSITIVE_HOMOGENEOUS, SCALE_COMMUTING
from quantfx.passes.graph_utils import module_of

DEAD_VARIANCE = 1e-3
SPREAD = 2.0
"""Where the layer's weights share one scale: the largest channel range absorption may create,
relative to the median channel's."""
"""A channel with running_var below this fraction of eps is a constant (dead) channel."""


def _scalable_layer(graph_module: fx.GraphModule, bn_node: fx.Node) -> nn.Module | None:
    """The conv/linear whose output channels feed `bn_node` through one positive-homogeneous
    activation and scale-commuting ops only, each used by nothing else; or None."""
    node, activation_seen = bn_node.args[0] if bn_node.args else None, False
    while isinstance(node, fx.Node) and node.op == "call_module" and len(node.users) == 1:
        module = module_of(graph_module, node)
        if isinstance(module, POSITIVE_HOMOGENEOUS) and not activation_seen:
            activation_seen = True
        elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            usable = activation_seen and not isinstance(module, BatchNormLayer) and (
                not getattr(module, "transposed", False) or module.groups == 1)
            return module if usable else None
        elif not isinstance(module, SCALE_COMMUTING):
            return None
        node = node.args[0] if node.args else None
    return None


def _output_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _scale_outputs(layer: nn.Module, factor: torch.Tensor) -> None:
    """Multiply `layer`'s output channel i by factor[i] (weights and bias)."""
    transposed = getattr(layer, "transposed", False)
    shape = [1, -1] if transposed else [-1, 1]
    shape += [1] * (layer.weight.dim() - 2)
    with torch.no_grad():
        layer.weight.mul_(factor.reshape(shape).to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.mul_(factor.to(layer.bias.dtype))


def _balanced_cap(layer: nn.Module, factor: torch.Tensor, movable: torch.Tensor
                  ) -> torch.Tensor:
    """Per-channel limits on `factor` that keep a per-tensor weight grid balanced: no channel's
    scaled weight range above `SPREAD` x the median channel's (the rest of a near-dead
    channel's large BatchNorm scale stays in the BatchNorm)."""
    ranges = layer.weight.detach().double().abs()
    ranges = ranges.transpose(0, 1) if getattr(layer, "transposed", False) else ranges
    ranges = ranges.flatten(1).amax(dim=1)
    scaled = ranges * factor
    live = movable & (scaled > 0)
    if not bool(live.any()):
        return torch.full_like(factor, math.inf)
    limit = SPREAD * scaled[live].median()
    return torch.where(ranges > 0, limit / ranges.clamp_min(1e-30), factor)


def absorb_batchnorm_scales(graph_module: fx.GraphModule,
                            per_channel: Callable[[nn.Module], bool] = lambda layer: True
                            ) -> int:
    """Move each post-ReLU BatchNorm's per-channel scale magnitude into the layer before the
    ReLU, and set dead channels' scales to +-1 (see the module docstring). Returns how many
    BatchNorms changed. The float function is unchanged (dead channels: at their mean)."""
    count = 0
    for node in graph_module.graph.nodes:
        bn = module_of(graph_module, node)
        if not isinstance(bn, BATCHNORMS) or not bn.track_running_stats or (
                bn.running_mean is None):
            continue
        layer = _scalable_layer(graph_module, node)
        if layer is not None and _output_channels(layer) != bn.num_features:
            layer = None
        with torch.no_grad():
            spread = torch.sqrt(bn.running_var.double() + bn.eps)
            gamma = (bn.weight.double() if bn.weight is not None
                     else torch.ones_like(spread))
            magnitude = gamma.abs() / spread
            dead = bn.running_var.double() < DEAD_VARIANCE * bn.eps
            movable = (magnitude > 0) & ~dead
            if layer is None and not bool(dead.any()):
                continue
            factor = torch.ones_like(magnitude)
            if layer is not None:
                factor = torch.where(movable, magnitude, factor)
                if not per_channel(layer):
                    factor = torch.minimum(factor, _balanced_cap(layer, factor, movable))
                _scale_outputs(layer, factor)
                bn.running_mean.mul_(factor.to(bn.running_mean.dtype))
            new_gamma = torch.where(dead & (gamma != 0), torch.sign(gamma) * spread,
                                    gamma / factor)
            if bn.weight is None:
                bn.weight = nn.Parameter(torch.ones_like(bn.running_mean), requires_grad=False)
            bn.weight.copy_(new_gamma.to(bn.weight.dtype))
        count += 1
    return count
