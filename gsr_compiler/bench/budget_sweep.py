"""The budget sweep: every baseline at the same memory budget, with the largest batch it fits.

For each baseline:

1. **The largest batch that fits**, by measuring (:mod:`.batch_search`): a batch size of ``B``
   nodes is tried on the largest batch of the epoch at ``B`` (:mod:`.epoch_plan`); one training
   step of it runs in a fresh process with glibc's mmap threshold fixed (what the model needs,
   ``docs/memory.md``), and its peak is what was resident before it (parameters, gradients,
   Adam's two moments, the batch's tensors: counted from the tensors themselves) plus the
   measured RSS rise of the step. It fits when that peak is at most the budget. GSR's search
   may start from our predictor's guess; the accepted size is measured like every other.
2. **One epoch**: every node of the training circuits scored once, in batches of that size
   (nodes whose cone is larger than the batch cannot be scored and are counted). Its time is
   the number of batches times the mean measured seconds per batch (steps after the first,
   which holds lazy compilation); the table says how many batches were measured.
3. **Quality after equal wall-clock time**: each baseline trains for the same seconds
   (Adam, gradient clipping 1, the epoch's batches in a new random order each epoch), the
   test circuits are scored at fixed points of that clock (scoring is not counted), and the
   test Kendall against training seconds is kept for the plot.

Every baseline ends in a row: figures, or the reason it has none (nothing fits the budget, a
failure, a time limit).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..memory import FIXED_MMAP_THRESHOLD, measure_step
from ..report import format_bytes
from .baselines import Baseline, ModelSpec
from .batch_search import Probe, SearchResult, largest_fitting_batch
from .epoch_plan import CircuitCones, EpochPlan, batch_tensors, plan_epoch
from .harness import Budget, Outcome, run_isolated

__all__ = ["BudgetSettings", "BudgetSweep", "SMALLEST_BATCH"]

SMALLEST_BATCH = 32  # gsr train's smallest useful batch


@dataclass
class BudgetSettings:
    """What the sweep needs besides the baselines and the architecture."""

    budget_bytes: int
    train: list[str]
    test: list[str]
    label: str = "level"
    train_seconds: float = 60.0
    evals: int = 4  # test scorings over the training clock
    lr: float = 1e-3
    eval_max_nodes: Optional[int] = None
    tolerance: float = 0.1  # the batch search stops within this share
    max_probes: int = 12
    device: str = "cpu"
    threads: Optional[int] = None
    seed: int = 0
    cache_dir: Optional[str] = None
    time_limit: Optional[float] = None  # per process, besides the training seconds
    process_memory: Optional[int] = None  # kill a process whose RSS passes this (safety net)


# ----------------------------------------------------------------------------- in the child


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class ProbeJob:
    baseline: Baseline
    spec: ModelSpec
    x: torch.Tensor
    edge_index: torch.Tensor
    target: torch.Tensor
    seed: int = 0
    predict_for: Optional[int] = None  # GSR: also the predictor's largest batch at this budget


def measure_probe(job: ProbeJob) -> dict:
    """One training step's peak at this batch (runs in a fresh process)."""
    torch.manual_seed(job.seed)
    inputs = (job.x, job.edge_index)
    model = job.baseline.build(job.spec, inputs)
    m = measure_step(model, inputs, job.target, timing_steps=0, count_saved=False)
    if m.rss_rise is None:
        raise RuntimeError("the RSS rise cannot be read on this system (/proc/self/status)")
    trainable = sum(_tensor_bytes(p) for p in model.parameters() if p.requires_grad)
    resident = {
        "parameters": sum(_tensor_bytes(t) for t in model.parameters())
        + sum(_tensor_bytes(t) for t in model.buffers()),
        "gradients": sum(_tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None),
        "optimizer_state": 2 * trainable,  # Adam's two moments, made at its first step
        "inputs": sum(_tensor_bytes(t) for t in (job.x, job.edge_index, job.target)),
    }
    result = {"rss_rise": int(m.rss_rise), "peak_rss": m.peak_rss, "resident": resident,
              "nodes": int(job.x.shape[0]), "edges": int(job.edge_index.shape[1])}
    if job.predict_for is not None and hasattr(model, "max_nodes"):
        degree = job.edge_index.shape[1] / max(job.x.shape[0], 1)
        result["predicted_max_nodes"] = int(model.max_nodes(job.predict_for, 1.25 * degree))
    return result


@dataclass
class TrainJob:
    baseline: Baseline
    spec: ModelSpec
    train: list[str]
    test: list[str]
    batches: list  # EpochBatch
    label: str
    seconds: float
    evals: int
    lr: float
    eval_max_nodes: Optional[int]
    seed: int
    device: str
    cache_dir: Optional[str]


def train_for_seconds(job: TrainJob) -> dict:
    """Trains for ``job.seconds`` of wall clock over the epoch's batches and scores the test
    circuits at ``job.evals`` points of that clock (runs in a fresh process)."""
    from ..circuits import load_circuit
    from ..train import LABEL_TARGETS, TrainConfig, evaluate, train_step

    target, direction = LABEL_TARGETS[job.label]
    train = [CircuitCones(load_circuit(n, labels=(job.label,), cache_dir=job.cache_dir),
                          direction) for n in job.train]
    test = [load_circuit(n, labels=(job.label,), cache_dir=job.cache_dir) for n in job.test]
    cfg = TrainConfig(label=job.label, depth=job.spec.depth, width=job.spec.width, lr=job.lr,
                      eval_max_nodes=job.eval_max_nodes, seed=job.seed, device=job.device)
    device = torch.device(job.device)
    rng = np.random.default_rng(job.seed)
    order = rng.permutation(len(job.batches))
    first = batch_tensors(job.batches[int(order[0])], train, target).to(device)
    torch.manual_seed(job.seed)
    start = time.perf_counter()
    model = job.baseline.build(job.spec, (first.x, first.edge_index)).to(device)
    build_seconds = time.perf_counter() - start
    optimizer = torch.optim.Adam(model.parameters(), lr=job.lr)
    torch.manual_seed(job.seed + 1)  # the stream dropout draws from, as in gsr train
    marks = [job.seconds * (k + 1) / job.evals for k in range(job.evals)]
    clock, steps, position, epoch = 0.0, 0, 0, 0
    step_seconds: list[float] = []
    build_batch_seconds = 0.0
    curve = []
    losses: list[float] = []
    while clock < job.seconds:
        if position == len(order):  # a new epoch, a new order
            epoch, position = epoch + 1, 0
            order = rng.permutation(len(job.batches))
        tick = time.perf_counter()
        batch = first if steps == 0 else \
            batch_tensors(job.batches[int(order[position])], train, target).to(device)
        built = time.perf_counter()
        losses.append(train_step(model, optimizer, batch, clip=1.0))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"loss is {losses[-1]} at step {steps + 1}")
        done = time.perf_counter()
        build_batch_seconds += built - tick
        step_seconds.append(done - tick)
        clock += done - tick
        steps += 1
        position += 1
        if marks and clock >= marks[0]:
            while marks and clock >= marks[0]:  # one long step can pass several marks
                marks.pop(0)
            scoring = time.perf_counter()
            test_metrics, _ = evaluate(model, test, cfg, device)
            average = test_metrics["average"]
            curve.append({"train_seconds": clock, "steps": steps,
                          "epochs": steps / len(job.batches),
                          "kendall": float(average["kendall"]),
                          "pearson": float(average["pearson"]),
                          "eval_seconds": time.perf_counter() - scoring})
    steady = step_seconds[1:] or step_seconds
    per_batch = float(np.mean(steady))
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "build_seconds": build_seconds,
        "first_step_seconds": step_seconds[0],
        "steps": steps,
        "epochs": steps / len(job.batches),
        "train_seconds": clock,
        "batch_build_seconds": build_batch_seconds,
        "seconds_per_batch": per_batch,
        "timed_batches": len(steady),
        "epoch_seconds": per_batch * len(job.batches),
        "epoch_measured_whole": len(steady) >= len(job.batches),
        "kendall": curve[-1]["kendall"],
        "pearson": curve[-1]["pearson"],
        "curve": curve,
        "final_loss": sum(tail) / len(tail),
    }


# ----------------------------------------------------------------------------- the sweep


def _probe_outcome(batch_nodes: int, budget: int, run) -> Probe:
    if not run.ok:
        return Probe(batch_nodes, False, None, f"{run.kind}: {run.reason}")
    value = run.value
    peak = int(sum(value["resident"].values()) + value["rss_rise"])
    details = dict(value)
    fits = peak <= budget
    reason = None if fits else f"measured peak {format_bytes(peak)} > {format_bytes(budget)}"
    return Probe(batch_nodes, fits, peak, reason, details)


@dataclass
class BudgetSweep:
    """Runs the three stages for one baseline at a time (see the module docstring)."""

    settings: BudgetSettings
    log: Callable[[str], None] = print
    _circuits: Optional[list[CircuitCones]] = field(default=None, repr=False)
    _plans: dict = field(default_factory=dict, repr=False)

    @property
    def circuits(self) -> list[CircuitCones]:
        if self._circuits is None:
            from ..circuits import load_circuit
            from ..train import LABEL_TARGETS

            _, direction = LABEL_TARGETS[self.settings.label]
            self._circuits = [CircuitCones(load_circuit(n, labels=(self.settings.label,),
                                                        cache_dir=self.settings.cache_dir),
                                           direction) for n in self.settings.train]
        return self._circuits

    @property
    def total_nodes(self) -> int:
        return sum(c.num_nodes for c in self.circuits)

    def plan(self, batch_nodes: int) -> EpochPlan:
        if batch_nodes not in self._plans:
            self._plans[batch_nodes] = plan_epoch(self.circuits, batch_nodes)
        return self._plans[batch_nodes]

    def _budget(self, seconds: float = 0.0) -> Budget:
        s = self.settings
        return Budget(seconds=None if s.time_limit is None else s.time_limit + seconds,
                      memory_bytes=s.process_memory)

    def _probe_job(self, baseline: Baseline, spec: ModelSpec, batch_nodes: int,
                   predict: bool = False) -> Optional[ProbeJob]:
        from ..train import LABEL_TARGETS

        largest = self.plan(batch_nodes).largest_batch()
        if largest is None:
            return None
        b = batch_tensors(largest, self.circuits, LABEL_TARGETS[self.settings.label][0])
        return ProbeJob(baseline, spec, b.x, b.edge_index, b.target.unsqueeze(-1),
                        self.settings.seed, self.settings.budget_bytes if predict else None)

    def probe(self, baseline: Baseline, spec: ModelSpec, batch_nodes: int) -> Probe:
        job = self._probe_job(baseline, spec, batch_nodes)
        if job is None:
            return Probe(batch_nodes, False, None, "no node of the training circuits has a "
                                                   "cone this small")
        run = run_isolated(measure_probe, (job,), self._budget(), device=self.settings.device,
                           threads=self.settings.threads, mmap_threshold=FIXED_MMAP_THRESHOLD)
        probe = _probe_outcome(batch_nodes, self.settings.budget_bytes, run)
        self.log(f"  {baseline.name}: batch of {batch_nodes:,} nodes (largest of the epoch: "
                 f"{job.x.shape[0]:,} nodes): "
                 + (f"peak {format_bytes(probe.peak_bytes)}, " if probe.peak_bytes else "")
                 + ("fits" if probe.fits else f"does not fit ({probe.reason[:200]})"))
        return probe

    def _predicted_start(self, baseline: Baseline, spec: ModelSpec) -> Optional[int]:
        """GSR only: the predictor's largest batch, a first guess for the search."""
        if not baseline.name.startswith("gsr"):
            return None
        job = self._probe_job(baseline, spec, SMALLEST_BATCH, predict=True)
        if job is None:
            return None
        run = run_isolated(measure_probe, (job,), self._budget(), device=self.settings.device,
                           threads=self.settings.threads, mmap_threshold=FIXED_MMAP_THRESHOLD)
        return run.value.get("predicted_max_nodes") if run.ok else None

    def search(self, baseline: Baseline, spec: ModelSpec) -> SearchResult:
        s = self.settings
        start = self._predicted_start(baseline, spec)
        if start:
            self.log(f"  {baseline.name}: the predictor's largest batch, {start:,} nodes, is "
                     "where the search starts (it is measured like any other)")
        return largest_fitting_batch(lambda n: self.probe(baseline, spec, n), SMALLEST_BATCH,
                                     max(SMALLEST_BATCH, self.total_nodes), start=start,
                                     tolerance=s.tolerance, max_probes=s.max_probes)

    def evaluate(self, baseline: Baseline, spec: ModelSpec) -> Outcome:
        """The row of one baseline: batch search, epoch, training for equal seconds."""
        s = self.settings
        began = time.perf_counter()
        self.log(f"{baseline.name}: searching the largest batch under "
                 f"{format_bytes(s.budget_bytes)}")
        search = self.search(baseline, spec)
        measurement: dict = {"search": search.as_dict(), "budget_bytes": s.budget_bytes}
        if search.batch_nodes is None:
            return Outcome(baseline.name, "failed", "memory budget", search.reason,
                           measurement=measurement, seconds=time.perf_counter() - began)
        accepted = search.accepted
        plan = self.plan(search.batch_nodes)
        measurement.update(batch_nodes=search.batch_nodes, peak_bytes=accepted.peak_bytes,
                           epoch=plan.summary())
        self.log(f"{baseline.name}: batches of up to {search.batch_nodes:,} nodes; an epoch is "
                 f"{len(plan.batches):,} batches, {plan.summary()['covered_share']:.1%} of the "
                 f"nodes scorable; training {s.train_seconds:g} s")
        job = TrainJob(baseline, spec, list(s.train), list(s.test), plan.batches, s.label,
                       s.train_seconds, s.evals, s.lr, s.eval_max_nodes, s.seed, s.device,
                       s.cache_dir)
        run = run_isolated(train_for_seconds, (job,), self._budget(s.train_seconds),
                           device=s.device, threads=s.threads)
        seconds = time.perf_counter() - began
        if not run.ok:
            return Outcome(baseline.name, "failed", run.kind,
                           f"training at the accepted batch: {run.reason}",
                           measurement=measurement, seconds=seconds)
        quality = dict(run.value)
        measurement.update({k: quality.pop(k) for k in (
            "seconds_per_batch", "timed_batches", "epoch_seconds", "epoch_measured_whole",
            "build_seconds", "first_step_seconds", "batch_build_seconds")})
        return Outcome(baseline.name, "ok", measurement=measurement, quality=quality,
                       seconds=seconds)
