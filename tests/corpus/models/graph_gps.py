"""GPS graph transformer of PyG's ZINC example.

Source: pyg-team/pytorch_geometric, examples/graph_gps.py (class GPS).
Exercises: GPSConv (not a MessagePassing: local GINEConv + global multi-head attention over
dense batches) stacked without an outer residual; embeddings of integer node/edge types and a
random-walk positional encoding. The Performer redraw helper is left out (multihead attention).
"""
import torch
from torch.nn import BatchNorm1d, Embedding, Linear, ModuleList, ReLU, Sequential
from torch_geometric.nn import GINEConv, GPSConv, global_add_pool

from ..graphs import molecule_batch

SOURCE = "pyg-team/pytorch_geometric: examples/graph_gps.py"
EXERCISES = "GPSConv(GINEConv) stack, attention over to_dense_batch, edge embeddings"


class GPS(torch.nn.Module):
    def __init__(self, channels, pe_dim, num_layers, attn_type='multihead', attn_kwargs=None):
        super().__init__()

        self.node_emb = Embedding(28, channels - pe_dim)
        self.pe_lin = Linear(20, pe_dim)
        self.pe_norm = BatchNorm1d(20)
        self.edge_emb = Embedding(4, channels)

        self.convs = ModuleList()
        for _ in range(num_layers):
            nn = Sequential(
                Linear(channels, channels),
                ReLU(),
                Linear(channels, channels),
            )
            conv = GPSConv(channels, GINEConv(nn), heads=4,
                           attn_type=attn_type, attn_kwargs=attn_kwargs or {'dropout': 0.5})
            self.convs.append(conv)

        self.mlp = Sequential(
            Linear(channels, channels // 2),
            ReLU(),
            Linear(channels // 2, channels // 4),
            ReLU(),
            Linear(channels // 4, 1),
        )

    def forward(self, x, pe, edge_index, edge_attr, batch):
        x_pe = self.pe_norm(pe)
        x = torch.cat((self.node_emb(x.squeeze(-1)), self.pe_lin(x_pe)), 1)
        edge_attr = self.edge_emb(edge_attr)

        for conv in self.convs:
            x = conv(x, edge_index, batch, edge_attr=edge_attr)
        x = global_add_pool(x, batch)
        return self.mlp(x)


def make_model(depth, width):
    return GPS(channels=width, pe_dim=8, num_layers=depth)


def make_inputs(dtype=torch.float32):
    _, edge_index, _, batch = molecule_batch(num_graphs=8, nodes_per_graph=20, seed=1)
    g = torch.Generator().manual_seed(2)
    n, e = batch.numel(), edge_index.size(1)
    x = torch.randint(0, 28, (n, 1), generator=g)
    pe = torch.rand(n, 20, generator=g).to(dtype)
    edge_attr = torch.randint(0, 4, (e,), generator=g)
    return x, pe, edge_index, edge_attr, batch
