"""float32 at the depths the product is for: gradients of a compiled model equal those of the
same architecture storing everything (tests/core/reference.py), and they would not without
replay and anchors (each case also runs unguarded, to show the test can fail)."""
import pytest
import torch

from gsr_compiler import gsr_compile
from gsr_compiler.models import ResidualGNN, UnnormalizedGIN
from gsr_compiler.runtime.reversible import ReversibleChain

from .reference import reference_copy

UNGUARDED = {"replay_margin": None, "anchors": None}


def relative(a, b):
    return float((a - b).norm() / b.norm())


def step_errors(model, x, edge_index, target, **options):
    """(first-block parameter gradient error, input gradient error, worst over all gradients,
    chain) of one compiled step against the store-everything reference."""
    torch.manual_seed(1)
    gsr = gsr_compile(model, example_inputs=(x, edge_index), **options)
    ref = reference_copy(gsr)
    grads = []
    for module in (gsr, ref):
        torch.manual_seed(5)
        leaf = x.clone().requires_grad_()
        module.zero_grad(set_to_none=True)
        ((module(leaf, edge_index) - target) ** 2).mean().backward()
        params = {n.removeprefix("compiled."): p.grad for n, p in module.named_parameters()}
        grads.append((leaf.grad, params))
    (gx, gp), (rx, rp) = grads
    first = [n for n in rp if ".blocks.0." in n]
    first_error = float(torch.cat([(gp[n] - rp[n]).flatten() for n in first]).norm()
                        / torch.cat([rp[n].flatten() for n in first]).norm())
    worst = max(relative(gp[n], rp[n]) for n in rp if rp[n].norm() > 0)
    chain = next(m for m in gsr.modules() if isinstance(m, ReversibleChain))
    return first_error, relative(gx, rx), worst, chain


def random_graph(n, degree, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    edge_index = torch.randint(0, n, (2, int(degree * n)), generator=g)
    return x, edge_index, torch.randn(n, 1, generator=g)


@pytest.mark.slow
@pytest.mark.parametrize("sparse_k", [None, 8, 2], ids=["dense", "k=g/2", "k=g/8"])
def test_pre_norm_sage_at_384_blocks(sparse_k):
    x, edge_index, target = random_graph(2000, 4)
    torch.manual_seed(0)
    model = ResidualGNN(8, 32, 1, 384, conv="sage", dropout=0.1)
    first, inp, worst, chain = step_errors(model, x, edge_index, target, sparse_k=sparse_k)
    assert first < 1e-3 and inp < 1e-3 and worst < 1e-3, (first, inp, worst)
    precision = chain.last_precision
    assert precision.replay.forced > 0  # flips happened, and were prevented
    assert precision.replay.unsafe == 0
    assert precision.replay.nbytes < 0.1 * x.shape[0] * 32 * 4  # a tenth of the chain output
    # unguarded, the same step is measurably wrong
    first_u, inp_u, _, _ = step_errors(model, x, edge_index, target, sparse_k=sparse_k,
                                       **UNGUARDED)
    assert max(first_u, inp_u) > 2e-3, (first_u, inp_u)


@pytest.mark.parametrize("depth", [24, 64])
def test_gin_without_norm_gets_anchors_and_exact_gradients(depth):
    x, edge_index, target = random_graph(2000, 1.7)
    torch.manual_seed(0)
    model = UnnormalizedGIN(8, 32, 1, depth)
    first, inp, worst, chain = step_errors(model, x, edge_index, target)
    assert first < 1e-3 and inp < 1e-3 and worst < 1e-3, (first, inp, worst)
    precision = chain.last_precision
    assert precision.anchors and precision.anchor_bytes > 0
    # anchors keep the predicted rebuild error under half the drift tolerance; the measured one
    # stays under it, and the prediction does not underestimate it
    assert precision.worst_error < 5e-4
    for block, measured in precision.errors.items():
        assert measured < 2 * precision.predicted[block], (block, precision)
    first_u, inp_u, _, unguarded = step_errors(model, x, edge_index, target, **UNGUARDED)
    assert max(first_u, inp_u) > 3e-3, (first_u, inp_u)
    assert unguarded.last_precision is None  # nothing kept or measured without the guard
