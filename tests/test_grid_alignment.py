"""ReLU6 outputs stretched to the top of their power-of-2 grid
(quantfx/passes/grid_alignment.py)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import quantfx as qf
from quantfx.passes.grid_alignment import (
    align_bounded_activations,
    alignments,
    fill_db,
    grid_top,
)
from tests.helpers import randomize_batchnorm


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand + ReLU6, padded depthwise + ReLU6, 1x1 project, skip;
    then a head conv + ReLU6, a pool, a flatten and a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32),
                                    nn.ReLU6())
        self.depthwise = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(32, 32, 3, groups=32,
                                                                  bias=False),
                                       nn.BatchNorm2d(32), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(32, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU6())
        self.classifier = nn.Linear(16, 5)

    def forward(self, x):
        x = x + self.project(self.depthwise(self.expand(x)))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.head(x), 1),
                                             1))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = randomize_batchnorm(InvertedResidual(), seed)
    with torch.no_grad():  # drive the ReLU6s into their bound, as trained nets do
        for batchnorm in (model.expand[1], model.depthwise[2]):
            batchnorm.weight.mul_(4.0)
    return model.eval()


def _bounds(prepared: nn.Module) -> dict[str, float]:
    return {name: float(module.max_val) for name, module in prepared.named_modules()
            if isinstance(module, nn.Hardtanh)}


def test_relu6_between_layers_fills_its_grid_and_the_file_holds_the_new_clip(tmp_path):
    model, x = _model(), torch.randn(64, 8, 6, 6)
    prepared = qf.prepare(model, x[:1], qf.QuantConfig(per_channel_weights=True))
    top = 255 / 32
    assert _bounds(prepared) == {"expand.2": top, "depthwise.3": top, "head.1": top}
    with torch.no_grad():  # observing only: the float function, unchanged
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)
    qf.calibrate(prepared, [x])
    for name in ("expand_2", "depthwise_3"):  # the grid's top is reached: no code unused
        quantizer = prepared.get_submodule(f"quantizers.{name}")
        assert quantizer.qmax * 2.0 ** float(quantizer.exponent) == top
        assert float(quantizer.observer.max_val) == pytest.approx(top)
    report = qf.export_onnx(qf.convert(prepared), x[:1], tmp_path / "aligned.onnx",
                            verify_data=x[:8])
    assert report.fraction_identical == 1.0
    assert not report.tidl.warnings()


def test_alignment_lowers_the_output_error():
    model, x = _model(), torch.randn(64, 8, 6, 6)
    with torch.no_grad():
        reference = model(x)
    errors = {}
    for align in (False, True):
        config = qf.QuantConfig(per_channel_weights=True, align_bounded_activations=align,
                                weight_bits=16, widen_sensitive_layers=False)
        prepared = qf.prepare(model, x[:1], config)
        qf.calibrate(prepared, [x])
        with torch.no_grad():
            errors[align] = float((qf.convert(prepared)(x) - reference).pow(2).mean())
    assert 10 * math.log10(errors[False] / errors[True]) > 0.5  # dB


class Branching(nn.Module):
    """A ReLU6 read by two layers, and one whose output is added: neither can be scaled."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.left, self.right = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(
            4, 4, 1)
        self.second, self.last = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        shared = nn.functional.relu6(self.first(x))
        y = self.left(shared) + self.right(shared)
        return self.last(nn.functional.relu6(self.second(y)) + y)


class OneReader(Branching):
    def forward(self, x):
        return self.last(nn.functional.relu6(self.first(x)))


def test_a_relu6_read_twice_or_added_is_left_alone():
    from quantfx.frontend import build_graph

    torch.manual_seed(0)
    model, x = Branching().eval(), torch.randn(2, 4, 5, 5)
    graph, _ = build_graph(model, (x,), qf.QuantConfig(), training=False)
    assert alignments(graph) == []
    graph, _ = build_graph(OneReader().eval(), (x,), qf.QuantConfig(), training=False)
    assert [(a.target, b.target, c.target) for a, b, c in alignments(graph)] == [
        ("first", "relu6", "last")]


class NotCommuting(Branching):
    """Between the ReLU6 and the next layer, ops that a scale does not pass through."""

    def forward(self, x):
        y = self.left(torch.sigmoid(nn.functional.relu6(self.first(x))))
        y = self.right(nn.functional.pad(nn.functional.relu6(self.second(y)), (1, 1), value=1.0))
        return self.last(nn.functional.relu6(self.left(y)) + 1.0)


class TiedDecoder(Branching):
    """The next layer's weight read directly by a tied decoder: rescaling it would change that."""

    def forward(self, x):
        code = self.last(nn.functional.relu6(self.first(x)))
        return nn.functional.conv2d(code, self.last.weight.transpose(0, 1))


def test_a_relu6_before_an_op_a_scale_does_not_pass_or_a_tied_weight_is_left_alone():
    from quantfx.frontend import build_graph

    x = torch.randn(2, 4, 5, 5)
    for model in (NotCommuting().eval(), TiedDecoder().eval()):
        graph, _ = build_graph(model, (x,), qf.QuantConfig(), training=False)
        assert alignments(graph) == []
    model = TiedDecoder().eval()
    with pytest.warns(qf.QuantFxWarning, match="no ONNX emitter for: conv2d"):  # F.conv2d
        prepared = qf.prepare(model, x, qf.QuantConfig())
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x))


def test_a_state_dict_saved_with_other_alignment_is_refused():
    model, x = _model(), torch.randn(8, 8, 6, 6)
    aligned = qf.prepare(model, x[:1], qf.QuantConfig())
    qf.calibrate(aligned, [x])
    plain = qf.prepare(model, x[:1], qf.QuantConfig(align_bounded_activations=False))
    with pytest.raises(qf.LoadError, match="align_bounded_activations"):
        plain.load_state_dict(aligned.state_dict())
    with pytest.raises(qf.LoadError, match="align_bounded_activations"):
        qf.prepare(model, x[:1], qf.QuantConfig()).load_state_dict(plain.state_dict())
    again = qf.prepare(model, x[:1], qf.QuantConfig())
    again.load_state_dict(aligned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(qf.convert(again)(x), qf.convert(aligned)(x))


def test_alignment_is_skipped_where_the_weights_would_lose_more_than_the_activation_gains():
    from quantfx.frontend import build_graph

    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU6(), nn.Conv2d(4, 4, 1)).eval()
    with torch.no_grad():  # times 1.33 takes 0.9 past 1: a per-tensor grid twice as coarse
        for layer in (model[0], model[2]):
            layer.weight.fill_(0.3)
            layer.weight[1:, 0] = 0.6
            layer.weight[0, 0] = 0.9
    for per_channel, aligned in ((False, 0), (True, 1)):  # per channel: one row of four
        graph, _ = build_graph(model, (torch.randn(1, 4, 3, 3),), qf.QuantConfig(),
                               training=False)
        assert align_bounded_activations(graph, 8, 8, lambda _, channels=per_channel: channels
                                         ) == aligned


@settings(max_examples=200, deadline=None)
@given(bound=st.floats(1e-3, 1e3), bits=st.sampled_from([8, 16]))
def test_the_grid_top_holds_the_bound_within_a_factor_of_two(bound, bits):
    """Only a bound within one step of a power of two lies above its grid's top (and is left
    alone: the gain would be below 1 %)."""
    ratio = grid_top(bound, bits) / bound
    assert 1.0 - 2.0 ** -bits - 1e-12 <= ratio < 2.0


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.integers(-4, 4), per_channel=st.booleans())
def test_weight_fill_is_between_minus_six_and_zero_db_and_blind_to_powers_of_two(
        seed, shift, per_channel):
    weight = torch.randn(6, 3, generator=torch.Generator().manual_seed(seed))
    fill = fill_db(weight, per_channel, 8)
    assert -6.03 <= fill <= 0.0
    assert fill_db(weight * 2.0 ** shift, per_channel, 8) == pytest.approx(fill, abs=1e-9)
