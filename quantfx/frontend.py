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
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from quantfx.config import QuantConfig
from quantfx.errors import PrepareError, warn
from quantfx.export.registry import unexportable
from quantfx.inputs import check_input_tensors, parameter_dtype_device, require_float32
from quantfx.passes.attention import decompose_attention
from quantfx.passes.functional_layers import functional_layers_to_modules
from quantfx.passes.inplace import functionalize_in_place_ops
from quantfx.passes.masks import constant_masks_to_modules
from quantfx.passes.normalize import functionals_to_modules
from quantfx.passes.pools import split_max_pools
from quantfx.passes.unshare import unshare_modules
from quantfx.state import FLOAT, require_state
from quantfx.trace import concrete_defaults, propagate_shapes, trace

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
""""Module attributes holding the hooks a forward or backward would call."""


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
    nested = isinstance(example_inputs, (tuple, list)) and any(
        isinstance(item, (list, tuple, dict)) for item in example_inputs)
    hint = (" A model that takes lists or dicts (a detector) is quantized in parts: "
            "QuantConfig(quantize_only='auto') or quantize_only=('backbone', 'head')."
            if nested else "")
    raise PrepareError(
        f"example_inputs must be a tensor or a non-empty tuple of tensors, got "
        f"{type(example_inputs).__name__}. "
        f"Example: qf.prepare(model, (torch.randn(1, 3, 224, 224),)).{hint}"
    )


def build_graph(
    model: nn.Module, example_inputs: Any, config: QuantConfig, training: bool
) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """Copy, trace, shape-propagate, rewrite functionals and un-share modules."""
    require_state(model, "prepare" if not training else "prepare_qat", PrepareError, (FLOAT,),
                  "the float model (a torch.nn.Module)",
                  "Prepare the original float model instead.")
    inputs = as_input_tuple(example_inputs)
    check_no_inference_mode("prepare_qat" if training else "prepare")
    require_float32(model, "prepare_qat" if training else "prepare", PrepareError)
    dtype, device = parameter_dtype_device(model)
    check_input_tensors(inputs, dtype, "example input", PrepareError)
    working = private_copy(model).eval()
    materialize_reparametrizations(working)
    drop_hooks(working)
    concrete = concrete_defaults(working, len(inputs))
    _warn_optional_inputs(model, concrete, len(inputs))
    graph_module = trace(working, config, concrete)
    if training:
        training_graph = trace(working.train(), config, concrete)
        if training_graph.code != graph_module.code:
            warn(
                f"{type(model).__name__}.forward depends on self.training (it traces "
                "differently in train and eval mode). QAT traces it in train mode, so the QAT "
                "model (and the model convert makes of it) computes what training computes, "
                "in eval mode too: move training-only outputs out of forward, or keep that part "
                "in a leaf module.")
        graph_module = training_graph
    graph_module._tracer_cls = None  # a reloaded (unpickled) model re-traces with fx's own
    inputs = tuple(tensor.to(device) for tensor in inputs)
    propagate_shapes(graph_module, inputs)
    if decompose_attention(graph_module):
        propagate_shapes(graph_module, inputs)
    functionalize_in_place_ops(graph_module)
    constant_masks_to_modules(graph_module)  # after it: masked_fill_ is then a value
    functional_layers_to_modules(graph_module)
    functionals_to_modules(graph_module)
    unshare_modules(graph_module)
    split_max_pools(graph_module)  # after it: a shared pool is one module per call
    return graph_module, inputs


def _warn_optional_inputs(model: nn.Module, concrete: dict[str, Any], given: int) -> None:
    """Say which optional forward arguments were traced at None: the prepared model no longer
    takes them, and the code that uses them is gone from it."""
    left = [name for name, value in concrete.items() if value is None]
    if left:
        warn(f"{type(model).__name__}.forward was traced with {', '.join(left)} at its default "
             f"None ({given} example input(s) given): the quantized model takes no "
             f"{left[0]} argument, and what forward does with one is not in it. Give a tensor "
             "for it in example_inputs (in forward's order) to keep that branch.")


def check_no_inference_mode(action: str) -> None:
    """Buffers made under torch.inference_mode() cannot be updated outside it later."""
    if torch.is_inference_mode_enabled():
        raise PrepareError(f"{action} was called inside torch.inference_mode(): the quantizers' "
                           "state could not be updated afterwards. Call it outside (calibrate "
                           "and evaluate under torch.no_grad() instead).")


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` that shares nothing quantfx changes later with the original.

    Two things defeat a plain deepcopy: a computed (non-leaf) tensor kept as an attribute (the
    `weight` of an old-style weight_norm / spectral_norm right after a forward with grad on)
    cannot be deep-copied, so it is copied detached; and a parametrized module's class is shared
    by its copies, so removing a parametrization from the copy would remove it from the user's
    module too: the copy gets a class of its own.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    working = copy.deepcopy(model, memo)
    for module in working.modules():
        if parametrize.is_parametrized(module):
            shared = type(module)
            attributes = {key: value for key, value in vars(shared).items()
                          if key not in ("__dict__", "__weakref__")}
            module.__class__ = type(shared.__name__, shared.__bases__, attributes)
    return working


def materialize_reparametrizations(model: nn.Module) -> list[str]:
    """Turn weight_norm / spectral_norm (hooks or parametrizations) into plain weights with the
    values the eval-mode model uses: the engine stores one weight, and quantfx quantizes it.
    Returns the names of the modules changed."""
    changed = []
    for name, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, WeightNorm):
                torch.nn.utils.remove_weight_norm(module, hook.name)
                changed.append(name)
            elif isinstance(hook, SpectralNorm):
                torch.nn.utils.remove_spectral_norm(module, hook.name)
                changed.append(name)
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
            changed.append(name)
    return changed


def drop_hooks(model: nn.Module) -> None:
    """Remove the user's forward/backward hooks from the copy quantfx traces, with a warning:
    tracing does not see hooks, so they would fire at the wrong places in the quantized model
    (and not during calibration)."""
    dropped = []
    for name, module in model.named_modules():
        for attribute in HOOK_DICTS:
            hooks = getattr(module, attribute, None)
            if hooks:
                dropped.append(f"{attribute.strip('_').replace('_', ' ')[:-1]} on "
                               f"'{name or type(model).__name__}'")
                hooks.clear()
    if dropped:
        warn(
            f"quantfx does not carry hooks into the quantized model and dropped "
            f"{len(dropped)}: {', '.join(dropped[:5])}{' ...' if len(dropped) > 5 else ''}. "
            "Your model keeps them; apply their effect outside the quantized model, or move "
            "it into forward so tracing sees it.")


def warn_unexportable(graph_module: fx.GraphModule) -> None:
    """Say at prepare which ops export_onnx will refuse (before the user calibrates)."""
    missing = unexportable(graph_module)
    if missing:
        warn(
            f"quantfx can prepare, calibrate and convert this model, but export_onnx has no "
            f"ONNX emitter for: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}. "
            "Rewrite those ops with supported ones (docs/export.md lists them), quantize only "
            "the parts around them (QuantConfig(quantize_only=[...]), docs/api.md), or report "
            "them to the quantfx developers.")


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
