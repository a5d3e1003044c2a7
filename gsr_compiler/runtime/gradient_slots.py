"""Gradient buffers a reversible chain's backward allocates before it walks the blocks.

The backward produces each parameter's gradient in the middle of its walk, between the big,
short-lived tensors of one block's recompute, and keeps it until the walk ends. Left where the
allocator puts them, these small long-lived tensors pin the big freed chunks apart: on CPU,
glibc then serves each block's recompute from fresh heap instead of the holes the previous
block left, and the peak RSS of a step grows with depth (benchmarks/peak_rss.py on b18_Cg:
2.6 GiB at 16 blocks and 6.7 GiB at 64 before this, 1.1 and 1.2 GiB with it). Allocated
together before the walk, they stay out of the way.

Accumulation is the same arithmetic as ``a + b`` out of place: the first gradient is copied,
later ones are added in place, and a tensor that never received a gradient reports None, as
autograd would.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor


class GradientSlots:
    """One gradient buffer per tensor in ``wrt``, keyed by identity, allocated up front."""

    def __init__(self, wrt: Iterable[Tensor]) -> None:
        self._buffers: dict[int, Tensor] = {}
        self._written: set[int] = set()
        self._owned: set[int] = set()  # buffers no one else holds: safe to add into
        for t in wrt:
            # A sparse side input (a torch.sparse adj_t) has no dense buffer: its gradient,
            # if any, is kept as autograd gives it.
            if id(t) not in self._buffers and t.layout == torch.strided:
                self._buffers[id(t)] = torch.empty_like(t, memory_format=torch.preserve_format)

    def accumulate(self, t: Tensor, grad: Tensor) -> None:
        """Adds ``grad`` to the gradient held for ``t``."""
        key = id(t)
        held = self._buffers.get(key)
        if key in self._written:
            if key in self._owned and _fits(held, grad):
                held.add_(grad)
            else:
                self._buffers[key] = held + grad
                self._owned.add(key)
        elif held is not None and _fits(held, grad):
            held.copy_(grad)
            self._owned.add(key)
        else:
            # Not planned, or a sparse or differently laid out gradient: kept as autograd gave it.
            self._buffers[key] = grad
        self._written.add(key)

    def get(self, t: Tensor) -> Optional[Tensor]:
        """The gradient accumulated for ``t``, or None if it never received one."""
        key = id(t)
        return self._buffers[key] if key in self._written else None


def _fits(buffer: Tensor, grad: Tensor) -> bool:
    return (grad.layout == torch.strided and grad.shape == buffer.shape
            and grad.dtype == buffer.dtype and grad.device == buffer.device)
