"""GCNII of PyG's PPI example: identity residual around each GCN2Conv, ReLU after the sum.

Source: pyg-team/pytorch_geometric, examples/gcn2_ppi.py (class Net).
Exercises: ``x = relu(conv(dropout(x), x_0, adj_t) + x)`` with separate weights per layer,
a torch sparse ``adj_t``; the ReLU after the sum makes each block non-invertible.
"""
import torch
import torch.nn.functional as F
from torch.nn import Linear
from torch_geometric.nn import GCN2Conv

from ..graphs import node_graph, normalized_adj_t

SOURCE = "pyg-team/pytorch_geometric: examples/gcn2_ppi.py"
EXERCISES = "GCN2Conv residual x = relu(h + x) with x_0, torch sparse adj_t"


class Net(torch.nn.Module):
    def __init__(self, hidden_channels, num_layers, alpha, theta,
                 shared_weights=True, dropout=0.0, in_channels=8, num_classes=4):
        super().__init__()

        self.lins = torch.nn.ModuleList()
        self.lins.append(Linear(in_channels, hidden_channels))
        self.lins.append(Linear(hidden_channels, num_classes))

        self.convs = torch.nn.ModuleList()
        for layer in range(num_layers):
            self.convs.append(
                GCN2Conv(hidden_channels, alpha, theta, layer + 1,
                         shared_weights, normalize=False))

        self.dropout = dropout

    def forward(self, x, adj_t):
        x = F.dropout(x, self.dropout, training=self.training)
        x = x_0 = self.lins[0](x).relu()

        for conv in self.convs:
            h = F.dropout(x, self.dropout, training=self.training)
            h = conv(h, x_0, adj_t)
            x = h + x
            x = x.relu()

        x = F.dropout(x, self.dropout, training=self.training)
        x = self.lins[1](x)

        return x


def make_model(depth, width):
    return Net(hidden_channels=width, num_layers=depth, alpha=0.5, theta=1.0,
               shared_weights=False, dropout=0.2)


def make_inputs(dtype=torch.float32):
    x, edge_index, _ = node_graph(200, 800, in_channels=8, dtype=dtype)
    return x, normalized_adj_t(edge_index, x.size(0), dtype)
