"""Models as people write them: untraceable pieces become graph breaks, conditions on
requires_grad and shapes are decided at trace time (with guards), the user's checkpoints and
existing reversible modules are kept. Each model is small, float64, on a random graph."""
import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch_geometric.nn import (DeepGCNLayer, EGConv, GENConv, GINConv, GPSConv, GroupAddRev,
                                MemPooling, SAGEConv)

from gsr_compiler import GSRConfig, gsr_compile
from gsr_compiler.errors import GSRCompileError
from gsr_compiler.memory import saved_bytes_of_step
from gsr_compiler.reference import verify_gradients

WIDTH, NODES, EDGES = 16, 40, 120
HERE = os.path.basename(__file__)


def random_graph(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(NODES, WIDTH, generator=g, dtype=torch.float64)
    edge_index = torch.randint(0, NODES, (2, EDGES), generator=g)
    return x, edge_index


def eager_and_compiled_agree(model, inputs, **options):
    """Runs one step of the model and of its compilation; returns the compiled model after
    checking that outputs and every parameter gradient match (the model is unchanged)."""
    gsr = gsr_compile(model, **options)
    outputs = []
    for m in (model, gsr):
        model.zero_grad()  # unconverted: both run the model's own parameters
        out = m(*inputs)
        out.square().sum().backward()
        outputs.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.grad is not None}))
    (out_e, grads_e), (out_c, grads_c) = outputs
    torch.testing.assert_close(out_c, out_e, rtol=1e-12, atol=1e-12)
    assert grads_e.keys() == grads_c.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-12, atol=1e-12)
    return gsr


def exact_against_store_everything(gsr, inputs):
    check = verify_gradients(gsr.graph_module, list(inputs), None, 1e-9)
    assert check.ok, str(check)


# -- 1. DeepGCNLayer(..., ckpt_grad=True) branches on h.requires_grad ------------------------

class DeeperGCN(nn.Module):
    """The DeeperGCN of PyG's ogbn_proteins example, in small: res+ layers that checkpoint
    their conv when the input requires grad."""

    def __init__(self, depth=3, dropout=0.1):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            conv = GENConv(WIDTH, WIDTH, aggr="softmax", t=1.0, learn_t=True, num_layers=2,
                           norm="layer")
            self.layers.append(DeepGCNLayer(conv, nn.LayerNorm(WIDTH), nn.ReLU(), block="res+",
                                            dropout=dropout, ckpt_grad=True))
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x, edge_index):
        x = self.layers[0].conv(x, edge_index)
        for layer in self.layers[1:]:
            x = layer(x, edge_index)
        x = self.layers[0].act(self.layers[0].norm(x))
        return self.head(x)


def test_requires_grad_branch_is_decided_at_trace_time_and_converts():
    torch.manual_seed(0)
    model = DeeperGCN().double()
    x, edge_index = random_graph()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    report = gsr.report
    assert report.chains and report.chains[0].depth == 2
    text = gsr.explain()
    assert "now part of a reversible chain" in text
    exact_against_store_everything(gsr, (x, edge_index))


def test_unconverted_deepgcn_keeps_its_checkpoints_and_equals_eager():
    torch.manual_seed(0)
    model = DeeperGCN(dropout=0.0).double()
    inputs = random_graph()
    gsr = eager_and_compiled_agree(model, inputs, min_chain_blocks=10)
    assert gsr.explain().count("kept checkpointed") == 2
    assert saved_bytes_of_step(gsr, inputs) <= saved_bytes_of_step(model, inputs)
    model.eval(), gsr.eval()
    with torch.no_grad():
        torch.testing.assert_close(gsr(*inputs), model(*inputs), rtol=1e-12, atol=1e-12)


def test_requires_grad_guard_retraces_when_grad_mode_changes():
    torch.manual_seed(0)
    model = DeeperGCN().double()
    x, edge_index = random_graph()
    gsr = gsr_compile(model)
    gsr(x, edge_index)
    with torch.no_grad():  # h.requires_grad is now False: the other branch, another trace
        gsr(x, edge_index)
    assert len(gsr._graphs) == 2
    gsr(x, edge_index)  # back to the first: no third trace
    assert len(gsr._graphs) == 2
    guards = [g for gs in gsr._guards.values() for g in gs]
    assert any("requires_grad" in g.description for g in guards)


def test_model_with_guards_pickles():
    torch.manual_seed(0)
    model = DeeperGCN().double()
    x, edge_index = random_graph()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    buffer = io.BytesIO()
    torch.save(gsr, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded.eval(), gsr.eval()
    torch.testing.assert_close(loaded(x, edge_index), gsr(x, edge_index))


# -- 2. untraceable pieces are graph breaks, the rest compiles --------------------------------

class AtomEncoder(nn.Module):
    """OGB's AtomEncoder, in small: one embedding per feature column, a loop over columns."""

    def __init__(self, columns=4, vocabulary=5):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(vocabulary, WIDTH) for _ in range(columns))

    def forward(self, atoms):
        out = 0
        for i in range(atoms.shape[1]):
            out = out + self.embeddings[i](atoms[:, i])
        return out


class TopNodes(nn.Module):
    """Data-dependent Python control flow: how many rows it keeps depends on the values."""

    def forward(self, h):
        keep = int((h[:, 0] > 0).sum())  # a value, not a shape: cannot be traced
        return torch.cat([h[:keep] * 2.0, h[keep:]])


class TrunkWithPieces(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.encoder = AtomEncoder()
        self.odd = TopNodes()
        self.convs = nn.ModuleList(SAGEConv(WIDTH, WIDTH) for _ in range(depth))
        self.head = nn.Linear(WIDTH, 2)

    def forward(self, atoms, edge_index):
        h = self.odd(self.encoder(atoms))
        for conv in self.convs:
            h = h + F.relu(conv(h, edge_index))
        return self.head(h)


def atoms_of(columns, seed=1):
    return torch.randint(0, 5, (NODES, columns), generator=torch.Generator().manual_seed(seed))


def test_untraceable_submodule_is_a_graph_break_and_the_chain_still_converts():
    torch.manual_seed(0)
    model = TrunkWithPieces().double()
    atoms, (_, edge_index) = atoms_of(4), random_graph()
    gsr = gsr_compile(model, example_inputs=(atoms, edge_index))
    report = gsr.report
    assert report.chains and report.chains[0].depth == 3
    breaks = {leaf.module: leaf for leaf in report.leaves}
    assert list(breaks) == ["odd"] and breaks["odd"].kind == "graph break"
    assert HERE in breaks["odd"].where and "int((h[:, 0] > 0).sum())" in breaks["odd"].where
    text = gsr.explain()
    assert "'odd' (TopNodes), graph break" in text and "depends on tensor values" in text
    exact_against_store_everything(gsr, (atoms, edge_index))


def test_loop_over_an_input_shape_is_unrolled_with_a_guard():
    torch.manual_seed(0)
    model = TrunkWithPieces().double()
    edge_index = random_graph()[1]
    gsr = gsr_compile(model)
    gsr(atoms_of(4), edge_index)
    assert not any(leaf.module == "encoder" for leaf in gsr.report.leaves)
    gsr(atoms_of(3), edge_index)  # atoms.shape[1] changed: traced again, for 3 columns
    assert len(gsr._graphs) == 2
    embeddings = [n.target for n in gsr.graph_module.graph.nodes
                  if n.op == "call_module" and n.target.startswith("encoder")]
    assert embeddings == ["encoder.embeddings.0", "encoder.embeddings.1", "encoder.embeddings.2"]


def test_graph_breaks_leave_an_unconverted_model_exactly_as_eager():
    torch.manual_seed(0)
    model = TrunkWithPieces().double()
    atoms, (_, edge_index) = atoms_of(4), random_graph()
    # min_chain_blocks above the depth: nothing converts, so the compiled model is the model
    eager_and_compiled_agree(model, (atoms, edge_index), min_chain_blocks=10)


class GraphTransformerAndPool(nn.Module):
    """PyG modules that are not MessagePassing: GPSConv, MemPooling (which does not trace)."""

    def __init__(self, depth=3):
        super().__init__()
        gin = GINConv(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH)))
        self.gps = GPSConv(WIDTH, gin, heads=2)
        self.convs = nn.ModuleList(SAGEConv(WIDTH, WIDTH) for _ in range(depth))
        self.pool = MemPooling(WIDTH, WIDTH, heads=2, num_clusters=3)

    def forward(self, x, edge_index, batch):
        x = self.gps(x, edge_index, batch)
        for conv in self.convs:
            x = x + F.relu(conv(x, edge_index))
        x, _ = self.pool(x, batch)
        return x


def test_pyg_modules_that_do_not_trace_are_graph_breaks():
    torch.manual_seed(0)
    model = GraphTransformerAndPool().double().eval()  # eval: no dropout inside GPSConv
    x, edge_index = random_graph()
    batch = torch.zeros(NODES, dtype=torch.long)
    gsr = gsr_compile(model, example_inputs=(x, edge_index, batch))
    # GPSConv traces (its to_dense_batch is one node, called as written); MemPooling does not
    assert sorted(leaf.module for leaf in gsr.report.leaves) == ["pool"]
    assert any(c.depth == 3 for c in gsr.report.chains)
    with torch.no_grad():
        assert gsr(x, edge_index, batch).shape == model(x, edge_index, batch).shape


def test_leaf_modules_by_type_and_by_name():
    torch.manual_seed(0)
    model = TrunkWithPieces().double()
    atoms, (_, edge_index) = atoms_of(4), random_graph()
    gsr = gsr_compile(model, leaf_modules=[AtomEncoder, "convs.1"],
                      example_inputs=(atoms, edge_index))
    kinds = {leaf.module: leaf.kind for leaf in gsr.report.leaves}
    assert kinds == {"encoder": "leaf_modules", "odd": "graph break",
                     "convs.1": "leaf_modules"}
    assert "named in GSRConfig.leaf_modules" in gsr.explain()


def test_leaf_modules_naming_a_missing_module_is_a_clear_error():
    model = TrunkWithPieces().double()
    atoms, (_, edge_index) = atoms_of(4), random_graph()
    with pytest.raises(GSRCompileError, match=r"'encodr', which is not a submodule.*encoder"):
        gsr_compile(model, leaf_modules=["encodr"], example_inputs=(atoms, edge_index))
    with pytest.raises(GSRCompileError, match="nn.Module subclass or a qualified module name"):
        GSRConfig(leaf_modules=[3])


def test_untraceable_code_in_the_model_forward_itself_says_where():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = SAGEConv(WIDTH, WIDTH)

        def forward(self, x, edge_index):
            if x.sum() > 0:  # the model's own forward cannot be a leaf
                x = x * 2
            return x + self.conv(x, edge_index)

    with pytest.raises(GSRCompileError, match=r"(?s)x.sum\(\) > 0.*move it into a submodule"):
        gsr_compile(Root().double(), example_inputs=random_graph())


# -- 3. the user's checkpoints stay ------------------------------------------------------------

class CheckpointedEGC(nn.Module):
    """Residual EGConv blocks, each checkpointed by the user (EGConv has no width rule)."""

    def __init__(self, depth=3):
        super().__init__()
        self.convs = nn.ModuleList(EGConv(WIDTH, WIDTH, num_heads=2, num_bases=2)
                                   for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(WIDTH) for _ in range(depth))

    def forward(self, x, edge_index):
        for conv, norm in zip(self.convs, self.norms):
            x = x + checkpoint(conv, F.relu(norm(x)), edge_index, use_reentrant=False)
        return x


def test_checkpoint_that_is_not_converted_stays_checkpointed():
    torch.manual_seed(0)
    model = CheckpointedEGC().double()
    inputs = random_graph()
    # EGConv has no width rule: coupling='auto' makes the chain two-stream; below the
    # shortest chain length nothing converts and the checkpoints must stay
    assert gsr_compile(model, example_inputs=inputs).report.chains[0].coupling == "two-stream"
    gsr = eager_and_compiled_agree(model, inputs, min_chain_blocks=10)
    eager = saved_bytes_of_step(model, inputs)
    compiled = saved_bytes_of_step(gsr, inputs)
    assert compiled <= eager, (compiled, eager)
    assert not gsr.report.chains
    text = gsr.explain()
    assert text.count("kept checkpointed") == 3 and HERE in text


class CheckpointedSAGE(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.convs = nn.ModuleList(SAGEConv(WIDTH, WIDTH) for _ in range(depth))

    def forward(self, x, edge_index):
        for conv in self.convs:
            x = x + F.relu(checkpoint(conv, x, edge_index, use_reentrant=False))
        return x


def test_checkpointed_block_that_converts_becomes_reversible():
    torch.manual_seed(0)
    model = CheckpointedSAGE().double()
    inputs = random_graph()
    gsr = gsr_compile(model, example_inputs=inputs)
    assert gsr.report.chains and gsr.report.chains[0].depth == 3
    assert gsr.explain().count("now part of a reversible chain") == 3
    assert not any(n.target is checkpoint for n in gsr.graph_module.graph.nodes)
    exact_against_store_everything(gsr, inputs)
    assert saved_bytes_of_step(gsr, inputs) <= saved_bytes_of_step(model, inputs)


class CheckpointedFunctions(nn.Module):
    """Residual blocks checkpointed as a closure (not a module): it reads the layers, the
    model's training flag and ``edge_index`` from the enclosing scope."""

    def __init__(self, depth=3, conv=lambda: EGConv(WIDTH, WIDTH, num_heads=2, num_bases=2),
                 dropout=0.0):
        super().__init__()
        self.convs = nn.ModuleList(conv() for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(WIDTH) for _ in range(depth))
        self.dropout = dropout

    def forward(self, x, edge_index):
        for conv, norm in zip(self.convs, self.norms):
            # the layers bound now: the recompute in eager's backward calls block again
            def block(h, conv=conv, norm=norm):
                return conv(F.dropout(F.relu(norm(h)), self.dropout, self.training), edge_index)
            x = x + checkpoint(block, x, use_reentrant=False)
        return x


def test_checkpointed_function_that_is_not_converted_stays_checkpointed():
    torch.manual_seed(0)
    model = CheckpointedFunctions().double()
    inputs = random_graph()
    gsr = eager_and_compiled_agree(model, inputs, min_chain_blocks=10)
    assert not gsr.report.chains
    calls = [n for n in gsr.graph_module.graph.nodes if n.target is checkpoint]
    assert len(calls) == 3  # one checkpoint per block, as written
    assert saved_bytes_of_step(gsr, inputs) <= saved_bytes_of_step(model, inputs)
    text = gsr.explain()
    assert text.count("kept checkpointed") == 3 and "forward.<locals>.block" in text
    assert "NOT kept" not in text
    assert set(k.removeprefix("compiled.") for k in gsr.state_dict()) == set(model.state_dict())


def test_checkpointed_function_with_dropout_replays_eager_masks_in_train_and_eval():
    torch.manual_seed(0)
    model = CheckpointedFunctions(dropout=0.3).double()
    inputs = random_graph()
    gsr = gsr_compile(model, min_chain_blocks=10)
    for train in (True, False, True):
        model.train(train), gsr.train(train)
        grads = []
        for m in (model, gsr):
            model.zero_grad()
            torch.manual_seed(5)
            out = m(*inputs)
            out.square().sum().backward()
            grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        (out_e, g_e), (out_c, g_c) = grads
        assert torch.equal(out_c, out_e)
        for a, b in zip(g_c, g_e):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_checkpointed_function_blocks_that_convert_become_reversible():
    torch.manual_seed(0)
    model = CheckpointedFunctions(depth=8, conv=lambda: SAGEConv(WIDTH, WIDTH)).double()
    inputs = random_graph()
    gsr = gsr_compile(model, example_inputs=inputs)
    assert gsr.report.chains and gsr.report.chains[0].depth == 8
    assert gsr.explain().count("now part of a reversible chain") == 8
    assert not any(n.target is checkpoint for n in gsr.graph_module.graph.nodes)
    exact_against_store_everything(gsr, inputs)
    assert saved_bytes_of_step(gsr, inputs) <= saved_bytes_of_step(model, inputs)


# -- 5. an already reversible model is left as it is -------------------------------------------

class RevGNN(nn.Module):
    """PyG's rev_gnn example, in small: GroupAddRev blocks between two linear maps."""

    def __init__(self, depth=3, groups=2):
        super().__init__()
        self.lin_in = nn.Linear(WIDTH, WIDTH)
        self.blocks = nn.ModuleList()
        for _ in range(depth):  # GroupAddRev calls each group's branch with (x, edge_index)
            self.blocks.append(GroupAddRev(_NormConv(WIDTH // groups), num_groups=groups))
        self.lin_out = nn.Linear(WIDTH, 3)

    def forward(self, x, edge_index):
        x = self.lin_in(x)
        for block in self.blocks:
            x = block(x, edge_index)
        return self.lin_out(F.relu(x))


class _NormConv(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.conv = SAGEConv(width, width)

    def forward(self, x, edge_index):
        return self.conv(F.relu(self.norm(x)), edge_index)


def test_group_add_rev_is_kept_whole_with_a_reason():
    torch.manual_seed(0)
    model = RevGNN().double()
    inputs = random_graph()
    gsr = eager_and_compiled_agree(model, inputs)
    kinds = {leaf.module: leaf.kind for leaf in gsr.report.leaves}
    assert kinds == {f"blocks.{i}": "already reversible" for i in range(3)}
    assert "already reversible" in gsr.explain()
    assert inputs[0].untyped_storage().nbytes() > 0  # compiling did not free the caller's x
