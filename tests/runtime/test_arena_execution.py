"""Chains running their coupling in the arena (GSRConfig.plan_memory) against the same model
without it: equal bit for bit over training steps with dropout, across input sizes, with two
forwards before a backward; nothing handed to the user aliases the arena."""
import copy
import io

import pytest
import torch
from torch import nn

from gsr_compiler import gsr_compile
from gsr_compiler.models import ResidualGNN
from gsr_compiler.runtime.arena import CouplingArena
from gsr_compiler.runtime.reversible import ReversibleChain


def graph(nodes, edges, seed=0, in_channels=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(nodes, in_channels, generator=g),
            torch.randint(0, nodes, (2, edges), generator=g))


def pair(conv="sage", depth=3, groups=2, dropout=0.3, nodes=37, edges=120, width=16, **options):
    """The same model compiled with and without the arena, with equal weights."""
    torch.manual_seed(0)
    model = ResidualGNN(5, width, 3, depth=depth, conv=conv, dropout=dropout)
    example = graph(nodes, edges)
    with_arena = gsr_compile(copy.deepcopy(model), example_inputs=example, groups=groups,
                             plan_memory=True, **options)
    without = gsr_compile(copy.deepcopy(model), example_inputs=example, groups=groups,
                          plan_memory=False, **options)
    without.load_state_dict(with_arena.state_dict())
    assert with_arena.coupling_arena is not None and without.coupling_arena is None
    return with_arena, without


def step(model, inputs, seed, optimizer=None):
    """One training step under a fixed seed; returns the output and every gradient."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    (out.square().mean() + out.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    if optimizer is not None:
        optimizer.step()
    return out, grads


def assert_bitwise_equal(a, b):
    out_a, grads_a = a
    out_b, grads_b = b
    assert torch.equal(out_a, out_b)
    assert len(grads_a) == len(grads_b)
    for i, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        assert torch.equal(ga, gb), f"gradient {i} differs"


CASES = [("sage", 3, 2, {}), ("gcn", 2, 4, {}), ("gat", 3, 2, {}), ("gin", 2, 3, {"width": 24}),
         ("sage", 3, 2, {"sparse_k": 2, "sparse_group": 4})]


@pytest.mark.parametrize("conv,depth,groups,options", CASES,
                         ids=[f"{c}-L{d}-G{g}{'-sparse' if 'sparse_k' in o else ''}" for c, d, g, o in CASES])
def test_arena_equals_fresh_tensors_bit_for_bit_over_training_steps(conv, depth, groups, options):
    arena_model, plain_model = pair(conv, depth, groups, **options)
    opt_a = torch.optim.SGD(arena_model.parameters(), lr=0.05)
    opt_p = torch.optim.SGD(plain_model.parameters(), lr=0.05)
    inputs = graph(37, 120)
    # dropout is really on (checked before training, which can saturate the small models)
    assert not torch.equal(step(arena_model, inputs, 10)[0], step(arena_model, inputs, 11)[0])
    arena = arena_model.coupling_arena
    for seed in range(4):
        assert_bitwise_equal(step(arena_model, inputs, seed, opt_a),
                             step(plain_model, inputs, seed, opt_p))
        assert arena.reserved_bytes > 0
        if seed == 0:
            allocations = arena.allocations
        assert arena.allocations == allocations  # allocated in the first step, then reused


def test_arena_equals_fresh_tensors_in_eval_and_without_grad():
    arena_model, plain_model = pair("gat", 2, 2)
    inputs = graph(37, 120)
    for model in (arena_model, plain_model):
        model.eval()
    assert torch.equal(arena_model(*inputs), plain_model(*inputs))
    with torch.no_grad():
        assert torch.equal(arena_model(*inputs), plain_model(*inputs))
    with torch.inference_mode():
        assert torch.equal(arena_model(*inputs), plain_model(*inputs))
    arena_model.train()
    plain_model.train()
    assert_bitwise_equal(step(arena_model, inputs, 3), step(plain_model, inputs, 3))


def test_a_second_forward_before_backward_does_not_corrupt_the_first_graph():
    arena_model, plain_model = pair("sage", 3, 2)
    first, second = graph(37, 120, seed=1), graph(37, 120, seed=2)
    results = []
    for model in (arena_model, plain_model):
        torch.manual_seed(5)
        out1 = model(*first)
        kept = out1.detach().clone()
        out2 = model(*second)  # reuses the arena while out1's graph waits for backward
        assert torch.equal(out1, kept)
        out2.sum().backward()
        grads2 = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        out1.square().sum().backward()
        grads1 = [p.grad.clone() for p in model.parameters()]
        results.append((out1.detach(), out2.detach(), grads1, grads2))
    (a1, a2, ga1, ga2), (p1, p2, gp1, gp2) = results
    assert torch.equal(a1, p1) and torch.equal(a2, p2)
    for x, y in zip(ga1 + ga2, gp1 + gp2):
        assert torch.equal(x, y)


def test_changing_the_number_of_nodes_replans():
    arena_model, plain_model = pair("gcn", 2, 4)
    arena = arena_model.coupling_arena
    sizes = [(37, 120), (80, 300), (37, 120), (12, 30), (80, 300)]
    reserved = []
    for i, (n, e) in enumerate(sizes):
        inputs = graph(n, e, seed=i)
        assert_bitwise_equal(step(arena_model, inputs, i), step(plain_model, inputs, i))
        assert arena.last_plan.num_nodes == n
        reserved.append(arena.reserved_bytes)
    # planned per size; one allocation, grown for the larger graph, never shrunk
    assert sorted(arena.cached_sizes()) == [(12, 0), (37, 0), (80, 0)]
    assert reserved[1] > reserved[0] and reserved[1:] == [reserved[1]] * 4
    assert arena.last_plan.total_bytes == arena.plan(80).total_bytes


def test_nothing_the_user_sees_aliases_the_arena():
    arena_model, _ = pair("sage", 2, 2)
    arena = arena_model.coupling_arena
    x, edge_index = graph(37, 120)
    x.requires_grad_()
    out = arena_model(x, edge_index)
    out.sum().backward()
    chain = next(m for m in arena_model.modules() if isinstance(m, ReversibleChain))
    h = torch.randn(37, 16, requires_grad=True)
    y = chain(h, edge_index)
    y.sum().backward()
    with torch.no_grad():
        y_no_grad = chain(h, edge_index)
    assert arena.reserved_bytes > 0
    returned = {"output": out, "input gradient": x.grad, "chain output": y,
                "chain output without grad": y_no_grad, "chain input gradient": h.grad}
    for name, t in list(returned.items()) + [(n, p.grad) for n, p in
                                             arena_model.named_parameters()]:
        assert t is not None and not arena.owns(t), name
    # and later calls do not change what earlier ones returned
    kept = {name: t.detach().clone() for name, t in returned.items()}
    for seed in (8, 9):
        arena_model(*graph(37, 120, seed=seed)).sum().backward()
    for name, t in returned.items():
        assert torch.equal(t, kept[name]), name


def test_a_gradient_passed_through_a_branch_does_not_alias_the_arena():
    """A branch ``out = 2 * h + s`` hands its output gradient to the side input ``s``
    unchanged. When only an inner block reads ``s``, that gradient is a group gradient the
    arena keeps updating: it must be copied out, not kept as a view into the arena."""

    class AddSide(nn.Module):
        def forward(self, h, s):
            return 2.0 * h + s

    class Tanh(nn.Module):
        def forward(self, h):
            return torch.tanh(h)

    def chain():
        blocks = [[AddSide(), AddSide()], [Tanh(), Tanh()], [Tanh(), Tanh()]]
        c = ReversibleChain(blocks, [[0], [], []])  # only block 0 reads s
        c.gsr_name = "c"
        return c

    arena = CouplingArena()
    arena.add_chain("c", 2, 4)
    with_arena, plain = chain(), chain()
    with_arena.coupling_arena = arena
    grads = []
    for c in (with_arena, plain):
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
        s = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
        c(x, s).square().sum().backward()
        grads.append((x.grad, s.grad))
    assert arena.reserved_bytes > 0
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert not arena.owns(grads[0][0]) and not arena.owns(grads[0][1])


def test_batchnorm_statistics_and_dtype_changes_match():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.norm = nn.Linear(8, 8), nn.BatchNorm1d(8)

        def forward(self, h):
            return torch.relu(self.norm(self.lin(h)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(3))

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return x

    net = Net()
    x = torch.randn(20, 8)
    a = gsr_compile(copy.deepcopy(net), example_inputs=(x,), plan_memory=True)
    p = gsr_compile(copy.deepcopy(net), example_inputs=(x,), plan_memory=False)
    p.load_state_dict(a.state_dict())
    assert_bitwise_equal(step(a, (x,), 0), step(p, (x,), 0))
    for (name, ba), bp in zip(a.named_buffers(), p.buffers()):
        assert torch.equal(ba, bp), name
    a.double()
    p.double()
    assert_bitwise_equal(step(a, (x.double(),), 1), step(p, (x.double(),), 1))
    assert a.coupling_arena.last_plan.total_bytes == a.coupling_arena.plan(20, torch.float64).total_bytes


def test_the_arena_refuses_to_be_shared_by_concurrent_calls():
    arena = CouplingArena()
    arena.add_chain("c", 2, 4)
    with arena.scratch("c", "forward", 5, 4, torch.float32, torch.device("cpu")):
        with pytest.raises(RuntimeError, match="in use"):
            with arena.scratch("c", "backward", 5, 4, torch.float32, torch.device("cpu")):
                pass
    with arena.scratch("c", "forward", 5, 4, torch.float32, torch.device("cpu")) as s:
        assert len(s.state) == 2 and s.grad == [] and s.y0 is None
    with pytest.raises(KeyError, match="not registered"):
        with arena.scratch("d", "forward", 5, 4, torch.float32, torch.device("cpu")):
            pass
    with pytest.raises(ValueError, match="planned with groups of 4"):
        with arena.scratch("c", "forward", 5, 3, torch.float32, torch.device("cpu")):
            pass


def test_copies_and_saved_models_carry_no_arena_memory():
    arena_model, plain_model = pair("sage", 2, 2)
    inputs = graph(37, 120)
    step(arena_model, inputs, 0)
    assert arena_model.coupling_arena.reserved_bytes > 0
    clone = copy.deepcopy(arena_model)
    assert clone.coupling_arena is not arena_model.coupling_arena
    assert clone.coupling_arena.reserved_bytes == 0
    buffer = io.BytesIO()
    torch.save(arena_model, buffer)
    assert len(buffer.getvalue()) < arena_model.coupling_arena.reserved_bytes + 200_000
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    chains = [m for m in loaded.modules() if isinstance(m, ReversibleChain)]
    assert chains and all(c.coupling_arena is loaded.coupling_arena for c in chains)
    assert_bitwise_equal(step(loaded, inputs, 1), step(plain_model, inputs, 1))
    assert_bitwise_equal(step(clone, inputs, 2), step(plain_model, inputs, 2))
