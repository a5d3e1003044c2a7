"""Training under torch.autocast (CPU bfloat16 and float16): the recomputes restore the forward's
autocast state, the chains keep their coupling state in float32, and the gradients equal the same
architecture storing everything under the same autocast."""
import warnings

import pytest
import torch

from gsr_compiler import GSRPrecisionWarning, gsr_compile
from gsr_compiler.models import ResidualGNN
from gsr_compiler.reference import store_everything
from gsr_compiler.runtime.reversible import ReversibleChain


def relative(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def graph(n=1000, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 8, generator=g), torch.randint(0, n, (2, 4 * n), generator=g),
            torch.randn(n, 1, generator=g))


def step(module, x, edge_index, target, dtype):
    torch.manual_seed(5)
    module.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = module(leaf, edge_index)
    ((out.float() - target) ** 2).mean().backward()
    return out, leaf.grad, {n.removeprefix("compiled."): p.grad.clone()
                            for n, p in module.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparse_k", [None, 8], ids=["dense", "k=g/2"])
def test_64_blocks_under_autocast_equal_storing_everything_under_autocast(dtype, sparse_k):
    x, edge_index, target = graph()
    torch.manual_seed(0)
    model = ResidualGNN(8, 32, 1, 64, conv="sage", dropout=0.1)
    gsr = gsr_compile(model, example_inputs=(x, edge_index), sparse_k=sparse_k)
    reference = store_everything(gsr.graph_module)
    out, gx, grads = step(gsr, x, edge_index, target, dtype)  # crashed before: bf16 vs fp32
    _, rx, ref_grads = step(reference, x, edge_index, target, dtype)
    _, fx, f32_grads = step(reference, x, edge_index, target, None)
    assert out.dtype == dtype  # the head ran under autocast, as the model asked
    first = [n for n in ref_grads if ".blocks.0." in n]
    assert relative(gx, rx) < 1e-3
    for name in first:
        assert relative(grads[name], ref_grads[name]) < 1e-3, name
    # against float32: no further from it than the store-everything model under autocast
    assert abs(relative(gx, fx) - relative(rx, fx)) < 1e-3
    chain = next(m for m in gsr.modules() if isinstance(m, ReversibleChain))
    assert chain.last_precision.worst_error < 1e-3
    # the branches ran in the autocast dtype (with sparse_k too: its compressed linear maps
    # follow F.linear's autocast rule), so every update was patched and rebuilt exactly
    assert chain.last_precision.worst_error == 0.0


def test_chain_state_stays_float32_and_256_blocks_rebuild_within_tolerance():
    x, edge_index, target = graph(600)
    torch.manual_seed(0)
    model = ResidualGNN(8, 32, 1, 256, conv="sage", dropout=0.1)
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    chain = next(m for m in gsr.modules() if isinstance(m, ReversibleChain))
    seen = {}
    handle = chain.register_forward_hook(lambda m, args, out: seen.update(dtype=out.dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GSRPrecisionWarning)
        step(gsr, x, edge_index, target, torch.bfloat16)
    handle.remove()
    assert seen["dtype"] == torch.float32
    # bfloat16 branch outputs add to a float32 state without rounding: rebuilt exactly
    assert chain.last_precision.errors[0] <= chain.drift_tolerance
    assert chain.last_precision.errors[0] == 0.0


def test_compiled_under_autocast_and_head_recompute():
    x, edge_index, target = graph(300)
    torch.manual_seed(0)
    model = ResidualGNN(8, 32, 1, 8, conv="sage", dropout=0.1)
    gsr = gsr_compile(model)  # traced at the first call, inside autocast: no 16-bit warning
    leaf = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GSRPrecisionWarning)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = gsr(leaf, edge_index)
        ((out.float() - target) ** 2).mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(leaf.grad).all()
    assert "runs in row blocks, recomputed in backward" in gsr.explain()  # the head recomputed


def test_exact_patch_gives_back_the_state_bit_for_bit():
    from gsr_compiler.runtime.drift import exact_patch
    g = torch.Generator().manual_seed(0)
    before = torch.randn(5000, 16, generator=g) * torch.logspace(-6, 3, 16)  # many scales
    out = torch.randn(5000, 16, generator=g).to(torch.bfloat16)
    after = before + out
    positions, values = exact_patch(before, after, out)
    rebuilt = after - out
    assert 0 < positions.numel() < before.numel()  # some updates round, most do not
    assert not torch.equal(rebuilt, before)
    rebuilt.view(-1)[positions.long()] = values
    assert torch.equal(rebuilt, before)


@pytest.mark.slow
def test_1000_blocks_under_bfloat16_rebuild_exactly(monkeypatch):
    import gsr_compiler.runtime.reversible as reversible
    x, edge_index, target = graph(2000)
    errors = {}
    for patched in (True, False):
        if not patched:  # what the backward rebuilds without the patches
            monkeypatch.setattr(reversible, "exact_patch", lambda before, after, out: (
                torch.empty(0, dtype=torch.int64), before.reshape(-1)[:0]))
        torch.manual_seed(0)
        model = ResidualGNN(8, 32, 1, 1000, conv="sage", dropout=0.1)
        gsr = gsr_compile(model, example_inputs=(x, edge_index), anchors=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GSRPrecisionWarning)
            step(gsr, x, edge_index, target, torch.bfloat16)
        chain = next(m for m in gsr.modules() if isinstance(m, ReversibleChain))
        errors[patched] = chain.last_precision.errors[0]
        if patched:
            assert chain.last_precision.patch_bytes < 10_000 and not chain.last_precision.anchors
    assert errors[True] == 0.0
    # without them some updates round and the rebuild is not exact (how far it then drifts is
    # chaotic: 16-bit recomputes of a slightly wrong input round differently; one run of this
    # model, other dropout masks, ended 0.5 off)
    assert errors[False] > 0.0
