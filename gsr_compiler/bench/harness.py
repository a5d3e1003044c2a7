"""Runs one configuration in a fresh process and records how it ended.

Each configuration (a baseline at one depth, width and graph) is built and measured in a
process of its own, so that its peak memory is its own and a crash, an out-of-memory kill
or a runaway compilation cannot take the benchmark down with it. A configuration ends in
one of these ways, and every one of them is recorded:

* ``ok``: the measurement;
* ``exception``: the build or the step raised (the exception and its message are kept);
* ``out of memory``: the allocator gave up (``torch.OutOfMemoryError``, ``MemoryError``);
* ``memory budget``: the process's resident memory passed ``Budget.memory_bytes`` and it
  was stopped (CPU; on CUDA the budget caps the device memory the process may use);
* ``time budget``: it ran longer than ``Budget.seconds`` and was stopped;
* ``died``: the process ended without a result (killed by the out-of-memory killer, a
  segfault).

On CPU the processes are forked from a server that has already imported torch and PyG
(``multiprocessing``'s forkserver), which makes a fresh process cost milliseconds instead
of seconds; on CUDA they are spawned, since CUDA must not be initialised before a fork.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..memory import FIXED_MMAP_THRESHOLD, default_loss, measure_step
from ..report import format_bytes
from .baselines import Baseline, ModelSpec
from .workloads import Workload

#: How a configuration can end besides ``ok``.
FAILURE_KINDS = ("exception", "out of memory", "memory budget", "time budget", "died")

_POLL_SECONDS = 0.02  # how often the parent looks at the child's memory and the clock
_REASON_CHARS = 2000


@dataclass(frozen=True)
class Budget:
    """Limits of one configuration. ``None``: no limit."""

    seconds: float | None = None  # wall clock: build, compilation and the measured steps
    memory_bytes: int | None = None  # resident memory (CPU) or device memory (CUDA)


@dataclass
class Isolated:
    """What came back from a fresh process."""

    value: Any = None
    kind: str | None = None  # None on success, else one of FAILURE_KINDS
    reason: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.kind is None


@dataclass
class Outcome:
    """One configuration's result: measured, failed (with the reason) or not run."""

    baseline: str
    status: str  # "ok", "failed" or "not run"
    kind: str | None = None
    reason: str | None = None
    measurement: dict | None = None  # StepMeasurement fields and set-up figures
    quality: dict | None = None  # test metrics after training (quality sweep)
    seconds: float = 0.0  # wall clock of the configuration, processes included
    notes: list[str] = field(default_factory=list)
    measured_in: str | None = None  # the same configuration met earlier: measured there, once

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _ChildSettings:
    threads: int | None
    mmap_threshold: int | None
    cuda_memory_bytes: int | None
    cuda_device: str | None


_PRELOAD = ["torch", "torch_geometric", "gsr_compiler", "gsr_compiler.bench.harness",
            "gsr_compiler.bench.quality"]
_contexts: dict[str, Any] = {}


def _context(cuda: bool):
    method = "spawn" if cuda or "forkserver" not in mp.get_all_start_methods() else "forkserver"
    ctx = _contexts.get(method)
    if ctx is None:
        ctx = mp.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(_PRELOAD)
        _contexts[method] = ctx
    return ctx


def fix_mmap_threshold(threshold: int) -> None:
    """Fixes glibc's mmap threshold in this process (what ``MALLOC_MMAP_THRESHOLD_`` does at
    start-up: freed large blocks go back to the system at once)."""
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # from glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = libc.mallopt(m_mmap_threshold, int(threshold)) == 1
    except (OSError, AttributeError):
        done = False
    if not done:
        raise RuntimeError("cannot fix the mmap threshold: mallopt is not available (not glibc)")


def _failure_kind(error: BaseException) -> str:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return "out of memory"
    text = str(error)
    if isinstance(error, RuntimeError) and ("can't allocate memory" in text
                                            or "out of memory" in text.lower()):
        return "out of memory"
    return "exception"


def _reason(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    if len(text) < 40:  # a bare exception says little; say where it came from
        where = traceback.extract_tb(error.__traceback__)[-1:]
        if where:
            text += f" (at {where[0].filename}:{where[0].lineno})"
    return text[:_REASON_CHARS]


def _child_main(connection, fn: Callable, args: tuple, settings: _ChildSettings) -> None:
    try:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if settings.mmap_threshold is not None:
            fix_mmap_threshold(settings.mmap_threshold)
        if settings.cuda_memory_bytes is not None and settings.cuda_device is not None:
            device = torch.device(settings.cuda_device)
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, settings.cuda_memory_bytes / total), device)
        message = ("ok", fn(*args))
    except BaseException as error:  # everything goes back to the parent, which decides
        message = ("failed", _failure_kind(error), _reason(error))
    try:
        connection.send(message)
    except Exception as error:  # e.g. a result that cannot be pickled
        connection.send(("failed", "exception", f"the result could not be sent back: "
                                                f"{_reason(error)}"))
    connection.close()


def _kill_tree(proc) -> None:
    """Stops the child and what it started (e.g. compile workers)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    for p in children:
        try:
            p.kill()
        except psutil.Error:
            pass
    if proc.is_alive():
        proc.kill()
    proc.join()


def _died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        number = -exitcode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        hint = ": usually the out-of-memory killer" if number == signal.SIGKILL else ""
        return f"the process died without a result (killed by {name}{hint})"
    return f"the process died without a result (exit code {exitcode})"


def run_isolated(fn: Callable, args: tuple = (), budget: Budget = Budget(), *,
                 device: str = "cpu", threads: int | None = None,
                 mmap_threshold: int | None = None) -> Isolated:
    """Runs ``fn(*args)`` in a fresh process under ``budget``; ``fn`` and its arguments
    must be picklable (module-level functions and plain data). ``device``: where ``fn``
    computes (a CUDA device is started in a spawned process, and the memory budget caps
    its device memory there)."""
    import psutil

    cuda = str(device).startswith("cuda")
    ctx = _context(cuda)
    reader, writer = ctx.Pipe(duplex=False)
    settings = _ChildSettings(threads, mmap_threshold, budget.memory_bytes if cuda else None,
                              str(device) if cuda else None)
    start = time.perf_counter()
    proc = ctx.Process(target=_child_main, args=(writer, fn, args, settings))
    proc.start()
    writer.close()  # the child holds the only writer: its exit ends the pipe
    try:
        watched = psutil.Process(proc.pid)
    except psutil.Error:
        watched = None
    message = None
    try:
        while message is None:
            if reader.poll(_POLL_SECONDS):
                try:
                    message = reader.recv()
                except EOFError:  # the child is gone without a word
                    proc.join()
                    message = ("failed", "died", _died(proc.exitcode))
                break
            if budget.seconds is not None and time.perf_counter() - start > budget.seconds:
                _kill_tree(proc)
                message = ("failed", "time budget",
                           f"exceeded the time budget of {budget.seconds:g} s per configuration "
                           "(--time-budget; building, compiling and the steps all count)")
                break
            if budget.memory_bytes is not None and not cuda and watched is not None:
                try:
                    rss = watched.memory_info().rss
                except psutil.Error:
                    continue
                if rss > budget.memory_bytes:
                    _kill_tree(proc)
                    message = ("failed", "memory budget",
                               f"exceeded the memory budget: resident memory reached "
                               f"{format_bytes(rss)} > {format_bytes(budget.memory_bytes)} "
                               "(--memory-budget)")
                    break
    finally:
        if message is None:  # interrupted while it ran: it must not outlive the benchmark
            _kill_tree(proc)
        else:  # it sent its result and is exiting
            proc.join(timeout=10)
            if proc.is_alive():
                _kill_tree(proc)
        reader.close()
    seconds = time.perf_counter() - start
    if message[0] == "ok":
        return Isolated(value=message[1], seconds=seconds)
    return Isolated(kind=message[1], reason=message[2], seconds=seconds)


# ----------------------------------------------------------------------------- one step


@dataclass
class StepJob:
    """What the measuring process needs: the baseline, the architecture and the graph."""

    baseline: Baseline
    spec: ModelSpec
    x: Tensor
    edge_index: Tensor
    target: Tensor
    device: str = "cpu"
    timing_steps: int = 3
    memory_only: bool = False  # the second, fixed-mmap-threshold run: peak memory only
    seed: int = 0


def measure_baseline_step(job: StepJob) -> dict:
    """Builds the baseline and measures one training step (runs in the fresh process)."""
    device = torch.device(job.device)
    inputs = (job.x.to(device), job.edge_index.to(device))
    target = job.target.to(device)
    torch.manual_seed(job.seed)
    start = time.perf_counter()
    model = job.baseline.build(job.spec, inputs).to(device)
    build_seconds = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    # the first step on its own: it includes lazy compilation (torch.compile), a cost
    # users pay once per shape that the measured steps below no longer show
    start = time.perf_counter()
    model.train()
    default_loss(model(*inputs), target).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_step_seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    m = measure_step(model, inputs, target, timing_steps=0 if job.memory_only else job.timing_steps,
                     count_saved=not job.memory_only)
    return {**asdict(m), "build_seconds": build_seconds, "first_step_seconds": first_step_seconds,
            "parameters": parameters}


def measure_configuration(baseline: Baseline, spec: ModelSpec, workload: Workload, *,
                          device: str = "cpu", timing_steps: int = 3, budget: Budget = Budget(),
                          threads: int | None = None, fixed_threshold: bool = True,
                          seed: int = 0) -> Outcome:
    """Measures one baseline on one graph in fresh processes: the step with the default
    allocator (memory, saved bytes, time) and, on CPU, once more with glibc's mmap
    threshold fixed (peak memory only), as ``gsr_compiler.memory`` describes."""
    cuda = device.startswith("cuda")
    job = StepJob(baseline, spec, workload.x, workload.edge_index, workload.target, device,
                  timing_steps, False, seed)
    run = run_isolated(measure_baseline_step, (job,), budget, device=device, threads=threads)
    if not run.ok:
        return Outcome(baseline.name, "failed", run.kind, run.reason, seconds=run.seconds)
    outcome = Outcome(baseline.name, "ok", measurement=run.value, seconds=run.seconds)
    if fixed_threshold and not cuda:
        job.memory_only = True
        fixed = run_isolated(measure_baseline_step, (job,), budget, threads=threads,
                             mmap_threshold=FIXED_MMAP_THRESHOLD)
        outcome.seconds += fixed.seconds
        if fixed.ok:
            outcome.measurement["peak_rss_fixed"] = fixed.value["peak_rss"]
            outcome.measurement["rss_rise_fixed"] = fixed.value["rss_rise"]
        else:
            outcome.notes.append(f"fixed-threshold run failed ({fixed.kind}): {fixed.reason}")
    return outcome
