"""Bias calibration and calibration determinism."""

import torch
from torch import nn

import quantfx as qf
from quantfx.layers import FakeQuantLayer
from quantfx.ptc.bias_calibration import layer_depths
from tests.helpers import ConvBnReLU, randomize_batchnorm


class BiasedWeights(nn.Module):
    """Weights just below a rounding boundary: quantization shifts every output one way."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 1, bias=True)
        self.head = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            step = 2.0**-7  # 8-bit scale of weights whose largest magnitude is ~0.99
            codes = torch.randint(1, 120, self.conv.weight.shape).float()
            self.conv.weight.copy_((codes + 0.45) * step)  # every weight rounds down
            self.conv.bias.zero_()

    def forward(self, x):
        return self.head(self.conv(x))


def _channel_mean_error(model, converted, data):
    """Largest per-channel difference of the conv output means, float model vs converted."""
    captured = {}
    hooks = [
        model.conv.register_forward_hook(lambda m, i, o: captured.__setitem__("float", o)),
        converted.get_submodule("conv").register_forward_hook(
            lambda m, i, o: captured.__setitem__("quant", o)
        ),
    ]
    with torch.no_grad():
        model(data)
        converted(data)
    for hook in hooks:
        hook.remove()
    return (captured["float"].mean((0, 2, 3)) - captured["quant"].mean((0, 2, 3))).abs().max()


def test_bias_calibration_reduces_per_channel_mean_error():
    torch.manual_seed(0)
    data = torch.rand(64, 4, 6, 6) + 0.5  # positive inputs: the weight error does not cancel
    errors = {}
    for enabled in (False, True):
        config = qf.QuantConfig(bias_calibration=enabled, weight_observer="minmax")
        torch.manual_seed(1)
        model = BiasedWeights()
        prepared = qf.prepare(model, data[:1], config)
        qf.calibrate(prepared, list(data.split(16)))
        errors[enabled] = _channel_mean_error(model, qf.convert(prepared), data).item()
    assert errors[True] < errors[False] / 4


def test_layers_at_the_same_depth_share_a_pass():
    prepared = qf.prepare(ConvBnReLU(), torch.randn(1, 3, 8, 8))
    assert layer_depths(prepared) == {"conv1": 1, "conv2": 2, "fc": 3}


def _calibrated_state(batch_size, data, seed_model=0):
    torch.manual_seed(seed_model)
    model = randomize_batchnorm(ConvBnReLU(8))
    prepared = qf.prepare(model, data[:1])
    qf.calibrate(prepared, list(data.split(batch_size)))
    converted = qf.convert(prepared)
    exponents = {name: buffer.clone() for name, buffer in converted.named_buffers()
                 if name.endswith("exponent")}
    biases = {name: m.layer.bias.detach().clone() for name, m in prepared.named_modules()
              if isinstance(m, FakeQuantLayer)}
    return exponents, biases


def test_calibration_is_deterministic_and_independent_of_batch_size():
    data = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    exponents_a, biases_a = _calibrated_state(8, data)
    exponents_b, biases_b = _calibrated_state(8, data)
    exponents_c, biases_c = _calibrated_state(4, data)
    for name in exponents_a:
        assert torch.equal(exponents_a[name], exponents_b[name]), name
        assert torch.equal(exponents_a[name], exponents_c[name]), name
    for name in biases_a:
        assert torch.equal(biases_a[name], biases_b[name]), name
        torch.testing.assert_close(biases_a[name], biases_c[name], rtol=1e-5, atol=1e-6)


def test_calibrate_ends_quantizing_not_observing():
    """Bias calibration switches quantizers on and off; calibrate ends with every observed one
    quantizing and none observing (the calibrated model simulates the converted one)."""
    prepared = qf.prepare(ConvBnReLU(), torch.randn(1, 3, 8, 8))
    qf.calibrate(prepared, [torch.randn(2, 3, 8, 8)])
    quantizer = prepared.get_submodule("quantizers.x")
    assert not bool(quantizer.observer_enabled) and bool(quantizer.quant_enabled)


def _block(channels_in: int, channels_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1),
                         nn.BatchNorm2d(channels_out), nn.ReLU())


class Branchy(nn.Module):
    """Parallel branches of different depths, a residual add and a concat: layers of one depth
    feed layers several depths later, which the level-by-level runner must order right."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _block(3, 8)
        self.deep = nn.Sequential(_block(8, 8), _block(8, 8), _block(8, 8))
        self.shallow = _block(8, 8)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        stem = self.stem(x)
        merged = torch.cat([self.deep(stem) + stem, self.shallow(stem)], dim=1)
        return self.head(merged.mean((2, 3)))


def _biases_after_bias_calibration(memory_limit_bytes):
    from quantfx.ptc.bias_calibration import calibrate_biases

    torch.manual_seed(0)
    model = randomize_batchnorm(Branchy().eval())
    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    prepared = qf.prepare(model, (data[0],), qf.QuantConfig(bias_calibration=False,
                                                            progress=False))
    qf.calibrate(prepared, data)
    calibrate_biases(prepared, [(batch,) for batch in data], progress=False,
                     memory_limit_bytes=memory_limit_bytes)
    return {name: value.clone() for name, value in prepared.state_dict().items()
            if name.endswith("bias")}


def test_level_runner_matches_rerunning_the_graph_per_depth():
    """Keeping activations between depths changes the cost, never the result: bit-identical
    biases with no memory limit, with none to spare (re-run from the inputs at every depth),
    and with a limit that is passed part-way."""
    unlimited = _biases_after_bias_calibration(1 << 40)
    for limit in (0, 60_000):  # 60 kB: passed while measuring depth 2 of 5
        limited = _biases_after_bias_calibration(limit)
        assert unlimited.keys() == limited.keys()
        for name, bias in unlimited.items():
            assert torch.equal(bias, limited[name]), (limit, name)
    assert any(bias.abs().sum() > 0 for bias in unlimited.values())
