"""Range estimators: bookkeeping, exact histogram widening, exponent search."""

import pytest
import torch

from quantfx.errors import NonFiniteError
from quantfx.observers import (
    MASK_MARGIN,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
)
from quantfx.qmath import exponent_for_max, fake_quantize
from quantfx.quantizers import QATQuantizer


def test_minmax_tracks_extremes_over_batches():
    observer = MinMaxObserver()
    observer(torch.tensor([-1.0, 2.0]))
    observer(torch.tensor([-3.0, 0.5]))
    assert observer.min_val.item() == -3.0 and observer.max_val.item() == 2.0
    assert observer.exponent(127).item() == exponent_for_max(torch.tensor(3.0), 127).item()


def test_per_channel_minmax():
    observer = MinMaxObserver(axis=0, channels=2)
    observer(torch.tensor([[1.0, -2.0], [10.0, 20.0]]))
    assert observer.max_abs().tolist() == [2.0, 20.0]


def test_moving_average_damps_a_single_outlier_batch():
    observer = MovingAverageMinMaxObserver(momentum=0.1)
    for _ in range(10):
        observer(torch.tensor([-1.0, 1.0]))
    observer(torch.tensor([-100.0, 100.0]))
    assert 10.0 < observer.max_val.item() < 12.0


def test_histogram_does_not_depend_on_batching():
    torch.manual_seed(0)
    data = torch.randn(4096) * torch.linspace(0.01, 30.0, 4096)
    whole = HistogramObserver(bins=256)
    whole(data)
    pieces = HistogramObserver(bins=256)
    for chunk in data.sort().values.abs().chunk(16):  # growing ranges force repeated widening
        pieces(chunk)
    assert torch.equal(whole.histogram, pieces.histogram)
    assert int(whole.range_exponent) == int(pieces.range_exponent)
    assert whole.exponent(127).item() == pieces.exponent(127).item()


def test_large_batches_are_counted_from_a_spread_sample(monkeypatch):
    from quantfx import observers

    torch.manual_seed(0)
    # (N, C, H, W) whose channels differ 100x in scale: a sample that aliased onto a few
    # channels would get the histogram badly wrong
    data = torch.randn(8, 16, 48, 48) * torch.logspace(-1, 1, 16).view(1, 16, 1, 1)
    stride = observers.sample_stride(data.numel())
    assert data.numel() % stride and all(stride % d for d in range(2, stride))
    channels = (torch.arange(0, data.numel(), stride) // (48 * 48)) % 16
    assert torch.bincount(channels, minlength=16).min() > 0.9 * len(channels) / 16
    sampled = HistogramObserver()
    sampled(data)
    assert sampled.histogram.sum().item() == pytest.approx(data.numel())  # scaled to the batch
    assert sampled.max_val.item() == data.max().item()  # min/max from every value
    monkeypatch.setattr(observers, "SAMPLE_SIZE", 1 << 40)
    exact = HistogramObserver()
    exact(data)
    assert sampled.exponent(127).item() == exact.exponent(127).item()
    assert sampled.exponent(255).item() == exact.exponent(255).item()


def _real_mse(data, exponent, qmax=127):
    return (fake_quantize(data, exponent, -128, qmax) - data).pow(2).mean().item()


def test_mse_search_never_worse_than_round_up():
    torch.manual_seed(0)
    data = torch.cat([torch.randn(20000), torch.tensor([40.0, -35.0])])  # rare outliers
    observer = HistogramObserver(bins=2048, search="mse")
    observer(data)
    no_clip = exponent_for_max(data.abs().max(), 127)
    chosen = observer.exponent(127)
    assert chosen.item() < no_clip.item()  # the outliers are worth clipping here
    assert _real_mse(data, chosen) <= _real_mse(data, no_clip)


def test_mse_search_keeps_round_up_without_outliers():
    data = torch.linspace(-1.5, 1.5, 10001)  # uses 3/4 of the never-clipping range
    observer = HistogramObserver(search="mse")
    observer(data)
    assert observer.exponent(127).item() == exponent_for_max(torch.tensor(1.5), 127).item()


def test_mse_search_halves_the_step_when_the_range_barely_overflows():
    # max 1.0 needs scale 2**-6 (127/64 covers it); 2**-7 clips only the top 0.8 %: better.
    data = torch.linspace(-1.0, 1.0, 10001)
    observer = HistogramObserver(search="mse")
    observer(data)
    chosen = observer.exponent(127)
    assert chosen.item() == -7.0
    assert _real_mse(data, chosen) < _real_mse(data, torch.tensor(-6.0))


def test_percentile_search_clips_the_tail():
    data = torch.cat([torch.rand(100000), torch.tensor([1000.0])])
    observer = HistogramObserver(search="percentile", percentile=99.9)
    observer(data)
    assert observer.exponent(255).item() == exponent_for_max(torch.tensor(1.0), 255).item()
    none = HistogramObserver(search="none")
    none(data)
    assert none.exponent(255).item() == exponent_for_max(torch.tensor(1000.0), 255).item()


def test_state_dict_round_trip():
    observer = HistogramObserver()
    observer(torch.randn(1000) * 5)
    restored = HistogramObserver()
    restored.load_state_dict(observer.state_dict())
    assert restored.exponent(127).item() == observer.exponent(127).item()


def test_weight_mse_search_never_worse_than_round_up():
    from quantfx.observers import WeightMSEObserver

    torch.manual_seed(0)
    weight = torch.randn(16, 8, 3, 3) * 0.05
    weight[0, 0, 0, 0] = 1.0  # one outlier weight
    for axis, channels in ((None, 1), (0, 16)):
        observer = WeightMSEObserver(axis=axis, channels=channels)
        observer(weight)
        chosen = observer.exponent(127)
        no_clip = MinMaxObserver(axis=axis, channels=channels)
        no_clip(weight)
        round_up = no_clip.exponent(127)
        assert (chosen <= round_up).all()
        error_chosen = (fake_quantize(weight, chosen, -128, 127, axis) - weight).pow(2).sum()
        error_round_up = (fake_quantize(weight, round_up, -128, 127, axis) - weight).pow(2).sum()
        assert error_chosen <= error_round_up
        if axis is None:
            assert chosen < round_up  # clipping the lone outlier pays for everyone else


@pytest.mark.parametrize("observer", [MinMaxObserver, MovingAverageMinMaxObserver,
                                      HistogramObserver])
@pytest.mark.parametrize("spread", [3.0, 0.05])
def test_masked_values_keep_their_headroom_and_nothing_else(observer, spread):
    """-inf is a masked value (masked_fill before a softmax): it saturates to the lowest code,
    so the range is the other values' except that the lowest code must lie MASK_MARGIN below
    their largest (else a softmax gives masked entries weight: scores of +-0.2 saturated their
    mask at -2). NaN and +inf still raise."""
    values = torch.randn(64, generator=torch.Generator().manual_seed(0)) * spread
    masked = values.clone()
    masked[::4] = float("-inf")
    plain, with_mask = observer(), observer()
    plain(values[masked.isfinite()])
    assert torch.equal(with_mask(masked), masked)  # returned unchanged
    assert float(with_mask.max_val) == float(plain.max_val)
    floor = float(plain.max_val - MASK_MARGIN)  # in float32, as the observer computes it
    assert float(with_mask.min_val) == min(float(plain.min_val), floor)
    exponent = int(with_mask.exponent(127))
    assert -128 * 2.0 ** exponent <= floor  # a masked entry lands at least 12 below the top
    if spread == 3.0 and observer is not HistogramObserver:  # the floor is inside the range
        assert exponent == int(plain.exponent(127))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteError):
            observer()(torch.tensor([1.0, bad]))


def test_qat_quantizer_ranges_ignore_masked_values():
    quantizer = QATQuantizer(8, signed=True).train()
    scores = torch.tensor([[-2.0, float("-inf")], [1.0, 0.5]])
    out = quantizer(scores)
    assert float(quantizer.observer.max_val) == 1.0
    assert float(quantizer.observer.min_val) == 1.0 - MASK_MARGIN  # the mask's headroom
    assert float(out[0, 1]) == -128 * 2.0 ** float(quantizer.exponent)  # saturated, finite
    assert float(out[0, 1]) <= 1.0 - MASK_MARGIN
