"""Compiled chains equal a store-everything grouped-coupling reference, per layer type."""
import pytest
import torch

from gsr_compiler import gsr_compile
from gsr_compiler.runtime.reversible import ReversibleChain

from .models import DeepResidual, graph_inputs, layer_factories
from .reference import reference_copy

LAYERS = layer_factories()


def run_step(module, inputs, seed, weight):
    x = inputs[0].detach().clone().requires_grad_()
    extra = [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t
             for t in inputs[1:]]
    torch.manual_seed(seed)
    out = module(x, *extra)
    (out * weight).sum().backward()
    grads = {"x": x.grad}
    if extra[1] is not None:
        grads["edge_attr"] = extra[1].grad
    for name, p in module.named_parameters():
        grads[name] = p.grad
    return out.detach(), grads


def assert_close_rel(a, b, what, tol=1e-9, step_scale=0.0):
    assert a is not None and b is not None, what
    # Gradients that vanish in theory (a bias feeding BatchNorm) are compared absolutely: to
    # the step's largest gradient where they are rounding noise next to it, else to 1e-4.
    scale = b.abs().max()
    if scale <= 64 * torch.finfo(b.dtype).eps * step_scale:
        scale = torch.tensor(step_scale)
    scale = scale.clamp_min(1e-4)
    err = ((a - b).abs().max() / scale).item()
    assert err < tol, f"{what}: relative error {err:.3g}"


def compile_case(name, groups=2, seed=0, **overrides):
    make_branch, kwargs = LAYERS[name]
    kwargs = {**kwargs, **overrides}
    torch.manual_seed(seed)
    model = DeepResidual(make_branch, **kwargs).double()
    inputs = graph_inputs(edge_dim=kwargs.get("edge_dim"))
    gsr = gsr_compile(model, groups=groups, strict=True, example_inputs=inputs)
    return model, gsr, inputs


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_forward_and_all_gradients_match_reference(name):
    model, gsr, inputs = compile_case(name)
    chains = [m for m in gsr.graph_module.modules() if isinstance(m, ReversibleChain)]
    assert len(chains) == 1 and chains[0].depth == 3, gsr.explain()
    ref = reference_copy(gsr)
    weight = torch.randn(inputs[0].shape[0], 3, dtype=torch.float64)
    out, grads = run_step(gsr, inputs, seed=1, weight=weight)
    out_ref, grads_ref = run_step(ref, inputs, seed=1, weight=weight)
    assert_close_rel(out, out_ref, "forward")
    ref_names = {f"compiled.{k}": k for k in grads_ref}
    assert set(grads) - {"x", "edge_attr"} == {f"compiled.{k}" for k in grads_ref} - {"compiled.x", "compiled.edge_attr"}
    step_scale = max(float(g.abs().max()) for g in grads_ref.values())
    for key, g in grads.items():
        assert_close_rel(g, grads_ref[ref_names.get(key, key)], f"grad {key}",
                         step_scale=step_scale)


@pytest.mark.parametrize("groups", [2, 4])
def test_groups_and_gradcheck(groups):
    make_branch, _ = LAYERS["sage"]
    torch.manual_seed(0)
    model = DeepResidual(make_branch, depth=2).double()
    x, edge_index, _, _ = graph_inputs(num_nodes=6, num_edges=14)
    gsr = gsr_compile(model, groups=groups, example_inputs=(x, edge_index))
    x = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: gsr(t, edge_index), (x,), eps=1e-6, atol=1e-7)


def test_gradcheck_through_edge_features_and_without_encoder():
    """The chain input is the user's tensor itself; edge features get gradients too."""
    make_branch, kwargs = LAYERS["gine_edge_dim"]
    torch.manual_seed(0)
    model = DeepResidual(make_branch, depth=2, in_channels=8, encoder=False, edge_dim=3).double()
    x, edge_index, edge_attr, _ = graph_inputs(num_nodes=6, num_edges=14, in_channels=8, edge_dim=3)
    gsr = gsr_compile(model, example_inputs=(x, edge_index, edge_attr))
    x = x.clone().requires_grad_()
    edge_attr = edge_attr.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, e: gsr(a, edge_index, e), (x, edge_attr),
                                    eps=1e-6, atol=1e-7)
