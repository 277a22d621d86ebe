"""How many processes quantize together: the size of an initialized `torch.distributed` group,
or 1 inside `this_process_only()` (diagnostics run on the main process alone).

Calibration and QAT ranges are collective under a process group (every rank must call them),
so a measurement made on one rank only would wait for the others forever. `analyze`,
`compare_bit_depths` and `doctor` measure inside `this_process_only()`; so can user code.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch.distributed as dist

ALONE = contextvars.ContextVar("quantfx_alone", default=False)
"""Set inside `this_process_only()`."""


def world_size() -> int:
    """How many processes calibrate together (1 without an initialized process group, or
    inside `this_process_only()`)."""
    if not ALONE.get() and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@contextlib.contextmanager
def this_process_only() -> Iterator[None]:
    """Calibrate, train and measure in this process alone, even under an initialized process
    group: nothing waits for the other ranks (e.g. `analyze` on rank 0 only)."""
    token = ALONE.set(True)
    try:
        yield
    finally:
        ALONE.reset(token)
