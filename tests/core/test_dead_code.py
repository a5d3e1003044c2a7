"""Unused results are removed before chains are searched; operations with effects stay."""
import torch
import torch.nn.functional as F
import torch_geometric.nn as pyg
from torch import fx, nn

from gsr_compiler import gsr_compile
from gsr_compiler.passes.eliminate_dead_code import EliminateDeadCode
from gsr_compiler.reference import verify_gradients
from gsr_compiler.runtime.reversible import ReversibleChain

D = 16


class BlockWithAuxiliary(nn.Module):
    """Returns the block output and a statistic of its branch that callers may ignore."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.conv = pyg.GraphConv(D, D)

    def forward(self, h, edge_index):
        update = self.conv(F.relu(self.norm(h)), edge_index)
        return h + update, update.pow(2).mean(dim=0)


class IgnoresAuxiliary(nn.Module):
    def __init__(self, depth=4):
        super().__init__()
        self.encoder = nn.Linear(6, D)
        self.blocks = nn.ModuleList(BlockWithAuxiliary() for _ in range(depth))
        self.decoder = nn.Linear(D, 1)

    def forward(self, x, edge_index):
        h = self.encoder(x)
        for block in self.blocks:
            h, _ = block(h, edge_index)
        return self.decoder(h)


def test_block_returning_an_unused_second_value_converts_and_is_exact():
    torch.manual_seed(0)
    model = IgnoresAuxiliary().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    edge_index = torch.randint(0, 20, (2, 64), generator=g)
    gsr = gsr_compile(model, strict=True, example_inputs=(x, edge_index))
    chains = [m for m in gsr.graph_module.modules() if isinstance(m, ReversibleChain)]
    assert [c.depth for c in chains] == [4], gsr.explain()
    assert "EliminateDeadCode: 8 unused op(s) removed" in gsr.explain()
    check = verify_gradients(gsr.graph_module, [x, edge_index], tolerance=1e-9)
    assert check.ok, str(check)


@fx.wrap
def count_call(t):
    count_call.calls = getattr(count_call, "calls", 0) + 1
    return t


class Effects(nn.Module):
    """Unused results of operations that have effects, next to one that has none."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.bn(x)               # updates running statistics
        self.drop(x)             # draws from the random stream
        F.dropout(x, 0.3)        # so does the functional form
        torch.rand_like(x)
        y = x.clone()
        y.add_(1)                # in place: its effect is the mutation
        count_call(x)            # a user's function: may have effects
        self.lin(x).sum()        # no effect: removed
        (x * 2).mean()           # no effect: removed
        return y


def test_operations_with_effects_stay_pure_ones_go():
    gm = fx.symbolic_trace(Effects())
    dead_code = EliminateDeadCode()
    dead_code(gm)
    left = [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
            if n.op not in ("placeholder", "output")]
    assert {"bn", "drop", "rand_like", "add_"} <= set(left)
    assert any("dropout" in t for t in left) and any("count_call" in t for t in left)
    assert "lin" not in left and "mean" not in left and "sum" not in left
    assert dead_code.notes == ["4 unused op(s) removed: 'lin', 'sum_1', 'mul', 'mean'"]
    # The kept ops still act: the running mean moves.
    gm.train()
    x = torch.randn(8, 4) + 3
    gm(x)
    assert gm.bn.running_mean.abs().sum() > 0
