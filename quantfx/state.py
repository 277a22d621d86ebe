"""What quantfx remembers about a model it prepared or converted, and the one stage check.

Every public function starts by asking `require_state` whether it got the kind of model it works
on; the error it raises names what it got and what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from quantfx.config import QuantConfig
from quantfx.errors import QuantFxError
from quantfx.inputs import guard_traced_defaults

STATE_ATTRIBUTE = "_quantfx_state"
PRESERVED_ATTRIBUTES = "_user_preserved_attributes"  # torch.fx.graph_module's key

PTC, QAT = "ptc", "qat"
PREPARED, CONVERTED = "prepared", "converted"
FLOAT = (None, None)
"""The (backend, stage) of a model quantfx has not touched."""


@dataclass
class QuantState:
    """The config a model was built with, its back end and stage, and its input shapes."""

    config: QuantConfig
    backend: str  # PTC or QAT
    stage: str  # PREPARED or CONVERTED
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    calibration_failed: bool = False
    """A `calibrate` call stopped with an error: ranges and biases are incomplete."""
    parts: dict[str, str] = field(default_factory=dict)
    """A partly quantized model (`QuantConfig.quantize_only`): each quantized part and each
    module left float around them, with what it is or why (empty for a whole model)."""
    input_count: int = 0
    """How many positional arguments the whole model takes (partly quantized models)."""
    measured_sixteen_bit: list[str] = field(default_factory=list)
    """The layers and tensors the last calibration widened to 16 bit by measurement
    (`quantfx.ptc.mixed_precision`), worst first (graph order after a `load_state_dict`)."""
    calibration_check: Any = None
    """The last calibration's `quantfx.ptc.calibration_check.CalibrationCheck` (output SQNR against
    float on calibration samples), kept through `convert`."""


def state_of(model: Any) -> QuantState | None:
    """The quantfx state of a prepared or converted model, None for any other object."""
    return getattr(model, STATE_ATTRIBUTE, None) if isinstance(model, nn.Module) else None


def attach_state(graph_module: nn.Module, state: QuantState) -> None:
    """Record quantfx's state on the model.

    GraphModule.__deepcopy__ keeps only the attributes listed under this meta key, so the state
    is listed there too: a deep copy of a prepared model (e.g. an EMA copy) is still one. (A
    partly quantized model is the user's own module class: a plain attribute survives.)
    """
    setattr(graph_module, STATE_ATTRIBUTE, state)
    if isinstance(graph_module, fx.GraphModule):
        guard_traced_defaults(graph_module)
        graph_module.meta.setdefault(PRESERVED_ATTRIBUTES, {})[STATE_ATTRIBUTE] = state
        _keep_state_when_pickled(graph_module)
        hooks = graph_module.__dict__.get("_deepcopy_hooks")  # run on each deep copy
        for hook in (_keep_state_when_pickled, guard_traced_defaults):
            if isinstance(hooks, list) and hook not in hooks:
                hooks.append(hook)


def _keep_state_when_pickled(graph_module: fx.GraphModule) -> None:
    """fx gives every GraphModule (and every deep copy) a class of its own: its `__reduce__`
    becomes one whose unpickling attaches the state again."""
    owner = type(graph_module)
    if (owner.__qualname__.endswith("GraphModuleImpl")
            and owner.__reduce__ is fx.GraphModule.__reduce__):
        owner.__reduce__ = _reduce_keeping_state


def _reduce_keeping_state(graph_module: fx.GraphModule) -> tuple:
    """Pickle (torch.save) as fx does; unpickling attaches the state again, because fx rebuilds
    `meta` empty and a deep copy of the loaded model would drop the state."""
    return _rebuild_with_state, fx.GraphModule.__reduce__(graph_module)


def _rebuild_with_state(rebuild: Any, arguments: tuple) -> nn.Module:
    graph_module = rebuild(*arguments)
    state = getattr(graph_module, STATE_ATTRIBUTE, None)
    if state is not None:
        attach_state(graph_module, state)
    return graph_module


def unwrap(model: Any) -> Any:
    """The model inside a DistributedDataParallel / DataParallel / AveragedModel wrapper."""
    while isinstance(model, nn.Module) and state_of(model) is None and isinstance(
            getattr(model, "module", None), nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel", "AveragedModel"):
        model = model.module
    return model


def describe(model: Any) -> str:
    """What kind of model `model` is, in words a user recognizes."""
    state = state_of(model)
    if state is None:
        kind = type(model).__name__
        return f"a {kind} (not a quantfx model)" if isinstance(model, nn.Module) else f"a {kind}"
    partly = " (partly quantized)" if state.parts else ""
    if state.stage == CONVERTED:
        return f"a model already converted by quantfx.convert{partly}"
    if state.backend == QAT:
        return f"a QAT model already prepared by quantfx.prepare_qat{partly} (not yet converted)"
    return f"a model already prepared by quantfx.prepare{partly} (not yet converted)"


def require_state(model: Any, action: str, error: type[QuantFxError],
                  accepted: tuple[tuple[str | None, str | None], ...], needs: str,
                  fix: str = "") -> QuantState | None:
    """The state of `model` if its (backend, stage) is one of `accepted` (`FLOAT` for a plain
    model), else `error`: "<action> needs <needs>, got <what it got>. <fix>"."""
    state = state_of(model)
    key = FLOAT if state is None else (state.backend, state.stage)
    if key not in accepted or (state is None and not isinstance(model, nn.Module)):
        raise error(f"{action} needs {needs}, got {describe(model)}. {fix}".rstrip())
    return state
