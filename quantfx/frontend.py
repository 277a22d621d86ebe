"""The front end shared by `prepare` and `prepare_qat`: check inputs, copy, trace, normalize.

The user's model object is never modified: everything happens on a deep copy.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from quantfx.config import QuantConfig
from quantfx.errors import ConfigError, PrepareError
from quantfx.fake_quant import FakeQuantize
from quantfx.passes.normalize import functionals_to_modules
from quantfx.passes.unshare import unshare_modules
from quantfx.trace import propagate_shapes, trace

STATE_ATTRIBUTE = "_quantfx_state"


@dataclass
class QuantState:
    """What quantfx remembers about a model it prepared or converted."""

    config: QuantConfig
    backend: str  # "ptc" or "qat"
    stage: str  # "prepared" or "converted"
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)


def as_input_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Normalize `example_inputs` to a tuple of tensors, or raise a `PrepareError`."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if (
        isinstance(example_inputs, (tuple, list))
        and example_inputs
        and all(isinstance(item, torch.Tensor) for item in example_inputs)
    ):
        return tuple(example_inputs)
    raise PrepareError(
        f"example_inputs must be a tensor or a non-empty tuple of tensors, got "
        f"{type(example_inputs).__name__}. "
        "Example: qf.prepare(model, (torch.randn(1, 3, 224, 224),))"
    )


def check_config(config: QuantConfig | None) -> QuantConfig:
    """The config to use: the given one, or the defaults."""
    if config is None:
        return QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a quantfx.QuantConfig, got {type(config).__name__}.")
    return config


def state_of(model: Any) -> QuantState | None:
    """The quantfx state of a prepared or converted model, None for any other object."""
    return getattr(model, STATE_ATTRIBUTE, None) if isinstance(model, nn.Module) else None


def build_graph(
    model: nn.Module, example_inputs: Any, config: QuantConfig, training: bool
) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """Copy, trace, shape-propagate, rewrite functionals and un-share modules."""
    if not isinstance(model, nn.Module):
        raise PrepareError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if state_of(model) is not None:
        raise PrepareError(
            "this model was already prepared or converted by quantfx; prepare the original "
            "float model instead."
        )
    inputs = as_input_tuple(example_inputs)
    if any(not tensor.is_floating_point() for tensor in inputs):
        raise PrepareError(
            "example_inputs must be floating-point tensors (the float model's inputs)."
        )
    working = copy.deepcopy(model)
    working.train(training)
    graph_module = trace(working, config)
    device = next(iter(working.parameters()), torch.empty(0)).device
    inputs = tuple(tensor.to(device) for tensor in inputs)
    propagate_shapes(graph_module, inputs)
    functionals_to_modules(graph_module)
    unshare_modules(graph_module)
    return graph_module, inputs


PRESERVED_ATTRIBUTES = "_user_preserved_attributes"  # torch.fx.graph_module's key


def attach_state(graph_module: fx.GraphModule, state: QuantState) -> None:
    """Record quantfx's state on the model.

    GraphModule.__deepcopy__ keeps only the attributes listed under this meta key, so the state
    is listed there too: a deep copy of a prepared model (e.g. an EMA copy) is still one.
    """
    setattr(graph_module, STATE_ATTRIBUTE, state)
    graph_module.meta.setdefault(PRESERVED_ATTRIBUTES, {})[STATE_ATTRIBUTE] = state


def require_layers(count: int, model: nn.Module) -> None:
    """Raise a `PrepareError` when tracing reached no conv/linear layer to quantize."""
    if count == 0:
        raise PrepareError(
            f"{type(model).__name__} has no quantizable layer (no Conv, ConvTranspose or Linear "
            "layer reached by tracing). If its layers live in a leaf module, do not list it in "
            "QuantConfig.leaf_modules."
        )


def quantizers(model: nn.Module) -> list[tuple[str, FakeQuantize]]:
    """Every `FakeQuantize` in `model` (activations and weights), with its qualified name."""
    return [
        (name, module) for name, module in model.named_modules() if isinstance(module, FakeQuantize)
    ]


def set_quant_mode(model: nn.Module, observe: bool, quantize: bool) -> None:
    """Switch observing / quantizing for every quantizer of `model`."""
    for _, quantizer in quantizers(model):
        quantizer.set_mode(observe, quantize)


def input_shapes(inputs: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(tensor.shape) for tensor in inputs]
