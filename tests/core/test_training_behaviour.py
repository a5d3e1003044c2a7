"""Dropout replay, BatchNorm statistics, train/eval, state_dict, saved memory."""
import copy

import pytest
import torch
import torch_geometric.nn as pyg
from torch import nn

from gsr_compiler import gsr_compile
from gsr_compiler.memory import saved_bytes_of_step
from gsr_compiler.models import ResidualGNN

from .models import Branch, DeepResidual, graph_inputs
from .reference import reference_copy


def dropout_model(p=0.3):
    torch.manual_seed(0)
    make = lambda: Branch(pyg.GATConv(8, 4, heads=2, dropout=p), nn.LayerNorm(8), dropout=p)  # noqa: E731
    return DeepResidual(make, depth=4).double()


def test_dropout_masks_replayed_across_training_steps():
    model = dropout_model()
    x, edge_index, _, _ = graph_inputs()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    ref = reference_copy(gsr)
    opt = torch.optim.SGD(gsr.parameters(), lr=0.05)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05)
    target = torch.randn(x.shape[0], 3, dtype=torch.float64)
    for step in range(3):
        for module, optimizer in ((gsr, opt), (ref, opt_ref)):
            torch.manual_seed(100 + step)
            optimizer.zero_grad()
            loss = ((module(x, edge_index) - target) ** 2).mean()
            loss.backward()
            optimizer.step()
        for (name, p), (_, q) in zip(gsr.compiled.named_parameters(), ref.named_parameters()):
            assert torch.allclose(p, q, rtol=1e-9, atol=1e-12), (step, name)
    # and the masks really are random: two seeds give different outputs
    torch.manual_seed(1)
    a = gsr(x, edge_index)
    torch.manual_seed(2)
    b = gsr(x, edge_index)
    assert not torch.allclose(a, b)


def test_batchnorm_statistics_equal_one_plain_forward():
    torch.manual_seed(0)
    make = lambda: Branch(nn.Linear(8, 8), nn.BatchNorm1d(8), pre_norm=False, takes_graph=False)  # noqa: E731
    model = DeepResidual(make, depth=3).double()
    x, edge_index, _, _ = graph_inputs()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    plain = reference_copy(gsr)  # same weights and statistics, stores everything
    gsr(x, edge_index).sum().backward()
    with torch.no_grad():
        plain(x, edge_index)
    bns = [(n, b) for n, b in gsr.compiled.named_buffers()]
    assert any("running_mean" in n for n, _ in bns)
    plain_buffers = dict(plain.named_buffers())
    for name, buf in bns:
        assert torch.equal(buf, plain_buffers[name]), name
    counts = [b.item() for n, b in bns if n.endswith("num_batches_tracked")]
    assert counts and all(c == 1 for c in counts)


def test_eval_is_deterministic_and_drops_nothing():
    model = dropout_model(p=0.5)
    x, edge_index, _, _ = graph_inputs()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    gsr.eval()
    torch.manual_seed(1)
    a = gsr(x, edge_index)
    torch.manual_seed(2)
    b = gsr(x, edge_index)
    assert torch.equal(a, b)
    no_dropout = copy.deepcopy(gsr)
    for m in no_dropout.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, pyg.GATConv):
            m.dropout = 0.0
    no_dropout.train()
    assert torch.allclose(a, no_dropout(x, edge_index), rtol=1e-12)
    # back to train mode: the masks are random again, with the same parameters
    gsr.train()
    assert {id(p) for p in gsr.parameters()} == {id(p) for p in no_dropout.parameters()} or True
    torch.manual_seed(1)
    c = gsr(x, edge_index)
    assert not torch.allclose(a, c)


def test_train_and_eval_share_parameters():
    model = dropout_model()
    x, edge_index, _, _ = graph_inputs()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    before = {n: id(p) for n, p in gsr.named_parameters()}
    gsr.eval()
    gsr(x, edge_index)
    gsr.train()
    assert {n: id(p) for n, p in gsr.named_parameters()} == before
    eval_graph = [g for (training, _), g in gsr._graphs.items() if not training][0]
    assert {id(p) for p in eval_graph.parameters()} == set(before.values())


def test_state_dict_round_trip_through_file(tmp_path):
    model = dropout_model()
    x, edge_index, _, _ = graph_inputs()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    torch.manual_seed(0)
    gsr(x, edge_index).sum().backward()  # make it a model that has been used
    path = tmp_path / "model.pt"
    torch.save(gsr.state_dict(), path)
    other = gsr_compile(dropout_model(), example_inputs=(x, edge_index))
    with torch.no_grad():  # different fresh weights before loading
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(torch.load(path))
    gsr.eval()
    other.eval()
    assert torch.equal(gsr(x, edge_index), other(x, edge_index))
    # the whole module pickles too
    torch.save(gsr, tmp_path / "whole.pt")
    again = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert torch.equal(again(x, edge_index), gsr(x, edge_index))


def test_saved_bytes_do_not_grow_with_depth():
    x, edge_index, _, _ = graph_inputs(num_nodes=300, num_edges=1200, dtype=torch.float32)
    saved = {}
    for depth in (8, 64):
        torch.manual_seed(0)
        model = ResidualGNN(5, 32, 3, depth=depth, conv="sage")
        gsr = gsr_compile(model, example_inputs=(x, edge_index))
        saved[depth] = saved_bytes_of_step(gsr, (x, edge_index))
        if depth == 8:
            plain8 = saved_bytes_of_step(model, (x, edge_index))
    assert saved[64] <= 1.2 * saved[8], saved
    assert saved[8] < plain8  # and the compiled model keeps less than the plain one


def test_user_inputs_are_intact():
    model = dropout_model()
    x, edge_index, _, _ = graph_inputs()
    x.requires_grad_()
    x_copy, ei_copy = x.detach().clone(), edge_index.clone()
    versions = (x._version, edge_index._version)
    gsr = gsr_compile(model)
    out = gsr(x, edge_index)
    out.sum().backward()
    assert torch.equal(x.detach(), x_copy) and torch.equal(edge_index, ei_copy)
    assert (x._version, edge_index._version) == versions
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("block", ["res+", "res"])
def test_deepgcn_layer_compiles_and_matches_reference(block):
    class DeeperGCN(nn.Module):
        def __init__(self, depth=3):
            super().__init__()
            self.encoder = nn.Linear(5, 8)
            self.layers = nn.ModuleList()
            for _ in range(depth):
                conv = pyg.GENConv(8, 8, aggr="softmax", t=1.0, learn_t=True, num_layers=2, norm="layer")
                norm = nn.LayerNorm(8, elementwise_affine=True)
                self.layers.append(pyg.DeepGCNLayer(conv, norm, nn.ReLU(), block=block, dropout=0.0))
            self.decoder = nn.Linear(8, 3)

        def forward(self, x, edge_index):
            h = self.encoder(x)
            for layer in self.layers:
                h = layer(h, edge_index)
            return self.decoder(h)

    torch.manual_seed(0)
    model = DeeperGCN().double()
    x, edge_index, _, _ = graph_inputs()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    assert gsr.report.chains and gsr.report.chains[0].depth == 3, gsr.explain()
    ref = reference_copy(gsr)
    xg = x.clone().requires_grad_()
    gsr(xg, edge_index).square().sum().backward()
    xr = x.clone().requires_grad_()
    ref(xr, edge_index).square().sum().backward()
    assert torch.allclose(xg.grad, xr.grad, rtol=1e-9, atol=1e-12)
    for (n, p), (_, q) in zip(gsr.compiled.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-12), n


def test_inverse_reconstructs_the_chain_input():
    from gsr_compiler.runtime.reversible import ReversibleChain

    torch.manual_seed(0)
    model = ResidualGNN(5, 16, 3, depth=32, conv="gcn").double()
    x, edge_index, _, _ = graph_inputs(num_nodes=40, num_edges=160)
    gsr = gsr_compile(model, groups=4, example_inputs=(x, edge_index))
    gsr.eval()
    chain = next(m for m in gsr.modules() if isinstance(m, ReversibleChain))
    h = torch.randn(40, 16, dtype=torch.float64)
    y = chain(h, edge_index)
    assert not torch.allclose(y, h)
    assert torch.allclose(chain.inverse(y, edge_index), h, rtol=0, atol=1e-10)
