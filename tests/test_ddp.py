"""QAT under DistributedDataParallel: two CPU processes (gloo), different data per rank.

Every rank must end with identical quantizer ranges, and those ranges must cover the data of
*all* ranks (the batch min/max is all-reduced), not just rank 0's. Buffers are not broadcast
(`broadcast_buffers=False`), so equality comes from the reduction itself.
"""


import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import quantfx as qf
import quantfx.ptc.learned_rounding
from quantfx.distributed import reduce_observers, shows_progress
from quantfx.observers import HistogramObserver
from quantfx.qat import QATQuantizer
from quantfx.state import state_of
from tests.helpers import free_port

WORLD_SIZE = 2
STEPS = 4


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


def _worker(rank: int, port: int, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        torch.manual_seed(0)  # same float model on every rank
        qat_model = qf.prepare_qat(SmallNet(), torch.randn(2, 3, 8, 8))
        model = nn.parallel.DistributedDataParallel(qat_model, broadcast_buffers=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        generator = torch.Generator().manual_seed(100 + rank)
        input_max = torch.tensor(0.0)
        for _ in range(STEPS):
            x = torch.randn(4, 3, 8, 8, generator=generator) * (1 + 3 * rank)  # rank 1: 4x wider
            input_max = torch.maximum(input_max, x.abs().max())
            loss = nn.functional.cross_entropy(model(x), torch.zeros(4, dtype=torch.long))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        qf.end_qat_epoch(model)
        ranges = {name: (q.observer.min_val.clone(), q.observer.max_val.clone(),
                         q.exponent.clone())
                  for name, q in qat_model.named_modules() if isinstance(q, QATQuantizer)}
        weights = {name: p.detach().clone() for name, p in qat_model.named_parameters()}
        results[rank] = {"ranges": ranges, "weights": weights, "input_max": input_max,
                         "step": int(qat_model.qat_controller.step)}
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_training_gives_identical_ranges_on_every_rank():
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(free_port(), results), nprocs=WORLD_SIZE,
                       start_method="spawn")
    first, second = results[0], results[1]
    assert first["step"] == second["step"] == STEPS
    assert first["ranges"].keys() == second["ranges"].keys() and first["ranges"]
    for name, (low, high, exponent) in first["ranges"].items():
        other_low, other_high, other_exponent = second["ranges"][name]
        assert torch.equal(low, other_low) and torch.equal(high, other_high), name
        assert torch.equal(exponent, other_exponent), name
    for name, weight in first["weights"].items():  # DDP's own job, checked for completeness
        torch.testing.assert_close(weight, second["weights"][name])
    # The network input's range follows the wider data of rank 1 on both ranks.
    input_quantizer = next(name for name in first["ranges"] if name.startswith("quantizers.x"))
    _, input_high, input_exponent = first["ranges"][input_quantizer]
    assert float(input_high) > 2.0 * float(first["input_max"])  # rank 0 alone never saw that
    assert 127 * 2.0 ** float(input_exponent) >= float(input_high)


def _calibration_batches() -> list[torch.Tensor]:
    """Four batches; the last two (rank 1's) 4x wider, so the union's ranges are rank 1's."""
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(3, 3, 8, 8, generator=generator) * (1 + 3 * (index >= 2))
            for index in range(4)]


def _calibrated_state(batches: list[torch.Tensor], config: qf.QuantConfig) -> dict:
    torch.manual_seed(0)  # same float model on every rank and in the single process
    model = SmallNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    prepared = qf.prepare(model, torch.zeros(1, 3, 8, 8), config)
    qf.calibrate(prepared, batches)
    check = state_of(prepared).calibration_check
    converted = qf.convert(prepared)
    with torch.no_grad():
        out = converted(torch.ones(1, 3, 8, 8))
    return {"state": {key: value.clone() for key, value in converted.state_dict().items()},
            "check": check and check.output_sqnr_db, "out": out}


CALIBRATION_CONFIGS = {
    "default": qf.QuantConfig(progress=False),
    "minmax_learned": qf.QuantConfig(progress=False, activation_observer="minmax",
                                     weight_rounding="learned"),
    "parts": qf.QuantConfig(progress=False, quantize_only=("conv", "fc")),
}


def _calibration_worker(rank: int, port: int, results: dict) -> None:
    torch.set_num_threads(1)
    quantfx.ptc.learned_rounding.ITERATIONS = 20  # the workflow, not quality (as in the parent)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=300))
    try:
        share = _calibration_batches()[2 * rank:2 * rank + 2]  # each rank half of the data
        outcome = {name: _calibrated_state(share, config)
                   for name, config in CALIBRATION_CONFIGS.items()}
        # a rank with no data at all: no hang, no error of its own; rank 0 holds everything
        everything = _calibration_batches() if rank == 0 else []
        outcome["empty rank"] = _calibrated_state(everything, CALIBRATION_CONFIGS["default"])
        outcome["bars"] = shows_progress(qf.QuantConfig(progress=True)).progress
        outcome["masked"] = _masked_on_one_rank(rank)
        if rank == 0:  # rank 1 calls nothing: without this_process_only, rank 0 would wait
            with qf.this_process_only():
                outcome["alone"] = _calibrated_state(share, CALIBRATION_CONFIGS["default"])
            qf.analyze(SmallNet().eval(), torch.zeros(1, 3, 8, 8), share[:1],
                       config=CALIBRATION_CONFIGS["default"])  # measures alone by itself
        dist.barrier()
        results[rank] = outcome
    finally:
        dist.destroy_process_group()


def _masked_on_one_rank(rank: int) -> tuple[bool, int]:
    """Small attention scores, masked (-inf) on rank 0 only: after the reduction every rank
    keeps the mask's headroom and chooses the same exponent."""
    observer = HistogramObserver()
    scores = torch.linspace(-0.2, 0.2, 64)
    if rank == 0:
        scores[::4] = float("-inf")
    observer(scores)
    reduce_observers(nn.Sequential(observer))
    return bool(observer.masked), int(observer.exponent(127))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_calibration_on_two_ranks_equals_one_process_on_their_union(monkeypatch):
    """Every observer reduced, the later steps on the union's first samples: each rank's
    converted model is bit-identical to one process's calibration on all four batches."""
    monkeypatch.setattr("quantfx.ptc.learned_rounding.ITERATIONS", 20)  # the workflow, not quality
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(_calibration_worker, args=(free_port(), results), nprocs=WORLD_SIZE,
                       start_method="spawn")
    torch.set_num_threads(1)
    for name, config in {**CALIBRATION_CONFIGS,
                         "empty rank": CALIBRATION_CONFIGS["default"]}.items():
        alone = _calibrated_state(_calibration_batches(), config)
        half = _calibrated_state(_calibration_batches()[:2], config)  # rank 0's data only
        for rank in range(WORLD_SIZE):
            ranked = results[rank][name]
            assert ranked["state"].keys() == alone["state"].keys()
            for key, value in alone["state"].items():
                assert torch.equal(ranked["state"][key], value), (name, rank, key)
            assert ranked["check"] == alone["check"] and torch.equal(ranked["out"], alone["out"])
        assert not all(torch.equal(half["state"][key], value)  # the union really differs
                       for key, value in alone["state"].items())
    assert [results[rank]["bars"] for rank in range(WORLD_SIZE)] == [True, False]  # one set
    alone_on_rank_0 = results[0]["alone"]["state"]  # as one process on rank 0's share
    half = _calibrated_state(_calibration_batches()[:2], CALIBRATION_CONFIGS["default"])
    assert all(torch.equal(alone_on_rank_0[key], value) for key, value in half["state"].items())
    assert results[0]["masked"] == results[1]["masked"] and results[1]["masked"][0]
