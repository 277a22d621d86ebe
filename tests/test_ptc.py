"""prepare / calibrate / convert: the public API, the numerics contract and the errors."""

import copy
import warnings

import pytest
import torch
from torch import nn

import quantfx as qf
from quantfx.layers import IntegerLayer
from quantfx.qmath import exponent_for_max, is_power_of_two
from quantfx.quantizers import CalibrationQuantizer, FrozenQuantizer
from quantfx.state import state_of
from tests.helpers import ConvBnReLU, quantize_model, randomize_batchnorm

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(42))


def test_prepare_leaves_the_users_model_untouched():
    model = randomize_batchnorm(ConvBnReLU()).train()
    before = copy.deepcopy(model.state_dict())
    prepared = qf.prepare(model, X)
    qf.calibrate(prepared, [X])
    qf.convert(prepared)
    assert model.training and model.relu.inplace
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_converted_model_scales_are_powers_of_two_and_outputs_on_grid():
    torch.manual_seed(0)
    prepared, converted = quantize_model(randomize_batchnorm(ConvBnReLU()))
    quantizers = [m for m in converted.modules() if isinstance(m, FrozenQuantizer)]
    layers = {name: m for name, m in converted.named_modules() if isinstance(m, IntegerLayer)}
    assert quantizers and len(layers) == 3
    for quantizer in quantizers:
        assert is_power_of_two(quantizer.scale)
    wide = set(state_of(prepared).measured_sixteen_bit)  # e.g. the output layer, if measured
    for name, layer in layers.items():
        for exponent in (
            layer.weight_exponent.flatten().tolist() + layer.bias_exponent.flatten().tolist()
        ):
            assert exponent == int(exponent)
        assert layer.weight_int.dtype == (torch.int16 if name in wide else torch.int8)
        assert layer.bias_int.dtype == torch.int32
        assert torch.equal(layer.bias_exponent, layer.input_exponent + layer.weight_exponent)
    with torch.no_grad():
        output = converted(X)
    scale = converted.get_submodule("quantizers.fc").scale
    assert torch.equal(output / scale, torch.round(output / scale))
    assert not any(isinstance(m, CalibrationQuantizer) for m in converted.modules())


def test_convert_twice_and_call_twice_are_bit_identical():
    prepared, converted = quantize_model(randomize_batchnorm(ConvBnReLU()))
    again = qf.convert(prepared)
    with torch.no_grad():
        first = converted(X)
        assert torch.equal(first, converted(X))
        assert torch.equal(first, again(X))
        assert torch.equal(first, copy.deepcopy(converted)(X))


def test_converted_model_is_eval_only():
    _, converted = quantize_model(ConvBnReLU())
    assert not converted.training
    with pytest.raises(qf.QuantFxError, match="inference-only"):
        converted.train()
    converted.eval()


def test_plain_forward_passes_calibrate():
    """A prepared model observes in plain forward passes, as `calibrate` does."""
    model = randomize_batchnorm(ConvBnReLU()).eval()
    prepared = qf.prepare(model, X)
    with torch.no_grad():
        prepared(X)
        converted = qf.convert(prepared)
        assert qf.qmath.sqnr_db(model(X), converted(X)) > 20.0


def test_a_calibrated_model_simulates_the_quantized_one_and_observes_no_more():
    """After `calibrate` the prepared model's forward is the converted model's (float biases
    aside), and running it on other data (a user checking it) moves no range: it kept
    observing, and `convert` then used ranges that bias calibration was not fitted to."""
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvBnReLU(16)).eval()
    prepared, converted = quantize_model(model, batches=4)
    with torch.no_grad():
        simulated = prepared(X)
        assert qf.qmath.sqnr_db(converted(X), simulated) > 40.0
        assert qf.qmath.sqnr_db(model(X), simulated) < 60.0  # quantized, not float
        prepared(X * 50)
        assert torch.equal(qf.convert(prepared)(X), converted(X))


def test_quantized_output_is_close_to_float():
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvBnReLU(16)).eval()
    _, converted = quantize_model(model, batches=8)
    with torch.no_grad():
        assert qf.qmath.sqnr_db(model(X), converted(X)) > 20.0


def test_sixteen_bit_is_much_closer_than_eight_bit():
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvBnReLU(16)).eval()
    _, eight = quantize_model(model)
    _, sixteen = quantize_model(model, config=qf.QuantConfig(activation_bits=16, weight_bits=16))
    with torch.no_grad():
        reference = model(X)
        assert qf.qmath.sqnr_db(reference, sixteen(X)) > qf.qmath.sqnr_db(reference, eight(X)) + 30
    assert {m.bits for m in sixteen.modules() if isinstance(m, FrozenQuantizer)} == {16}


def _input_exponent_expected(observer: str, search: str, batches: list) -> tuple[float, float]:
    """(lowest, highest) exponent the input quantizer may get for these batches."""
    no_clip = float(exponent_for_max(torch.cat(batches).abs().max(), 127))
    if observer == "moving_average":
        low, high = torch.aminmax(batches[0])
        for batch in batches[1:]:
            low, high = low + 0.1 * (batch.min() - low), high + 0.1 * (batch.max() - high)
        exponent = float(exponent_for_max(torch.maximum(low.abs(), high.abs()), 127))
        return exponent, exponent
    if observer == "minmax" or search == "none":
        return no_clip, no_clip
    return no_clip - 4, no_clip  # a search may clip, at most SEARCH_DEPTH steps


@pytest.mark.parametrize("observer,search", [
    ("minmax", "mse"), ("moving_average", "mse"),
    ("histogram", "mse"), ("histogram", "percentile"), ("histogram", "none"),
])
def test_every_observer_choice_gives_the_exponent_it_promises(observer, search):
    config = qf.QuantConfig(activation_observer=observer, range_search=search, percentile=99.0,
                            progress=False)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 16, 16, generator=generator) * (1 + index) for index in range(3)]
    model = randomize_batchnorm(ConvBnReLU(16)).eval()
    prepared = qf.prepare(model, batches[0], config)
    qf.calibrate(prepared, batches)
    converted = qf.convert(prepared)
    lowest, highest = _input_exponent_expected(observer, search, batches)
    exponent = float(converted.get_submodule("quantizers.x").exponent)
    assert lowest <= exponent <= highest
    if observer == "histogram" and search == "percentile":  # keeping 99 % must clip here
        assert exponent < highest
    with torch.no_grad():
        assert qf.qmath.sqnr_db(model(batches[2]), converted(batches[2])) > 15.0


def test_calibrate_accepts_dataloader_style_batches():
    """(inputs, labels) batches: the labels are dropped, and `num_batches` is the limit."""
    model = randomize_batchnorm(ConvBnReLU()).eval()
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(2, 3, 16, 16, generator=generator), torch.tensor([0, 1]))
               for _ in range(3)]
    batches[2] = (100 * batches[2][0], batches[2][1])  # would widen every range if used
    prepared, inputs_only = qf.prepare(model, X), qf.prepare(model, X)
    assert qf.calibrate(prepared, batches, num_batches=2) is prepared
    qf.calibrate(inputs_only, [inputs for inputs, _ in batches[:2]])
    for (key, value), other in zip(prepared.state_dict().items(),
                                   inputs_only.state_dict().values()):
        assert torch.equal(value, other), key


def test_a_fully_convolutional_model_calibrates_at_several_input_sizes():
    """An image pyramid (a detector's first stage): every size is observed; bias calibration and
    the check, which stack their samples, keep the batches of the first size."""
    model = randomize_batchnorm(ConvBnReLU()).eval()
    generator = torch.Generator().manual_seed(4)
    batches = [torch.randn(2, 3, size, size, generator=generator) for size in (16, 24, 16, 20)]
    prepared = qf.calibrate(qf.prepare(model, X), batches)
    assert state_of(prepared).calibration_check.samples == 4  # the two 16 x 16 batches
    converted = qf.convert(prepared)
    for batch in batches:
        with torch.no_grad():
            reference, output = model(batch), converted(batch)
        assert float((output - reference).pow(2).sum() / reference.pow(2).sum()) < 0.01


def test_equalization_is_on_where_the_profile_says_and_off_when_asked():
    """prepare equalizes when depthwise weights are per tensor (tda4vm); switching it off
    inside prepare passed every test before, since only `equalize()` itself was tested."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                          nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[2].weight[3].mul_(100.0)  # one depthwise channel 100x the others

    def spread(config: qf.QuantConfig) -> float:
        weight = qf.prepare(model, X, config).get_submodule("2").layer.weight.detach()
        ranges = weight.abs().flatten(1).amax(1)
        return float(ranges.max() / ranges.median())

    assert spread(qf.QuantConfig(target="tda4vm")) < 5
    assert spread(qf.QuantConfig(target="am68a")) > 50  # per-channel depthwise: not needed
    assert spread(qf.QuantConfig(target="tda4vm", equalization=False)) > 50
    assert spread(qf.QuantConfig(target="am68a", equalization=True)) < 5


# ---- errors: every one a QuantFxError that says what to do ----


def test_convert_before_calibration_is_an_error():
    with pytest.raises(qf.ConvertError, match="calibrate"):
        qf.convert(qf.prepare(ConvBnReLU(), X))


def test_convert_of_a_float_model_is_an_error():
    with pytest.raises(qf.ConvertError, match="prepare"):
        qf.convert(ConvBnReLU())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_data_is_an_error(bad):
    prepared = qf.prepare(ConvBnReLU(), X)
    data = X.clone()
    data[0, 0, 0, 0] = bad
    with pytest.raises(qf.CalibrationError, match="NaN or Inf"):
        qf.calibrate(prepared, [X, data])


def test_empty_calibration_data_is_an_error():
    with pytest.raises(qf.CalibrationError, match="empty"):
        qf.calibrate(qf.prepare(ConvBnReLU(), X), [])


def test_calibrating_a_float_model_is_an_error():
    with pytest.raises(qf.CalibrationError, match="prepare"):
        qf.calibrate(ConvBnReLU(), [X])


def test_model_without_quantizable_layer_is_an_error():
    with pytest.raises(qf.PrepareError, match="no quantizable layer"):
        qf.prepare(nn.Sequential(nn.ReLU(), nn.Flatten()), X)


@pytest.mark.parametrize("bad_inputs, message", [
    (torch.randn(2, 5, 16, 16), "expected input.*to have 3 channels"),
    ("image", "got str. Example"), ((), "non-empty tuple"), ((X, X), "takes 1 input")])
def test_wrong_example_inputs_are_an_error(bad_inputs, message):
    with pytest.raises(qf.PrepareError, match=message):
        qf.prepare(ConvBnReLU(), bad_inputs)


def test_not_a_module_is_an_error():
    with pytest.raises(qf.PrepareError, match="torch.nn.Module"):
        qf.prepare(lambda x: x, X)


@pytest.mark.parametrize(
    "field,value",
    [
        ("activation_bits", 7),
        ("weight_bits", 4),
        ("activation_observer", "kl"),
        ("histogram_bins", 1000),
        ("percentile", 10.0),
    ],
)
def test_bad_config_is_an_error(field, value):
    with pytest.raises(qf.ConfigError, match=field):
        qf.QuantConfig(**{field: value})


def test_preparing_twice_is_an_error():
    with pytest.raises(qf.PrepareError, match="already prepared"):
        qf.prepare(qf.prepare(ConvBnReLU(), X), X)


def test_all_errors_share_the_base_class():
    for error in (
        qf.ConfigError,
        qf.TraceError,
        qf.PrepareError,
        qf.CalibrationError,
        qf.ConvertError,
        qf.ExportError,
    ):
        assert issubclass(error, qf.QuantFxError)


def test_deep_copy_of_a_prepared_model_is_still_prepared():
    prepared = qf.prepare(ConvBnReLU(), X)
    qf.calibrate(prepared, [X])
    copied = copy.deepcopy(prepared)
    with torch.no_grad():
        assert torch.equal(qf.convert(copied)(X), qf.convert(prepared)(X))


def test_calibrating_a_qat_model_is_an_error():
    with pytest.raises(qf.CalibrationError, match="prepare_qat"):
        qf.calibrate(qf.prepare_qat(ConvBnReLU(), X), [X])


class NegativeSqrt(nn.Module):
    """Float-finite data that turns NaN inside the model (sqrt of a negative value)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.sqrt(self.conv(x))


def test_nan_made_inside_the_model_is_refused_naming_the_tensor():
    torch.manual_seed(0)
    prepared = qf.prepare(NegativeSqrt(), (torch.rand(1, 3, 8, 8),), qf.QuantConfig(progress=False))
    with pytest.raises(qf.NonFiniteError, match="tensor 'sqrt' holds NaN"):
        qf.calibrate(prepared, [torch.randn(2, 3, 8, 8)])


class DepthwisePair(nn.Module):
    """A depthwise conv whose channels differ 50x in scale, then a pointwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.relu = nn.ReLU()
        self.pointwise = nn.Conv2d(4, 6, 1)
        with torch.no_grad():
            self.depthwise.weight.mul_(torch.logspace(0, -1.7, 4).reshape(4, 1, 1, 1))

    def forward(self, x):
        return self.pointwise(self.relu(self.depthwise(x)))


def _channel_spread(weight: torch.Tensor) -> float:
    peaks = weight.detach().abs().flatten(1).amax(dim=1)
    return float(peaks.max() / peaks.min())


def test_prepare_equalizes_where_depthwise_weights_are_per_tensor():
    """The wiring and default of cross-layer equalization: `prepare` for TDA4VM (per-tensor
    depthwise weights) evens out the depthwise channels by default; per-channel depthwise
    (the generic default) or equalization=False leaves them as they are."""
    torch.manual_seed(0)
    model, example = DepthwisePair().eval(), (torch.randn(1, 4, 6, 6),)
    float_spread = _channel_spread(model.depthwise.weight)

    def spread(config: qf.QuantConfig) -> float:
        prepared = qf.prepare(model, example, config)
        return _channel_spread(prepared.get_submodule("depthwise").layer.weight)

    assert spread(qf.QuantConfig(target="tda4vm", progress=False)) < float_spread / 4
    for config in (qf.QuantConfig(progress=False),
                   qf.QuantConfig(target="tda4vm", equalization=False, progress=False)):
        assert spread(config) == pytest.approx(float_spread)


def test_prelu_slopes_are_quantized_per_tensor_as_tidl_runs_them():
    """TIDL quantizes PReLU's slopes symmetric per tensor: prepare gives them a weight quantizer
    (no float-parameter warning), convert puts them on the never-clipping 8-bit grid, and QAT
    trains them through it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        model[1].weight.uniform_(0.05, 0.5)
        model[1].weight[0] = 0.001  # a slope finer than the grid the others need
    data = torch.randn(8, 3, 10, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", qf.QuantFxWarning)
        prepared = qf.prepare(model.eval(), data[:2])
    converted = qf.convert(qf.calibrate(prepared, [data]))
    slopes = converted.get_submodule("1").slope()
    exponent = exponent_for_max(model[1].weight.detach().abs().max(), 127)
    assert torch.equal(slopes / 2.0 ** exponent, torch.round(slopes / 2.0 ** exponent))
    assert float((slopes - model[1].weight.detach()).abs().max()) <= 2.0 ** (exponent - 1)
    assert float(slopes[0]) == 0.0  # rounded away, as on the device
    qat = qf.prepare_qat(model.train(), data[:2])
    qat(data).pow(2).mean().backward()
    layer = qat.get_submodule("1")
    assert layer.weight.grad is not None and bool(layer.weight.grad.abs().sum() > 0)
    assert torch.equal(layer.slope(), converted.get_submodule("1").slope())
