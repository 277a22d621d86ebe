"""Fingerprints of what quantfx computes, to show a refactoring changed no number.

    python -m benchmarks.behaviour_hash [--out FILE]

For the 12 torchvision models of the test suite and the three Fashion-MNIST benchmark nets
(random weights with randomized BatchNorm statistics, fixed seeds, default `QuantConfig`:
histogram ranges, MSE weight search, bias calibration), it hashes

- `converted`: the converted model's outputs on fixed inputs (raw float32 bytes);
- `ort`: the exported file's outputs in ONNX Runtime's reference kernels on the same inputs;
- `graph`: the exported file's nodes (op type, name, inputs, outputs, attributes) and
  initializers (name, type, shape, bytes), plus the TIDL options file.

Three variants widen the net: `mobilenetv2_style@16bit` (first and last layers at 16 bit,
int16 Q/DQ), `mobilenetv2_style@qat` (three QAT steps from the float model) and
`resnet_style@legacy` (the Clip-style file). Run it before and after a change: identical lines
mean identical behaviour. Only the public API, onnx and onnxruntime are used (and the ORT
session helper, found where each version has it), so it runs against any quantfx version since
export existed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile

import numpy as np
import onnx
import torch
import torchvision

import quantfx as qf
from benchmarks.models import MODEL_BUILDERS

try:
    from quantfx.export.verify import onnxruntime_session
except ImportError:  # quantfx before the export package (0.1.0)
    from quantfx.export.onnx import verification_session as onnxruntime_session

TORCHVISION_MODELS = (
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
    "shufflenet_v2_x0_5", "efficientnet_b0", "squeezenet1_0", "mnasnet0_5", "densenet121",
    "googlenet", "resnext50_32x4d",
)


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics (random-init BN folds to nearly nothing)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(shape, generator=generator) * 0.1)
    return model


def build(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The model and its input shape (without batch)."""
    torch.manual_seed(0)
    if name in MODEL_BUILDERS:
        return randomize_batchnorm(MODEL_BUILDERS[name]()).eval(), (1, 28, 28)
    options = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, num_classes=10, **options)
    return randomize_batchnorm(model).eval(), (3, 64, 64)


def _digest(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()[:16]


def graph_digest(model: onnx.ModelProto, options_text: str) -> str:
    """Hash of every node and initializer of `model`, plus the options file's text."""
    parts: list[bytes] = []
    for node in model.graph.node:
        attributes = sorted((a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute)
        parts.append(repr((node.op_type, node.name, list(node.input), list(node.output),
                           attributes)).encode())
    for tensor in model.graph.initializer:
        array = onnx.numpy_helper.to_array(tensor)
        parts.append(repr((tensor.name, str(array.dtype), array.shape)).encode())
        parts.append(np.ascontiguousarray(array).tobytes())
    for value in list(model.graph.input) + list(model.graph.output):
        parts.append(value.SerializeToString())
    parts.append(options_text.encode())
    return _digest(*parts)


VARIANTS = ("mobilenetv2_style@16bit", "mobilenetv2_style@qat", "resnet_style@legacy")


def _qat_converted(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.nn.Module:
    """Three SGD steps of QAT on a made-up loss, then convert."""
    qat_model = qf.prepare_qat(model.train(), (batches[0][:1],), qf.QuantConfig(progress=False))
    optimizer = torch.optim.SGD(qat_model.parameters(), lr=0.01, momentum=0.9)
    for batch in batches + batches[:1]:
        loss = qat_model(batch).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return qf.convert(qat_model.eval())


def fingerprint(name: str) -> dict[str, str]:
    """The three hashes of one model (or variant, `model@variant`)."""
    base, _, variant = name.partition("@")
    model, shape = build(base)
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(8, *shape, generator=generator) for _ in range(2)]
    test_input = torch.randn(4, *shape, generator=generator)
    if variant == "qat":
        converted = _qat_converted(model, calibration)
    else:
        layers = ("first", "last") if variant == "16bit" else ()
        config = qf.QuantConfig(progress=False, sixteen_bit_layers=layers)
        prepared = qf.prepare(model, (calibration[0][:1],), config)
        qf.calibrate(prepared, calibration)
        converted = qf.convert(prepared)
    with torch.no_grad():
        outputs = converted(test_input).numpy()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"{name}.onnx")
        qf.export_onnx(converted, (test_input,), path, legacy=variant == "legacy")
        session = onnxruntime_session(path)  # reference kernels: no graph rewrites
        feed = {session.get_inputs()[0].name: test_input.numpy()}
        ort_outputs = session.run(None, feed)[0]
        options_path = os.path.splitext(path)[0] + ".tidl.json"
        with open(options_path, encoding="utf-8") as handle:
            options_text = json.dumps(json.load(handle), sort_keys=True)
        graph = graph_digest(onnx.load(path), options_text)
    return {"converted": _digest(outputs.tobytes()), "ort": _digest(ort_outputs.tobytes()),
            "graph": graph}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.behaviour_hash",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the lines to this file")
    parser.add_argument("models", nargs="*",
                        help="subset of models (default: all 15 and the variants)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = args.models or list(TORCHVISION_MODELS) + list(MODEL_BUILDERS) + list(VARIANTS)
    lines = []
    for name in names:
        hashes = fingerprint(name)
        line = f"{name:<24} converted {hashes['converted']}  ort {hashes['ort']}  " \
               f"graph {hashes['graph']}"
        print(line, flush=True)
        lines.append(line)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
