"""coupling_add_ / coupling_sub_: the Triton kernel (interpreted on CPU) equals torch exactly."""
import pytest
import torch

from gsr_compiler.runtime.kernels import coupling_add_, coupling_sub_, use_triton

pytest.importorskip("triton", reason="triton is not importable")
pytestmark = pytest.mark.triton_kernels

SHAPES = [(1,), (1000,), (37, 100), (16, 128), (5, 1), (3, 7, 11)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("subtract", [False, True])
def test_out_of_place_matches_torch(shape, subtract, rng, poisoned):
    a = torch.randn(shape, generator=rng)
    f = torch.randn(shape, generator=rng)
    out = poisoned(*shape)
    op = coupling_sub_ if subtract else coupling_add_
    result = op(out, a, f, backend="triton")
    assert result is out
    assert torch.equal(out, a - f if subtract else a + f)


def test_in_place_on_column_groups_inverts_exactly(rng):
    # The reversible use: overwrite group i of an [N, D] activation with its output and back.
    n, d, groups = 37, 96, 3
    h = torch.randn(n, d, generator=rng)
    original = h.clone()
    width = d // groups
    fs = [torch.randn(n, width, generator=rng) for _ in range(groups)]
    for i, f in enumerate(fs):
        part = h[:, i * width:(i + 1) * width]          # non-contiguous column slice
        coupling_add_(part, part, f, backend="triton")
    expected = original.clone()
    for i, f in enumerate(fs):
        expected[:, i * width:(i + 1) * width] += f
    assert torch.equal(h, expected)
    for i, f in reversed(list(enumerate(fs))):
        part = h[:, i * width:(i + 1) * width]
        coupling_sub_(part, part, f, backend="triton")
    # (x + f) - f is not always x in floating point; torch does the same arithmetic.
    assert torch.equal(h, (original + torch.cat(fs, 1)) - torch.cat(fs, 1))


def test_out_may_alias_f(rng):
    x = torch.randn(33, 65, generator=rng)
    f = torch.randn(33, 65, generator=rng)
    expected = x + f
    coupling_add_(f, x, f, backend="triton")
    assert torch.equal(f, expected)


def test_strided_rows_in_all_operands(rng, poisoned):
    base = torch.randn(20, 50, generator=rng)
    a, f = base[:, 3:40], base[:, 10:47]
    out_base = poisoned(20, 64)
    out = out_base[:, 5:42]
    coupling_sub_(out, a, f, backend="triton")
    assert torch.equal(out, a - f)
    assert torch.isnan(out_base[:, :5]).all() and torch.isnan(out_base[:, 42:]).all()


def test_unsupported_layout_falls_back_to_torch(rng):
    x = torch.randn(8, 6, generator=rng).t()          # column stride != 1
    f = torch.randn(6, 8, generator=rng)
    out = torch.empty(6, 8)
    coupling_add_(out, x, f, backend="triton")
    assert torch.equal(out, x + f)


def test_auto_backend_uses_torch_on_cpu_and_checks_shapes():
    x = torch.zeros(4)
    assert not use_triton("auto", x)
    assert use_triton("triton", x)  # interpreter is on in these tests
    with pytest.raises(ValueError, match="equal shapes"):
        coupling_add_(torch.empty(3), x, x)
    with pytest.raises(ValueError, match="backend"):
        coupling_add_(x, x, x, backend="cuda")
