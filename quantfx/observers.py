"""Range estimators: they watch a tensor and propose a power-of-2 exponent for it.

Every observer keeps its state in buffers (so `state_dict` round-trips it) and proposes
exponents through `exponent(qmax)`. Symmetric quantization only needs the largest magnitude,
but min and max are kept too: they tell a user (and the tests) what a tensor really held.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from quantfx.errors import NonFiniteError
from quantfx.qmath import (
    WEIGHT_SEARCH_DEPTH,
    exponent_for_max,
    least_error_exponent,
)

SEARCH_DEPTH = WEIGHT_SEARCH_DEPTH
"""How many exponents below the never-clipping one an MSE search considers."""
SAMPLE_SIZE = 1 << 17
"""A histogram counts at most about this many values of each batch (every p-th one, spread
over every position); the exact min and max still come from all of them. Counting every value
made a calibration forward 2-4x an inference forward (`python -m benchmarks speed`)."""


@functools.lru_cache(maxsize=256)
def sample_stride(count: int) -> int:
    """The smallest prime p >= count / SAMPLE_SIZE that does not divide `count`: every p-th
    value of a flattened (N, C, H, W) tensor then visits every channel and position alike."""
    stride = max(2, count // SAMPLE_SIZE)
    while any(stride % divisor == 0 for divisor in range(2, math.isqrt(stride) + 1)) or (
            count % stride == 0):
        stride += 1
    return stride


def strided_sample(flat: Tensor) -> Tensor:
    """`flat` itself when small, else every `sample_stride`-th value (a view, no copy)."""
    if flat.numel() <= SAMPLE_SIZE:
        return flat
    return flat[::sample_stride(flat.numel())]


MASK_MARGIN = 12.0
"""How far below the tensor's largest value a masked (-inf) entry must land after saturation:
the lowest code of a masked tensor's grid is at most `max - MASK_MARGIN`, so in a softmax row
that holds a score near the tensor's largest a masked entry weighs under exp(-12) = 6e-6 of it
(a thousand masked entries leak under 1 %). A row whose scores all lie far below the largest
gets less headroom (the floor is per tensor, as the engine's scale is). Without it, attention
scores spanning +-0.2 saturated their masks at -2 and a causal mask leaked a tenth of each
row."""


def masked_floor(high: Tensor) -> Tensor:
    """The value a masked tensor's grid must reach down to, given its largest value `high`."""
    return high - MASK_MARGIN


def unmasked(x: Tensor) -> Tensor:
    """`x` without its -inf values (flattened when it had any). -inf is a masked value (an
    attention mask, `masked_fill(mask, -inf)` before a softmax): the quantizer saturates it to
    its lowest code, so it must not widen the range the other values are quantized in."""
    if x.is_floating_point() and bool(torch.isneginf(x.detach()).any()):
        return x.detach()[~torch.isneginf(x.detach())]
    return x


class Observer(nn.Module):
    """Base class: min/max bookkeeping, per tensor or per channel along `axis`."""

    def __init__(self, axis: int | None = None, channels: int = 1) -> None:
        super().__init__()
        self.axis = axis
        shape = () if axis is None else (channels,)
        self.register_buffer("min_val", torch.zeros(shape))
        self.register_buffer("max_val", torch.zeros(shape))
        self.register_buffer("observed", torch.tensor(False))
        self.register_buffer("masked", torch.tensor(False))  # saw -inf: keep mask headroom

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list, *args: object) -> None:
        """A state_dict saved before masks were tracked has no `masked`: it saw none."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      *args)
        if prefix + "masked" in missing_keys:
            missing_keys.remove(prefix + "masked")

    def _batch_min_max(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The batch's min and max (per channel along `axis`), -inf values left out (masked);
        NaN or +inf raise `NonFiniteError` (they would make every later range meaningless).
        The histogram counts no -inf either: `histc` skips values beyond its range."""
        if self.axis is None:
            low, high = torch.aminmax(x.detach().float())
        else:
            flat = x.detach().float().transpose(0, self.axis).reshape(x.shape[self.axis], -1)
            low, high = torch.aminmax(flat, dim=1)
        if not bool(torch.isfinite(low.sum() + high.sum())):  # one sync; NaN/Inf propagate
            if not (self.axis is None and bool(torch.isneginf(low))
                    and bool(torch.isfinite(high))):
                raise NonFiniteError(self)
            low, high = torch.aminmax(unmasked(x).float())  # -inf: masked, not in the range
            low = torch.minimum(low, masked_floor(high))  # but the grid reaches below it
            self.masked.fill_(True)
        return low, high

    def forward(self, x: Tensor) -> Tensor:
        """Record `x` and return it unchanged (its -inf values left out: see `unmasked`)."""
        if x.numel() > 0:
            self.update(x)
        return x

    def update(self, x: Tensor) -> None:
        self._merge(*self._batch_min_max(x))

    def _merge(self, batch_min: Tensor, batch_max: Tensor) -> None:
        if bool(self.observed):
            self.min_val.copy_(torch.minimum(self.min_val, batch_min))
            self.max_val.copy_(torch.maximum(self.max_val, batch_max))
        else:
            self.min_val.copy_(batch_min)
            self.max_val.copy_(batch_max)
            self.observed.fill_(True)

    def max_abs(self) -> Tensor:
        """Largest magnitude the observer accepts as the tensor's range."""
        return torch.maximum(self.min_val.abs(), self.max_val.abs())

    def exponent(self, qmax: int) -> Tensor:
        """Proposed exponent(s): by default the smallest that never clips (nor leaves a mask
        less than `MASK_MARGIN` below the largest value)."""
        return torch.maximum(exponent_for_max(self.max_abs(), qmax),
                             self.mask_floor_exponent(qmax))

    def mask_floor_exponent(self, qmax: int) -> Tensor:
        """The least exponent whose lowest code reaches `masked_floor` (masked tensors; a
        tensor without masks has no floor)."""
        if not bool(self.masked):
            return torch.tensor(-float("inf"), device=self.max_val.device)
        return exponent_for_max((-masked_floor(self.max_val)).clamp(min=0), qmax)


class MinMaxObserver(Observer):
    """Running min/max over everything seen: never clips, sensitive to outliers."""


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min/max: robust to a rare extreme batch."""

    def __init__(self, momentum: float = 0.1, axis: int | None = None, channels: int = 1) -> None:
        super().__init__(axis, channels)
        self.momentum = momentum

    def update(self, x: Tensor) -> None:
        batch_min, batch_max = self._batch_min_max(x)
        if bool(self.observed):
            self.min_val.lerp_(batch_min, self.momentum)
            self.max_val.lerp_(batch_max, self.momentum)
        else:
            self.min_val.copy_(batch_min)
            self.max_val.copy_(batch_max)
            self.observed.fill_(True)


class HistogramObserver(Observer):
    """Histogram of |x| over [0, 2**range_exponent] plus an exponent search (MSE or percentile).

    The histogram's range is a power of two and its bin count too, so when a batch exceeds the
    range the range doubles (as often as needed) and adjacent bins merge exactly: no resampling
    error. Batches of more than `SAMPLE_SIZE` values are counted from a strided sample, scaled
    to the batch's size; smaller ones exactly, independently of how they were batched.
    """

    def __init__(self, bins: int = 2048, search: str = "mse", percentile: float = 99.99) -> None:
        super().__init__()
        self.bins = bins
        self.search = search
        self.percentile = percentile
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("range_exponent", torch.tensor(0, dtype=torch.int64))

    def update(self, x: Tensor) -> None:
        first = not bool(self.observed)
        batch_min, batch_max = self._batch_min_max(x)
        self._merge(batch_min, batch_max)
        peak = torch.maximum(batch_min.abs(), batch_max.abs())
        needed = int(exponent_for_max(peak, 1).item())
        if first:
            self.range_exponent.fill_(needed)
        elif needed > int(self.range_exponent):
            self.widen(needed)
        top = 2.0 ** int(self.range_exponent)
        sample = strided_sample(x.detach().reshape(-1))
        counts = torch.histc(sample.float().abs(), bins=self.bins, min=0.0, max=top)
        self.histogram += counts.to(torch.float64) * (x.numel() / sample.numel())

    def widen(self, new_exponent: int) -> None:
        """Double the range until it is 2**new_exponent, merging adjacent bins (exact)."""
        factor = 2 ** (new_exponent - int(self.range_exponent))
        merged = torch.zeros_like(self.histogram)
        if factor >= self.bins:
            merged[0] = self.histogram.sum()
        else:
            kept = self.bins // factor
            merged[:kept] = self.histogram.view(kept, factor).sum(dim=1)
        self.histogram.copy_(merged)
        self.range_exponent.fill_(new_exponent)

    def bin_centers(self) -> Tensor:
        width = 2.0 ** int(self.range_exponent) / self.bins
        device = self.histogram.device
        return (torch.arange(self.bins, dtype=torch.float64, device=device) + 0.5) * width

    def exponent(self, qmax: int) -> Tensor:
        no_clip = super().exponent(qmax)
        if self.search == "none" or self.histogram.sum() == 0:
            return no_clip
        floor = self.mask_floor_exponent(qmax)
        if self.search == "percentile":
            return torch.maximum(torch.minimum(no_clip, self._percentile_exponent(qmax)), floor)
        candidates = [no_clip - step for step in range(SEARCH_DEPTH + 1)
                      if bool(no_clip - step >= floor)]
        errors = [self.expected_error(candidate, qmax) for candidate in candidates]
        best = min(range(len(candidates)), key=lambda index: (errors[index], index))
        return candidates[best]

    def _percentile_exponent(self, qmax: int) -> Tensor:
        cumulative = torch.cumsum(self.histogram, dim=0)
        wanted = cumulative[-1] * (self.percentile / 100.0)
        index = int(torch.searchsorted(cumulative, wanted).clamp(max=self.bins - 1))
        width = 2.0 ** int(self.range_exponent) / self.bins
        return exponent_for_max(torch.tensor((index + 1) * width, device=self.histogram.device),
                                qmax)

    def expected_error(self, exponent: Tensor, qmax: int) -> float:
        """Sum of squared quantization errors of the histogram's values at scale 2**exponent.

        Values are placed at bin centers; where bins are coarse against the step, the rounding
        error of a bin is taken as the uniform-noise step**2 / 12 instead.
        """
        step = 2.0 ** float(exponent)
        clip = qmax * step
        centers = self.bin_centers()
        width = 2.0 ** int(self.range_exponent) / self.bins
        if width <= step / 4:
            rounded = torch.clamp(torch.round(centers / step) * step, max=clip)
            error = (centers - rounded) ** 2
        else:
            error = torch.where(
                centers > clip, (centers - clip) ** 2, torch.full_like(centers, step**2 / 12)
            )
        return float((error * self.histogram).sum())


class WeightMSEObserver(MinMaxObserver):
    """Min/max plus a least-squares exponent search on the (static) weight it saw last.

    Among the never-clipping exponent and up to `SEARCH_DEPTH` below it, keep the one with the
    smallest squared quantization error, per channel when `axis` is set. A lower exponent
    saturates a few outlier weights and halves the step of all the others: this is the
    weight-clipping step, decided by error rather than by a fixed threshold.
    """

    def __init__(self, axis: int | None = None, channels: int = 1) -> None:
        super().__init__(axis, channels)
        self.register_buffer("chosen_exponent", torch.zeros_like(self.min_val))
        """Exponent(s) chosen by the layer's output error on calibration data
        (`quantfx.ptc.weight_search`); they replace the weight-error search while `chosen`."""
        self.register_buffer("chosen", torch.tensor(False))

    def update(self, x: Tensor) -> None:
        super().update(x)
        self.__dict__["last_weight"] = x.detach()

    def choose(self, exponent: Tensor | None) -> None:
        """Fix the exponent(s) to `exponent` (None: back to the weight-error search)."""
        self.chosen.fill_(exponent is not None)
        if exponent is not None:
            self.chosen_exponent.copy_(exponent.reshape(self.chosen_exponent.shape))

    def exponent(self, qmax: int) -> Tensor:
        if bool(self.chosen):
            return self.chosen_exponent.clone()
        no_clip = super().exponent(qmax)
        weight = self.__dict__.get("last_weight")
        if weight is None:
            return no_clip
        # The search costs a few passes over the weight: reuse it while the weight is unchanged
        # (the key survives deepcopy, unlike tensor identity or version counters).
        fingerprint = float(weight.double().sum()), float(weight.double().pow(2).sum())
        key = (qmax, tuple(weight.shape), fingerprint, tuple(no_clip.flatten().tolist()))
        cached = self.__dict__.get("searched")
        if cached is not None and cached[0] == key:
            return cached[1].clone()
        best = self._search(weight, no_clip, qmax)
        self.__dict__["searched"] = (key, best)
        return best.clone()

    def _search(self, weight: Tensor, no_clip: Tensor, qmax: int) -> Tensor:
        return least_error_exponent(weight, qmax, self.axis, no_clip)


def make_observer(kind: str, **options) -> Observer:
    """Build an observer by its `QuantConfig` name."""
    if kind == "minmax":
        return MinMaxObserver(axis=options.get("axis"), channels=options.get("channels", 1))
    if kind == "mse":
        return WeightMSEObserver(axis=options.get("axis"), channels=options.get("channels", 1))
    if kind == "moving_average":
        return MovingAverageMinMaxObserver(
            momentum=options.get("momentum", 0.1),
            axis=options.get("axis"),
            channels=options.get("channels", 1),
        )
    if kind == "histogram":
        return HistogramObserver(
            bins=options.get("bins", 2048),
            search=options.get("search", "mse"),
            percentile=options.get("percentile", 99.99),
        )
    raise ValueError(f"unknown observer kind {kind!r}")
