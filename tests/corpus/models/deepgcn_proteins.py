"""DeeperGCN of PyG's ogbn-proteins example.

Source: pyg-team/pytorch_geometric, examples/ogbn_proteins_deepgcn.py (class DeeperGCN).
Exercises: DeepGCNLayer(GENConv, LayerNorm, ReLU, block='res+', ckpt_grad=i % 3), a GENConv
reading encoded edge features, the first layer's norm/act reused after the loop.
The dataset-sized input/output widths are parameters here (8 node and edge features as in
ogbn-proteins, 112 tasks scaled down to 4).
"""
import torch
import torch.nn.functional as F
from torch.nn import LayerNorm, Linear, ReLU
from torch_geometric.nn import DeepGCNLayer, GENConv

from ..graphs import node_graph

SOURCE = "pyg-team/pytorch_geometric: examples/ogbn_proteins_deepgcn.py"
EXERCISES = "DeepGCNLayer res+ with ckpt_grad, GENConv(softmax, learn_t) with edge_attr"


class DeeperGCN(torch.nn.Module):
    def __init__(self, hidden_channels, num_layers, in_channels=8, edge_channels=8, num_tasks=4):
        super().__init__()

        self.node_encoder = Linear(in_channels, hidden_channels)
        self.edge_encoder = Linear(edge_channels, hidden_channels)

        self.layers = torch.nn.ModuleList()
        for i in range(1, num_layers + 1):
            conv = GENConv(hidden_channels, hidden_channels, aggr='softmax',
                           t=1.0, learn_t=True, num_layers=2, norm='layer')
            norm = LayerNorm(hidden_channels, elementwise_affine=True)
            act = ReLU(inplace=True)
            layer = DeepGCNLayer(conv, norm, act, block='res+', dropout=0.1,
                                 ckpt_grad=i % 3)
            self.layers.append(layer)

        self.lin = Linear(hidden_channels, num_tasks)

    def forward(self, x, edge_index, edge_attr):
        x = self.node_encoder(x)
        edge_attr = self.edge_encoder(edge_attr)

        x = self.layers[0].conv(x, edge_index, edge_attr)

        for layer in self.layers[1:]:
            x = layer(x, edge_index, edge_attr)

        x = self.layers[0].act(self.layers[0].norm(x))
        x = F.dropout(x, p=0.1, training=self.training)

        return self.lin(x)


def make_model(depth, width):
    return DeeperGCN(hidden_channels=width, num_layers=depth)


def make_inputs(dtype=torch.float32):
    x, edge_index, edge_attr = node_graph(200, 800, in_channels=8, edge_channels=8, dtype=dtype)
    return x, edge_index, edge_attr
