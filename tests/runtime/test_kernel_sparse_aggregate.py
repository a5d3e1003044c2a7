"""sparse_aggregate: Triton kernels (interpreted on CPU) vs the torch reference, forward and
backward, weighted and unweighted, with isolated nodes and ragged sizes; CSR helpers."""
import pytest
import torch

from gsr_compiler.runtime.kernels import (CSR, csr_from_edge_index, densify_group_topk,
                                          group_topk_reference, sparse_aggregate,
                                          sparse_aggregate_backward_reference,
                                          sparse_aggregate_reference)
from gsr_compiler.runtime.kernels.aggregate import (sparse_aggregate_backward_triton,
                                                    sparse_aggregate_forward_triton)

pytest.importorskip("triton", reason="triton is not importable")
pytestmark = [pytest.mark.triton_kernels, pytest.mark.interpreter_loops]

# (N, E, D, group_size, k)
CONFIGS = [
    (37, 90, 96, 32, 5),
    (23, 50, 64, 16, 3),
    (9, 0, 8, 8, 8),          # no edges: every output row must still be written (zeros)
    (5, 12, 16, 1, 1),        # group size 1: dense
    (12, 30, 512, 256, 7),    # uint8 indices up to 255
]


def make_inputs(n, e, d, g, k, rng, weighted, index_dtype=torch.int64):
    x = torch.randn(n, d, generator=rng)
    values, indices = group_topk_reference(x, k, g)
    # Leave the last node without in-edges and the first without out-edges.
    src = torch.randint(1, n, (e,), generator=rng) if n > 1 else torch.zeros(e, dtype=torch.long)
    dst = torch.randint(0, max(n - 1, 1), (e,), generator=rng)
    weight = torch.rand(e, generator=rng) if weighted else None
    csr = csr_from_edge_index(torch.stack([src, dst]), n, weight)
    csr = CSR(csr.rowptr.to(index_dtype), csr.col.to(index_dtype), csr.weight, csr.num_cols)
    return values, indices, csr


def dense_adjacency(csr):
    adj = torch.zeros(csr.num_rows, csr.num_cols)
    w = csr.weight if csr.weight is not None else torch.ones(csr.num_edges)
    for r in range(csr.num_rows):
        for e in range(int(csr.rowptr[r]), int(csr.rowptr[r + 1])):
            adj[r, int(csr.col[e])] += w[e]
    return adj


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_forward_matches_reference(config, weighted, rng, poisoned):
    n, e, d, g, k = config
    values, indices, csr = make_inputs(n, e, d, g, k, rng, weighted)
    out = poisoned(n, d)
    result = sparse_aggregate_forward_triton(values, indices, csr, g, out=out)
    assert result is out
    ref = sparse_aggregate_reference(values, indices, csr, g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # And against the definition, with the dense adjacency.
    torch.testing.assert_close(out, dense_adjacency(csr) @ densify_group_topk(values, indices, g),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(out[-1], torch.zeros(d)) or e == 0 or n == 1


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_backward_matches_reference(config, weighted, rng, poisoned):
    n, e, d, g, k = config
    values, indices, csr = make_inputs(n, e, d, g, k, rng, weighted)
    grad_out = torch.randn(n, d, generator=rng)
    csr_t = csr.transpose()
    grad_values = poisoned(n, d // g, k)
    result = sparse_aggregate_backward_triton(grad_out, indices, csr_t, g,
                                              grad_values=grad_values)
    assert result is grad_values
    ref = sparse_aggregate_backward_reference(grad_out, indices, csr_t, g)
    torch.testing.assert_close(grad_values, ref, rtol=1e-5, atol=1e-5)

    # Autograd through both paths agrees too.
    v_ref = values.clone().requires_grad_()
    sparse_aggregate(v_ref, indices, csr, g, backend="torch").backward(grad_out)
    v_tri = values.clone().requires_grad_()
    sparse_aggregate(v_tri, indices, csr, g, backend="triton").backward(grad_out)
    torch.testing.assert_close(v_tri.grad, v_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_values, v_ref.grad, rtol=1e-5, atol=1e-5)


def test_int32_indices_and_strided_output(rng, poisoned):
    values, indices, csr = make_inputs(21, 40, 48, 16, 4, rng, True, index_dtype=torch.int32)
    base = poisoned(21, 64)
    out = base[:, 8:56]
    sparse_aggregate_forward_triton(values, indices, csr, 16, out=out)
    torch.testing.assert_close(out, sparse_aggregate_reference(values, indices, csr, 16))
    assert torch.isnan(base[:, :8]).all() and torch.isnan(base[:, 56:]).all()


def test_deterministic_run_to_run(rng):
    values, indices, csr = make_inputs(30, 120, 64, 16, 4, rng, True)
    a = sparse_aggregate(values, indices, csr, 16, backend="triton")
    b = sparse_aggregate(values, indices, csr, 16, backend="triton")
    assert torch.equal(a, b)


def test_bipartite_graph_with_fewer_destinations(rng, poisoned):
    # Sources and destinations may differ in number (sampled blocks).
    n_src, n_dst, d, g, k = 17, 6, 32, 8, 2
    values, indices = group_topk_reference(torch.randn(n_src, d, generator=rng), k, g)
    edge_index = torch.stack([torch.randint(0, n_src, (40,), generator=rng),
                              torch.randint(0, n_dst, (40,), generator=rng)])
    csr = csr_from_edge_index(edge_index, n_src, num_dst=n_dst)
    assert csr.num_rows == n_dst and csr.num_cols == n_src
    out = sparse_aggregate_forward_triton(values, indices, csr, g, out=poisoned(n_dst, d))
    torch.testing.assert_close(out, sparse_aggregate_reference(values, indices, csr, g))
    grad = torch.randn(n_dst, d, generator=rng)
    gv = sparse_aggregate_backward_triton(grad, indices, csr.transpose(), g)
    torch.testing.assert_close(gv, sparse_aggregate_backward_reference(grad, indices,
                                                                       csr.transpose(), g))
