"""Hand-built baselines the benchmarks compare against (same architecture and data)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_geometric.nn as pyg
from torch import Tensor, nn


class _GroupBranch(nn.Module):
    """The branch of ``gsr_compiler.models.ResidualBlock`` at width D/G, with the
    dropout mask passed in (PyG's ``GroupAddRev`` does not replay randomness)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.conv = pyg.SAGEConv(width, width)

    def forward(self, h: Tensor, edge_index: Tensor, dropout_mask: Tensor | None) -> Tensor:
        h = F.relu(self.norm(h))
        if dropout_mask is not None:
            h = h * dropout_mask
        return self.conv(h, edge_index)


class GroupAddRevGNN(nn.Module):
    """The grouped reversible SAGE model built by hand with PyG's ``GroupAddRev``, as in
    PyG's ``examples/rev_gnn.py`` (one dropout mask per step, shared by the blocks)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, depth: int,
                 groups: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = nn.Linear(in_channels, width)
        self.blocks = nn.ModuleList(
            pyg.GroupAddRev(_GroupBranch(width // groups), num_groups=groups) for _ in range(depth))
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
