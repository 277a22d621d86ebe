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
from quantfx.errors import LoadError, QuantFxError
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
    check_loaded_keys(graph_module)
    if isinstance(graph_module, fx.GraphModule):
        guard_traced_defaults(graph_module)
        graph_module.meta.setdefault(PRESERVED_ATTRIBUTES, {})[STATE_ATTRIBUTE] = state
        _keep_state_when_pickled(graph_module)
        hooks = graph_module.__dict__.get("_deepcopy_hooks")  # run on each deep copy
        for hook in (_keep_state_when_pickled, guard_traced_defaults, check_loaded_keys):
            if isinstance(hooks, list) and hook not in hooks:
                hooks.append(hook)


CONVERTED_CAUSE = ("one of the two is a converted model: save and load the prepared or QAT "
                   "model, then convert")
OBSERVER_CAUSE = "its quantizers observe with another activation_observer or weight_observer"
QAT_START_CAUSE = ("it is a QAT model started from the other point: prepare_qat of the float "
                   "model keeps each BatchNorm to fold as it trains, prepare_qat of a "
                   "calibrated model has them folded already")


def _load_cause(given: set[str], expected: set[str], missing: list[str], extra: list[str]
                ) -> str | None:
    """Why a state_dict of the same model does not fit, when the keys say it: a converted
    model on one side only, observers of another kind, BatchNorms kept (with the float
    modules around them) on one side only; None for anything else (another model: torch
    lists its keys)."""
    if any(".weight_int" in key for key in given) != any(".weight_int" in key for key in expected):
        return CONVERTED_CAUSE
    if all(".observer." in key for key in [*missing, *extra]):
        return OBSERVER_CAUSE
    for side, other in ((missing, extra), (extra, missing)):
        if any(".bn." in key for key in side) and all(key.endswith(".stretch") for key in other):
            return QAT_START_CAUSE
    return None


LOADER_KEYS = (".float_weight", ".float_bias", ".width", ".measured")
"""Keys a layer or quantizer loads without the fresh model having them (buffers still None;
widths that state_dicts from before they were kept lack)."""


def check_loaded_keys(module: nn.Module) -> None:
    """Register (once) a `load_state_dict` pre-hook that turns keys that differ for a known
    reason (`_load_cause`) into a `LoadError` saying how the two models were made differently,
    before any part of the model loads: torch's bare list of keys (or a quantizer's complaint
    about its width) said nothing of observers, QAT starting points or converted models, and a
    non-strict load of them runs weights or ranges made for another model."""
    for hook in module._load_state_dict_pre_hooks.values():  # a copy or unpickled one: none
        bound = getattr(hook, "module", None)
        if getattr(hook, "hook", None) is _refuse_other_keys and callable(bound) and (
                bound() is module):
            return
    module.register_load_state_dict_pre_hook(_refuse_other_keys)


def _refuse_other_keys(module: nn.Module, state_dict: dict, prefix: str, *_rest: Any) -> None:
    given = {key[len(prefix):] for key in state_dict if key.startswith(prefix)}
    expected = set(module.state_dict())
    missing, extra = (sorted(key for key in keys if not key.endswith(LOADER_KEYS))
                      for keys in (expected - given, given - expected))
    cause = _load_cause(given, expected, missing, extra)
    if not missing and not extra or cause is None:
        return  # all fits, or torch's list (another model) and the layers' own checks say it
    raise LoadError(
        f"the state_dict does not fit this {describe(module).removeprefix('a ')}: "
        f"{len(missing)} key(s) missing{f' ({missing[0]}, ...)' if missing else ''} and "
        f"{len(extra)} unexpected{f' ({extra[0]}, ...)' if extra else ''}. "
        f"{_sentence(cause)}. Load a state_dict into a model made the same way: "
        "the same float model, quantfx function and starting point, and QuantConfig.")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


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
        article = "an" if kind[:1].lower() in "aeio" else "a"
        return (f"{article} {kind} (not a quantfx model)" if isinstance(model, nn.Module)
                else f"{article} {kind}")
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
