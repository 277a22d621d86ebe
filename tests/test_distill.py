"""`quantfx.distill`: QAT without labels, the float model as the teacher."""

import dataclasses
import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import quantfx as qf
from quantfx.quantizers import LearnedRangeQuantizer
from tests.helpers import free_port

CONFIG = qf.QuantConfig(target="tda4vm", progress=False, bias_calibration=False,
                        widen_sensitive_layers=False, weight_rounding="nearest")
"""TDA4VM's per-tensor depthwise weights (what distillation has to repair), the slow
calibration steps off: these tests are about the training."""


class DepthwiseNet(nn.Module):
    """conv-BN-ReLU6, a depthwise conv whose channels differ 100x in scale (one per-tensor
    exponent leaves the small ones a few levels; ReLU6 keeps equalization from evening them
    out), a pointwise conv that undoes the scales, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6())
        self.pointwise = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU())
        self.head = nn.Linear(16, 5)
        with torch.no_grad():
            self.depthwise[0].weight.mul_(torch.logspace(0, -2, 8).reshape(8, 1, 1, 1))
            self.pointwise[0].weight.mul_(torch.logspace(0, 2, 8).reshape(1, 8, 1, 1))

    def forward(self, x):
        x = self.pointwise(self.depthwise(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = DepthwiseNet()
    model.stem[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _batches(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 12, 12, generator=generator) for _ in range(count)]


def _sqnr(model: nn.Module, reference: nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        expected, got = reference(images), model(images)
    return 10 * math.log10(float(expected.pow(2).sum() / (got - expected).pow(2).sum()))


def _calibrated(model: nn.Module, data: list[torch.Tensor]) -> torch.fx.GraphModule:
    prepared = qf.prepare(model, (data[0][:1],), CONFIG)
    qf.calibrate(prepared, data)
    return prepared


def test_distill_gains_over_calibration_on_held_out_data():
    """The student starts exactly at calibration and beats it on data it never saw."""
    model, data, held_out = _model(), _batches(6, 1), torch.cat(_batches(4, 2))
    prepared = _calibrated(model, data)
    calibrated = _sqnr(qf.convert(prepared), model, held_out)
    start = qf.distill(prepared, data, steps=1, learning_rate=1e-12)
    assert _sqnr(qf.convert(start), model, held_out) == pytest.approx(calibrated, abs=1e-9)
    student = qf.distill(prepared, data, steps=60)
    assert not student.training
    assert _sqnr(qf.convert(student), model, held_out) > calibrated + 5.0
    assert _sqnr(qf.convert(prepared), model, held_out) == calibrated  # the user's is kept


def test_distill_never_returns_worse_than_its_start_on_the_held_out_batch():
    """Without ReLU6 equalization repairs the depthwise scales and calibration reaches 43 dB;
    straight-through steps then only lose (measured: 41-42.6 dB after 60 steps at any rate):
    distill returns the calibrated model itself."""
    model, data, held_out = _model(), _batches(6, 1), torch.cat(_batches(4, 2))
    model.depthwise[1] = nn.Identity()
    prepared = _calibrated(model, data)
    student = qf.distill(prepared, data, steps=50)
    assert torch.equal(qf.convert(student)(held_out), qf.convert(prepared)(held_out))


def test_one_tensor_of_inputs_is_one_batch_and_the_result_pickles(tmp_path):
    """A tensor is one batch (not a batch per row), trained on and judged both; the returned
    model keeps no training hooks: it pickles and runs as any QAT model."""
    model, data = _model(), _batches(1, 1)[0]
    student = qf.distill(model, data, steps=3, config=CONFIG)
    assert int(student.qat_controller.step) == 3
    torch.save(student, tmp_path / "student.pt")
    loaded = torch.load(tmp_path / "student.pt", weights_only=False)
    assert torch.equal(loaded(data), student(data))


def test_learned_ranges_are_trained_not_frozen():
    """With QATSchedule(ranges="learned") distill trains each activation's log2 threshold
    (statistical ranges it freezes: unlabeled batches would only drift them), and the result
    still converts to exactly what it computes."""
    model, data = _model(), _batches(6, 1)
    config = dataclasses.replace(CONFIG, qat_schedule=qf.QATSchedule(ranges="learned"))
    prepared = qf.prepare(model, (data[0][:1],), config)
    qf.calibrate(prepared, data)
    student = qf.distill(prepared, data, steps=40, features=False)
    quantizers = [module for module in student.modules()
                  if isinstance(module, LearnedRangeQuantizer)]
    assert quantizers and all(bool(quantizer.observer_enabled) for quantizer in quantizers)
    started = [float(quantizer.exponent) + quantizer.offset - 0.5 for quantizer in quantizers]
    assert any(float(quantizer.log2_threshold.detach()) != start
               for quantizer, start in zip(quantizers, started))
    assert torch.equal(qf.convert(student)(data[0]), student(data[0]))


def test_distill_from_the_float_model_and_from_a_qat_model():
    model, data = _model(), _batches(4, 1)
    from_float = qf.distill(model, data, steps=3, config=CONFIG)
    assert torch.equal(qf.convert(from_float)(data[0]), from_float(data[0]))
    qat_model = qf.prepare_qat(model, (data[0][:1],), CONFIG)
    with pytest.raises(qf.ConfigError, match="never measured .* Give distill the float model"):
        qf.distill(qat_model, data, steps=3)  # it came back untrained; convert refused it
    for batch in data:  # ranges from data, as a user's first QAT steps would
        qat_model(batch)
    from_qat = qf.distill(qat_model, data, steps=3)
    assert int(from_qat.qat_controller.step) == int(qat_model.qat_controller.step) + 3
    assert any(not torch.equal(mine, theirs) for mine, theirs in zip(
        from_qat.parameters(), qat_model.parameters()))


def test_distill_resumes_from_its_checkpoint_exactly(tmp_path, monkeypatch):
    """A run killed after its first checkpoint and started again with the same arguments ends
    where the uninterrupted run ends, bit for bit."""
    monkeypatch.setattr("quantfx.distillation_training.CHECKPOINT_EVERY", 3)
    model, data = _model(), _batches(4, 1)
    prepared = _calibrated(model, data)
    uninterrupted = qf.distill(prepared, data, steps=8)

    class Interrupted(list):
        served = 0

        def __iter__(self):
            for batch in super().__iter__():
                Interrupted.served += 1
                if Interrupted.served > 7:  # the example, the held-out batch, 1.5 passes
                    raise KeyboardInterrupt
                yield batch

    checkpoint = tmp_path / "distill.pt"
    with pytest.raises(KeyboardInterrupt):
        qf.distill(prepared, Interrupted(data), steps=8, checkpoint=checkpoint)
    assert torch.load(checkpoint, weights_only=True)["step"] == 3
    resumed = qf.distill(prepared, data, steps=8, checkpoint=str(checkpoint))
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert oct(os.stat(checkpoint).st_mode & 0o777) == oct(0o666 & ~_umask())
    assert [path.name for path in tmp_path.iterdir()] == ["distill.pt"]  # no temporary left
    with pytest.raises(qf.LoadError, match="learning_rate"):  # not silently the old rate
        qf.distill(prepared, data, steps=9, checkpoint=checkpoint, learning_rate=0.02)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(("options", "message"), [
    ({"steps": "10"}, "steps='10' must be an integer"),
    ({"steps": 0}, "must be an integer >= 1"),
    ({"minutes": 0}, "minutes=0"),
    ({"features": "yes"}, "features"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"checkpoint": 3}, "checkpoint=3 must be a file path"),
])
def test_wrong_options_are_config_errors(options, message):
    with pytest.raises(qf.ConfigError, match=message):
        qf.distill(_model(), _batches(1, 1), **options)


def test_wrong_inputs_say_what_to_give(tmp_path):
    model, data = _model(), _batches(2, 1)
    prepared = _calibrated(model, data)
    with pytest.raises(qf.CalibrationError, match="one-pass"):
        qf.distill(prepared, iter(data), steps=1)
    with pytest.raises(qf.CalibrationError, match="empty"):
        qf.distill(prepared, [], steps=1)
    for wrong in (None, 5):  # were bare TypeErrors from iter()
        with pytest.raises(qf.CalibrationError, match="must be batches"):
            qf.distill(prepared, wrong, steps=1)
    with pytest.raises(qf.ConfigError, match="no config"):
        qf.distill(prepared, data, steps=1, config=CONFIG)
    with pytest.raises(qf.LoadError, match="the distill data .* does not exist"):
        qf.distill(prepared, str(tmp_path / "no_such_folder"), steps=1)
    shape = tuple(data[0].shape)  # the data, not an example_inputs never given (PrepareError)
    with pytest.raises(qf.CalibrationError, match=r"distill data holds samples of shape"):
        qf.distill(prepared, [torch.randn(shape[0], 1, *shape[2:])] * 2, steps=1)
    with pytest.raises(qf.CalibrationError, match=r"distill data, input is uint8"):
        qf.distill(prepared, [data[0].to(torch.uint8)] * 2, steps=1)
    with pytest.raises(qf.CalibrationError, match=r"distill batch 1 holds NaN .* try again"):
        qf.distill(prepared, [data[0], torch.full_like(data[0], float("nan"))], steps=1)
    with pytest.raises(qf.ConfigError, match="float model or one returned"):
        qf.distill(qf.convert(prepared), data, steps=1)
    with pytest.raises(qf.LoadError, match="is a folder"):
        qf.distill(prepared, data, steps=1, checkpoint=tmp_path)
    stranger = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, stranger)
    with pytest.raises(qf.LoadError, match="not a quantfx distill checkpoint"):
        qf.distill(prepared, data, steps=1, checkpoint=stranger)
    other = tmp_path / "other_model.pt"
    qf.distill(nn.Sequential(nn.Conv2d(3, 2, 1)).eval(), data, steps=1, config=CONFIG,
               checkpoint=other)
    with pytest.raises(qf.LoadError, match="another model or setup .*(size mismatch|key)"):
        qf.distill(prepared, data, steps=1, checkpoint=other)  # names what differs
    generic = tmp_path / "generic.pt"  # the same model for another device: quantfx's reason
    qf.distill(model, data, steps=1, config=dataclasses.replace(
        CONFIG, target="generic", per_channel_weights=True), checkpoint=generic)
    with pytest.raises(qf.LoadError, match="distill checkpoint .* another model or setup .*"
                                           "per-channel"):
        qf.distill(prepared, data, steps=1, checkpoint=generic)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(qf.LoadError, match="is empty"):
        qf.distill(prepared, data, steps=1, checkpoint=tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk" * 10)
    with pytest.raises(qf.LoadError, match="not a file torch.save wrote") as refused:
        qf.distill(prepared, data, steps=1, checkpoint=tmp_path / "junk.pt")
    assert "weights_only" not in str(refused.value)


def test_an_image_folder_is_read_at_the_models_input_size(tmp_path, monkeypatch):
    """A folder of photos becomes crops of the prepared model's input size (they were always
    224 x 224: the 12 x 12 model failed on them), grayscale for a one-channel model; a float
    model with no example inputs gets 224 x 224 and a warning saying so."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for index in range(4):
        pixels = (torch.rand(20, 24, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{index}.png")
    seen: list[tuple[int, ...]] = []
    real = qf.distillation.Trainer.run

    def record(trainer, inputs, *args):
        return real(trainer, (seen.append(tuple(batch[0].shape)) or batch for batch in inputs),
                    *args)

    monkeypatch.setattr(qf.distillation.Trainer, "run", record)
    qf.distill(_calibrated(_model(), _batches(2, 1)), tmp_path, steps=1)
    assert seen and seen[0][1:] == (3, 12, 12)
    gray = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    qf.distill(gray, tmp_path, steps=1, example_inputs=torch.randn(1, 1, 16, 16), config=CONFIG)
    assert seen[-1][1:] == (1, 16, 16)
    with pytest.warns(qf.QuantFxWarning, match="224 x 224"):
        qf.distill(gray[0:0].append(nn.Conv2d(3, 2, 1)).eval(), tmp_path, steps=1, config=CONFIG)
    assert seen[-1][1:] == (3, 224, 224)


def _worker(rank: int, port: int, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=300))
    try:
        data = _batches(4, 1)
        share = data[2 * rank:2 * rank + 2]  # each rank its half
        student = qf.distill(_model(), share, steps=4, config=CONFIG)
        results[rank] = {key: value.clone() for key, value in student.state_dict().items()}
        try:  # rank 1 without data: the same error on both ranks, no gloo failure or hang
            qf.distill(_model(), share if rank == 0 else [], steps=4, config=CONFIG)
        except qf.CalibrationError as error:
            results[f"empty {rank}"] = str(error)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_distill_on_two_ranks_ends_with_identical_models():
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(free_port(), results), nprocs=2, start_method="spawn")
    assert results["empty 0"] == results["empty 1"] == (
        "1 of the 2 ranks have no distill data: give every rank a share of the batches.")
    first, second = results[0], results[1]
    for key, value in first.items():
        assert torch.equal(second[key], value), key
    alone = qf.distill(_model(), _batches(4, 1)[:2], steps=4, config=CONFIG).state_dict()
    assert any(not torch.equal(alone[key], value) for key, value in first.items())
