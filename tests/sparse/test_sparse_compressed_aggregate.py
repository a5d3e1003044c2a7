"""compressed_aggregate == aggregation of c.to_dense(); and the message passing of PyG convs."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch_geometric.nn import GCNConv, GINConv, GraphConv, SAGEConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm

from gsr_compiler.runtime.sparse import compressed_aggregate, compressed_linear, group_topk_compress

from sparse_reference import reference_topk


def dense_aggregate(x, edge_index, num_nodes, reduce, edge_weight=None):
    """Written from the definition: loop over targets, reduce their incoming messages."""
    out = torch.zeros(num_nodes, x.shape[1], dtype=x.dtype)
    src, dst = edge_index
    for i in range(num_nodes):
        sel = (dst == i).nonzero().flatten()
        if sel.numel() == 0:
            continue
        msg = x[src[sel]]
        if edge_weight is not None:
            msg = msg * edge_weight[sel].unsqueeze(1)
        out[i] = {"sum": msg.sum(0), "mean": msg.mean(0), "max": msg.max(0).values}[reduce]
    return out


def random_graph(n_src, n_dst, e):
    # Include an isolated target (no in-edges) and a repeated edge.
    ei = torch.stack([torch.randint(0, n_src, (e,)), torch.randint(1, n_dst, (e,))])
    return torch.cat([ei, ei[:, :1]], 1)


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
@pytest.mark.parametrize("weighted", [False, True])
def test_forward_and_grads_match_dense(reduce, weighted):
    n, d, g, k = 30, 32, 8, 2
    ei = random_graph(n, n, 90)
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(ei.shape[1], dtype=torch.float64, requires_grad=True) if weighted else None
    up = torch.randn(n, d, dtype=torch.float64)

    out = compressed_aggregate(group_topk_compress(x, k, g), ei, n, reduce, w)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = w.detach().clone().requires_grad_() if weighted else None
    ref = dense_aggregate(x_ref * (reference_topk(x.detach(), k, g) != 0), ei, n, reduce, w_ref)
    torch.testing.assert_close(out, ref)
    assert torch.equal(out[0], torch.zeros(d, dtype=out.dtype))   # node 0 has no in-edges

    inputs, inputs_ref = [x] + ([w] if weighted else []), [x_ref] + ([w_ref] if weighted else [])
    for a, b in zip(torch.autograd.grad(out, inputs, up), torch.autograd.grad(ref, inputs_ref, up)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_gradcheck(reduce):
    n, g, k = 8, 4, 2
    ei = random_graph(n, n, 20)
    x = torch.randn(n, 2 * g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(ei.shape[1], dtype=torch.float64, requires_grad=True) + 0.5

    def f(x, w):
        return compressed_aggregate(group_topk_compress(x, k, g), ei, n, reduce, w)
    assert gradcheck(f, (x, w))
    assert gradcheck(lambda x: compressed_aggregate(group_topk_compress(x, k, g), ei, n, reduce), (x,))


def test_bipartite_and_deterministic():
    x = torch.randn(50, 64)
    ei = random_graph(50, 20, 400)
    c = group_topk_compress(x, 1, 8)
    a = compressed_aggregate(c, ei, 20, "sum")
    torch.testing.assert_close(a, dense_aggregate(c.to_dense(), ei, 20, "sum"))
    assert all(torch.equal(a, compressed_aggregate(c, ei, 20, "sum")) for _ in range(3))


def test_chunked_edges_match(monkeypatch):
    import gsr_compiler.runtime.sparse.aggregate as mod
    x = torch.randn(40, 32, dtype=torch.float64, requires_grad=True)
    ei, w = random_graph(40, 40, 200), torch.rand(201, dtype=torch.float64)
    for reduce in ("sum", "mean", "max"):
        full = compressed_aggregate(group_topk_compress(x, 2, 8), ei, 40, reduce, w)
        gfull = torch.autograd.grad(full.pow(2).sum(), x)[0]
        monkeypatch.setattr(mod, "_CHUNK_ELEMENTS", 16)  # 2 edges per step
        part = compressed_aggregate(group_topk_compress(x, 2, 8), ei, 40, reduce, w)
        gpart = torch.autograd.grad(part.pow(2).sum(), x)[0]
        monkeypatch.undo()
        torch.testing.assert_close(full, part)
        torch.testing.assert_close(gfull, gpart)


# PyG layers computed from the compressed input: forward and gradient w.r.t. x must match the
# layer applied to the dense top-k output.
N, D, G_SIZE, K = 40, 32, 8, 2


def _graph():
    return random_graph(N, N, 160)


def _check(conv, compressed_fn, edge_index, **kw):
    conv = conv.double()
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ref = conv(x_ref * (reference_topk(x.detach(), K, G_SIZE) != 0), edge_index, **kw)
    out = compressed_fn(group_topk_compress(x, K, G_SIZE))
    torch.testing.assert_close(out, ref)
    up = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, up)[0], torch.autograd.grad(ref, x_ref, up)[0])


def test_gcnconv():
    ei = _graph()
    conv = GCNConv(D, 16)
    torch.nn.init.normal_(conv.bias)
    ei_norm, w_norm = gcn_norm(ei, None, N, add_self_loops=True, dtype=torch.float64)

    def fn(c):
        return F.linear(compressed_aggregate(c, ei_norm, N, "sum", w_norm), conv.lin.weight) + conv.bias
    _check(conv, fn, ei)


def test_sageconv():
    ei = _graph()
    conv = SAGEConv(D, 16, aggr="mean")
    _check(conv, lambda c: conv.lin_l(compressed_aggregate(c, ei, N, "mean"))
           + compressed_linear(c, conv.lin_r.weight), ei)


@pytest.mark.parametrize("aggr", ["add", "mean", "max"])
def test_graphconv_weighted(aggr):
    ei = _graph()
    w = torch.rand(ei.shape[1], dtype=torch.float64)
    conv = GraphConv(D, 16, aggr=aggr)
    _check(conv, lambda c: conv.lin_rel(compressed_aggregate(c, ei, N, aggr, w))
           + compressed_linear(c, conv.lin_root.weight), ei, edge_weight=w)


def test_ginconv():
    ei = _graph()
    mlp = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    conv = GINConv(mlp, eps=0.3, train_eps=True)
    _check(conv, lambda c: conv.nn((1 + conv.eps) * c.to_dense() + compressed_aggregate(c, ei, N, "sum")),
           ei)


def test_bad_input():
    c = group_topk_compress(torch.randn(5, 16), 2, 8)
    ei = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="reduce must be one of"):
        compressed_aggregate(c, ei, 5, "min")
    with pytest.raises(ValueError, match=r"\[2, E\]"):
        compressed_aggregate(c, ei.t().reshape(4, 1), 5)
    with pytest.raises(ValueError, match=r"source indices must lie in \[0, 5\)"):
        compressed_aggregate(c, torch.tensor([[0, 5], [1, 2]]), 5)
    with pytest.raises(ValueError, match=r"target indices must lie in \[0, 3\)"):
        compressed_aggregate(c, torch.tensor([[0, 1], [1, 3]]), 3)
    with pytest.raises(ValueError, match=r"edge_weight must be \[E\]=\[2\]"):
        compressed_aggregate(c, ei, 5, edge_weight=torch.ones(3))
    with pytest.raises(TypeError, match="CompressedActivation"):
        compressed_aggregate(c.to_dense(), ei, 5)


@pytest.mark.parametrize("layer", ["sage", "gcn"])
def test_linear_first_layers_move_edges_in_chunks(layer, monkeypatch):
    """The compressed layers that apply their linear map first propagate its dense output over
    the edges in chunks (no [E, D] tensor); with many chunks they still equal the PyG layer."""
    import gsr_compiler.runtime.sparse.aggregate as aggregate
    import gsr_compiler.runtime.sparse.conv as mod

    monkeypatch.setattr(aggregate, "_DENSE_CHUNK_ELEMENTS", 48)  # 3 edges of width 16 per chunk
    ei = _graph()
    conv = SAGEConv(D, 16, aggr="mean") if layer == "sage" else GCNConv(D, 16)
    if layer == "gcn":
        torch.nn.init.normal_(conv.bias)
    compressed = (mod.CompressedSAGEConv if layer == "sage" else mod.CompressedGCNConv)(conv)
    assert compressed._linear_first(None)
    _check(conv, lambda c: compressed(c, ei), ei)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("aggr,bias", [("mean", True), ("sum", True), ("mean", False)])
def test_compressed_sageconv_matches_pyg_with_parameter_gradients(dtype, aggr, bias):
    """CompressedSAGEConv (linear first, root weight): forward, input gradient and every
    parameter gradient equal PyG's SAGEConv on the dense top-k output."""
    from gsr_compiler.runtime.sparse.conv import CompressedSAGEConv

    torch.manual_seed(3)
    ei = _graph()
    conv = SAGEConv(D, 16, aggr=aggr, bias=bias).to(dtype)
    compressed = CompressedSAGEConv(conv)
    assert compressed._linear_first(None) and compressed.root_weight
    x = torch.randn(N, D, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(N, 16, dtype=dtype)
    params = [p for p in conv.parameters()]
    assert len(params) == (3 if bias else 2)

    ref = conv(group_topk_compress(x, K, G_SIZE).to_dense(), ei)
    ref_grads = torch.autograd.grad(ref, [x, *params], grad_out)
    out = compressed(group_topk_compress(x, K, G_SIZE), ei)
    grads = torch.autograd.grad(out, [x, *params], grad_out)

    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out, ref, **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol)
    assert grads[0].abs().sum() > 0 and all(g.abs().sum() > 0 for g in grads[1:])
