"""Calibration across processes: under an initialized `torch.distributed` process group, each
rank observes its share of the data and the ranks then agree on what one process would have
seen on the union of their data (rank 0's batches first, then rank 1's, ...).

The observing pass is the part that grows with the data, and it is split: min/max are
all-reduced, histograms summed over a common power-of-2 range (their bins merge exactly), so
every rank ends with the one-process ranges. The later steps (weight search, mixed precision,
bias calibration, learned rounding, the check) use only the first few hundred samples: those
are gathered in rank order and every rank runs the steps on the same samples, so every rank
ends with identical exponents. Moving-average ranges depend on the batch order; across ranks
they are averaged, which one process does not reproduce exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from quantfx.inputs import first_samples
from quantfx.observers import HistogramObserver, MovingAverageMinMaxObserver, Observer
from quantfx.ranks import world_size


def shows_progress(config: Any) -> Any:
    """`config` as this rank uses it: progress bars on rank 0 only (N ranks, one set of bars)."""
    if world_size() > 1 and dist.get_rank() != 0 and config.progress:
        return dataclasses.replace(config, progress=False)
    return config


def collective_device(default: torch.device) -> torch.device:
    """Where the collectives run: NCCL needs CUDA tensors; gloo takes `default`'s."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return default


def mean_over_ranks(value: float) -> float:
    """`value` averaged over the ranks (itself with one process)."""
    if world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64,
                         device=collective_device(torch.device("cpu")))
    dist.all_reduce(total)
    return float(total) / world_size()


def max_over_ranks(value: float) -> float:
    """The largest `value` of all ranks (itself with one process)."""
    if world_size() == 1:
        return value
    largest = torch.tensor([value], dtype=torch.float64,
                           device=collective_device(torch.device("cpu")))
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return float(largest)


def average_gradients(model: nn.Module) -> None:
    """Every rank's gradients replaced by their mean over the ranks (no-op alone)."""
    if world_size() == 1:
        return
    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad.div_(world_size())


def broadcast_from_first(value: Any) -> Any:
    """Rank 0's `value` on every rank (any picklable object; itself with one process)."""
    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, device=collective_device(torch.device("cpu")))
    return holder[0]


def _reduce_min_max(observer: Observer) -> None:
    """Global min/max; a rank that saw nothing contributes nothing."""
    device = collective_device(observer.min_val.device)
    observed = bool(observer.observed)
    infinity = torch.full_like(observer.min_val, float("inf"))
    low = observer.min_val if observed else infinity
    high = observer.max_val if observed else -infinity
    pair = torch.stack([-low, high]).to(device, torch.float64)
    dist.all_reduce(pair, op=dist.ReduceOp.MAX)
    if bool(torch.isfinite(pair).all()):
        observer.min_val.copy_(-pair[0])
        observer.max_val.copy_(pair[1])
        observer.observed.fill_(True)


def _average_moving(observer: MovingAverageMinMaxObserver) -> None:
    """The mean of the observed ranks' moving averages (order-dependent: not one process's)."""
    observed = float(bool(observer.observed))
    packed = torch.cat([observer.min_val.reshape(-1) * observed,
                        observer.max_val.reshape(-1) * observed,
                        torch.tensor([observed], device=observer.min_val.device)])
    packed = packed.to(collective_device(observer.min_val.device), torch.float64)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    count = float(packed[-1])
    if count > 0:
        size = observer.min_val.numel()
        observer.min_val.copy_((packed[:size] / count).reshape(observer.min_val.shape))
        observer.max_val.copy_((packed[size:2 * size] / count).reshape(observer.max_val.shape))
        observer.observed.fill_(True)


def _sum_histograms(observer: HistogramObserver) -> None:
    """Widen every rank's histogram to the widest range, then add the counts."""
    observed = bool(observer.observed)
    exponent = torch.tensor([int(observer.range_exponent) if observed else -(2**62)],
                            dtype=torch.int64, device=collective_device(observer.min_val.device))
    dist.all_reduce(exponent, op=dist.ReduceOp.MAX)
    widest = int(exponent)
    if observed and widest > int(observer.range_exponent):
        observer.widen(widest)
    counts = observer.histogram.to(collective_device(observer.min_val.device))
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    observer.histogram.copy_(counts)
    _reduce_min_max(observer)
    if bool(observer.observed):
        observer.range_exponent.fill_(widest)


def _share_masked(observer: Observer) -> None:
    """Masked on every rank when any rank saw a mask (the floor then applies everywhere)."""
    flag = observer.masked.to(collective_device(observer.min_val.device), torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    observer.masked.fill_(bool(flag))


def reduce_observers(model: nn.Module) -> None:
    """Every observer of `model` as if it had seen every rank's data (same module order on
    every rank: the ranks hold the same prepared model)."""
    for module in model.modules():
        if isinstance(module, Observer):
            _share_masked(module)
        if isinstance(module, HistogramObserver):
            _sum_histograms(module)
        elif isinstance(module, MovingAverageMinMaxObserver):
            _average_moving(module)
        elif isinstance(module, Observer):
            _reduce_min_max(module)


def gather_in_rank_order(items: list[Any]) -> list[Any]:
    """Every rank's `items` (CPU tensors inside), rank 0's first; the same list on all ranks."""
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, _to_cpu(items))
    return [item for rank_items in gathered for item in rank_items]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


def total_over_ranks(count: int) -> int:
    """`count` summed over the ranks (a rank with no data must not raise alone: the others
    would wait for it forever)."""
    total = torch.tensor([count], dtype=torch.int64, device=collective_device(torch.device("cpu")))
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total)


def merge_ranks(model: nn.Module, kept: list[tuple[Tensor, ...]],
                float_outputs: list[list[Tensor]], budget: int, check_samples: int,
                device: torch.device) -> tuple[list[tuple[Tensor, ...]], list[list[Tensor]]]:
    """After each rank observed its share: the observers reduced, and the kept samples and
    float outputs of the union (rank order) on every rank, cut as one process cuts them."""
    reduce_observers(model)
    samples = first_samples(gather_in_rank_order(kept), budget)
    outputs = first_samples(gather_in_rank_order(float_outputs), check_samples)
    return ([tuple(tensor.to(device) for tensor in batch) for batch in samples],
            [[tensor.to(device) for tensor in batch] for batch in outputs])
