"""Quantizer modules and their modes."""

import pytest
import torch
from torch import nn

import quantfx as qf
from quantfx.quantizers import (
    CalibrationQuantizer,
    LearnedRangeQuantizer,
    LearnedWeightQuantizer,
)


def test_quant_mode_restores_what_it_found_even_on_error():
    from quantfx.quantizers import quant_mode

    prepared = qf.prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(),
                          torch.randn(1, 3, 8, 8), qf.QuantConfig(progress=False))
    quantizers = [m for m in prepared.modules() if isinstance(m, CalibrationQuantizer)]
    quantizers[0].set_mode(observe=False, quantize=True)  # a mixed state to come back to
    before = [(bool(q.observer_enabled), bool(q.quant_enabled)) for q in quantizers]
    with pytest.raises(RuntimeError, match="inside"), quant_mode(prepared, False, False):
        assert not any(bool(q.observer_enabled) or bool(q.quant_enabled) for q in quantizers)
        raise RuntimeError("inside")
    assert [(bool(q.observer_enabled), bool(q.quant_enabled)) for q in quantizers] == before


# ------------------------------------------------------------- learned ranges (TQT, QAT)

def _learned(exponent: float, signed: bool = True) -> LearnedRangeQuantizer:
    quantizer = LearnedRangeQuantizer(8, signed).train()
    quantizer.start_from_exponent(exponent)
    return quantizer


@pytest.mark.parametrize(("start", "direction"), [(2.0, -1), (-9.0, 1)])
def test_learned_threshold_moves_toward_the_range_that_fits(start, direction):
    """TQT's gradient has the right sign: started far too wide (every value in a few codes) the
    threshold shrinks; far too narrow (most values saturate) it grows, minimizing the
    quantization error alone."""
    torch.manual_seed(0)
    values = torch.randn(4096) * 0.5
    quantizer = _learned(start)
    optimizer = torch.optim.Adam([quantizer.log2_threshold], lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        (quantizer(values) - values).pow(2).mean().backward()
        optimizer.step()
    moved = float(quantizer.compute_exponent()) - start
    assert moved * direction >= 3  # several octaves toward max|x| ~ 2 (exponent -5)


def test_learned_range_eval_and_convert_use_the_learned_exponent():
    """The threshold's exponent is what eval and the frozen quantizer compute with; after a
    freeze the exponent stays even if the threshold parameter moves."""
    quantizer = _learned(-4.0)
    assert float(quantizer.exponent) == -4.0
    with torch.no_grad():
        quantizer.log2_threshold.add_(1.0)
    values = torch.linspace(-20, 20, 101)
    quantizer(values)
    assert float(quantizer.exponent) == -3.0
    quantizer.eval()
    expected = torch.round(values / 0.125).clamp(-128, 127) * 0.125
    assert torch.equal(quantizer(values), expected)
    quantizer.train()
    quantizer.compute_exponent()
    quantizer.observer_enabled.fill_(False)  # what freeze_ranges does
    with torch.no_grad():
        quantizer.log2_threshold.add_(5.0)
    quantizer(values).sum().backward()
    assert float(quantizer.exponent) == -3.0 and float(quantizer.log2_threshold.grad) == 0.0


def test_qat_with_learned_ranges_trains_and_converts_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    images = torch.randn(8, 3, 8, 8)
    config = qf.QuantConfig(progress=False, bias_calibration=False,
                            qat_schedule=qf.QATSchedule(ranges="learned"))
    prepared = qf.prepare(model.eval(), (images[:1],), config)
    qf.calibrate(prepared, [images])
    qat = qf.prepare_qat(prepared, (images[:1],))
    thresholds = [module.log2_threshold for module in qat.modules()
                  if isinstance(module, LearnedRangeQuantizer)]
    assert thresholds and all(any(t is p for p in qat.parameters()) for t in thresholds)
    before = [float(t.detach()) for t in thresholds]
    optimizer = torch.optim.Adam(thresholds, lr=0.05)  # their gradients are ~1e-7 here
    for _ in range(5):
        optimizer.zero_grad()
        qat(images).square().mean().backward()
        optimizer.step()
    assert [float(t.detach()) for t in thresholds] != before
    qat.eval()
    with torch.no_grad():
        assert torch.equal(qat(images), qf.convert(qat)(images))


@pytest.mark.parametrize("from_calibration", [False, True])
def test_learned_ranges_leave_the_input_range_to_statistics(from_calibration):
    """No gradient reaches the model's input: learning its threshold would cost the first
    conv an input gradient. Its quantizer keeps statistics (calibration's range, if any) and
    its output asks autograd for nothing; every quantizer after a layer learns."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    images = torch.randn(4, 3, 8, 8)
    config = qf.QuantConfig(progress=False, qat_schedule=qf.QATSchedule(ranges="learned"))
    if from_calibration:
        model = qf.prepare(model, (images[:1],), config)
        qf.calibrate(model, [images])
        config = None
    qat = qf.prepare_qat(model, (images[:1],), config)
    named = dict(qat.named_modules())
    inputs = [node for node in qat.graph.nodes
              if node.op == "call_module" and node.args and node.args[0].op == "placeholder"]
    assert len(inputs) == 1
    input_quantizer = named[inputs[0].target]
    assert not isinstance(input_quantizer, LearnedRangeQuantizer)
    assert not input_quantizer(images).requires_grad
    assert bool(input_quantizer.observer_enabled) is not from_calibration
    learned = [module for module in qat.modules() if isinstance(module, LearnedRangeQuantizer)]
    assert len(learned) == 2  # after the ReLU and after the last conv


@pytest.mark.parametrize("from_calibration", [False, True])
def test_learned_weight_thresholds_start_train_and_convert_exactly(from_calibration):
    """QATSchedule(weight_exponent="learned"): one threshold per weight (per channel for the
    depthwise conv), started from calibration's exponent when there is one, trained by the
    optimizer; eval and convert compute with ceil(threshold) - 7."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    images = torch.randn(8, 3, 12, 12)
    config = qf.QuantConfig(progress=False,
                            qat_schedule=qf.QATSchedule(weight_exponent="learned"))
    calibrated = []
    if from_calibration:
        model = qf.prepare(model, (images[:1],), config)
        qf.calibrate(model, [images])
        calibrated = [layer.weight_quantizer.exponent.clone() for layer in model.modules()
                      if hasattr(layer, "weight_quantizer")]
        config = None
    qat = qf.prepare_qat(model, (images[:1],), config)
    quantizers = [module for module in qat.modules() if isinstance(module, LearnedWeightQuantizer)]
    assert [tuple(q.log2_threshold.shape) for q in quantizers] == [(), (8,), ()]
    for quantizer, exponent in zip(quantizers, calibrated):
        assert torch.equal(torch.ceil(quantizer.log2_threshold.detach()) - 7, exponent)
    optimizer = torch.optim.Adam(qat.parameters(), lr=0.01)
    target = torch.randn(8, 4, 8, 8)
    for _ in range(5):
        optimizer.zero_grad()
        (qat(images) - target).square().mean().backward()
        optimizer.step()
    assert all(bool(q.log2_threshold.grad.abs().sum() > 0) for q in quantizers)
    qat.eval()
    with torch.no_grad():
        before = qat(images)
        assert torch.equal(before, qf.convert(qat)(images))
        quantizers[-1].log2_threshold.add_(3.0)  # three octaves wider: the exponent follows
        after = qat(images)
        assert not torch.equal(after, before)
        assert torch.equal(after, qf.convert(qat)(images))


def test_unknown_range_rule_is_refused():
    with pytest.raises(qf.ConfigError, match="ranges"):
        qf.QATSchedule(ranges="learnt")
