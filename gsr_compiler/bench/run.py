"""``gsr bench``: run the sweeps and write the results folder.

Order of work: check every option and load every graph (nothing is written if either
fails), then the depth, width, size and quality sweeps. ``results.json`` is rewritten after
every configuration, so a long run that is stopped keeps what it measured;
``results.md`` and the plots are written at the end, also when the run is interrupted.
"""
from __future__ import annotations

import datetime
import os
import signal
import threading
import time
from typing import Callable, Optional

import psutil

from ..memory import FIXED_MMAP_THRESHOLD
from ..report import format_bytes
from .baselines import BASELINES
from .harness import Budget
from .machine import machine_info
from .options import BenchOptions, resolve_options
from .report import RESULTS_JSON, write_json, write_results
from .sweeps import Row, Runner, SweepPoint, run_sweep
from .workloads import Workload, circuit_workload


def _architecture(o: BenchOptions, width: int) -> str:
    spec = o.spec(1, width)
    return (f"{o.conv} blocks, dropout {o.dropout}, {o.groups} groups of {spec.group_width} "
            f"channels for the grouped forms, top-k {spec.top_k} of {spec.group_width} for the "
            "sparse ones")


def _method(o: BenchOptions, budget: Budget, threads: int) -> list[str]:
    cuda = o.device.startswith("cuda")
    lines = [
        "A training step is forward, mean squared error against the normalised logic level "
        "(`level_norm`), and backward. Every configuration is built and measured in a fresh "
        "process of its own (forked from a server that has imported torch on CPU, spawned on "
        f"CUDA), with {threads} torch thread(s).",
    ]
    if cuda:
        lines.append("Memory: `torch.cuda.max_memory_allocated` and `max_memory_reserved` "
                     "around the measured step (reserved/allocated shows fragmentation).")
    else:
        lines.append("Memory: peak resident memory (RSS) of the measuring process during the "
                     "step, and its rise above the RSS just before the step. Measured twice: "
                     "with glibc's default allocator (what users see) and, in a second fresh "
                     f"process, with the mmap threshold fixed at {FIXED_MMAP_THRESHOLD} bytes "
                     "(`mallopt`, as `MALLOC_MMAP_THRESHOLD_` does), which returns freed blocks "
                     "at once and so shows what the model needs.")
    lines += [
        "Saved for backward: bytes of the tensors autograd keeps for backward, each storage "
        "counted once, parameters excluded (`torch.autograd.graph.saved_tensors_hooks`).",
        f"Step time: median of {o.timing_steps} steps after warm-up. Build + first step: "
        "model construction (`gsr_compile` traces and rewrites here) and the first step "
        "(`torch.compile` compiles here).",
        "Ratios (`/ plain`) are to the plain model at the same point of this run (`-` where "
        "the plain model did not run there).",
        "Budgets per configuration: "
        + (("device memory " if cuda else "resident memory ") + format_bytes(budget.memory_bytes)
           if budget.memory_bytes else "the device's memory")
        + (f", {budget.seconds:g} s wall clock" if budget.seconds else "")
        + ". A baseline stops at its first failure (exception, out of memory, a budget "
        "exceeded, the process died) and is listed as not run at the later points.",
    ]
    return lines


def _memory_budget(o: BenchOptions) -> Optional[int]:
    if o.memory_budget_gib is not None:
        return int(o.memory_budget_gib * 2 ** 30)
    if o.device.startswith("cuda"):
        return None  # the device's own capacity; running out is reported as out of memory
    return int(0.8 * psutil.virtual_memory().available)


def _load_workloads(o: BenchOptions, log) -> dict[str, Workload]:
    """Every graph the memory sweeps use, loaded (and label-checked) before anything runs."""
    names = []
    if {"depth", "width"} & set(o.sweeps):
        names.append(o.circuit)
    if "size" in o.sweeps:
        names += o.circuits
    loaded: dict = {}
    workloads = {}
    for name in dict.fromkeys(names):
        log(f"loading {name}")
        workloads[name] = circuit_workload(name, o.cone_nodes or None, seed=o.seed,
                                           cache_dir=o.cache_dir, loaded=loaded)
    circuits = []
    if "quality" in o.sweeps:
        circuits += list(o.train) + list(o.test)
    if "budget" in o.sweeps:
        circuits += list(o.budget_train) + list(o.budget_test)
    if circuits:
        from ..circuits import load_circuit

        circuits = list(dict.fromkeys(circuits))
        log(f"loading {len(circuits)} training and test circuits")
        for name in circuits:  # fills the cache the training processes read
            load_circuit(name, labels=(o.label,), cache_dir=o.cache_dir)
    return workloads


class Terminated(SystemExit):
    """SIGTERM (e.g. from ``timeout``): the run stops, and what it measured is written."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def run_bench(options: BenchOptions, log: Callable[[str], None] = print,
              command: str = "gsr bench") -> dict:
    """Runs the benchmark and writes ``options.out``; returns the results (as in
    ``results.json``). Raises ``ValueError`` (nothing written) for bad options."""
    import torch

    o = resolve_options(options)
    threads = o.threads or torch.get_num_threads()
    workloads = _load_workloads(o, log)
    budget = Budget(seconds=o.time_budget, memory_bytes=_memory_budget(o))
    cuda = o.device.startswith("cuda")
    results: dict = {
        "command": command,
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "complete": False,
        "machine": machine_info(o.device, threads),
        "options": o.as_dict(),
        "budget": {"memory_bytes": budget.memory_bytes, "seconds": budget.seconds},
        "baselines": {name: BASELINES[name].describe(o.spec(1), cuda)
                      for name in dict.fromkeys(o.baselines + o.quality_baselines)},
        "method": _method(o, budget, threads),
        "notes": list(o.notes),
        "sweeps": {},
    }
    runner = Runner(device=o.device, timing_steps=o.timing_steps, budget=budget,
                    threads=threads, seed=o.seed)
    start = time.perf_counter()
    json_path = os.path.join(o.out, RESULTS_JSON)

    def sweep(name: str, description: str, points: list[SweepPoint], evaluate) -> None:
        entry = {"description": description, "rows": []}
        results["sweeps"][name] = entry

        def on_row(row: Row) -> None:
            entry["rows"].append(row.as_dict())
            results["seconds"] = time.perf_counter() - start
            write_json(json_path, results)

        run_sweep(name, points, [BASELINES[b] for b in o.sweep_baselines[name]], evaluate,
                  on_row, progress=o.progress)

    def measure(name: str):
        return lambda baseline, point: runner.measure(baseline, point, f"the {name} sweep, "
                                                                        f"{point.label}")

    os.makedirs(o.out, exist_ok=True)
    running = dict.fromkeys(b for names in o.sweep_baselines.values() for b in names)
    log(f"gsr bench: {', '.join(o.sweeps)} sweep(s) of {', '.join(running)} on {o.device}; "
        f"results in {o.out}/")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        if "depth" in o.sweeps:
            w = workloads[o.circuit]
            sweep("depth", f"{w.describe()}; width {o.width}, {_architecture(o, o.width)}",
                  [SweepPoint(f"depth {d}", {"depth": d}, o.spec(d), w) for d in o.depths],
                  measure("depth"))
        if "width" in o.sweeps:
            w = workloads[o.circuit]
            sweep("width", f"{w.describe()}; depth {o.width_depth}, "
                           f"{_architecture(o, min(o.widths))} (at the smallest width)",
                  [SweepPoint(f"width {n}", {"width": n}, o.spec(o.width_depth, n), w)
                   for n in o.widths], measure("width"))
        if "size" in o.sweeps:
            ordered = sorted(o.circuits, key=lambda c: workloads[c].num_nodes)
            cone = (f"; circuits over {o.cone_nodes:,} nodes are measured on one fan-in cone "
                    "sample of that size") if o.cone_nodes else "; full graphs"
            sweep("size", f"depth {o.size_depth}, width {o.width}, "
                          f"{_architecture(o, o.width)}{cone}",
                  [SweepPoint(c, {"circuit": c}, o.spec(o.size_depth), workloads[c])
                   for c in ordered], measure("size"))
        if "quality" in o.sweeps:
            scoring = ("full graphs" if o.eval_max_nodes is None else
                       f"full graphs up to {o.eval_max_nodes:,} nodes, cone samples beyond")
            job = dict(train=list(o.train), test=list(o.test), label=o.label,
                       steps=o.quality_steps, batch_nodes=o.batch_nodes, lr=o.lr,
                       eval_max_nodes=o.eval_max_nodes, cache_dir=o.cache_dir)
            sweep("quality",
                  f"label `{o.label}`; {o.quality_steps} steps of Adam (lr {o.lr:g}, gradient "
                  f"clipping 1) on cone-sampled batches of up to {o.batch_nodes:,} nodes from "
                  f"{len(o.train)} training circuit(s); test Pearson and Kendall averaged over "
                  f"{', '.join(o.test)} ({scoring}); width {o.width}, "
                  f"{_architecture(o, o.width)}; every baseline sees the same batches",
                  [SweepPoint(f"depth {d}", {"depth": d}, o.spec(d)) for d in o.quality_depths],
                  lambda baseline, point: runner.train(baseline, point, **job))
        if "budget" in o.sweeps:
            _budget_sweep(o, threads, budget, sweep, log)
        results["complete"] = True
    except KeyboardInterrupt:
        results["stopped_because"] = "interrupted"
        raise
    except Terminated:
        results["stopped_because"] = "terminated (SIGTERM)"
        raise
    except BaseException as e:
        results["stopped_because"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
        results["seconds"] = time.perf_counter() - start
        paths = write_results(o.out, results)
        log("wrote " + ", ".join(paths))
    return results


def _budget_sweep(o: BenchOptions, threads: int, budget: Budget, sweep, log) -> None:
    """The budget sweep (:mod:`.budget_sweep`): one point, every baseline at the same budget."""
    from .budget_sweep import BudgetSettings, BudgetSweep

    step_budget = int(o.step_budget_gib * 2 ** 30)
    settings = BudgetSettings(
        budget_bytes=step_budget, train=list(o.budget_train), test=list(o.budget_test),
        label=o.label, train_seconds=o.train_seconds, evals=o.budget_evals, lr=o.lr,
        eval_max_nodes=o.eval_max_nodes, device=o.device, threads=threads, seed=o.seed,
        cache_dir=o.cache_dir, time_limit=budget.seconds, process_memory=budget.memory_bytes)
    runner = BudgetSweep(settings, log=log)
    scoring = ("full graphs" if o.eval_max_nodes is None else
               f"full graphs up to {o.eval_max_nodes:,} nodes, cone samples beyond")
    sweep("budget",
          f"memory budget {format_bytes(step_budget)} per training step (what is resident "
          "before it plus its measured RSS rise, mmap threshold fixed); depth "
          f"{o.budget_depth}, width {o.width}, {_architecture(o, o.width)}; training circuits "
          f"{', '.join(o.budget_train)}; label `{o.label}`; {o.train_seconds:g} s of training "
          f"per baseline (Adam, lr {o.lr:g}, clipping 1), test Kendall averaged over "
          f"{', '.join(o.budget_test)} ({scoring}) at {o.budget_evals} points of that clock",
          [SweepPoint(f"budget {format_bytes(step_budget)}", {"budget_bytes": step_budget},
                      o.spec(o.budget_depth))],
          lambda baseline, point: runner.evaluate(baseline, point.spec))
