"""Memory-pooling graph classifier of PyG's PROTEINS example.

Source: pyg-team/pytorch_geometric, examples/mem_pool.py (class Net).
Exercises: DeepGCNLayer(GATConv, BatchNorm1d, LeakyReLU, 'res+') query network, then two
MemPooling layers (not MessagePassing; to_dense_batch inside), a tuple output (log-probabilities,
KL loss), and ``F.dropout`` without ``training=`` (always on, as written).
The example stacks 3 query layers; their number is a parameter here.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import DeepGCNLayer, GATConv, MemPooling

from ..graphs import molecule_batch

SOURCE = "pyg-team/pytorch_geometric: examples/mem_pool.py"
EXERCISES = "DeepGCNLayer(GATConv, BatchNorm) res+ then MemPooling, tuple output"


class Net(torch.nn.Module):
    def __init__(self, in_channels, out_channels, hidden_channels=32, dropout=0.1, num_layers=3):
        super().__init__()

        self.dropout = dropout
        self.node_embed = nn.Linear(in_channels, hidden_channels)
        self.query_net = nn.ModuleList()
        for i in range(num_layers):
            conv = GATConv(hidden_channels, hidden_channels, dropout=dropout)
            norm = nn.BatchNorm1d(hidden_channels)
            act = nn.LeakyReLU()
            block = "res+"
            self.query_net.append(DeepGCNLayer(conv, norm, act, block, dropout))
        self.mem1 = MemPooling(hidden_channels, 80, 5, 10)
        self.mem2 = MemPooling(80, out_channels, 5, 1)

    def forward(self, x, edge_index, batch):
        x = self.node_embed(x)
        for lyrs in self.query_net:
            x = lyrs(x, edge_index)
        x, S = self.mem1(x, batch)
        x = F.dropout(x, p=self.dropout)
        x, S1 = self.mem2(F.leaky_relu(x))
        return F.log_softmax(
            F.leaky_relu(x).squeeze(1),
            dim=-1), MemPooling.kl_loss(S1) + MemPooling.kl_loss(S)


def make_model(depth, width):
    return Net(in_channels=8, out_channels=2, hidden_channels=width, num_layers=depth)


def make_inputs(dtype=torch.float32):
    _, edge_index, _, batch = molecule_batch(num_graphs=8, nodes_per_graph=25, seed=3)
    x = torch.randn(batch.numel(), 8, generator=torch.Generator().manual_seed(4)).to(dtype)
    return x, edge_index, batch
