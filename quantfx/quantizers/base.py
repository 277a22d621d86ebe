"""The quantizer kinds of a prepared and a converted model: one tensor's power-of-2 grid
(`Quantizer`), the converted kind (`FrozenQuantizer`), the observing kind calibration uses
(`CalibrationQuantizer`, two switches: `observer_enabled` records ranges, `quant_enabled`
rounds to the grid) and a conv/linear weight's (`WeightQuantizer`, which owns its rule)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantfx.errors import LoadError
from quantfx.inputs import check_quantizer_input
from quantfx.observers import Observer
from quantfx.qmath import fake_quantize, fake_quantize_ste, qrange, scale_of, weight_exponent


class Quantizer(nn.Module):
    """One tensor's grid: `bits` wide, signed or unsigned, per tensor or per channel along
    `axis`; its exponent(s) live in the `exponent` buffer."""

    def __init__(self, bits: int, signed: bool, axis: int | None = None,
                 channels: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.signed = signed
        self.axis = axis
        self.register_buffer("exponent", torch.zeros(channels))
        self.register_buffer("width", torch.tensor(bits))  # in the state_dict: widths can change
        self.register_buffer("measured", torch.tensor(False))  # widened by measurement
        self.placed_bits = bits  # placement's width; measured mixed precision may widen it
        self.set_bits(bits)

    def set_bits(self, bits: int) -> None:
        """Make the grid `bits` wide (measured mixed precision widens layers after prepare)."""
        self.bits = bits
        self.qmin, self.qmax = qrange(bits, self.signed)
        self.width.fill_(bits)

    def widen(self, bits: int) -> None:
        """Widen to `bits` because calibration measured that this tensor needs it."""
        self.set_bits(bits)
        self.measured.fill_(bits != self.placed_bits)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list, *args: object) -> None:
        """Take the saved width too, when this model could have it: the placed one, or wider by
        measurement. Another width comes from a model quantized with another config (a 16-bit
        model's state in an 8-bit one ran it at 16 bit, silently). A state_dict saved before
        widths were kept has none (the placed width stays)."""
        self._check_saved_grid(state_dict.get(prefix + "exponent"), prefix.rstrip("."))
        saved = state_dict.get(prefix + "width")
        measured = state_dict.get(prefix + "measured")
        if saved is not None and measured is not None and int(saved) != self.placed_bits and (
                int(saved) < self.placed_bits or not bool(measured)):
            raise LoadError(
                f"the state_dict holds a {int(saved)}-bit quantizer '{prefix.rstrip('.')}' where "
                f"this model places {self.placed_bits} bit: it comes from a model quantized "
                "with other bit widths, by another QuantConfig (activation_bits, weight_bits, "
                "sixteen_bit_layers) or by a calibration on other data that measured other "
                "layers to need 16 bit (widen_sensitive_layers). Load a prepared model's "
                "state_dict into a model prepared with the same config, then convert.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      *args)
        for key in ("width", "measured"):
            if prefix + key in missing_keys:
                missing_keys.remove(prefix + key)
        self.set_bits(int(self.width))

    def _check_saved_grid(self, exponent: object, name: str) -> None:
        """A saved exponent of another shape (per-channel against per-tensor) comes from a model
        prepared with another config: say so, not torch's list of size mismatches."""
        if not isinstance(exponent, Tensor) or exponent.dim() == self.exponent.dim():
            return  # another channel count is another model: torch names it

        def grid(shape: torch.Size) -> str:
            return f"{shape[0]} per-channel exponents" if len(shape) else "one exponent"
        raise LoadError(
            f"the state_dict holds {grid(exponent.shape)} for quantizer '{name}' where this "
            f"model has {grid(self.exponent.shape)}: it comes from a model prepared with "
            "another QuantConfig (per_channel_weights, per_channel_depthwise, target). Load a "
            "prepared model's state_dict into a model prepared with the same config.")

    @property
    def scale(self) -> float:
        """The power-of-2 scale of a per-tensor quantizer."""
        return float(scale_of(self.exponent))

    def kind(self) -> str:
        """"int8", "uint16", ..."""
        return f"{'int' if self.signed else 'uint'}{self.bits}"


class FrozenQuantizer(Quantizer):
    """A converted activation quantizer: round half to even at scale 2**exponent, saturate."""

    def __init__(self, exponent: float, bits: int, signed: bool) -> None:
        super().__init__(bits, signed)
        self.exponent.fill_(float(exponent))

    def extra_repr(self) -> str:
        return f"{self.kind()}, scale=2**{int(self.exponent)}"

    def forward(self, x: Tensor) -> Tensor:
        check_quantizer_input(x, self.exponent)
        return fake_quantize(x, self.exponent, self.qmin, self.qmax)


class CalibrationQuantizer(Quantizer):
    """An observer plus a quantizer; every piece of state in buffers (state_dict round-trips)."""

    def __init__(
        self, observer: Observer, bits: int, signed: bool, axis: int | None = None
    ) -> None:
        super().__init__(bits, signed, axis, tuple(observer.min_val.shape))
        self.observer = observer
        self.register_buffer("observer_enabled", torch.tensor(True))
        self.register_buffer("quant_enabled", torch.tensor(False))

    def extra_repr(self) -> str:
        return self.kind() + ("" if self.axis is None else f", axis={self.axis}")

    @property
    def observed(self) -> bool:
        """True once the observer has seen at least one tensor."""
        return bool(self.observer.observed)

    def current_exponent(self) -> Tensor:
        """The exponent to convert with: fresh from the observer while it observes, else frozen."""
        if bool(self.observer_enabled) and self.observed:
            return self.compute_exponent()
        return self.exponent

    def compute_exponent(self) -> Tensor:
        """Store and return the observer's proposed exponent(s)."""
        self.exponent.copy_(self.observer.exponent(self.qmax))
        return self.exponent

    def forward(self, x: Tensor) -> Tensor:
        check_quantizer_input(x, self.exponent)
        if bool(self.observer_enabled):
            self.observer(x)
            if not bool(self.quant_enabled):
                return x
            self.compute_exponent()
        elif not bool(self.quant_enabled):
            return x
        return fake_quantize(x, self.exponent, self.qmin, self.qmax, self.axis)

    def set_mode(self, observe: bool, quantize: bool) -> None:
        """Switch observing and quantizing on or off."""
        self.observer_enabled.fill_(observe)
        self.quant_enabled.fill_(quantize)


class WeightQuantizer(CalibrationQuantizer):
    """A conv/linear weight's quantizer, owning how its exponent is chosen (docs/design.md,
    "Where does a weight get its exponent?"). `rule` "observed" (PTC): calibration computes it
    from the observer (and may search it by output error); "calibrated" (QAT from a calibrated
    model): the exponent it holds; "minmax" / "mse" (QAT): recomputed from the current weight
    on every training forward (`quantfx.qmath.weight_exponent`); "learned" (QAT, TQT):
    `LearnedWeightQuantizer`'s trained threshold."""

    def __init__(self, observer: Observer, bits: int, axis: int | None = None,
                 rule: str = "observed") -> None:
        super().__init__(observer, bits, signed=True, axis=axis)
        self.rule = rule

    @property
    def follows_weight(self) -> bool:
        """Whether each training forward recomputes the exponent from the weight."""
        return self.rule not in ("observed", "calibrated")

    def exponent_for(self, weight: Tensor) -> Tensor:
        """The exponent(s) `weight` gets now (before a bias fit may raise them)."""
        if not self.follows_weight:
            return self.exponent.clone()
        return weight_exponent(weight, self.qmax, self.axis, self.rule)

    def fake_quantize_training(self, weight: Tensor, exponent: Tensor) -> Tensor:
        """QAT's training forward of `weight` at `exponent`: the straight-through estimator,
        unclipped (an exponent from the weight never clips it)."""
        return fake_quantize_ste(weight, exponent, self.qmin, self.qmax, self.axis,
                                 clip_gradient=False)
