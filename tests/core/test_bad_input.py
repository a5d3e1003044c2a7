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


def test_unsupported_layer_reported_by_name_or_strict_error():
    model = Unsupported().double()
    x, edge_index, _, _ = graph_inputs()
    gsr = gsr_compile(model)
    assert torch.equal(gsr(x, edge_index), model(x, edge_index))
    text = gsr.explain()
    assert "not converted" in text and "supported layers" in text
    with pytest.raises(GSRCompileError) as info:
        gsr_compile(model, strict=True)(x, edge_index)
    assert "SAGEConv" in str(info.value)  # the supported list


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
    gsr = gsr_compile(model, groups=4)
    with pytest.raises(GSRCompileError, match="width 10.*groups=4"):
        gsr(x, edge_index)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(x, x_before)
    assert not gsr.is_compiled


def test_optimizer_before_first_call_is_a_clear_error():
    gsr = gsr_compile(ResidualGNN(5, 8, 3, depth=2))
    with pytest.raises(GSRCompileError, match="example_inputs"):
        torch.optim.Adam(gsr.parameters())


def test_data_object_argument_rejected():
    from torch_geometric.data import Data

    class TakesData(nn.Module):
        def forward(self, data):
            return data.x

    x, edge_index, _, _ = graph_inputs()
    with pytest.raises(GSRCompileError, match="data.x"):
        gsr_compile(TakesData())(Data(x=x, edge_index=edge_index))
