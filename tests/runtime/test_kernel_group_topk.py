"""group_topk: Triton kernel (interpreted on CPU) vs the torch reference, forward and backward,
with LayerNorm and dropout; the dropout mask replays from (seed, offset) and matches between the
kernel's tl.rand and the torch Philox re-implementation."""
import pytest
import torch
import torch.nn.functional as F

from gsr_compiler.runtime.kernels import (densify_group_topk, group_topk, group_topk_reference,
                                          philox_uniform)
from gsr_compiler.runtime.kernels.topk import group_topk_backward_triton, group_topk_forward_triton

triton = pytest.importorskip("triton", reason="triton is not importable")
pytestmark = [pytest.mark.triton_kernels, pytest.mark.interpreter_loops]

# (N, D, group_size, k): ragged N, groups-per-row not a power of two, k = 1 and k = g.
CONFIGS = [
    (37, 96, 32, 5),
    (1, 16, 16, 16),
    (19, 24, 8, 1),
    (70, 64, 16, 3),
    (6, 512, 256, 9),
]
MODES = [
    # (layer_norm, affine, dropout_p)
    (False, False, 0.0),
    (True, True, 0.0),
    (True, False, 0.3),
    (False, False, 0.5),
]


def well_separated_input(n, d, g, k, rng, layer_norm, weight, bias, eps=1e-5):
    """Random x whose (normalized) groups have no near-tie at the k-th largest entry, so the
    selected set cannot depend on last-bit differences between kernel and reference."""
    for _ in range(100):
        x = torch.randn(n, d, generator=rng) * 3
        h = F.layer_norm(x, (d,), weight, bias, eps) if layer_norm else x
        s = h.reshape(n, d // g, g).sort(dim=-1, descending=True).values
        if k == g or bool(((s[..., k - 1] - s[..., k]) > 1e-4).all()):
            return x
    raise AssertionError("could not draw a well-separated input")


def leaf(t):
    return None if t is None else t.clone().requires_grad_()


def run_kernel(x, k, g, weight, bias, layer_norm, p, seed, offset, poisoned):
    n, d = x.shape
    values = poisoned(n, d // g, k)
    indices = poisoned(n, d // g, k, dtype=torch.uint8)
    v, i, mean, rstd = group_topk_forward_triton(x, k, g, weight, bias, 1e-5, layer_norm, p,
                                                 seed, offset, values=values, indices=indices)
    assert v is values and i is indices
    return v, i, mean, rstd


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"ln{int(m[0])}aff{int(m[1])}p{m[2]}")
def test_forward_matches_reference(config, mode, rng, poisoned):
    n, d, g, k = config
    layer_norm, affine, p = mode
    weight = torch.randn(d, generator=rng) if affine else None
    bias = torch.randn(d, generator=rng) if affine else None
    x = well_separated_input(n, d, g, k, rng, layer_norm, weight, bias)
    seed, offset = 1234 + n, 17 * d
    v, i, mean, rstd = run_kernel(x, k, g, weight, bias, layer_norm, p, seed, offset, poisoned)
    v_ref, i_ref = group_topk_reference(x, k, g, weight, bias, 1e-5, layer_norm, p, seed, offset)
    assert i.dtype == torch.uint8 and torch.equal(i, i_ref)
    assert bool((i[..., 1:] > i[..., :-1]).all())           # ascending, distinct
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
    if not layer_norm:
        assert torch.equal(v, v_ref)                         # pure selection: exact
    else:
        torch.testing.assert_close(mean, x.mean(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rstd, torch.rsqrt(x.var(1, unbiased=False) + 1e-5),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS[:4], ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"ln{int(m[0])}aff{int(m[1])}p{m[2]}")
def test_backward_matches_reference(config, mode, rng, poisoned):
    n, d, g, k = config
    layer_norm, affine, p = mode
    weight = torch.randn(d, generator=rng) if affine else None
    bias = torch.randn(d, generator=rng) if affine else None
    x = well_separated_input(n, d, g, k, rng, layer_norm, weight, bias)
    grad_values = torch.randn(n, d // g, k, generator=rng)
    seed, offset = 99, 5

    xr, wr, br = leaf(x), leaf(weight), leaf(bias)
    v_ref, _ = group_topk_reference(xr, k, g, wr, br, 1e-5, layer_norm, p, seed, offset)
    v_ref.backward(grad_values)

    # The kernel alone, writing into a poisoned gradient buffer.
    _, indices, mean, rstd = group_topk_forward_triton(x, k, g, weight, bias, 1e-5, layer_norm,
                                                       p, seed, offset)
    grad_x = poisoned(n, d)
    gx, gw, gb = group_topk_backward_triton(grad_values, indices, g, x, weight, mean, rstd,
                                            layer_norm, p, seed, offset, grad_x=grad_x)
    assert gx is grad_x
    torch.testing.assert_close(gx, xr.grad, rtol=1e-4, atol=1e-5)
    if affine:
        torch.testing.assert_close(gw, wr.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gb, br.grad, rtol=1e-4, atol=1e-5)

    # Through autograd, as a model would call it.
    xt, wt, bt = leaf(x), leaf(weight), leaf(bias)
    vt, it = group_topk(xt, k, g, weight=wt, bias=bt, layer_norm=layer_norm, dropout_p=p,
                        seed=seed, offset=offset, backend="triton")
    assert not it.requires_grad
    vt.backward(grad_values)
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-4, atol=1e-5)
    if affine:
        torch.testing.assert_close(wt.grad, wr.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bt.grad, br.grad, rtol=1e-4, atol=1e-5)


def test_gradient_reaches_only_kept_positions(rng):
    x = torch.randn(9, 64, generator=rng, requires_grad=True)
    v, i = group_topk(x, 4, 16, backend="triton")
    v.sum().backward()
    kept = densify_group_topk(torch.ones_like(v), i, 16) != 0
    assert torch.equal(x.grad != 0, kept)
    assert int(kept.sum()) == 9 * 4 * 4


def test_ties_go_to_lower_positions(poisoned):
    # Integer-valued rows with many ties, and all-equal rows.
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (13, 48), generator=gen).float()
    x[0] = 1.0
    x[1] = float("-inf")
    v, i, _, _ = run_kernel(x, 5, 16, None, None, False, 0.0, 0, 0, poisoned)
    v_ref, i_ref = group_topk_reference(x, 5, 16)
    assert torch.equal(i, i_ref) and torch.equal(v, v_ref)
    assert i[0].tolist() == [[0, 1, 2, 3, 4]] * 3
    assert i[1].tolist() == [[0, 1, 2, 3, 4]] * 3


def test_nan_ranks_first_like_a_descending_sort(poisoned):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 32, generator=gen)
    x[0, [3, 9, 20]] = float("nan")
    x[1, :16] = float("nan")
    x[2, 5] = float("-inf")
    x[3, [1, 2]] = torch.tensor([-0.0, 0.0])
    v, i, _, _ = run_kernel(x, 4, 16, None, None, False, 0.0, 0, 0, poisoned)
    v_ref, i_ref = group_topk_reference(x, 4, 16)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0, equal_nan=True)
    assert i[0, 0, :2].tolist() == [3, 9] and i[1, 0].tolist() == [0, 1, 2, 3]


def test_dropout_replays_from_seed_and_offset(rng):
    x = torch.randn(40, 64, generator=rng)
    a = group_topk(x, 8, 32, dropout_p=0.4, seed=7, offset=1000, backend="triton")
    b = group_topk(x, 8, 32, dropout_p=0.4, seed=7, offset=1000, backend="triton")
    c = group_topk(x, 8, 32, dropout_p=0.4, seed=7, offset=1000 + 40 * 2 * 8, backend="triton")
    d = group_topk(x, 8, 32, dropout_p=0.4, seed=8, offset=1000, backend="triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0] == 0, c[0] == 0)    # next offset range: a fresh mask
    assert not torch.equal(a[0] == 0, d[0] == 0)    # other seed: a fresh mask
    # The torch reference (CPU path) drops exactly the same entries.
    ref = group_topk(x, 8, 32, dropout_p=0.4, seed=7, offset=1000, backend="torch")
    assert torch.equal(a[0], ref[0])


def test_philox_reference_equals_tl_rand_bit_for_bit():
    tl = triton.language

    def rand_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, tl.rand(seed, offset + i.to(tl.int64)), mask=i < n)

    kernel = triton.jit(rand_kernel)
    n = 300
    for seed in (0, 1, 123456789, 2 ** 35 + 3):
        for offset in (0, 7, 2 ** 31 - 100, 2 ** 32 + 5):
            out = torch.full((n,), float("nan"))
            kernel[(triton.cdiv(n, 128),)](out, seed, offset, n, BLOCK=128)
            assert torch.equal(out, philox_uniform(seed, torch.arange(n) + offset)), (seed, offset)


def test_fused_layer_norm_topk_module_runs_the_kernel_under_triton(rng):
    """LayerNormGroupTopKCompress with backend 'triton' runs the fused kernel, which selects what
    the row-block torch path selects (values to float tolerance, gradients too)."""
    from torch import nn

    from gsr_compiler.runtime.sparse import LayerNormGroupTopKCompress

    n, d, g, k = 21, 32, 16, 3
    norm = nn.LayerNorm(d)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=rng)
        norm.bias.normal_(0, 0.3, generator=rng)
    x = well_separated_input(n, d, g, k, rng, True, norm.weight, norm.bias).requires_grad_()
    module = LayerNormGroupTopKCompress(norm, k, g)
    results = {}
    for backend in ("triton", "torch"):
        module.kernel_backend = backend
        c = module(x)
        grads = torch.autograd.grad(c.values.square().sum(), [x, norm.weight, norm.bias])
        results[backend] = (c, grads)
    (ct, gt), (cr, gr) = results["triton"], results["torch"]
    assert torch.equal(ct.indices, cr.indices)
    torch.testing.assert_close(ct.values, cr.values, rtol=1e-5, atol=1e-5)
    for a, e in zip(gt, gr):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
