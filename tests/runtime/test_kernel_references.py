"""The torch side of the kernels, which runs without triton: Philox dropout statistics, argument
checks, CSR helpers and the CPU choice of backend."""
import pytest
import torch

from gsr_compiler.runtime.kernels import (CSR, csr_from_edge_index, dropout_keep_mask, group_topk,
                                          group_topk_reference, philox_uniform, sparse_aggregate,
                                          use_triton)


def dense_adjacency(csr):
    adj = torch.zeros(csr.num_rows, csr.num_cols)
    w = csr.weight if csr.weight is not None else torch.ones(csr.num_edges)
    for r in range(csr.num_rows):
        for e in range(int(csr.rowptr[r]), int(csr.rowptr[r + 1])):
            adj[r, int(csr.col[e])] += w[e]
    return adj


def test_dropout_statistics():
    p = 0.3
    keep = dropout_keep_mask(seed=2024, offset=0, shape=(200_000,), p=p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.005
    u = philox_uniform(5, torch.arange(100_000))
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert bool(((hist - 0.1).abs() < 0.005).all())
    # Neighbouring counters are not correlated.
    corr = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()
    assert abs(corr) < 0.02


def test_group_topk_argument_checks():
    x = torch.randn(4, 48)
    with pytest.raises(ValueError, match="power of two"):
        group_topk(x, 2, 24)
    with pytest.raises(ValueError, match="multiple"):
        group_topk(x, 2, 32)
    with pytest.raises(ValueError, match="k must be"):
        group_topk(x, 17, 16)
    with pytest.raises(ValueError, match="dropout_p"):
        group_topk(x, 2, 16, dropout_p=1.0)
    with pytest.raises(ValueError, match="256"):
        group_topk(torch.randn(2, 512), 2, 512)


def test_auto_backend_on_cpu_is_the_reference(rng):
    x = torch.randn(5, 32, generator=rng)
    v, i = group_topk(x, 3, 16, layer_norm=True)
    v_ref, i_ref = group_topk_reference(x, 3, 16, layer_norm=True)
    assert torch.equal(v, v_ref) and torch.equal(i, i_ref)


def test_csr_helpers_round_trip(rng):
    n = 11
    edge_index = torch.randint(0, n, (2, 35), generator=rng)
    weight = torch.rand(35, generator=rng)
    csr = csr_from_edge_index(edge_index, n, weight)
    adj = torch.zeros(n, n)
    adj.index_put_((edge_index[1], edge_index[0]), weight, accumulate=True)
    torch.testing.assert_close(dense_adjacency(csr), adj)
    torch.testing.assert_close(dense_adjacency(csr.transpose()), adj.t())
    twice = csr.transpose().transpose()
    assert torch.equal(twice.rowptr, csr.rowptr)   # within a row, entries end up sorted by col
    torch.testing.assert_close(dense_adjacency(twice), adj)
    # Edges into one destination keep their edge_index order (fixes the summation order).
    for r in range(n):
        cols = edge_index[0][edge_index[1] == r]
        assert torch.equal(csr.col[int(csr.rowptr[r]):int(csr.rowptr[r + 1])], cols)


def test_sparse_aggregate_argument_checks(rng):
    values, indices = group_topk_reference(torch.randn(8, 32, generator=rng), 2, 16)
    csr = csr_from_edge_index(torch.randint(0, 8, (2, 10), generator=rng), 8,
                              torch.rand(10, generator=rng))
    with pytest.raises(ValueError, match="uint8"):
        sparse_aggregate(values, indices.long(), csr, 16)
    with pytest.raises(ValueError, match="power of two"):
        sparse_aggregate(values, indices, csr, 24)
    with pytest.raises(ValueError, match="source nodes"):
        sparse_aggregate(values[:4], indices[:4], csr, 16)
    with pytest.raises(ValueError, match="constants"):
        w = csr.weight.clone().requires_grad_()
        sparse_aggregate(values, indices, CSR(csr.rowptr, csr.col, w, csr.num_cols), 16)


def test_auto_backend_never_picks_triton_for_cpu_tensors():
    assert not use_triton("auto", torch.zeros(1))
    assert not use_triton("torch", torch.zeros(1))
    with pytest.raises(ValueError, match="backend"):
        use_triton("cuda", torch.zeros(1))
