"""DeepGCN (static graph, residual blocks, dense fusion) of the DeepGCN authors' PPI example.

Source: lightaime/deep_gcns_torch, examples/ppi/architecture.py (class DeepGCNv2, block='res',
conv='gcn'), blocks from gcn_lib/sparse/torch_vertex.py (ResGraphBlock; see deepgcns_lib.py).
Exercises: blocks returning a tuple ``(out, edge_index)`` whose second element is unused
(``[0]``), a Python list of every block output concatenated into a fusion MLP (each block's
output is kept by the concat), a forward taking one ``Data`` object.
The fusion/prediction widths (1024, 512, 256) are scaled down by 8 for the small test.
"""
import torch
from torch.nn import Sequential as Seq
from torch_geometric.data import Data

from ..graphs import node_graph
from .deepgcns_lib import MLP, GraphConv, ResGraphBlock

SOURCE = "lightaime/deep_gcns_torch: examples/ppi/architecture.py"
EXERCISES = "ResGraphBlock returning (x, edge_index), [0] on the tuple, concat of all blocks"


class DeepGCNv2(torch.nn.Module):
    def __init__(self, in_channels, n_classes, channels, n_blocks, act='relu', norm='batch',
                 bias=True, conv='gcn', heads=1, block='res', dropout=0.2):
        super().__init__()
        c_growth = 0
        self.n_blocks = n_blocks
        self.head = GraphConv(in_channels, channels, conv, act, norm, bias, heads)

        res_scale = 1 if block.lower() == 'res' else 0
        self.backbone = Seq(*[ResGraphBlock(channels, conv, act, norm, bias, heads, res_scale)
                              for _ in range(self.n_blocks - 1)])
        fusion_dims = int(channels * self.n_blocks
                          + c_growth * ((1 + self.n_blocks - 1) * (self.n_blocks - 1) / 2))
        self.fusion_block = MLP([fusion_dims, 128], act, None, bias)
        self.prediction = Seq(*[MLP([1 + fusion_dims, 64], act, norm, bias),
                                torch.nn.Dropout(p=dropout),
                                MLP([64, 32], act, norm, bias), torch.nn.Dropout(p=dropout),
                                MLP([32, n_classes], None, None, bias)])

    def forward(self, data):
        x, edge_index, batch = data.x, data.edge_index, data.batch
        feats = [self.head(x, edge_index)]
        for i in range(self.n_blocks - 1):
            feats.append(self.backbone[i](feats[-1], edge_index)[0])
        feats = torch.cat(feats, 1)
        fusion, _ = torch.max(self.fusion_block(feats), 1, keepdim=True)
        out = self.prediction(torch.cat((feats, fusion), 1))
        return out


def make_model(depth, width):
    return DeepGCNv2(in_channels=8, n_classes=4, channels=width, n_blocks=depth)


def make_inputs(dtype=torch.float32):
    x, edge_index, _ = node_graph(200, 800, in_channels=8, seed=7, dtype=dtype)
    return (Data(x=x, edge_index=edge_index),)
