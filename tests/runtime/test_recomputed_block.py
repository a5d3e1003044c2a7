"""Recomputed blocks: a chain of one block that cannot be split into groups keeps its input and
runs its branch again in the backward (coupling "recompute", chosen by coupling="auto").

Such a block is the block as written, so every test compares the compiled model with the eager
model itself: same outputs, same gradients, same dropout masks, same BatchNorm statistics."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GCN2Conv

from gsr_compiler import GSRConfig, gsr_compile
from gsr_compiler.memory import saved_bytes_of_step
from gsr_compiler.runtime.recomputed_block import RecomputedBlock
from gsr_compiler.runtime.two_stream import TwoStreamChain


class ReluAfterSum(nn.Module):
    """PyG's gcn2_ppi.py shape: ``x = relu(x + f(x))``, so every block is a chain of its own;
    the branch has dropout, a layer without a width rule, and (optionally) BatchNorm."""

    def __init__(self, depth, d=16, dropout=0.3, norm=True):
        super().__init__()
        self.stem = nn.Linear(6, d)
        self.convs = nn.ModuleList(GCN2Conv(d, alpha=0.2, theta=0.5, layer=i + 1)
                                   for i in range(depth))
        self.norms = nn.ModuleList(nn.BatchNorm1d(d) if norm else nn.Identity()
                                   for _ in range(depth))
        self.head = nn.Linear(d, 3)
        self.dropout = dropout

    def forward(self, x, edge_index):
        x = x0 = self.stem(x).relu()
        for conv, norm in zip(self.convs, self.norms):
            h = F.dropout(x, self.dropout, training=self.training)
            x = (x + norm(conv(h, x0, edge_index))).relu()
        return self.head(x)


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


def blocks_of(gsr):
    return [m for m in gsr.modules() if isinstance(m, RecomputedBlock)]


def assert_same_step(gsr, model, x, edge_index, rtol, atol=0.0):
    out, gx, grads = one_step(gsr, x, edge_index)
    ref_out, ref_gx, ref_grads = one_step(model, x, edge_index)
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(gx, ref_gx, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_auto_recomputes_one_block_chains_and_says_so():
    model = ReluAfterSum(4).double()
    x, edge_index = graph()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    assert len(blocks_of(gsr)) == 4
    assert [c.coupling for c in gsr.report.chains] == ["recompute"] * 4
    text = gsr.explain()
    assert "recomputed in the backward" in text and "GCN2Conv" in text


def test_two_stream_asked_for_is_kept():
    model = ReluAfterSum(2).double()
    x, edge_index = graph()
    gsr = gsr_compile(model, GSRConfig(coupling="two-stream"), example_inputs=(x, edge_index))
    assert not blocks_of(gsr)
    assert any(isinstance(m, TwoStreamChain) for m in gsr.modules())


def test_float64_step_equals_the_eager_model_with_dropout_and_batchnorm():
    torch.manual_seed(0)
    model = ReluAfterSum(6).double()
    x, edge_index = graph()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    assert_same_step(gsr, model, x, edge_index, rtol=1e-12, atol=1e-14)


def test_batchnorm_running_stats_updated_once_per_step():
    torch.manual_seed(0)
    model = ReluAfterSum(3, dropout=0.0).double()
    twin = ReluAfterSum(3, dropout=0.0).double()
    twin.load_state_dict(model.state_dict())
    x, edge_index = graph()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    one_step(gsr, x, edge_index)
    one_step(twin, x, edge_index)
    for mine, theirs in zip(model.norms, twin.norms):
        assert int(mine.num_batches_tracked) == int(theirs.num_batches_tracked) == 1
        torch.testing.assert_close(mine.running_mean, theirs.running_mean, rtol=0, atol=1e-15)
        torch.testing.assert_close(mine.running_var, theirs.running_var, rtol=0, atol=1e-15)


def test_gradients_equal_store_everything_float64():
    torch.manual_seed(0)
    model = ReluAfterSum(5).double()
    x, edge_index = graph()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    check = gsr.verify_gradients((x, edge_index), tolerance=1e-12)
    assert check.errors and check.ok, str(check)


@pytest.mark.parametrize("depth", [256])
def test_float32_at_256_blocks_equals_the_eager_model(depth):
    """Nothing is rebuilt by subtraction: at any depth the recompute reads the kept input, so
    the step equals eager's up to the order of summation of the branch's gradients."""
    torch.manual_seed(0)
    model = ReluAfterSum(depth, d=8)
    x, edge_index = graph(n=30, e=90, dtype=torch.float32)
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    assert len(blocks_of(gsr)) == depth
    assert_same_step(gsr, model, x, edge_index, rtol=1e-5, atol=1e-6)


def test_keeps_one_input_per_block():
    torch.manual_seed(0)
    depth, n, d = 32, 40, 16
    model = ReluAfterSum(depth, d=d, norm=False)
    x, edge_index = graph(n=n, dtype=torch.float32)
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    eager = saved_bytes_of_step(model, (x, edge_index))
    compiled = saved_bytes_of_step(gsr, (x, edge_index))
    per_block = n * d * 4
    # each block keeps its input (the previous ReLU's output, kept by that ReLU as well); the
    # stem, the head and the graph add a few more
    assert compiled <= (depth + 8) * per_block, (compiled, eager)
    assert 2 * compiled <= eager, (compiled, eager)


def test_state_dict_keys_are_the_users_and_a_plain_checkpoint_loads():
    torch.manual_seed(0)
    model = ReluAfterSum(3).double()
    x, edge_index = graph()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    keys = {k.removeprefix("compiled.") for k in gsr.state_dict()}
    assert keys == set(model.state_dict())
    other = ReluAfterSum(3).double()
    buffer = io.BytesIO()
    torch.save(other.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    gsr.load_state_dict({f"compiled.{k}": v for k, v in state.items()})
    gsr.eval(), other.eval()
    torch.testing.assert_close(gsr(x, edge_index), other(x, edge_index), rtol=0, atol=0)


def test_eval_mode_runs_the_block_as_written():
    torch.manual_seed(0)
    model = ReluAfterSum(3).double()
    x, edge_index = graph()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    gsr.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(gsr(x, edge_index), model(x, edge_index), rtol=0, atol=0)


def test_double_backward_is_refused_with_a_reason():
    model = ReluAfterSum(2).double()
    x, edge_index = graph()
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    leaf = x.clone().requires_grad_()
    out = gsr(leaf, edge_index).sum()
    with pytest.raises(RuntimeError, match="recomputed residual block.*double backward"):
        torch.autograd.grad(out, leaf, create_graph=True)
