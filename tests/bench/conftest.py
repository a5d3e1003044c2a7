"""Set-up of the benchmark tests: a private circuit cache and a tiny graph."""
from __future__ import annotations

import pytest

from gsr_compiler.bench.workloads import random_workload


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # one cache for the folder (each circuit parsed once), never the user's
    monkeypatch.setenv("GSR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "bench_cache"))


@pytest.fixture
def tiny_workload():
    return random_workload(64, 160, seed=0)
