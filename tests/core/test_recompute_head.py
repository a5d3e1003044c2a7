"""The RecomputeRowwiseHead pass: which runs it takes, and that it changes nothing but memory."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import SAGEConv
from torch_geometric.nn.norm import LayerNorm as PyGLayerNorm

from gsr_compiler import GSRCompileError, gsr_compile
from gsr_compiler.memory import saved_bytes_of_step
from gsr_compiler.models import ResidualGNN
from gsr_compiler.runtime.rowwise import RowwiseRecompute

from .models import graph_inputs


class Backbone(nn.Module):
    """Residual SAGE blocks, then ``head(h)`` (a callable of the module)."""

    def __init__(self, width=8, depth=3):
        super().__init__()
        self.encoder = nn.Linear(5, width)
        self.convs = nn.ModuleList(SAGEConv(width, width) for _ in range(depth))

    def chain(self, x, edge_index):
        h = self.encoder(x)
        for conv in self.convs:
            h = h + conv(F.relu(h), edge_index)
        return h


def _runs(gsr):
    gm = gsr.graph_module
    return [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), RowwiseRecompute)]


def _compile_pair(model, inputs):
    on = gsr_compile(model, example_inputs=inputs)
    off = gsr_compile(model, example_inputs=inputs, recompute_head=False)
    off.load_state_dict(on.state_dict())
    return on, off


def test_same_function_gradients_and_state_dict_keys():
    torch.manual_seed(0)
    model = ResidualGNN(5, 16, 3, depth=4, conv="sage", dropout=0.2).double()
    x, edge_index, _, _ = graph_inputs(dtype=torch.float64)
    on, off = _compile_pair(model, (x, edge_index))
    assert [str(r.extra_repr()) for r in _runs(on)] == ["norm -> relu -> decoder"]
    assert not _runs(off)
    assert list(on.state_dict()) == list(off.state_dict())  # the layers stay where they were
    outputs, grads = [], []
    for gsr in (on, off):
        torch.manual_seed(3)  # the same dropout masks
        out = gsr(x, edge_index)
        out.square().sum().backward()
        outputs.append(out)
        grads.append({n: p.grad for n, p in gsr.named_parameters()})
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-12,
                                   msg=name)


def test_the_head_keeps_no_intermediate():
    torch.manual_seed(0)
    model = ResidualGNN(5, 32, 1, depth=3, conv="sage")
    x, edge_index, _, _ = graph_inputs(num_nodes=300, num_edges=900, dtype=torch.float32)
    on, off = _compile_pair(model, (x, edge_index))
    fewer = saved_bytes_of_step(off, (x, edge_index)) - saved_bytes_of_step(on, (x, edge_index))
    # LayerNorm's output (read by the ReLU) and the ReLU's output (kept by both it and the
    # decoder) are [N, 32] each; the head now keeps only the chain output, which the chain keeps.
    assert fewer >= 300 * 32 * 4


class _Head(Backbone):
    def __init__(self, head):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)
        self.head = head

    def forward(self, x, edge_index):
        return self.head(self, self.chain(x, edge_index))


@pytest.mark.parametrize("head, expected", [
    # a dropout stops the run; what follows it reads the dropout, not the chain
    (lambda m, h: m.out(F.dropout(F.relu(m.norm(h)), p=0.5, training=m.training)),
     ["norm -> relu"]),
    # an intermediate also returned: the run ends with it, the rest stays outside
    (lambda m, h: (m.out(torch.tanh(z := m.mid(m.norm(h)))), z),
     ["norm -> mid"]),
    # in place on the chain output would overwrite what the chain keeps
    (lambda m, h: m.out(m.mid(F.relu(h, inplace=True))), []),
    # in place further on is fine
    (lambda m, h: m.out(F.relu(m.mid(h), inplace=True)), ["mid -> relu -> out"]),
    # a second tensor argument: not row-wise of the chain output alone
    (lambda m, h: m.out(m.mid(h) * h), []),
    # one op alone keeps nothing but its input anyway
    (lambda m, h: m.out(h), []),
    # two heads on one chain output: one run each
    (lambda m, h: (m.out(F.gelu(h)), m.mid(h.sigmoid())), ["gelu -> out", ".sigmoid() -> mid"]),
])
def test_which_runs_are_taken(head, expected):
    torch.manual_seed(0)
    model = _Head(head)
    x, edge_index, _, _ = graph_inputs(dtype=torch.float32)
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    assert sorted(r.extra_repr() for r in _runs(gsr)) == sorted(expected)
    torch.manual_seed(1)
    got = gsr(x, edge_index)
    off = gsr_compile(model, example_inputs=(x, edge_index), recompute_head=False)
    off.load_state_dict(gsr.state_dict())
    torch.manual_seed(1)
    want = off(x, edge_index)
    for g, w in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("norm", [nn.BatchNorm1d(8), PyGLayerNorm(8)])
def test_norms_over_rows_are_not_row_wise(norm):
    # BatchNorm and PyG's graph-mode LayerNorm normalize over the nodes: a block of rows
    # would see other statistics.
    torch.manual_seed(0)
    model = _Head(lambda m, h: m.out(F.relu(m.norm(h))))
    model.norm = norm
    x, edge_index, _, _ = graph_inputs(dtype=torch.float32)
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    assert not _runs(gsr)


def test_eval_mode_and_saving_reuse_the_run():
    torch.manual_seed(0)
    model = ResidualGNN(5, 16, 3, depth=3, conv="sage")
    x, edge_index, _, _ = graph_inputs(dtype=torch.float32)
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    keys = list(gsr.state_dict())
    gsr.eval()
    with torch.no_grad():
        out = gsr(x, edge_index)
    assert list(gsr.state_dict()) == keys
    assert len(_runs(gsr)) == 1
    buffer = io.BytesIO()
    torch.save(gsr, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, edge_index), out)
    assert "norm -> relu -> decoder after gsr_chain_0 runs in row blocks" in gsr.explain()


def test_option_must_be_a_bool():
    with pytest.raises(GSRCompileError, match="recompute_head='yes': must be True or False"):
        gsr_compile(ResidualGNN(5, 8, 1, depth=2), recompute_head="yes")
