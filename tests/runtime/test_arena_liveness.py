"""Liveness of compiled models and their arena plans: no two buffers live at one step share
bytes, the plan never beats the peak of live bytes, sizes are symbolic in N and E, the
reversible backward holds one block at a time, and the 5% target on the core issue's model."""
import pytest
import torch
import torch_geometric.nn as pyg
from torch import nn

from gsr_compiler import gsr_compile
from gsr_compiler.models import ResidualGNN
from gsr_compiler.runtime.arena.coupling_arena import scratch_buffer_names

# (conv, depth, groups, extra options)
MODELS = [
    ("sage", 3, 2, {}),
    ("gcn", 2, 4, {}),
    ("gat", 4, 2, {}),
    ("gin", 2, 2, {}),
    ("gen", 2, 2, {}),
    ("graph", 5, 4, {}),
    ("sage", 3, 2, {"sparse_k": 2, "sparse_group": 4}),
    ("gcn", 2, 2, {"sparse_k": 3}),
]


def compiled(conv, depth, groups, options, nodes=23, edges=71, width=16, train=True):
    torch.manual_seed(0)
    model = ResidualGNN(5, width, 3, depth=depth, conv=conv, dropout=0.2)
    model.train(train)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(nodes, 5, generator=g)
    edge_index = torch.randint(0, nodes, (2, edges), generator=g)
    return gsr_compile(model, example_inputs=(x, edge_index), groups=groups, **options)


def peak_of_live_bytes(plan):
    """Independent of the planner: walk every step and sum what is live."""
    last = max(hi for _, hi in plan.intervals.values())
    return max(sum(plan.sizes[n] for n, (lo, hi) in plan.intervals.items() if lo <= t <= hi)
               for t in range(last + 1))


def assert_no_overlap(plan):
    names = [n for n in plan.offsets if plan.sizes[n]]
    for i, a in enumerate(names):
        a_lo, a_hi = plan.offsets[a], plan.offsets[a] + plan.sizes[a]
        af, al = plan.intervals[a]
        assert a_hi <= plan.total_bytes
        for b in names[i + 1:]:
            bf, bl = plan.intervals[b]
            if af <= bl and bf <= al:  # live at a common step
                b_lo, b_hi = plan.offsets[b], plan.offsets[b] + plan.sizes[b]
                assert a_hi <= b_lo or b_hi <= a_lo, (a, b)


@pytest.mark.parametrize("conv,depth,groups,options", MODELS,
                         ids=[f"{c}-L{d}-G{g}{'-sparse' if o else ''}" for c, d, g, o in MODELS])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_plan_of_a_compiled_model_is_valid_and_not_below_the_bound(conv, depth, groups, options,
                                                                    train):
    gsr = compiled(conv, depth, groups, options, train=train)
    live = gsr.liveness
    assert live.training is train
    for N, E in [(None, None), (1000, 3000), (64554, 110452)]:
        plan = gsr.memory_plan(N, E)
        assert len(plan) == len(live.intervals) > 0
        assert_no_overlap(plan)
        bound = peak_of_live_bytes(plan)
        assert plan.lower_bound == bound
        assert plan.total_bytes >= bound
        assert plan.gap_percent <= 5.0, plan.summary()


def test_sizes_are_symbolic_in_nodes_and_edges():
    """A plan evaluated at another size equals the plan of a model traced at that size."""
    small = compiled("gat", 2, 2, {}, nodes=23, edges=71)
    large = compiled("gat", 2, 2, {}, nodes=41, edges=150)
    assert (small.liveness.num_nodes, small.liveness.num_edges) == (23, 71)
    a, b = small.memory_plan(41, 150), large.memory_plan()
    assert a.sizes == b.sizes and a.intervals == b.intervals
    assert a.total_bytes == b.total_bytes
    sizes = {i.name: i.size for i in small.liveness.intervals}
    assert any(s.per_edge for s in sizes.values())  # messages scale with E
    assert all(s.const == 0 for s in sizes.values())  # nothing here is a fixed size


def test_nodes_equal_to_the_width_are_still_taken_as_nodes():
    gsr = compiled("sage", 2, 2, {}, nodes=16, edges=71, width=16)
    assert gsr.memory_plan(100, 71).sizes == compiled("sage", 2, 2, {}, nodes=100, edges=71,
                                                       width=16).memory_plan().sizes


def test_the_reversible_backward_holds_one_block_at_a_time():
    """The peak of live bytes does not grow with depth, and each block's recompute is dead
    before the next one starts."""
    bounds = [compiled("sage", depth, 2, {}).memory_plan().lower_bound for depth in (2, 6)]
    assert bounds[0] == bounds[1]
    live = compiled("sage", 3, 2, {}).liveness
    spans = {}
    for b in live.intervals:
        if ".recompute." in b.name:
            block = b.name.split(".")[1]
            lo, hi = spans.get(block, (b.first_use, b.last_use))
            spans[block] = (min(lo, b.first_use), max(hi, b.last_use))
    assert sorted(spans) == ["b0", "b1", "b2"]
    assert spans["b2"][1] < spans["b1"][0] and spans["b1"][1] < spans["b0"][0]


def test_the_chain_input_dies_after_the_first_block_and_the_output_lives_to_the_backward():
    live = compiled("sage", 3, 2, {}).liveness
    by_name = {b.name: b for b in live.intervals}
    encoder, chain = by_name["encoder"], by_name["gsr_chain_0"]
    first_block = [b for b in live.intervals if b.name.startswith("gsr_chain_0.b0.g1.forward.")]
    assert encoder.last_use <= max(b.last_use for b in first_block) + 1
    backward_scratch = by_name["gsr_chain_0.backward.state.0"]
    assert chain.last_use == backward_scratch.last_use  # saved by autograd to the end


def test_placed_buffers_are_the_coupling_scratch_the_runtime_plans():
    gsr = compiled("gcn", 2, 4, {})
    live = gsr.liveness
    expected = []
    for phase in ("forward", "backward"):
        for names in scratch_buffer_names("gsr_chain_0", phase, 4).values():
            expected += names
    assert sorted(live.placed) == sorted(expected)
    assert all(live.kinds[n] == "scratch" for n in live.placed)
    for N in (23, 500):
        runtime = gsr.coupling_arena.plan(N, torch.float32)
        from_liveness = live.plan_placed(N)
        assert runtime.total_bytes == from_liveness.total_bytes
        assert runtime.lower_bound == from_liveness.lower_bound


def test_explain_shows_planned_bytes_lower_bound_and_gap():
    gsr = compiled("sage", 2, 2, {})
    memory = gsr.report.memory
    plan = gsr.memory_plan()
    assert memory.planned_bytes == plan.total_bytes and memory.lower_bound == plan.lower_bound
    assert (memory.num_nodes, memory.num_edges) == (23, 71)
    text = gsr.explain()
    assert "memory plan (one training step at N=23, E=71)" in text
    assert "lower bound" in text and f"gap {plan.gap_percent:.1f}%" in text
    assert "arena (allocated at run time)" in text
    off = gsr_compile(ResidualGNN(5, 16, 3, depth=2), plan_memory=False,
                      example_inputs=(torch.randn(9, 5), torch.randint(0, 9, (2, 20))))
    assert "off: plan_memory=False" in off.explain()


def test_core_model_plan_within_five_percent_of_the_bound():
    """The core issue's model: 64 SAGE blocks of 128 channels, planned for the largest circuit
    size without running it."""
    torch.manual_seed(0)
    model = ResidualGNN(16, 128, 1, depth=64, conv="sage")
    x, edge_index = torch.randn(997, 16), torch.randint(0, 997, (2, 3001))
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    plan = gsr.memory_plan(64554, 110452)
    assert plan.total_bytes >= plan.lower_bound
    assert plan.gap_percent <= 5.0, plan.summary()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.conv = nn.LayerNorm(8), pyg.SAGEConv(8, 8)

    def forward(self, h, edge_index):
        return self.conv(torch.relu(self.norm(h)), edge_index)


class TwiceThroughTheBlocks(nn.Module):
    """Runs the same residual blocks twice, so the graph calls one chain module twice."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = nn.Linear(5, 8), nn.Linear(8, 2)
        self.blocks = nn.ModuleList(_Block() for _ in range(2))

    def forward(self, x, edge_index):
        h = self.encoder(x)
        for block in self.blocks:
            h = h + block(h, edge_index)
        h = torch.tanh(h)
        for block in self.blocks:
            h = h + block(h, edge_index)
        return self.decoder(h)


def test_a_chain_called_twice_has_intervals_per_call():
    torch.manual_seed(0)
    x, edge_index = torch.randn(20, 5), torch.randint(0, 20, (2, 50))
    gsr = gsr_compile(TwiceThroughTheBlocks(), example_inputs=(x, edge_index))
    calls = [n.name for n in gsr.graph_module.graph.nodes if n.target == "gsr_chain_0"]
    assert len(calls) == 2
    live = gsr.liveness
    for call in calls:
        assert any(name.startswith(f"{call}.b1.g0.recompute.") for name in live.kinds)
        assert f"{call}.backward.grad.1" in live.placed
    plan = gsr.memory_plan(500, 2000)
    assert_no_overlap(plan)
    assert plan.lower_bound == peak_of_live_bytes(plan) <= plan.total_bytes
