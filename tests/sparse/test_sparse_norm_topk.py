"""layer_norm_group_topk_compress: LayerNorm and the group top-k in one op, in row blocks."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsr_compiler.runtime.sparse import (LayerNormGroupTopKCompress, group_topk_compress,
                                         layer_norm_group_topk_compress, norm_topk)

from sparse_reference import SavedTensorLog


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so that every test crosses several, the last one ragged."""
    monkeypatch.setattr(norm_topk, "_BLOCK_ELEMENTS", 40)


def _affine(d, dtype):
    return (torch.rand(d, dtype=dtype) + 0.5).requires_grad_(), \
        (torch.randn(d, dtype=dtype) * 0.3).requires_grad_()


def _two_ops(x, k, g, w, b, eps=1e-5):
    return group_topk_compress(F.layer_norm(x, (x.shape[1],), w, b, eps), k, g, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # native and torch selection
@pytest.mark.parametrize("rows,d,g,k", [(0, 8, 4, 2), (1, 8, 8, 3), (37, 16, 8, 2), (29, 24, 8, 7)])
@pytest.mark.parametrize("affine", [True, False])
def test_equals_layer_norm_then_topk(small_blocks, dtype, rows, d, g, k, affine):
    x = torch.randn(rows, d, dtype=dtype, requires_grad=True)
    w, b = _affine(d, dtype) if affine else (None, None)
    got = layer_norm_group_topk_compress(x, k, g, w, b, backend="torch")
    want = _two_ops(x, k, g, w, b)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.values, want.values)  # the same row-wise LayerNorm kernel
    grad = torch.randn(got.values.shape, dtype=dtype)
    leaves = [x] + ([w, b] if affine else [])
    g_got = torch.autograd.grad(got.values, leaves, grad)
    g_want = torch.autograd.grad(want.values, leaves, grad)
    assert torch.equal(g_got[0], g_want[0])  # row-wise: bit for bit
    for a, e in zip(g_got[1:], g_want[1:]):  # summed over blocks: to rounding
        torch.testing.assert_close(a, e)


def test_gradcheck_float64(small_blocks):
    x = torch.randn(13, 16, dtype=torch.float64, requires_grad=True)
    w, b = _affine(16, torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, w, b: layer_norm_group_topk_compress(x, 3, 8, w, b, backend="torch").values,
        (x, w, b))


def test_keeps_its_input_row_statistics_and_indices_only(small_blocks):
    n, d, g, k = 50, 16, 8, 2
    x = torch.randn(n, d, requires_grad=True)
    w, b = _affine(d, torch.float32)
    log = SavedTensorLog(exclude=(w, b))
    with log.hooks():
        layer_norm_group_topk_compress(x, k, g, w, b, backend="torch")
    # x (which a LayerNorm keeps anyway), mean and 1/std per row, one uint8 per kept value:
    # no normalized [N, D] tensor and no values.
    assert log.nbytes == n * d * 4 + 2 * n * 4 + n * (d // g) * k


def test_module_takes_the_norm_s_place():
    norm = nn.LayerNorm(16)
    fused = LayerNormGroupTopKCompress(norm, 2, 8)
    assert fused.weight is norm.weight and fused.bias is norm.bias
    assert list(fused.state_dict()) == list(norm.state_dict())
    x = torch.randn(9, 16)
    got = fused(x)
    want = group_topk_compress(norm(x), 2, 8)
    assert torch.equal(got.values, want.values) and torch.equal(got.indices, want.indices)
    with pytest.raises(ValueError, match=r"expects \[N, 16\]"):
        fused(torch.randn(9, 8))
    with pytest.raises(ValueError, match="over the last dimension only"):
        LayerNormGroupTopKCompress(nn.LayerNorm((4, 4)), 2, 8)


@pytest.mark.parametrize("kwargs, message", [
    ({"weight": torch.ones(8)}, r"weight must be \[16\]"),
    ({"bias": torch.ones(16, 1)}, r"bias must be \[16\]"),
    ({"k": 9}, "k"),
])
def test_bad_input_is_refused_before_any_work(kwargs, message):
    x = torch.randn(5, 16)
    args = {"k": 2, "group": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        layer_norm_group_topk_compress(x, **args)


class _NormReadTwice(nn.Module):
    """``conv(relu(n)) + n`` with ``n = norm(h)``: the normalized tensor is needed dense."""

    def __init__(self, d):
        super().__init__()
        import torch_geometric.nn as pyg

        self.norm, self.conv = nn.LayerNorm(d), pyg.SAGEConv(d, d)

    def forward(self, h, edge_index, edge_attr=None, batch=None):
        n = self.norm(h)
        return self.conv(F.relu(n), edge_index) + n


def test_compiler_fuses_a_norm_that_only_the_relu_reads():
    import sys
    from pathlib import Path

    import torch_geometric.nn as pyg

    from gsr_compiler import gsr_compile
    from gsr_compiler.runtime.reversible import ReversibleChain
    from gsr_compiler.runtime.sparse import GroupTopKCompress

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from core.models import D, Branch, DeepResidual, graph_inputs

    def topks(gsr):
        return [type(m) for c in gsr.graph_module.modules() if isinstance(c, ReversibleChain)
                for m in c.modules() if isinstance(m, GroupTopKCompress)]

    inputs = graph_inputs()
    fused = gsr_compile(DeepResidual(lambda: Branch(pyg.SAGEConv(D, D), nn.LayerNorm(D))).double(),
                        sparse_k=2, example_inputs=inputs)
    assert topks(fused) == [LayerNormGroupTopKCompress] * 6
    assert "LayerNorm fused into the top-k x6" in fused.explain()
    apart = gsr_compile(DeepResidual(lambda: _NormReadTwice(D)).double(), sparse_k=2,
                        example_inputs=inputs)
    assert topks(apart) == [GroupTopKCompress] * 6
    assert "LayerNorm fused" not in apart.explain()
