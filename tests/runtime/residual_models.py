"""Residual models the runtime tests share (also imported by the CUDA test's subprocess)."""
import torch.nn.functional as F
from torch import nn


class GINResidual(nn.Module):
    """Residual GIN blocks whose MLP starts with a LayerNorm: the compressed layer aggregates
    the compressed form itself (no linear map to apply first). ``dropout`` > 0 puts a dropout
    between the ReLU and the conv."""

    def __init__(self, width: int, depth: int, dropout: float = 0.0) -> None:
        super().__init__()
        from torch_geometric.nn import GINConv

        self.encoder = nn.Linear(5, width)
        self.convs = nn.ModuleList(
            GINConv(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width)))
            for _ in range(depth))
        self.decoder = nn.Linear(width, 3)
        self.dropout = dropout

    def forward(self, x, edge_index):
        h = self.encoder(x)
        for conv in self.convs:
            a = F.relu(h)
            if self.dropout:
                a = F.dropout(a, p=self.dropout, training=self.training)
            h = h + conv(a, edge_index)
        return self.decoder(h)
