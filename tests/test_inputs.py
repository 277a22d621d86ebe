"""Helpers over the tensors a user hands quantfx (`quantfx.inputs`)."""

import torch

from quantfx.inputs import first_samples


def test_first_samples_cuts_across_batches():
    batches = [(torch.arange(4),), (torch.arange(4, 8),), (torch.arange(8, 12),)]
    chosen = first_samples(batches, 6)
    assert [batch[0].tolist() for batch in chosen] == [[0, 1, 2, 3], [4, 5]]
