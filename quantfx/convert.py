"""`convert`: freeze a prepared model into an integer-exact fixed-point simulation.

Each activation quantizer becomes a `FrozenQuantizer` with a fixed power-of-2 exponent; each
weight layer becomes an `IntegerLayer` whose weight holds the dequantized int8/int16 codes and
whose bias lies on the int32 grid of input scale x weight scale (the ONNX QDQ convention). Since
every scale is a power of two, the float arithmetic of the simulation is exact and equals what
an integer engine (and ONNX Runtime on the exported file) computes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from quantfx.config import QuantConfig
from quantfx.errors import ConvertError, InternalError
from quantfx.inputs import parameter_dtype_device
from quantfx.layers import FakeQuantLayer, IntegerLayer, PReLULayer
from quantfx.partial import quantized_parts, rebuild_parts
from quantfx.passes.graph_utils import input_quantizer, module_of, set_submodule
from quantfx.qat import lower_qat_layers
from quantfx.quantizers import CalibrationQuantizer, FrozenQuantizer
from quantfx.state import (
    CONVERTED,
    PREPARED,
    PTC,
    QAT,
    STATE_ATTRIBUTE,
    QuantState,
    guard_calls,
    require_state,
    unwrap,
)


class QuantizedGraphModule(fx.GraphModule):
    """The converted model: a GraphModule that is eval-only (its numbers are frozen)."""

    def train(self, mode: bool = True) -> QuantizedGraphModule:
        if mode:
            raise ConvertError(
                "a converted quantfx model is inference-only; fine-tune the prepared model "
                "(prepare_qat) and convert again."
            )
        return super().train(False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run with autocast off: the simulation is integer-exact only in float32 (or 64)."""
        dtype, _ = parameter_dtype_device(self)
        if dtype in (torch.float16, torch.bfloat16):
            raise ConvertError(
                f"a converted model is integer-exact in float32 (or float64); in "
                f"{str(dtype).removeprefix('torch.')} its sums round, and outputs move by an "
                "LSB: call model.float() (TIDL and the exported file compute the exact sums).")
        device = next((t.device.type for t in self.buffers()), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return super().__call__(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> QuantizedGraphModule:
        plain = fx.GraphModule.__deepcopy__(self, memo)
        copied = QuantizedGraphModule(plain, plain.graph, type(self).__name__)
        setattr(copied, STATE_ATTRIBUTE, copy.deepcopy(getattr(self, STATE_ATTRIBUTE), memo))
        guard_calls(copied)
        return copied.eval()

    def __reduce__(self) -> tuple:
        """Pickle (torch.save) as fx does, then rebuild this class around the result."""
        rebuild, arguments = super().__reduce__()
        return _rebuild_converted, (rebuild, arguments, type(self).__name__)


def _rebuild_converted(rebuild: Any, arguments: tuple, name: str) -> QuantizedGraphModule:
    plain = rebuild(*arguments)
    converted = QuantizedGraphModule(plain, plain.graph, name)
    setattr(converted, STATE_ATTRIBUTE, getattr(plain, STATE_ATTRIBUTE))
    guard_calls(converted)
    return converted.eval()


def _freeze_quantizers(working: fx.GraphModule, backend: str) -> None:
    """Every activation quantizer of the graph becomes a `FrozenQuantizer` at its exponent."""
    missing = [node.target for node in working.graph.nodes
               if isinstance(module_of(working, node), CalibrationQuantizer)
               and not module_of(working, node).observed]
    if missing:
        fix = ("Train the QAT model first (train-mode forward passes set its ranges), or start "
               "QAT from a calibrated quantfx.prepare model." if backend == QAT else
               "Run quantfx.calibrate(model, data) (or forward passes under torch.no_grad()) "
               "before convert.")
        raise ConvertError(
            f"{len(missing)} quantizer(s) never saw data (first: '{missing[0]}'), so their "
            f"ranges are unknown. {fix}"
        )
    for node in working.graph.nodes:
        quantizer = module_of(working, node)
        if isinstance(quantizer, CalibrationQuantizer):
            exponent = quantizer.current_exponent()
            set_submodule(working, node.target,
                          FrozenQuantizer(float(exponent), quantizer.bits, quantizer.signed))


def _freeze_slopes(working: nn.Module) -> None:
    """Each PReLU's slope quantizer becomes a `FrozenQuantizer` at the exponent of the slopes
    it holds now (a model restored from a state_dict converts to the same codes)."""
    for module in working.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if isinstance(module, PReLULayer) and isinstance(quantizer, CalibrationQuantizer):
            module.weight_quantizer = FrozenQuantizer(
                float(observe_weight(quantizer, module.weight)), quantizer.bits, signed=True)
            module.weight.requires_grad_(False)  # frozen, like an IntegerLayer's weights


def observe_weight(quantizer: CalibrationQuantizer, weight: torch.Tensor) -> torch.Tensor:
    """Let an observing weight quantizer see the current `weight` and return the exponent it
    takes: the exponent then follows from the weight alone (a model restored from a state_dict
    converts to the same integers as the one that was saved)."""
    if bool(quantizer.observer_enabled):
        quantizer.observer(weight.detach())
    return quantizer.current_exponent()


def convert(model: fx.GraphModule) -> QuantizedGraphModule | nn.Module:
    """A frozen, integer-exact simulation of a calibrated (or QAT-trained) prepared model.

    The prepared model is left as it was; converting twice gives identical models.
    """
    model = unwrap(model)
    state = require_state(model, "convert", ConvertError, ((PTC, PREPARED), (QAT, PREPARED)),
                          "a model returned by quantfx.prepare or quantfx.prepare_qat")
    if state.calibration_failed:
        raise ConvertError("the last quantfx.calibrate call on this model stopped with an "
                           "error, so its ranges and biases are incomplete: fix the data and "
                           "calibrate again before convert.")
    if quantized_parts(state):  # partly quantized: convert each part, the rest stays as it is
        return rebuild_parts(model, state, lambda part, _: convert(part), state.backend,
                             CONVERTED).eval()
    working = copy.deepcopy(model).eval()
    _freeze_quantizers(working, state.backend)
    lower_qat_layers(working)  # QAT layers: fold BN with running stats, then as PTC below
    _freeze_slopes(working)
    for node in working.graph.nodes:
        layer = module_of(working, node)
        if isinstance(layer, FakeQuantLayer):
            observe_weight(layer.weight_quantizer, layer.layer.weight)
            quantizer = input_quantizer(working, node)
            if not isinstance(quantizer, FrozenQuantizer):
                raise InternalError(f"the input of layer '{node.target}' is not quantized.")
            integer = IntegerLayer(
                layer.layer, layer.weight_quantizer, quantizer.exponent,
                state.config.profile.bias_bits_for(layer.weight_quantizer.bits))
            _refuse_zeroed_weights(str(node.target), layer, integer, quantizer, state.config)
            set_submodule(working, node.target, integer)
    working.delete_all_unused_submodules()
    working.to(parameter_dtype_device(model)[1])  # the frozen quantizers join the model
    converted = QuantizedGraphModule(working, working.graph, type(model).__name__)
    setattr(converted, STATE_ATTRIBUTE,
            QuantState(state.config, state.backend, CONVERTED, list(state.input_shapes),
                       measured_sixteen_bit=list(state.measured_sixteen_bit),
                       calibration_check=state.calibration_check))
    guard_calls(converted)
    return converted.eval()


def _refuse_zeroed_weights(name: str, layer: FakeQuantLayer, integer: IntegerLayer,
                           input_quantizer: FrozenQuantizer, config: QuantConfig) -> None:
    """A bias too large for the engine's bias width raises the weight exponent; when no weight
    code survives although the weights could move the output by more than 1/256 of the bias,
    the layer would silently compute its bias only."""
    weight = (layer.layer.weight if layer.float_weight is None  # the weight before rounding
              else layer.float_weight).detach()
    if bool(integer.weight_int.any()) or layer.layer.bias is None:
        return
    largest_input = float(input_quantizer.qmax * 2.0 ** input_quantizer.exponent.max())
    reach = float(weight.abs().flatten(1).sum(dim=1).max()) * largest_input
    if reach <= float(layer.layer.bias.detach().abs().max()) / 256:
        return  # the weights never mattered next to the bias at this input range
    raise ConvertError(
        f"layer '{name}' would keep no weight: its bias does not fit the "
        f"{integer.bias_bits}-bit bias of target {config.target!r} at its input's scale "
        f"(2**{int(integer.input_exponent.max())}) unless the weight step grows past every "
        f"weight. Give the layer 16-bit weights (sixteen_bit_layers=[{name!r}], 32-bit "
        "biases on TIDL) or a target with 32-bit biases (e.g. 'am68a').")
