"""`convert`: freeze a prepared model into an integer-exact fixed-point simulation.

Each activation quantizer becomes a `Quantize` with a fixed power-of-2 exponent; each weight
layer becomes a `QuantizedLayer` whose weight holds the dequantized int8/int16 codes and whose
bias lies on the int32 grid of input scale x weight scale (the ONNX QDQ convention). Since every
scale is a power of two, the float arithmetic of the simulation is exact and equals what an
integer engine (and ONNX Runtime on the exported file) computes.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import Tensor, nn

from quantfx.errors import ConvertError
from quantfx.fake_quant import FakeQuantize
from quantfx.frontend import STATE_ATTRIBUTE, QuantState, state_of
from quantfx.modules import QuantLayer
from quantfx.passes.fuse import set_submodule
from quantfx.passes.graph_utils import module_of
from quantfx.passes.place import input_quantizer
from quantfx.qmath import exponent_for_max, fake_quantize, qrange, quantize, scale_of

INT32_MIN, INT32_MAX = qrange(32, signed=True)


class Quantize(nn.Module):
    """A frozen activation quantizer: round half to even at scale 2**exponent, saturate."""

    def __init__(self, exponent: float, bits: int, signed: bool) -> None:
        super().__init__()
        self.bits = bits
        self.signed = signed
        self.qmin, self.qmax = qrange(bits, signed)
        self.register_buffer("exponent", torch.tensor(float(exponent)))

    @property
    def scale(self) -> float:
        """The power-of-2 scale."""
        return float(scale_of(self.exponent))

    def extra_repr(self) -> str:
        kind = "int" if self.signed else "uint"
        return f"{kind}{self.bits}, scale=2**{int(self.exponent)}"

    def forward(self, x: Tensor) -> Tensor:
        return fake_quantize(x, self.exponent, self.qmin, self.qmax)


class QuantizedLayer(nn.Module):
    """A conv/linear layer with integer weights and int32 bias, run on the grid values.

    Buffers hold what the engine stores: `weight_int` (int8/int16 codes), `weight_exponent`
    (one per output channel for depthwise), `bias_int` (int32 codes at `bias_exponent` =
    input exponent + weight exponent) and `input_exponent`.
    """

    def __init__(
        self, layer: nn.Module, weight_quantizer: FakeQuantize, input_exponent: Tensor
    ) -> None:
        super().__init__()
        self.weight_bits = weight_quantizer.bits
        self.axis = weight_quantizer.axis
        weight = layer.weight.detach()
        weight_exponent = _fit_bias(
            weight_quantizer.exponent.detach().clone(), input_exponent.detach(), layer.bias
        )
        weight_int = quantize(
            weight, weight_exponent, weight_quantizer.qmin, weight_quantizer.qmax, self.axis
        )
        bias_exponent = input_exponent.detach() + weight_exponent
        self.register_buffer("input_exponent", input_exponent.detach().clone())
        self.register_buffer("weight_exponent", weight_exponent)
        self.register_buffer("bias_exponent", bias_exponent)
        int_type = torch.int8 if self.weight_bits == 8 else torch.int16
        self.register_buffer("weight_int", weight_int.to(int_type))
        self.layer = copy.deepcopy(layer)
        self.layer.weight = nn.Parameter(
            self._dequantize(weight_int, weight_exponent), requires_grad=False
        )
        if layer.bias is not None:
            bias_int = quantize(
                layer.bias.detach(),
                bias_exponent,
                INT32_MIN,
                INT32_MAX,
                0 if bias_exponent.dim() else None,
            )
            self.register_buffer("bias_int", bias_int.to(torch.int32))
            bias = bias_int.to(torch.float32) * scale_of(bias_exponent)
            self.layer.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.register_buffer("bias_int", None)

    def _dequantize(self, weight_int: Tensor, exponent: Tensor) -> Tensor:
        scale = scale_of(exponent)
        if self.axis is not None:
            scale = scale.reshape([-1] + [1] * (weight_int.dim() - 1))
        return weight_int.to(torch.float32) * scale

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def _fit_bias(weight_exponent: Tensor, input_exponent: Tensor, bias: Tensor | None) -> Tensor:
    """Raise the weight exponent where the int32 bias at input x weight scale would overflow.

    This is what ONNX Runtime's quantizer does silently; doing it here keeps the exported file
    and the simulation on the same scales (it only triggers for tiny activation scales).
    """
    if bias is None:
        return weight_exponent
    magnitude = bias.detach().abs()
    if weight_exponent.dim() == 0:
        magnitude = magnitude.max()
    needed = exponent_for_max(magnitude, INT32_MAX) - input_exponent
    needed = torch.where(magnitude > 0, needed, weight_exponent)
    return torch.maximum(weight_exponent, needed)


class QuantizedGraphModule(fx.GraphModule):
    """The converted model: a GraphModule that is eval-only (its numbers are frozen)."""

    def train(self, mode: bool = True) -> QuantizedGraphModule:
        if mode:
            raise ConvertError(
                "a converted quantfx model is inference-only; fine-tune the prepared model "
                "(prepare_qat) and convert again."
            )
        return super().train(False)

    def __deepcopy__(self, memo: dict) -> QuantizedGraphModule:
        plain = fx.GraphModule.__deepcopy__(self, memo)
        copied = QuantizedGraphModule(plain, plain.graph, type(self).__name__)
        setattr(copied, STATE_ATTRIBUTE, copy.deepcopy(getattr(self, STATE_ATTRIBUTE), memo))
        return copied.eval()


def _input_quantizer(graph_module: fx.GraphModule, node: fx.Node) -> Quantize:
    """The frozen quantizer whose grid the data input of layer `node` lies on."""
    quantizer = input_quantizer(graph_module, node, Quantize)
    if quantizer is None:
        raise ConvertError(
            f"internal: the input of layer '{node.target}' is not quantized. Please report "
            "this model to the quantfx developers."
        )
    return quantizer


def convert(model: fx.GraphModule) -> QuantizedGraphModule:
    """A frozen, integer-exact simulation of a calibrated (or QAT-trained) prepared model.

    The prepared model is left as it was; converting twice gives identical models.
    """
    state = state_of(model)
    if state is None or state.stage != "prepared":
        raise ConvertError(
            "convert needs a model returned by quantfx.prepare or quantfx.prepare_qat"
            + (
                " (this one is already converted)."
                if state is not None
                else f", got {type(model).__name__}."
            )
        )
    working = copy.deepcopy(model).eval()
    graph = working.graph
    missing = [
        node.target
        for node in graph.nodes
        if isinstance(module_of(working, node), FakeQuantize)
        and not module_of(working, node).observed
    ]
    if missing:
        raise ConvertError(
            f"{len(missing)} quantizer(s) never saw data (first: '{missing[0]}'), so their "
            "ranges are unknown. Run quantfx.calibrate(model, data) (or forward passes under "
            "torch.no_grad()) before convert."
        )
    for node in graph.nodes:
        quantizer = module_of(working, node)
        if isinstance(quantizer, FakeQuantize):
            exponent = quantizer.current_exponent()
            set_submodule(
                working, node.target, Quantize(float(exponent), quantizer.bits, quantizer.signed)
            )
    from quantfx.qat import lower_qat_layers  # here: quantfx.qat imports this module

    lower_qat_layers(working)  # QAT layers: fold BN with running stats, then as PTC below
    for node in graph.nodes:
        layer = module_of(working, node)
        if isinstance(layer, QuantLayer):
            weight_quantizer = layer.weight_quantizer
            weight_quantizer.current_exponent()
            input_exponent = _input_quantizer(working, node).exponent
            set_submodule(
                working, node.target, QuantizedLayer(layer.layer, weight_quantizer, input_exponent)
            )
    working.delete_all_unused_submodules()
    converted = QuantizedGraphModule(working, graph, type(model).__name__)
    setattr(
        converted,
        STATE_ATTRIBUTE,
        QuantState(state.config, state.backend, "converted", list(state.input_shapes)),
    )
    return converted.eval()
