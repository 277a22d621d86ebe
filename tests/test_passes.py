"""Graph passes: functionals → modules, un-sharing, BatchNorm folding, quantizer placement."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantfx as qf
from quantfx import modules as qm
from quantfx.config import QuantConfig
from quantfx.frontend import build_graph
from quantfx.layers import FakeQuantLayer
from quantfx.passes.fuse import fold_batchnorm
from quantfx.quantizers import CalibrationQuantizer
from tests.helpers import ConvBnReLU, quantize_model, quantizer_modules, randomize_batchnorm


class Apply(nn.Module):
    """conv, then `function` on the conv output."""

    def __init__(self, function):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.function = function

    def forward(self, x):
        return self.function(self.conv(x))


UNARY_CASES = [
    (F.relu, nn.ReLU),
    (torch.relu, nn.ReLU),
    (lambda x: x.relu(), nn.ReLU),
    (lambda x: F.relu(x, inplace=True), nn.ReLU),
    (lambda x: x.relu_(), nn.ReLU),
    (F.relu6, nn.ReLU6),
    (lambda x: F.hardtanh(x, 0.0, 4.0), nn.Hardtanh),
    (F.hardswish, qm.HardSwish),
    (F.hardsigmoid, qm.HardSigmoid),
    (nn.Hardswish(), qm.HardSwish),
    (nn.Hardsigmoid(), qm.HardSigmoid),
    (torch.sigmoid, nn.Sigmoid),
    (lambda x: x.sigmoid(), nn.Sigmoid),
    (F.silu, nn.SiLU),
    (F.gelu, nn.GELU),
    (lambda x: F.leaky_relu(x, 0.2), nn.LeakyReLU),
    (lambda x: x + x, qm.Add),
    (lambda x: torch.add(x, x), qm.Add),
    (lambda x: x.add(x), qm.Add),
    (lambda x: x - x * 2, qm.Sub),
    (lambda x: torch.mul(x, x), qm.Mul),
    (lambda x: torch.cat([x, x], 1), qm.Cat),
    (lambda x: torch.stack([x, x], 1), qm.Stack),
    (lambda x: torch.flatten(x, 1), nn.Flatten),
    (lambda x: x.flatten(1), nn.Flatten),
    (lambda x: F.adaptive_avg_pool2d(x, 1), nn.AdaptiveAvgPool2d),
    (lambda x: F.avg_pool2d(x, 2), nn.AvgPool2d),
    (lambda x: F.max_pool2d(x, 2), nn.MaxPool2d),
    (lambda x: x.mean([2, 3]), qm.Mean),
    (lambda x: torch.mean(x, dim=(2, 3), keepdim=True), qm.Mean),
    (lambda x: F.interpolate(x, scale_factor=2.0), qm.Interpolate),
    (lambda x: F.interpolate(x, size=x.shape[-2:], mode="bilinear"), qm.Interpolate),
]


def _inplace_add(x):
    y = x * 1.0
    y += x
    return y


UNARY_CASES.append((_inplace_add, qm.Add))


@pytest.mark.parametrize("function,module_type", UNARY_CASES)
def test_functional_becomes_module_and_computes_the_same(function, module_type):
    model = Apply(function).eval()
    x = torch.randn(2, 3, 8, 8)
    graph_module, _ = build_graph(model, (x,), QuantConfig(), training=False)
    found = [type(m) for m in graph_module.modules()]
    assert module_type in found
    leftovers = [
        node.target
        for node in graph_module.graph.nodes
        if node.op in ("call_function", "call_method")
        and node.target not in (getattr, operator.getitem, "size")
    ]
    assert leftovers == []
    with torch.no_grad():
        if module_type in (qm.HardSwish, qm.HardSigmoid):  # ONNX's float steps: 1-ulp apart
            torch.testing.assert_close(graph_module(x), model(x), rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(graph_module(x), model(x))


class ReusedReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        return self.relu(y) + self.relu(100.0 * y)


def test_reused_relu_gets_one_quantizer_per_call_site_with_its_own_exponent():
    prepared, converted = quantize_model(ReusedReLU(), shape=(4, 3, 8, 8))
    relu_quantizers = {
        name: m for name, m in quantizer_modules(converted).items() if "relu" in name
    }
    assert len(relu_quantizers) == 2
    exponents = sorted(int(m.exponent) for m in relu_quantizers.values())
    assert exponents[1] - exponents[0] >= 6  # 100x apart is about 2**6.6
    assert all(not m.signed for m in relu_quantizers.values())


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 3))


def test_reused_parameterized_module_keeps_its_parameters_tied():
    graph_module, _ = build_graph(SharedConv(), (torch.randn(1, 4, 6, 6),), QuantConfig(), True)
    convs = [
        graph_module.get_submodule(n.target)
        for n in graph_module.graph.nodes
        if n.op == "call_module" and isinstance(graph_module.get_submodule(n.target), nn.Conv2d)
    ]
    assert len(convs) == 2 and convs[0] is not convs[1]
    assert convs[0].weight is convs[1].weight and convs[0].bias is convs[1].bias


def test_batchnorm_folding_is_exact_in_float():
    model = randomize_batchnorm(SharedConv()).eval()
    x = torch.randn(2, 4, 6, 6)
    graph_module, _ = build_graph(model, (x,), QuantConfig(), training=False)
    fold_batchnorm(graph_module)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in graph_module.modules())
    with torch.no_grad():
        torch.testing.assert_close(graph_module(x), model(x), rtol=1e-5, atol=1e-5)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 1)
        self.conv_b = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        a = F.relu(self.conv_a(x))
        b = self.conv_b(x) * 50.0
        added = torch.add(a, b)
        joined = torch.cat([a, b], dim=1)
        return added, torch.flatten(joined, 1)


def test_functional_relu_add_and_cat_each_get_a_quantizer():
    # all 8 bit (measured mixed precision would widen an output head), so exponents compare
    config = QuantConfig(widen_sensitive_layers=False)
    prepared, converted = quantize_model(Mixed(), shape=(4, 3, 5, 5), config=config)
    names = set(quantizer_modules(prepared))
    for expected in ("quantizers.relu", "quantizers.add", "quantizers.cat", "quantizers.x"):
        assert expected in names
    # flatten is shape-only: no quantizer of its own
    assert not any("flatten" in name for name in names)
    exponents = {name: int(m.exponent) for name, m in quantizer_modules(converted).items()}
    assert exponents["quantizers.add"] > exponents["quantizers.relu"]
    assert not quantizer_modules(converted)["quantizers.relu"].signed
    assert quantizer_modules(converted)["quantizers.add"].signed


def test_fused_activation_has_no_quantizer_between_layer_and_activation():
    prepared = qf.prepare(ConvBnReLU(), torch.randn(1, 3, 8, 8))
    quantized_inputs = [
        n
        for n in prepared.graph.nodes
        if n.op == "call_module"
        and isinstance(prepared.get_submodule(n.target), CalibrationQuantizer)
    ]
    sources = {n.args[0].target for n in quantized_inputs}
    assert "conv1" not in sources and "relu" in sources  # conv1+bn1+relu is one layer
    assert sources == {"x", "relu", "relu_1", "pool", "fc"}


def test_depthwise_weights_are_per_channel_by_default():
    prepared = qf.prepare(ConvBnReLU(), torch.randn(1, 3, 8, 8))
    assert prepared.get_submodule("conv2").weight_quantizer.axis == 0
    assert prepared.get_submodule("conv1").weight_quantizer.axis is None
    off = qf.prepare(
        ConvBnReLU(), torch.randn(1, 3, 8, 8), QuantConfig(per_channel_depthwise=False)
    )
    assert off.get_submodule("conv2").weight_quantizer.axis is None


class FunctionalLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.weight = nn.Parameter(torch.rand(4) + 0.5)
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1)
        return F.layer_norm(x, (4,), self.weight, self.bias, 1e-6)


def test_functional_layer_norm_becomes_a_module_sharing_its_parameters():
    model = FunctionalLayerNorm().eval()
    x = torch.randn(2, 3, 5, 5)
    graph_module, _ = build_graph(model, (x,), QuantConfig(), training=True)
    norms = [m for m in graph_module.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 1
    assert norms[0].weight is graph_module.weight and norms[0].bias is graph_module.bias
    assert not any(node.op == "get_attr" for node in graph_module.graph.nodes)
    with torch.no_grad():
        assert torch.equal(graph_module(x), model(x))


def test_transposed_convs_fold_batchnorm_and_quantize_their_weights():
    from tests.helpers import TinyDecoder

    torch.manual_seed(0)
    model = randomize_batchnorm(TinyDecoder().eval())
    prepared, converted = quantize_model(model, shape=(2, 3, 8, 8))
    layers = {name: module.layer for name, module in prepared.named_modules()
              if isinstance(module, FakeQuantLayer)}
    assert isinstance(layers["up1"], nn.ConvTranspose2d) and layers["up1"].bias is not None
    assert isinstance(layers["up2"], nn.ConvTranspose2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())  # bn1 folded
    data = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        reference, quantized = model(data), converted(data)
    sqnr = 10 * torch.log10(reference.pow(2).mean() / (quantized - reference).pow(2).mean())
    assert sqnr > 25


def test_grouped_transposed_conv_keeps_its_batchnorm():
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4))
    graph, _ = build_graph(model.eval(), (torch.randn(1, 4, 4, 4),), QuantConfig(), False)
    graph = fold_batchnorm(graph)
    assert any(isinstance(m, nn.BatchNorm2d) for m in graph.modules())


def test_functional_softmax_with_traced_stacklevel_becomes_a_module():
    """F.softmax is traced with `_stacklevel=3, dtype=None` keywords (MaxViT's attention):
    it must still become an nn.Softmax with its own quantizer."""

    class Attention(nn.Module):
        def forward(self, x):
            return F.softmax(x @ x.transpose(-2, -1), dim=-1)

    graph, _ = build_graph(Attention(), (torch.randn(2, 4, 8),), QuantConfig(), False)
    softmaxes = [m for m in graph.modules() if isinstance(m, nn.Softmax)]
    assert len(softmaxes) == 1 and softmaxes[0].dim == -1


def test_per_channel_weights_for_every_conv():
    on = qf.prepare(ConvBnReLU(), torch.randn(1, 3, 8, 8), QuantConfig(per_channel_weights=True))
    assert on.get_submodule("conv1").weight_quantizer.axis == 0
    assert on.get_submodule("fc").weight_quantizer.axis is None  # linear stays per tensor
    am68a = qf.prepare(ConvBnReLU(), torch.randn(1, 3, 8, 8), QuantConfig(target="am68a"))
    assert am68a.get_submodule("conv1").weight_quantizer.axis == 0  # the MMAv2 default
    with pytest.raises(qf.ConfigError, match="per-tensor weights only"):
        QuantConfig(target="tda4vm", per_channel_weights=True)


ZOO = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
       "shufflenet_v2_x0_5", "efficientnet_b0", "squeezenet1_0", "mnasnet0_5", "densenet121",
       "googlenet", "resnext50_32x4d"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_equalization_leaves_the_float_function_unchanged(name):
    import torchvision

    from quantfx.passes.equalize import equalize
    from quantfx.passes.unshare import untie_parameters

    torch.manual_seed(0)
    options = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = randomize_batchnorm(torchvision.models.get_model(name, num_classes=10, **options))
    x = torch.randn(2, 3, 64, 64)
    graph, _ = build_graph(model.eval(), (x,), QuantConfig(), training=False)
    untie_parameters(fold_batchnorm(graph))
    with torch.no_grad():
        before = graph(x)
        pairs = equalize(graph)
        after = graph(x)
    assert float((after - before).abs().max() / before.abs().max()) < 1e-5
    if name not in ("regnet_x_400mf", "squeezenet1_0", "efficientnet_b0", "resnext50_32x4d"):
        assert pairs > 0  # something was equalized


def test_equalization_evens_out_channel_ranges():
    from quantfx.passes.equalize import equalize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                          nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[2].weight[3].mul_(100.0)  # one depthwise channel 100x the others
    graph, _ = build_graph(model, (torch.randn(1, 3, 8, 8),), QuantConfig(), training=False)
    ranges = graph.get_submodule("2").weight.abs().flatten(1).amax(1)
    assert float(ranges.max() / ranges.median()) > 50
    equalize(graph)
    ranges = graph.get_submodule("2").weight.abs().flatten(1).amax(1)
    assert float(ranges.max() / ranges.median()) < 5  # the 100x spread over three layers
    assert float(graph.get_submodule("2").bias.abs().max()) == 0.0  # absorbed into the 1x1


def test_equalization_looks_through_prelu_and_pooling_exactly():
    """MTCNN-style conv -> PReLU -> MaxPool -> conv: PReLU's per-channel slope and the pool both
    commute with a positive per-channel scale, so the pair equalizes and nothing changes."""
    from quantfx.passes.equalize import equalization_pairs, equalize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.MaxPool2d(3, 2, ceil_mode=True),
                          nn.Conv2d(8, 8, 3), nn.LeakyReLU(0.1), nn.AvgPool2d(2),
                          nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.05, 0.5)
        model[0].weight[2].mul_(50.0)
    x = torch.randn(4, 3, 20, 20)
    graph, _ = build_graph(model, (x,), QuantConfig(), training=False)
    assert len(equalization_pairs(graph)) == 2
    with torch.no_grad():
        before = graph(x)
        equalize(graph)
        after = graph(x)
    assert float((after - before).abs().max() / before.abs().max()) < 1e-5
    ranges = graph.get_submodule("0").weight.abs().flatten(1).amax(1)
    assert float(ranges.max() / ranges.median()) < 10  # the 50x channel evened out


def test_equalization_through_a_depthwise_conv_with_a_channel_multiplier():
    """groups == in_channels, out = 2 x in: each input channel feeds two filters (it crashed
    prepare for TDA4VM, where equalization is on by default)."""
    from quantfx.passes.equalize import equalize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, groups=8),
                          nn.Conv2d(16, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight[5].mul_(40.0)
    x = torch.randn(2, 3, 10, 10)
    graph, _ = build_graph(model, (x,), QuantConfig(), training=False)
    with torch.no_grad():
        before = graph(x)
        assert equalize(graph) == 2
        after = graph(x)
    assert float((after - before).abs().max() / before.abs().max()) < 1e-5
    ranges = graph.get_submodule("0").weight.detach().abs().flatten(1).amax(1)
    assert float(ranges.max() / ranges.median()) < 10  # the 40x channel evened out
    qf.calibrate(qf.prepare(model, (x,), QuantConfig(target="tda4vm", progress=False)), [x])


class BatchNormAfterReLU(nn.Module):
    """Code outside TI's guidelines: BatchNorm after the ReLU (and one on the input)."""

    def __init__(self) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.bn(torch.relu(self.conv(self.input_bn(x)))))


@pytest.mark.parametrize("target", ["generic", "am68a"])
def test_a_batchnorm_no_conv_precedes_folds_forward_or_is_quantized_as_the_engine_runs_it(
        target, tmp_path):
    """`bn` (after the ReLU) folds into the unpadded 1x1 `head` after it; `input_bn` feeds a
    padded conv, so it stays a layer: TIDL runs it with per-tensor symmetric parameters, a
    BatchNormLayer with a per-tensor weight quantizer (even where every conv is per channel)
    and an int32 bias, exported as BatchNormalization, bit-exact."""
    from quantfx.layers import BatchNormLayer
    from quantfx.passes.fuse import batchnorm_layers, fold_batchnorm_forward

    torch.manual_seed(0)
    model = randomize_batchnorm(BatchNormAfterReLU()).eval()
    graph, _ = build_graph(model, (torch.randn(1, 3, 8, 8),), QuantConfig(), False)
    fold_batchnorm(graph)
    assert fold_batchnorm_forward(graph) == 1
    assert batchnorm_layers(graph) == 1
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(graph(x), model(x), rtol=1e-5, atol=1e-5)  # the same function
    prepared, converted = quantize_model(model, shape=(4, 3, 8, 8),
                                         config=QuantConfig(target=target, progress=False))
    layers = {name: module for name, module in prepared.named_modules()
              if isinstance(module, FakeQuantLayer) and isinstance(module.layer, BatchNormLayer)}
    assert set(layers) == {"input_bn"}
    assert all(layer.weight_quantizer.axis is None for layer in layers.values())
    assert prepared.get_submodule("conv").weight_quantizer.axis == (0 if target == "am68a"
                                                                    else None)
    report = qf.export_onnx(converted, (x[:2],), tmp_path / "bn.onnx", verify_data=x)
    assert report.fraction_identical == 1.0
    import onnx

    nodes = onnx.load(tmp_path / "bn.onnx").graph.node
    assert sum(node.op_type == "BatchNormalization" for node in nodes) == 1
    assert sum(node.op_type == "Conv" for node in nodes) == 2


def test_a_batchnorm1d_that_cannot_fold_is_quantized_and_runs_4d_on_tidl(tmp_path):
    """A BatchNorm1d after a ReLU before a padded Conv1d, and one after the last Linear, fold
    nowhere: each becomes a quantized BatchNormLayer (not a float BatchNorm TIDL would quantize
    its own way), exported as Reshape -> BatchNormalization -> Q/DQ -> Reshape (TIDL runs it
    on 4-D inputs only), bit-exact and fully offloaded."""
    import onnx

    from quantfx.layers import BatchNormLayer

    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm1d(8),
        nn.Conv1d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 5),
        nn.ReLU(), nn.BatchNorm1d(5))).eval()
    prepared, converted = quantize_model(model, shape=(8, 4, 16), config=QuantConfig(
        target="am68a", progress=False))
    assert not any(isinstance(module, nn.modules.batchnorm._BatchNorm)
                   for module in prepared.modules())
    assert sum(isinstance(module, BatchNormLayer) for module in prepared.modules()) == 2
    x = torch.randn(8, 4, 16)
    assert qf.qmath.sqnr_db(model(x), converted(x)) > 30
    report = qf.export_onnx(converted, (x[:1],), tmp_path / "bn1d.onnx", verify_data=x)
    assert report.fraction_identical == 1.0
    assert report.tidl.fully_offloaded and not report.tidl.findings, report.tidl
    graph = onnx.shape_inference.infer_shapes(onnx.load(tmp_path / "bn1d.onnx")).graph
    ranks = {value.name: len(value.type.tensor_type.shape.dim) for value in graph.value_info}
    norms = [node for node in graph.node if node.op_type == "BatchNormalization"]
    assert len(norms) == 2 and all(ranks[node.input[0]] == 4 for node in norms)


def test_forward_folding_into_a_depthwise_conv_is_exact():
    from quantfx.passes.fuse import fold_batchnorm_forward

    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, groups=8),
        nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1))).eval()
    x = torch.randn(2, 3, 12, 12)
    graph, _ = build_graph(model, (x,), QuantConfig(), False)
    fold_batchnorm(graph)
    assert fold_batchnorm_forward(graph) == 1  # the second BN feeds a padded conv: stays
    assert torch.allclose(graph(x), model(x), rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in graph.modules()) == 1


def test_string_padding_becomes_numbers_where_exact_and_batchnorm_folds_into_a_valid_conv():
    """Keras-style convs: "valid" is no padding and "same" with an odd kernel pads both sides
    alike, so both become numbers (the BN before the "valid" conv then folds forward, and
    error feedback rounds every conv); "same" with an even kernel pads unevenly and stays."""
    from quantfx.passes.fuse import fold_batchnorm_forward
    from quantfx.ptc.error_feedback import supported

    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding="valid"), nn.ReLU(), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding="valid"), nn.ReLU(), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding="same", dilation=2), nn.ReLU(),
        nn.Conv2d(8, 4, 2, padding="same"))).eval()
    x = torch.randn(2, 3, 12, 12)
    graph, _ = build_graph(model, (x,), QuantConfig(), False)
    convs = [module for module in graph.modules() if isinstance(module, nn.Conv2d)]
    assert [conv.padding for conv in convs] == [(0, 0), (0, 0), (2, 2), "same"]
    assert [supported(conv) for conv in convs] == [True, True, True, False]
    assert all(conv.padding == "valid" for conv in model.modules()
               if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)
               and conv.dilation == (1, 1))  # the user's model is left as it was
    fold_batchnorm(graph)
    assert fold_batchnorm_forward(graph) == 1  # the second BN feeds a padded conv: stays
    assert torch.allclose(graph(x), model(x), rtol=1e-5, atol=1e-5)


def _forward_folds(model: nn.Module, shape: tuple[int, ...]) -> int:
    """How many BatchNorms of `model` fold forward; the folded graph must compute the same."""
    from quantfx.passes.fuse import fold_batchnorm_forward

    x = torch.randn(*shape)
    graph, _ = build_graph(model.eval(), (x,), QuantConfig(), False)
    fold_batchnorm(graph)
    count = fold_batchnorm_forward(graph)
    assert torch.allclose(graph(x), model(x), rtol=1e-5, atol=1e-5)
    return count


def test_batchnorm_folds_forward_through_pools_dropout_and_flatten_into_a_linear():
    """Keras' Conv-ReLU-BN-MaxPool-Conv, -BN-GlobalAveragePooling-Dense and Dense-ReLU-BN-
    Dropout-Dense: the affine passes the pools (the max only with positive scales), the
    dropout and the flatten, and folds into the layer after them."""
    torch.manual_seed(0)
    pooled = randomize_batchnorm(nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3),
        nn.ReLU(), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16),
        nn.ReLU(), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 4)))
    for bn in (pooled[2], pooled[6]):
        bn.weight.data.abs_()
    assert _forward_folds(pooled, (2, 3, 14, 14)) == 3
    flattened = randomize_batchnorm(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5)))
    flattened[2].weight.data.abs_()
    assert _forward_folds(flattened, (2, 3, 8, 8)) == 1  # each channel is 9 features


def test_batchnorm_does_not_fold_forward_where_that_would_change_the_function():
    """A negative scale through a max pool, an average pool that counts padded zeros, and a
    flatten that is not of the channels: each BatchNorm stays."""
    torch.manual_seed(0)
    negative = randomize_batchnorm(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.MaxPool2d(2), nn.Conv2d(4, 4, 1)))
    negative[2].weight.data[1] = -1.0
    padded_average = randomize_batchnorm(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.AvgPool2d(3, 1, padding=1),
        nn.Conv2d(4, 4, 1)))
    batch_and_channels = randomize_batchnorm(nn.Sequential(  # rows of (n x c, length)
        nn.Conv1d(3, 4, 3), nn.ReLU(), nn.BatchNorm1d(4), nn.Flatten(0, 1), nn.Linear(8, 3)))
    assert _forward_folds(negative, (2, 3, 8, 8)) == 0
    assert _forward_folds(padded_average, (2, 3, 8, 8)) == 0
    assert _forward_folds(batch_and_channels, (2, 3, 10)) == 0


class CoarseStem(nn.Module):
    """A BN-folded-style stem whose channel ranges span 300x, then ordinary layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            self.stem.weight.mul_(torch.logspace(-2.0, 0.5, 16).reshape(-1, 1, 1, 1))

    def forward(self, x):
        return self.head(torch.relu(self.body(torch.relu(self.stem(x)))))


def test_coarse_per_tensor_weights_get_16_bits():
    """Under one 8-bit grid most of the stem's channels keep fewer than 8 codes: it gets 16-bit
    weights (activations stay 8 bit); per-channel grids, QAT and the switch keep 8 bit."""
    torch.manual_seed(0)
    model = CoarseStem().eval()
    x = torch.randn(4, 3, 12, 12)

    def widths(config, qat=False):
        prepared = (qf.prepare_qat(model, (x,), config) if qat
                    else qf.prepare(model, (x,), config))
        return {name.removesuffix(".weight_quantizer"): module.bits
                for name, module in prepared.named_modules()
                if name.endswith("weight_quantizer")}

    assert widths(QuantConfig(progress=False)) == {"stem": 16, "body": 8, "head": 8}
    assert set(widths(QuantConfig(progress=False, widen_coarse_weights=False)).values()) == {8}
    assert set(widths(QuantConfig(progress=False, per_channel_weights=True)).values()) == {8}
    assert set(widths(QuantConfig(progress=False), qat=True).values()) == {8}
    prepared = qf.prepare(model, (x,), QuantConfig(progress=False))
    qf.calibrate(prepared, [x])
    converted = qf.convert(prepared)
    assert converted.get_submodule("stem").weight_int.dtype == torch.int16
    narrow = qf.prepare(model, (x,), QuantConfig(progress=False, widen_coarse_weights=False))
    qf.calibrate(narrow, [x])
    with torch.no_grad():
        reference = model(x)
        assert (qf.qmath.sqnr_db(reference, converted(x))
                > qf.qmath.sqnr_db(reference, qf.convert(narrow)(x)))


class Sppf(nn.Module):
    """YOLOv5/v8's SPPF: one 5x5 stride-1 max pool applied three times, outputs concatenated;
    plus a 5x5 pool at stride 2 and a functional 7x7 one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.pool = nn.MaxPool2d(5, stride=1, padding=2)
        self.strided = nn.MaxPool2d(5, stride=2, padding=2)

    def forward(self, x):
        x = self.conv(x)
        first = self.pool(x)
        second = self.pool(first)
        wide = F.max_pool2d(x, 7, 1, 3)
        return torch.cat([x, first, second, self.pool(second), wide], 1), self.strided(x)


def test_large_stride_one_max_pools_become_chained_3x3_pools_exactly(tmp_path):
    model = Sppf().eval()
    x = torch.randn(2, 3, 9, 9)
    graph_module, _ = build_graph(model, (x,), QuantConfig(), training=False)
    pools = {name: module.kernel_size for name, module in graph_module.named_modules()
             if isinstance(module, nn.MaxPool2d)}
    assert sorted(pools.values()) == [3] * 9 + [5]  # 3 x (5x5) -> 2, 7x7 -> 3; stride 2 stays
    with torch.no_grad():
        for got, wanted in zip(graph_module(x), model(x), strict=True):
            torch.testing.assert_close(got, wanted, rtol=0, atol=0)
    _, converted = quantize_model(model, shape=(2, 3, 9, 9), config=QuantConfig(target="am68a"))
    report = qf.export_onnx(converted, x[:1], tmp_path / "sppf.onnx")
    assert report.fraction_identical == 1.0
    warned = [str(finding) for finding in report.tidl.warnings() if "MaxPool" in str(finding)]
    assert len(warned) == 1 and "stride (2, 2)" in warned[0]  # only the strided 5x5 is left


def test_a_model_pickled_when_batchnorm_layer_lived_in_modules_still_loads():
    """BatchNormLayer moved from quantfx.modules to quantfx.layers: a whole model saved
    before (torch.save) names the old place, which still answers for it."""
    import pickle

    from quantfx.layers import BatchNormLayer

    saved = pickle.dumps(BatchNormLayer(4), protocol=0).replace(b"quantfx.layers\n",
                                                                b"quantfx.modules\n")
    assert b"cquantfx.modules\nBatchNormLayer" in saved
    assert type(pickle.loads(saved)) is BatchNormLayer
