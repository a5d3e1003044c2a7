"""ResGEN DeeperGCN of the DeeperGCN authors' ogbg-mol example (graph classification).

Source: lightaime/deep_gcns_torch, examples/ogb/ogbg_mol/model.py (class DeeperGCN,
block='res+', conv_encode_edge=True, no virtual node), GENConv from
gcn_lib/sparse/torch_vertex.py (see deepgcns_lib.py).
Exercises: each user GENConv encodes the integer bond features itself (its own BondEncoder
reading ``edge_attr``), AtomEncoder loop, a forward taking one batched ``Data`` object,
mean pooling.
"""
import torch
import torch.nn.functional as F
from torch_geometric.nn import global_add_pool, global_max_pool, global_mean_pool

from ..encoders import AtomEncoder, BondEncoder
from ..graphs import molecule_data
from .deepgcns_lib import GENConv, norm_layer

SOURCE = "lightaime/deep_gcns_torch: examples/ogb/ogbg_mol/model.py"
EXERCISES = "user GENConv encoding edge_attr per layer (BondEncoder), res+ blocks, Data input"


class DeeperGCN(torch.nn.Module):
    def __init__(self, hidden_channels, num_tasks, num_layers, dropout=0.2, block='res+',
                 conv_encode_edge=True, aggr='softmax', t=1.0, learn_t=True, norm='batch',
                 mlp_layers=1, graph_pooling='mean'):
        super().__init__()
        self.num_layers = num_layers
        self.dropout = dropout
        self.block = block
        self.conv_encode_edge = conv_encode_edge

        self.gcns = torch.nn.ModuleList()
        self.norms = torch.nn.ModuleList()
        for layer in range(self.num_layers):
            self.gcns.append(GENConv(hidden_channels, hidden_channels, aggr=aggr, t=t,
                                     learn_t=learn_t, encode_edge=self.conv_encode_edge,
                                     bond_encoder=True, norm=norm, mlp_layers=mlp_layers))
            self.norms.append(norm_layer(norm, hidden_channels))

        self.atom_encoder = AtomEncoder(emb_dim=hidden_channels)
        if not self.conv_encode_edge:
            self.bond_encoder = BondEncoder(emb_dim=hidden_channels)

        if graph_pooling == "sum":
            self.pool = global_add_pool
        elif graph_pooling == "mean":
            self.pool = global_mean_pool
        elif graph_pooling == "max":
            self.pool = global_max_pool
        else:
            raise Exception('Unknown Pool Type')
        self.graph_pred_linear = torch.nn.Linear(hidden_channels, num_tasks)

    def forward(self, input_batch):
        x = input_batch.x
        edge_index = input_batch.edge_index
        edge_attr = input_batch.edge_attr
        batch = input_batch.batch

        h = self.atom_encoder(x)

        if self.conv_encode_edge:
            edge_emb = edge_attr
        else:
            edge_emb = self.bond_encoder(edge_attr)

        if self.block == 'res+':
            h = self.gcns[0](h, edge_index, edge_emb)

            for layer in range(1, self.num_layers):
                h1 = self.norms[layer - 1](h)
                h2 = F.relu(h1)
                h2 = F.dropout(h2, p=self.dropout, training=self.training)
                h = self.gcns[layer](h2, edge_index, edge_emb) + h

            h = self.norms[self.num_layers - 1](h)
            h = F.dropout(h, p=self.dropout, training=self.training)
        else:
            raise Exception('only the res+ block is kept in this copy')

        h_graph = self.pool(h, batch)

        return self.graph_pred_linear(h_graph)


def make_model(depth, width):
    return DeeperGCN(hidden_channels=width, num_tasks=1, num_layers=depth)


def make_inputs(dtype=torch.float32):
    return (molecule_data(num_graphs=8, nodes_per_graph=25, seed=6),)
