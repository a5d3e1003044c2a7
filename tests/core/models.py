"""Small deep residual GNNs in the styles users write them, one per supported layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_geometric.nn as pyg
from torch import nn
from torch_geometric.nn.norm import BatchNorm as PyGBatchNorm
from torch_geometric.nn.norm import GraphNorm
from torch_geometric.nn.norm import LayerNorm as PyGLayerNorm

D = 8  # width: 2 groups of 4


class Branch(nn.Module):
    """``layer(dropout(relu(norm(h))), *extra)`` (pre-norm) or ``relu(norm(layer(h)))``."""

    def __init__(self, layer, norm=None, pre_norm=True, dropout=0.0, takes_graph=True):
        super().__init__()
        self.layer, self.norm, self.pre_norm = layer, norm, pre_norm
        self.dropout, self.takes_graph = dropout, takes_graph

    def _norm(self, h, batch):
        if self.norm is None:
            return h
        if isinstance(self.norm, (PyGLayerNorm, GraphNorm)):
            return self.norm(h, batch)
        return self.norm(h)

    def forward(self, h, edge_index, edge_attr=None, batch=None):
        args = (edge_index,) if self.takes_graph else ()
        if edge_attr is not None:
            args = args + (edge_attr,)
        if self.pre_norm:
            h = F.relu(self._norm(h, batch))
            h = F.dropout(h, p=self.dropout, training=self.training)
            return self.layer(h, *args)
        h = self.layer(h, *args)
        return F.dropout(F.relu(self._norm(h, batch)), p=self.dropout, training=self.training)


class DeepResidual(nn.Module):
    """encoder -> ``depth`` x ``h = h + branch(h)`` -> decoder, written in one of the
    styles ``plus`` (h = h + f), ``torch_add`` (torch.add), ``iadd`` (h += f)."""

    def __init__(self, make_branch, depth=3, style="plus", in_channels=5, edge_dim=None,
                 use_batch=False, encoder=True):
        super().__init__()
        self.encoder = nn.Linear(in_channels, D) if encoder else None
        self.blocks = nn.ModuleList(make_branch() for _ in range(depth))
        self.decoder = nn.Linear(D, 3)
        self.style, self.use_batch, self.edge_dim = style, use_batch, edge_dim

    def forward(self, x, edge_index, edge_attr=None, batch=None):
        h = self.encoder(x) if self.encoder is not None else x
        for block in self.blocks:
            f = block(h, edge_index, edge_attr, batch if self.use_batch else None)
            if self.style == "plus":
                h = h + f
            elif self.style == "torch_add":
                h = torch.add(h, f)
            else:
                h += f
        return self.decoder(h)


def layer_factories():
    """name -> (make_branch, model kwargs). Every supported layer type appears."""
    mlp = lambda: nn.Sequential(nn.Linear(D, 2 * D), nn.ReLU(), nn.Linear(2 * D, D))  # noqa: E731
    return {
        "linear_layernorm": (lambda: Branch(nn.Linear(D, D), nn.LayerNorm(D), takes_graph=False), {}),
        "mlp_batchnorm_postnorm": (
            lambda: Branch(mlp(), nn.BatchNorm1d(D), pre_norm=False, takes_graph=False), {}),
        "gcn": (lambda: Branch(pyg.GCNConv(D, D), nn.LayerNorm(D)), {}),
        "sage": (lambda: Branch(pyg.SAGEConv(D, D), nn.LayerNorm(D)), {"style": "torch_add"}),
        "graphconv": (lambda: Branch(pyg.GraphConv(D, D, aggr="mean"), nn.LayerNorm(D)), {"style": "iadd"}),
        "gin_mlp": (lambda: Branch(pyg.GINConv(pyg.MLP([D, 2 * D, D], norm="batch_norm"),
                                                train_eps=True)), {}),
        "gin_sequential": (lambda: Branch(pyg.GINConv(mlp())), {}),
        "gine_edge_dim": (lambda: Branch(pyg.GINEConv(mlp(), edge_dim=3)), {"edge_dim": 3}),
        "gine_no_edge_dim": (lambda: Branch(pyg.GINEConv(mlp())), {"edge_dim": D}),
        "gat_concat": (lambda: Branch(pyg.GATConv(D, D // 2, heads=2), nn.LayerNorm(D)), {}),
        "gat_mean": (lambda: Branch(pyg.GATConv(D, D, heads=2, concat=False)), {}),
        "gatv2": (lambda: Branch(pyg.GATv2Conv(D, D // 2, heads=2, edge_dim=3)), {"edge_dim": 3}),
        "gen": (lambda: Branch(pyg.GENConv(D, D, norm="layer", learn_t=True)), {}),
        "pyg_layernorm": (lambda: Branch(pyg.SAGEConv(D, D), PyGLayerNorm(D)), {"use_batch": True}),
        "pyg_batchnorm": (lambda: Branch(pyg.GCNConv(D, D), PyGBatchNorm(D), pre_norm=False), {}),
        "graphnorm": (lambda: Branch(pyg.GraphConv(D, D), GraphNorm(D)), {"use_batch": True}),
    }


def graph_inputs(num_nodes=12, num_edges=40, in_channels=5, edge_dim=None, dtype=torch.float64,
                 generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    x = torch.randn(num_nodes, in_channels, generator=g, dtype=dtype)
    edge_index = torch.randint(0, num_nodes, (2, num_edges), generator=g)
    edge_attr = None if edge_dim is None else torch.randn(num_edges, edge_dim, generator=g, dtype=dtype)
    batch = torch.arange(num_nodes) * 2 // num_nodes  # two graphs
    return x, edge_index, edge_attr, batch
