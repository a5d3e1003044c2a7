"""Dropout inside reversible branches: the masks of ``nn.Dropout``, cheaper to draw twice on CPU.

A branch runs twice in a training step, in the chain's forward and again in its backward
recompute, and both runs must draw the same mask (the runtime reseeds the generators from the
block's seed, see :mod:`~gsr_compiler.runtime.replay`). On CPU, torch's dropout draws its mask
with ``bernoulli_``, one generator call and one float conversion per element, and keeps it as a
float tensor for backward (``benchmarks/bench_dropout.py`` times the two side by side).

:func:`bernoulli_mask` draws the same Bernoulli(keep) masks from 16 random bits per element (one
64-bit generator call per four elements): element ``i`` is kept when its 16-bit integer ``u_i``
is below ``floor(keep * 2**16)``, and when ``u_i`` equals it (probability ``2**-16``) a
double-precision uniform decides against the fractional part. The probability of keeping is
``keep`` exactly, to double precision. Autograd keeps the one-byte mask (``torch.where``).
Survivors are scaled by ``1 / keep`` as in ``nn.Dropout``.

On other devices torch's own dropout already draws and keeps masks cheaply (Philox) and is used
as it is.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BranchDropout", "bernoulli_mask", "branch_dropout"]

_BITS = 16
_LEVELS = 1 << _BITS


def bernoulli_mask(shape: torch.Size | tuple, keep: float, device: torch.device | str = "cpu",
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """A bool tensor of ``shape`` whose elements are True with probability ``keep``,
    independently."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep probability must be in [0, 1], got {keep}")
    n = math.prod(shape)
    # Full-range 64-bit integers, read as four uniform 16-bit integers each (int16: offset 2**15).
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None, generator=generator)
    u = words.view(torch.int16)[:n].view(shape)
    scaled = keep * _LEVELS
    whole = math.floor(scaled)
    threshold = whole - _LEVELS // 2
    mask = u < threshold
    fraction = scaled - whole
    if fraction > 0.0:
        ties = u == threshold
        count = int(ties.sum())
        if count:
            refine = torch.rand(count, dtype=torch.float64, device=device, generator=generator)
            mask[ties] = refine < fraction
    return mask


def branch_dropout(x: Tensor, p: float, training: bool = True, inplace: bool = False) -> Tensor:
    """``F.dropout(x, p, training, inplace)``, with the mask drawn by :func:`bernoulli_mask`
    on CPU."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0 or p == 1.0 or x.device.type != "cpu" \
            or not x.is_floating_point():
        return F.dropout(x, p, training, inplace)
    keep = 1.0 - p
    mask = bernoulli_mask(x.shape, keep, x.device)
    if inplace:
        return x.mul_(mask).mul_(1.0 / keep)
    return torch.where(mask, x, 0).mul_(1.0 / keep)


class BranchDropout(nn.Dropout):
    """``nn.Dropout`` drawing its mask with :func:`branch_dropout`. The compiler puts it in place
    of the ``nn.Dropout`` layers of reversible branches; it follows ``train()``/``eval()``."""

    def forward(self, input: Tensor) -> Tensor:
        return branch_dropout(input, self.p, self.training, self.inplace)
