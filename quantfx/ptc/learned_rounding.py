"""Weight rounding chosen by output error instead of to-nearest (AdaRound, Nagel et al. 2020),
on quantfx's power-of-2 grids.

After calibration has fixed every exponent, each conv/linear layer in graph order learns, for
every weight, whether to round down or up: a continuous relaxation h(V) in [0, 1] of the
rounding offset is trained by Adam to make the layer's output on its *quantized* input (every
layer before it already quantized and rounded; after its fused ReLU/ReLU6, whose clipped part
does not count) match the float model's output, with a
regularizer that drives each h to 0 or 1. The weights are then set to the chosen grid values
(so round-to-nearest at the same exponent reproduces them: convert, export and QAT need nothing
new). A layer keeps round-to-nearest when the learned rounding does not lower its output error
on the calibration data. The original float weights are kept (`float_weight`, not in
`state_dict`) so that calibrating again starts from them.

Cost: one pass of the float and the quantized model over the kept samples
(`quantfx.ptc.reconstruction`) and, per layer, `ITERATIONS` optimizer steps on STEP_BATCH samples
(a TILE x TILE output tile of each on 2-D convolutions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.fx as fx
from torch import Tensor, nn

from quantfx.inputs import first_samples
from quantfx.layers import FakeQuantLayer, layer_forward
from quantfx.ptc.reconstruction import layer_output_error, round_weights
from quantfx.qmath import from_codes

ITERATIONS = 500
"""Optimizer steps per layer."""
LEARNING_RATE = 1e-2
REGULARIZATION = 0.1
"""Weight of the term that pushes each rounding variable to 0 or 1 (AdaRound's lambda; here
against the output error relative to the output's power, and the term's mean over weights)."""
WARMUP = 0.2
"""Share of the steps before the regularizer starts (reconstruction only)."""
BETA = (20.0, 2.0)
"""Annealing of the regularizer's exponent: flat (any h) first, sharp (0 or 1) at the end."""
ZETA, GAMMA = 1.1, -0.1
"""The rectified sigmoid's stretch: h = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)."""
MAX_SAMPLES = 256
"""Kept samples a layer learns from (the first of the calibration batches)."""
STEP_BATCH = 32
"""Samples per optimizer step."""
DECIDED_CHECK = 25
"""Steps between checks whether every rounding variable is decided (then the layer stops)."""
TILE = 8
"""Output rows and columns per sample in a step of a 2-D convolution: a random tile of the
output and the input window it reads (the full map costs up to ~200x more on early layers, and the
rounding variables see every position over the steps anyway)."""


def _decided(soft: Tensor) -> bool:
    """Whether every relaxed rounding variable has reached 0 or 1 (the clamped ends)."""
    detached = soft.detach()
    return not bool(((detached > 0.0) & (detached < 1.0)).any())


def _rectified_sigmoid(variable: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(variable) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _identity(x: Tensor) -> Tensor:
    return x


def _tile_conv(layer: nn.Module) -> bool:
    """A 2-D convolution a step may run on output tiles (numeric zero padding, not transposed)."""
    return (isinstance(layer, nn.Conv2d) and not isinstance(layer.padding, str)
            and layer.padding_mode == "zeros")


def _window(start: int, span: int, size: int, tensor: Tensor, dim: int) -> tuple[Tensor, tuple]:
    """Rows [start, start + span) of `tensor` along `dim`, zero where they fall outside it."""
    low, high = max(start, 0), min(start + span, size)
    return tensor.narrow(dim, low, high - low), (low - start, start + span - high)


def step_sample(layer: nn.Module, inputs: Tensor, target: Tensor, generator: torch.Generator
                ) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
    """Up to STEP_BATCH samples for one optimizer step: (input, target, forward(weight)) --
    on a 2-D convolution a random TILE x TILE output tile and the input window behind it."""
    pick = torch.randint(0, len(inputs), (min(STEP_BATCH, len(inputs)),), generator=generator)
    if not _tile_conv(layer) or target.dim() != 4 or max(target.shape[-2:]) <= TILE:
        inputs, target = inputs[pick], target[pick]
        return inputs, target, lambda weight: layer_forward(layer, inputs, weight, layer.bias)
    pads: list[int] = []
    for axis in (0, 1):
        size = min(TILE, target.shape[2 + axis])
        corner = int(torch.randint(0, target.shape[2 + axis] - size + 1, (1,),
                                   generator=generator))
        span = (size - 1) * layer.stride[axis] + layer.dilation[axis] * (layer.kernel_size[axis]
                                                                        - 1) + 1
        inputs, pad = _window(corner * layer.stride[axis] - layer.padding[axis], span,
                              inputs.shape[2 + axis], inputs, 2 + axis)
        target = target.narrow(2 + axis, corner, size)
        pads = list(pad) + pads  # F.pad takes the last dimension first
    window, target = torch.nn.functional.pad(inputs[pick], pads), target[pick]  # views until here

    def forward(weight: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(window, weight, layer.bias, layer.stride, 0,
                                          layer.dilation, layer.groups)
    return window, target, forward


def learn_layer_rounding(layer: FakeQuantLayer, inputs: Tensor, target: Tensor,
                         iterations: int = ITERATIONS, seed: int = 0,
                         activation: Callable[[Tensor], Tensor] | None = None
                         ) -> tuple[float, float]:
    """Choose the rounding of `layer`'s weights that makes its output on `inputs` (after the
    `activation` fused into it, if any: errors it clips away do not count) closest to `target`
    (its float output, before that activation); set the weights to those grid values. Returns
    the output MSE with round-to-nearest and with the rounding kept (never larger)."""
    activation = activation or _identity
    target = activation(target)
    quantizer = layer.weight_quantizer
    weight = layer.layer.weight.detach()
    scale = from_codes(torch.ones_like(weight), quantizer.exponent, quantizer.axis)
    nearest = torch.clamp(torch.round(weight / scale), quantizer.qmin, quantizer.qmax) * scale
    floor = torch.floor(weight / scale)
    rest = (weight / scale - floor).clamp(0.01, 0.99)
    variable = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)).requires_grad_(True)
    optimizer = torch.optim.Adam([variable], lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(seed)
    warmup = int(WARMUP * iterations)
    power = target.double().pow(2).mean().clamp_min(1e-30).float()
    with torch.enable_grad():
        for step in range(iterations):
            _, step_target, forward = step_sample(layer.layer, inputs, target, generator)
            soft = _rectified_sigmoid(variable)
            candidate = torch.clamp(floor + soft, quantizer.qmin, quantizer.qmax) * scale
            output = activation(forward(candidate))
            loss = (output - step_target).pow(2).mean() / power
            if step >= warmup:
                if step % DECIDED_CHECK == 0 and _decided(soft):
                    break  # every h sits at 0 or 1, where its gradient is 0: nothing moves
                progress = (step - warmup) / max(iterations - warmup, 1)
                beta = BETA[1] + (BETA[0] - BETA[1]) * (1.0 - progress)
                loss = loss + REGULARIZATION * (1.0 - (2.0 * soft - 1.0).abs().pow(beta)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        learned = torch.clamp(floor + (_rectified_sigmoid(variable) >= 0.5).to(floor.dtype),
                              quantizer.qmin, quantizer.qmax) * scale
    nearest_error = layer_output_error(layer, inputs, target, nearest, activation)
    learned_error = layer_output_error(layer, inputs, target, learned, activation)
    chosen = learned if learned_error < nearest_error else nearest
    layer.layer.weight.data.copy_(chosen)
    return nearest_error, min(learned_error, nearest_error)


def restore_float_parameters(model: nn.Module) -> None:
    """Undo an earlier calibration: every layer back to its float weights (learned rounding)
    and float biases (bias calibration)."""
    for module in model.modules():
        if isinstance(module, FakeQuantLayer):
            if module.float_weight is not None:
                module.layer.weight.data.copy_(module.float_weight)
            if module.float_bias is not None and module.layer.bias is not None:
                module.layer.bias.data.copy_(module.float_bias)


@contextmanager
def float_parameters(model: nn.Module) -> Iterator[None]:
    """Inside the block, every layer of calibrated `model` has its float weights and biases
    (before weight rounding and bias calibration: what "float" means for a layer's error);
    after it, the calibrated ones again."""
    kept = [(module, module.layer.weight.detach().clone(),
             None if module.layer.bias is None else module.layer.bias.detach().clone())
            for module in model.modules() if isinstance(module, FakeQuantLayer)]
    restore_float_parameters(model)
    try:
        yield
    finally:
        with torch.no_grad():
            for module, weight, bias in kept:
                module.layer.weight.copy_(weight)
                if bias is not None:
                    module.layer.bias.copy_(bias)


def learn_rounding(model: fx.GraphModule, batches: Sequence[tuple[Tensor, ...]],
                   progress: bool = True, iterations: int | None = None,
                   bias_samples: int = 0) -> dict[str, tuple]:
    """Learned rounding for every weight layer of a calibrated prepared model, in graph order,
    in one pass (`quantfx.ptc.reconstruction`; exponents must be computed). With `bias_samples`
    > 0, each layer's bias then gets bias calibration's shift, from that many of the first
    samples (at most MAX_SAMPLES), in the same pass. Returns layer name -> (nearest MSE, kept
    MSE)."""
    steps = ITERATIONS if iterations is None else iterations

    def round_layer(layer: FakeQuantLayer, inputs: Tensor, target: Tensor,
                    activation: nn.Module | None) -> tuple[float, float]:
        return learn_layer_rounding(layer, inputs, target, steps, activation=activation)

    return round_weights(model, first_samples(batches, MAX_SAMPLES), round_layer,
                         bias_samples, progress, "learned rounding")
