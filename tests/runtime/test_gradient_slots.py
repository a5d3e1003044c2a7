"""The gradient buffers a chain's backward allocates up front: gradients of parameters and side
inputs shared by several blocks accumulate as autograd would, a tensor that gets no gradient
reports None, and a gradient autograd hands over is never added into in place."""
import torch
from torch import nn

from gsr_compiler.runtime.gradient_slots import GradientSlots
from gsr_compiler.runtime.reversible import ReversibleChain


class SharedBranch(nn.Module):
    """tanh(lin(h) + s @ w): the Linear and the side input are shared by every block."""

    def __init__(self, lin: nn.Linear, w: nn.Parameter, unused: nn.Parameter):
        super().__init__()
        self.lin, self.w, self.unused = lin, w, unused

    def forward(self, h, s):
        return torch.tanh(self.lin(h) + s @ self.w)


def reference(x, s, blocks):
    """The same grouped coupling with autograd storing everything."""
    xs = list(x.chunk(len(blocks[0]), dim=-1))
    for block in blocks:
        prev = sum(xs[1:])
        ys = []
        for j, f in enumerate(block):
            prev = xs[j] + f(prev, s)
            ys.append(prev)
        xs = ys
    return torch.cat(xs, dim=-1)


def test_shared_parameters_and_side_inputs_accumulate_like_autograd():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).double()
    w = nn.Parameter(torch.randn(2, 3, dtype=torch.float64))
    unused = nn.Parameter(torch.randn(4, dtype=torch.float64))
    branch = SharedBranch(lin, w, unused)
    blocks = [[branch, branch] for _ in range(4)]
    chain = ReversibleChain(blocks, [[0]] * 4)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    s = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, dtype=torch.float64)

    (chain(x, s) * weight).sum().backward()
    got = [t.grad.clone() for t in (x, s, lin.weight, lin.bias, w)]
    assert unused.grad is None
    for t in (x, s, lin.weight, lin.bias, w):
        t.grad = None
    (reference(x, s, blocks) * weight).sum().backward()
    want = [t.grad for t in (x, s, lin.weight, lin.bias, w)]
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_slots_copy_then_add_and_leave_handed_gradients_alone():
    p, q = torch.zeros(3), torch.zeros(2)
    slots = GradientSlots([p])
    first = torch.tensor([1.0, 2.0, 3.0])
    slots.accumulate(p, first)
    slots.accumulate(p, torch.tensor([0.5, 0.5, 0.5]))
    assert torch.equal(slots.get(p), torch.tensor([1.5, 2.5, 3.5]))
    assert torch.equal(first, torch.tensor([1.0, 2.0, 3.0]))  # copied, not added into
    # Not planned: autograd's tensor is kept as given, and the next gradient is added out of place.
    handed = torch.tensor([1.0, 1.0])
    slots.accumulate(q, handed)
    assert slots.get(q) is handed
    slots.accumulate(q, torch.tensor([2.0, 2.0]))
    assert torch.equal(slots.get(q), torch.tensor([3.0, 3.0]))
    assert torch.equal(handed, torch.tensor([1.0, 1.0]))
    assert slots.get(torch.zeros(1)) is None


def test_a_sparse_gradient_is_kept_out_of_place():
    p = torch.zeros(4, 2)
    slots = GradientSlots([p])
    g = torch.sparse_coo_tensor([[1, 3]], torch.ones(2, 2), (4, 2), check_invariants=True)
    slots.accumulate(p, g)
    slots.accumulate(p, g)
    assert torch.equal(slots.get(p).to_dense(), 2 * g.to_dense())
