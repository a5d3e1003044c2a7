"""Sweeps: every baseline over a list of points (depths, widths, circuits), smallest first.

A baseline runs as far as it fits: at its first failure (an exception, out of memory, the
memory or time budget) it stops, and every later point of that sweep records it as
``not run`` with where and why it stopped. A failure is never dropped from the results.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

from .baselines import Baseline, ModelSpec
from .harness import Budget, Outcome, measure_configuration, run_isolated
from .quality import QualityJob, train_and_score
from .workloads import Workload


@dataclass
class SweepPoint:
    """One point of a sweep: its label, the swept value, the architecture and the graph."""

    label: str  # "depth 64", "width 128", "b19_Cg"
    values: dict  # {"depth": 64}
    spec: ModelSpec
    workload: Optional[Workload] = None  # memory sweeps; quality trains on circuits


@dataclass
class Row:
    """One baseline at one point of one sweep."""

    sweep: str
    point: str
    values: dict
    baseline: str
    outcome: Outcome
    spec: dict = field(default_factory=dict)
    workload: Optional[dict] = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Runner:
    """Measures configurations with one device, budget and step count; a configuration
    met twice (the base point of the width and size sweeps is a point of the depth
    sweep) is measured once."""

    device: str = "cpu"
    timing_steps: int = 3
    budget: Budget = Budget()
    threads: Optional[int] = None
    seed: int = 0
    fixed_threshold: bool = True
    _cache: dict = field(default_factory=dict)

    def measure(self, baseline: Baseline, point: SweepPoint, where: str = "") -> Outcome:
        key = ("step", baseline.name, point.spec, point.workload.key)
        if key in self._cache:
            first, outcome = self._cache[key]
            return dataclasses.replace(outcome, measured_in=first)
        outcome = measure_configuration(
            baseline, point.spec, point.workload, device=self.device,
            timing_steps=self.timing_steps, budget=self.budget, threads=self.threads,
            fixed_threshold=self.fixed_threshold, seed=self.seed)
        self._cache[key] = (where or point.label, outcome)
        return outcome

    def train(self, baseline: Baseline, point: SweepPoint, **job) -> Outcome:
        """Trains and scores ``baseline`` at ``point`` in a fresh process."""
        run = run_isolated(train_and_score,
                           (QualityJob(baseline, point.spec, device=self.device, seed=self.seed,
                                       **job),),
                           self.budget, device=self.device, threads=self.threads)
        if not run.ok:
            return Outcome(baseline.name, "failed", run.kind, run.reason, seconds=run.seconds)
        return Outcome(baseline.name, "ok", quality=run.value, seconds=run.seconds)


def run_sweep(name: str, points: list[SweepPoint], baselines: list[Baseline],
              evaluate: Callable[[Baseline, SweepPoint], Outcome],
              on_row: Callable[[Row], None] = lambda row: None,
              progress: bool = True) -> list[Row]:
    """Runs ``evaluate`` for every baseline at every point; returns one row each."""
    from tqdm import tqdm

    rows: list[Row] = []
    stopped: dict[str, str] = {}
    bar = tqdm(total=len(points) * len(baselines), desc=f"{name} sweep", unit="config",
               disable=not progress, dynamic_ncols=True)
    try:
        for point in points:
            for baseline in baselines:
                baseline_name = baseline.name
                bar.set_postfix_str(f"{point.label}, {baseline_name}")
                if baseline_name in stopped:
                    outcome = Outcome(baseline_name, "not run", reason=stopped[baseline_name])
                else:
                    outcome = evaluate(baseline, point)
                    if outcome.status == "failed":
                        stopped[baseline_name] = (f"failed at {point.label} ({outcome.kind}), "
                                                  "so the later points are not run")
                row = Row(name, point.label, dict(point.values), baseline_name, outcome,
                          dataclasses.asdict(point.spec),
                          point.workload.as_dict() if point.workload is not None else None)
                rows.append(row)
                on_row(row)
                if outcome.measured_in:
                    bar.write(f"{name} sweep, {point.label}, {baseline_name}: the same "
                              f"configuration as {outcome.measured_in}, measured there")
                elif outcome.status != "not run":
                    bar.write(f"{name} sweep, {point.label}, {baseline_name}: {summarize(outcome)}")
                bar.update()
    finally:
        bar.close()
    return rows


def summarize(outcome: Outcome) -> str:
    """One line for the log."""
    from ..report import format_bytes

    if outcome.status != "ok":
        reason = (outcome.reason or "").splitlines()[0] if outcome.reason else ""
        return f"{outcome.status} ({outcome.kind}): {reason[:160]}"
    parts = []
    m = outcome.measurement or {}
    for key, label in (("rss_rise", "RSS rise"), ("rss_rise_fixed", "fixed-threshold rise"),
                       ("cuda_peak_allocated", "CUDA peak"), ("saved_bytes", "saved")):
        if m.get(key) is not None:
            parts.append(f"{label} {format_bytes(m[key])}")
    if m.get("step_seconds") is not None:
        parts.append(f"step {m['step_seconds'] * 1000:.1f} ms")
    q = outcome.quality
    if q:
        parts.append(f"test pearson {q['pearson']:.3f}, kendall {q['kendall']:.3f}")
    return ", ".join(parts) + f" [{outcome.seconds:.1f} s]"
