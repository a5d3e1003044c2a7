"""OGB-LSC PCQM4M baseline GNN (GIN, residual) of PyG's multi-GPU example.

Source: pyg-team/pytorch_geometric, examples/multi_gpu/pcqm4m_ogb.py (classes GINConv,
GNN_node, GNN), with ``gnn_type='gin', virtual_node=False, residual=True``.
Exercises: a user ``MessagePassing`` subclass named GINConv with its own BondEncoder reading
``edge_attr``, ``h += h_list[layer]`` (in-place residual) through a Python list, no ReLU on the
last layer, a forward taking one batched ``Data`` object, AtomEncoder loop over ``x.shape[1]``,
and a train/eval branch on ``self.training`` (clamp at inference).
"""
import torch
import torch.nn.functional as F
from torch_geometric.nn import MessagePassing, global_add_pool, global_mean_pool

from ..encoders import AtomEncoder, BondEncoder
from ..graphs import molecule_data

SOURCE = "pyg-team/pytorch_geometric: examples/multi_gpu/pcqm4m_ogb.py"
EXERCISES = "user GINConv(MessagePassing) + BondEncoder, in-place residual via list, Data input"


class GINConv(MessagePassing):
    def __init__(self, emb_dim):
        super().__init__(aggr="add")
        self.mlp = torch.nn.Sequential(torch.nn.Linear(emb_dim, emb_dim),
                                       torch.nn.BatchNorm1d(emb_dim), torch.nn.ReLU(),
                                       torch.nn.Linear(emb_dim, emb_dim))
        self.eps = torch.nn.Parameter(torch.Tensor([0]))
        self.bond_encoder = BondEncoder(emb_dim=emb_dim)

    def forward(self, x, edge_index, edge_attr):
        edge_embedding = self.bond_encoder(edge_attr)
        out = self.mlp((1 + self.eps) * x
                       + self.propagate(edge_index, x=x, edge_attr=edge_embedding))
        return out

    def message(self, x_j, edge_attr):
        return F.relu(x_j + edge_attr)

    def update(self, aggr_out):
        return aggr_out


class GNN_node(torch.nn.Module):
    def __init__(self, num_layers, emb_dim, drop_ratio=0.5, JK="last", residual=False):
        super().__init__()
        self.num_layers = num_layers
        self.drop_ratio = drop_ratio
        self.JK = JK
        self.residual = residual
        if self.num_layers < 2:
            raise ValueError("Number of GNN layers must be greater than 1.")

        self.atom_encoder = AtomEncoder(emb_dim)
        self.convs = torch.nn.ModuleList()
        self.batch_norms = torch.nn.ModuleList()
        for layer in range(num_layers):
            self.convs.append(GINConv(emb_dim))
            self.batch_norms.append(torch.nn.BatchNorm1d(emb_dim))

    def forward(self, batched_data):
        x, edge_index, edge_attr, batch = (batched_data.x, batched_data.edge_index,
                                           batched_data.edge_attr, batched_data.batch)

        h_list = [self.atom_encoder(x)]
        for layer in range(self.num_layers):
            h = self.convs[layer](h_list[layer], edge_index, edge_attr)
            h = self.batch_norms[layer](h)

            if layer == self.num_layers - 1:
                # no ReLU after the last layer
                h = F.dropout(h, self.drop_ratio, training=self.training)
            else:
                h = F.dropout(F.relu(h), self.drop_ratio, training=self.training)

            if self.residual:
                h += h_list[layer]

            h_list.append(h)

        if self.JK == "last":
            node_representation = h_list[-1]
        elif self.JK == "sum":
            node_representation = 0
            for layer in range(self.num_layers + 1):
                node_representation += h_list[layer]

        return node_representation


class GNN(torch.nn.Module):
    def __init__(self, num_tasks=1, num_layers=5, emb_dim=300, residual=False, drop_ratio=0,
                 JK="last", graph_pooling="sum"):
        super().__init__()
        self.num_layers = num_layers
        self.emb_dim = emb_dim
        self.gnn_node = GNN_node(num_layers, emb_dim, JK=JK, drop_ratio=drop_ratio,
                                 residual=residual)
        if graph_pooling == "sum":
            self.pool = global_add_pool
        elif graph_pooling == "mean":
            self.pool = global_mean_pool
        else:
            raise ValueError("Invalid graph pooling type.")
        self.graph_pred_linear = torch.nn.Linear(self.emb_dim, num_tasks)

    def forward(self, batched_data):
        h_node = self.gnn_node(batched_data)

        h_graph = self.pool(h_node, batched_data.batch)
        output = self.graph_pred_linear(h_graph)

        if self.training:
            return output
        else:
            # clamp at inference, as the example does
            return torch.clamp(output, min=0, max=20)


def make_model(depth, width):
    return GNN(num_tasks=1, num_layers=depth, emb_dim=width, residual=True, drop_ratio=0.1)


def make_inputs(dtype=torch.float32):
    return (molecule_data(num_graphs=8, nodes_per_graph=25, seed=5),)
