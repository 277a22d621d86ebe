"""QAT under DistributedDataParallel: two CPU processes (gloo), different data per rank.

Every rank must end with identical quantizer ranges, and those ranges must cover the data of
*all* ranks (the batch min/max is all-reduced), not just rank 0's. Buffers are not broadcast
(`broadcast_buffers=False`), so equality comes from the reduction itself.
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import quantfx as qf
from quantfx.qat import QATQuantizer

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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    mp.start_processes(_worker, args=(_free_port(), results), nprocs=WORLD_SIZE,
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
