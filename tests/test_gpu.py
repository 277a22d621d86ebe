"""Models on a GPU: prepare, calibrate, QAT, convert and export with the model and data on CUDA.

Skipped where no CUDA device is present (the project never needs one); the closing note of
each session says whether they ran.
"""

from __future__ import annotations

import pytest
import torch

import quantfx as qf
from tests.helpers import ConvBnReLU, randomize_batchnorm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIG = qf.QuantConfig(progress=False)


def _data(device: str, count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 16, 16, generator=generator).to(device) for _ in range(count)]


def test_ptc_on_cuda_matches_the_cpu_pipeline_and_exports(tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvBnReLU()).eval()
    outputs = {}
    for device in ("cpu", "cuda"):
        data = _data(device)
        prepared = qf.prepare(model.to(device), data[0], CONFIG)
        qf.calibrate(prepared, data)
        converted = qf.convert(prepared)
        assert next(converted.buffers()).device.type == device
        with torch.no_grad():
            outputs[device] = converted(data[0]).cpu()
        report = qf.export_onnx(converted, data[0], tmp_path / f"{device}.onnx")
        assert report.max_lsb_diff == 0
    scale = 2.0 ** -6
    assert (outputs["cpu"] - outputs["cuda"]).abs().max() <= 2 * scale  # kernels may round apart


def test_qat_trains_on_cuda_and_eval_equals_convert():
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvBnReLU()).cuda()
    data = _data("cuda", 4)
    qat = qf.prepare_qat(model, data[0], CONFIG)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01, momentum=0.9)
    for batch in data:
        loss = qat(batch).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qat.eval()
    converted = qf.convert(qat)
    with torch.no_grad():
        assert torch.equal(qat(data[0]), converted(data[0]))


def test_calibrate_moves_cpu_batches_and_a_wrong_device_forward_is_an_input_error():
    model = ConvBnReLU().cuda().eval()
    prepared = qf.prepare(model, torch.randn(2, 3, 16, 16, device="cuda"), CONFIG)
    qf.calibrate(prepared, _data("cpu"))  # calibration data on the CPU: moved for you
    converted = qf.convert(prepared)
    with pytest.raises(qf.InputError, match="cuda"):
        converted(torch.randn(2, 3, 16, 16))


def test_distill_trains_on_cuda_and_converts_there(tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvBnReLU()).eval().cuda()
    data = _data("cuda", 4)
    student = qf.distill(model, data, steps=4, config=CONFIG, checkpoint=tmp_path / "ck.pt")
    assert all(parameter.device.type == "cuda" for parameter in student.parameters())
    converted = qf.convert(student)
    with torch.no_grad():
        assert torch.equal(student(data[0]), converted(data[0]))
    again = qf.distill(model, data, steps=6, config=CONFIG, checkpoint=tmp_path / "ck.pt")
    assert int(again.qat_controller.step) == 6  # resumed from 4 on the GPU
