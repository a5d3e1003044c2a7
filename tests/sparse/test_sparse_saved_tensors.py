"""What autograd keeps is the compressed form: count saved bytes (one entry per storage)."""
import pytest
import torch
import torch.nn.functional as F

from gsr_compiler.runtime.sparse import (compressed_aggregate, compressed_linear, compression_ratio,
                                         group_topk, group_topk_compress)

from sparse_reference import SavedTensorLog

N, D = 4096, 128


@pytest.mark.parametrize("g", [64, 8])  # G = 2 and G = 16, k = g/8
def test_topk_then_linear_saves_only_compressed(g):
    k = g // 8
    x = torch.randn(N, D, requires_grad=True)
    lin = torch.nn.Linear(D, D)
    dense_bytes = N * D * 4

    baseline = SavedTensorLog(exclude=tuple(lin.parameters()))
    with baseline.hooks():
        lin(F.relu(x))
    assert baseline.nbytes == dense_bytes          # the counter sees ReLU's dense output

    log = SavedTensorLog(exclude=tuple(lin.parameters()))
    with log.hooks():
        out = compressed_linear(group_topk_compress(x, k, g), lin.weight, lin.bias)
    G = D // g
    assert log.nbytes == N * G * k * (4 + 1)       # fp32 values + uint8 indices
    assert dense_bytes / log.nbytes == pytest.approx(compression_ratio(D, k, g)) == 6.4
    assert all(shape != (N, D) for shape, _ in log.shapes)
    assert {dt for shape, dt in log.shapes if shape == (N, G, k)} == {torch.float32, torch.uint8}
    out.sum().backward()                            # and backward works from what was saved
    assert x.grad is not None


def test_group_topk_saves_only_uint8_indices():
    x = torch.randn(N, D, requires_grad=True)
    log = SavedTensorLog()
    with log.hooks():
        group_topk(x, 2, 16)
    assert log.shapes == [((N, D // 16, 2), torch.uint8)]
    assert log.nbytes == N * (D // 16) * 2


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_aggregate_saves_compressed_and_graph_only(reduce):
    g, k = 16, 2
    x = torch.randn(N, D, requires_grad=True)
    edge_index = torch.randint(0, N, (2, 3 * N))
    edge_weight = torch.rand(3 * N, requires_grad=True)
    log = SavedTensorLog(exclude=(edge_index, edge_weight))
    with log.hooks():
        out = compressed_aggregate(group_topk_compress(x, k, g), edge_index, N, reduce, edge_weight)
    assert log.nbytes == N * (D // g) * k * (4 + 1)
    assert all(shape != (N, D) for shape, _ in log.shapes)
    out.sum().backward()
    assert x.grad is not None and edge_weight.grad is not None
