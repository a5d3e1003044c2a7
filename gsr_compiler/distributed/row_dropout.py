r"""Dropout masks keyed by global node id, so that every partition of a graph draws the same mask.

A dropout in a single process draws one mask for the whole ``[N, ...]`` tensor from the global
generator; a rank holding ``n`` of the rows would draw a different mask for them (and move its
generator differently from the other ranks). Here the mask of element ``j`` of the row of global
node ``v`` is counter-based:

.. math::
    \text{keep}(v, j) = \big(\text{splitmix64}(s + (v R + j + 1)\,\gamma) \gg 32\big) < T,

with ``R`` the number of elements per row, ``T = round((1 - p) 2^32)`` (as
:func:`~gsr_compiler.runtime.dropout.bernoulli_mask`), ``gamma`` SplitMix64's increment
``0x9E3779B97F4A7C15`` and ``s`` one seed drawn from the global generator per call
(:func:`~gsr_compiler.runtime.replay.draw_seed`): the generator moves by the same amount on every
rank, and a reversible block's recompute, which reseeds the generator, draws the forward's mask
again. SplitMix64 (Steele, Lea and Flood, 2014) is a counter-based generator: one 64-bit mix per
element, 10x cheaper in torch than Philox (``runtime/kernels/philox.py``) and about 2.5x the time
of ``BranchDropout``'s draw (``[62000, 32]`` on one thread: 22 ms, 235 ms, 9 ms). A model with
:func:`use_row_keyed_dropout` and ``row_ids = arange(N)`` in one process therefore draws, for each
node, exactly the mask that the rank owning it draws.

It covers the dropout layers of a compiled model (``nn.Dropout`` and the chains'
``BranchDropout``, a ``CompressedDropout``, and the dropout of kept values folded into a group
top-k). Dropout inside a message-passing layer (attention dropout, on
edges) is not covered.

The layers keep their class, ``p`` and ``repr`` (a later trace of the model compares them); only
their ``forward`` is replaced, on the instance.
"""
from __future__ import annotations

import math
import types
from typing import Optional

import torch
from torch import Tensor, nn

from ..runtime.replay import draw_seed
from ..runtime.sparse.compressed import CompressedActivation
from ..runtime.sparse.modules import CompressedDropout, GroupTopKCompress

__all__ = ["row_keyed_dropout", "use_row_keyed_dropout", "splitmix64"]

# Elements per chunk of mask drawn at once: the hash runs on int64 temporaries (tens of bytes
# per element), which must not rival the activation itself.
_CHUNK = 1 << 16
_LEVELS = 1 << 32


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


_GAMMA = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def splitmix64(counters: Tensor, seed: int) -> Tensor:
    """SplitMix64 of ``seed`` at ``counters`` (int64; wrapping arithmetic, logical shifts done
    as arithmetic shifts and a mask), as 64-bit patterns in int64."""
    z = (counters + 1) * _GAMMA + _signed(seed % (1 << 64))
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MIX1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MIX2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def row_keyed_dropout(x: Tensor, p: float, row_ids: Tensor, seed: Optional[int] = None) -> Tensor:
    """Dropout of ``x [n, ...]`` whose row ``i`` belongs to global node ``row_ids[i]``;
    ``seed`` drawn from the global generator when None."""
    if p == 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    if x.shape[0] != row_ids.numel():
        raise ValueError(
            f"a dropout saw {x.shape[0]} rows where this rank's rows are {row_ids.numel()} "
            "nodes: graph-parallel dropout applies to node-level tensors only (not to edges, "
            "nor inside message-passing layers).")
    seed = draw_seed() if seed is None else seed
    threshold = math.floor((1.0 - p) * _LEVELS + 0.5)
    per_row = x[0].numel() if x.shape[0] else 1
    flat = x.reshape(x.shape[0], per_row)
    cols = torch.arange(per_row, device=x.device)
    ids = row_ids.to(x.device)
    rows_per_chunk = max(1, _CHUNK // per_row)
    keep = torch.empty(flat.shape, dtype=torch.bool, device=x.device)
    for start in range(0, flat.shape[0], rows_per_chunk):
        stop = min(start + rows_per_chunk, flat.shape[0])
        offsets = ids[start:stop, None] * per_row + cols
        keep[start:stop] = ((splitmix64(offsets, seed) >> 32) & (_LEVELS - 1)) < threshold
    return (torch.where(keep, flat, 0) * (1.0 / (1.0 - p))).view(x.shape)


def _dropout_forward(self: nn.Module, input: Tensor) -> Tensor:
    rate = self.p if self.training else 0.0
    return row_keyed_dropout(input, rate, self.__dict__["_gsr_row_ids"])


def _compressed_dropout_forward(self: nn.Module, c: CompressedActivation) -> CompressedActivation:
    fixed = self.fixed_training
    rate = self.p if (self.training if fixed is None else fixed) else 0.0
    values = row_keyed_dropout(c.values, rate, self.__dict__["_gsr_row_ids"])
    return CompressedActivation(values, c.indices, c.width, c.group)


def _topk_forward(self: nn.Module, x: Tensor) -> CompressedActivation:
    # The class's forward runs with its own dropout off (the instance's active_dropout
    # returns 0), then the kept values are dropped by node id.
    c = type(self).forward(self, x)
    rate = GroupTopKCompress.active_dropout(self)
    values = row_keyed_dropout(c.values, rate, self.__dict__["_gsr_row_ids"])
    return CompressedActivation(values, c.indices, c.width, c.group)


def _no_dropout() -> float:
    return 0.0


def use_row_keyed_dropout(model: nn.Module, row_ids: Tensor) -> int:
    """Makes every dropout layer of ``model`` draw masks keyed by global node id (module
    docstring); ``row_ids[i]`` is the global id of local row ``i``. The layers keep their class,
    ``p`` and ``repr``; their ``forward`` is replaced on the instance. Returns how many layers
    it changed; applying it again only updates ``row_ids``."""
    changed = 0
    for m in model.modules():
        if "_gsr_row_ids" in m.__dict__:
            m.__dict__["_gsr_row_ids"] = row_ids.clone()
            continue
        if isinstance(m, nn.Dropout):
            forward = _dropout_forward
        elif isinstance(m, CompressedDropout):
            forward = _compressed_dropout_forward
        elif isinstance(m, GroupTopKCompress):
            if not m.dropout:
                continue
            forward = _topk_forward
            m.__dict__["active_dropout"] = _no_dropout
        else:
            continue
        m.__dict__["_gsr_row_ids"] = row_ids.clone()
        m.__dict__["forward"] = types.MethodType(forward, m)
        changed += 1
    return changed
