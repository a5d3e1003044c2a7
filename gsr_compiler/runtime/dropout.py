"""Dropout inside reversible branches: the masks of ``nn.Dropout``, cheaper to draw twice on CPU.

A branch runs twice in a training step, in the chain's forward and again in its backward
recompute, and both runs must draw the same mask (the runtime reseeds the generators from the
block's seed, see :mod:`~gsr_compiler.runtime.replay`). On CPU, torch's dropout draws its mask
with ``bernoulli_``, one generator call and one float conversion per element, and keeps it as a
float tensor for backward (``benchmarks/bench_dropout.py`` times the two side by side).

:func:`bernoulli_mask` draws the same Bernoulli(keep) masks from 32 random bits per element
(one 64-bit generator call per two elements): element ``i`` is kept when its unsigned 32-bit
integer ``u_i`` is below ``T = round(keep * 2**32)``, so it is kept with probability
``T / 2**32``, within ``2**-33`` of ``keep``. Autograd keeps the one-byte mask
(``torch.where``). Survivors are scaled by ``1 / keep`` as in ``nn.Dropout``.

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

_LEVELS = 1 << 32


def bernoulli_mask(shape: torch.Size | tuple, keep: float, device: torch.device | str = "cpu",
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """A bool tensor of ``shape`` whose elements are True with probability
    ``round(keep * 2**32) / 2**32`` (within ``2**-33`` of ``keep``), independently."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep probability must be in [0, 1], got {keep}")
    threshold = math.floor(keep * _LEVELS + 0.5)
    if threshold in (0, _LEVELS):
        return torch.full(shape, threshold == _LEVELS, dtype=torch.bool, device=device)
    n = math.prod(shape)
    # Full-range 64-bit integers, read as two uniform 32-bit integers each (int32: offset 2**31).
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None, generator=generator)
    u = words.view(torch.int32)[:n].view(shape)
    return u < threshold - _LEVELS // 2


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
