"""What quantfx remembers about a model it prepared or converted, and the one stage check.

Every public function starts by asking `require_state` whether it got the kind of model it works
on; the error it raises names what it got and what it needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

from quantfx.config import QuantConfig
from quantfx.errors import InputError, LoadError, QuantFxError
from quantfx.inputs import describe_tensor, guard_traced_defaults

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
        guard_calls(graph_module)
        graph_module.meta.setdefault(PRESERVED_ATTRIBUTES, {})[STATE_ATTRIBUTE] = state
        _keep_state_when_pickled(graph_module)
        hooks = graph_module.__dict__.get("_deepcopy_hooks")  # run on each deep copy
        for hook in (_keep_state_when_pickled, guard_calls):
            if isinstance(hooks, list) and hook not in hooks:
                hooks.append(hook)


def guard_calls(graph_module: fx.GraphModule) -> None:
    """What a quantfx GraphModule checks of its callers (once each): arguments traced at
    their defaults, each input's rank, and state_dicts of models made differently."""
    guard_traced_defaults(graph_module)
    if not any(isinstance(hook, InputRanks) for hook in graph_module._forward_pre_hooks.values()):
        graph_module.register_forward_pre_hook(InputRanks())
    owner = type(graph_module)  # fx gives each GraphModule a class of its own
    if owner.__qualname__.endswith("GraphModuleImpl") and (
            owner.load_state_dict is not _load_state_dict_checked):
        owner.load_state_dict = _load_state_dict_checked


class InputRanks:
    """Forward pre-hook: no input has fewer dimensions than it was traced with. A converted
    conv ran an unbatched image (the float model's BatchNorm refused it) into a wrong shape,
    or failed deep inside a Linear; `calibrate` checked the rank, a plain call did not. More
    dimensions (tokens through a per-token MLP) run as the float model runs them."""

    def __call__(self, module: nn.Module, args: tuple) -> None:
        state = state_of(module)
        for index, (value, shape) in enumerate(zip(args, getattr(state, "input_shapes", None)
                                                   or [])):
            if isinstance(value, Tensor) and value.dim() < len(shape):
                hint = " (add the batch dimension: x.unsqueeze(0))" if (
                    value.dim() == len(shape) - 1) else ""
                raise InputError(
                    f"input {index} of this quantfx model has {len(shape)} dimensions (traced "
                    f"at {tuple(shape)}), got {describe_tensor(value)}: give the inputs with "
                    f"the dimensions the float model took at prepare{hint}.")


CONVERTED_CAUSE = ("One of the two is a converted model: save and load the prepared or QAT "
                   "model, then convert")
OBSERVER_CAUSE = "Its quantizers observe with another activation_observer or weight_observer"
QAT_START_CAUSE = ("It is a QAT model started from the other point: prepare_qat of the float "
                   "model keeps each BatchNorm to fold as it trains, prepare_qat of a "
                   "calibrated model has them folded already")
OBSERVER_KINDS = (".histogram", ".range_exponent", ".chosen", ".chosen_exponent")
"""Buffers one observer kind has and another lacks."""
LOADER_KEYS = (".float_weight", ".float_bias", ".width", ".measured", ".masked")
"""Keys a layer, quantizer or observer loads without the fresh model having them (buffers
still None; buffers that state_dicts of earlier versions lack)."""


def _load_cause(given: set[str], expected: set[str], missing: list[str], extra: list[str]
                ) -> str | None:
    """Why a state_dict of the same model does not fit, when the keys say it: a converted
    model against a prepared one, observers of another kind, BatchNorms kept beside the same
    layers (with the float modules around them) on one side only; None for anything else
    (another model, a partial state_dict: torch lists the keys)."""
    def has(keys: set[str], fragment: str) -> bool:
        return any(fragment in key for key in keys)
    if (has(given, ".weight_int") and has(expected, ".weight_quantizer.")) or (
            has(expected, ".weight_int") and has(given, ".weight_quantizer.")):
        return CONVERTED_CAUSE
    if all(".observer." in key for key in [*missing, *extra]) and any(
            key.endswith(OBSERVER_KINDS) for key in [*missing, *extra]):
        return OBSERVER_CAUSE
    for side, other in ((missing, extra), (extra, missing)):
        layers = {key.split(".bn.")[0] + "." for key in side if ".bn." in key}
        if layers and all(any(key.startswith(layer) and ".bn." not in key for key in keys)
                          for layer in layers for keys in (given, expected)) and all(
                key.endswith(".stretch") for key in other):
            return QAT_START_CAUSE
    return None


def _load_state_dict_checked(self: nn.Module, state_dict: Any, strict: bool = True,
                             assign: bool = False) -> Any:
    """`load_state_dict` of a quantfx GraphModule: a strict load of a state_dict saved from
    the same model made differently (`_load_cause`) is a `LoadError` that says how, before
    anything loads; torch's bare list of keys (or a quantizer's false complaint about bit
    widths) said nothing of observers, QAT starting points or converted models."""
    if strict and isinstance(state_dict, Mapping):
        _refuse_other_keys(self, state_dict)
    return super(type(self), self).load_state_dict(state_dict, strict=strict, assign=assign)


def _refuse_other_keys(module: nn.Module, state_dict: Mapping) -> None:
    given, expected = set(state_dict), set(module.state_dict())
    missing, extra = (sorted(key for key in keys if not key.endswith(LOADER_KEYS))
                      for keys in (expected - given, given - expected))
    cause = _load_cause(given, expected, missing, extra)
    if not missing and not extra or cause is None:
        return  # all fits, or torch's list (another model) and the layers' own checks say it
    raise LoadError(
        f"the state_dict does not fit this {describe(module).removeprefix('a ')}: "
        f"{len(missing)} key(s) missing{f' ({missing[0]}, ...)' if missing else ''} and "
        f"{len(extra)} unexpected{f' ({extra[0]}, ...)' if extra else ''}. "
        f"{cause}. Load a state_dict into a model made the same way: "
        "the same float model, quantfx function and starting point, and QuantConfig.")


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
