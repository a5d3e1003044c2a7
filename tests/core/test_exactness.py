"""What users see of the exactness guard: verify_gradients, the verify mode, warnings,
explain() and precision_report(), the public store-everything reference, compile-time checks,
double backward, and plan_memory's bit-for-bit promise."""
import warnings

import pytest
import torch
import torch_geometric.nn as pyg
from torch import nn

from gsr_compiler import GSRCompileError, GSRConfig, gsr_compile
from gsr_compiler.errors import GSRPrecisionWarning
from gsr_compiler.models import ResidualGNN, UnnormalizedGIN
from gsr_compiler.reference import store_everything
from gsr_compiler.runtime.reversible import ReversibleChain

from .models import Branch, DeepResidual, graph_inputs
from .reference import reference_copy
from .test_exactness_at_depth import random_graph

UNGUARDED = {"replay_margin": None, "anchors": None}


def chain_of(gsr):
    return next(m for m in gsr.modules() if isinstance(m, ReversibleChain))


def small_sage(depth=6, dtype=torch.float64, **options):
    torch.manual_seed(0)
    model = ResidualGNN(5, 16, 3, depth, conv="sage", dropout=0.2).to(dtype)
    x, edge_index, _, _ = graph_inputs(num_nodes=30, num_edges=90, dtype=dtype)
    return gsr_compile(model, example_inputs=(x, edge_index), **options), x, edge_index


# -- the public reference ------------------------------------------------------------------

def test_public_reference_equals_the_independent_one():
    gsr, x, edge_index = small_sage(sparse_k=2)
    public, independent = store_everything(gsr.graph_module), reference_copy(gsr)
    results = []
    for module in (public, independent):
        torch.manual_seed(3)
        module.zero_grad(set_to_none=True)
        out = module(x, edge_index)
        out.pow(2).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in module.named_parameters()}))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga)
    # and it keeps every activation: more bytes saved than the reversible chain
    from gsr_compiler.memory import saved_bytes_of_step
    target = torch.zeros(30, 3, dtype=torch.float64)
    assert saved_bytes_of_step(public, (x, edge_index), target) > \
        2 * saved_bytes_of_step(gsr, (x, edge_index), target)


# -- verify_gradients ----------------------------------------------------------------------

def test_verify_gradients_matches_an_independent_comparison_and_changes_nothing():
    torch.manual_seed(0)
    make = lambda: Branch(nn.Linear(8, 8), nn.BatchNorm1d(8), dropout=0.3, takes_graph=False)  # noqa: E731
    model = DeepResidual(make, depth=4).double()
    x, edge_index, _, _ = graph_inputs(dtype=torch.float64)
    gsr = gsr_compile(model, example_inputs=(x, edge_index))
    buffers = {n: b.clone() for n, b in gsr.named_buffers()}
    rng = torch.get_rng_state()
    check = gsr.verify_gradients((x, edge_index), lambda out: out.pow(2).sum())
    assert check.ok and check.worst[1] < 1e-12, str(check)
    assert all(p.grad is None for p in gsr.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(b, buffers[n]) for n, b in gsr.named_buffers())
    names = {n.removeprefix("compiled.") for n, _ in gsr.named_parameters()}
    assert names <= set(check.errors) and "input:0" in check.errors
    assert "gradient check" in str(check) and "OK" in str(check)


def test_verify_gradients_finds_what_the_unguarded_chain_gets_wrong():
    x, edge_index, _ = random_graph(2000, 1.7)
    torch.manual_seed(0)
    model = UnnormalizedGIN(8, 32, 1, 48)
    unguarded = gsr_compile(model, example_inputs=(x, edge_index), **UNGUARDED)
    check = unguarded.verify_gradients((x, edge_index))
    assert not check.ok and check.worst[1] > 1e-2, str(check)
    assert "FAILED" in str(check)
    guarded = gsr_compile(model, example_inputs=(x, edge_index))
    check = guarded.verify_gradients((x, edge_index))
    assert check.ok, str(check)
    assert "anchor" in str(check)  # the chain's own measurements are part of the report


def test_verify_gradients_rejects_a_non_scalar_loss():
    gsr, x, edge_index = small_sage()
    with pytest.raises(ValueError, match="scalar"):
        gsr.verify_gradients((x, edge_index), loss_fn=lambda out: out)


# -- the verify mode -----------------------------------------------------------------------

def test_verify_mode_measures_every_gradient_of_the_chain():
    x, edge_index, target = random_graph(2000, 1.7)
    torch.manual_seed(0)
    model = UnnormalizedGIN(8, 32, 1, 48)
    bad = gsr_compile(model, example_inputs=(x, edge_index), verify=True, **UNGUARDED)
    with pytest.warns(GSRPrecisionWarning, match="verify"):
        ((bad(x, edge_index) - target) ** 2).mean().backward()
    errors = chain_of(bad).last_precision.gradient_errors
    assert max(errors.values()) > 1e-2 and "input" in errors
    assert len(errors) == 1 + sum(1 for p in chain_of(bad).parameters())
    good = gsr_compile(model, example_inputs=(x, edge_index), verify=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GSRPrecisionWarning)
        ((good(x, edge_index) - target) ** 2).mean().backward()
    assert max(chain_of(good).last_precision.gradient_errors.values()) < 1e-4


# -- drift made visible --------------------------------------------------------------------

def test_drift_warns_once_and_is_reported():
    x, edge_index, target = random_graph(2000, 1.7)
    torch.manual_seed(0)
    gsr = gsr_compile(UnnormalizedGIN(8, 32, 1, 48), example_inputs=(x, edge_index), anchors=None)
    with pytest.warns(GSRPrecisionWarning, match="reconstruction error|unsafe|did not record"):
        ((gsr(x, edge_index) - target) ** 2).mean().backward()
    precision = chain_of(gsr).last_precision
    assert precision.worst_error > 1e-3 and precision.anchors == []
    with warnings.catch_warnings():  # once per chain, not every step
        warnings.simplefilter("error", GSRPrecisionWarning)
        ((gsr(x, edge_index) - target) ** 2).mean().backward()
    report = gsr.precision_report()
    assert "gsr_chain_0" in report and "reconstruction error" in report


def test_explain_describes_the_guard_and_the_last_backward():
    gsr, x, edge_index = small_sage(sparse_k=4, dtype=torch.float32)
    text = gsr.explain()
    assert "exactness of the reversible backward" in text and "no backward yet" in text
    assert "replay their signs" in text or "top-k(s) their selections" in text
    gsr(x, edge_index).sum().backward()
    text = gsr.explain()
    assert "choices recorded" in text and "anchor(s)" in text and "no backward yet" not in text
    assert "replay: off" in small_sage(**UNGUARDED)[0].explain()


def test_chain_records_and_probes_are_counted_as_saved_bytes():
    from gsr_compiler.memory import saved_bytes_of_step
    gsr, x, edge_index = small_sage(anchors=2)
    unguarded, _, _ = small_sage(**UNGUARDED)
    target = torch.zeros(30, 3, dtype=torch.float64)
    guarded_bytes = saved_bytes_of_step(gsr, (x, edge_index), target)
    plain_bytes = saved_bytes_of_step(unguarded, (x, edge_index), target)
    precision = chain_of(gsr).last_precision
    assert precision.anchors == [2, 4] and precision.anchor_bytes == 2 * 30 * 16 * 8
    assert guarded_bytes - plain_bytes >= precision.anchor_bytes + precision.replay.nbytes


# -- options and compile-time checks -------------------------------------------------------

@pytest.mark.parametrize("option,value", [("replay_margin", -1.0), ("replay_margin", 1.5),
                                          ("replay_margin", True), ("anchors", 0),
                                          ("anchors", "sometimes"), ("drift_tolerance", 0.0),
                                          ("verify", "yes")])
def test_bad_guard_options_are_refused_before_anything_runs(option, value):
    with pytest.raises(GSRCompileError, match=option):
        GSRConfig(**{option: value})


def test_narrow_layer_norm_warns_at_compile_time():
    torch.manual_seed(0)
    model = ResidualGNN(5, 8, 3, 2, conv="sage")
    x, edge_index, _, _ = graph_inputs(num_nodes=20, dtype=torch.float32)
    with pytest.warns(GSRPrecisionWarning, match="normalizes only 2 channel"):
        gsr = gsr_compile(model, groups=4, example_inputs=(x, edge_index))
    assert "normalizes only 2" in gsr.explain()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GSRPrecisionWarning)
        gsr_compile(ResidualGNN(5, 16, 3, 2, conv="sage"), example_inputs=(x, edge_index))


def test_sixteen_bit_chain_warns_at_compile_time():
    torch.manual_seed(0)
    model = ResidualGNN(5, 16, 3, 2, conv="sage").to(torch.bfloat16)
    x, edge_index, _, _ = graph_inputs(num_nodes=20, dtype=torch.bfloat16)
    with pytest.warns(GSRPrecisionWarning, match="bfloat16"):
        gsr_compile(model, example_inputs=(x, edge_index))


# -- double backward -----------------------------------------------------------------------

@pytest.mark.parametrize("recompute_head", [False, True])
def test_double_backward_is_refused_with_a_clear_message(recompute_head):
    gsr, x, edge_index = small_sage(recompute_head=recompute_head)
    leaf = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="double backward.*not supported"):
        torch.autograd.grad(gsr(leaf, edge_index).sum(), leaf, create_graph=True)
    # first order still works after the refusal
    (grad,) = torch.autograd.grad(gsr(leaf, edge_index).sum(), leaf)
    assert torch.isfinite(grad).all()


# -- plan_memory changes no bit ------------------------------------------------------------

def _step(model, plan, x, edge_index, **options):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    gsr = gsr_compile(model, example_inputs=(x, edge_index), plan_memory=plan, **options)
    out = gsr(x, edge_index)
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in gsr.named_parameters()}


BRANCHES = {
    "batchnorm_first": lambda: Branch(nn.Linear(8, 8), nn.BatchNorm1d(8), takes_graph=False),
    "gin_no_norm": lambda: Branch(pyg.GINConv(nn.Sequential(nn.Linear(8, 16), nn.ReLU(),
                                                            nn.Linear(16, 8)))),
    "sage_layernorm": lambda: Branch(pyg.SAGEConv(8, 8), nn.LayerNorm(8)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("branch", sorted(BRANCHES))
@pytest.mark.parametrize("options", [{}, UNGUARDED], ids=["guarded", "unguarded"])
def test_plan_memory_changes_no_bit(branch, dtype, options):
    torch.manual_seed(0)
    model = DeepResidual(BRANCHES[branch], depth=6).to(dtype)
    x, edge_index, _, _ = graph_inputs(dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GSRPrecisionWarning)  # narrow LayerNorm: expected
        out_a, grads_a = _step(model, True, x, edge_index, **options)
        out_b, grads_b = _step(model, False, x, edge_index, **options)
    assert torch.equal(out_a, out_b)
    differ = [n for n in grads_a if not torch.equal(grads_a[n], grads_b[n])]
    assert not differ, f"{len(differ)} of {len(grads_a)} gradients differ: {differ[:3]}"
