"""Layers that read edge features inside a converted chain, and layers the width rewrite must
refuse by their exact class.

Edge features stay at their own width; every group's copy of a layer projects them to the
group's width with its own projection (docs/compiler.md, "Edge features").
"""
import pytest
import torch
import torch_geometric.nn as pyg
from torch import nn
from torch_geometric.nn import MessagePassing

from gsr_compiler import GSRCompileError, gsr_compile
from gsr_compiler.reference import verify_gradients
from gsr_compiler.runtime.reversible import ReversibleChain

D = 8
EDGE_IN = 3  # width of the raw edge features


class EdgeModel(nn.Module):
    """encoder -> depth x ``h = h + conv(relu(norm(h)), edge_index, e)`` -> decoder, where
    ``e`` is the raw edge features or an edge encoder's output (``edge_width``)."""

    def __init__(self, make_conv, depth=3, edge_width=None):
        super().__init__()
        self.node_encoder = nn.Linear(5, D)
        self.edge_encoder = None if edge_width is None else nn.Linear(EDGE_IN, edge_width)
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(depth))
        self.convs = nn.ModuleList(make_conv() for _ in range(depth))
        self.head = nn.Linear(D, 2)

    def forward(self, x, edge_index, edge_attr):
        h = self.node_encoder(x)
        e = edge_attr if self.edge_encoder is None else self.edge_encoder(edge_attr)
        for norm, conv in zip(self.norms, self.convs):
            h = h + conv(torch.relu(norm(h)), edge_index, e)
        return self.head(h)


def random_graph(num_nodes=11, num_edges=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_nodes, 5, generator=g, dtype=torch.float64)
    edge_index = torch.randint(0, num_nodes, (2, num_edges), generator=g)
    edge_attr = torch.randn(num_edges, EDGE_IN, generator=g, dtype=torch.float64)
    return x, edge_index, edge_attr


def mlp():
    return nn.Sequential(nn.Linear(D, 2 * D), nn.ReLU(), nn.Linear(2 * D, D))


# name -> (layer factory, width of the edge features the layers receive (None: raw))
CASES = {
    # GENConv without edge_dim adds edge features of the node width as they are.
    "gen_edge_width_D": (lambda: pyg.GENConv(D, D, norm="layer"), D),
    # With edge_dim it projects them first: raw width 3 is not divisible by groups.
    "gen_edge_dim_raw": (lambda: pyg.GENConv(D, D, edge_dim=EDGE_IN, learn_t=True), None),
    "gen_edge_dim_encoded": (lambda: pyg.GENConv(D, D, edge_dim=6, bias=True, msg_norm=True), 6),
    # edge_dim equal to the group width: the copies still get a projection of their own.
    "gen_edge_dim_group_width": (lambda: pyg.GENConv(D, D, edge_dim=D // 2), D // 2),
    "gen_softmax_aggr_num_layers": (
        lambda: pyg.GENConv(D, D, aggr="powermean", learn_p=True, num_layers=3, norm="batch"), D),
    "gine_edge_width_D": (lambda: pyg.GINEConv(mlp(), train_eps=True), D),
    "gine_edge_dim": (lambda: pyg.GINEConv(mlp(), edge_dim=EDGE_IN), None),
    "gat_edge_dim": (lambda: pyg.GATConv(D, D // 2, heads=2, edge_dim=EDGE_IN), None),
    "gat_without_edge_dim": (lambda: pyg.GATConv(D, D // 2, heads=2), None),
    "gatv2_edge_dim": (lambda: pyg.GATv2Conv(D, D, heads=2, concat=False, edge_dim=5), 5),
}


def compile_case(name, groups=2):
    make_conv, edge_width = CASES[name]
    torch.manual_seed(0)
    model = EdgeModel(make_conv, edge_width=edge_width).double()
    inputs = random_graph()
    gsr = gsr_compile(model, groups=groups, strict=True, example_inputs=inputs)
    return model, gsr, inputs


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("name", sorted(CASES))
def test_edge_feature_layers_convert_and_match_store_everything(name, groups):
    model, gsr, inputs = compile_case(name, groups)
    chains = [m for m in gsr.graph_module.modules() if isinstance(m, ReversibleChain)]
    assert len(chains) == 1 and chains[0].depth == 3, gsr.explain()
    out = gsr(*inputs)
    assert out.shape == (inputs[0].shape[0], 2)
    check = verify_gradients(gsr.graph_module, list(inputs), tolerance=1e-9)
    assert check.output_error <= 1e-9, str(check)
    # GAT's att_dst gradient vanishes in theory (a softmax over each node's edges does not
    # see a per-node shift): round-off only, compared absolutely.
    off = {n: e for n, e in check.errors.items() if e[0] > 1e-9 and e[1] > 1e-13}
    assert not off, str(check)
    if name != "gat_without_edge_dim":  # which ignores edge features
        assert "input:2" in check.errors  # the edge features get their gradient too


def edge_projections(gsr):
    return [m for name, m in gsr.graph_module.named_modules()
            if name.startswith("gsr_chain") and name.endswith(("lin_edge", ".lin"))]


@pytest.mark.parametrize("name, edge_in", [("gen_edge_width_D", D), ("gen_edge_dim_raw", EDGE_IN),
                                           ("gen_edge_dim_group_width", D // 2),
                                           ("gine_edge_width_D", D)])
def test_each_group_projects_the_full_edge_features_to_its_width(name, edge_in):
    _, gsr, _ = compile_case(name, groups=2)
    projections = edge_projections(gsr)
    assert len(projections) == 3 * 2  # one per block and group
    assert {(p.in_channels, p.out_channels) for p in projections} == {(edge_in, D // 2)}
    assert len({id(p.weight) for p in projections}) == 6


def test_gen_without_edge_features_gets_no_edge_projection():
    class NoEdges(EdgeModel):
        def forward(self, x, edge_index, edge_attr):
            h = self.node_encoder(x)
            for norm, conv in zip(self.norms, self.convs):
                h = h + conv(torch.relu(norm(h)), edge_index)
            return self.head(h)

    torch.manual_seed(0)
    model = NoEdges(lambda: pyg.GENConv(D, D)).double()
    inputs = random_graph()
    gsr = gsr_compile(model, strict=True, example_inputs=inputs)
    assert edge_projections(gsr) == []
    check = verify_gradients(gsr.graph_module, list(inputs), tolerance=1e-9)
    assert check.ok, str(check)


# -- refused, by exact class -----------------------------------------------------------

class GENConv(MessagePassing):
    """A user's own layer that happens to share PyG's name (as some public models do)."""

    def __init__(self, channels):
        super().__init__(aggr="add")
        self.lin = nn.Linear(channels, channels)

    def forward(self, x, edge_index, edge_attr):
        return self.lin(self.propagate(edge_index, x=x, edge_attr=edge_attr))

    def message(self, x_j, edge_attr):
        return torch.relu(x_j + edge_attr)


class ScaledGENConv(pyg.GENConv):
    def forward(self, x, edge_index, edge_attr=None, size=None):
        return 0.5 * super().forward(x, edge_index, edge_attr, size)


def test_user_class_named_like_a_supported_layer_is_named_by_module_path():
    torch.manual_seed(0)
    model = EdgeModel(lambda: GENConv(D), edge_width=D).double()
    inputs = random_graph()
    with pytest.raises(GSRCompileError, match=rf"no width rule for {__name__}\.GENConv") as info:
        gsr_compile(model, coupling="grouped", example_inputs=inputs)
    assert "torch_geometric.nn.conv.gen_conv.GENConv" in str(info.value)
    # coupling='auto' runs it two-stream and says why grouped was impossible, by the same name
    gsr = gsr_compile(model, example_inputs=inputs)
    (chain,) = gsr.report.chains
    assert chain.coupling == "two-stream"
    assert f"no width rule for {__name__}.GENConv" in chain.coupling_reason


def test_subclass_of_a_supported_layer_is_refused_with_its_base_named():
    torch.manual_seed(0)
    model = EdgeModel(lambda: ScaledGENConv(D, D), edge_width=D).double()
    with pytest.raises(GSRCompileError) as info:
        gsr_compile(model, coupling="grouped", example_inputs=random_graph())
    assert f"{__name__}.ScaledGENConv" in str(info.value)
    assert "a subclass of torch_geometric.nn.conv.gen_conv.GENConv" in str(info.value)


def test_outside_feature_tensor_without_group_form_is_refused_at_compile_time():
    """A bipartite SAGEConv reading the model's input x0 next to the branch: x0 has the full
    width, and the narrowed layer could not read it. Grouped coupling refuses it when compiling,
    with a reason, instead of a shape error in the first forward."""

    class InitialResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(5, D)
            self.initial = nn.Linear(5, D)
            self.convs = nn.ModuleList(pyg.SAGEConv((D, D), D) for _ in range(2))
            self.head = nn.Linear(D, 2)

        def forward(self, x, edge_index, edge_attr):
            h, x0 = self.encoder(x), self.initial(x)
            for conv in self.convs:
                h = h + conv((torch.relu(h), x0), edge_index)
            return self.head(h)

    torch.manual_seed(0)
    model = InitialResidual().double()
    inputs = random_graph()
    with pytest.raises(GSRCompileError, match="reads argument 'x'.*from outside the branch"):
        gsr_compile(model, coupling="grouped", example_inputs=inputs)
    # coupling='auto': two-stream, which runs the layer at full width with x0 as a side input
    gsr = gsr_compile(model, example_inputs=inputs)
    (chain,) = gsr.report.chains
    assert chain.coupling == "two-stream" and "from outside the branch" in chain.coupling_reason
    gsr(*inputs).sum().backward()  # runs: no shape error in the first forward or backward
