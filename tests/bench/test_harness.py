"""A configuration that fails is recorded as failed, with the reason, however it fails;
a sweep keeps it in the table and says where it stopped."""
from __future__ import annotations

import math

import pytest
import torch

from gsr_compiler.bench.baselines import BASELINES
from gsr_compiler.bench.harness import Budget, measure_configuration
from gsr_compiler.bench.report import markdown, ratio_to_plain
from gsr_compiler.bench.sweeps import Runner, SweepPoint, run_sweep
from gsr_compiler.memory import measure_step
from gsr_compiler.models import ResidualGNN

from .failing import BROKEN, EXITING, HUGE, MEMORY_HOG, SLEEPER, TINY_SPEC


@pytest.mark.parametrize("baseline, budget, kind, words", [
    (BROKEN, Budget(seconds=120), "exception", "broken on purpose"),
    (EXITING, Budget(seconds=120), "died", "exit code 3"),
    (HUGE, Budget(seconds=120), "out of memory", "allocate"),
    (MEMORY_HOG, Budget(seconds=120, memory_bytes=1 << 30), "memory budget", "--memory-budget"),
    (SLEEPER, Budget(seconds=3), "time budget", "--time-budget"),
], ids=["raises", "process exits", "out of memory", "memory budget", "time budget"])
def test_failure_is_recorded_with_its_reason(baseline, budget, kind, words, tiny_workload):
    outcome = measure_configuration(baseline, TINY_SPEC, tiny_workload, timing_steps=1,
                                    budget=budget, threads=1)
    assert outcome.status == "failed"
    assert outcome.kind == kind
    assert words in outcome.reason
    assert outcome.measurement is None


def test_sweep_keeps_failures_and_says_where_it_stopped(tiny_workload):
    points = [SweepPoint(f"depth {d}", {"depth": d}, TINY_SPEC.__class__(16, 8, d), tiny_workload)
              for d in (1, 2)]
    runner = Runner(timing_steps=1, budget=Budget(seconds=120), threads=1)
    rows = run_sweep("depth", points, [BASELINES["plain"], BROKEN], runner.measure,
                     progress=False)
    got = [(r.point, r.baseline, r.outcome.status) for r in rows]
    assert got == [("depth 1", "plain", "ok"), ("depth 1", "broken", "failed"),
                   ("depth 2", "plain", "ok"), ("depth 2", "broken", "not run")]
    assert "failed at depth 1 (exception)" in rows[3].outcome.reason

    results = {"command": "test", "started": "now", "seconds": 1.0, "complete": True,
               "machine": {"platform": "p", "cpu": "c", "logical_cpus": 1, "torch_threads": 1,
                           "memory_total_bytes": 1, "memory_available_bytes": 1, "device": "cpu",
                           "python": "3", "torch": torch.__version__, "torch_geometric": "x",
                           "triton": None, "gsr_compiler": "0"},
               "options": {"device": "cpu"}, "baselines": {"plain": "p", "broken": "b"},
               "method": ["m"], "notes": [],
               "sweeps": {"depth": {"description": "d", "rows": [r.as_dict() for r in rows]}}}
    text = markdown(results, [])
    assert "| 1 | `broken` | **failed**: exception [1] |" in text
    assert "[1] broken at depth 1: RuntimeError: this baseline is broken on purpose" in text
    assert "| 2 | `broken` | **not run** [2] |" in text
    assert "`broken`: stopped at depth 1 (exception; did not fit at any point)" in text
    plain_row = results["sweeps"]["depth"]["rows"][0]
    assert ratio_to_plain(results["sweeps"]["depth"]["rows"], plain_row, "saved_bytes") == 1.0
    broken_row = results["sweeps"]["depth"]["rows"][1]
    assert ratio_to_plain(results["sweeps"]["depth"]["rows"], broken_row, "saved_bytes") is None


def test_measure_step_memory_only(tiny_workload):
    model = ResidualGNN(16, 8, 1, 2)
    m = measure_step(model, tiny_workload.inputs, tiny_workload.target, timing_steps=0,
                     count_saved=False)
    assert math.isnan(m.step_seconds) and m.saved_bytes == 0
