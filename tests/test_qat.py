"""Quantization-aware training: STE, on-the-fly BN folding, schedule, resume, eval == convert."""

import copy
import dataclasses
import warnings

import pytest
import torch
import torchvision
from torch import nn

import quantfx as qf
from quantfx.qat import QATLayer, QATQuantizer, freeze_ranges
from quantfx.qmath import fake_quantize
from quantfx.quantizers import CalibrationQuantizer, set_quant_mode
from quantfx.state import state_of
from tests.helpers import randomize_batchnorm

torch.set_num_threads(1)


class ConvBnReLU(nn.Module):
    """conv → bn → relu → depthwise conv → bn → relu → pool → linear."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, 4)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _batches(count: int, shape=(4, 3, 16, 16), seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches) -> None:
    """A user's ordinary loop: forward, loss, backward, step."""
    model.train()
    for index, batch in enumerate(batches):
        target = torch.full((batch.shape[0],), index % 4, dtype=torch.long)
        loss = nn.functional.cross_entropy(model(batch)[:, :4], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def _qat_layers(model: nn.Module) -> list[QATLayer]:
    return [module for module in model.modules() if isinstance(module, QATLayer)]


def _activation_quantizers(model: nn.Module) -> dict[str, QATQuantizer]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, QATQuantizer)}


# ---------------------------------------------------------------------------- STE


def test_activation_ste_passes_gradient_inside_range_and_blocks_it_where_clipped():
    quantizer = QATQuantizer(bits=8, signed=True)
    quantizer.start_from_exponent(-4)  # range [-8, 7.9375], step 1/16
    quantizer.observer_enabled.fill_(False)
    x = torch.tensor([-20.0, -8.0, -1.03, 0.0, 0.51, 7.9, 7.99, 30.0], requires_grad=True)
    out = quantizer(x)
    out.backward(torch.ones_like(out))
    assert torch.equal(out.detach(), torch.round(x.detach() * 16).clamp(-128, 127) / 16)
    inside = (x.detach() >= -8.0) & (x.detach() <= 127 / 16)
    assert torch.equal(x.grad, inside.float())


def test_weight_ste_gradient_is_the_float_gradient_at_the_quantized_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    model = nn.Sequential(conv)
    qm = qf.prepare_qat(model, torch.randn(2, 3, 8, 8))
    layer = _qat_layers(qm)[0]
    x = torch.randn(2, 3, 8, 8)
    out = qm(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    # Reference: the same conv computed on the fake-quantized weight and (quantized) input.
    weight_exponent = layer.weight_quantizer.exponent  # the exponent this forward used
    wq = fake_quantize(conv.weight.detach(), weight_exponent, -128, 127).requires_grad_()
    input_q = layer.input_quantizer
    xq = fake_quantize(x, input_q.exponent, input_q.qmin, input_q.qmax)
    reference = nn.functional.conv2d(xq, wq, conv.bias.detach(), padding=1)
    reference.backward(grad_out)
    trained = qm.get_submodule(next(n for n, m in qm.named_modules() if m is layer)).layer
    torch.testing.assert_close(trained.weight.grad, wq.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- BN folding


@pytest.mark.parametrize("seed", [0, 1])
def test_qat_without_quantization_equals_the_float_model_in_train_and_eval(seed):
    torch.manual_seed(seed)
    float_model = randomize_batchnorm(ConvBnReLU(), seed)
    batches = _batches(3, seed=seed)
    qm = qf.prepare_qat(float_model, batches[0])
    set_quant_mode(qm, observe=False, quantize=False)
    reference = copy.deepcopy(float_model).train()
    for batch in batches:  # train mode: batch statistics, running statistics update alike
        torch.testing.assert_close(qm(batch), reference(batch), rtol=1e-4, atol=1e-5)
    bn_pairs = [(layer.bn, ref) for layer, ref in zip(
        [layer for layer in _qat_layers(qm) if layer.bn is not None],
        [reference.bn1, reference.bn2])]
    for qat_bn, ref_bn in bn_pairs:
        torch.testing.assert_close(qat_bn.running_mean, ref_bn.running_mean)
        torch.testing.assert_close(qat_bn.running_var, ref_bn.running_var)
    qm.eval()
    reference.eval()
    for batch in batches:  # eval: BN folded with running statistics
        torch.testing.assert_close(qm(batch), reference(batch), rtol=1e-4, atol=1e-5)


def test_gradients_without_quantization_match_the_float_model():
    torch.manual_seed(3)
    float_model = randomize_batchnorm(ConvBnReLU(), 3)
    x = torch.randn(4, 3, 16, 16)
    qm = qf.prepare_qat(float_model, x)
    set_quant_mode(qm, observe=False, quantize=False)
    reference = copy.deepcopy(float_model).train()
    qm(x).sum().backward()
    reference(x).sum().backward()
    qat_conv1 = _qat_layers(qm)[0]
    torch.testing.assert_close(qat_conv1.layer.weight.grad, reference.conv1.weight.grad,
                               rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(qat_conv1.bn.weight.grad, reference.bn1.weight.grad,
                               rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------- eval == convert


@pytest.mark.parametrize("builder", [torchvision.models.resnet18, torchvision.models.mobilenet_v2])
def test_eval_and_converted_agree_bit_for_bit_after_training(builder):
    torch.manual_seed(0)
    model = builder(num_classes=10)
    # 64x64, not 32x32: there the last BatchNorms normalize 2 values per channel in train
    # mode, gradients reach 1e7 and a step or two ends in NaN, depending on chance
    batches = _batches(4, shape=(2, 3, 64, 64))
    config = qf.QuantConfig(qat_schedule=qf.QATSchedule(freeze_bn_step=2))
    qm = qf.prepare_qat(model, batches[0], config)
    _train(qm, torch.optim.SGD(qm.parameters(), lr=0.01, momentum=0.9), batches[:3])
    qm.eval()
    converted = qf.convert(qm)
    for batch in batches:
        with torch.no_grad():
            assert torch.equal(qm(batch), converted(batch))


def test_a_standalone_batchnorm_trains_as_the_quantized_affine_tidl_runs(tmp_path):
    """QAT from a float model, as from a calibrated one: a BatchNorm after a conv folds on the
    fly; one after a ReLU before a padded conv becomes a QATLayer over a BatchNormLayer
    (per-tensor 8-bit scale, as TIDL runs a standalone BatchNorm), not a float BatchNorm whose
    parameters TIDL would quantize its own way; one after a ReLU before an unpadded 1x1 conv
    folds into it. Training steps,
    eval and convert agree, and the file's BatchNormalization reads dequantized integers."""
    from quantfx.layers import BatchNormLayer

    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    batches = _batches(4)
    qm = qf.prepare_qat(model, batches[0], qf.QuantConfig(target="am68a"))
    assert [name for name, module in qm.named_modules()  # only the conv's, folded on the fly
            if isinstance(module, nn.modules.batchnorm._BatchNorm)] == ["0.bn"]
    standalone = [layer for layer in _qat_layers(qm) if isinstance(layer.layer, BatchNormLayer)]
    assert len(standalone) == 1 and standalone[0].weight_quantizer.axis is None
    assert sum(layer.bn is not None for layer in _qat_layers(qm)) == 1  # conv -> BN: on the fly
    _train(qm, torch.optim.SGD(qm.parameters(), lr=0.01), batches[:3])
    qm.eval()
    converted = qf.convert(qm)
    with torch.no_grad():
        assert torch.equal(qm(batches[3]), converted(batches[3]))
    report = qf.export_onnx(converted, batches[3][:1], tmp_path / "bn.onnx",
                            verify_data=batches[3])
    assert report.fraction_identical == 1.0
    assert not report.tidl.findings, report.tidl


def test_eval_does_not_update_ranges_or_batchnorm():
    torch.manual_seed(0)
    qm = qf.prepare_qat(randomize_batchnorm(ConvBnReLU()), _batches(1)[0])
    _train(qm, _sgd(qm), _batches(2))
    qm.eval()
    before = copy.deepcopy(qm.state_dict())
    with torch.no_grad():
        qm(10 * torch.randn(4, 3, 16, 16))
    for key, value in qm.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bias_of_eval_forward_lies_on_the_int32_grid_of_convert():
    torch.manual_seed(0)
    qm = qf.prepare_qat(randomize_batchnorm(ConvBnReLU()), _batches(1)[0])
    _train(qm, _sgd(qm), _batches(2))
    converted = qf.convert(qm.eval())
    from quantfx.layers import IntegerLayer

    layers = [m for m in converted.modules() if isinstance(m, IntegerLayer)]
    assert layers and all(layer.bias_int is not None for layer in layers)
    x = _batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(qm(x), converted(x))


# ---------------------------------------------------------------------------- schedule & state


def test_schedule_freezes_batchnorm_then_ranges_by_step():
    torch.manual_seed(0)
    schedule = qf.QATSchedule(freeze_bn_step=2, freeze_ranges_step=3)
    qm = qf.prepare_qat(randomize_batchnorm(ConvBnReLU()), _batches(1)[0],
                        qf.QuantConfig(qat_schedule=schedule))
    optimizer = _sgd(qm)
    bn = _qat_layers(qm)[0].bn
    _train(qm, optimizer, _batches(2))
    assert not bool(qm.qat_controller.bn_frozen)
    running_mean = bn.running_mean.clone()
    _train(qm, optimizer, _batches(1, seed=1))  # step 3: BN frozen, ranges still move
    assert bool(qm.qat_controller.bn_frozen) and not bool(qm.qat_controller.ranges_frozen)
    assert torch.equal(bn.running_mean, running_mean)
    _train(qm, optimizer, _batches(1, seed=2))  # step 4: ranges frozen
    ranges = {name: q.observer.max_val.clone() for name, q in _activation_quantizers(qm).items()}
    _train(qm, optimizer, [10 * b for b in _batches(2, seed=3)])
    assert int(qm.qat_controller.step) == 6
    for name, quantizer in _activation_quantizers(qm).items():
        assert torch.equal(quantizer.observer.max_val, ranges[name]), name


def test_schedule_by_epoch():
    schedule = qf.QATSchedule(freeze_bn_epoch=2, freeze_ranges_epoch=3)
    qm = qf.prepare_qat(ConvBnReLU(), _batches(1)[0], qf.QuantConfig(qat_schedule=schedule))
    _train(qm, _sgd(qm), _batches(1))
    qf.end_qat_epoch(qm)
    assert not bool(qm.qat_controller.bn_frozen)
    qf.end_qat_epoch(qm)  # two epochs done: BN frozen from the third
    assert bool(qm.qat_controller.bn_frozen) and not bool(qm.qat_controller.ranges_frozen)
    qf.end_qat_epoch(qm)
    assert bool(qm.qat_controller.ranges_frozen)
    assert all(not bool(q.observer_enabled) for q in _activation_quantizers(qm).values())


def test_state_dict_resume_is_identical_to_uninterrupted_training():
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvBnReLU())
    config = qf.QuantConfig(qat_schedule=qf.QATSchedule(freeze_bn_step=3, freeze_ranges_step=5))
    batches = _batches(7)
    example = batches[0]

    straight = qf.prepare_qat(model, example, config)
    straight_opt = _sgd(straight)
    _train(straight, straight_opt, batches)

    first = qf.prepare_qat(model, example, config)
    first_opt = _sgd(first)
    _train(first, first_opt, batches[:4])
    saved_model = copy.deepcopy(first.state_dict())
    saved_opt = copy.deepcopy(first_opt.state_dict())
    resumed = qf.prepare_qat(model, example, config)
    resumed.load_state_dict(saved_model)
    resumed_opt = _sgd(resumed)
    resumed_opt.load_state_dict(saved_opt)
    _train(resumed, resumed_opt, batches[4:])

    final_straight, final_resumed = straight.state_dict(), resumed.state_dict()
    assert final_straight.keys() == final_resumed.keys()
    for key, value in final_straight.items():
        assert torch.equal(value, final_resumed[key]), key
    straight.eval()
    resumed.eval()
    with torch.no_grad():
        assert torch.equal(straight(example), resumed(example))


# ---------------------------------------------------------------------------- PTC → QAT


def test_qat_from_a_calibrated_prepared_model_starts_at_calibrated_ranges():
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvBnReLU()).eval()
    data = _batches(3)
    prepared = qf.prepare(model, data[0])
    qf.calibrate(prepared, data)
    calibrated = {name: float(q.exponent) for name, q in prepared.named_modules()
                  if isinstance(q, CalibrationQuantizer) and name.startswith("quantizers.")}
    before = {key: value.clone() for key, value in prepared.state_dict().items()}
    qm = qf.prepare_qat(prepared, data[0])
    assert qm.training
    started = {name: float(q.exponent) for name, q in _activation_quantizers(qm).items()}
    assert started == calibrated
    with torch.no_grad():  # before any training, QAT eval == PTC convert
        qm.eval()
        assert torch.equal(qm(data[0]), qf.convert(prepared)(data[0]))
    _train(qm, _sgd(qm), data)
    qm.eval()
    converted = qf.convert(qm)
    with torch.no_grad():
        assert torch.equal(qm(data[1]), converted(data[1]))
    # the PTC model itself is left as it was, and still converts as before
    assert not any(isinstance(m, QATLayer) for m in prepared.modules())
    after = prepared.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], value) for key, value in before.items())



def test_qat_from_a_prepared_model_takes_a_config_that_agrees_on_the_graph_fields():
    """A config given with a prepared model may change how QAT runs (its schedule, observers),
    not what shaped the prepared graph: each field marked GRAPH in QuantConfig is compared."""
    from quantfx.config import GRAPH_FIELDS

    model = randomize_batchnorm(ConvBnReLU()).eval()
    data = _batches(2)
    prepared = qf.prepare(model, data[0], qf.QuantConfig(progress=False))
    qf.calibrate(prepared, data)
    assert {"per_channel_weights", "sixteen_bit_layers", "target"} <= set(GRAPH_FIELDS)
    assert "range_search" not in GRAPH_FIELDS
    qf.prepare_qat(prepared, data[0], qf.QuantConfig(progress=False, range_search="percentile"))
    with pytest.raises(qf.ConfigError, match="differs from the one it was prepared with in "
                       "per_channel_weights"):
        qf.prepare_qat(prepared, data[0],
                       qf.QuantConfig(progress=False, per_channel_weights=True))


@pytest.mark.parametrize("ranges", ["calibrated", "statistics"])
def test_qat_from_a_calibrated_model_keeps_its_ranges_unless_told_to_follow_the_data(ranges):
    """Default ("calibrated"): each activation range stays where calibration's search put it;
    "statistics": the batches' min/max move it (here: data 8x larger than calibration's)."""
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvBnReLU()).eval()
    data = _batches(2)
    config = qf.QuantConfig(progress=False, qat_schedule=qf.QATSchedule(ranges=ranges))
    prepared = qf.prepare(model, data[0], config)
    qf.calibrate(prepared, data)
    qm = qf.prepare_qat(prepared, data[0], config)
    started = {name: float(q.exponent) for name, q in _activation_quantizers(qm).items()}
    _train(qm, _sgd(qm), [8.0 * batch for batch in data])
    moved = {name for name, q in _activation_quantizers(qm).items()
             if float(q.exponent) != started[name]}
    assert (not moved) if ranges == "calibrated" else moved
    assert qf.QATSchedule().ranges == "calibrated"

def test_freeze_ranges_right_after_ptc_keeps_calibrated_exponents():
    model = randomize_batchnorm(ConvBnReLU()).eval()
    data = _batches(2)
    prepared = qf.prepare(model, data[0])
    qf.calibrate(prepared, data)
    qm = qf.prepare_qat(prepared, data[0])
    freeze_ranges(qm)
    before = {name: q.exponent.clone() for name, q in _activation_quantizers(qm).items()}
    _train(qm, _sgd(qm), [5 * b for b in data])
    for name, quantizer in _activation_quantizers(qm).items():
        assert torch.equal(quantizer.exponent, before[name])


# ---------------------------------------------------------------------------- weight clipping


def test_extreme_weight_outliers_are_clipped_once():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        outlier = float(100 * linear.weight.std())
        linear.weight[3, 7] = outlier
    model = nn.Sequential(linear)
    x = torch.randn(2, 64)
    qm = qf.prepare_qat(model, x, qf.QuantConfig(qat_schedule=qf.QATSchedule(weight_clip_std=8)))
    weight = _qat_layers(qm)[0].layer.weight
    assert weight.abs().max() <= 8 * weight.std() * 1.01
    assert float(linear.weight.detach()[3, 7]) == outlier  # the user's model is untouched
    untouched = qf.prepare_qat(model, x, qf.QuantConfig(qat_schedule=qf.QATSchedule(
        weight_clip_std=None)))
    assert torch.equal(_qat_layers(untouched)[0].layer.weight, linear.weight)


def test_a_channel_that_batchnorm_scaled_up_is_not_an_outlier():
    """EfficientNet-Lite1's BN-folded stem: channels 20x apart under one per-tensor scale. The
    tensor rule alone clipped whole channels (39 % of the stem's energy)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(48, 8, 1)
    with torch.no_grad():
        conv.weight[0].mul_(30)
        conv.weight[5, 7] = 40 * conv.weight[5].abs().max()  # a true outlier
    before = conv.weight.detach().clone()
    qm = qf.prepare_qat(nn.Sequential(conv), torch.randn(1, 48, 4, 4), qf.QuantConfig(
        qat_schedule=qf.QATSchedule(weight_clip_std=4)))
    weight = _qat_layers(qm)[0].layer.weight.detach()
    assert torch.equal(weight[0], before[0])  # the scaled channel is kept whole
    assert weight[5, 7].abs() < before[5, 7].abs() * 0.6  # the outlier is clipped
    changed = (weight != before).sum()
    assert changed == 1


# ---------------------------------------------------------------------------- errors


def test_bad_schedule_values_raise_config_errors():
    with pytest.raises(qf.ConfigError, match="freeze_bn_step"):
        qf.QATSchedule(freeze_bn_step=-1)
    with pytest.raises(qf.ConfigError, match="weight_clip_std"):
        qf.QATSchedule(weight_clip_std=0.5)
    with pytest.raises(qf.ConfigError, match="qat_schedule"):
        qf.prepare_qat(ConvBnReLU(), _batches(1)[0], qf.QuantConfig(qat_schedule={"a": 1}))


def test_prepare_qat_rejects_converted_and_qat_models():
    model = ConvBnReLU()
    x = _batches(1)[0]
    qm = qf.prepare_qat(model, x)
    with pytest.raises(qf.PrepareError, match="prepare_qat"):
        qf.prepare_qat(qm, x)
    with pytest.raises(qf.QuantFxError, match="returned by quantfx.prepare_qat"):
        qf.end_qat_epoch(model)
    qm(x)
    with pytest.raises(qf.PrepareError, match="converted"):
        qf.prepare_qat(qf.convert(qm.eval()), x)


def test_linear_with_batchnorm1d_folds_and_converts_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    randomize_batchnorm(model)
    batches = [torch.randn(8, 12) for _ in range(3)]
    qm = qf.prepare_qat(model, batches[0])
    assert sum(layer.bn is not None for layer in _qat_layers(qm)) == 1
    set_quant_mode(qm, observe=False, quantize=False)
    reference = copy.deepcopy(model).train()
    torch.testing.assert_close(qm(batches[0]), reference(batches[0]), rtol=1e-4, atol=1e-5)
    set_quant_mode(qm, observe=True, quantize=True)
    optimizer = _sgd(qm)
    for batch in batches:
        loss = qm(batch).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qm.eval()
    with torch.no_grad():
        assert torch.equal(qm(batches[0]), qf.convert(qm)(batches[0]))


def test_a_deep_copy_of_a_qat_model_trains_on_and_converts():
    torch.manual_seed(0)
    qm = qf.prepare_qat(randomize_batchnorm(ConvBnReLU()), _batches(1)[0])
    _train(qm, _sgd(qm), _batches(2))
    twin = copy.deepcopy(qm)
    _train(twin, _sgd(twin), _batches(1, seed=4))
    assert int(twin.qat_controller.step) == 3 and int(qm.qat_controller.step) == 2
    twin_modules = {id(module) for module in twin.modules()}
    for layer in _qat_layers(twin):  # the copy's layers read the copy's own quantizers
        assert id(layer.input_quantizer) in twin_modules
    assert all(id(layer) in twin_modules for layer in twin.qat_controller.layers)
    twin.eval()
    x = _batches(1, seed=6)[0]
    with torch.no_grad():
        assert torch.equal(twin(x), qf.convert(twin)(x))


def test_transposed_convs_train_and_convert_exactly():
    from tests.helpers import TinyDecoder

    torch.manual_seed(0)
    batches = _batches(4, shape=(2, 3, 8, 8))
    qm = qf.prepare_qat(randomize_batchnorm(TinyDecoder()), batches[0])
    layers = [m for m in qm.modules() if isinstance(m, QATLayer)]
    assert sum(isinstance(m.layer, nn.ConvTranspose2d) for m in layers) == 2
    weight_before = next(m for m in layers if isinstance(m.layer, nn.ConvTranspose2d))
    weight_before = weight_before.layer.weight.detach().clone()
    optimizer = torch.optim.SGD(qm.parameters(), lr=0.05)
    qm.train()
    for batch in batches[:3]:  # a segmentation-style per-pixel loss
        target = nn.functional.interpolate(batch[:, :2], scale_factor=2.0)
        loss = (qm(batch) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = next(m for m in layers if isinstance(m.layer, nn.ConvTranspose2d)).layer.weight
    assert not torch.equal(weight_before, trained)
    qm.eval()
    converted = qf.convert(qm)
    for batch in batches:
        with torch.no_grad():
            assert torch.equal(qm(batch), converted(batch))


def test_the_weight_exponent_rule_is_the_schedules_and_eval_matches_convert():
    """QATSchedule(weight_exponent="mse"): each step's weight exponent is the least-error one,
    the eval forward and the converted model use the same, bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1)).train()
    with torch.no_grad():  # a range that barely overflows a power of two: mse halves the step
        model[0].weight.copy_(torch.linspace(-1.0, 1.0, model[0].weight.numel()).view_as(
            model[0].weight))
    exponents = {}
    for rule in ("minmax", "mse"):
        config = qf.QuantConfig(progress=False, qat_schedule=qf.QATSchedule(weight_exponent=rule))
        qat_model = qf.prepare_qat(model, torch.randn(2, 3, 8, 8), config)
        layer = next(m for m in qat_model.modules() if isinstance(m, QATLayer))
        assert layer.weight_quantizer.rule == rule
        for _ in range(2):
            qat_model(torch.randn(4, 3, 8, 8))
        exponents[rule] = float(layer.weight_quantizer.exponent)
        qat_model.eval()
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(qat_model(x), qf.convert(qat_model)(x))
    assert exponents["mse"] < exponents["minmax"]  # the outlier is clipped, the step halves


def test_an_optimizer_built_before_prepare_qat_is_reported(tmp_path):
    """A script that builds its optimizer on the float model and then calls prepare_qat trains
    nothing (prepare_qat returns a new model): quantfx says so at the end of the epoch."""
    model = randomize_batchnorm(ConvBnReLU())
    stale = _sgd(model)  # the user's optimizer, built first
    qat_model = qf.prepare_qat(model, (torch.randn(1, 3, 16, 16),))
    _train(qat_model, stale, _batches(3))
    with pytest.warns(UserWarning, match=r"none of the \d+ parameters of the QAT model changed"):
        qf.end_qat_epoch(qat_model)

    fresh = qf.prepare_qat(model, (torch.randn(1, 3, 16, 16),))
    _train(fresh, _sgd(fresh), _batches(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qf.end_qat_epoch(fresh)
    # the journey's end: the script, fixed as the warning says, exports a verified file
    report = qf.export_onnx(qf.convert(fresh.eval()), (torch.randn(2, 3, 16, 16),),
                            tmp_path / "qat.onnx")
    assert report.verified and report.fraction_identical == 1.0


def test_learned_thresholds_that_never_move_are_reported():
    """SGD at a fine-tuning rate moves a learned log2 threshold by ~1e-7 octaves a step: no
    exponent ever changes, and "learned" silently equals "calibrated". end_qat_epoch says so;
    thresholds given their own Adam, as the warning says, move and pass silently."""
    model = randomize_batchnorm(ConvBnReLU()).eval()
    config = qf.QuantConfig(progress=False, qat_schedule=qf.QATSchedule(
        ranges="learned", weight_exponent="learned"))
    batches = _batches(2, shape=(2, 3, 8, 8)) * 70  # 140 steps: past 2 * STALE_CHECK_STEP

    def qat() -> nn.Module:
        prepared = qf.prepare(model, (torch.randn(1, 3, 8, 8),), config)
        qf.calibrate(prepared, batches[:2])
        return qf.prepare_qat(prepared, (torch.randn(1, 3, 8, 8),))

    slow = qat()
    _train(slow, torch.optim.SGD(slow.parameters(), lr=1e-4), batches)
    with pytest.warns(qf.QuantFxWarning, match=r"learned thresholds .* moved at most"):
        qf.end_qat_epoch(slow)

    fast = qat()
    thresholds = qf.quantizers.learned_thresholds(fast)
    assert len(thresholds) == 7  # three weights; the ReLU, conv2, the pool and fc outputs
    others = [p for p in fast.parameters() if all(p is not t for t in thresholds)]
    optimizers = [torch.optim.SGD(others, lr=1e-4), torch.optim.Adam(thresholds, lr=1e-2)]

    class Both:
        def zero_grad(self) -> None:
            for optimizer in optimizers:
                optimizer.zero_grad()

        def step(self) -> None:
            for optimizer in optimizers:
                optimizer.step()

    _train(fast, Both(), batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qf.end_qat_epoch(fast)
    # nothing to learn is an error that says how, not an empty list for torch to refuse
    fixed = qf.prepare_qat(model, (torch.randn(1, 3, 8, 8),), qf.QuantConfig(progress=False))
    with pytest.raises(qf.ConfigError, match="no learned thresholds.*ranges='learned'"):
        qf.quantizers.learned_thresholds(fixed)
    with pytest.raises(qf.ConfigError, match="got NoneType"):
        qf.quantizers.learned_thresholds(None)


def test_qat_from_calibration_keeps_its_weight_exponents_and_rounding():
    """Calibration clips a weight (least-error exponent); QAT from it starts exactly there and
    a tiny step moves no exponent. Per-step "minmax" exponents start elsewhere (coarser)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    with torch.no_grad():  # a range just over a power of two: calibration clips one weight
        model[0].weight.copy_(torch.linspace(-0.99, 0.99, model[0].weight.numel()).view_as(
            model[0].weight))
        model[0].weight[0, 0, 0, 0] = 1.01
    data = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    config = qf.QuantConfig(progress=False, target="tda4vm", equalization=False,
                            weight_rounding="nearest")  # the float weight stays in the layer
    prepared = qf.prepare(model, data[0][:1], config)
    qf.calibrate(prepared, data)
    expected = qf.convert(prepared)(data[0])
    started = {}
    for rule in ("calibrated", "minmax"):
        schedule = qf.QATSchedule(weight_exponent=rule)
        config = dataclasses.replace(state_of(prepared).config, qat_schedule=schedule)
        qat_model = qf.prepare_qat(prepared, data[0][:1], config).eval()
        with torch.no_grad():
            started[rule] = torch.equal(qat_model(data[0]), expected)
        layers = [m for m in qat_model.modules() if isinstance(m, QATLayer)]
        exponents = [layer.weight_quantizer.exponent.clone() for layer in layers]
        optimizer = torch.optim.Adam(qat_model.parameters(), lr=1e-6)
        qat_model.train()
        qat_model(data[1]).pow(2).mean().backward()
        optimizer.step()
        qat_model.eval()
        qat_model(data[1])
        if rule == "calibrated":
            assert all(torch.equal(layer.weight_quantizer.exponent, exponent)
                       for layer, exponent in zip(layers, exponents))
    assert started == {"calibrated": True, "minmax": False}


def test_a_qat_layer_pickled_before_the_weight_quantizer_keeps_its_rule():
    """Models pickled before `WeightQuantizer` carry the rule on the layer and a plain
    calibration quantizer: "calibrated" still keeps the stored exponent, "minmax" follows the
    weight."""
    from quantfx.observers import make_observer

    conv = nn.Conv2d(3, 4, 3)
    quantizer = CalibrationQuantizer(make_observer("minmax"), 8, signed=True)
    quantizer.exponent.fill_(-3.0)
    layer = QATLayer(conv, None, quantizer)
    layer.weight_rule = "calibrated"
    assert layer.fixed_exponent and float(layer.weight_exponent_of(conv.weight * 100)) == -3.0
    layer.weight_rule = "minmax"
    assert not layer.fixed_exponent
    assert float(layer.weight_exponent_of(conv.weight * 100)) > -3.0


def test_judging_a_qat_model_before_it_trained_warns_that_it_is_float():
    """prepare_qat of a float model measures its ranges in training forwards: evaluated before
    any, it computes the float model's outputs, and a user read that as 8-bit accuracy."""
    model, data = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                nn.Conv2d(8, 4, 1)).eval(), _batches(2)
    fresh = qf.prepare_qat(model, (data[0][:1],), qf.QuantConfig(progress=False))
    with pytest.warns(qf.QuantFxWarning, match="runs 3 of its 3 activations unquantized"):
        fresh.eval()(data[0])  # input, ReLU and output quantizers: none measured yet
    calibrated = qf.calibrate(qf.prepare(model, (data[0][:1],), qf.QuantConfig(
        progress=False)), data)
    trained = qf.prepare_qat(model, (data[0][:1],), qf.QuantConfig(progress=False))
    trained.train()(data[1])  # one training forward measures every range
    with warnings.catch_warnings():
        warnings.simplefilter("error", qf.QuantFxWarning)
        for ready in (qf.prepare_qat(calibrated, (data[0][:1],)), trained):
            ready.eval()(data[0])
