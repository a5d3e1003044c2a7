"""compressed_linear == F.linear(c.to_dense(), W, b), forward and gradients."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from gsr_compiler.runtime.sparse import compressed_linear, group_topk_compress

from sparse_reference import reference_topk


@pytest.mark.parametrize("n,d,g,k,o,bias", [(50, 128, 64, 8, 32, True), (50, 128, 8, 1, 16, False),
                                            (7, 24, 8, 3, 5, True), (0, 16, 8, 2, 4, True)])
def test_forward_and_grads_match_dense(n, d, g, k, o, bias):
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    lin = torch.nn.Linear(d, o, bias=bias).double()
    up = torch.randn(n, o, dtype=torch.float64)

    out = compressed_linear(group_topk_compress(x, k, g), lin.weight, lin.bias)
    grads = torch.autograd.grad(out, [x, *lin.parameters()], up)

    x_ref = x.detach().clone().requires_grad_()
    # Independent dense reference: mask from ranks, then a plain Linear.
    ref = lin(x_ref * (reference_topk(x_ref.detach(), k, g) != 0))
    grads_ref = torch.autograd.grad(ref, [x_ref, *lin.parameters()], up)

    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_float32_matches_f_linear():
    x = torch.randn(300, 64)
    w, b = torch.randn(48, 64), torch.randn(48)
    c = group_topk_compress(x, 2, 16)
    torch.testing.assert_close(compressed_linear(c, w, b), F.linear(c.to_dense(), w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_runs_in_its_dtype_as_f_linear(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g, requires_grad=True)
    lin = torch.nn.Linear(64, 48)
    up = torch.randn(300, 48, generator=g)
    results = []
    for compressed in (True, False):
        with torch.autocast("cpu", dtype=dtype):
            c = group_topk_compress(x, 2, 16)
            out = compressed_linear(c, lin.weight, lin.bias) if compressed else lin(c.to_dense())
        results.append((out, torch.autograd.grad(out, [x, *lin.parameters()], up.to(dtype))))
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == ref.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads, ref_grads):  # gradients come back in each input's own dtype
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("g,k", [(8, 1), (8, 3)])
def test_gradcheck(g, k):
    x = torch.randn(6, 2 * g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 2 * g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x, w, b: compressed_linear(group_topk_compress(x, k, g), w, b), (x, w, b))
    assert gradcheck(lambda x, w: compressed_linear(group_topk_compress(x, k, g), w), (x, w))
    assert gradgradcheck(lambda x, w, b: compressed_linear(group_topk_compress(x, k, g), w, b), (x, w, b))


def test_only_weight_needs_grad():
    x = torch.randn(10, 16)
    w = torch.randn(3, 16, requires_grad=True)
    c = group_topk_compress(x, 2, 8)
    compressed_linear(c, w).sum().backward()
    torch.testing.assert_close(w.grad, c.to_dense().sum(0).expand(3, 16))


def test_bad_input():
    c = group_topk_compress(torch.randn(4, 16), 2, 8)
    with pytest.raises(ValueError, match=r"weight must be \[out_features, 16\]"):
        compressed_linear(c, torch.randn(3, 15))
    with pytest.raises(ValueError, match=r"bias must be \[3\]"):
        compressed_linear(c, torch.randn(3, 16), torch.randn(4))
    with pytest.raises(ValueError, match="dtype"):
        compressed_linear(c, torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="CompressedActivation"):
        compressed_linear(torch.randn(4, 16), torch.randn(3, 16))


def test_backward_in_row_chunks_matches_dense(monkeypatch):
    import gsr_compiler.runtime.sparse.linear as mod

    monkeypatch.setattr(mod, "_ROW_CHUNK_ELEMENTS", 64)  # 2 rows of width 32 per chunk: 25 chunks
    x = torch.randn(49, 32, dtype=torch.float64, requires_grad=True)
    lin = torch.nn.Linear(32, 12).double()
    up = torch.randn(49, 12, dtype=torch.float64)
    grads = torch.autograd.grad(compressed_linear(group_topk_compress(x, 3, 8), lin.weight, lin.bias),
                                [x, *lin.parameters()], up)
    x_ref = x.detach().clone().requires_grad_()
    ref = lin(x_ref * (reference_topk(x_ref.detach(), 3, 8) != 0))
    for a, b in zip(grads, torch.autograd.grad(ref, [x_ref, *lin.parameters()], up)):
        torch.testing.assert_close(a, b)
