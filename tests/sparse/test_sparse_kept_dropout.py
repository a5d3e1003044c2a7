"""Dropout folded into the group top-k: on the torch path it draws what a separate dropout of
the kept values draws, bit for bit; eval, fixed-flag and p in {0, 1} behave as nn.Dropout; bad
probabilities are refused before anything runs."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

from gsr_compiler.runtime.sparse import (CompressedDropout, GroupTopKCompress,
                                         LayerNormGroupTopKCompress, group_topk_compress,
                                         layer_norm_group_topk_compress)


def _folded_and_separate(op, x, p, seed):
    """(values with dropout_p=p, values of a separate CompressedDropout), from one seed."""
    torch.manual_seed(seed)
    folded = op(x, dropout_p=p)
    torch.manual_seed(seed)
    separate = CompressedDropout(p)(op(x, dropout_p=0.0))
    return folded, separate


OPS = {
    "topk": lambda x, **kw: group_topk_compress(x, 3, 8, backend="torch", **kw),
    "norm-topk": lambda x, **kw: layer_norm_group_topk_compress(x, 3, 8, backend="torch", **kw),
}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.2, 0.7])
def test_folded_equals_separate_dropout_of_the_kept_values(op, dtype, p):
    x = torch.randn(41, 24, dtype=dtype, requires_grad=True)
    folded, separate = _folded_and_separate(OPS[op], x, p, seed=5)
    assert torch.equal(folded.indices, separate.indices)
    assert torch.equal(folded.values, separate.values)
    dropped = (folded.values == 0).float().mean().item()
    assert abs(dropped - p) < 0.1  # 41 * 3 * 3 values: the mask is drawn, not all or nothing
    grad = torch.randn(folded.values.shape, dtype=dtype)
    g_folded, = torch.autograd.grad(folded.values, x, grad)
    g_separate, = torch.autograd.grad(separate.values, x, grad)
    assert torch.equal(g_folded, g_separate)


def test_gradcheck_float64_with_a_fixed_mask():
    x = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)

    def f(x):
        torch.manual_seed(3)  # the same mask at every evaluation
        return group_topk_compress(x, 2, 8, backend="torch", dropout_p=0.4).values

    assert torch.autograd.gradcheck(f, (x,))


def test_p_zero_draws_nothing_and_p_one_zeros_everything():
    x = torch.randn(10, 16, requires_grad=True)
    state = torch.get_rng_state()
    c = group_topk_compress(x, 2, 8, backend="torch", dropout_p=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(c.values, group_topk_compress(x, 2, 8, backend="torch").values)
    z = group_topk_compress(x, 2, 8, backend="torch", dropout_p=1.0)
    assert torch.equal(z.values, torch.zeros_like(z.values))
    z.values.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_dropout_probability_raises_before_anything_runs(p):
    x = torch.randn(4, 8)
    state = torch.get_rng_state()
    for op in OPS.values():
        with pytest.raises(ValueError, match="dropout_p must be a probability in"):
            op(x, dropout_p=p)
    with pytest.raises(ValueError, match="dropout_p must be a probability in"):
        GroupTopKCompress(2, 8, dropout=p)
    assert torch.equal(torch.get_rng_state(), state)


def test_module_follows_train_and_eval_unless_the_flag_is_fixed():
    x = torch.randn(30, 16)
    plain = group_topk_compress(x, 2, 8, backend="torch").values
    follows = GroupTopKCompress(2, 8, dropout=0.5)
    assert not torch.equal(follows(x).values, plain)
    assert torch.equal(follows.eval()(x).values, plain)
    always = GroupTopKCompress(2, 8, dropout=0.5, dropout_training=True).eval()
    assert not torch.equal(always(x).values, plain)
    never = GroupTopKCompress(2, 8, dropout=0.5, dropout_training=False)
    assert torch.equal(never(x).values, plain)
    assert "dropout=0.5, dropout_training=True" in repr(always)
    assert "dropout" not in repr(GroupTopKCompress(2, 8))


def test_norm_module_keeps_the_layer_norm_state_and_applies_its_dropout():
    norm = nn.LayerNorm(16)
    fused = LayerNormGroupTopKCompress(norm, 2, 8, dropout=0.3)
    assert list(fused.state_dict()) == list(norm.state_dict())
    x = torch.randn(20, 16)
    torch.manual_seed(1)
    got = fused(x)
    torch.manual_seed(1)
    want = CompressedDropout(0.3)(group_topk_compress(norm(x), 2, 8, backend="torch"))
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.values, want.values)


def test_module_pickled_before_dropout_existed_runs_without_it():
    module = GroupTopKCompress(2, 8)
    for name in ("dropout", "dropout_training"):
        delattr(module, name)
    restored = pickle.loads(pickle.dumps(module))
    x = torch.randn(6, 16)
    assert torch.equal(restored(x).values, group_topk_compress(x, 2, 8, backend="torch").values)
    buffer = io.BytesIO()
    torch.save(copy.deepcopy(GroupTopKCompress(2, 8, dropout=0.25)), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).dropout == 0.25
