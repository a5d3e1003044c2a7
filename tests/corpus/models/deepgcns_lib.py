"""Layers of the DeepGCN/DeeperGCN authors' library, written here for the corpus models.

Source: lightaime/deep_gcns_torch, gcn_lib/sparse/torch_nn.py (MLP, norm_layer, act_layer),
gcn_lib/sparse/torch_vertex.py (GenMessagePassing, GENConv, SemiGCNConv, GraphConv,
ResGraphBlock). The user-side ``GENConv`` is a MessagePassing subclass of its own that shares
its name with PyG's ``torch_geometric.nn.GENConv``; only the options the corpus uses are kept
(softmax aggregation with a learnable temperature, optional edge encoding).
"""
import torch
from torch import nn
from torch_geometric.nn import GCNConv, MessagePassing
from torch_geometric.utils import scatter, softmax

from ..encoders import BondEncoder


def act_layer(act):
    act = act.lower()
    if act == 'relu':
        return nn.ReLU()
    if act == 'leakyrelu':
        return nn.LeakyReLU(0.2)
    raise NotImplementedError(f'activation layer [{act}] is not found')


def norm_layer(norm_type, nc):
    norm = norm_type.lower()
    if norm == 'batch':
        return nn.BatchNorm1d(nc, affine=True)
    if norm == 'layer':
        return nn.LayerNorm(nc, elementwise_affine=True)
    raise NotImplementedError(f'normalization layer [{norm}] is not found')


class MLP(nn.Sequential):
    """Linear -> act -> norm per step; with ``last_lin`` the last step is a bare Linear."""

    def __init__(self, channels, act='relu', norm=None, bias=True, last_lin=False):
        layers = []
        for i in range(1, len(channels)):
            layers.append(nn.Linear(channels[i - 1], channels[i], bias))
            if i == len(channels) - 1 and last_lin:
                break
            if act:
                layers.append(act_layer(act))
            if norm:
                layers.append(norm_layer(norm, channels[i]))
        super().__init__(*layers)


class GenMessagePassing(MessagePassing):
    """DeeperGCN's softmax aggregation: sum over neighbours of ``softmax(t * m) * m``."""

    def __init__(self, aggr='softmax', t=1.0, learn_t=False):
        if aggr in ('softmax', 'softmax_sg'):
            super().__init__(aggr=None)
            self.aggr = aggr
            if learn_t and aggr == 'softmax':
                self.learn_t = True
                self.t = nn.Parameter(torch.Tensor([t]), requires_grad=True)
            else:
                self.learn_t = False
                self.t = t
        else:
            super().__init__(aggr=aggr)

    def aggregate(self, inputs, index, ptr=None, dim_size=None):
        if self.aggr in ('add', 'mean', 'max', None):
            return super().aggregate(inputs, index, ptr, dim_size)
        if self.learn_t:
            weights = softmax(inputs * self.t, index, dim=self.node_dim, num_nodes=dim_size)
        else:
            with torch.no_grad():
                weights = softmax(inputs * self.t, index, dim=self.node_dim, num_nodes=dim_size)
        return scatter(inputs * weights, index, dim=self.node_dim, dim_size=dim_size,
                       reduce='sum')


class GENConv(GenMessagePassing):
    """GENeralized Graph Convolution (DeeperGCN): ``mlp(x + aggr_j(relu(x_j + e_ji) + eps))``."""

    def __init__(self, in_dim, emb_dim, aggr='softmax', t=1.0, learn_t=False,
                 encode_edge=False, bond_encoder=False, edge_feat_dim=None,
                 norm='batch', mlp_layers=2, eps=1e-7):
        super().__init__(aggr=aggr, t=t, learn_t=learn_t)
        channels_list = [in_dim]
        for _ in range(mlp_layers - 1):
            channels_list.append(in_dim * 2)
        channels_list.append(emb_dim)
        self.mlp = MLP(channels=channels_list, norm=norm, last_lin=True)
        self.msg_encoder = nn.ReLU()
        self.eps = eps
        self.encode_edge = encode_edge
        if self.encode_edge:
            if bond_encoder:
                self.edge_encoder = BondEncoder(emb_dim=in_dim)
            else:
                self.edge_encoder = nn.Linear(edge_feat_dim, in_dim)

    def forward(self, x, edge_index, edge_attr=None):
        if self.encode_edge and edge_attr is not None:
            edge_emb = self.edge_encoder(edge_attr)
        else:
            edge_emb = edge_attr
        m = self.propagate(edge_index, x=x, edge_attr=edge_emb)
        h = x + m
        return self.mlp(h)

    def message(self, x_j, edge_attr=None):
        msg = x_j + edge_attr if edge_attr is not None else x_j
        return self.msg_encoder(msg) + self.eps

    def update(self, aggr_out):
        return aggr_out


class SemiGCNConv(nn.Module):
    """GCNConv followed by activation and norm."""

    def __init__(self, in_channels, out_channels, act='relu', norm=None, bias=True):
        super().__init__()
        self.gconv = GCNConv(in_channels, out_channels, bias=bias)
        m = []
        if act:
            m.append(act_layer(act))
        if norm:
            m.append(norm_layer(norm, out_channels))
        self.unlinear = nn.Sequential(*m)

    def forward(self, x, edge_index):
        return self.unlinear(self.gconv(x, edge_index))


class GraphConv(nn.Module):
    """Static graph convolution layer (only the 'gcn' variant is kept here)."""

    def __init__(self, in_channels, out_channels, conv='gcn', act='relu', norm=None, bias=True,
                 heads=8):
        super().__init__()
        if conv.lower() != 'gcn':
            raise NotImplementedError(f'conv {conv} is not kept in this copy')
        self.gconv = SemiGCNConv(in_channels, out_channels, act, norm, bias)

    def forward(self, x, edge_index):
        return self.gconv(x, edge_index)


class ResGraphBlock(nn.Module):
    """Residual static graph convolution block; returns ``(out, edge_index)``."""

    def __init__(self, channels, conv='gcn', act='relu', norm=None, bias=True, heads=8,
                 res_scale=1):
        super().__init__()
        self.body = GraphConv(channels, channels, conv, act, norm, bias, heads)
        self.res_scale = res_scale

    def forward(self, x, edge_index):
        return self.body(x, edge_index) + x * self.res_scale, edge_index
