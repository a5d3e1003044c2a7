"""EGC of PyG's ogbg-molhiv example.

Source: pyg-team/pytorch_geometric, examples/egc.py (class Net, EGC-S: 'symnorm').
Exercises: ``x = x + relu(BatchNorm(EGConv(x, adj_t)))``, an OGB AtomEncoder (Python loop over
``x.shape[1]``), global_mean_pool and a BatchNorm MLP head.
The example calls ``adj_t.set_value(None)`` on a torch_sparse SparseTensor so that EGConv sees
no edge values; torch_sparse is not a dependency here, so the harness passes a torch sparse
``adj_t`` already without edge values (all ones) and that one line is left out.
"""
import torch
from torch.nn import BatchNorm1d, Linear, ReLU, Sequential
from torch_geometric.nn import EGConv, global_mean_pool
from torch_geometric.utils import to_torch_csr_tensor

from ..encoders import AtomEncoder
from ..graphs import molecule_batch

SOURCE = "pyg-team/pytorch_geometric: examples/egc.py"
EXERCISES = "EGConv + BatchNorm + relu_ residual, AtomEncoder loop, torch sparse adj_t"


class Net(torch.nn.Module):
    def __init__(self, hidden_channels, num_layers, num_heads, num_bases,
                 use_multi_aggregators=False):
        super().__init__()
        if use_multi_aggregators:
            aggregators = ['sum', 'mean', 'max']
        else:
            aggregators = ['symnorm']

        self.encoder = AtomEncoder(hidden_channels)

        self.convs = torch.nn.ModuleList()
        self.norms = torch.nn.ModuleList()
        for _ in range(num_layers):
            self.convs.append(
                EGConv(hidden_channels, hidden_channels, aggregators,
                       num_heads, num_bases))
            self.norms.append(BatchNorm1d(hidden_channels))

        self.mlp = Sequential(
            Linear(hidden_channels, hidden_channels // 2, bias=False),
            BatchNorm1d(hidden_channels // 2),
            ReLU(inplace=True),
            Linear(hidden_channels // 2, hidden_channels // 4, bias=False),
            BatchNorm1d(hidden_channels // 4),
            ReLU(inplace=True),
            Linear(hidden_channels // 4, 1),
        )

    def forward(self, x, adj_t, batch):
        x = self.encoder(x)

        for conv, norm in zip(self.convs, self.norms):
            h = conv(x, adj_t)
            h = norm(h)
            h = h.relu_()
            x = x + h

        x = global_mean_pool(x, batch)

        return self.mlp(x)


def make_model(depth, width):
    return Net(hidden_channels=width, num_layers=depth, num_heads=4, num_bases=4)


def make_inputs(dtype=torch.float32):
    x, edge_index, _, batch = molecule_batch(num_graphs=8, nodes_per_graph=25)
    n = batch.numel()
    adj_t = to_torch_csr_tensor(edge_index.flip(0), size=(n, n)).to(dtype)
    return x, adj_t, batch
