"""Mixed precision: named / first / last layers at 16 bit, the layers calibration widens by
measurement (`quantfx.ptc.mixed_precision`), and the 8-vs-16-bit check."""

import pytest
import torch
from torch import nn

import quantfx as qf
from quantfx.layers import IntegerLayer
from quantfx.quantizers import FrozenQuantizer, calibration_quantizers
from quantfx.state import state_of
from tests.helpers import ConvBnReLU, quantize_model, randomize_batchnorm


def _bits(converted):
    layers = {name: m.weight_bits for name, m in converted.named_modules()
              if isinstance(m, IntegerLayer)}
    outputs = {name.removeprefix("quantizers."): m.bits for name, m in converted.named_modules()
               if isinstance(m, FrozenQuantizer)}
    return layers, outputs


def test_first_and_last_layers_at_16_bit():
    config = qf.QuantConfig(sixteen_bit_layers=["first", "last"])
    _, converted = quantize_model(randomize_batchnorm(ConvBnReLU()), config=config)
    layers, outputs = _bits(converted)
    assert layers == {"conv1": 16, "conv2": 8, "fc": 16}
    # conv1's output is quantized after its fused ReLU; fc has no activation
    assert outputs == {"x": 8, "relu": 16, "relu_1": 8, "pool": 8, "fc": 16}
    assert converted.get_submodule("conv1").weight_int.dtype == torch.int16


def test_layer_by_name():
    config = qf.QuantConfig(sixteen_bit_layers=["conv2"], widen_sensitive_layers=False)
    _, converted = quantize_model(ConvBnReLU(), config=config)
    layers, outputs = _bits(converted)
    assert layers == {"conv1": 8, "conv2": 16, "fc": 8} and outputs["relu_1"] == 16


def test_any_tensor_by_node_name_as_analyze_reports_it(tmp_path):
    """An input or the pool (not conv/linear layers) named like analyze's tensors: only their
    outputs widen, and the export lists them in TIDL's 16-bit features."""
    config = qf.QuantConfig(sixteen_bit_layers=["x", "pool"], widen_sensitive_layers=False)
    _, converted = quantize_model(randomize_batchnorm(ConvBnReLU()), config=config)
    layers, outputs = _bits(converted)
    assert set(layers.values()) == {8}
    assert outputs == {"x": 16, "relu": 8, "relu_1": 8, "pool": 16, "fc": 8}
    report = qf.export_onnx(converted, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    assert report.verified and len(report.sixteen_bit_features) == 2


def test_unknown_layer_name_is_an_error_that_lists_layers():
    config = qf.QuantConfig(sixteen_bit_layers=["backbone.nope"])
    with pytest.raises(qf.ConfigError, match="conv1"):
        qf.prepare(ConvBnReLU(), torch.randn(1, 3, 8, 8), config)


def test_sixteen_bit_layer_is_closer_to_float():
    torch.manual_seed(0)  # the model, whatever the tests imported before
    model = randomize_batchnorm(ConvBnReLU(16)).eval()
    x = torch.randn(2, 3, 16, 16)
    _, eight = quantize_model(model, config=qf.QuantConfig(widen_sensitive_layers=False))
    _, mixed = quantize_model(model, config=qf.QuantConfig(sixteen_bit_layers=["last"],
                                                           widen_sensitive_layers=False))
    with torch.no_grad():
        reference = model(x)
        assert qf.qmath.sqnr_db(reference, mixed(x)) > qf.qmath.sqnr_db(reference, eight(x))


def _scored_by_bits(scores: dict):
    """An `evaluate` that gives the float model scores[None] and a converted model the score
    of its activation width, so each verdict of compare_bit_depths can be reached."""

    def evaluate(candidate):
        widths = {m.bits for m in candidate.modules() if isinstance(m, FrozenQuantizer)}
        return scores[widths.pop() if widths else None]

    return evaluate


@pytest.mark.parametrize("scores, verdict", [
    ({None: 90.0, 8: 89.5, 16: 90.0}, "8-bit is within 1 of float"),
    ({None: 90.0, 8: 80.0, 16: 89.8}, "the loss is quantization. Try 16-bit first/last layers"),
    ({None: 90.0, 8: 80.0, 16: 82.0}, "16-bit already loses 8: the problem is not quantization"),
])
def test_compare_bit_depths_gives_the_verdict_of_the_scores(scores, verdict):
    model = randomize_batchnorm(ConvBnReLU(8)).eval()
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    report = qf.compare_bit_depths(model, data[0], data, _scored_by_bits(scores))
    assert (report.float_score, report.int8_score, report.int16_score) == (
        scores[None], scores[8], scores[16])
    assert verdict in report.verdict
    assert f"{scores[16]:10.4f}" in str(report)


def test_sixteen_bit_layers_on_tda4vm_keep_32_bit_biases():
    """TDA4VM's 16-bit bias belongs to layers with 8-bit weights: with 16-bit weights TIDL
    keeps 32-bit biases. Applied to 16-bit layers, the rule zeroed every weight of fc after
    its 16-bit input (all-16-bit 8.2 dB against 45.5 dB at 8 bit)."""
    model = randomize_batchnorm(ConvBnReLU(16)).eval()
    x = torch.randn(2, 3, 16, 16)
    _, eight = quantize_model(model, config=qf.QuantConfig(target="tda4vm", progress=False))
    wide = qf.QuantConfig(target="tda4vm", activation_bits=16, weight_bits=16, progress=False)
    _, sixteen = quantize_model(model, config=wide)
    for name in ("conv1", "conv2", "fc"):
        assert sixteen.get_submodule(name).bias_bits == 32
        assert eight.get_submodule(name).bias_bits == 16
    with torch.no_grad():
        reference = model(x)
        assert qf.qmath.sqnr_db(reference, sixteen(x)) > qf.qmath.sqnr_db(reference, eight(x)) + 20


def test_a_bias_that_would_zero_the_weights_is_an_error():
    """8-bit weights of 0.9 under a bias of 2000 at TDA4VM's 16-bit bias: the weight step the
    bias needs (2) rounds every weight to 0 although they move the output by up to 11. convert
    names the layer instead of dropping its weights; the fix it names works."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight.fill_(0.9)
        model[0].bias.fill_(2000.0)
    for rounding in ("nearest", None):  # None: error feedback, which rounds the weight itself
        config = qf.QuantConfig(target="tda4vm", bias_calibration=False, progress=False,
                                weight_rounding=rounding)
        prepared = qf.prepare(model, (torch.randn(1, 3, 4, 4),), config)
        with pytest.raises(qf.ConvertError, match="layer '0' would keep no weight"):
            qf.calibrate(prepared, [torch.randn(2, 3, 4, 4)])  # its check converts
    wide = qf.QuantConfig(target="tda4vm", sixteen_bit_layers=["0"], bias_calibration=False,
                          progress=False)
    prepared = qf.prepare(model, (torch.randn(1, 3, 4, 4),), wide)
    qf.calibrate(prepared, [torch.randn(2, 3, 4, 4)])
    assert bool(qf.convert(prepared).get_submodule("0").weight_int.any())
    with torch.no_grad():
        model[0].weight.fill_(1e-3)  # weights that never matter next to the bias: no error
    prepared = qf.prepare(model, (torch.randn(1, 3, 4, 4),), config)
    qf.calibrate(prepared, [torch.randn(2, 3, 4, 4)])


def test_a_state_dict_of_other_bit_widths_is_refused():
    """int16 codes copied into an 8-bit conversion's int8 buffers were truncated silently."""
    model = randomize_batchnorm(ConvBnReLU()).eval()
    _, eight = quantize_model(model)
    _, wide = quantize_model(model, config=qf.QuantConfig(sixteen_bit_layers=["conv2"]))
    with pytest.raises(qf.LoadError, match="16-bit quantizer 'quantizers.relu_1'.*other bit "
                                           "widths.*calibration on other data"):
        eight.load_state_dict(wide.state_dict())
    _, again = quantize_model(model)
    again.load_state_dict(eight.state_dict())  # the same widths load as before


class _Chain(nn.Module):
    """1x1 conv+ReLU layers that keep the signal's size; `spread` gives that layer weights 300x
    the others on an input channel the layer before never drives (the same function), so one
    8-bit grid per tensor rounds the layer's real weights to nothing."""

    def __init__(self, spread: int | None = None, depth: int = 10) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 1) for _ in range(depth))
        with torch.no_grad():
            for conv in self.convs:
                conv.weight.copy_(torch.randn(8, 8, 1, 1, generator=generator) * 0.5)
                conv.bias.copy_(torch.randn(8, generator=generator) * 0.1)
            if spread is not None:
                self.convs[spread - 1].weight[7].zero_()
                self.convs[spread - 1].bias[7] = -1.0  # channel 7 is 0 after the ReLU
                self.convs[spread].weight[:, 7] = 300.0

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x


_CALIBRATION = [torch.randn(8, 8, 6, 6, generator=torch.Generator().manual_seed(i))
                for i in range(2)]


def _calibrated(model, **options):
    """Calibrated with minmax weight exponents: the output-error search would clip the 300s
    that are never driven, and `spread` would cost nothing."""
    options = {"weight_observer": "minmax", **options}
    prepared = qf.prepare(model.eval(), (_CALIBRATION[0][:1],),
                          qf.QuantConfig(progress=False, widen_coarse_weights=False, **options))
    return qf.calibrate(prepared, _CALIBRATION)


def test_the_layer_whose_own_rounding_costs_most_runs_at_16_bit():
    model = _Chain(spread=4)
    narrow = qf.convert(_calibrated(model, widen_sensitive_layers=False))
    prepared = _calibrated(model)
    check = state_of(prepared).calibration_check
    # at most a tenth of the 10 layers: one; and besides it the last layer, whose own 8-bit
    # rounding holds the model's lone output below 45 dB (the generic target)
    assert check.sixteen_bit == ["convs.4", "convs.9"]
    assert "16 bit by measurement: convs.4, convs.9" in check.summary()
    layers, outputs = _bits(qf.convert(prepared))
    assert {name for name, bits in layers.items() if bits == 16} == {"convs.4", "convs.9"}
    assert {name for name, bits in outputs.items() if bits == 16} == {"relu_4", "relu_9"}
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        reference = model(x)
        widened = qf.qmath.sqnr_db(reference, qf.convert(prepared)(x))
        assert widened > qf.qmath.sqnr_db(reference, narrow(x)) + 10


def test_the_widened_model_exports_bit_exact_and_lists_its_16_bit_layers(tmp_path):
    converted = qf.convert(_calibrated(_Chain(spread=4)))
    report = qf.export_onnx(converted, (_CALIBRATION[0][:1],), tmp_path / "chain.onnx",
                            verify_data=_CALIBRATION[1])
    assert report.fraction_identical == 1.0
    assert report.measured_sixteen_bit == ["convs.4", "convs.9"]
    assert "16 bit by measurement: convs.4, convs.9" in report.summary()
    assert "convs_4" in report.sixteen_bit_params and len(report.sixteen_bit_features) == 2


def test_a_model_that_8_bit_serves_keeps_8_bit_everywhere_but_its_output_on_generic():
    """Every layer holds the output above 30 dB; the last one's own 8-bit step holds it below
    45 dB: 16 bit where the runtime takes int16 Q/DQ, 8 bit in a TIDL file (8-bit import)."""
    prepared = _calibrated(_Chain())
    assert state_of(prepared).calibration_check.sixteen_bit == ["convs.9"]
    tidl = _calibrated(_Chain(), target="am68a")
    assert state_of(tidl).calibration_check.sixteen_bit == []
    assert {q.bits for _, q in calibration_quantizers(tidl)} == {8}


def test_tda4vm_widens_weights_only_so_the_next_16_bit_bias_still_holds():
    prepared = _calibrated(_Chain(spread=4), target="tda4vm", equalization=False)
    assert state_of(prepared).calibration_check.sixteen_bit == ["convs.4"]
    layers, outputs = _bits(qf.convert(prepared))
    assert layers["convs.4"] == 16 and set(outputs.values()) == {8}


def test_the_measured_widths_travel_in_the_state_dict_and_a_new_calibration_decides_again(
        tmp_path):
    model = _Chain(spread=4)
    prepared = _calibrated(model)
    fresh = qf.prepare(model, (_CALIBRATION[0][:1],), qf.QuantConfig(
        progress=False, widen_coarse_weights=False, weight_observer="minmax"))
    fresh.load_state_dict(prepared.state_dict())
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert torch.equal(qf.convert(fresh)(x), qf.convert(prepared)(x))
    # the export report names the measured layers of the loaded state, and no check it lacks
    report = qf.export_onnx(qf.convert(fresh), (x[:1],), tmp_path / "fresh.onnx")
    assert report.measured_sixteen_bit == ["convs.4", "convs.9"]
    assert report.calibration_sqnr_db is None
    # an old state_dict, saved before widths were kept, still loads (at the placed widths)
    old = {key: value for key, value in prepared.state_dict().items()
           if not key.endswith(".width")}
    fresh.load_state_dict(old)
    qf.calibrate(fresh, _CALIBRATION)  # narrowed to the placed widths, then measured again
    assert state_of(fresh).calibration_check.sixteen_bit == ["convs.4", "convs.9"]
    assert sum(q.bits == 16 for _, q in calibration_quantizers(fresh)) == 4


class _Labels(_Chain):
    """The chain's output channel index: no float output to measure against."""

    def forward(self, x):
        return super().forward(x).argmax(1)


def test_a_model_without_float_outputs_calibrates_and_widens_nothing():
    prepared = _calibrated(_Labels(spread=4))
    assert state_of(prepared).measured_sixteen_bit == []
    assert {q.bits for _, q in calibration_quantizers(prepared)} == {8}


def test_layers_are_measured_in_halving_groups_and_the_sensitive_one_exactly(monkeypatch):
    import quantfx.ptc.mixed_precision as module

    # measured as calibration measures them: before weight rounding moves any weight
    prepared = _calibrated(_Chain(spread=38, depth=40), widen_sensitive_layers=False,
                           weight_rounding="nearest")
    units = module.precision_units(prepared)
    batch = [(_CALIBRATION[0],)]
    passes = []
    measure = module._outputs
    monkeypatch.setattr(module, "_outputs", lambda *args: passes.append(1) or measure(*args))
    grouped = module.own_rounding_db(prepared, units, batch, progress=False)
    assert len(passes) < len(units) / 2  # one forward per unit would be 1 + len(units)
    (sensitive,) = [index for index, unit in enumerate(units) if unit.name == "convs.38"]
    alone = [rounding.db for rounding in grouped if rounding.sensitive]
    passes.clear()
    exact = module.own_rounding_db(prepared, [units[sensitive]], batch, progress=False)
    assert grouped[sensitive] == exact[0] and exact[0].db == min(alone)
    served = _calibrated(_Chain(), widen_sensitive_layers=False, weight_rounding="nearest")
    passes.clear()
    served_units = module.precision_units(served)
    measured = module.own_rounding_db(served, served_units, batch, progress=False)
    assert not any(rounding.sensitive for rounding in measured)
    assert min(rounding.db for rounding in measured) >= module.SENSITIVE_DB  # all above 30 dB
    assert len(passes) < 1 + len(served_units)  # and groups above it are not split


class _Heads(nn.Module):
    """A trunk and two heads (a detector's box and class convs), returned apart or, with
    `joined`, concatenated into one output; the class head's outlier bias spreads its output."""

    def __init__(self, joined: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.trunk, self.boxes, self.classes = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1), \
            nn.Conv2d(8, 6, 1)
        self.joined = joined
        with torch.no_grad():
            for conv in (self.trunk, self.boxes, self.classes):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.5)
                conv.bias.zero_()
            self.classes.bias[0] = -12.0

    def forward(self, x):
        x = torch.relu(self.trunk(x))
        boxes, classes = self.boxes(x), self.classes(x)
        return torch.cat([boxes, classes], 1) if self.joined else (boxes, classes)


def test_each_output_is_measured_on_its_own_and_a_head_below_the_output_bar_widens(caplog):
    """Apart, the box head's own 8-bit rounding leaves its output at 35.6 dB: above the 30 dB
    bar of the joined output (39 dB there, the class output's range hiding it), below the bar
    of a layer producing one of several outputs (45 dB): the box conv runs 16 bit, and so does
    the class conv (its own output is below 45 dB too; heads widen besides the tenth). Joined
    into one output, on a TIDL target (which holds a lone output to 30 dB only), nothing widens."""
    import quantfx.ptc.mixed_precision as module

    apart = _calibrated(_Heads())
    assert state_of(apart).calibration_check.sixteen_bit == ["boxes", "classes"]
    joined = _calibrated(_Heads(joined=True), target="am68a", per_channel_weights=False)
    assert state_of(joined).calibration_check.sixteen_bit == []
    narrow = _calibrated(_Heads(), widen_sensitive_layers=False)
    units = module.precision_units(narrow)
    measured = module.own_rounding_db(narrow, units, [(_CALIBRATION[0],)], progress=False)
    figures = {unit.name: rounding for unit, rounding in zip(units, measured)}
    assert figures["boxes"].sensitive and not figures["trunk"].sensitive
    assert module.SENSITIVE_DB < figures["boxes"].db < module.OUTPUT_DB
