"""Layer-wise reconstruction in one pass: every conv/linear layer, in graph order, sees its
*quantized* input (all layers before it already reconstructed) and its *float* output, without
re-running the model from its input for each layer.

Two streams run node by node over the kept samples: the float model and the quantized one.
At a weight layer the float stream gives the target, the quantized stream the input, and a
`LayerStep` (learned rounding, bias correction) changes the layer before the quantized stream
runs it. A value is dropped as soon as its last user has run in both streams, so memory is the
live activations of the kept samples, twice; the sample budget (`samples_within`) bounds it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantfx.inputs import first_samples
from quantfx.layers import FakeQuantLayer, layer_forward, takes_bias_corrections
from quantfx.ops import FUSABLE_ACTIVATIONS
from quantfx.passes.graph_utils import module_of
from quantfx.quantizers import set_quant_mode


def memory_limit(device: torch.device | None = None) -> int:
    """How much a layer-by-layer runner may keep alive: a quarter of the free memory of a CUDA
    `device` (the samples live where the model runs), else a quarter of physical memory."""
    if device is not None and device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        return free_bytes // 4
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 << 30


def nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(nbytes(item) for item in value)
    if isinstance(value, dict):
        return sum(nbytes(item) for item in value.values())
    return 0


LayerStep = Callable[[FakeQuantLayer, Tensor, Tensor, "nn.Module | None"], Any]
"""(layer, quantized input, float output before its fused activation, that activation or None)
-> anything to report; changes the layer in place."""


def fused_activation(model: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The ReLU/ReLU6/clip the engine runs inside layer `node`, if it is the layer's only user."""
    users = list(node.users)
    module = module_of(model, users[0]) if len(users) == 1 else None
    return module if isinstance(module, FUSABLE_ACTIVATIONS) else None


def run_node(interpreter: fx.Interpreter, node: fx.Node, environment: dict[fx.Node, Any],
             inputs: tuple[Tensor, ...], position: dict[fx.Node, int]) -> Any:
    """`node`'s value from the values in `environment` (a placeholder: its model input, found
    by its `position` among the placeholders, or its default)."""
    if node.op == "placeholder":
        index = position[node]
        if str(node.target).startswith("*"):  # forward(self, *inputs)
            return tuple(inputs[index:])
        return inputs[index] if index < len(inputs) else node.args[0]
    interpreter.env = environment
    args, kwargs = interpreter.fetch_args_kwargs_from_env(node)
    return getattr(interpreter, node.op)(node.target, args, kwargs)


class _Streams:
    """The float and the quantized model, run one node at a time over the same samples."""

    def __init__(self, model: fx.GraphModule, inputs: tuple[Tensor, ...]) -> None:
        self.model = model
        self.inputs = inputs
        self.interpreter = fx.Interpreter(model)
        self.environments: dict[bool, dict[fx.Node, Any]] = {False: {}, True: {}}
        self.pending = {node: len(node.users) for node in model.graph.nodes}
        placeholders = [node for node in model.graph.nodes if node.op == "placeholder"]
        self.position = {node: index for index, node in enumerate(placeholders)}

    def run(self, node: fx.Node, quantized: bool) -> Any:
        """`node`'s value in one stream (its inputs taken from that stream)."""
        module = module_of(self.model, node)
        if module is not None:
            set_quant_mode(module, observe=False, quantize=quantized)
        return run_node(self.interpreter, node, self.environments[quantized], self.inputs,
                        self.position)

    def store(self, node: fx.Node, float_value: Any, quantized_value: Any) -> None:
        """Keep `node`'s values while users need them; release inputs no one needs any more."""
        if self.pending[node]:
            self.environments[False][node] = float_value
            self.environments[True][node] = quantized_value
        sources: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), sources.append)
        for source in set(sources):
            self.pending[source] -= 1
            if self.pending[source] == 0:
                for environment in self.environments.values():
                    environment.pop(source, None)

    def quantized_input(self, node: fx.Node) -> Tensor:
        return self.environments[True][node.args[0]]


def concatenated(batches: Sequence[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """The kept batches as one batch (each model input concatenated along dim 0)."""
    return tuple(torch.cat(parts) for parts in zip(*batches))


def reconstruct_layers(model: fx.GraphModule, batches: Sequence[tuple[Tensor, ...]],
                       step: LayerStep, progress: bool = True,
                       description: str = "reconstruction") -> dict[str, Any]:
    """Apply `step` to every weight layer of a calibrated prepared model (exponents computed),
    in graph order, in one pass over `batches`. Returns layer name -> what `step` returned.
    Leaves every quantizer observing (not quantizing), as calibration expects."""
    if not batches:
        return {}
    streams = _Streams(model, concatenated(samples_within(
        model, batches, memory_limit(batches[0][0].device))))
    nodes = [node for node in model.graph.nodes if node.op != "output"]
    layers = [node for node in nodes if isinstance(module_of(model, node), FakeQuantLayer)]
    results: dict[str, Any] = {}
    try:
        with torch.no_grad(), tqdm(total=len(layers), desc=description, unit="layer",
                                   leave=False, disable=None if progress else True) as bar:
            for node in nodes:
                float_value = streams.run(node, quantized=False)
                module = module_of(model, node)
                if isinstance(module, FakeQuantLayer):
                    results[str(node.target)] = step(module, streams.quantized_input(node),
                                                     float_value, fused_activation(model, node))
                    bar.update(1)
                streams.store(node, float_value, streams.run(node, quantized=True))
    finally:
        set_quant_mode(model, observe=True, quantize=False)
    return results


def round_weights(model: fx.GraphModule, batches: Sequence[tuple[Tensor, ...]],
                  round_layer: LayerStep, bias_samples: int, progress: bool,
                  description: str) -> dict[str, Any]:
    """A weight-rounding pass (learned rounding, error feedback): each layer keeps its float
    weights (so a new calibration starts from them), is rounded by `round_layer`, then, where
    `bias_samples` > 0, gets bias calibration's shift measured on that many of the first
    samples, all in one `reconstruct_layers` pass."""

    def step(layer: FakeQuantLayer, inputs: Tensor, target: Tensor,
             activation: nn.Module | None) -> Any:
        if layer.float_weight is None:
            layer.float_weight = layer.layer.weight.detach().clone()
        result = round_layer(layer, inputs, target, activation)
        if bias_samples > 0:
            correct_bias(layer, inputs[:bias_samples], target[:bias_samples])
        return result

    return reconstruct_layers(model, batches, step, progress, description)


def layer_output_error(layer: FakeQuantLayer, inputs: Tensor, target: Tensor, weight: Tensor,
                       activation: Callable[[Tensor], Tensor] | None = None) -> float:
    """Mean squared error of `layer` with `weight` on `inputs` against float output `target`,
    both after the fused `activation` (what it clips away does not count)."""
    activation = activation or (lambda value: value)
    with torch.no_grad():
        output = activation(layer_forward(layer.layer, inputs, weight, layer.layer.bias))
        return float((output - activation(target)).double().pow(2).mean())


def correct_bias(layer: FakeQuantLayer, inputs: Tensor, target: Tensor) -> None:
    """Bias calibration for one layer: shift its bias by the per-channel mean of float output
    `target` minus its quantized output on `inputs` (the quantized stream's input)."""
    if not takes_bias_corrections(layer.layer):
        return
    set_quant_mode(layer, observe=False, quantize=True)
    output = layer(inputs)
    axis = output.dim() - 1 if isinstance(layer.layer, nn.Linear) else 1
    dims = [dim for dim in range(output.dim()) if dim != axis]
    shift = (target.double().mean(dims) - output.double().mean(dims)).to(output.dtype)
    if layer.layer.bias is None:
        layer.layer.bias = nn.Parameter(torch.zeros_like(shift),
                                        requires_grad=layer.layer.weight.requires_grad)
    layer.layer.bias.data += shift


def samples_within(model: fx.GraphModule, batches: Sequence[tuple[Tensor, ...]],
                   limit_bytes: int) -> list[tuple[Tensor, ...]]:
    """The first of `batches`' samples whose live values in both streams fit `limit_bytes`,
    measured by running one sample through the float stream (at least one sample)."""
    probe = _Streams(model, tuple(tensor[:1] for tensor in batches[0]))
    peak = 0
    with torch.no_grad():
        for node in model.graph.nodes:
            if node.op == "output":
                break
            value = probe.run(node, quantized=False)
            probe.store(node, value, value)
            peak = max(peak, nbytes(list(probe.environments[False].values())))
    set_quant_mode(model, observe=True, quantize=False)
    return first_samples(batches, max(1, limit_bytes // max(2 * peak, 1)))
