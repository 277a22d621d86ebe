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
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantfx.layers import FakeQuantLayer, takes_bias_corrections
from quantfx.passes.graph_utils import module_of
from quantfx.ptc.reconstruction import memory_limit, nbytes, run_node
from quantfx.quantizers import set_quant_mode


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
        if isinstance(module_of(graph_module, node), FakeQuantLayer):
            depth += 1
            layer_depth[node.target] = depth
        depth_of_node[node] = depth
    return layer_depth


class _MeanRecorder:
    """Forward hooks that sum each watched layer's output per channel."""

    def __init__(self, layers: dict[str, FakeQuantLayer], stop_after: str | None = None) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.handles = [
            layer.register_forward_hook(self._hook(name, name == stop_after))
            for name, layer in layers.items()
        ]

    def _hook(self, name: str, stop: bool):
        def record(module: FakeQuantLayer, _inputs, output: Tensor) -> None:
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


class _MemoryLimitError(Exception):
    """The live activations of all calibration batches outgrew the runner's memory limit."""


class _LevelRunner:
    """Runs the graph one layer depth at a time over all batches, keeping each batch's live
    values between levels, so every node runs once (each layer twice: measured, then re-run
    with its corrected bias) instead of re-running the prefix of the graph for every depth.

    A node runs at level d when it is a layer of depth d or a non-layer node downstream of
    nothing deeper than d - 1: it then sees every correction above it, exactly as a full
    forward pass after those corrections would. Values are dropped once their last user has
    run for good; `_MemoryLimitError` is raised when the kept values pass `limit_bytes`.
    """

    def __init__(self, model: fx.GraphModule, batches: Sequence[tuple[Tensor, ...]],
                 layer_depth: dict[str, int], limit_bytes: int) -> None:
        self.model = model
        self.limit_bytes = limit_bytes
        self.nodes = [node for node in model.graph.nodes if node.op != "output"]
        self.layer_depth = {node: layer_depth[node.target] for node in self.nodes
                            if node.op == "call_module" and node.target in layer_depth}
        self.node_depth: dict[fx.Node, int] = {}
        for node in self.nodes:
            inputs: list[fx.Node] = []
            fx.node.map_arg((node.args, node.kwargs), inputs.append)
            upstream = max((self.node_depth[arg] for arg in inputs), default=0)
            self.node_depth[node] = self.layer_depth.get(node, upstream)
        self.pending_users = {node: len(node.users) for node in self.nodes}
        placeholders = [node for node in self.nodes if node.op == "placeholder"]
        self.input_position = {node: index for index, node in enumerate(placeholders)}
        self.done: set[fx.Node] = set()
        self.environments: list[dict[fx.Node, Any]] = [{} for _ in batches]
        self.batches = batches
        self.interpreter = fx.Interpreter(model)
        self.live_bytes = 0

    def _execute(self, node: fx.Node, environment: dict[fx.Node, Any],
                 inputs: tuple[Tensor, ...]) -> Any:
        return run_node(self.interpreter, node, environment, inputs, self.input_position)

    def _store(self, node: fx.Node, index: int, value: Any) -> None:
        environment = self.environments[index]
        self.live_bytes += nbytes(value) - nbytes(environment.get(node))
        environment[node] = value
        if self.live_bytes > self.limit_bytes:
            raise _MemoryLimitError

    def _finish(self, node: fx.Node) -> None:
        """`node` ran for good: release inputs no other pending node needs."""
        self.done.add(node)
        inputs: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), inputs.append)
        for source in set(inputs):
            self.pending_users[source] -= 1
            if self.pending_users[source] == 0:
                for environment in self.environments:
                    self.live_bytes -= nbytes(environment.pop(source, None))

    def measure(self, depth: int) -> None:
        """Run every node that level `depth` makes ready (the layers of that depth included,
        which fire the mean-recording hooks)."""
        ready = [node for node in self.nodes if node not in self.done and (
            self.layer_depth.get(node) == depth
            or (node not in self.layer_depth and self.node_depth[node] < depth))]
        for index, inputs in enumerate(self.batches):
            environment = self.environments[index]
            for node in ready:
                self._store(node, index, self._execute(node, environment, inputs))
        for node in ready:
            if node not in self.layer_depth:
                self._finish(node)

    def rerun_layers(self, depth: int) -> None:
        """Recompute the layers of `depth` with their corrected biases."""
        layers = [node for node, level in self.layer_depth.items() if level == depth]
        for index, inputs in enumerate(self.batches):
            environment = self.environments[index]
            for node in layers:
                self._store(node, index, self._execute(node, environment, inputs))
        for node in layers:
            self._finish(node)

    def release(self) -> None:
        self.environments = [{} for _ in self.batches]
        self.interpreter.env = {}
        self.live_bytes = 0


def calibrate_biases(
    model: fx.GraphModule, batches: Sequence[tuple[Tensor, ...]], progress: bool = True,
    memory_limit_bytes: int | None = None,
) -> int:
    """Correct the bias of every conv/linear layer of a calibrated prepared model.

    Needs frozen ranges (every quantizer's exponent computed). Leaves all quantizers in
    observe mode afterwards. Returns the number of layers corrected. Depth by depth, each node
    runs once while the live activations of all batches fit in `memory_limit_bytes` (default:
    a quarter of the free memory where the batches live); past that, each depth re-runs the
    graph from its inputs.
    """
    layers = {
        node.target: module_of(model, node)
        for node in model.graph.nodes
        if isinstance(module_of(model, node), FakeQuantLayer)
    }
    if not layers or not batches:
        return 0
    limit = (memory_limit(batches[0][0].device) if memory_limit_bytes is None
             else memory_limit_bytes)
    with torch.no_grad():
        for layer in layers.values():  # every calibration starts from the float biases
            if layer.float_bias is not None:
                layer.layer.bias.data.copy_(layer.float_bias)
        float_means = _float_means(model, layers, batches)
        set_quant_mode(model, observe=False, quantize=True)
        for layer in layers.values():  # weights stay fixed below: quantize each once
            layer.weight_cache = []
        try:
            _correct_by_level(model, layers, batches, float_means, limit, progress)
        finally:
            for layer in layers.values():
                layer.weight_cache = None
    set_quant_mode(model, observe=True, quantize=False)
    return len(layers)


def _float_means(model: fx.GraphModule, layers: dict[str, FakeQuantLayer],
                 batches: Sequence[tuple[Tensor, ...]]) -> dict[str, Tensor]:
    """Each layer's per-channel output mean with every quantizer off."""
    set_quant_mode(model, observe=False, quantize=False)
    recorder = _MeanRecorder(layers)
    try:
        _run(model, batches)
    finally:
        recorder.remove()
    return recorder.means()


def _correct_by_level(model: fx.GraphModule, layers: dict[str, FakeQuantLayer],
                      batches: Sequence[tuple[Tensor, ...]], float_means: dict[str, Tensor],
                      limit: int, progress: bool) -> None:
    """Shift the biases depth by depth, so each level is corrected on inputs that already
    carry the corrections of the levels before it."""
    depths = layer_depths(model)
    runner: _LevelRunner | None = _LevelRunner(model, batches, depths, limit)
    for depth in tqdm(sorted(set(depths.values())), desc="bias calibration", unit="level",
                      leave=False, disable=None if progress else True):
        level = {name: layer for name, layer in layers.items() if depths[name] == depth}
        runner, means = _level_means(model, runner, depth, level, batches)
        for name, quant_mean in means.items():
            _shift_bias(level[name].layer, float_means[name] - quant_mean)
        if runner is not None:
            try:
                runner.rerun_layers(depth)
            except _MemoryLimitError:
                runner.release()
                runner = None
    if runner is not None:
        runner.release()


def _level_means(model: fx.GraphModule, runner: _LevelRunner | None, depth: int,
                 level: dict[str, FakeQuantLayer], batches: Sequence[tuple[Tensor, ...]]
                 ) -> tuple[_LevelRunner | None, dict[str, Tensor]]:
    """The quantized output means of one level's layers: from the runner's kept activations
    while they fit (the runner is dropped when they stop fitting), else by running the graph
    from its inputs up to the level's last layer."""
    if runner is not None:
        recorder = _MeanRecorder(level)
        try:
            runner.measure(depth)
            return runner, recorder.means()
        except _MemoryLimitError:
            runner.release()
            runner = None
        finally:
            recorder.remove()
    recorder = _MeanRecorder(level, stop_after=list(level)[-1])
    try:
        _run(model, batches)
    finally:
        recorder.remove()
    return None, recorder.means()


def _shift_bias(layer: nn.Module, shift: Tensor) -> None:
    """Add `shift` to the layer's bias (creating a zero bias if the layer had none)."""
    if not takes_bias_corrections(layer):
        return
    shift = shift.to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros_like(shift), requires_grad=layer.weight.requires_grad)
    layer.bias.data += shift.to(layer.bias.device)
