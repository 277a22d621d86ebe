"""`FakeQuantize`: an observer plus a power-of-2 quantizer for one tensor, state in buffers.

Two switches decide what a forward does: `observer_enabled` (record ranges) and
`quant_enabled` (round to the grid). Calibration observes with quantization off; a frozen
quantizer quantizes with the stored exponent; QAT does both, refreshing the exponent from the
observer as it goes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantfx.observers import Observer
from quantfx.qmath import fake_quantize, qrange


class FakeQuantize(nn.Module):
    """Quantizer of one tensor: `bits` wide, signed or unsigned, per tensor or along `axis`."""

    def __init__(
        self, observer: Observer, bits: int, signed: bool, axis: int | None = None
    ) -> None:
        super().__init__()
        self.observer = observer
        self.bits = bits
        self.signed = signed
        self.axis = axis
        self.qmin, self.qmax = qrange(bits, signed)
        channels = observer.min_val.shape
        self.register_buffer("exponent", torch.zeros(channels))
        self.register_buffer("observer_enabled", torch.tensor(True))
        self.register_buffer("quant_enabled", torch.tensor(False))

    def extra_repr(self) -> str:
        kind = "int" if self.signed else "uint"
        axis = "" if self.axis is None else f", axis={self.axis}"
        return f"{kind}{self.bits}{axis}"

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

    def freeze(self) -> None:
        """Fix the exponent from what was observed; from now on quantize with it."""
        self.compute_exponent()
        self.set_mode(observe=False, quantize=True)
