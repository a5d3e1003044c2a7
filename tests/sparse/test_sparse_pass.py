"""The GroupSparseActivation pass: ReLU -> group top-k inside reversible branches, consumers reading
the compressed form, explain() lines, errors, and what a branch's recompute keeps."""
import functools
import io
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch_geometric.nn as pyg
from torch import nn

import gsr_compiler.api as api
from gsr_compiler import GSRConfig, gsr_compile
from gsr_compiler.errors import GSRCompileError
from gsr_compiler.passes.group_sparse_activation import GroupSparseActivation
from gsr_compiler.runtime.reversible import ReversibleChain
from gsr_compiler.runtime.sparse import (CompressedDropout, CompressedGCNConv, CompressedGINConv,
                                         CompressedGraphConv, CompressedLinear, CompressedSAGEConv,
                                         GroupTopK, GroupTopKCompress, compression_ratio, group_topk,
                                         group_topk_compress)

from sparse_reference import SavedTensorLog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the core model zoo
from core.models import D, Branch, DeepResidual, graph_inputs  # noqa: E402
from core.reference import reference_copy  # noqa: E402

mlp = lambda d=D: nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))  # noqa: E731

# name -> (make_branch, the compressed module the branch's consumer becomes)
CONSUMERS = {
    "sage": (lambda: Branch(pyg.SAGEConv(D, D), nn.LayerNorm(D), dropout=0.3), CompressedSAGEConv),
    "sage_max": (lambda: Branch(pyg.SAGEConv(D, D, aggr="max", normalize=True), nn.LayerNorm(D)),
                 CompressedSAGEConv),
    "gcn": (lambda: Branch(pyg.GCNConv(D, D), nn.LayerNorm(D), dropout=0.3), CompressedGCNConv),
    "graphconv": (lambda: Branch(pyg.GraphConv(D, D, aggr="mean"), nn.LayerNorm(D)), CompressedGraphConv),
    "gin": (lambda: Branch(pyg.GINConv(mlp(), train_eps=True), nn.LayerNorm(D), dropout=0.3),
            CompressedGINConv),
    "linear": (lambda: Branch(nn.Linear(D, D), nn.LayerNorm(D), dropout=0.3, takes_graph=False),
               CompressedLinear),
}


def branches(gsr):
    return [f for m in gsr.graph_module.modules() if isinstance(m, ReversibleChain)
            for block in m.blocks for f in block]


def count(gsr, kind):
    return sum(isinstance(m, kind) for f in branches(gsr) for m in f.modules())


def build(make_branch, seed=0, depth=3, **options):
    torch.manual_seed(seed)
    model = DeepResidual(make_branch, depth=depth).double()
    inputs = graph_inputs()
    return model, gsr_compile(model, strict=True, example_inputs=inputs, **options), inputs


def run_step(module, inputs, seed, weight):
    x = inputs[0].detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = module(x, *inputs[1:])
    (out * weight).sum().backward()
    grads = {"x": x.grad}
    for name, p in module.named_parameters():
        grads[name.removeprefix("compiled.")] = p.grad
    return out.detach(), grads


def assert_close_rel(a, b, what, tol=1e-9):
    assert a is not None and b is not None, what
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-4)).item()
    assert err < tol, f"{what}: relative error {err:.3g}"


def assert_same_step(a, b, inputs, tol=1e-9):
    weight = torch.randn(inputs[0].shape[0], 3, dtype=torch.float64)
    out_a, grads_a = run_step(a, inputs, seed=1, weight=weight)
    out_b, grads_b = run_step(b, inputs, seed=1, weight=weight)
    assert_close_rel(out_a, out_b, "forward", tol)
    assert grads_a.keys() == grads_b.keys()
    for key in grads_a:
        assert_close_rel(grads_a[key], grads_b[key], f"grad {key}", tol)


# -- forward and every gradient equal a store-everything reference -----------------------------

@pytest.mark.parametrize("name", sorted(CONSUMERS))
def test_compiled_sparse_model_matches_store_everything_reference(name):
    make_branch, compressed_type = CONSUMERS[name]
    _, gsr, inputs = build(make_branch, sparse_k=2)
    # every branch reads the compressed form; nothing dense is formed for it
    assert count(gsr, GroupTopKCompress) == 6 and count(gsr, compressed_type) == 6, gsr.explain()
    assert count(gsr, GroupTopK) == 0
    if name in WITH_DROPOUT:  # folded into the top-k: drops kept values, replayed in backward
        assert count(gsr, CompressedDropout) == 0
        assert [m.dropout for f in branches(gsr) for m in f.modules()
                if isinstance(m, GroupTopKCompress)] == [0.3] * 6
    assert_same_step(gsr, reference_copy(gsr), inputs)


@pytest.mark.parametrize("groups,sparse_group,k", [(4, None, 1), (2, 2, 1)])
def test_reference_with_more_groups_and_narrower_topk_groups(groups, sparse_group, k):
    _, gsr, inputs = build(CONSUMERS["sage"][0], groups=groups, sparse_k=k, sparse_group=sparse_group)
    topk = next(m for f in branches(gsr) for m in f.modules() if isinstance(m, GroupTopKCompress))
    assert (topk.k, topk.group) == (k, sparse_group or D // groups)
    assert_same_step(gsr, reference_copy(gsr), inputs)


def test_gradcheck_compiled_sparse_model():
    torch.manual_seed(0)
    model = DeepResidual(CONSUMERS["gin"][0], depth=2).double()
    x, edge_index, _, _ = graph_inputs(num_nodes=6, num_edges=14)
    gsr = gsr_compile(model, sparse_k=2, example_inputs=(x, edge_index)).eval()  # no dropout
    assert count(gsr, CompressedGINConv) == 4
    x = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: gsr(t, edge_index), (x,), eps=1e-6, atol=1e-7)


class WeightedBranch(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.norm, self.conv = nn.LayerNorm(D), conv

    def forward(self, h, edge_index, edge_weight):
        return self.conv(F.relu(self.norm(h)), edge_index, edge_weight)


class WeightedModel(nn.Module):
    def __init__(self, make_conv, depth=2):
        super().__init__()
        self.encoder = nn.Linear(5, D)
        self.blocks = nn.ModuleList(WeightedBranch(make_conv()) for _ in range(depth))
        self.decoder = nn.Linear(D, 3)

    def forward(self, x, edge_index, edge_weight):
        h = self.encoder(x)
        for block in self.blocks:
            h = h + block(h, edge_index, edge_weight)
        return self.decoder(h)


@pytest.mark.parametrize("make_conv,compressed_type", [
    (lambda: pyg.GraphConv(D, D, aggr="add"), CompressedGraphConv),
    (lambda: pyg.GCNConv(D, D), CompressedGCNConv),
])
def test_gradcheck_through_edge_weights(make_conv, compressed_type):
    torch.manual_seed(0)
    model = WeightedModel(make_conv).double()
    x, edge_index, _, _ = graph_inputs(num_nodes=6, num_edges=14)
    # gcn_norm keeps one of several self-loop weights of a node (PyG picks one): no self loops here
    edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    w = torch.rand(edge_index.shape[1], dtype=torch.float64) + 0.5
    gsr = gsr_compile(model, sparse_k=1, example_inputs=(x, edge_index, w))
    assert count(gsr, compressed_type) == 4, gsr.explain()
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: gsr(a, edge_index, b), (x, w), eps=1e-6, atol=1e-7)


# -- the compressed consumers compute what the dense path computes ------------------------------

def dense_only(monkeypatch):
    monkeypatch.setattr(api, "GroupSparseActivation",
                        functools.partial(GroupSparseActivation, compressed_consumers=False))


WITH_DROPOUT = {"sage", "gcn", "gin", "linear"}


@pytest.mark.parametrize("name", sorted(CONSUMERS))
def test_compressed_path_equals_dense_path(name, monkeypatch):
    make_branch, compressed_type = CONSUMERS[name]
    _, plain, _ = build(make_branch)                       # no sparse_k
    _, sparse, inputs = build(make_branch, sparse_k=2)
    dense_only(monkeypatch)
    _, dense, _ = build(make_branch, seed=1, sparse_k=2)   # other weights, then loaded
    assert count(dense, GroupTopK) == 6 and count(dense, compressed_type) == 0
    # consumers share the layer's parameters under the same names
    assert list(sparse.state_dict()) == list(dense.state_dict()) == list(plain.state_dict())
    dense.load_state_dict(sparse.state_dict())
    # dropout draws its mask over the kept values, not the dense tensor: equal only in eval mode
    for mode in ("eval",) if name in WITH_DROPOUT else ("train", "eval"):
        getattr(sparse, mode)(), getattr(dense, mode)()
        assert_same_step(sparse, dense, inputs)


@pytest.mark.parametrize("name", ["gcn_weighted", "gcn_t2s", "sage_mean", "sage_sum_norm", "sage_max_norm",
                                  "sage_sum_no_root", "graph_add_w", "graph_mean_w", "graph_max", "gin", "linear", "pyg_linear"])
def test_compressed_layers_equal_pyg_on_dense_topk(name):
    torch.manual_seed(0)
    n, d, g, k = 10, 8, 4, 2
    layers = {
        "gcn_weighted": (pyg.GCNConv(d, 6), CompressedGCNConv, True),
        "gcn_t2s": (pyg.GCNConv(d, 6, flow="target_to_source"), CompressedGCNConv, False),
        "sage_mean": (pyg.SAGEConv(d, 6), CompressedSAGEConv, False),
        "sage_sum_norm": (pyg.SAGEConv(d, 6, aggr="sum", normalize=True), CompressedSAGEConv, False),
        "sage_max_norm": (pyg.SAGEConv(d, 6, aggr="max", normalize=True), CompressedSAGEConv, False),
        "sage_sum_no_root": (pyg.SAGEConv(d, 6, aggr="sum", root_weight=False), CompressedSAGEConv, False),
        "graph_add_w": (pyg.GraphConv(d, 6), CompressedGraphConv, True),
        "graph_mean_w": (pyg.GraphConv(d, 6, aggr="mean"), CompressedGraphConv, True),
        "graph_max": (pyg.GraphConv(d, 6, aggr="max"), CompressedGraphConv, False),
        "gin": (pyg.GINConv(mlp(d), eps=0.3, train_eps=True), CompressedGINConv, False),
        "linear": (nn.Linear(d, 6), CompressedLinear, None),
        "pyg_linear": (pyg.Linear(d, 6), CompressedLinear, None),
    }
    layer, compressed_type, weighted = layers[name]
    layer = layer.double()
    compressed = compressed_type(layer)
    assert list(compressed.state_dict()) == list(layer.state_dict())
    assert all(a is b for a, b in zip(compressed.parameters(), layer.parameters()))
    x = torch.randn(n, d, dtype=torch.float64)
    edge_index = torch.randint(0, n, (2, 30))
    w = torch.rand(30, dtype=torch.float64) + 0.5
    graph = () if weighted is None else (edge_index, w) if weighted else (edge_index,)

    def step(fn):
        xi = x.clone().requires_grad_()
        wi = w.clone().requires_grad_()
        args = tuple(wi if a is w else a for a in graph)
        out = fn(xi, *args)
        layer.zero_grad()
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return [out, xi.grad, wi.grad if weighted else None] + [p.grad.clone() for p in layer.parameters()]

    dense = step(lambda t, *a: layer(group_topk(t, k, g), *a))
    comp = step(lambda t, *a: compressed(group_topk_compress(t, k, g), *a))
    for i, (a, b) in enumerate(zip(comp, dense)):
        if b is None:
            assert a is None
        else:
            assert_close_rel(a, b, f"{name} output/grad #{i}", tol=1e-12)


class DropoutAndLinearReaders(nn.Module):
    """``lin_a(dropout(a)) + lin_b(a)``, ``a = relu(h)``: the ReLU has a reader besides the
    dropout, which therefore cannot be folded into the top-k."""

    def __init__(self):
        super().__init__()
        self.lin_a, self.lin_b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, h, edge_index, edge_attr=None, batch=None):
        a = F.relu(h)
        return self.lin_a(F.dropout(a, p=0.4, training=self.training)) + self.lin_b(a)


def test_dropout_is_folded_only_when_it_alone_reads_the_relu():
    _, gsr, inputs = build(DropoutAndLinearReaders, sparse_k=2)
    topks = [m for f in branches(gsr) for m in f.modules() if isinstance(m, GroupTopKCompress)]
    assert len(topks) == 6 and all(m.dropout == 0.0 for m in topks)
    assert count(gsr, CompressedDropout) == 6 and count(gsr, CompressedLinear) == 12
    assert "dropout folded" not in gsr.explain()
    assert_same_step(gsr, reference_copy(gsr), inputs)

    _, folded, _ = build(CONSUMERS["linear"][0], sparse_k=2)
    topks = [m for f in branches(folded) for m in f.modules() if isinstance(m, GroupTopKCompress)]
    # F.dropout(training=self.training) follows train()/eval(), folded or not
    assert {m.active_dropout() for m in topks} == {0.3}
    folded.eval()
    assert {m.active_dropout() for m in topks} == {0.0}


# -- explain() --------------------------------------------------------------------------------

def test_explain_lists_replaced_consumed_dense_and_skipped():
    _, gsr, _ = build(CONSUMERS["sage"][0])
    assert "GroupSparseActivation" not in gsr.explain() and count(gsr, GroupTopK) == 0  # off by default
    _, gsr, _ = build(CONSUMERS["sage"][0], sparse_k=2)
    text = gsr.explain()
    ratio = compression_ratio(4, 2, 4, torch.float64)
    assert "GroupSparseActivation:" in text
    assert f"6 ReLU -> group top-k, k=2 of g=4 (width 4 float64 x6: {ratio:.1f}x fewer bytes kept)" in text
    assert "dropout folded into the top-k x6: it drops kept values only" in text
    assert "compressed input read by SAGEConv x6\n" in text

    # a consumer without compressed form: dense top-k just for it; GELU is not ReLU
    gat = lambda: Branch(pyg.GATConv(D, D // 2, heads=2), nn.LayerNorm(D))  # noqa: E731
    _, gsr, _ = build(gat, sparse_k=1)
    assert count(gsr, GroupTopK) == 6 and count(gsr, GroupTopKCompress) == 0
    assert "dense top-k formed for GATConv x6: no compressed form for GATConv" in gsr.explain()

    class GeluBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.conv = nn.Linear(D, D), pyg.GINConv(mlp())

        def forward(self, h, edge_index, edge_attr=None, batch=None):
            return self.conv(F.gelu(self.lin(h)), edge_index)

    _, gsr, _ = build(GeluBranch, sparse_k=1)
    text = gsr.explain()
    assert count(gsr, GroupTopK) + count(gsr, GroupTopKCompress) == 0
    assert "not replaced: GELU x6: not ReLU" in text
    assert "not replaced: ReLU inside GINConv x6: inside a layer the trace keeps whole" in text


class TwoReaders(nn.Module):  # relu(x) feeds a Linear and a sigmoid
    def __init__(self):
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, h, edge_index, edge_attr=None, batch=None):
        a = torch.relu(self.norm(h))
        return self.lin(a) * torch.sigmoid(a)


def test_mixed_consumers_read_compressed_and_dense_and_retrace_keeps_rewrite():
    _, gsr, inputs = build(TwoReaders, sparse_k=2)
    assert count(gsr, GroupTopKCompress) == 6 and count(gsr, CompressedLinear) == 6
    assert "to_dense" in branches(gsr)[0].code
    assert "dense top-k formed for sigmoid x6: no compressed form for this op" in gsr.explain()
    assert "not replaced: Sigmoid x6: not ReLU" in gsr.explain()
    assert_same_step(gsr, reference_copy(gsr), inputs)
    gsr.eval()
    gsr(*inputs)  # retraced in eval mode: same chain module, not rewritten twice
    assert count(gsr, GroupTopKCompress) == 6 and "6 ReLU -> group top-k" in gsr.explain()

    buffer = io.BytesIO()
    torch.save(gsr, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(*inputs), gsr(*inputs))
    loaded._graphs.clear()  # a fresh trace of the loaded model reuses its pickled, rewritten chains
    assert torch.equal(loaded(*inputs), gsr(*inputs))
    assert count(loaded, GroupTopKCompress) == 6 and "6 ReLU -> group top-k" in loaded.explain()


# -- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("options,message", [
    ({"sparse_k": 0}, "sparse_k=0: must be a positive integer"),
    ({"sparse_k": 2.0}, "sparse_k=2.0: must be a positive integer"),
    ({"sparse_k": True}, "sparse_k=True"),
    ({"sparse_k": 2, "sparse_group": 0}, "sparse_group=0"),
    ({"sparse_group": 4}, "sparse_k is None"),
    ({"sparse_k": 5, "sparse_group": 4}, "sparse_k=5 must be in 1..sparse_group=4"),
])
def test_bad_options_are_refused_at_once(options, message):
    with pytest.raises(GSRCompileError, match=message):
        GSRConfig(**options)
    with pytest.raises(GSRCompileError, match=message):
        gsr_compile(nn.Linear(2, 2), **options)


@pytest.mark.parametrize("options,message", [
    ({"sparse_k": 5}, r"sparse_k=5 must be in 1\.\.g=4, g = sparse_group \(default: the width of one "
                      r"reversible group\)"),
    ({"sparse_k": 1, "sparse_group": 3}, r"sparse_group=3 does not divide the width of one reversible "
                                         r"group .* \(8 channels / groups=2 = 4\); choose sparse_group "
                                         r"among \[1, 2, 4\]"),
    ({"sparse_k": 1, "sparse_group": 8}, "sparse_group=8 does not divide"),
])
def test_bad_widths_are_refused_before_any_branch_changes(options, message):
    torch.manual_seed(0)
    model = DeepResidual(CONSUMERS["sage"][0]).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = graph_inputs()
    gsr = gsr_compile(model, **options)  # lazy: compiles on the first call
    with pytest.raises(GSRCompileError, match=message):
        gsr(*inputs)
    assert not gsr.is_compiled
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for chain in gsr._registry.values():  # built by the reversible rewrite, left untouched
        assert not any(isinstance(m, (GroupTopK, GroupTopKCompress)) for m in chain.modules())
    with pytest.raises(GSRCompileError, match=message):
        gsr_compile(model, example_inputs=inputs, **options)


# -- what the backward recompute of one block keeps -------------------------------------------

@pytest.mark.parametrize("conv", ["sage", "gcn"])
def test_branch_recompute_keeps_fewer_bytes_with_sparse_k(conv):
    width, groups, n = 64, 2, 256
    make_conv = {"sage": lambda: pyg.SAGEConv(width, width), "gcn": lambda: pyg.GCNConv(width, width)}[conv]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.conv = nn.LayerNorm(width), make_conv()

        def forward(self, h, edge_index):
            return self.conv(F.relu(self.norm(h)), edge_index)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(2))

        def forward(self, x, edge_index):
            for b in self.blocks:
                x = x + b(x, edge_index)
            return x

    x = torch.randn(n, width)
    edge_index = torch.randint(0, n, (2, 4 * n))
    kept = {}
    for k in (None, 4):  # g = 32, k = g/8
        torch.manual_seed(0)
        gsr = gsr_compile(Model(), groups=groups, sparse_k=k, example_inputs=(x, edge_index))
        f = branches(gsr)[0]
        h = torch.randn(n, width // groups, requires_grad=True)
        log = SavedTensorLog(exclude=(h, edge_index, *f.parameters()))
        with log.hooks():  # what the reversible backward's recompute of f keeps
            out = f(h, edge_index)
        out.sum().backward()
        kept[k] = log.nbytes
    activation = n * (width // groups) * 4  # one dense [N, D/G] float32 activation
    assert kept[4] <= kept[None] - activation + n * 4 * (4 + 1), kept
