"""Dropout of reversible branches (BranchDropout): the masks follow the stated rule bit for bit,
keep each element with probability 1 - p, replay under the same seed, and differentiate like
dropout; the compiler swaps it in for the nn.Dropout layers of branches only."""
import math

import pytest
import torch
from torch import nn

from gsr_compiler import gsr_compile
from gsr_compiler.runtime.dropout import BranchDropout, bernoulli_mask, branch_dropout
from gsr_compiler.runtime.reversible import ReversibleChain


@pytest.mark.parametrize("keep", [0.9, 0.5, 1 / 3, 0.75 + 0.7 * 0.5 ** 32, 0.25 - 0.4 * 0.5 ** 32])
def test_mask_follows_its_rule(keep):
    shape = (1 << 19,)
    mask = bernoulli_mask(shape, keep, generator=torch.Generator().manual_seed(3))
    # Redraw the same bits and apply the rule independently (unsigned 32-bit integers).
    g = torch.Generator().manual_seed(3)
    words = torch.empty(shape[0] // 2, dtype=torch.int64).random_(-(1 << 63), None, generator=g)
    u = words.view(torch.int32).to(torch.int64) + (1 << 31)
    threshold = round(keep * 2 ** 32)  # the nearest multiple of 2**-32 (none is half-way)
    assert torch.equal(mask, u < threshold)


def test_odd_sizes_and_extreme_probabilities():
    g = torch.Generator().manual_seed(0)
    assert bernoulli_mask((3, 5), 0.5, generator=g).shape == (3, 5)
    assert not bernoulli_mask((1000,), 2.0 ** -40).any()
    assert bernoulli_mask((1000,), 1 - 2.0 ** -40).all()
    with pytest.raises(ValueError, match="keep probability"):
        bernoulli_mask((4,), -0.1)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 1 / 3])
def test_each_element_is_kept_with_probability_keep(keep):
    n = 1 << 22
    kept = bernoulli_mask((n,), keep, generator=torch.Generator().manual_seed(1)).sum().item()
    sigma = math.sqrt(n * keep * (1 - keep))
    assert abs(kept - n * keep) < 6 * sigma


def test_dropout_scales_survivors_and_replays_under_a_seed():
    x = torch.randn(64, 32, dtype=torch.float64)
    torch.manual_seed(7)
    a = branch_dropout(x, 0.3)
    torch.manual_seed(7)
    b = branch_dropout(x, 0.3)
    assert torch.equal(a, b)
    kept = a != 0
    assert torch.allclose(a[kept], x[kept] / 0.7, rtol=1e-15)
    assert 0.5 < kept.double().mean() < 0.9
    torch.manual_seed(7)
    inplace = branch_dropout(x.clone(), 0.3, inplace=True)
    assert torch.equal(inplace, a)
    assert torch.equal(branch_dropout(x, 0.3, training=False), x)
    assert torch.equal(branch_dropout(x, 0.0), x)
    assert torch.equal(branch_dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability"):
        branch_dropout(x, 1.5)


def test_gradient_passes_through_kept_elements_only():
    x = torch.randn(20, 6, dtype=torch.float64, requires_grad=True)

    def seeded(t):
        torch.manual_seed(11)
        return branch_dropout(t, 0.4)

    assert torch.autograd.gradcheck(seeded, (x,))
    out = seeded(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g, (out != 0).double() / 0.6)


def test_compiler_swaps_dropout_inside_branches_only():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.entry = nn.Dropout(0.2)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.1))
                for _ in range(3))

        def forward(self, x):
            x = self.entry(x)
            for block in self.blocks:
                x = x + block(x)
            return x

    gsr = gsr_compile(Net(), example_inputs=(torch.randn(5, 8),))
    gm = gsr.graph_module
    chain = next(m for m in gm.modules() if isinstance(m, ReversibleChain))
    in_branches = [m for m in chain.modules() if isinstance(m, nn.Dropout)]
    assert len(in_branches) == 3 * 2 and all(type(m) is BranchDropout for m in in_branches)
    outside = [m for name, m in gm.named_modules() if isinstance(m, nn.Dropout)
               and not any(m is b for b in in_branches)]
    assert outside and all(type(m) is nn.Dropout for m in outside)
    assert "BranchDropout" in str(gsr.explain())
    x = torch.randn(5, 8, requires_grad=True)
    gsr(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
