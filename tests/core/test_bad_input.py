"""Clear errors, raised before anything is modified."""
import pytest
import torch
from torch import nn

from gsr_compiler import GSRCompileError, gsr_compile
from gsr_compiler.models import ResidualGNN

from .models import graph_inputs


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 8)

    def forward(self, x, edge_index):
        h = self.lin(x)
        if h.sum() > 0:  # the line the error must name
            h = h + self.lin2(h)
        return h


def test_untraceable_model_names_the_source_line():
    x, edge_index, _, _ = graph_inputs()
    gsr = gsr_compile(DataDependent())
    with pytest.raises(GSRCompileError) as info:
        gsr(x, edge_index)
    message = str(info.value)
    assert __file__ in message
    assert "if h.sum() > 0:" in message


class NoResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x, edge_index):
        return self.b(torch.relu(self.a(x)))


def test_model_without_residual_chain_runs_unchanged():
    model = NoResidual().double()
    x, edge_index, _, _ = graph_inputs()
    gsr = gsr_compile(model)
    assert torch.equal(gsr(x, edge_index), model(x, edge_index))
    assert "no residual" in gsr.explain()
    with pytest.raises(GSRCompileError, match="strict=True"):
        gsr_compile(model, strict=True)(x, edge_index)


class Unsupported(nn.Module):
    """A residual block using a layer type without a width rule."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 8)
        self.conv = nn.Conv1d(8, 8, 1)
        self.dec = nn.Linear(8, 3)

    def forward(self, x, edge_index):
        h = self.enc(x)
        h = h + self.conv(h.unsqueeze(-1)).squeeze(-1)
        return self.dec(h)


def test_unsupported_layer_runs_as_written_by_default_or_named_in_grouped_error():
    model = Unsupported().double()
    x, edge_index, _, _ = graph_inputs()
    gsr = gsr_compile(model)  # coupling="auto": the model's own layer
    # one block: recomputed, the residual block itself
    assert torch.equal(gsr(x, edge_index), model(x, edge_index))
    text = gsr.explain()
    assert "recomputed in the backward" in text
    assert "no width rule for torch.nn.modules.conv.Conv1d" in text
    gsr = gsr_compile(model, coupling="two-stream")
    # one block: the two-stream chain computes the residual block itself
    assert torch.equal(gsr(x, edge_index), model(x, edge_index))
    assert "two-stream coupling" in gsr.explain()
    with pytest.raises(GSRCompileError) as info:
        gsr_compile(model, coupling="grouped")(x, edge_index)
    message = str(info.value)
    assert "'conv'" in message and "Conv1d" in message and "coupling='two-stream'" in message
    assert "SAGEConv" in message  # the supported list


@pytest.mark.parametrize("groups", [1, 0, -2, 2.0])
def test_bad_groups_rejected_at_once(groups):
    with pytest.raises(GSRCompileError, match="groups"):
        gsr_compile(ResidualGNN(5, 8, 3, depth=2), groups=groups)


def test_unknown_option_named():
    with pytest.raises(GSRCompileError, match="grups"):
        gsr_compile(ResidualGNN(5, 8, 3, depth=2), grups=2)


def test_width_not_divisible_by_groups_leaves_everything_untouched():
    torch.manual_seed(0)
    model = ResidualGNN(5, 10, 3, depth=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, edge_index, _, _ = graph_inputs(dtype=torch.float32)
    x_before = x.clone()
    gsr = gsr_compile(model, groups=4, coupling="grouped")
    with pytest.raises(GSRCompileError, match="width 10.*groups=4"):
        gsr(x, edge_index)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(x, x_before)
    assert not gsr.is_compiled


def test_optimizer_before_first_call_is_a_clear_error():
    gsr = gsr_compile(ResidualGNN(5, 8, 3, depth=2))
    with pytest.raises(GSRCompileError, match="example_inputs"):
        torch.optim.Adam(gsr.parameters())


def test_object_argument_rejected_but_a_data_is_traced():
    from torch_geometric.data import Data

    class TakesData(nn.Module):
        def forward(self, data):
            return data.x

    class Graph:  # not a PyG Data: nothing says which of its attributes are inputs
        def __init__(self, x):
            self.x = x

    x, edge_index, _, _ = graph_inputs()
    with pytest.raises(GSRCompileError, match="argument 'data' is a Graph"):
        gsr_compile(TakesData())(Graph(x))
    assert torch.equal(gsr_compile(TakesData())(Data(x=x, edge_index=edge_index)), x)


# -- inputs the model cannot run on: the error names the layer and the cause -------------

def _deep_model():
    torch.manual_seed(0)
    return ResidualGNN(5, 8, 3, depth=4)


def _compile_error(model, *inputs) -> GSRCompileError:
    """The error of compiling ``model`` on ``inputs``, checked to leave everything untouched."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gsr = gsr_compile(model)
    with pytest.raises(GSRCompileError) as info:
        gsr(*inputs)
    assert not gsr.is_compiled
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert "tlparse" not in str(info.value) and "ShapeProp" not in str(info.value)
    return info.value


def test_wrong_input_width_names_the_layer_its_error_and_in_features():
    x, edge_index, _, _ = graph_inputs(in_channels=7, dtype=torch.float32)
    error = _compile_error(_deep_model(), x, edge_index)
    first = str(error).splitlines()[0]
    assert "ResidualGNN fails on these inputs even without gsr_compile" in first
    assert "'encoder' (Linear)" in first
    assert "mat1 and mat2 shapes cannot be multiplied (12x7 and 5x8)" in first
    assert "in_features=5" in str(error) and "7 features" in str(error)
    # the layer's own error, one step down, for those who want its traceback
    assert isinstance(error.__cause__, RuntimeError) and "12x7 and 5x8" in str(error.__cause__)


def test_failing_block_named_by_its_module_path():
    from torch_geometric.nn import SAGEConv

    model = _deep_model()
    model.blocks[3].conv = SAGEConv(6, 8)  # built for the wrong width
    x, edge_index, _, _ = graph_inputs(dtype=torch.float32)
    error = _compile_error(model, x, edge_index)
    first = str(error).splitlines()[0]
    assert "'blocks.3.conv' (SAGEConv)" in first
    assert "(12x8 and 6x8)" in first
    assert "in_channels=6" in str(error)


def test_transposed_edge_index_rejected_before_running(monkeypatch):
    import gsr_compiler.api

    def not_run(*args, **kwargs):
        raise AssertionError("the graph ran")

    x, edge_index, _, _ = graph_inputs(dtype=torch.float32)
    model = _deep_model()
    monkeypatch.setattr(gsr_compiler.api, "PropagateShapes", not_run)
    error = _compile_error(model, x, edge_index.t())
    first = str(error).splitlines()[0]
    assert "'edge_index' has shape [40, 2]" in first and "[2, E]" in first
    assert "edge_index.t()" in first


def test_float_edge_index_rejected_before_running():
    x, edge_index, _, _ = graph_inputs(dtype=torch.float32)
    error = _compile_error(_deep_model(), x, edge_index.float())
    first = str(error).splitlines()[0]
    assert "'edge_index' is float32" in first and "edge_index.long()" in first


def test_out_of_range_edge_index_hint_gives_the_bad_index_and_node_count():
    x, edge_index, _, _ = graph_inputs(dtype=torch.float32)
    edge_index = edge_index.clone()
    edge_index[0, 3] = 12  # one past the last of 12 nodes
    error = _compile_error(_deep_model(), x, edge_index)
    first = str(error).splitlines()[0]
    assert "'blocks.0.conv' (SAGEConv)" in first and "larger than 11 (got 12)" in first
    assert "values in [0, N); it holds 12, but the layer gets N = 12 nodes" in str(error)


@pytest.mark.parametrize("dtype, fix", [(torch.float64, "model.double()"),
                                        (torch.int64, "floating point")])
def test_dtype_mismatch_hint(dtype, fix):
    x, edge_index, _, _ = graph_inputs(dtype=torch.float64)
    error = _compile_error(_deep_model(), (10 * x).to(dtype), edge_index)
    first = str(error).splitlines()[0]
    assert "'encoder' (Linear)" in first and "same dtype" in first
    assert fix in str(error)


def test_meta_tensors_rejected_before_running():
    x, edge_index, _, _ = graph_inputs(dtype=torch.float32)
    error = _compile_error(_deep_model(), x.to("meta"), edge_index)
    assert str(error).startswith("argument 'x' is on the meta device")
    model = _deep_model().to("meta")
    with pytest.raises(GSRCompileError, match=r"ResidualGNN has parameters .* meta device \(enc"):
        gsr_compile(model)(x, edge_index)


def test_failure_under_gsr_compile_alone_is_not_blamed_on_the_model(monkeypatch):
    from torch.fx.passes.infra.pass_base import PassResult
    from gsr_compiler.passes.remove_no_ops import RemoveNoOps

    def misroute(self, gm):  # a compiler bug: the encoder's call goes to the decoder
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target == "encoder":
                node.target = "decoder"
        gm.recompile()
        return PassResult(gm, True)

    monkeypatch.setattr(RemoveNoOps, "call", misroute)
    x, edge_index, _, _ = graph_inputs(dtype=torch.float32)
    model = _deep_model()
    model(x, edge_index)  # runs as written
    error = _compile_error(model, x, edge_index)
    first = str(error).splitlines()[0]
    assert "gsr_compile could not run ResidualGNN, which runs on these inputs without it" in first
    assert "'decoder' (Linear)" in first and "fails on these inputs" not in first


class TransposesEdgeIndex(nn.Module):
    """Takes its edges as [E, 2] and converts them itself."""

    def __init__(self):
        super().__init__()
        self.inner = _deep_model()

    def forward(self, x, edge_index):
        return self.inner(x, edge_index.t())


class VirtualNode(nn.Module):
    """Appends a learned node to the features: edge_index may point one past x."""

    def __init__(self):
        super().__init__()
        self.virtual = nn.Parameter(torch.zeros(1, 5))
        self.inner = _deep_model()

    def forward(self, x, edge_index):
        return self.inner(torch.cat([x, self.virtual]), edge_index)


def _sparse_adjacency(edge_index, n):
    from torch_geometric.utils import to_torch_csr_tensor

    return to_torch_csr_tensor(edge_index, size=(n, n)).t()


@pytest.mark.parametrize("case", ["int32", "sparse", "own_layout", "virtual_node"])
def test_valid_edge_index_forms_are_not_rejected(case):
    x, edge_index, _, _ = graph_inputs(dtype=torch.float32)
    model, edges = _deep_model(), edge_index
    if case == "int32":
        edges = edge_index.int()
    elif case == "sparse":
        edges = _sparse_adjacency(edge_index, x.size(0))
    elif case == "own_layout":
        model, edges = TransposesEdgeIndex(), edge_index.t()
    else:
        edges = edge_index.clone()
        edges[0, 0] = x.size(0)  # the virtual node
        model = VirtualNode()
    model.eval()
    expected = model(x, edges)
    gsr = gsr_compile(model).eval()
    assert gsr(x, edges).shape == expected.shape
    assert gsr.is_compiled
