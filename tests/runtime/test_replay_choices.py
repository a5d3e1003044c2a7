"""The forward records small-margin discrete choices; the backward recompute repeats them.

Each selection path (torch top-k, native C++ top-k, row-blocked LayerNorm + top-k, the Triton
kernel with and without its LayerNorm and dropout) and the ReLU are run once recording on ``x``
and once replaying on ``x`` moved just enough to flip its near-ties: the replay must keep the
forward's choices there, take the moved input's values at those choices, and send gradients to
them.
"""
import pytest
import torch
import torch.nn.functional as F

from gsr_compiler.runtime.choices import (ChoiceTape, _pack_positions, _unpack_positions,
                                          selection_margin)
from gsr_compiler.runtime.kernels.topk import group_topk as kernel_group_topk
from gsr_compiler.runtime.native import native_group_topk, native_topk_available
from gsr_compiler.runtime.replayed_relu import ReplayedReLU
from gsr_compiler.runtime.sparse import group_topk, group_topk_compress, select_group_topk
from gsr_compiler.runtime.sparse.norm_topk import layer_norm_group_topk_compress

G_WIDTH, K = 8, 4


def near_tied(n=64, groups=2, seed=0, dtype=torch.float32):
    """Rows whose k-th and (k+1)-th largest values of every group differ by 1e-6 (relative),
    and a copy moved by 1e-5 that swaps them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, groups, G_WIDTH, generator=g, dtype=dtype)
    order = x.sort(-1, descending=True).indices
    kth, nxt = order[..., K - 1:K], order[..., K:K + 1]
    base = x.gather(-1, kth)
    tied = x.scatter(-1, nxt, base * (1 - 1e-6) - 1e-6 * (base <= 0).to(dtype))
    moved = tied.scatter(-1, nxt, tied.gather(-1, kth) + 1e-5)
    return tied.reshape(n, -1), moved.reshape(n, -1)


def kept_sets(indices):
    return indices.long().sort(-1).values


def record_then_replay(op, x, moved, margin=1e-4):
    """op(t) -> (values, indices) under a recording site on x, then a replaying site on moved."""
    tape = ChoiceTape(margin)
    with torch.no_grad(), tape.site(0, 0, replay=False):
        values_f, idx_f = op(x)
    tape.keep({})
    assert tape.stats.recorded > 0
    leaf = moved.clone().requires_grad_()
    with tape.site(0, 0, replay=True):
        values_r, idx_r = op(leaf)
    tape.settle()
    return tape, (values_f, idx_f), (values_r, idx_r), leaf


def check_replayed(tape, forward, replayed, leaf, moved, group_values):
    (_, idx_f), (values_r, idx_r) = forward, replayed
    # the moved input alone selects differently on the near-tied rows...
    assert tape.stats.forced > 0
    # ...but the replay kept the forward's sets, with the moved input's values there
    assert torch.equal(kept_sets(idx_r), kept_sets(idx_f))
    expected = group_values(moved).gather(-1, idx_r.long())
    torch.testing.assert_close(values_r.detach(), expected, rtol=1e-5, atol=1e-6)
    # and the gradient reaches the input through the kept positions only
    (values_r * torch.randn_like(values_r)).sum().backward()
    grad = leaf.grad.reshape(group_values(moved).shape)
    kept = torch.zeros_like(grad, dtype=torch.bool).scatter(-1, idx_r.long(), True)
    if group_values is grouped:  # no LayerNorm: exactly the kept positions
        assert torch.equal(grad != 0, kept)


def grouped(t):
    return t.detach().reshape(t.shape[0], -1, G_WIDTH)


@pytest.mark.parametrize("native", [False, True])
def test_torch_and_native_selections_replay_the_forward(native, monkeypatch):
    if native and not native_topk_available():
        pytest.skip("no C++ compiler")
    if not native:
        monkeypatch.setattr("gsr_compiler.runtime.sparse.topk.native_topk_covers", lambda x: False)
    x, moved = near_tied()
    with torch.no_grad():  # without replay the moved input flips the near ties
        assert not torch.equal(group_topk_compress(moved, K, G_WIDTH, backend="torch").indices,
                               group_topk_compress(x, K, G_WIDTH, backend="torch").indices)

    def op(t):
        c = group_topk_compress(t, K, G_WIDTH, backend="torch")
        return c.values, c.indices

    tape, fwd, rep, leaf = record_then_replay(op, x, moved)
    check_replayed(tape, fwd, rep, leaf, moved, grouped)


def test_dense_group_topk_replays_the_forward():
    x, moved = near_tied()
    tape = ChoiceTape(1e-4)
    with torch.no_grad(), tape.site(0, 0, replay=False):
        forward = group_topk(x, K, G_WIDTH)
    leaf = moved.clone().requires_grad_()
    with tape.site(0, 0, replay=True):
        replayed = group_topk(leaf, K, G_WIDTH)
    assert tape.settle().forced > 0
    kept = forward != 0
    assert torch.equal(replayed.detach() != 0, kept)
    assert torch.equal(replayed.detach()[kept], moved[kept])
    replayed.sum().backward()
    assert torch.equal(leaf.grad != 0, kept)


def layer_norm_of(t):
    return F.layer_norm(t.detach().float(), (t.shape[1],)).reshape(t.shape[0], -1, G_WIDTH)


def test_row_blocked_layer_norm_topk_replays_the_forward(monkeypatch):
    # several row blocks, so records are split and found again by row
    monkeypatch.setattr("gsr_compiler.runtime.sparse.norm_topk._BLOCK_ELEMENTS", 16 * 16)
    x, moved = near_tied(n=96)
    # LayerNorm moves the ties: re-tie them after normalization
    x = _tie_after_layer_norm(x)
    moved = _tie_after_layer_norm(x, move=True)

    def op(t):
        c = layer_norm_group_topk_compress(t, K, G_WIDTH, backend="torch")
        return c.values, c.indices

    tape, fwd, rep, leaf = record_then_replay(op, x, moved, margin=1e-3)
    check_replayed(tape, fwd, rep, leaf, moved, layer_norm_of)


def _tie_after_layer_norm(x, move=False):
    """x whose LayerNorm output has near-tied k-th/(k+1)-th values (moved: swapped)."""
    mean, std = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True).add(1e-5).sqrt()
    h = ((x - mean) / std).reshape(x.shape[0], -1, G_WIDTH)
    order = h.sort(-1, descending=True).indices
    kth, nxt = order[..., K - 1:K], order[..., K:K + 1]
    delta = 3e-4 if move else -3e-6
    h = h.scatter(-1, nxt, h.gather(-1, kth) + delta)
    return (h.reshape(x.shape) * std + mean).contiguous()


@pytest.mark.parametrize("layer_norm,dropout", [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_triton_kernel_replays_the_forward(layer_norm, dropout):
    x, moved = near_tied(n=32)
    if layer_norm:
        x = _tie_after_layer_norm(x)
        moved = _tie_after_layer_norm(x, move=True)

    def op(t):
        return kernel_group_topk(t, K, G_WIDTH, layer_norm=layer_norm, dropout_p=dropout,
                                 seed=7, backend="triton")

    tape, fwd, rep, leaf = record_then_replay(op, x, moved, margin=1e-3)
    (_, idx_f), (values_r, idx_r) = fwd, rep
    assert tape.stats.forced > 0
    assert torch.equal(kept_sets(idx_r), kept_sets(idx_f))
    # the forced rows get the values the torch reference computes at the forced positions
    ref = layer_norm_of(moved) if layer_norm else grouped(moved)
    expected = ref.gather(-1, idx_r.long())
    if dropout:
        from gsr_compiler.runtime.kernels.philox import dropout_keep_mask
        keep = dropout_keep_mask(7, 0, tuple(idx_r.shape), dropout)
        expected = torch.where(keep, expected / (1 - dropout), torch.zeros(()))
    torch.testing.assert_close(values_r.detach(), expected, rtol=1e-4, atol=1e-5)


def test_kernel_margins_equal_the_torch_margins():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 4 * G_WIDTH, generator=g)
    x[3, :G_WIDTH] = 1.0  # all tied: margin 0
    from gsr_compiler.runtime.kernels.topk import group_topk_forward_triton
    margin = torch.empty(40, 4)
    group_topk_forward_triton(x, K, G_WIDTH, margin=margin)
    idx, nxt = select_group_topk(grouped(x), K, following=True)
    expected = selection_margin(grouped(x).gather(-1, idx), nxt)
    torch.testing.assert_close(margin, expected, rtol=1e-6, atol=0)
    assert margin[3, 0] == 0


@pytest.mark.parametrize("k", [1, 2, 4, 7, 8])
def test_following_value_is_the_k_plus_first_largest(k):
    g = torch.Generator().manual_seed(k)
    xg = torch.randn(50, 3, G_WIDTH, generator=g).round(decimals=1)  # many ties
    idx, nxt = select_group_topk(xg, k, following=True)
    ordered = torch.sort(xg, dim=-1, descending=True, stable=True).values
    expected = ordered[..., k] if k < G_WIDTH else torch.full(xg.shape[:-1], -float("inf"))
    assert torch.equal(nxt, expected)
    if native_topk_available() and k < G_WIDTH:
        _, _, native_next = native_group_topk(xg, k, following=True)
        assert torch.equal(native_next, expected)


def test_selection_margin_records_ties_and_nan_never_full_groups():
    values = torch.tensor([[[3.0, 2.0]], [[3.0, 2.0]], [[float("nan"), 1.0]], [[1.0, 1.0]]])
    following = torch.tensor([[1.0], [2.0], [0.5], [-float("inf")]])
    m = selection_margin(values, following)
    assert m[0, 0] == pytest.approx(1 / 3)
    assert m[1, 0] == 0 and m[2, 0] == 0 and m[3, 0] == float("inf")


def test_positions_pack_and_unpack():
    g = torch.Generator().manual_seed(0)
    for group, k in [(8, 3), (13, 5), (64, 32), (256, 1)]:
        pos = torch.stack([torch.randperm(group, generator=g)[:k].sort().values for _ in range(20)])
        packed = _pack_positions(pos, group)
        assert packed.dtype == torch.uint8 and packed.shape == (20, (group + 7) // 8)
        assert torch.equal(_unpack_positions(packed, group, k), pos)


@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_replayed_relu_is_relu_outside_a_chain_and_replays_signs_inside(slope):
    relu = ReplayedReLU(slope)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 16, generator=g)
    x[0, :3] = torch.tensor([1e-7, -1e-7, 0.0])
    x[2, 5] = float("nan")  # a row with NaN records nothing and still computes relu
    plain = F.relu(x) if slope == 0 else F.leaky_relu(x, slope)
    assert torch.equal(relu(x).nan_to_num(-9), plain.nan_to_num(-9))
    tape = ChoiceTape(1e-4)
    with torch.no_grad(), tape.site(3, 1, replay=False):
        assert torch.equal(relu(x).nan_to_num(-9), plain.nan_to_num(-9))
    moved = x.clone()
    moved[0, :2] = -moved[0, :2]  # the near-zero pair crosses 0
    moved[1, 0] = 3e-5 * moved[1].norm() / 4  # unrecorded, within half the margin: unsafe
    leaf = moved.clone().requires_grad_()
    with tape.site(3, 1, replay=True):
        out = relu(leaf)
    out.sum().backward()
    # the crossed elements keep the forward's side: slope 1 for the first, `slope` for the second
    assert leaf.grad[0, 0] == 1.0 and leaf.grad[0, 1] == slope
    assert out[0, 0] == moved[0, 0] and out[0, 1] == slope * moved[0, 1]
    stats = tape.settle()
    assert stats.forced == 2 and stats.unsafe >= 1


def test_a_relu_of_relu_outputs_keeps_bitmasks_and_replays_the_same_signs():
    """Half of a ReLU output is exactly 0: a second ReLU records all of those (margin 0).
    The record then keeps two bits per element instead of 40 per recorded one, and the
    recompute forces the same choices."""
    g = torch.Generator().manual_seed(0)
    x = F.relu(torch.randn(64, 32, generator=g))
    x[3, :4] = torch.tensor([1e-8, 2e-8, 3e-8, 4e-8])  # recorded, positive
    relu = ReplayedReLU()
    tape = ChoiceTape(1e-4)
    with torch.no_grad(), tape.site(0, 0, replay=False):
        relu(x)
    tape.keep({0: 1e-4})
    recorded = int((x == 0).sum()) + 4
    assert tape.stats.recorded == recorded
    assert tape.nbytes <= 2 * x.numel() // 8 + 16 < recorded * 5  # bitmasks, not positions
    moved = x.clone()
    moved[x == 0] = 1e-9  # every exact zero moves to the other side in the recompute
    moved[3, :4] = -1e-9
    leaf = moved.clone().requires_grad_()
    with tape.site(0, 0, replay=True):
        out = relu(leaf)
    out.sum().backward()
    assert torch.equal(leaf.grad, (x > 0).float())  # the forward's signs, not the moved ones
    assert torch.equal(out, torch.where(x > 0, moved, torch.zeros_like(moved)))
    assert tape.settle().forced == recorded


def test_a_recompute_that_runs_other_ops_is_an_error():
    tape = ChoiceTape(1e-4)
    x = torch.randn(10, 8)
    with torch.no_grad(), tape.site(0, 0, replay=False):
        ReplayedReLU()(x)
    with pytest.raises(RuntimeError, match="block 0, group 0.*same ops"):
        with tape.site(0, 0, replay=True):
            group_topk_compress(x, 2, 8, backend="torch")
    with pytest.raises(RuntimeError, match="more discrete choices"):
        with tape.site(0, 0, replay=True):
            ReplayedReLU()(x)
            ReplayedReLU()(x)


def test_bad_margin_is_refused():
    for bad in (-1e-4, float("nan"), float("inf"), "1e-4"):
        with pytest.raises(ValueError, match="replay margin"):
            ChoiceTape(bad)


@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_native_replayed_relu_equals_its_torch_reference(slope):
    from gsr_compiler.runtime.native import (native_relu_covers, native_relu_record,
                                             native_relu_replay)
    from gsr_compiler.runtime.replayed_relu import relu_record_reference, relu_replay_reference
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 24, generator=g)
    if not native_relu_covers(x):
        pytest.skip("no C++ compiler")
    x[0, :5] = torch.tensor([-0.0, float("nan"), -float("inf"), float("inf"), 0.0])
    x[1, 3] = 1e-6  # near 0 in its row
    margin = 1e-3
    y, rms, pos, mar = native_relu_record(x, slope, margin)
    ry, rrms, rpos, rmar = relu_record_reference(x, slope, margin)
    assert torch.equal(y.view(torch.int32), ry.view(torch.int32))  # bit for bit, -0.0 and NaN too
    torch.testing.assert_close(rms[1:], rrms[1:], rtol=1e-6, atol=0)
    assert torch.equal(pos, rpos) and 1 * 24 + 3 in pos.tolist()
    torch.testing.assert_close(mar, rmar, rtol=1e-5, atol=1e-9)
    forced = pos[::2]
    positive = torch.arange(forced.numel()) % 2 == 0
    y, _, near = native_relu_replay(x, slope, margin / 2, forced, positive)
    ry, _, rnear = relu_replay_reference(x, slope, margin / 2, forced, positive)
    assert torch.equal(y.view(torch.int32), ry.view(torch.int32)) and near == rnear


def test_replayed_relu_without_native_code_gives_the_same_gradients(monkeypatch):
    import gsr_compiler.runtime.replayed_relu as replayed
    results = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(replayed, "native_relu_covers", lambda x: False)
        x, moved = near_tied()
        tape = ChoiceTape(1e-3)
        with torch.no_grad(), tape.site(0, 0, replay=False):
            forward = ReplayedReLU()(x)
        tape.keep({})
        leaf = moved.clone().requires_grad_()
        with tape.site(0, 0, replay=True):
            out = ReplayedReLU()(leaf)
        out.sum().backward()
        results.append((forward, out.detach(), leaf.grad, tape.settle().recorded))
    (f1, o1, g1, r1), (f2, o2, g2, r2) = results
    assert torch.equal(f1, f2) and torch.equal(o1, o2) and torch.equal(g1, g2) and r1 == r2


@pytest.mark.parametrize("slope", [0.0, 0.1])
@pytest.mark.parametrize("native", [True, False])
def test_dense_and_sparse_sign_records_replay_alike(slope, native, monkeypatch):
    """A ReLU whose input is half exact zeros records bitmasks at once (no positions); the
    recompute forces the same elements, to the same values and gradients, and counts the same
    as the positions of a sparse record would."""
    import gsr_compiler.runtime.replayed_relu as replayed
    if not native:
        monkeypatch.setattr(replayed, "native_relu_covers", lambda x: False)
    g = torch.Generator().manual_seed(2)
    x = F.relu(torch.randn(200, 16, generator=g))
    x[5, :3] = torch.tensor([-1e-8, 2e-8, 0.5])
    x[7, 1] = 1.0
    moved = x + 1e-9 * torch.randn(x.shape, generator=g)
    moved[7, 1] = 1e-6 * x[7].norm()  # unrecorded near zero in the recompute: unsafe
    results = []
    for dense in (True, False):
        if not dense:
            monkeypatch.setattr(replayed, "dense_sign_threshold", lambda numel: numel)
        tape = ChoiceTape(1e-4)
        with torch.no_grad(), tape.site(0, 0, replay=False):
            forward = ReplayedReLU(slope)(x)
        assert tape._records[(0, 0)][0].dense is dense
        tape.keep({0: 1e-4})
        leaf = moved.clone().requires_grad_()
        with tape.site(0, 0, replay=True):
            out = ReplayedReLU(slope)(leaf)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        stats = tape.settle()
        results.append((forward, out.detach(), leaf.grad, stats.recorded, stats.forced,
                        stats.unsafe))
    (f1, o1, g1, *c1), (f2, o2, g2, *c2) = results
    assert torch.equal(f1, f2) and torch.equal(o1, o2) and torch.equal(g1, g2)
    assert c1 == c2 and c1[1] > 100 and c1[2] >= 1
