"""The front end shared by `prepare` and `prepare_qat`: check inputs, copy, trace, normalize.

The user's model object is never modified: everything happens on a deep copy.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from quantfx.config import QuantConfig
from quantfx.errors import PrepareError
from quantfx.passes.normalize import functionals_to_modules
from quantfx.passes.unshare import unshare_modules
from quantfx.state import FLOAT, require_state
from quantfx.trace import propagate_shapes, trace


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


def build_graph(
    model: nn.Module, example_inputs: Any, config: QuantConfig, training: bool
) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """Copy, trace, shape-propagate, rewrite functionals and un-share modules."""
    require_state(model, "prepare" if not training else "prepare_qat", PrepareError, (FLOAT,),
                  "the float model (a torch.nn.Module)",
                  "Prepare the original float model instead.")
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


def require_layers(count: int, model: nn.Module) -> None:
    """Raise a `PrepareError` when tracing reached no conv/linear layer to quantize."""
    if count == 0:
        raise PrepareError(
            f"{type(model).__name__} has no quantizable layer (no Conv, ConvTranspose or Linear "
            "layer reached by tracing). If its layers live in a leaf module, do not list it in "
            "QuantConfig.leaf_modules."
        )


def input_shapes(inputs: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
    """The shapes of the example inputs (kept in the model's state for export's checks)."""
    return [tuple(tensor.shape) for tensor in inputs]
