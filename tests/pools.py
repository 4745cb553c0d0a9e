"""Random candidate pools for tests: ids, uint8 images and labels from one seeded generator."""

from __future__ import annotations

import torch


def random_pool(n: int, seed: int = 0, *, start_id: int = 0, size: int = 28, classes: int = 10):
    """`(ids, inputs, labels)`: ids `start_id..start_id+n-1`, inputs uint8 `[n, 1, size, size]`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(start_id, start_id + n, dtype=torch.int64)
    inputs = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, classes, (n,), dtype=torch.int64, generator=g)
    return ids, inputs, labels
