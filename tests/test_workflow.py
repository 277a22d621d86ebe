"""Real workflows around the three stages: saving, reloading, re-calibrating, resuming.

What this file checks, on tiny models and a few random batches:

- a calibrated model's ``state_dict`` loaded into a fresh ``prepare`` converts to the same
  integers and outputs, also where the MSE weight search clips an outlier;
- ``calibrate`` twice on the same data equals once; per-batch calibration keeps every batch's
  ranges and its bias calibration still helps;
- ``prepare_qat`` of a prepared model takes its schedule from the given config and refuses a
  config that would change the prepared graph;
- a conv called at two sites gets its own bias correction at each site;
- ``torch.save`` / ``pickle`` of prepared, QAT and converted models: the reloaded models convert
  (or run) bit for bit like the originals, a converted one stays eval-only, a QAT one trains on;
- ``state_dict`` round trips of converted and QAT models;
- converting an untrained QAT model says to train it;
- the ONNX export of a reloaded converted model equals the export of the original.
"""

import copy
import dataclasses
import io
import pickle

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import quantfx as qf
from quantfx.convert import QuantizedGraphModule
from quantfx.layers import FakeQuantLayer, IntegerLayer
from quantfx.qat import QATLayer
from quantfx.qmath import exponent_for_max
from quantfx.quantizers import CalibrationQuantizer
from tests.helpers import ConvBnReLU, randomize_batchnorm

CONFIG = qf.QuantConfig(progress=False)
SHAPE = (2, 3, 16, 16)


def _data(count: int, shape=SHAPE, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(ConvBnReLU(8), seed=seed).eval()


def _run(model: nn.Module, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(batch) for batch in batches]


def _assert_same_outputs(first: nn.Module, second: nn.Module, batches) -> None:
    for index, (a, b) in enumerate(zip(_run(first, batches), _run(second, batches))):
        assert torch.equal(a, b), f"batch {index}: max diff {(a - b).abs().max().item()}"


def _integer_layers(model: nn.Module) -> dict[str, IntegerLayer]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, IntegerLayer)}


def _layers_in_graph_order(model, kind) -> list[nn.Module]:
    modules = [model.get_submodule(node.target) for node in model.graph.nodes
               if node.op == "call_module"]
    return [module for module in modules if isinstance(module, kind)]


def _torch_round_trip(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _pickle_round_trip(model: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(model))


ROUND_TRIPS = pytest.mark.parametrize("round_trip", [_torch_round_trip, _pickle_round_trip],
                                      ids=["torch.save", "pickle"])


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches) -> None:
    """An ordinary training loop: forward, loss, backward, step."""
    model.train()
    for index, batch in enumerate(batches):
        target = torch.full((batch.shape[0],), index % 4, dtype=torch.long)
        loss = nn.functional.cross_entropy(model(batch), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


# ------------------------------------------------------------------ state_dict of a calibration


class OutlierNet(nn.Module):
    """conv → relu → conv → pool → linear, no BatchNorm; conv1's weight has one big outlier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            weight = self.conv1.weight
            weight[0, 0, 0, 0] = 20 * weight.std()
            # Scale so the outlier lies just past 127 * 2**-7: one exponent lower clips it by
            # 2 % and halves the step of the 863 ordinary weights.
            weight.mul_(1.02 * 127 * 2.0**-7 / weight[0, 0, 0, 0])

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_calibrated_state_dict_reloads_into_a_fresh_prepare_bit_for_bit():
    torch.manual_seed(0)
    model = OutlierNet().eval()
    data = _data(3)
    config = qf.QuantConfig(progress=False, widen_coarse_weights=False)  # 8 bit: MSE clips
    prepared = qf.prepare(model, (data[0],), config)
    qf.calibrate(prepared, data)
    converted = qf.convert(prepared)

    never_clipping = exponent_for_max(model.conv1.weight.detach().abs().max(), 127)
    chosen = converted.get_submodule("conv1").weight_exponent
    assert float(chosen) < float(never_clipping), "the MSE weight search did not clip"
    assert int(converted.get_submodule("conv1").weight_int.flatten()[0]) == 127  # saturated

    fresh = qf.prepare(model, (data[0],), config)
    fresh.load_state_dict(prepared.state_dict())
    reloaded = qf.convert(fresh)
    _assert_same_outputs(converted, reloaded, data + _data(2, seed=1))
    original_layers, reloaded_layers = _integer_layers(converted), _integer_layers(reloaded)
    assert original_layers.keys() == reloaded_layers.keys() and original_layers
    for name, layer in original_layers.items():
        for buffer in ("weight_exponent", "weight_int", "bias_int"):
            assert torch.equal(getattr(layer, buffer), getattr(reloaded_layers[name], buffer)), (
                name, buffer)


# ----------------------------------------------------------------------------- re-calibration


def _calibrated(model: nn.Module, calls, config=CONFIG):
    """prepare, then one `calibrate` per item of `calls` (each a list of batches)."""
    prepared = qf.prepare(model, (calls[0][0],), config)
    for batches in calls:
        qf.calibrate(prepared, batches)
    return prepared


def _biases(prepared) -> dict[str, torch.Tensor]:
    return {name: module.layer.bias.detach().clone() for name, module in prepared.named_modules()
            if isinstance(module, FakeQuantLayer)}


def test_calibrating_twice_on_the_same_data_equals_calibrating_once():
    model = _model()
    data = _data(3)
    once = _calibrated(model, [data])
    twice = _calibrated(model, [data, data])
    biases_once, biases_twice = _biases(once), _biases(twice)
    assert biases_once.keys() == biases_twice.keys() and biases_once
    for name, bias in biases_once.items():
        assert torch.equal(bias, biases_twice[name]), name
    converted_once, converted_twice = qf.convert(once), qf.convert(twice)
    for name, buffer in converted_once.named_buffers():
        if name.endswith("exponent"):
            assert torch.equal(buffer, converted_twice.get_buffer(name)), name
    _assert_same_outputs(converted_once, converted_twice, data + _data(2, seed=1))


class BiasedWeights(nn.Module):
    """Weights just below a rounding boundary: quantization shifts every output one way."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 1)
        self.head = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            codes = torch.randint(1, 120, self.conv.weight.shape).float()
            self.conv.weight.copy_((codes + 0.45) * 2.0**-7)  # every weight rounds down
            self.conv.bias.zero_()

    def forward(self, x):
        return self.head(self.conv(x))


def _output_mean_error(model: nn.Module, converted: nn.Module, batches) -> float:
    """Largest per-channel difference of the output means, float model vs converted."""
    data = torch.cat(batches)
    with torch.no_grad():
        difference = model(data).mean((0, 2, 3)) - converted(data).mean((0, 2, 3))
    return float(difference.abs().max())


def test_calibrating_batch_by_batch_keeps_all_ranges_and_still_corrects_biases():
    torch.manual_seed(1)
    model = BiasedWeights().eval()
    generator = torch.Generator().manual_seed(2)
    data = [torch.rand(8, 4, 6, 6, generator=generator) + 0.5 for _ in range(4)]
    # round-to-nearest: error feedback would take the rounded-down weights' bias back itself
    config = qf.QuantConfig(weight_observer="minmax", weight_rounding="nearest", progress=False)
    per_batch = _calibrated(model, [[batch] for batch in data], config)
    all_at_once = _calibrated(model, [data], config)
    # the input's range saw every batch, exactly as one calibrate over all of them
    for buffer in ("histogram", "min_val", "max_val"):
        assert torch.equal(per_batch.get_buffer(f"quantizers.x.observer.{buffer}"),
                           all_at_once.get_buffer(f"quantizers.x.observer.{buffer}")), buffer
    assert torch.equal(per_batch.get_buffer("quantizers.x.exponent"),
                       all_at_once.get_buffer("quantizers.x.exponent"))
    without = _calibrated(model, [data], dataclasses.replace(config, bias_calibration=False))
    error_per_batch = _output_mean_error(model, qf.convert(per_batch), data)
    error_without = _output_mean_error(model, qf.convert(without), data)
    assert error_per_batch <= error_without, (error_per_batch, error_without)
    assert error_per_batch < error_without / 2, (error_per_batch, error_without)


# ------------------------------------------------------------------------- QAT from a prepare


def test_prepare_qat_of_a_prepared_model_uses_the_given_schedule():
    model = _model()
    data = _data(2)
    prepared = _calibrated(model, [data])
    schedule = qf.QATSchedule(freeze_bn_step=3, freeze_ranges_step=1)
    qm = qf.prepare_qat(prepared, (data[0],), qf.QuantConfig(qat_schedule=schedule,
                                                               progress=False))
    assert qm.qat_controller.schedule == schedule
    assert qm.qat_controller.schedule != qf.QATSchedule()
    _train(qm, torch.optim.SGD(qm.parameters(), lr=0.01), data)  # two steps: ranges frozen
    assert bool(qm.qat_controller.ranges_frozen)
    assert not bool(qm.qat_controller.bn_frozen)

    default = qf.prepare_qat(prepared, (data[0],))
    assert default.qat_controller.schedule == qf.QATSchedule()


def test_prepare_qat_refuses_a_config_that_changes_the_prepared_graph():
    data = _data(1)
    prepared = _calibrated(_model(), [data])
    with pytest.raises(qf.ConfigError, match="activation_bits"):
        qf.prepare_qat(prepared, (data[0],), qf.QuantConfig(activation_bits=16, progress=False))
    with pytest.raises(qf.ConfigError, match="weight_bits"):
        qf.prepare_qat(prepared, (data[0],), qf.QuantConfig(weight_bits=16, progress=False))


# ---------------------------------------------------------------------- a conv at two sites


class SharedConv(nn.Module):
    """One 1x1 conv (no BatchNorm) applied twice, with a ReLU between."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()
        with torch.no_grad():
            codes = torch.randint(1, 60, self.conv.weight.shape).float()
            self.conv.weight.copy_((codes + 0.45) * 2.0**-7)  # every weight rounds down
            self.conv.bias.uniform_(-0.1, 0.1)

    def forward(self, x):
        return self.conv(self.relu(self.conv(x)))


class TwoConvs(nn.Module):
    """`SharedConv` with a separate conv at each site (same weights)."""

    def __init__(self, shared: SharedConv) -> None:
        super().__init__()
        self.first = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()
        self.second = nn.Conv2d(4, 4, 1)
        self.first.load_state_dict(shared.conv.state_dict())
        self.second.load_state_dict(shared.conv.state_dict())

    def forward(self, x):
        return self.second(self.relu(self.first(x)))


def _site_mean_errors(float_outputs, converted, data) -> list[float]:
    """Per call site, the largest per-channel difference of the output means."""
    captured: list[torch.Tensor] = []
    layers = _layers_in_graph_order(converted, IntegerLayer)
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o)) for layer in layers]
    with torch.no_grad():
        converted(data)
    for hook in hooks:
        hook.remove()
    assert len(captured) == len(float_outputs) == 2
    return [float((f.mean((0, 2, 3)) - q.mean((0, 2, 3))).abs().max())
            for f, q in zip(float_outputs, captured)]


def test_a_conv_called_at_two_sites_gets_a_bias_correction_per_site():
    torch.manual_seed(3)
    shared = SharedConv().eval()
    separate = TwoConvs(shared).eval()
    generator = torch.Generator().manual_seed(4)
    data = [torch.rand(8, 4, 6, 6, generator=generator) + 0.5 for _ in range(2)]
    everything = torch.cat(data)
    float_outputs: list[torch.Tensor] = []
    hook = shared.conv.register_forward_hook(lambda m, i, o: float_outputs.append(o))
    with torch.no_grad():
        shared(everything)
    hook.remove()
    config = qf.QuantConfig(weight_observer="minmax", progress=False)

    prepared = _calibrated(shared, [data], config)
    sites = _layers_in_graph_order(prepared, FakeQuantLayer)
    assert len(sites) == 2 and sites[0] is not sites[1]
    assert sites[0].layer.bias is not sites[1].layer.bias
    assert not torch.equal(sites[0].layer.bias, sites[1].layer.bias)
    assert torch.equal(shared.conv.bias, TwoConvs(shared).first.bias)  # the user's model kept

    shared_errors = _site_mean_errors(float_outputs, qf.convert(prepared), everything)
    separate_prepared = _calibrated(separate, [data], config)
    separate_errors = _site_mean_errors(float_outputs, qf.convert(separate_prepared), everything)
    uncorrected = _calibrated(shared, [data], qf.QuantConfig(
        weight_observer="minmax", bias_calibration=False, progress=False))
    uncorrected_errors = _site_mean_errors(float_outputs, qf.convert(uncorrected), everything)
    for site, (error, reference) in enumerate(zip(shared_errors, separate_errors)):
        assert error <= 2 * reference + 1e-6, (site, shared_errors, separate_errors)
        assert error < uncorrected_errors[site] / 2, (site, shared_errors, uncorrected_errors)


# ----------------------------------------------------------------------- torch.save and pickle


@ROUND_TRIPS
def test_a_reloaded_calibrated_model_converts_bit_for_bit(round_trip):
    data = _data(3)
    prepared = _calibrated(_model(), [data])
    reloaded = round_trip(prepared)
    _assert_same_outputs(qf.convert(prepared), qf.convert(reloaded), data + _data(2, seed=1))


@ROUND_TRIPS
def test_a_reloaded_converted_model_runs_bit_for_bit_and_stays_eval_only(round_trip):
    data = _data(3)
    converted = qf.convert(_calibrated(_model(), [data]))
    reloaded = round_trip(converted)
    assert isinstance(reloaded, QuantizedGraphModule)
    assert not reloaded.training
    _assert_same_outputs(converted, reloaded, data + _data(2, seed=1))
    with pytest.raises(qf.QuantFxError, match="inference-only"):
        reloaded.train()
    assert not reloaded.training
    _assert_same_outputs(converted, reloaded, data)


@ROUND_TRIPS
def test_a_reloaded_qat_model_converts_bit_for_bit_and_trains_on(round_trip):
    data = _data(4)
    config = qf.QuantConfig(qat_schedule=qf.QATSchedule(freeze_bn_step=2), progress=False)
    qm = qf.prepare_qat(_model(), (data[0],), config)
    _train(qm, _sgd(qm), data[:2])
    reloaded = round_trip(qm)
    assert reloaded.training and int(reloaded.qat_controller.step) == 2
    _assert_same_outputs(qf.convert(qm), qf.convert(reloaded), data)

    modules = {id(module) for module in reloaded.modules()}
    layers = _layers_in_graph_order(reloaded, QATLayer)
    assert layers and all(id(layer.input_quantizer) in modules for layer in layers)
    assert [id(layer) for layer in reloaded.qat_controller.layers] == [id(x) for x in layers]

    _train(reloaded, torch.optim.SGD(reloaded.parameters(), lr=0.01), data[2:3])  # step 3
    assert int(reloaded.qat_controller.step) == 3
    assert all(bool(layer.bn_frozen) for layer in layers)  # the schedule reached them
    reloaded.eval()
    converted = qf.convert(reloaded)
    _assert_same_outputs(reloaded, converted, data)

    # the same step on the original gives the same model
    _train(qm, torch.optim.SGD(qm.parameters(), lr=0.01), data[2:3])
    qm.eval()
    _assert_same_outputs(qm, reloaded, data)


@ROUND_TRIPS
def test_a_deep_copy_of_a_reloaded_model_is_still_a_quantfx_model(round_trip):
    """fx rebuilds a loaded GraphModule's `meta` empty, and its deep copy kept only what meta
    lists: the copy of a loaded prepared or QAT model stopped being a quantfx model."""
    data = _data(3)
    config = qf.QuantConfig(progress=False)
    prepared = copy.deepcopy(round_trip(qf.prepare(_model(), (data[0],), config)))
    qf.calibrate(prepared, [data])
    _assert_same_outputs(qf.convert(prepared), qf.convert(_calibrated(_model(), [data])), data)
    twice = copy.deepcopy(round_trip(copy.deepcopy(round_trip(prepared))))
    _assert_same_outputs(qf.convert(prepared), qf.convert(twice), data)
    qat = copy.deepcopy(round_trip(qf.prepare_qat(_model(), (data[0],))))
    _train(qat, _sgd(qat), data[:2])
    _assert_same_outputs(qat.eval(), qf.convert(qat), data)


# ------------------------------------------------------------------------ state_dict round trips


def test_converted_state_dict_loads_into_another_conversion_bit_for_bit():
    model = _model()
    data = _data(3)
    converted = qf.convert(_calibrated(model, [data]))
    other = qf.convert(_calibrated(model, [_data(3, seed=7)]))
    test_data = data + _data(2, seed=1)
    differs = any(not torch.equal(a, b) for a, b in zip(_run(converted, test_data),
                                                         _run(other, test_data)))
    assert differs, "the two calibrations should give different models"
    other.load_state_dict(converted.state_dict())
    _assert_same_outputs(converted, other, test_data)
    for name, layer in _integer_layers(converted).items():
        for buffer in ("weight_exponent", "weight_int", "bias_int", "input_exponent"):
            assert torch.equal(getattr(layer, buffer), other.get_submodule(name).get_buffer(
                buffer)), (name, buffer)


def test_a_state_dict_of_other_bit_widths_is_refused_and_a_measured_widening_loads():
    """A 16-bit prepared model's state loaded into an 8-bit one ran it at 16 bit, silently
    (87.8 against 46.3 dB); a width calibration measured is the model's own and loads."""
    model, data = _model(), _data(3)
    wide = _calibrated(model, [data], qf.QuantConfig(progress=False, activation_bits=16,
                                                     weight_bits=16))
    narrow = qf.prepare(model, (data[0],), CONFIG)
    with pytest.raises(qf.LoadError, match="16-bit quantizer .* places 8 bit"):
        narrow.load_state_dict(wide.state_dict())
    with pytest.raises(qf.LoadError, match="8-bit quantizer .* places 16 bit"):
        qf.prepare(model, (data[0],), qf.QuantConfig(progress=False, activation_bits=16,
                                                      weight_bits=16)).load_state_dict(
            qf.prepare(model, (data[0],), CONFIG).state_dict())
    measured = qf.prepare(model, (data[0],), CONFIG)
    quantizer = next(module for module in measured.modules()
                     if isinstance(module, CalibrationQuantizer))
    quantizer.widen(16)  # as measured mixed precision does
    fresh = qf.prepare(model, (data[0],), CONFIG)
    fresh.load_state_dict(measured.state_dict())
    assert [m.bits for m in fresh.modules() if isinstance(m, CalibrationQuantizer)] == [
        m.bits for m in measured.modules() if isinstance(m, CalibrationQuantizer)]


@pytest.mark.parametrize("prepare", [qf.prepare, qf.prepare_qat])
def test_a_state_dict_of_other_weight_grids_is_refused_by_name(prepare):
    """Per-tensor weights' state loaded into a per-channel model (and back) was torch's list
    of size mismatches (a RuntimeError from deep inside load_state_dict)."""
    model, data = _model(), _data(2)
    per_tensor = prepare(model, (data[0],), CONFIG)
    per_channel = prepare(model, (data[0],), dataclasses.replace(CONFIG,
                                                                   per_channel_weights=True))
    with pytest.raises(qf.LoadError, match="holds one exponent for quantizer '.*weight_"
                                           "quantizer' where this model has 8 per-channel"):
        per_channel.load_state_dict(per_tensor.state_dict())
    with pytest.raises(qf.LoadError, match="holds 8 per-channel exponents .* one exponent"):
        per_tensor.load_state_dict(per_channel.state_dict())
    narrower = prepare(randomize_batchnorm(ConvBnReLU(6)).eval(), (data[0],),
                       dataclasses.replace(CONFIG, per_channel_weights=True))
    with pytest.raises(RuntimeError, match="size mismatch"):  # another model: torch says so
        narrower.load_state_dict(per_channel.state_dict())


def test_a_state_dict_of_a_model_made_differently_says_how():
    """Another observer, the other QAT starting point, a converted model: torch's bare list of
    keys (or a quantizer's false complaint about bit widths), now a LoadError naming the cause,
    for a deep copy and an unpickled model too; a model of another shape is torch's to name."""
    model, data = _model(), _data(2)
    calibrated = qf.calibrate(qf.prepare(model, (data[0],), CONFIG), data)
    minmax = qf.prepare(model, (data[0],), dataclasses.replace(CONFIG,
                                                                activation_observer="minmax"))
    for target in (minmax, copy.deepcopy(minmax), _torch_round_trip(minmax)):
        with pytest.raises(qf.LoadError, match="unexpected .* another activation_observer"):
            target.load_state_dict(calibrated.state_dict())
    with pytest.raises(qf.LoadError, match="missing .* the other point: prepare_qat of the"):
        qf.prepare_qat(model, (data[0],), CONFIG).load_state_dict(
            qf.prepare_qat(calibrated, (data[0],)).state_dict())
    with pytest.raises(qf.LoadError, match="One of the two is a converted model"):
        qf.prepare(model, (data[0],), CONFIG).load_state_dict(qf.convert(calibrated).state_dict())
    with pytest.raises(qf.LoadError, match="One of the two is a converted model"):
        qf.convert(calibrated).load_state_dict(calibrated.state_dict())  # and the reverse
    qf.prepare(model, (data[0],), CONFIG).load_state_dict(calibrated.state_dict())  # still fits
    earlier = {key: value for key, value in calibrated.state_dict().items()
               if not key.endswith(".observer.masked")}  # saved before observers had it
    qf.prepare(model, (data[0],), CONFIG).load_state_dict(earlier)
    skipped = minmax.load_state_dict(calibrated.state_dict(), strict=False)  # the user's call
    assert skipped.unexpected_keys and all(".observer." in key for key in skipped.unexpected_keys)
    qat = qf.prepare_qat(model, (data[0],), CONFIG)
    qat.load_state_dict({key: value for key, value in qat.state_dict().items()
                         if not key.startswith("conv1.")}, strict=False)


def test_qat_state_dict_loads_into_a_fresh_prepare_qat_and_converts_the_same():
    model = _model()
    data = _data(4)
    config = qf.QuantConfig(qat_schedule=qf.QATSchedule(freeze_bn_step=1, freeze_ranges_step=2),
                            progress=False)
    qm = qf.prepare_qat(model, (data[0],), config)
    _train(qm, _sgd(qm), data[:3])
    fresh = qf.prepare_qat(model, (data[0],), config)
    fresh.load_state_dict(qm.state_dict())
    assert bool(fresh.qat_controller.bn_frozen) and bool(fresh.qat_controller.ranges_frozen)
    test_data = data + _data(2, seed=1)
    _assert_same_outputs(qf.convert(qm), qf.convert(fresh), test_data)
    qm.eval()
    fresh.eval()
    _assert_same_outputs(qm, fresh, test_data)


# ------------------------------------------------------------------------------------- errors


def test_converting_an_untrained_qat_model_says_to_train_it():
    data = _data(1)
    qm = qf.prepare_qat(_model(), (data[0],), CONFIG)
    with pytest.raises(qf.ConvertError) as caught:
        qf.convert(qm)
    message = str(caught.value)
    assert "train" in message.lower()
    assert "quantfx.calibrate(" not in message
    assert "Run quantfx.calibrate" not in message


# ------------------------------------------------------------------------------------- export


def test_export_of_a_reloaded_converted_model_matches_the_original(tmp_path):
    data = _data(3)
    converted = qf.convert(_calibrated(_model(), [data]))
    reloaded = _torch_round_trip(converted)
    qf.export_onnx(converted, (data[0],), tmp_path / "original.onnx", verify_data=data[1])
    qf.export_onnx(reloaded, (data[0],), tmp_path / "reloaded.onnx", verify_data=data[1])
    original = onnx.load(tmp_path / "original.onnx").graph
    again = onnx.load(tmp_path / "reloaded.onnx").graph
    names = [node.name for node in original.node]
    assert names and names == [node.name for node in again.node]
    assert [node.op_type for node in original.node] == [node.op_type for node in again.node]
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in original.initializer}
    reloaded_initializers = {tensor.name: numpy_helper.to_array(tensor)
                             for tensor in again.initializer}
    assert initializers.keys() == reloaded_initializers.keys()
    for name, value in initializers.items():
        assert (value == reloaded_initializers[name]).all(), name
