"""TIDL fidelity: each checker rule on a hand-built ONNX graph that breaks it and one that
keeps it, device profiles (bias width, options, per-channel rules), and exports of real
models that TIDL holds exactly as quantfx simulates them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper

import quantfx as qf
from quantfx.export.emitters.quantized import patchifies
from quantfx.files import options_path_for
from quantfx.tidl.checker import check_model
from quantfx.tidl.profiles import PROFILES
from quantfx.tidl.rules import Graph
from tests.helpers import ConvBnReLU, randomize_batchnorm

FLOAT = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


def _one(op, attributes=None, shape=(1, 8, 16, 16), extra=(), initializers=(), opset=18):
    node = helper.make_node(op, ["x", *extra], ["y"], name="node", **(attributes or {}))
    return _model([node], [("x", list(shape))], ["y"], initializers, opset)


def _fallbacks(model, target="generic"):
    return [f.rule for f in check_model(model, target).findings if f.severity == "fallback"]


def _warnings(model, target="generic"):
    return [f.rule for f in check_model(model, target).findings if f.severity == "warning"]


def _conv(kernel, stride, group=1, channels=8):
    weight = np.zeros((8, channels // group, *kernel), np.float32)
    return _one("Conv", {"kernel_shape": list(kernel), "strides": [stride, stride],
                         "group": group}, (1, channels, 32, 32), ["w"], [("w", weight)])


def _batchnorm(shape, dequantized=False):
    """BatchNormalization of an input of `shape`, its scale and shift float initializers or
    (`dequantized`) int8 codes through DequantizeLinear, after a Q/DQ of the input."""
    ones = np.ones(8, np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "xs"], ["xd"], name="dq")]
    parameters = ["s", "b"]
    if dequantized:
        nodes += [helper.make_node("DequantizeLinear", [f"{n}q", "xs"], [f"{n}d"], name=n)
                  for n in parameters]
        parameters = ["sd", "bd"]
    nodes.append(helper.make_node("BatchNormalization", ["xd", *parameters, "m", "v"], ["y"],
                                  name="bn"))
    initializers = [("xs", np.float32(0.5)), ("m", ones * 0), ("v", ones),
                    ("s", ones), ("b", ones), ("sq", np.full(8, 100, np.int8)),
                    ("bq", np.ones(8, np.int8))]
    return _model(nodes, [("x", list(shape))], ["y"], initializers)


def test_a_batchnorm_with_float_parameters_in_a_qdq_file_is_a_warning_on_tidl():
    """TIDL quantizes a float scale/shift itself: not what quantfx simulated."""
    assert any("float scale/shift" in rule for rule in _warnings(_batchnorm((1, 8, 4, 4)),
                                                                 "am68a"))
    assert not _warnings(_batchnorm((1, 8, 4, 4)), "generic")
    assert not any("float scale/shift" in rule
                   for rule in _warnings(_batchnorm((1, 8, 4, 4), dequantized=True), "am68a"))


# ------------------------------------------------------------------------------- operator rules

RULES = [  # (what, graph that breaks the rule, graph that keeps it, target)
    ("unsupported op", _one("Einsum", {"equation": "nchw->nchw"}), _one("Relu"), "generic"),
    ("stride H != W", _one("Conv", {"kernel_shape": [3, 3], "strides": [1, 2]},
                           (1, 8, 16, 16), ["w"], [("w", np.zeros((8, 8, 3, 3), np.float32))]),
     _conv((3, 3), 2), "generic"),
    ("depthwise kernel", _conv((9, 9), 1, group=8), _conv((3, 3), 1, group=8), "generic"),
    ("3x3 stride 3", _conv((3, 3), 3), _conv((3, 3), 2), "am62a"),
    ("ConvTranspose kernel", _one("ConvTranspose", {"kernel_shape": [5, 5], "strides": [2, 2]},
                                  extra=["w"], initializers=[("w", np.zeros((8, 8, 5, 5),
                                                                           np.float32))]),
     _one("ConvTranspose", {"kernel_shape": [4, 4], "strides": [2, 2]}, extra=["w"],
          initializers=[("w", np.zeros((8, 8, 4, 4), np.float32))]), "generic"),
    ("global pool area", _one("GlobalAveragePool", shape=(1, 8, 64, 64)),
     _one("GlobalAveragePool", shape=(1, 8, 16, 16)), "generic"),
    ("softmax axis", _one("Softmax", {"axis": 1}), _one("Softmax", {"axis": -1}), "generic"),
    ("concat axis", _model([helper.make_node("Concat", ["x", "x"], ["y"], name="c", axis=0)],
                           [("x", [1, 8, 4, 4])], ["y"]),
     _model([helper.make_node("Concat", ["x", "x"], ["y"], name="c", axis=1)],
            [("x", [1, 8, 4, 4])], ["y"]), "generic"),
    ("resize factor", _one("Resize", {"mode": "nearest", "coordinate_transformation_mode":
                                      "asymmetric"}, extra=["", "s"],
                           initializers=[("s", np.array([1, 1, 3, 3], np.float32))]),
     _one("Resize", {"mode": "nearest", "coordinate_transformation_mode": "asymmetric"},
          extra=["", "s"], initializers=[("s", np.array([1, 1, 2, 2], np.float32))]),
     "generic"),
    ("pad on channels", _one("Pad", extra=["p"], initializers=[
        ("p", np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64))]),
     _one("Pad", extra=["p"], initializers=[("p", np.array([0, 0, 1, 1, 0, 0, 1, 1],
                                                           np.int64))]), "generic"),
    ("reflect pad", _one("Pad", {"mode": "reflect"}, extra=["p"], initializers=[
        ("p", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))]),
     _one("Pad", extra=["p"], initializers=[("p", np.array([0, 0, 1, 1, 0, 0, 1, 1],
                                                           np.int64))]), "generic"),
    ("gemm transA", _one("Gemm", {"transA": 1}, (8, 4), ["w"], [("w", np.zeros((8, 3),
                                                                               np.float32))]),
     _one("Gemm", {"transB": 1}, (4, 8), ["w"], [("w", np.zeros((3, 8), np.float32))]),
     "generic"),
    ("reduce max axis", _one("ReduceMax", {"keepdims": 1}, extra=["a"],
                             initializers=[("a", np.array([3], np.int64))]),
     _one("ReduceMax", {"keepdims": 1}, extra=["a"], initializers=[("a", np.array([2],
                                                                                  np.int64))]),
     "generic"),
    ("clip bounds", _one("Clip", extra=["lo", "hi"], initializers=[
        ("lo", np.float32(0.5)), ("hi", np.float32(6))]),
     _one("Clip", extra=["lo", "hi"], initializers=[("lo", np.float32(0)),
                                                     ("hi", np.float32(6))]), "generic"),
    ("cast inside", _model([helper.make_node("Relu", ["x"], ["r"], name="r"),
                            helper.make_node("Cast", ["r"], ["c"], name="c", to=FLOAT),
                            helper.make_node("Relu", ["c"], ["y"], name="y")],
                           [("x", [1, 4])], ["y"]),
     _model([helper.make_node("Cast", ["x"], ["y"], name="c", to=FLOAT)], [("x", [1, 4])],
            ["y"]), "generic"),
    ("batchnorm on a 2-D tensor", _batchnorm((1, 8)), _batchnorm((1, 8, 4, 4)), "generic"),
    ("6-D transpose moving the width to axis 1",
     _one("Transpose", {"perm": [0, 5, 1, 2, 3, 4]}, (1, 2, 2, 2, 2, 4)),
     _one("Transpose", {"perm": [0, 1, 3, 5, 2, 4]}, (1, 2, 2, 2, 2, 4)), "generic"),
    ("7-D reshape", _one("Reshape", extra=["s"], initializers=[
        ("s", np.array([1, 2, 2, 2, 2, 2, 4], np.int64))]),
     _one("Reshape", extra=["s"], initializers=[("s", np.array([1, 8, 8, 32], np.int64))]),
     "generic"),
    ("erf alone", _one("Erf"), _model([
        helper.make_node("Mul", ["x", "k"], ["s"], name="s"),
        helper.make_node("Erf", ["s"], ["e"], name="e"),
        helper.make_node("Add", ["e", "one"], ["y"], name="y")], [("x", [1, 4])], ["y"],
        [("k", np.float32(0.7)), ("one", np.float32(1))]), "generic"),
]


@pytest.mark.parametrize("what, broken, kept, target", RULES, ids=[r[0] for r in RULES])
def test_each_operator_rule_flags_what_breaks_it_and_passes_what_keeps_it(what, broken, kept,
                                                                         target):
    assert _fallbacks(broken, target), what
    assert not _fallbacks(kept, target), (what, _fallbacks(kept, target))
    report = check_model(broken, target)
    assert not report.fully_offloaded and "ARM fallback" in report.summary()
    assert all(f.source for f in report.findings)


def test_pool_outside_the_validated_kernels_is_a_warning():
    odd = _one("MaxPool", {"kernel_shape": [4, 4], "strides": [4, 4]})
    assert _warnings(odd) and not _fallbacks(odd)
    assert not _warnings(_one("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2]}))


# ------------------------------------------------------------------------------ quantization

def _qdq(name, source, output, dtype=np.int8, scale=0.125):
    return ([helper.make_node("QuantizeLinear", [source, f"{name}.s", f"{name}.z"], [f"{name}.q"],
                              name=f"{name}.quantize"),
             helper.make_node("DequantizeLinear", [f"{name}.q", f"{name}.s", f"{name}.z"],
                              [output], name=f"{name}.dequantize")],
            [(f"{name}.s", np.float32(scale)), (f"{name}.z", np.zeros((), dtype))])


def _qdq_chain(middle, dtype=np.int8):
    """x -> Q/DQ -> `middle` nodes (reading 'a', writing 'b') -> Q/DQ -> y."""
    first, first_init = _qdq("in", "x", "a", dtype)
    last, last_init = _qdq("out", "b", "y", dtype)
    nodes, initializers = middle
    return _model(first + nodes + last, [("x", [1, 4, 8, 8])], ["y"],
                  first_init + last_init + initializers)


def test_a_float_tensor_without_qdq_is_flagged_and_documented_fusions_are_not():
    unquantized = _qdq_chain(([helper.make_node("Sigmoid", ["a"], ["t"], name="t"),
                               helper.make_node("Tanh", ["t"], ["b"], name="b")], []))
    assert any("without Q/DQ" in rule for rule in _warnings(unquantized))
    silu = _qdq_chain(([helper.make_node("Sigmoid", ["a"], ["t"], name="t"),
                        helper.make_node("Mul", ["a", "t"], ["b"], name="b")], []))
    relu = _qdq_chain(([helper.make_node("Add", ["a", "a"], ["t"], name="t"),
                        helper.make_node("Relu", ["t"], ["b"], name="b")], []))
    shape = _qdq_chain(([helper.make_node("Reshape", ["a", "shape"], ["t"], name="t"),
                         helper.make_node("Relu", ["t"], ["b"], name="b")],
                        [("shape", np.array([1, 4, 64], np.int64))]))
    for clean in (silu, relu, shape):
        assert not any("without Q/DQ" in rule for rule in _warnings(clean))


def test_a_float_tensor_is_a_fallback_of_its_node_on_tidl_devices():
    """On a TIDL device a tensor TIDL must hold without Q/DQ is not "offloaded with a warning":
    the node computing it counts as an ARM fallback (a warning for the generic runtime)."""
    unquantized = _qdq_chain(([helper.make_node("Sigmoid", ["a"], ["t"], name="t"),
                               helper.make_node("Tanh", ["t"], ["b"], name="b")], []))
    for target in ("tda4vm", "am68a"):
        report = check_model(unquantized, target)
        assert not report.fully_offloaded
        assert ("t", "Sigmoid", False) in report.nodes and ("b", "Tanh", True) in report.nodes
        assert any("without Q/DQ" in rule for rule in _fallbacks(unquantized, target))
    assert check_model(unquantized, "generic").fully_offloaded


def test_sixteen_bit_qdq_is_a_warning_on_tidl_devices_only():
    wide = _qdq_chain(([helper.make_node("Relu", ["a"], ["b"], name="b")], []), np.int16)
    assert any("16-bit Q/DQ" in rule for rule in _warnings(wide, "tda4vm"))
    assert not any("16-bit Q/DQ" in rule for rule in _warnings(wide, "generic"))


def test_the_code_type_of_a_qdq_pair_without_zero_point_is_its_output_dtype():
    """Opset 21 lets a QuantizeLinear name its type instead of carrying a zero point: a 16-bit
    pair written so is still 16 bit to the checker, and a signed one still signed."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q",
                              output_dtype=TensorProto.INT16),
             helper.make_node("DequantizeLinear", ["q", "s"], ["d"], name="d"),
             helper.make_node("Relu", ["d"], ["y"], name="y")]
    model = _model(nodes, [("x", [1, 8, 4, 4])], ["y"], [("s", np.float32(0.5))], opset=21)
    assert any("16-bit Q/DQ" in rule for rule in _warnings(model, "tda4vm"))
    graph = Graph.of(model, PROFILES["tda4vm"])
    assert graph.code_bits("d") == 16 and graph.code_type(nodes[1]).kind == "i"


def _conv_with_bias(bias_codes, weight_scale, weight_type=np.int8):
    weight, weight_init = [helper.make_node(
        "DequantizeLinear", ["w.q", "w.s", "w.z"], ["w"], name="w.dequantize", axis=0)], [
        ("w.q", np.ones((4, 4, 1, 1), weight_type)), ("w.s", np.asarray(weight_scale, np.float32)),
        ("w.z", np.zeros(np.shape(weight_scale), weight_type))]
    bias, bias_init = [helper.make_node(
        "DequantizeLinear", ["bq", "bs", "bz"], ["bias"], name="bias.dequantize")], [
        ("bq", np.full(4, bias_codes, np.int32)), ("bs", np.float32(2.0 ** -10)),
        ("bz", np.zeros((), np.int32))]
    conv = helper.make_node("Conv", ["a", "w", "bias"], ["b"], name="conv", kernel_shape=[1, 1])
    return _qdq_chain((weight + bias + [conv], weight_init + bias_init))


def test_bias_range_and_per_channel_weights_follow_the_device():
    big = _conv_with_bias(40_000, 2.0 ** -7)
    assert any("exceed 16 bit" in rule for rule in _warnings(big, "tda4vm"))
    assert not any("exceed" in rule for rule in _warnings(big, "am68a"))
    assert not any("exceed" in rule for rule in _warnings(_conv_with_bias(30_000, 2.0 ** -7),
                                                          "tda4vm"))
    wide = _conv_with_bias(40_000, 2.0 ** -7, np.int16)  # 16-bit weights: 32-bit bias on TIDL
    assert not any("exceed" in rule for rule in _warnings(wide, "tda4vm"))
    per_channel = _conv_with_bias(10, np.full(4, 2.0 ** -7))
    assert any("per-channel weights" in rule for rule in _warnings(per_channel, "tda4vm"))
    assert not any("per-channel" in rule for rule in _warnings(per_channel, "am68a"))


def test_opset_newer_than_validated_is_a_warning():
    assert any("opset 22" in rule for rule in _warnings(_one("Relu", opset=22)))


# --------------------------------------------------------------------------- profiles, export

def _calibrated(model, config, shape=(2, 3, 16, 16)):
    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(shape, generator=generator) for _ in range(2)]
    prepared = qf.prepare(model.eval(), data[0][:1], config)
    qf.calibrate(prepared, data)
    return qf.convert(prepared), data[0]


def test_profiles_set_bias_width_weights_and_options(tmp_path):
    model = randomize_batchnorm(ConvBnReLU(8))
    for target, scale_type, per_channel in (("generic", 1, True), ("tda4vm", 1, False),
                                            ("am68a", 4, True)):
        converted, x = _calibrated(model, qf.QuantConfig(target=target, progress=False))
        path = tmp_path / f"{target}.onnx"
        report = qf.export_onnx(converted, x, path)
        options = json.loads(Path(options_path_for(path)).read_text())
        assert options["advanced_options:quantization_scale_type"] == scale_type
        assert options["advanced_options:prequantized_model"] == 1
        # a generic file may hold its output at 16 bit (measured): int16 Q/DQ need opset 21
        assert report.opset == (21 if report.measured_sixteen_bit else 18)
        assert target == "generic" or not report.measured_sixteen_bit
        assert report.target == target and report.tidl is not None
        assert (converted.get_submodule("conv2").weight_exponent.dim() == 1) == per_channel
        metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert metadata["quantfx.target"] == target
        assert ("quantfx.tidl_tools_version" in metadata) == (target != "generic")
    with pytest.raises(qf.ConfigError, match="per-tensor weights only"):
        qf.QuantConfig(target="tda4vm", per_channel_depthwise=True)


def test_tda4vm_keeps_biases_in_16_bit():
    class BigBias(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            with torch.no_grad():
                self.conv.bias.fill_(50.0)  # 50 at a fine input x weight scale: > 2**15 codes

        def forward(self, x):
            return self.conv(x)

    codes, biases = {}, {}
    for target in ("generic", "tda4vm"):
        converted, _ = _calibrated(BigBias(), qf.QuantConfig(target=target, progress=False))
        layer = converted.get_submodule("conv")
        codes[target] = int(layer.bias_int.abs().max())
        biases[target] = (layer.bias_int * 2.0 ** layer.bias_exponent).flatten()
        # held (bias calibration moves it a little), not clipped at 32767 codes
        assert float((biases[target] - 50.0).abs().max()) < 0.1
    # the weight exponent rose until 50 fits int16 (fitted to int32, it would clip at 32767)
    assert codes["generic"] > 2**15 - 1 >= codes["tda4vm"] >= 2**14


def test_strict_tidl_refuses_an_export_that_falls_back(tmp_path):
    class WithAbs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).abs()

    converted, x = _calibrated(WithAbs(), qf.QuantConfig(progress=False))
    assert not qf.export_onnx(converted, x, tmp_path / "a.onnx").tidl.fully_offloaded
    with pytest.raises(qf.ExportError, match="strict_tidl.*Abs"):
        qf.export_onnx(converted, x, tmp_path / "b.onnx", strict_tidl=True)
    assert not (tmp_path / "b.onnx").exists()


def test_a_linear_with_a_fused_activation_has_qdq_on_its_gemm_for_tidl(tmp_path):
    """TIDL lets a Relu/Clip carry the Q/DQ of the op before it only after convs, BatchNorm
    and eltwise ops: a Linear's Gemm gets Q/DQ on its activation's grid first, on 2-D and on
    token (3-D) inputs, and the file stays bit-exact."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU6(), torch.nn.Linear(8, 8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 3))
    for shape in ((4, 6), (2, 5, 6)):
        torch.manual_seed(0)
        converted, x = _calibrated(model, qf.QuantConfig(target="am68a", progress=False), shape)
        report = qf.export_onnx(converted, x, tmp_path / "mlp.onnx", verify_data=x)
        assert report.fraction_identical == 1.0
        assert report.tidl.fully_offloaded, report.tidl
        nodes = onnx.load(tmp_path / "mlp.onnx").graph.node
        producers = {output: node for node in nodes for output in node.output}
        for node in nodes:
            if node.op_type in ("Relu", "Clip"):
                producer = producers[node.input[0]]
                while producer.op_type == "Reshape":  # the token rows back to (..., features)
                    producer = producers[producer.input[0]]
                assert producer.op_type == "DequantizeLinear"


def test_a_patch_embedding_conv_exports_as_space_to_depth_and_a_pointwise_conv(tmp_path):
    """TIDL runs stride 4 only for 11x11 kernels: a 4x4/stride-4 patch embedding (Swin,
    ConvNeXt) exports as Reshape -> Transpose -> Reshape and a 1x1 conv, bit-exact and fully
    offloaded; a conv whose stride TIDL runs, or whose input the patches do not tile, stays."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 2, stride=2))
    torch.manual_seed(0)
    converted, x = _calibrated(model, qf.QuantConfig(target="am68a", progress=False),
                               (2, 3, 32, 36))
    report = qf.export_onnx(converted, x, tmp_path / "patches.onnx", verify_data=x)
    assert report.fraction_identical == 1.0
    assert report.tidl.fully_offloaded, report.tidl
    convs = [node for node in onnx.load(tmp_path / "patches.onnx").graph.node
             if node.op_type == "Conv"]
    strides = [list(next(a.ints for a in node.attribute if a.name == "strides"))
               for node in convs]
    assert strides == [[1, 1], [2, 2]]
    assert [node.name for node in convs] == ["_0", "_2"]  # TIDL's 16-bit lists name them
    patch = torch.nn.Conv2d(3, 8, 4, stride=4)
    assert patchifies(patch, (1, 3, 32, 36))
    assert not patchifies(patch, (1, 3, 30, 32))  # the last rows would be dropped
    assert not patchifies(torch.nn.Conv2d(3, 8, 4, stride=4, padding=1), (1, 3, 32, 32))
    assert not patchifies(torch.nn.Conv2d(3, 8, 2, stride=2), (1, 3, 32, 32))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "densenet121",
                                  "regnet_x_400mf"])
def test_zoo_exports_hold_every_tensor_tidl_holds(name, tmp_path):
    """No float tensor between quantizers except the documented fusions, every node offloaded
    on the MMAv2 devices, still bit-exact in ONNX Runtime's reference kernels."""
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.get_model(name, num_classes=10))
    converted, x = _calibrated(model, qf.QuantConfig(target="am68a", progress=False,
                                                     bias_calibration=False), (2, 3, 64, 64))
    report = qf.export_onnx(converted, x, tmp_path / f"{name}.onnx")
    assert report.max_lsb_diff == 0 and report.fraction_identical == 1.0
    assert not [f for f in report.tidl.findings if "without Q/DQ" in f.rule], report.tidl
    assert report.tidl.fully_offloaded, report.tidl


def test_check_command_exits_1_on_fallback_and_0_when_offloaded(tmp_path):
    bad, good = tmp_path / "bad.onnx", tmp_path / "good.onnx"
    onnx.save(_one("Einsum", {"equation": "nchw->nchw"}), bad)
    onnx.save(_one("Relu"), good)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "quantfx", "check", *args],
                              capture_output=True, text=True, cwd=Path(__file__).parent.parent)

    failing = run(str(bad), "--target", "am68a")
    assert failing.returncode == 1 and "Einsum" in failing.stdout
    assert run(str(good), "--format", "markdown").returncode == 0
    missing = run(str(tmp_path / "nope.onnx"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_check_strict_is_a_ci_gate_that_refuses_a_file_made_for_another_device(tmp_path):
    """A per-channel file made for am68a runs on tda4vm (nothing falls back) but not as
    written: plain `check` exits 0 with warnings, `--strict` exits 1; on its own target 0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(4, 3, 12, 12)
    prepared = qf.prepare(model, (x[:1],), qf.QuantConfig(target="am68a", progress=False))
    path = tmp_path / "am68a.onnx"
    qf.export_onnx(qf.convert(qf.calibrate(prepared, [x])), (x[:1],), path)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "quantfx", "check", str(path), *args],
                              capture_output=True, text=True, cwd=Path(__file__).parent.parent)

    assert run("--target", "tda4vm").returncode == 0
    strict = run("--target", "tda4vm", "--strict")
    assert strict.returncode == 1 and "per-channel weights on tda4vm" in strict.stdout
    assert run("--target", "am68a", "--strict").returncode == 0


def test_a_standalone_batchnorm_reports_its_coarse_channels(tmp_path):
    """TIDL runs a BatchNorm that folds nowhere with one per-tensor weight scale: the checker
    counts the channel scales that keep fewer than 8 codes in the exported file."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 3, padding=1)).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([4.0, 1.0, 0.5, 0.25, 0.1, 0.03, 0.02, 0.01]))
    x = torch.randn(2, 3, 12, 12)
    for widen in (False, True):  # by default such scales get 16 bit, and nothing is coarse
        prepared = qf.prepare(model, (x,), qf.QuantConfig(target="tda4vm", progress=False,
                                                          widen_coarse_weights=widen))
        qf.calibrate(prepared, [x])
        path = tmp_path / f"bn_{widen}.onnx"
        qf.export_onnx(qf.convert(prepared), (x,), path)
        found = [f.rule for f in qf.check_tidl(path, "tda4vm").findings if "standalone" in f.rule]
        assert len(found) == (0 if widen else 1)
    assert "of its 8 channel scales keep fewer than 8 codes" in qf.check_tidl(
        tmp_path / "bn_False.onnx", "tda4vm").findings[-1].rule
    assert not [f for f in qf.check_tidl(tmp_path / "bn_False.onnx", "generic").findings
                if "standalone" in f.rule]


def test_what_the_checker_once_passed_is_now_refused_or_flagged(tmp_path):
    """Probes that used to give a clean report: empty and broken files, ONNX Runtime's
    quantize_static output (asymmetric, non-power-of-2) and a float file on TDA4VM, a custom-
    domain op with an ONNX op type, LUT activations and 16-bit ConvTranspose on AM62A."""
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for model in (empty, onnx.ModelProto()):
        with pytest.raises(qf.ConfigError, match="no nodes"):
            qf.check_tidl(model, "tda4vm")
    broken = _model([helper.make_node("Relu", ["missing"], ["y"], name="r")], [("x", [1, 4])],
                    ["y"])
    with pytest.raises(qf.ConfigError, match="not valid ONNX"):
        qf.check_tidl(broken, "tda4vm")
    with pytest.raises(qf.ConfigError, match="is a folder"):
        qf.check_tidl(tmp_path, "tda4vm")
    with pytest.raises(qf.ConfigError, match="does not exist"):
        qf.check_tidl(tmp_path / "missing.onnx", "tda4vm")
    with pytest.raises(qf.ConfigError, match="got a bytes"):
        qf.check_tidl(b"\x08\x07", "tda4vm")
    dynamic = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", ["N", 4])],
                     ["y"])
    assert [f.node for f in qf.check_tidl(dynamic, "am68a").findings
            if "dynamic dims (N)" in f.rule] == ["x"]
    assert not qf.check_tidl(dynamic, "generic").findings  # ONNX Runtime takes any batch
    # ONNX Runtime's integer-op files: integer codes are not float tensors; dynamic scales
    integer = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
                      helper.make_node("MatMulInteger", ["xq", "w"], ["m"], name="mm"),
                      helper.make_node("Cast", ["m"], ["y"], name="c", to=FLOAT)],
                     [("x", [1, 4])], ["y"], [("s", np.float32(0.5)), ("z", np.uint8(0)),
                                              ("w", np.ones((4, 2), np.uint8))])
    assert not [f for f in qf.check_tidl(integer, "am68a").findings if "float tensor" in f.rule]
    dynamic_scales = helper.make_model(helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"], name="d")], "g",
        [helper.make_tensor_value_info("x", FLOAT, [1, 4])],
        [helper.make_tensor_value_info(name, kind, shape) for name, kind, shape in (
            ("y", onnx.TensorProto.UINT8, [1, 4]), ("s", FLOAT, []),
            ("z", onnx.TensorProto.UINT8, []))]),
        opset_imports=[helper.make_opsetid("", 18)])
    assert [f.node for f in qf.check_tidl(dynamic_scales, "am68a").findings
            if "dynamically quantized" in f.rule] == ["model"]
    named_json = tmp_path / "model.json"  # a binary file whatever its name
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", [1, 4])],
                     ["y"]), named_json, format="protobuf")
    assert qf.check_tidl(named_json, "generic").total == 1

    ort_style = _qdq_chain(([helper.make_node("Relu", ["a"], ["b"], name="b")], []), np.uint8)
    for initializer in ort_style.graph.initializer:
        if initializer.name == "in.z":
            initializer.CopyFrom(numpy_helper.from_array(np.uint8(128), "in.z"))
        if initializer.name == "out.s":
            initializer.CopyFrom(numpy_helper.from_array(np.float32(0.0123), "out.s"))
    rules = _warnings(ort_style, "tda4vm")
    assert any("asymmetric" in rule for rule in rules) and any("power of 2" in rule
                                                                for rule in rules)
    assert not any("asymmetric" in r or "power of 2" in r for r in _warnings(ort_style, "am68a"))
    assert any("no Q/DQ" in rule for rule in _warnings(_one("Relu"), "tda4vm"))
    assert not _warnings(_one("Relu"), "generic")

    custom = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="mine", domain="my.ops")], "g",
        [helper.make_tensor_value_info("x", FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", FLOAT, [1, 4])]),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("my.ops", 1)])
    assert any("custom-domain" in rule for rule in _fallbacks(custom))
    assert any("LUT" in rule for rule in _warnings(_one("Sigmoid"), "am62a"))
    assert not any("LUT" in rule for rule in _warnings(_one("Sigmoid"), "am68a"))
    deconv = _qdq_chain(([helper.make_node("ConvTranspose", ["a", "w"], ["b"], name="b",
                                           kernel_shape=[2, 2], strides=[2, 2])],
                         [("w", np.zeros((4, 4, 2, 2), np.float32))]), np.int16)
    assert any("16-bit ConvTranspose" in rule for rule in _fallbacks(deconv, "am62a"))
    assert not _fallbacks(deconv, "am68a")


def test_ti_soc_names_and_any_case_name_the_same_target():
    """TI's SDKs call the SoCs J721E, J721S2, J784S4, J722S: they were refused."""
    for alias, target in (("J721E", "tda4vm"), ("j721s2", "am68a"), ("J784S4", "am69a"),
                          ("j722s", "am67a"), ("TDA4VM", "tda4vm")):
        assert qf.QuantConfig(target=alias).target == target
        assert check_model(_one("Relu"), alias).target == target
    from quantfx.arguments import build_parser
    args = build_parser().parse_args(["check", "model.onnx", "--target", "J721S2"])
    assert args.target == "am68a"
    with pytest.raises(qf.ConfigError, match="Did you mean 'tda4vm'"):
        qf.QuantConfig(target="tda4")


def test_a_rule_broken_at_many_nodes_is_one_line(tmp_path):
    """A file exported for am68a and checked for tda4vm printed the same line for every layer."""
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvBnReLU()).eval()
    x = torch.randn(2, 3, 16, 16)
    prepared = qf.prepare(model, (x,), qf.QuantConfig(target="am68a", progress=False))
    qf.calibrate(prepared, [x])
    path = tmp_path / "am68a.onnx"
    qf.export_onnx(qf.convert(prepared), (x,), path)
    report = qf.check_tidl(path, "tda4vm")
    repeated = [f for f in report.findings if "per-channel weights on tda4vm" in f.rule]
    assert len(repeated) >= 2
    lines = [line for line in str(report).splitlines() if "per-channel weights" in line]
    assert len(lines) == 1 and f"{len(repeated)} nodes (" in lines[0]


def test_one_format_rule_set_serves_the_checker_and_export():
    """`quantfx.tidl.format`: what export refuses to write (zero point, scale, Clip bounds,
    static shapes) is the same rule the checker reports on TDA4VM; a clean file has none."""
    from quantfx.tidl.format import format_problems

    clean = _qdq_chain(([helper.make_node("Relu", ["a"], ["b"], name="b")], []))
    assert format_problems(clean) == []
    broken = _qdq_chain(([helper.make_node("Clip", ["a", "lo", "hi"], ["b"], name="clip")],
                         [("lo", np.float32(0.1)), ("hi", np.float32(6.0))]))
    for initializer in broken.graph.initializer:
        if initializer.name == "in.z":
            initializer.CopyFrom(numpy_helper.from_array(np.int8(3), "in.z"))
        if initializer.name == "out.s":
            initializer.CopyFrom(numpy_helper.from_array(np.float32(0.3), "out.s"))
    problems = format_problems(broken)
    assert "QuantizeLinear 'in.quantize': asymmetric Q/DQ (zero point 3)" in problems
    assert any("scale 0.3 is not a power of 2" in p for p in problems)
    assert "Clip 'clip': Clip without constant bounds min <= 0 < max" in problems
    rules = " ".join(_warnings(broken, "tda4vm"))
    assert "zero point 3" in rules and "scale 0.3 is not a power of 2" in rules


def test_format_takes_a_scalar_output_as_static_but_not_an_unknown_shape():
    """A model that returns a scalar (a mean, a loss-like figure) has a static shape, rank 0:
    export refused it as 'no static shape'. A tensor without a shape, or with a named (dynamic)
    dim, is still refused."""
    from quantfx.tidl.format import format_problems

    def model(output: onnx.ValueInfoProto) -> onnx.ModelProto:
        node = helper.make_node("ReduceMean", ["x"], [output.name], keepdims=0)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, [1, 4])], [output])
        return helper.make_model(graph)

    assert format_problems(model(helper.make_tensor_value_info("y", TensorProto.FLOAT, []))) == []
    unknown = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    assert format_problems(model(unknown)) == ["tensor 'y' has no static shape"]
    dynamic = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    assert format_problems(model(dynamic)) == ["tensor 'y' has no static shape"]
