"""Checks of the tensors a user hands quantfx: example inputs (prepare, export), calibration
batches, and what a prepared or converted model receives on each forward.

Each check says what was wrong, what was expected and the fix, before torch fails somewhere
deep inside with a message about a kernel.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from quantfx.errors import CalibrationError, InputError, QuantFxError


def parameter_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of `model`'s floating-point parameters (float32 on the CPU if it
    has none)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):  # stops at the first
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.float32, torch.device("cpu")


def require_float32(model: nn.Module, action: str, error: type[QuantFxError]) -> None:
    """`error` unless `model`'s parameters are float32: the fixed-point simulation (ranges,
    searches, the converted model) is exact only there."""
    dtype, _ = parameter_dtype_device(model)
    if dtype != torch.float32:
        raise error(
            f"{action} works on float32 models (the fixed-point simulation is exact in "
            f"float32), and this one's parameters are {str(dtype).removeprefix('torch.')}: "
            f"call model.float() first, with float32 inputs.")


def describe_tensor(tensor: Tensor) -> str:
    """"float32 (2, 3, 16, 16) on cpu": what a user needs to see of a wrong tensor."""
    return f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)} on {tensor.device}"


def check_input_tensors(tensors: Sequence[Any], dtype: torch.dtype, what: str,
                        error: type[QuantFxError]) -> None:
    """Every item is a non-empty tensor of the model's float dtype (`what` names them)."""
    for index, tensor in enumerate(tensors):
        name = f"{what} {index}" if len(tensors) > 1 or index else what
        if not isinstance(tensor, Tensor):
            raise error(f"{name} is a {type(tensor).__name__}, not a tensor; give the tensors "
                        "the model's forward takes.")
        if not tensor.is_floating_point():
            raise error(
                f"{name} is {describe_tensor(tensor)}: quantfx quantizes models whose inputs "
                f"are float tensors (they quantize their inputs themselves). Images stored as "
                f"integers: convert them, e.g. x.to(torch.{str(dtype).removeprefix('torch.')}) "
                "with the model's normalization. Integers the model itself takes (token ids "
                "for an nn.Embedding, indices): quantize the part that runs on floats, "
                "QuantConfig(quantize_only=['encoder']), and export it with part='encoder'.")
        if tensor.dtype != dtype:
            raise error(
                f"{name} is {describe_tensor(tensor)} but the model's parameters are "
                f"{str(dtype).removeprefix('torch.')}: give "
                f"x.to(torch.{str(dtype).removeprefix('torch.')}).")
        if tensor.dim() == 0 or tensor.shape[0] == 0:
            raise error(f"{name} is {describe_tensor(tensor)}: it needs a batch dimension with "
                        "at least one sample (e.g. shape (1, 3, 224, 224)).")


def check_calibration_batch(items: tuple[Tensor, ...], shapes: list[tuple[int, ...]],
                            dtype: torch.dtype, index: int, what: str = "calibration") -> None:
    """One batch of `what` data (calibration, distill) against the example inputs the model
    was prepared with."""
    check_input_tensors(items, dtype, f"{what} batch {index}, input", CalibrationError)
    for position, (tensor, shape) in enumerate(zip(items, shapes)):
        if tensor.dim() != len(shape):
            raise CalibrationError(
                f"{what} batch {index}, input {position} has shape {tuple(tensor.shape)} "
                f"but the model was prepared with a rank-{len(shape)} input {shape}: give "
                "batches laid out like the example inputs (with a batch dimension).")
        if not torch.isfinite(tensor).all():
            raise CalibrationError(
                f"{what} batch {index} holds NaN or Inf values: ranges estimated from it "
                "would be meaningless. Clean the data (or drop the batch) and try again.")
    sizes = {tensor.shape[0] for tensor in items}
    if len(sizes) > 1:
        raise CalibrationError(f"{what} batch {index} mixes batch sizes {sorted(sizes)} "
                               "across its inputs; give each input the same number of samples.")


def check_quantizer_input(x: Any, exponent: Tensor) -> None:
    """What a quantizer (the first op on each model input) must receive: a float tensor of the
    model's dtype (any float under autocast) on the model's device."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = describe_tensor(x) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(
            f"a quantfx model got {got} where it quantizes a float tensor: pass the float "
            "tensors the float model takes (it quantizes its inputs itself), e.g. x.float() with "
            "the same normalization as at calibration.")
    if x.device != exponent.device:
        raise InputError(
            f"a quantfx model on {exponent.device} got a tensor on {x.device}: move the data "
            f"(x.to('{exponent.device}')) or the model (model.to('{x.device}')).")
    if x.dtype != exponent.dtype and not torch.is_autocast_enabled(x.device.type):
        dtype = str(exponent.dtype).removeprefix("torch.")
        raise InputError(
            f"a quantfx model whose parameters are {dtype} got {describe_tensor(x)}: give "
            f"x.to(torch.{dtype}) (checked before any range is recorded), or run under "
            "torch.autocast.")


def first_samples(batches: Sequence[Any], count: int) -> list[Any]:
    """The first `count` samples of `batches` (kept batches serve several budgets), each batch a
    tuple (or list, kept as one) of tensors; a batch with no tensor ends them."""
    chosen, seen = [], 0
    for batch in batches:
        if seen >= count or not batch:
            break
        chosen.append(type(batch)(tensor[:count - seen] for tensor in batch))
        seen += chosen[-1][0].shape[0]
    return chosen


class TracedDefaults:
    """Forward pre-hook of a quantfx GraphModule. An optional argument traced at its default
    (no example input gave it) is baked into the graph: another value is an InputError naming
    it (fx raised a bare AssertionError), and the default given by name is accepted (fx renames
    the argument `scale_1`: `model(x, scale=None)` was a TypeError). `traced` maps each such
    argument's name to its position and default, read from the graph once."""

    def __init__(self, traced: dict[str, tuple[int, Any]]) -> None:
        self.traced = traced
        self.first = min(index for index, _ in traced.values())

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]
                 ) -> tuple[tuple, dict[str, Any]] | None:
        if not kwargs and len(args) <= self.first:
            return None
        kwargs = dict(kwargs)
        for name, (index, default) in self.traced.items():
            for value in ([args[index]] if index < len(args) else []) + (
                    [kwargs.pop(name)] if name in kwargs else []):
                if not _same_default(value, default):
                    raise InputError(
                        f"this quantfx model was prepared with {name}={default!r} (forward's "
                        f"default: no example input gave it), so its graph computes that case "
                        f"only; got {name} = {type(value).__name__}. Call it without {name}, "
                        f"or prepare the float model with example_inputs that give {name} (in "
                        "forward's order) to keep what forward does with one.")
        return args, kwargs


def _same_default(value: Any, default: Any) -> bool:
    try:
        return value is default or (type(value) is type(default) and bool(value == default))
    except (TypeError, ValueError, RuntimeError):  # tensors and other ambiguous comparisons
        return False


def guard_traced_defaults(graph_module: nn.Module) -> None:
    """Register `TracedDefaults` on a quantfx GraphModule that has arguments traced at their
    defaults (once)."""
    graph = getattr(graph_module, "graph", None)
    if graph is None or any(isinstance(hook, TracedDefaults)
                            for hook in graph_module._forward_pre_hooks.values()):
        return
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    traced = {str(node.target).rstrip("0123456789").rstrip("_"): (index, node.args[0])
              for index, node in enumerate(placeholders) if node.args}  # a default
    if traced:
        graph_module.register_forward_pre_hook(TracedDefaults(traced), with_kwargs=True)
