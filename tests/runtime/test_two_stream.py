"""Two-stream chains (coupling="two-stream" / "auto"): the model's own layers at full width.

Each gradient test compares one compiled training step with the same architecture storing
everything (``store_everything``), in float64, where only rounding separates them."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import EGConv, GCN2Conv, GCNConv, MessagePassing

from gsr_compiler import GSRCompileError, GSRConfig, gsr_compile
from gsr_compiler.memory import saved_bytes_of_step
from gsr_compiler.reference import store_everything
from gsr_compiler.runtime.reversible import ReversibleChain
from gsr_compiler.runtime.two_stream import TwoStreamChain


class EdgeGate(MessagePassing):
    """A user layer PyG knows nothing about: gated mean of neighbour features."""

    def __init__(self, d):
        super().__init__(aggr="mean")
        self.lin = nn.Linear(d, d)
        self.gate = nn.Parameter(torch.randn(d))

    def forward(self, x, edge_index):
        return self.propagate(edge_index, x=self.lin(x))

    def message(self, x_j):
        return x_j * torch.sigmoid(self.gate)


class GCN2Net(nn.Module):
    """gcn2_cora.py's shape: x0 from the stem is a side input of every block."""

    def __init__(self, depth, d=16, dropout=0.2):
        super().__init__()
        self.stem = nn.Linear(6, d)
        self.convs = nn.ModuleList(GCN2Conv(d, alpha=0.1, theta=0.5, layer=i + 1)
                                   for i in range(depth))
        self.head = nn.Linear(d, 3)
        self.dropout = dropout

    def forward(self, x, edge_index):
        h = x0 = self.stem(x)
        for conv in self.convs:
            h = h + F.dropout(conv(h, x0, edge_index).relu(), self.dropout, self.training)
        return self.head(h)


class Blocks(nn.Module):
    """``h = h + drop(relu(norm(conv(h))))`` with a layer of the caller's choice."""

    def __init__(self, make, depth, d=16, norm=True, dropout=0.2):
        super().__init__()
        self.stem = nn.Linear(6, d)
        self.convs = nn.ModuleList(make(d) for _ in range(depth))
        self.norms = nn.ModuleList(nn.BatchNorm1d(d) if norm else nn.Identity()
                                   for _ in range(depth))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d, 3)

    def forward(self, x, edge_index):
        h = self.stem(x)
        for conv, norm in zip(self.convs, self.norms):
            h = h + self.drop(F.relu(norm(conv(h, edge_index))))
        return self.head(h)


def graph(n=40, e=120, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 6, generator=g, dtype=dtype),
            torch.randint(0, n, (2, e), generator=g))


def one_step(module, x, edge_index, seed=7):
    torch.manual_seed(seed)
    leaf = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(leaf, edge_index)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {n.removeprefix("compiled."): p.grad for n, p in module.named_parameters()}
    return out.detach(), leaf.grad, grads


def relative(a, b):
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def chain_of(gsr):
    return next(m for m in gsr.modules() if isinstance(m, ReversibleChain))


MODELS = {
    "gcn2-x0-odd": lambda: GCN2Net(5),
    "egconv-batchnorm": lambda: Blocks(lambda d: EGConv(d, d, num_heads=2, num_bases=2), 4),
    "user-messagepassing": lambda: Blocks(EdgeGate, 6, norm=False),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_equal_store_everything_float64(name):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    x, edge_index = graph()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    chain = chain_of(gsr)
    assert isinstance(chain, TwoStreamChain) and chain.coupling == "two-stream"
    ref = store_everything(gsr.graph_module)
    out, gx, grads = one_step(gsr, x, edge_index)
    ref_out, ref_gx, ref_grads = one_step(ref, x, edge_index)
    assert relative(out, ref_out) < 1e-12
    assert relative(gx, ref_gx) < 1e-9
    assert grads.keys() == ref_grads.keys()
    # the user's own parameters, under their own names
    assert set(grads) == {n for n, _ in model.named_parameters()}
    # A bias in front of BatchNorm has a gradient that is zero but for rounding (~1e-15):
    # such gradients are compared against the largest gradient instead of their own norm.
    scale = max(float(g.norm()) for g in ref_grads.values())
    for n in ref_grads:
        assert ref_grads[n] is not None and grads[n] is not None, n
        diff = float((grads[n] - ref_grads[n]).norm())
        assert diff <= 1e-9 * max(float(ref_grads[n].norm()), 1e-6 * scale), n
    # the reversible backward ran (and kept nothing more than the streams)
    assert chain.last_precision is not None


def test_dropout_replays_the_forward_masks():
    """Without replay the recompute draws other masks: gradients far off (the test can fail)."""
    torch.manual_seed(0)
    model = GCN2Net(4, dropout=0.5).double()
    x, edge_index = graph()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    ref = store_everything(gsr.graph_module)
    _, gx, _ = one_step(gsr, x, edge_index)
    _, ref_gx, _ = one_step(ref, x, edge_index)
    assert relative(gx, ref_gx) < 1e-9
    # break the replay: every branch call gets a fresh seed in the backward
    chain = chain_of(gsr)
    import gsr_compiler.runtime.reversible as rev
    real = rev.seeded
    try:
        rev.seeded = lambda seed, devices: real(None if seed is None else seed + 1, devices)
        _, broken, _ = one_step(gsr, x, edge_index)
    finally:
        rev.seeded = real
    assert relative(broken, ref_gx) > 1e-3
    assert chain.depth == 2  # 4 residual blocks -> 2 coupling blocks of two streams


def test_batchnorm_running_stats_updated_once():
    torch.manual_seed(0)
    model = Blocks(lambda d: GCNConv(d, d), 3).double()
    x, edge_index = graph()
    gsr = gsr_compile(model, example_inputs=(x, edge_index), coupling="two-stream")
    ref = store_everything(gsr.graph_module)
    one_step(gsr, x, edge_index)
    one_step(ref, x, edge_index)
    mine = dict(gsr.compiled.named_buffers())
    theirs = dict(ref.named_buffers())
    assert any("running_mean" in n for n in theirs)
    for n, t in theirs.items():
        if "num_batches_tracked" in n:
            assert int(mine[n]) == 1, n
        else:
            assert torch.allclose(mine[n], t, rtol=1e-12, atol=1e-14), n
    # and these are the user's BatchNorm layers, updated in place
    assert int(model.norms[0].num_batches_tracked) == 1


def test_plain_state_dict_loads_and_keys_are_the_users():
    torch.manual_seed(0)
    plain = GCN2Net(5).double()
    x, edge_index = graph()
    torch.manual_seed(1)
    fresh = GCN2Net(5).double()
    gsr = gsr_compile(fresh, example_inputs=(x, edge_index))
    keys = [k.removeprefix("compiled.") for k in gsr.state_dict()]
    assert sorted(keys) == sorted(plain.state_dict())
    result = gsr.compiled.load_state_dict(plain.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for n, p in plain.state_dict().items():
        assert torch.equal(gsr.compiled.state_dict()[n], p)
    # the chain runs the loaded weights: one and two blocks compute the plain model exactly
    for depth in (1, 2):
        torch.manual_seed(2)
        plain = GCN2Net(depth).double().eval()
        other = GCN2Net(depth).double().eval()
        gsr = gsr_compile(other, example_inputs=(x, edge_index))
        gsr.compiled.load_state_dict(plain.state_dict())
        gsr.eval()
        with torch.no_grad():
            assert torch.allclose(gsr(x, edge_index), plain(x, edge_index), rtol=1e-12,
                                  atol=1e-12)
    # from three blocks on it is another function (docs/runtime.md): not the plain output
    torch.manual_seed(2)
    plain = GCN2Net(3).double().eval()
    gsr = gsr_compile(GCN2Net(3).double(), example_inputs=(x, edge_index))
    gsr.compiled.load_state_dict(plain.state_dict())
    gsr.eval()
    with torch.no_grad():
        assert not torch.allclose(gsr(x, edge_index), plain(x, edge_index), rtol=1e-6)
    # round trip of the compiled model's own state_dict
    again = gsr_compile(GCN2Net(3).double(), example_inputs=(x, edge_index))
    again.load_state_dict(gsr.state_dict())
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(x, edge_index), gsr(x, edge_index))
    # and of the whole compiled model through torch.save
    buffer = io.BytesIO()
    torch.save(gsr, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert list(loaded.state_dict()) == list(gsr.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(x, edge_index), gsr(x, edge_index))
    # a checkpoint missing a user key is still reported, under the user's key only
    partial = {k: v for k, v in plain.state_dict().items() if k != "convs.1.weight1"}
    result = gsr.compiled.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["convs.1.weight1"]


def test_grouped_names_the_layer_without_width_rule():
    x, edge_index = graph()
    with pytest.raises(GSRCompileError) as info:
        gsr_compile(GCN2Net(3).double(), example_inputs=(x, edge_index), coupling="grouped")
    message = str(info.value)
    assert "convs.0" in message and "GCN2Conv" in message and "coupling='two-stream'" in message
    with pytest.raises(GSRCompileError, match="coupling="):
        GSRConfig(coupling="twostream")


def test_auto_picks_grouped_where_every_layer_has_a_width_rule():
    x, edge_index = graph()
    torch.manual_seed(0)
    with_rule = gsr_compile(Blocks(lambda d: GCNConv(d, d), 3).double(),
                            example_inputs=(x, edge_index))
    chain = chain_of(with_rule)
    assert type(chain) is ReversibleChain and chain.coupling == "grouped"
    without = gsr_compile(Blocks(EdgeGate, 3).double(), example_inputs=(x, edge_index))
    assert isinstance(chain_of(without), TwoStreamChain)
    text = without.explain()
    assert "two-stream coupling" in text
    assert f"no width rule for {EdgeGate.__module__}.EdgeGate" in text  # named by module path
    assert "grouped coupling: width 16 = 2 groups x 8" in with_rule.explain()
    node = next(n for n in without.graph_module.graph.nodes
                if n.op == "call_module" and n.target.startswith("gsr_chain"))
    assert node.meta["gsr_coupling"]["coupling"] == "two-stream"
    # asked for: two-stream even where grouped would work
    forced = gsr_compile(Blocks(lambda d: GCNConv(d, d), 3).double(),
                         example_inputs=(x, edge_index), coupling="two-stream")
    assert isinstance(chain_of(forced), TwoStreamChain)


def test_eval_mode_and_retrace_share_the_layers():
    torch.manual_seed(0)
    model = GCN2Net(3).double()
    x, edge_index = graph()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    gsr.eval()
    with torch.no_grad():
        first = gsr(x, edge_index)
        second = gsr(x, edge_index)  # no dropout in eval
    assert torch.equal(first, second)
    assert len({id(m) for m in gsr.modules() if isinstance(m, TwoStreamChain)}) == 1


def test_saved_memory_of_16_blocks_is_far_below_eager():
    torch.manual_seed(0)
    model = GCN2Net(16, d=32, dropout=0.1)
    x, edge_index = graph(n=500, e=2000, dtype=torch.float32)
    eager = saved_bytes_of_step(model, (x, edge_index))
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    assert isinstance(chain_of(gsr), TwoStreamChain)
    compiled = saved_bytes_of_step(gsr, (x, edge_index))
    assert compiled * 4 < eager, (compiled, eager)


def test_float32_at_256_blocks_matches_store_everything():
    """At 256 blocks the rebuilt inputs differ from the forward's by rounding that grows with
    depth; the guard (replay, anchors) keeps the gradients within the chain's drift tolerance,
    1e-3 relative, the same bound tests/core/test_exactness_at_depth.py holds grouped chains to."""
    x, edge_index = graph(n=300, e=900, dtype=torch.float32, seed=3)
    torch.manual_seed(0)
    model = Blocks(lambda d: GCNConv(d, d), 256, norm=False, dropout=0.1)
    for conv in model.convs:  # small branches, as a trained deep model has
        conv.lin.weight.data.mul_(0.3)
    gsr = gsr_compile(model, example_inputs=(x, edge_index), coupling="two-stream")
    ref = store_everything(gsr.graph_module)
    out, gx, grads = one_step(gsr, x, edge_index)
    ref_out, ref_gx, ref_grads = one_step(ref, x, edge_index)
    assert relative(out, ref_out) < 1e-6
    assert relative(gx, ref_gx) < 1e-3
    worst = max(relative(grads[n], ref_grads[n]) for n in ref_grads)
    assert worst < 1e-3, worst
