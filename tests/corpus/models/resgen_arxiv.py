"""ResGEN DeeperGCN (res+ blocks) of the DeeperGCN authors' ogbn-arxiv example.

Source: lightaime/deep_gcns_torch, examples/ogb/ogbn_arxiv/model.py (class DeeperGCN,
block='res+'), with GENConv from gcn_lib/sparse/torch_vertex.py (see deepgcns_lib.py).
Exercises: the authors' own GENConv class (a MessagePassing subclass sharing PyG's name),
norm -> ReLU -> dropout -> conv -> + h, and ``torch.utils.checkpoint`` on every block but
each ``ckp_k``-th (turned on by the softmax aggregator at more than 7 layers).
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..graphs import node_graph
from .deepgcns_lib import GENConv, norm_layer

SOURCE = "lightaime/deep_gcns_torch: examples/ogb/ogbn_arxiv/model.py"
EXERCISES = "user GENConv(MessagePassing), res+ blocks, torch.utils.checkpoint inside the chain"


class DeeperGCN(torch.nn.Module):
    def __init__(self, in_channels, hidden_channels, num_tasks, num_layers, dropout=0.5,
                 block='res+', aggr='softmax', t=1.0, learn_t=True, norm='batch',
                 mlp_layers=2):
        super().__init__()
        self.num_layers = num_layers
        self.dropout = dropout
        self.block = block
        self.checkpoint_grad = False
        if aggr in ['softmax_sg', 'softmax', 'power'] and self.num_layers > 7:
            self.checkpoint_grad = True
            self.ckp_k = self.num_layers // 2

        self.gcns = torch.nn.ModuleList()
        self.norms = torch.nn.ModuleList()
        self.node_features_encoder = torch.nn.Linear(in_channels, hidden_channels)
        self.node_pred_linear = torch.nn.Linear(hidden_channels, num_tasks)
        for layer in range(self.num_layers):
            self.gcns.append(GENConv(hidden_channels, hidden_channels, aggr=aggr, t=t,
                                     learn_t=learn_t, norm=norm, mlp_layers=mlp_layers))
            self.norms.append(norm_layer(norm, hidden_channels))

    def forward(self, x, edge_index):
        h = self.node_features_encoder(x)

        if self.block == 'res+':
            h = self.gcns[0](h, edge_index)

            if self.checkpoint_grad:
                for layer in range(1, self.num_layers):
                    h1 = self.norms[layer - 1](h)
                    h2 = F.relu(h1)
                    h2 = F.dropout(h2, p=self.dropout, training=self.training)

                    if layer % self.ckp_k != 0:
                        res = checkpoint(self.gcns[layer], h2, edge_index)
                        h = res + h
                    else:
                        h = self.gcns[layer](h2, edge_index) + h
            else:
                for layer in range(1, self.num_layers):
                    h1 = self.norms[layer - 1](h)
                    h2 = F.relu(h1)
                    h2 = F.dropout(h2, p=self.dropout, training=self.training)
                    h = self.gcns[layer](h2, edge_index) + h

            h = F.relu(self.norms[self.num_layers - 1](h))
            h = F.dropout(h, p=self.dropout, training=self.training)
        else:
            raise Exception('only the res+ block is kept in this copy')

        h = self.node_pred_linear(h)

        return torch.log_softmax(h, dim=-1)


def make_model(depth, width):
    return DeeperGCN(in_channels=8, hidden_channels=width, num_tasks=4, num_layers=depth)


def make_inputs(dtype=torch.float32):
    x, edge_index, _ = node_graph(200, 800, in_channels=8, dtype=dtype)
    return x, edge_index
