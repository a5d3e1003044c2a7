"""RowwiseRecompute: row blocks forward, recompute in backward, only the input kept."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsr_compiler.runtime import rowwise
from gsr_compiler.runtime.rowwise import RowwiseRecompute, RowwiseStep


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so that every test crosses several, the last one ragged."""
    monkeypatch.setattr(rowwise, "_CHUNK_ELEMENTS", 20)


def _head(width, out, dtype=torch.float64):
    torch.manual_seed(0)
    norm, lin = nn.LayerNorm(width), nn.Linear(width, out)
    with torch.no_grad():  # not the identity affine map, so its gradients matter
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    norm, lin = norm.to(dtype), lin.to(dtype)
    steps = [RowwiseStep("module", index=0), RowwiseStep("function", F.gelu),
             RowwiseStep("method", "tanh"), RowwiseStep("module", index=1)]
    module = RowwiseRecompute(steps, ["norm", "lin"])

    def reference(x):
        return lin(torch.tanh(F.gelu(norm(x))))

    return module, (norm, lin), reference


@pytest.mark.parametrize("rows", [0, 1, 7, 23])
def test_forward_and_gradients_equal_the_layers_run_whole(small_blocks, rows):
    module, layers, reference = _head(6, 3)
    x = torch.randn(rows, 6, dtype=torch.float64, requires_grad=True)
    params = [p for layer in layers for p in layer.parameters()]
    out = module(x, *layers)
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, [x, *params], grad_out)
    x_ref = x.detach().requires_grad_()
    expected_out = reference(x_ref)
    expected = torch.autograd.grad(expected_out, [x_ref, *params], grad_out)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64(small_blocks):
    module, layers, _ = _head(5, 2)
    x = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: module(t, *layers), (x,))


def test_keeps_only_its_input_for_backward(small_blocks):
    module, layers, reference = _head(8, 4, dtype=torch.float32)
    x = torch.randn(40, 8, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for layer in layers for p in layer.parameters()}

    def kept(fn):
        storages = set()

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                storages.add(ptr)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        return storages

    assert kept(lambda t: module(t, *layers)) == {x.untyped_storage().data_ptr()}
    assert len(kept(reference)) > 1  # the layers run whole keep their intermediates


def test_a_layer_used_twice_gets_its_gradient_once(small_blocks):
    torch.manual_seed(1)
    lin = nn.Linear(4, 4).double()
    module = RowwiseRecompute([RowwiseStep("module", index=0), RowwiseStep("function", torch.relu),
                               RowwiseStep("module", index=0)], ["lin"])
    x = torch.randn(9, 4, dtype=torch.float64)
    module(x, lin).square().sum().backward()
    got = lin.weight.grad.clone()
    lin.weight.grad = None
    lin(torch.relu(lin(x))).square().sum().backward()
    torch.testing.assert_close(got, lin.weight.grad, rtol=1e-12, atol=1e-12)


def test_input_without_grad_and_frozen_layers(small_blocks):
    module, (norm, lin), reference = _head(6, 2)
    x = torch.randn(13, 6, dtype=torch.float64)
    module(x, norm, lin).sum().backward()  # only the layers need a gradient
    got = lin.weight.grad.clone()
    lin.weight.grad = norm.weight.grad = norm.bias.grad = lin.bias.grad = None
    reference(x).sum().backward()
    torch.testing.assert_close(got, lin.weight.grad, rtol=1e-12, atol=1e-12)

    for p in (*norm.parameters(), *lin.parameters()):
        p.requires_grad_(False)
    x.requires_grad_()
    (g,) = torch.autograd.grad(module(x, norm, lin).sum(), x)
    (e,) = torch.autograd.grad(reference(x).sum(), x)
    torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_input_with_too_few_dimensions_runs_whole(small_blocks):
    module, layers, reference = _head(6, 2)
    x = torch.randn(6, dtype=torch.float64)  # one row: dim 0 is the LayerNorm's own
    torch.testing.assert_close(module(x, *layers), reference(x), rtol=1e-12, atol=1e-12)


def test_without_grad_runs_in_blocks_and_keeps_nothing(small_blocks):
    module, layers, reference = _head(6, 2)
    x = torch.randn(17, 6, dtype=torch.float64)
    with torch.no_grad():
        out = module(x, *layers)
    assert out.grad_fn is None
    torch.testing.assert_close(out, reference(x).detach(), rtol=1e-12, atol=1e-12)


def test_wrong_number_of_layers_is_named():
    module, (norm, _), _ = _head(6, 2)
    with pytest.raises(ValueError, match="expected 2 layer"):
        module(torch.randn(3, 6, dtype=torch.float64), norm)
