"""GCNII of PyG's Cora example: deep, initial-residual (x0) but no identity residual.

Source: pyg-team/pytorch_geometric, examples/gcn2_cora.py (class Net).
Exercises: GCN2Conv(alpha, theta, layer) with the x_0 side input, a torch sparse ``adj_t``
(GCN-normalized, as T.GCNNorm + T.ToSparseTensor give), ReLU after every layer.
"""
import torch
import torch.nn.functional as F
from torch.nn import Linear
from torch_geometric.nn import GCN2Conv

from ..graphs import node_graph, normalized_adj_t

SOURCE = "pyg-team/pytorch_geometric: examples/gcn2_cora.py"
EXERCISES = "GCN2Conv with x_0, torch sparse adj_t, no identity residual (x = relu(conv(x, x_0)))"


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
            x = F.dropout(x, self.dropout, training=self.training)
            x = conv(x, x_0, adj_t)
            x = x.relu()

        x = F.dropout(x, self.dropout, training=self.training)
        x = self.lins[1](x)

        return x.log_softmax(dim=-1)


def make_model(depth, width):
    return Net(hidden_channels=width, num_layers=depth, alpha=0.1, theta=0.5,
               shared_weights=True, dropout=0.6)


def make_inputs(dtype=torch.float32):
    x, edge_index, _ = node_graph(200, 800, in_channels=8, dtype=dtype)
    return x, normalized_adj_t(edge_index, x.size(0), dtype)
