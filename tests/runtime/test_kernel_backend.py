"""GSRConfig.backend: compiled models running their coupling, group top-k and compressed
aggregation as Triton kernels (interpreted on CPU) against the torch path, launch counts proving
the kernels ran, the choice of "auto", and the errors for backends that cannot run."""
import copy
import functools
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from gsr_compiler import GSRCompileError, GSRConfig, gsr_compile
from gsr_compiler.models import ResidualGNN
from gsr_compiler.runtime.kernels import _dispatch, choose_backend
from gsr_compiler.runtime.kernels.topk import group_topk_reference
from gsr_compiler.runtime.replay import draw_seed
from gsr_compiler.runtime.sparse import (CompressedDropout, GroupTopKCompress, compressed_aggregate,
                                         group_topk_compress, layer_norm_group_topk_compress)
from residual_models import GINResidual

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the core reference
from core.reference import reference_copy  # noqa: E402

pytest.importorskip("triton", reason="triton is not importable")
pytestmark = [pytest.mark.triton_kernels, pytest.mark.interpreter_loops]

COUPLING = "_coupling_kernel"
TOPK_FWD, TOPK_BWD = "_group_topk_fwd_kernel", "_group_topk_bwd_kernel"
AGG_FWD, AGG_BWD = "_sparse_aggregate_fwd_kernel", "_sparse_aggregate_bwd_kernel"


@pytest.fixture
def launches(monkeypatch) -> Counter:
    """Counts Triton kernel launches by kernel name."""
    counts: Counter = Counter()
    launch = _dispatch.LazyKernel.__getitem__

    def counting(self, grid):
        counts[self.__name__] += 1
        return launch(self, grid)

    monkeypatch.setattr(_dispatch.LazyKernel, "__getitem__", counting)
    return counts


def graph(nodes, edges, seed=0, in_channels=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(nodes, in_channels, generator=g),
            torch.randint(0, nodes, (2, edges), generator=g))


def build(kind, dropout=None):
    torch.manual_seed(0)
    if kind == "gin-mlp":
        return GINResidual(width=16, depth=2, dropout=0.2 if dropout is None else dropout)
    conv, width = kind.split("-")
    return ResidualGNN(5, int(width), 3, depth=2, conv=conv,
                       dropout=0.3 if dropout is None else dropout)


def compiled_pair(kind, nodes, edges, dropout=None, **options):
    """The same model compiled with backend='torch' and backend='triton', equal weights."""
    model = build(kind, dropout)
    example = graph(nodes, edges)
    torch_model = gsr_compile(copy.deepcopy(model), example_inputs=example, backend="torch",
                              **options)
    triton_model = gsr_compile(copy.deepcopy(model), example_inputs=example, backend="triton",
                               **options)
    triton_model.load_state_dict(torch_model.state_dict())
    return torch_model, triton_model


def step(model, inputs, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    (out.square().mean() + out.sum()).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


# (model, groups, options, exact): exact = bit for bit (torch.equal); else float tolerance
# (where the fused LayerNorm + top-k kernel normalizes, or the compressed aggregation sums, in
# float32 in its own order). Sparse models run without dropout here: the top-k kernel draws the
# dropout folded into it with its own counter-based mask (see the replay test below).
CASES = [
    ("sage-24", 2, {}, True),                                                     # group width 12: ragged tiles
    ("gcn-24", 3, {}, True),                                                      # G=3: y0 = x2 + x3 as well
    ("sage-24", 2, {"sparse_k": 2, "sparse_group": 4, "dropout": 0.0}, False),   # LayerNorm + top-k kernel
    ("gin-mlp", 2, {"sparse_k": 3, "sparse_group": 8, "dropout": 0.0}, False),   # + aggregation kernel
]
IDS = ["sage-G2", "gcn-G3", "sage-G2-sparse", "gin-G2-sparse-aggregate"]


@pytest.mark.parametrize("plan_memory", [True, False], ids=["arena", "fresh"])
@pytest.mark.parametrize("kind,groups,options,exact", CASES, ids=IDS)
@pytest.mark.parametrize("nodes,edges", [(37, 90), (5, 9)], ids=["N37", "N5"])
def test_triton_backend_equals_torch_backend(kind, groups, options, exact, plan_memory, nodes,
                                             edges, launches):
    torch_model, triton_model = compiled_pair(kind, nodes, edges, groups=groups,
                                              plan_memory=plan_memory, **options)
    inputs = graph(nodes, edges, seed=1)
    for seed in range(2):  # dense models' dropout: both backends draw the same torch masks
        launches.clear()
        expected = step(torch_model, inputs, seed)
        assert sum(launches.values()) == 0, launches
        got = step(triton_model, inputs, seed)
        assert launches[COUPLING] > 0
        if "sparse_k" in options:
            assert launches[TOPK_FWD] > 0 and launches[TOPK_BWD] > 0
        if kind == "gin-mlp":
            assert launches[AGG_FWD] > 0 and launches[AGG_BWD] > 0
        (out_a, grads_a), (out_b, grads_b) = expected, got
        assert len(grads_a) == len(grads_b)
        if exact:
            assert torch.equal(out_a, out_b)
            for i, (ga, gb) in enumerate(zip(grads_a, grads_b)):
                assert torch.equal(ga, gb), f"gradient {i} differs"
        else:
            torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
            for ga, gb in zip(grads_a, grads_b):
                torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)
    # Eval mode, no grad: the chain's forward alone.
    torch_model.eval(), triton_model.eval()
    with torch.no_grad():
        a, b = torch_model(*inputs), triton_model(*inputs)
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,options,plan_memory", [
    ("sage-24", {"sparse_k": 2, "sparse_group": 4}, True),    # LayerNorm + top-k + dropout kernel
    ("gin-mlp", {"sparse_k": 3, "sparse_group": 8}, False),   # top-k + dropout kernel
], ids=["sage-norm-arena", "gin-fresh"])
def test_dropout_folded_into_the_topk_kernel_replays_its_mask(kind, options, plan_memory,
                                                            launches):
    torch.manual_seed(0)
    model = gsr_compile(build(kind), example_inputs=graph(37, 90), backend="triton",
                        plan_memory=plan_memory, **options)
    topks = [m for m in model.modules() if isinstance(m, GroupTopKCompress)]
    assert topks and all(m.active_dropout() > 0 for m in topks)
    assert not any(isinstance(m, CompressedDropout) for m in model.modules())
    inputs = graph(37, 90, seed=1)
    reference = reference_copy(model)  # stores everything; draws the same per-branch seeds
    for seed in range(2):
        got = step(model, inputs, seed)
        assert launches[TOPK_FWD] > 0 and launches[TOPK_BWD] > 0
        reference.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = reference(*inputs)
        (out.square().mean() + out.sum()).backward()
        torch.testing.assert_close(got[0], out.detach(), rtol=1e-5, atol=1e-5)
        for g, p in zip(got[1], reference.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
    # The mask is drawn in the kernel: the same model in eval mode computes something else.
    with torch.no_grad():
        torch.manual_seed(0)
        assert not torch.allclose(model.train()(*inputs), model.eval()(*inputs))


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("p", [0.25, 0.6])
def test_topk_kernel_dropout_draws_from_the_global_generator(layer_norm, p, rng, launches):
    x = torch.randn(29, 24, generator=rng)
    w, b = torch.rand(24, generator=rng) + 0.5, torch.randn(24, generator=rng)
    op = (functools.partial(layer_norm_group_topk_compress, weight=w, bias=b)
          if layer_norm else group_topk_compress)
    torch.manual_seed(7)
    seed = draw_seed()
    torch.manual_seed(7)
    leaf = x.clone().requires_grad_()
    got = op(leaf, 3, 8, backend="triton", dropout_p=p)
    assert launches[TOPK_FWD] == 1
    want_leaf = x.clone().requires_grad_()
    values, indices = group_topk_reference(want_leaf, 3, 8, w, b, layer_norm=layer_norm,
                                           dropout_p=p, seed=seed)
    assert torch.equal(got.indices, indices)
    torch.testing.assert_close(got.values, values, rtol=1e-6, atol=1e-6)
    dropped = (got.values == 0).float().mean().item()
    assert abs(dropped - p) < 0.12
    grad = torch.randn(values.shape, generator=rng)
    got.values.backward(grad)
    values.backward(grad)
    assert launches[TOPK_BWD] == 1
    torch.testing.assert_close(leaf.grad, want_leaf.grad, rtol=1e-5, atol=1e-6)
    # p = 1 drops everything: the kernel runs without dropout, torch zeros the values.
    launches.clear()
    zeros = op(x, 3, 8, backend="triton", dropout_p=1.0)
    assert launches[TOPK_FWD] == 1 and torch.equal(zeros.values, torch.zeros_like(zeros.values))


def test_auto_backend_on_cpu_runs_torch(launches):
    model = build("sage-24")
    inputs = graph(37, 90)
    auto = gsr_compile(copy.deepcopy(model), example_inputs=inputs, sparse_k=2, sparse_group=4)
    assert auto.config.backend == "auto"
    forced = gsr_compile(copy.deepcopy(model), example_inputs=inputs, sparse_k=2, sparse_group=4,
                         backend="torch")
    forced.load_state_dict(auto.state_dict())
    a, b = step(auto, inputs, 0), step(forced, inputs, 0)
    assert sum(launches.values()) == 0, launches
    assert torch.equal(a[0], b[0])
    text = auto.explain()
    assert "kernels: torch (backend='auto': inputs on cpu" in text
    assert "decided per call" in text


def test_choose_backend_decides_from_devices(monkeypatch):
    cpu, cuda = [torch.device("cpu")], [torch.device("cuda", 0)]
    assert not choose_backend("auto", cpu).kernels
    assert choose_backend("auto", cuda).kernels  # triton is importable here
    assert not choose_backend("auto", cpu + cuda).kernels  # mixed: torch, as use_triton does
    assert not choose_backend("torch", cuda).kernels
    assert choose_backend("triton", cpu).kernels  # TRITON_INTERPRET=1 in the tests
    assert "interpreted" in choose_backend("triton", cpu).reason
    monkeypatch.setattr(_dispatch, "HAS_TRITON", False)
    assert not choose_backend("auto", cuda).kernels
    assert "not importable" in choose_backend("auto", cuda).reason
    with pytest.raises(ValueError, match="not importable"):
        choose_backend("triton", cuda)


@pytest.mark.parametrize("value", ["cuda", "Triton", "", None, 1, True])
def test_bad_backend_values_raise_clearly(value):
    with pytest.raises(GSRCompileError, match=r"backend=.*must be one of 'auto', 'torch', 'triton'"):
        GSRConfig(backend=value)
    with pytest.raises(GSRCompileError, match="must be one of"):
        gsr_compile(build("sage-24"), backend=value)


def test_triton_on_cpu_without_interpreter_raises_before_anything_changes(monkeypatch):
    model = build("sage-24")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = graph(37, 90)
    with monkeypatch.context() as m:
        m.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(GSRCompileError, match="TRITON_INTERPRET=1"):
            gsr_compile(model, example_inputs=inputs, backend="triton")
        lazy = gsr_compile(model, backend="triton")
        with pytest.raises(GSRCompileError, match="use backend='auto'"):
            lazy(*inputs)
        assert not lazy.is_compiled
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert lazy(*inputs).shape == (37, 3)  # the same module compiles once the interpreter is on


def test_triton_without_triton_or_with_a_mismatched_library_raises(monkeypatch):
    inputs = graph(9, 20)
    with monkeypatch.context() as m:
        m.setattr(_dispatch, "HAS_TRITON", False)
        with pytest.raises(GSRCompileError, match="triton is not importable"):
            gsr_compile(build("sage-24"), example_inputs=inputs, backend="triton")
    with monkeypatch.context() as m:
        m.setattr(_dispatch, "triton_library_mode", lambda: "compiled")
        with pytest.raises(GSRCompileError, match="imported with its library compiled"):
            gsr_compile(build("sage-24"), example_inputs=inputs, backend="triton")


def test_explain_says_what_runs_where():
    inputs = graph(9, 20)
    gin = gsr_compile(build("gin-mlp"), example_inputs=inputs, backend="triton", sparse_k=3,
                      sparse_group=8)
    text = gin.explain()
    assert "kernels: triton (backend='triton': inputs on cpu" in text
    assert "interpreted" in text
    assert ("kernels for: coupling update and inverse of 1 chain(s), group top-k in 4 layer(s), "
            "compressed sum/mean aggregation in 4 layer(s)") in text
    sage = gsr_compile(build("sage-24"), example_inputs=inputs, backend="torch", sparse_k=2,
                       sparse_group=4)
    text = sage.explain()
    assert "kernels: torch (backend='torch'" in text
    assert "4 compressed layer(s) aggregate densely (linear first, or max)" in text
    dense = gsr_compile(build("sage-24"), example_inputs=inputs, backend="triton")
    assert "kernels for: coupling update and inverse of 1 chain(s)\n" in dense.explain()


# -- the sparse ops on their own -------------------------------------------------------------

def test_group_topk_compress_kernel_equals_torch_with_ties_and_ragged_rows(rng, launches):
    x = torch.randint(-3, 4, (29, 24), generator=rng).float()  # many ties
    x[3, :8] = 1.0  # a whole group equal
    for k, g in [(3, 8), (1, 4), (8, 8), (5, 16)]:
        cols = g * (24 // g)
        x_t = x[:, :cols].clone().requires_grad_()
        x_r = x[:, :cols].clone().requires_grad_()
        launches.clear()
        c_t = group_topk_compress(x_t, k, g, backend="triton")
        assert launches[TOPK_FWD] == 1
        c_r = group_topk_compress(x_r, k, g, backend="torch")
        assert torch.equal(c_t.indices, c_r.indices) and torch.equal(c_t.values, c_r.values)
        grad = torch.randn(c_r.values.shape, generator=rng)
        c_t.values.backward(grad)
        c_r.values.backward(grad)
        assert launches[TOPK_BWD] == 1
        assert torch.equal(x_t.grad, x_r.grad)


def test_group_topk_compress_outside_the_kernel_takes_torch(rng, launches):
    x64 = torch.randn(7, 16, dtype=torch.float64, generator=rng)
    c = group_topk_compress(x64, 2, 8, backend="triton")  # the kernel computes in float32
    x12 = torch.randn(7, 24, generator=rng)
    d = group_topk_compress(x12, 2, 12, backend="triton")  # g not a power of two
    assert sum(launches.values()) == 0
    assert torch.equal(c.values, group_topk_compress(x64, 2, 8, backend="torch").values)
    assert torch.equal(d.indices, group_topk_compress(x12, 2, 12, backend="torch").indices)
    with pytest.raises(ValueError, match="backend"):
        group_topk_compress(x12, 2, 12, backend="gpu")


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("nodes,edges", [(23, 70), (6, 0)], ids=["N23", "no-edges"])
def test_compressed_aggregate_kernel_equals_torch(reduce, weighted, nodes, edges, rng, launches):
    x = torch.randn(nodes, 24, generator=rng)
    # The last node gets no in-edges: its row must come out as zeros on both paths.
    src = torch.randint(0, nodes, (edges,), generator=rng)
    dst = torch.randint(0, nodes - 1, (edges,), generator=rng)
    edge_index = torch.stack([src, dst])
    weight = torch.rand(edges, generator=rng) if weighted else None
    results = {}
    for backend in ("torch", "triton"):
        leaf = x.clone().requires_grad_()
        c = group_topk_compress(leaf, 3, 8, backend="torch")
        out = compressed_aggregate(c, edge_index, nodes, reduce, weight, backend=backend)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        results[backend] = (out.detach(), leaf.grad)
    assert launches[AGG_FWD] == 1 and launches[AGG_BWD] == 1
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-5, atol=1e-6)
    assert torch.equal(results["triton"][0][-1], torch.zeros(24))


def test_compressed_aggregate_outside_the_kernel_takes_torch(rng, launches):
    x = torch.randn(11, 16, generator=rng)
    edge_index = torch.randint(0, 11, (2, 30), generator=rng)
    c = group_topk_compress(x, 2, 8, backend="torch")
    compressed_aggregate(c, edge_index, 11, "max", backend="triton")
    weight = torch.rand(30, generator=rng, requires_grad=True)  # the kernel has no weight grad
    compressed_aggregate(c, edge_index, 11, "sum", weight, backend="triton").sum().backward()
    assert weight.grad is not None
    assert sum(launches.values()) == 0
    with pytest.raises(ValueError, match="backend"):
        compressed_aggregate(c, edge_index, 11, "sum", backend="cuda")
