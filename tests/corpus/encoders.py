"""Random-init stand-ins for OGB's molecule encoders (``ogb.graphproppred.mol_encoder``),
which the corpus models use. Written here so that no package or download is needed; like
OGB's, they sum one embedding table per feature column, looping over the columns in Python.
"""
import torch
from torch import nn

from .graphs import ATOM_FEATURE_DIMS, BOND_FEATURE_DIMS


class AtomEncoder(nn.Module):
    def __init__(self, emb_dim: int, feature_dims=ATOM_FEATURE_DIMS):
        super().__init__()
        self.atom_embedding_list = nn.ModuleList()
        for dim in feature_dims:
            table = nn.Embedding(dim, emb_dim)
            nn.init.xavier_uniform_(table.weight.data)
            self.atom_embedding_list.append(table)

    def forward(self, x):
        x_embedding = 0
        for i in range(x.shape[1]):
            x_embedding += self.atom_embedding_list[i](x[:, i])
        return x_embedding


class BondEncoder(nn.Module):
    def __init__(self, emb_dim: int, feature_dims=BOND_FEATURE_DIMS):
        super().__init__()
        self.bond_embedding_list = nn.ModuleList()
        for dim in feature_dims:
            table = nn.Embedding(dim, emb_dim)
            nn.init.xavier_uniform_(table.weight.data)
            self.bond_embedding_list.append(table)

    def forward(self, edge_attr):
        bond_embedding = 0
        for i in range(edge_attr.shape[1]):
            bond_embedding += self.bond_embedding_list[i](edge_attr[:, i])
        return bond_embedding
