"""The memory plan counts the edges of a sparse adjacency input (``adj_t``), not only of a
``[2, E]`` edge_index."""
import pytest
import torch
import torch_geometric.nn as pyg
from torch import nn

from gsr_compiler import gsr_compile

D = 16


class SparseAdjacencyGNN(nn.Module):
    def __init__(self, make_conv, depth=3):
        super().__init__()
        self.encoder = nn.Linear(5, D)
        self.convs = nn.ModuleList(make_conv() for _ in range(depth))
        self.decoder = nn.Linear(D, 2)

    def forward(self, x, adj_t):
        h = self.encoder(x)
        for conv in self.convs:
            h = h + conv(torch.relu(h), adj_t)
        return self.decoder(h)


def random_adjacency(num_nodes, num_edges, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.unique(torch.randint(0, num_nodes, (2, num_edges), generator=g), dim=1)
    adj_t = torch.sparse_coo_tensor(edge_index.flip(0), torch.ones(edge_index.shape[1]),
                                    (num_nodes, num_nodes)).coalesce()
    adj_t = adj_t.to_sparse_csr() if layout == "csr" else adj_t
    return edge_index, adj_t


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_plan_counts_the_edges_of_a_sparse_adjacency(layout):
    torch.manual_seed(0)
    model = SparseAdjacencyGNN(lambda: pyg.SAGEConv(D, D))
    x = torch.randn(60, 5)
    edge_index, adj_t = random_adjacency(60, 300, layout)
    gsr = gsr_compile(model, example_inputs=(x, adj_t))
    num_edges = edge_index.shape[1]
    assert gsr.liveness.num_edges == num_edges
    assert f"N=60, E={num_edges})" in gsr.explain()
    gsr(x, adj_t).sum().backward()  # and it trains


def test_fused_sparse_aggregation_builds_no_messages_but_gat_does():
    """SAGE over a sparse adjacency runs a sparse matrix product (no [E, C] messages): its plan
    does not grow with E. GAT builds per-edge attention messages: its plan does."""
    x = torch.randn(60, 5)
    _, adj_t = random_adjacency(60, 300, "coo")
    torch.manual_seed(0)
    sage = gsr_compile(SparseAdjacencyGNN(lambda: pyg.SAGEConv(D, D)), example_inputs=(x, adj_t))
    assert sage.memory_plan(num_edges=10_000).total_bytes == \
        sage.memory_plan(num_edges=100).total_bytes
    torch.manual_seed(0)
    gat = gsr_compile(SparseAdjacencyGNN(lambda: pyg.GATConv(D, D // 2, heads=2)),
                      example_inputs=(x, adj_t))
    assert gat.memory_plan(num_edges=10_000).total_bytes > \
        gat.memory_plan(num_edges=100).total_bytes
