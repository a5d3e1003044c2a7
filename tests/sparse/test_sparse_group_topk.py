"""group_topk / group_topk_compress / GroupTopK: forward, gradient, ties, index dtypes, errors."""
import pytest
import torch
from torch.autograd import gradcheck

from gsr_compiler.runtime.sparse import (CompressedActivation, GroupTopK, group_topk,
                                         group_topk_compress, index_dtype_for_group)
from gsr_compiler.runtime.sparse.topk import _GroupTopK, _GroupTopKCompress

from sparse_reference import reference_topk, reference_topk_mask

SHAPES = [  # (N, D, group, k)
    (37, 128, 64, 8), (37, 128, 8, 1), (37, 128, 16, 2), (5, 24, 8, 8), (5, 24, 8, 7),
    (9, 40, 40, 3), (4, 12, 1, 1), (0, 16, 8, 2),
]


@pytest.mark.parametrize("n,d,g,k", SHAPES)
def test_forward_matches_reference(n, d, g, k):
    x = torch.randn(n, d)
    expected = reference_topk(x, k, g)
    assert torch.equal(group_topk(x, k, g), expected)
    c = group_topk_compress(x, k, g)
    assert isinstance(c, CompressedActivation)
    assert c.values.shape == c.indices.shape == (n, d // g, k)
    assert c.values.dtype == x.dtype and c.indices.dtype == torch.uint8
    assert (c.width, c.group, c.k) == (d, g, k)
    assert torch.equal(c.to_dense(), expected)
    if n:
        assert bool((c.indices[..., 1:] > c.indices[..., :-1]).all())  # strictly ascending


def test_noncontiguous_and_float16_input():
    x = torch.randn(64, 20).t()  # [20, 64], not contiguous
    assert torch.equal(group_topk(x, 3, 16), reference_topk(x, 3, 16))
    h = torch.randn(10, 32).half()
    assert torch.equal(group_topk(h, 2, 8), reference_topk(h, 2, 8))
    assert group_topk_compress(h, 2, 8).values.dtype == torch.float16


@pytest.mark.parametrize("g,k", [(8, 1), (8, 3), (16, 2), (4, 4)])
def test_gradcheck_group_topk(g, k):
    x = torch.randn(6, 2 * g, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: group_topk(t, k, g), (x,))
    assert gradcheck(lambda t: group_topk_compress(t, k, g).values, (x,))
    assert gradcheck(lambda t: group_topk_compress(t, k, g).to_dense(), (x,))


def test_gradient_only_through_kept_positions():
    x = torch.randn(11, 32, requires_grad=True)
    up = torch.randn(11, 32)
    group_topk(x, 3, 16).backward(up)
    mask = reference_topk_mask(x.detach(), 3, 16)
    assert torch.equal(x.grad, torch.where(mask, up, torch.zeros_like(up)))


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_all_equal_rows_keep_lowest_positions(k):
    x = torch.full((4, 16), 0.5)
    c = group_topk_compress(x, k, 8)
    assert torch.equal(c.indices.long(), torch.arange(k).expand(4, 2, k))
    assert torch.equal(group_topk(x, k, 8), reference_topk(x, k, 8))


def test_boundary_ties_go_to_lower_positions():
    row = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.0, 2.0, -1.0])
    x = torch.stack([row, row.flip(0), torch.zeros(8), -torch.zeros(8)])
    x = torch.cat([x, torch.randn(4, 8)], 1)  # a second group without ties
    for k in (1, 2, 3, 4, 5):
        expected = reference_topk(x, k, 8)
        assert torch.equal(group_topk(x, k, 8), expected), k
        assert torch.equal(group_topk_compress(x, k, 8).to_dense(), expected), k
    idx = group_topk_compress(x, 3, 8).indices[0, 0].tolist()
    assert idx == [0, 2, 3]                       # 3.0, then the first two 2.0s


def test_nan_counts_as_the_largest_value():
    nan = float("nan")
    x = torch.tensor([[1.0, nan, 3.0, 2.0], [nan, nan, 0.0, nan], [4.0, 3.0, 2.0, 1.0]])
    assert group_topk_compress(x, 2, 4).indices[:, 0].tolist() == [[1, 2], [0, 1], [0, 1]]
    assert group_topk_compress(x, 3, 4).indices[:, 0].tolist() == [[1, 2, 3], [0, 1, 3], [0, 1, 2]]


def test_ties_deterministic_under_many_rows():
    # Rounded values: lots of boundary ties, mixed with unique rows (exercises the exact fallback).
    x = torch.randint(-3, 4, (2000, 64)).float()
    x[::2] = torch.randn(1000, 64)
    expected = reference_topk(x, 4, 16)
    for _ in range(3):
        assert torch.equal(group_topk(x, 4, 16), expected)
        assert torch.equal(group_topk_compress(x, 4, 16).to_dense(), expected)


def test_negative_and_zero_values():
    x = -torch.rand(7, 16) - 0.1  # all negative: top-k still keeps k (unlike ReLU)
    out = group_topk(x, 2, 8)
    assert int((out != 0).sum()) == 7 * 2 * 2
    assert torch.equal(out, reference_topk(x, 2, 8))


@pytest.mark.parametrize("g,dtype", [(1, torch.uint8), (256, torch.uint8), (257, torch.int16),
                                     (32767, torch.int16), (32768, torch.int32)])
def test_index_dtype_selection(g, dtype):
    assert index_dtype_for_group(g) == dtype


@pytest.mark.parametrize("g,dtype", [(256, torch.uint8), (300, torch.int16), (40000, torch.int32)])
def test_index_dtype_used(g, dtype):
    x = torch.randn(2, 2 * g)
    c = group_topk_compress(x, 3, g)
    assert c.indices.dtype == dtype
    assert torch.equal(c.to_dense(), reference_topk(x, 3, g))
    # The dense-output op saves the same dtype.
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        group_topk(x.requires_grad_(), 3, g)
    assert saved == [dtype]


def test_module_wrapper():
    m = GroupTopK(2, 8)
    assert repr(m) == "GroupTopK(k=2, group=8)"
    x = torch.randn(5, 32)
    assert torch.equal(m(x), reference_topk(x, 2, 8))
    assert list(m.parameters()) == [] and m.state_dict() == {}


BAD = [  # (x shape, k, group, message fragment)
    ((4, 16), 0, 8, "k must be an integer in 1..g=8"),
    ((4, 16), 9, 8, "k must be an integer in 1..g=8"),
    ((4, 16), 2.0, 8, "k must be an integer"),
    ((4, 16), True, 8, "k must be an integer"),
    ((4, 16), 2, 0, "positive integer"),
    ((4, 16), 2, 6, "g=6 does not divide the feature width D=16"),
    ((16,), 2, 8, "shape [N, D]"),
    ((2, 4, 16), 2, 8, "reshape it first"),
]


@pytest.mark.parametrize("shape,k,g,msg", BAD)
@pytest.mark.parametrize("fn", [group_topk, group_topk_compress])
def test_bad_input_raises_before_computing(monkeypatch, fn, shape, k, g, msg):
    def boom(*a, **kw):
        raise AssertionError("computation started before the arguments were checked")
    monkeypatch.setattr(_GroupTopK, "forward", staticmethod(boom))
    monkeypatch.setattr(_GroupTopKCompress, "forward", staticmethod(boom))
    x = torch.randn(*shape, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        fn(x, k, g)
    assert torch.equal(x.detach(), before) and x.grad is None


def test_bad_dtype_and_module_arguments():
    with pytest.raises(ValueError, match="floating-point"):
        group_topk(torch.ones(2, 8, dtype=torch.long), 1, 4)
    with pytest.raises(ValueError, match="k must be an integer in 1..g=4"):
        GroupTopK(5, 4)
    m = GroupTopK(1, 3)
    with pytest.raises(ValueError, match="divisors of 16"):
        m(torch.randn(2, 16))
