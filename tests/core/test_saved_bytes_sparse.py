"""saved_bytes_of_step counts what autograd saves of torch sparse tensors (they have no
storage of their own): their index and value tensors, each storage once."""
import torch
import torch_geometric.nn as pyg
from torch import nn

from gsr_compiler.memory import saved_bytes_of_step


KEPT = []


class SavesAdjacency(torch.autograd.Function):
    """Doubles ``h`` and saves a copy of ``adj`` (twice) for backward: what autograd keeps is
    that copy (the input itself the caller holds either way, and is not counted)."""

    @staticmethod
    def forward(ctx, h, adj):
        copy = adj.clone()
        KEPT.append(copy)
        ctx.save_for_backward(copy, copy)
        return h * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2, None


class Model(nn.Module):
    def forward(self, x, adj):
        return SavesAdjacency.apply(x, adj)


class _SavesInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, adj):
        ctx.save_for_backward(adj)
        return h * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2, None


class KeepsInput(nn.Module):
    def forward(self, x, adj):
        return _SavesInput.apply(x, adj)


def sparse_graph(num_nodes=40, num_edges=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, num_nodes, (2, num_edges), generator=g)
    values = torch.rand(num_edges, generator=g)
    coo = torch.sparse_coo_tensor(edge_index, values, (num_nodes, num_nodes)).coalesce()
    return coo


def test_sparse_tensors_count_their_indices_and_values_once():
    coo = sparse_graph()
    x = torch.randn(40, 8, requires_grad=True)
    for adj in (coo, coo.to_sparse_csr(), coo.to_sparse_csc()):
        KEPT.clear()
        total = saved_bytes_of_step(Model(), (x, adj), loss_fn=lambda out, _: out.sum())
        (kept,) = KEPT
        if kept.layout == torch.sparse_coo:
            parts = (kept.indices(), kept.values())
        elif kept.layout == torch.sparse_csr:
            parts = (kept.crow_indices(), kept.col_indices(), kept.values())
        else:
            parts = (kept.ccol_indices(), kept.row_indices(), kept.values())
        expected = sum(p.untyped_storage().nbytes() for p in parts)
        assert total == expected > 0
    # the input itself is the caller's: keeping it costs nothing
    assert saved_bytes_of_step(KeepsInput(), (x, coo), loss_fn=lambda out, _: out.sum()) == 0


def test_gcn2conv_with_a_sparse_csr_adjacency():
    torch.manual_seed(0)
    adj_t = sparse_graph().to_sparse_csr()
    conv = pyg.GCN2Conv(8, alpha=0.1, theta=0.5, layer=1, normalize=False)
    x = torch.randn(40, 8, requires_grad=True)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x, adj_t):
            return x + self.conv(x, x, adj_t)

    assert saved_bytes_of_step(Block(), (x, adj_t)) > 0
