"""Reference deep residual GNNs, as users write them, for the demo, training and benchmarks."""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

CONVS: dict[str, Callable[[int], nn.Module]] = {}


def _register_convs() -> None:
    import torch_geometric.nn as pyg

    CONVS.update({
        "sage": lambda d: pyg.SAGEConv(d, d),
        "gcn": lambda d: pyg.GCNConv(d, d),
        "graph": lambda d: pyg.GraphConv(d, d),
        "gin": lambda d: pyg.GINConv(nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))),
        "gat": lambda d: pyg.GATConv(d, d // 4, heads=4),
        "gen": lambda d: pyg.GENConv(d, d, norm="layer"),
    })


_register_convs()


class ResidualBlock(nn.Module):
    """Pre-norm residual branch: ``conv(dropout(relu(norm(h))), edge_index)``."""

    def __init__(self, width: int, conv: str = "sage", dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.conv = CONVS[conv](width)
        self.dropout = dropout

    def forward(self, h: Tensor, edge_index: Tensor) -> Tensor:
        h = F.relu(self.norm(h))
        h = F.dropout(h, p=self.dropout, training=self.training)
        return self.conv(h, edge_index)


class ResidualGNN(nn.Module):
    """``depth`` residual blocks ``h = h + block(h)`` between a linear encoder and decoder."""

    def __init__(self, in_channels: int, width: int, out_channels: int, depth: int,
                 conv: str = "sage", dropout: float = 0.1) -> None:
        super().__init__()
        if conv not in CONVS:
            raise ValueError(f"unknown conv '{conv}'; choose one of {', '.join(CONVS)}")
        self.encoder = nn.Linear(in_channels, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, conv, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.decoder = nn.Linear(width, out_channels)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = self.encoder(x)
        for block in self.blocks:
            h = h + block(h, edge_index)
        return self.decoder(F.relu(self.norm(h)))


class UnnormalizedGIN(nn.Module):
    """``depth`` blocks ``h = h + GINConv(MLP)(h)`` with no norm anywhere: the state grows block
    after block, which is what makes rebuilding block inputs lose bits (docs/exactness.md)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, depth: int) -> None:
        super().__init__()
        import torch_geometric.nn as pyg

        self.encoder = nn.Linear(in_channels, width)
        self.blocks = nn.ModuleList(
            pyg.GINConv(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)))
            for _ in range(depth))
        self.decoder = nn.Linear(width, out_channels)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = self.encoder(x)
        for block in self.blocks:
            h = h + block(h, edge_index)
        return self.decoder(h)
