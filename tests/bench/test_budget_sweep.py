"""The budget sweep: the batch search, the epoch plan and the sweep's rows."""
from __future__ import annotations

import numpy as np
import pytest

from gsr_compiler.bench import BenchOptions, resolve_options, run_bench
from gsr_compiler.bench.batch_search import Probe, largest_fitting_batch
from gsr_compiler.bench.epoch_plan import CircuitCones, plan_epoch

ISSUE_BASELINES = ["plain", "checkpoint", "deepgcn", "groupaddrev", "torch.compile", "gsr-rev",
                   "gsr-full"]


# ----------------------------------------------------------------------------- the search


def _fake(limit: int, calls: list):
    def measure(n: int) -> Probe:
        calls.append(n)
        return Probe(n, n <= limit, peak_bytes=10 * n)
    return measure


@pytest.mark.parametrize("start", [None, 300, 5000])
def test_search_finds_the_largest_fitting_size_within_tolerance(start):
    calls: list = []
    result = largest_fitting_batch(_fake(1000, calls), 32, 100_000, start=start, tolerance=0.05)
    assert result.batch_nodes is not None
    assert 1000 / 1.05 <= result.batch_nodes <= 1000
    assert result.accepted.fits and result.accepted.batch_nodes == result.batch_nodes
    assert calls[0] == 32  # the smallest is measured first
    assert len(calls) == len(set(calls))  # nothing measured twice
    assert any(not p.fits and p.batch_nodes <= result.batch_nodes * 1.05 + 1
               for p in result.probes)  # a measured failure bounds the answer


def test_search_takes_the_largest_useful_size_when_everything_fits():
    result = largest_fitting_batch(_fake(10 ** 9, []), 32, 5000)
    assert result.batch_nodes == 5000


def test_search_refuses_when_nothing_fits():
    result = largest_fitting_batch(_fake(10, []), 32, 5000)
    assert result.batch_nodes is None and result.accepted is None
    assert "smallest batch (32 nodes)" in result.reason
    assert len(result.probes) == 1


def test_a_failed_measurement_counts_as_not_fitting():
    def measure(n: int) -> Probe:
        if n > 200:
            return Probe(n, False, None, "died: killed by SIGKILL")
        return Probe(n, True, n)
    result = largest_fitting_batch(measure, 32, 5000, tolerance=0.01)
    assert 198 <= result.batch_nodes <= 200
    assert any(p.reason and "SIGKILL" in p.reason for p in result.probes)


# ----------------------------------------------------------------------------- the epoch


@pytest.fixture(scope="module")
def small_circuits():
    from gsr_compiler.circuits import load_circuit

    return [CircuitCones(load_circuit(name, labels=("level",))) for name in ("c432", "c880")]


def test_cone_sizes_are_exact(small_circuits):
    for cones in small_circuits:
        brute = np.array([cones.cone(v).size for v in range(cones.num_nodes)])
        assert (cones.sizes == brute).all()


@pytest.mark.parametrize("batch_nodes", [40, 120, 300, 10_000])
def test_the_epoch_scores_every_coverable_node_exactly_once(small_circuits, batch_nodes):
    plan = plan_epoch(small_circuits, batch_nodes)
    scored = [np.zeros(c.num_nodes, dtype=np.int64) for c in small_circuits]
    for batch in plan.batches:
        assert 0 < batch.num_nodes <= batch_nodes
        for part in batch.parts:
            np.add.at(scored[part.circuit], part.nodes[part.scored], 1)
            # a part is closed under fan-in: every node keeps its exact label
            src, dst = small_circuits[part.circuit].data.edge_index.numpy()
            inside = np.zeros(small_circuits[part.circuit].num_nodes, dtype=bool)
            inside[part.nodes] = True
            assert inside[src[inside[dst]]].all()
    for cones, counts, uncovered in zip(small_circuits, scored, plan.uncovered):
        coverable = cones.sizes <= batch_nodes
        assert (counts[coverable] == 1).all()
        assert (counts[~coverable] == 0).all()
        assert uncovered == int((~coverable).sum())
    summary = plan.summary()
    assert summary["scored_nodes"] + summary["uncovered_nodes"] == summary["nodes"]
    if batch_nodes >= sum(c.num_nodes for c in small_circuits):
        assert len(plan.batches) == 1 and summary["recompute_factor"] == 1.0


# ----------------------------------------------------------------------------- the sweep


def _options(tmp_path, **changes) -> BenchOptions:
    values = dict(out=str(tmp_path / "out"), sweeps=["budget"], baselines=list(ISSUE_BASELINES),
                  width=8, budget_depth=2, budget_train=["c17", "c432"], budget_test=["c499"],
                  step_budget_gib=2 ** -20, train_seconds=0.5, budget_evals=1, time_budget=120.0,
                  threads=1, progress=False)
    values.update(changes)
    return BenchOptions(**values)


def test_every_baseline_has_a_row_with_a_reason_when_nothing_fits(tmp_path):
    options = _options(tmp_path, baselines=[b for b in ISSUE_BASELINES if b != "torch.compile"])
    results = run_bench(options, log=lambda line: None)
    rows = results["sweeps"]["budget"]["rows"]
    assert [r["baseline"] for r in rows] == options.baselines
    for row in rows:
        outcome = row["outcome"]
        assert outcome["status"] == "failed" and outcome["kind"] == "memory budget"
        assert "smallest batch" in outcome["reason"]
    text = (tmp_path / "out" / "results.md").read_text()
    assert "Equal memory budget" in text and "memory budget" in text


def test_every_baseline_has_figures_or_a_reason(tmp_path):
    results = run_bench(_options(tmp_path, step_budget_gib=0.5, time_budget=240.0),
                        log=lambda line: None)
    rows = results["sweeps"]["budget"]["rows"]
    assert [r["baseline"] for r in rows] == ISSUE_BASELINES
    for row in rows:
        outcome = row["outcome"]
        if outcome["status"] == "ok":
            m, q = outcome["measurement"], outcome["quality"]
            assert m["batch_nodes"] >= 32 and m["peak_bytes"] <= 2 ** 29
            assert m["epoch"]["batches"] >= 1 and m["epoch_seconds"] > 0
            assert q["train_seconds"] >= 0.5 and q["curve"] and -1 <= q["kendall"] <= 1
        else:
            assert outcome["reason"], row
    assert rows[0]["outcome"]["status"] == "ok"  # plain at depth 2 fits a budget this size
    assert (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("changes, message", [
    (dict(baselines=["plain", "gsr-fast"]), "unknown 'gsr-fast'"),
    (dict(step_budget_gib=0.0), "--step-budget must be a positive number"),
    (dict(step_budget_gib=-1.0), "--step-budget must be a positive number"),
    (dict(step_budget_gib=float("nan")), "--step-budget must be a positive number"),
    (dict(train_seconds=0.0), "--train-seconds must be a positive number"),
    (dict(budget_test=["c432"]), "in both --budget-train and --budget-test"),
    (dict(budget_train=["no_such_circuit"]), "--budget-train"),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        resolve_options(_options(tmp_path, **changes))
    assert not (tmp_path / "out").exists()


def test_the_budget_sweep_runs_only_when_asked_for(tmp_path):
    o = resolve_options(BenchOptions(quick=True, out=str(tmp_path / "out")))
    assert "budget" not in o.sweeps
    o = resolve_options(BenchOptions(sweeps=["budget"], out=str(tmp_path / "out")))
    assert o.budget_train and all(name.startswith("b") for name in o.budget_train)
    assert "gsr-sparse" not in o.sweep_baselines["budget"]
