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

Cost: per layer, two partial forward passes over the kept samples and `ITERATIONS` optimizer
steps on one layer (`python -m benchmarks hard_cases` reports the time).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantfx.layers import FakeQuantLayer, layer_forward
from quantfx.ops import FUSABLE_ACTIVATIONS
from quantfx.passes.graph_utils import module_of
from quantfx.qmath import from_codes
from quantfx.quantizers import set_quant_mode

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


class _CapturedError(Exception):
    """Raised by the hook once the layer of interest has run."""


def _layer_io(model: fx.GraphModule, name: str, batches: Sequence[tuple[Tensor, ...]],
              quantize: bool) -> tuple[Tensor, Tensor]:
    """The input and output of layer `name` over `batches`, with the model quantized or not."""
    layer = model.get_submodule(name)
    inputs, outputs = [], []

    def hook(module: FakeQuantLayer, args: tuple, output: Tensor) -> None:
        inputs.append(args[0].detach())
        outputs.append(output.detach())
        raise _CapturedError

    set_quant_mode(model, observe=False, quantize=quantize)
    handle = layer.register_forward_hook(hook)
    try:
        for batch in batches:
            with contextlib.suppress(_CapturedError):
                model(*batch)
    finally:
        handle.remove()
    return torch.cat(inputs), torch.cat(outputs)


def _rectified_sigmoid(variable: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(variable) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _output_error(layer: FakeQuantLayer, inputs: Tensor, target: Tensor, weight: Tensor,
                  activation: Callable[[Tensor], Tensor]) -> float:
    with torch.no_grad():
        output = activation(layer_forward(layer.layer, inputs, weight, layer.layer.bias))
        return float((output - target).double().pow(2).mean())


def _identity(x: Tensor) -> Tensor:
    return x


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
            pick = torch.randint(0, len(inputs), (min(STEP_BATCH, len(inputs)),),
                                 generator=generator)
            soft = _rectified_sigmoid(variable)
            candidate = torch.clamp(floor + soft, quantizer.qmin, quantizer.qmax) * scale
            output = activation(layer_forward(layer.layer, inputs[pick], candidate,
                                              layer.layer.bias))
            loss = (output - target[pick]).pow(2).mean() / power
            if step >= warmup:
                progress = (step - warmup) / max(iterations - warmup, 1)
                beta = BETA[1] + (BETA[0] - BETA[1]) * (1.0 - progress)
                loss = loss + REGULARIZATION * (1.0 - (2.0 * soft - 1.0).abs().pow(beta)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        learned = torch.clamp(floor + (_rectified_sigmoid(variable) >= 0.5).to(floor.dtype),
                              quantizer.qmin, quantizer.qmax) * scale
    nearest_error = _output_error(layer, inputs, target, nearest, activation)
    learned_error = _output_error(layer, inputs, target, learned, activation)
    chosen = learned if learned_error < nearest_error else nearest
    layer.layer.weight.data.copy_(chosen)
    return nearest_error, min(learned_error, nearest_error)


@contextlib.contextmanager
def _float_weights(model: fx.GraphModule) -> Iterator[None]:
    """Every layer with its float weight for a while (the learned ones put back after)."""
    swapped = [(module, module.layer.weight.detach().clone()) for module in model.modules()
               if isinstance(module, FakeQuantLayer) and module.float_weight is not None]
    for module, _ in swapped:
        module.layer.weight.data.copy_(module.float_weight)
    try:
        yield
    finally:
        for module, learned in swapped:
            module.layer.weight.data.copy_(learned)


def restore_float_parameters(model: nn.Module) -> None:
    """Undo an earlier calibration: every layer back to its float weights (learned rounding)
    and float biases (bias calibration)."""
    for module in model.modules():
        if isinstance(module, FakeQuantLayer):
            if module.float_weight is not None:
                module.layer.weight.data.copy_(module.float_weight)
            if module.float_bias is not None and module.layer.bias is not None:
                module.layer.bias.data.copy_(module.float_bias)


def learn_rounding(model: fx.GraphModule, batches: Sequence[tuple[Tensor, ...]],
                   progress: bool = True, iterations: int | None = None) -> dict[str, tuple]:
    """Learned rounding for every weight layer of a calibrated prepared model, in graph order
    (exponents must be computed). Returns layer name -> (nearest MSE, kept MSE)."""
    kept, count = [], 0
    for batch in batches:
        if count >= MAX_SAMPLES:
            break
        kept.append(tuple(tensor[:MAX_SAMPLES - count] for tensor in batch))
        count += len(kept[-1][0])
    nodes = {node.target: node for node in model.graph.nodes
             if isinstance(module_of(model, node), FakeQuantLayer)}
    errors = {}
    with torch.no_grad():
        for name in tqdm(list(nodes), desc="learned rounding", unit="layer", leave=False,
                         disable=None if progress else True):
            layer = model.get_submodule(name)
            if layer.float_weight is None:
                layer.float_weight = layer.layer.weight.detach().clone()
            with _float_weights(model):  # the target is the float model's, not one with
                _, target = _layer_io(model, name, kept, quantize=False)  # rounded weights
            inputs, _ = _layer_io(model, name, kept, quantize=True)
            user = next(iter(nodes[name].users)) if len(nodes[name].users) == 1 else None
            fused = module_of(model, user) if user is not None else None
            errors[name] = learn_layer_rounding(
                layer, inputs, target, ITERATIONS if iterations is None else iterations,
                activation=fused if isinstance(fused, FUSABLE_ACTIVATIONS) else None)
    set_quant_mode(model, observe=True, quantize=False)
    return errors
