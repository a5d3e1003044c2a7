"""Memory budgets: parsing, the predicted step peak against what a step keeps and measures,
compiling under a budget, and ``gsr train --memory-budget``."""
from __future__ import annotations

import json
import math

import pytest
import torch

from gsr_compiler import GSRConfig, gsr_compile
from gsr_compiler.budget import parse_budget
from gsr_compiler.errors import GSRCompileError
from gsr_compiler.memory import saved_bytes_of_step
from gsr_compiler.memory_batch import measure_rss_rises
from gsr_compiler.models import ResidualGNN
from gsr_compiler.peak import plain_predictor
from gsr_compiler.synthetic import random_graph


# ------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize("text, expected", [
    ("6GiB", 6 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("100", 100),
    (4096, 4096), ("2 kib", 2048), ("1e3KB", 10**6)])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad, words", [
    (-1, "positive"), (0, "positive"), ("0GiB", "positive"), ("-3GiB", "positive"),
    (float("nan"), "finite"), ("nan", "cannot read"), ("lots", "cannot read"),
    ("6XB", "unknown unit"), ("6 gigs", "unknown unit"), (True, "bool"), ([1], "list"),
    (float("inf"), "finite")])
def test_bad_budget_is_a_clear_error(bad, words):
    with pytest.raises(ValueError, match=words):
        parse_budget(bad)
    with pytest.raises(GSRCompileError, match="memory_budget"):
        GSRConfig(memory_budget=bad)


# ------------------------------------------------------------------------------ prediction

def _graph(N=3000, E=5100):
    x, edge_index, y = random_graph(N, E, in_channels=16, seed=0)
    return x, edge_index, y


def _model(depth, width, conv="sage"):
    torch.manual_seed(0)
    return ResidualGNN(16, width, 1, depth, conv=conv, dropout=0.0)


@pytest.mark.parametrize("conv", ["sage", "gin", "graph"])
def test_plain_activations_cover_what_autograd_saves(conv):
    """The plain model keeps every block's activations until backward: the predicted peak
    must hold at least what autograd saves and not much more (values and grads on top)."""
    x, ei, y = _graph()
    model = _model(6, 32, conv)
    saved = saved_bytes_of_step(model, (x, ei), y)
    peak = plain_predictor(model, (x, ei)).predict()
    assert saved <= peak.activations <= 1.35 * saved, (conv, saved, peak.activations)


def test_peak_scales_with_graph_size_and_parameters():
    x, ei, y = _graph()
    g = gsr_compile(_model(4, 32), example_inputs=(x, ei))
    small, big = g.predict_peak(1000, 1700), g.predict_peak(100_000, 170_000)
    assert big.activations > 50 * small.activations
    assert small.parameters == sum(p.numel() * 4 for p in g.parameters())
    assert small.optimizer_state == 2 * small.gradients
    assert g.predict_peak(optimizer="sgd").optimizer_state == 0
    with pytest.raises(ValueError, match="optimizer"):
        g.predict_peak(optimizer="lion")
    cuda = g.predict_peak(device="cuda")  # each tensor rounded up to allocator blocks
    assert cuda.total >= g.predict_peak(device="cpu").total
    nodes = g.max_nodes("256MiB", avg_degree=1.7)
    assert g.predict_peak(nodes, round(1.7 * nodes)).total <= 256 * 2**20
    assert g.predict_peak(nodes + 64, round(1.7 * (nodes + 64))).total > 256 * 2**20
    for bad in (0, -5, "many", float("nan")):
        with pytest.raises(ValueError):
            g.max_nodes(bad)
    with pytest.raises(ValueError, match="avg_degree"):
        g.max_nodes("1GiB", avg_degree=float("nan"))


def test_gsr_peak_flat_in_depth_plain_linear():
    x, ei, _ = _graph()
    gsr = [gsr_compile(_model(d, 32), example_inputs=(x, ei)).predict_peak().activations
           for d in (4, 16)]
    plain = [plain_predictor(_model(d, 32), (x, ei)).predict().activations for d in (4, 16)]
    assert gsr[1] < 1.1 * gsr[0]
    assert plain[1] > 3 * plain[0]


# Twelve configurations, measured one after another in one fresh process (fixed mmap
# threshold): (form, depth, width, groups, sparse_k, nodes); about 90 s on 2 cores.
GRID = [
    ("plain", 2, 32, None, None, 24000), ("plain", 4, 32, None, None, 16000),
    ("plain", 2, 64, None, None, 20000), ("gsr", 4, 64, 2, None, 24000),
    ("gsr", 12, 64, 2, None, 24000), ("gsr", 4, 128, 2, None, 16000),
    ("gsr", 4, 128, 4, None, 24000), ("gsr", 4, 64, 4, None, 30000),
    ("gsr", 4, 64, 2, 16, 24000), ("gsr", 4, 128, 2, 32, 16000),
    ("gsr", 4, 128, 4, 8, 24000), ("gsr", 16, 32, 2, None, 30000),
]


@pytest.mark.slow
def test_predicted_cpu_peak_within_15_percent_of_measured_rss_rise():
    cases, predicted, names = [], [], []
    for form, depth, width, groups, k, N in GRID:
        x, ei, y = _graph(N, int(1.7 * N))
        model = _model(depth, width)
        if form == "plain":
            predicted.append(plain_predictor(model, (x, ei)).predict().rss_rise)
        else:
            model = gsr_compile(model, groups=groups, sparse_k=k, example_inputs=(x, ei))
            predicted.append(model.predict_peak().rss_rise)
        cases.append((model, (x, ei), y))
        names.append(f"{form} d={depth} w={width} G={groups} k={k} N={N}")
    measured = measure_rss_rises(cases)
    errors = {n: (p - m) / m for n, p, m in zip(names, predicted, measured)}
    bad = {n: f"{e:+.1%}" for n, e in errors.items() if abs(e) > 0.15}
    assert not bad, bad


# ------------------------------------------------------------------------------ budgets

def test_budget_between_plain_and_gsr_fits_when_measured():
    x, ei, y = _graph(20000, 34000)
    model = _model(8, 64)
    plain = plain_predictor(model, (x, ei)).predict()
    gsr = gsr_compile(model, example_inputs=(x, ei)).predict_peak()
    budget = (plain.total + gsr.total) // 2
    assert gsr.total < budget < plain.total
    compiled = gsr_compile(model, memory_budget=budget, example_inputs=(x, ei))
    assert "memory budget" in compiled.explain() and "chose" in compiled.explain()
    resident = compiled.predict_peak()
    rise = measure_rss_rises([(compiled, (x, ei), y), (model, (x, ei), y)])
    # measured: the step's rise on top of what is resident before it
    assert resident.resident + rise[0] <= budget
    assert resident.resident + rise[1] > budget  # the plain model would not have fit


def test_tight_budget_chooses_more_groups_or_sparsity():
    x, ei, _ = _graph(20000, 34000)
    model = _model(8, 64)
    given = gsr_compile(model, example_inputs=(x, ei)).predict_peak().total
    compiled = gsr_compile(model, memory_budget=int(given * 0.9), example_inputs=(x, ei))
    chosen = compiled.__dict__["_budget_choice"].options
    assert chosen.get("groups", 2) > 2 or chosen.get("sparse_k") is not None
    assert compiled.predict_peak().total <= int(given * 0.9)
    text = compiled.explain()
    assert "tried the options as given" in text


def test_impossible_budget_raises_before_anything_is_built():
    x, ei, _ = _graph()
    model = _model(4, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(GSRCompileError, match="parameters alone"):
        gsr_compile(model, memory_budget=1000, example_inputs=(x, ei))
    with pytest.raises(GSRCompileError, match=r"smallest predicted step peak .* at most [\d,]+ nodes"):
        gsr_compile(model, memory_budget="400KiB", example_inputs=(x, ei))
    with pytest.raises(GSRCompileError, match="example_inputs"):
        gsr_compile(model, memory_budget="1GiB")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------ commands

def test_gsr_plan_prints_plain_and_gsr(capsys):
    from gsr_compiler.cli import main

    assert main(["plan", "--depth", "16", "--width", "32", "--circuit", "c6288",
                 "--device-memory", "64MiB", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "plain" in out and "gsr" in out and "2,385 nodes" in out
    assert main(["plan", "--circuit", "c6288", "--device-memory", "lots"]) == 2


@pytest.mark.parametrize("sparse_k", [None, 8])
def test_gsr_train_memory_budget_never_exceeded(tmp_path, sparse_k):
    """Steps on a bundled circuit under a budget: the batches are sized by prediction, then
    each step's measured RSS rise plus what is resident stays under the budget."""
    from gsr_compiler.train import TrainConfig, train

    budget = 24 * 2**20
    lines = []
    result = train(TrainConfig(gsr=True, sparse_k=sparse_k, depth=4, width=32, train=["square"],
                               test=["c17"],
                               val=[], steps=2, eval_every=0, memory_budget="24MiB",
                               out=str(tmp_path / "run"), progress=False), log=lines.append)
    chosen = next(line for line in lines if line.startswith("memory budget"))
    nodes = int(chosen.split("batches of up to ")[1].split(" nodes")[0].replace(",", ""))
    assert 32 <= nodes < 35329  # square (35k nodes) does not fit whole: cone samples
    from gsr_compiler.train import _BatchSchedule
    import dataclasses
    from gsr_compiler.circuits import load_circuit

    data = load_circuit("square", labels=("level",))
    cfg = dataclasses.replace(TrainConfig(train=["square"], seed=0), batch_nodes=nodes)
    schedule = _BatchSchedule([data], cfg)
    model = result.model.train()
    cases = []
    for step in range(2):
        b = schedule(step)
        cases.append((model, (b.x, b.edge_index), b.target.unsqueeze(-1)))
    for (_, (x, edge_index), _), rise in zip(cases, measure_rss_rises(cases)):
        resident = model.predict_peak(x.shape[0], edge_index.shape[1]).resident
        predicted = model.predict_peak(x.shape[0], edge_index.shape[1])
        assert resident + rise <= budget, (resident, rise, predicted.activations, x.shape[0])
    with pytest.raises(ValueError, match="memory-budget"):
        train(TrainConfig(gsr=True, depth=4, width=32, train=["c17"], test=["c432"], val=[],
                          steps=1, memory_budget="12XB", out=str(tmp_path / "bad")))
