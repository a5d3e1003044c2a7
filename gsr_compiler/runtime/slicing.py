"""Cutting a dimension into slices whose temporaries stay near a budget of elements.

The chunked ops of the runtime (row blocks of a head or a fused norm and top-k, edge chunks of
a propagation) each form a few ``[slice, width]`` temporaries at a time instead of one
``[N, width]`` or ``[E, width]`` tensor.
"""
from __future__ import annotations

from typing import Iterator

__all__ = ["slices"]


def slices(count: int, per_item: int, budget: int) -> Iterator[slice]:
    """Consecutive slices of ``range(count)`` of at most ``budget // per_item`` items (one at
    least); none when ``count`` is 0."""
    step = max(1, budget // max(per_item, 1))
    for start in range(0, count, step):
        yield slice(start, min(start + step, count))
