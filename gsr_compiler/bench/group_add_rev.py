"""The grouped reversible residual GNN built by hand with PyG's ``GroupAddRev``.

This is how the architecture that ``gsr_compile`` produces is written today without it,
following PyG's ``examples/rev_gnn.py``: the channels are split into G groups and every
block is ``GroupAddRev`` (grouped additive coupling, as in RevGNN) around a branch of
width D/G. Same encoder, pre-norm branch and decoder as
:class:`~gsr_compiler.models.ResidualGNN`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_geometric.nn as pyg
from torch import Tensor, nn

from ..models import CONVS


class GroupBranch(nn.Module):
    """The branch of :class:`~gsr_compiler.models.ResidualBlock` at width D/G, with the
    dropout mask passed in: ``GroupAddRev`` recomputes the branch in backward without
    replaying randomness, so the mask has to be an input."""

    def __init__(self, width: int, conv: str = "sage") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.conv = CONVS[conv](width)

    def forward(self, h: Tensor, edge_index: Tensor, dropout_mask: Tensor | None) -> Tensor:
        h = F.relu(self.norm(h))
        if dropout_mask is not None:
            h = h * dropout_mask
        return self.conv(h, edge_index)


class GroupAddRevGNN(nn.Module):
    """``depth`` ``GroupAddRev`` blocks of ``groups`` groups between a linear encoder and
    decoder; one dropout mask per step, shared by the blocks (as in PyG's example)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, depth: int,
                 groups: int = 2, dropout: float = 0.1, conv: str = "sage") -> None:
        super().__init__()
        if width % groups:
            raise ValueError(f"width {width} is not divisible by groups {groups}")
        if conv not in CONVS:
            raise ValueError(f"unknown conv '{conv}'; choose one of {', '.join(CONVS)}")
        self.encoder = nn.Linear(in_channels, width)
        self.blocks = nn.ModuleList(
            pyg.GroupAddRev(GroupBranch(width // groups, conv), num_groups=groups)
            for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.decoder = nn.Linear(width, out_channels)
        self.groups, self.dropout = groups, dropout

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = self.encoder(x)
        mask = None
        if self.training and self.dropout > 0:
            keep = torch.empty(h.shape[0], h.shape[1] // self.groups, device=h.device)
            mask = keep.bernoulli_(1 - self.dropout) / (1 - self.dropout)
        for block in self.blocks:
            h = block(h, edge_index, mask)
        return self.decoder(F.relu(self.norm(h)))
