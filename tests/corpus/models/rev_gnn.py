"""RevGNN of PyG's ogbn-products example: already reversible (GroupAddRev).

Source: pyg-team/pytorch_geometric, examples/rev_gnn.py (classes GNNBlock, RevGNN).
Exercises: an existing GroupAddRev chain with a dropout mask shared across blocks, which the
compiler must leave as it is and say why. The example feeds ``adj_t``; a plain
``edge_index`` is used here (SAGEConv reads both).
"""
import torch
import torch.nn.functional as F
from torch.nn import LayerNorm, Linear
from torch_geometric.nn import GroupAddRev, SAGEConv

from ..graphs import node_graph

SOURCE = "pyg-team/pytorch_geometric: examples/rev_gnn.py"
EXERCISES = "GroupAddRev(GNNBlock(LayerNorm, SAGEConv)) with a shared dropout mask"


class GNNBlock(torch.nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm = LayerNorm(in_channels, elementwise_affine=True)
        self.conv = SAGEConv(in_channels, out_channels)

    def reset_parameters(self):
        self.norm.reset_parameters()
        self.conv.reset_parameters()

    def forward(self, x, edge_index, dropout_mask=None):
        x = self.norm(x).relu()
        if self.training and dropout_mask is not None:
            x = x * dropout_mask
        return self.conv(x, edge_index)


class RevGNN(torch.nn.Module):
    def __init__(self, in_channels, hidden_channels, out_channels, num_layers,
                 dropout, num_groups=2):
        super().__init__()
        self.dropout = dropout

        self.lin1 = Linear(in_channels, hidden_channels)
        self.lin2 = Linear(hidden_channels, out_channels)
        self.norm = LayerNorm(hidden_channels, elementwise_affine=True)

        assert hidden_channels % num_groups == 0
        self.convs = torch.nn.ModuleList()
        for _ in range(num_layers):
            block = GNNBlock(hidden_channels // num_groups, hidden_channels // num_groups)
            self.convs.append(GroupAddRev(block, num_groups=num_groups))

    def forward(self, x, edge_index):
        x = self.lin1(x)

        # one dropout mask, shared by every block
        mask = None
        if self.training and self.dropout > 0:
            mask = torch.zeros_like(x).bernoulli_(1 - self.dropout)
            mask = mask.requires_grad_(False)
            mask = mask / (1 - self.dropout)

        for conv in self.convs:
            x = conv(x, edge_index, mask)
        x = self.norm(x).relu()
        x = F.dropout(x, p=self.dropout, training=self.training)
        return self.lin2(x)


def make_model(depth, width):
    return RevGNN(8, width, 4, num_layers=depth, dropout=0.5, num_groups=2)


def make_inputs(dtype=torch.float32):
    x, edge_index, _ = node_graph(200, 800, in_channels=8, dtype=dtype)
    return x, edge_index
