"""Everything that needs a CUDA GPU, prepared to run in one call inside a short GPU window.

    python benchmarks/gpu_check.py --out $OUT              # on the GPU machine (about 8 minutes)
    python benchmarks/gpu_check.py --out /tmp/x --dry-run  # anywhere: every step at tiny size, on
                                                           # the CPU (kernels interpreted), no figures

Steps, each recorded with its outcome and time (one that fails is recorded and the next runs):

1. ``env``: device, driver, compute capability, torch / triton / torch_geometric versions.
2. ``tests``: the CUDA tests (compiled Triton kernels, not the interpreter) in a subprocess
   without ``TRITON_INTERPRET``: pass / fail / skip per test (``tests.xml``).
3. ``exactness``: a compiled 256-block sparse SAGE model (the fused LayerNorm + top-k + dropout
   kernel, the aggregation and coupling kernels) and a dense one, against the same architecture
   storing everything, on the GPU: first-block and input gradient errors, what the guard kept.
4. ``kernels``: ``benchmarks/bench_kernels.py``: each Triton kernel against its torch reference
   and the measured device-to-device copy bandwidth, at b19_Cg's size.
5. ``steps``: one training step of plain, GroupAddRev by hand, gsr-rev and gsr-full at 64 and
   256 blocks, width 128, on b19_Cg (the largest bundled circuit): ``max_memory_allocated``,
   ``max_memory_reserved``, their ratio, and the median step time over CUDA events.

Writes ``results.json`` and ``results.md`` under ``--out`` and prints the summary table last.
``--budget-s`` bounds the whole run: the training steps stop being started once it is near.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
import xml.etree.ElementTree as ElementTree
from typing import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]  # the checkout's package and benchmarks, installed or not
CUDA_TESTS = ["tests/runtime/test_kernel_backend_cuda.py", "tests/runtime/test_kernel_compile.py"]
STEP_MODELS = ["plain", "groupaddrev", "gsr-rev", "gsr-full"]
TOLERANCE = 1e-3  # gradient error against storing everything (GSRConfig.drift_tolerance)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for results.json, results.md, logs")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny sizes, kernels in Triton's interpreter: checks the script")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="stop starting training steps after this many seconds")
    ap.add_argument("--circuit", default="b19_Cg")
    ap.add_argument("--depths", default="64,256")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model")
    return ap.parse_args(argv)


class Check:
    """Runs the steps, keeping each one's outcome, time and figures."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.perf_counter()
        self.results: dict = {"dry_run": args.dry_run, "steps": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def step(self, name: str, fn: Callable[[], dict]) -> None:
        began = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            figures, status = fn(), "ok"
        except Exception as e:  # recorded, and the next step runs
            figures, status = {"error": f"{type(e).__name__}: {e}",
                               "traceback": traceback.format_exc()[-4000:]}, "failed"
            print(figures["traceback"], flush=True)
        self.results["steps"][name] = {"status": status, "seconds": time.perf_counter() - began,
                                       **figures}


# -- 1. environment ------------------------------------------------------------------------

def environment(args) -> dict:
    import torch_geometric

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch_geometric": torch_geometric.__version__, "machine": platform.platform()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                            capture_output=True, text=True).stdout.strip()
    except OSError:
        info["git_commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count,
                    memory_gib=props.total_memory / 2 ** 30)
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["device"] = "CPU (dry run)" if args.dry_run else "no CUDA device"
    return info


# -- 2. the CUDA tests ---------------------------------------------------------------------

def cuda_tests(args) -> dict:
    report = os.path.join(args.out, "tests.xml")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_INTERPRET"] = "1" if args.dry_run else "0"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}", *CUDA_TESTS]
    if args.dry_run:  # collect them only: they need a GPU to run
        command.insert(4, "--collect-only")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    with open(os.path.join(args.out, "tests.log"), "w") as f:
        f.write(done.stdout + done.stderr)
    outcomes = {}
    if args.dry_run:  # junit has no cases for a collection: read pytest's list
        outcomes = {line.strip(): "collected" for line in done.stdout.splitlines()
                    if "::" in line and not line.startswith(" ")}
    elif os.path.exists(report):
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            kinds = {child.tag for child in case}
            outcomes[name] = ("failed" if kinds & {"failure", "error"} else
                              "skipped" if "skipped" in kinds else "passed")
    counts = {k: sum(1 for v in outcomes.values() if v == k)
              for k in ("passed", "failed", "skipped", "collected")}
    if done.returncode not in (0, 1) or not outcomes:
        raise RuntimeError(f"pytest exited with {done.returncode} and ran no test (tests.log)")
    return {"returncode": done.returncode, "counts": counts, "tests": outcomes,
            "collected_only": args.dry_run}


# -- 3. exactness on the device ------------------------------------------------------------

def exactness(args) -> dict:
    from gsr_compiler import gsr_compile
    from gsr_compiler.errors import GSRPrecisionWarning
    from gsr_compiler.models import ResidualGNN
    from gsr_compiler.reference import store_everything
    from gsr_compiler.runtime.reversible import ReversibleChain

    device = torch.device("cpu" if args.dry_run else "cuda")
    n, depth = (64, 4) if args.dry_run else (20_000, 256)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g).to(device)
    edge_index = torch.randint(0, n, (2, 4 * n), generator=g).to(device)
    target = torch.randn(n, 1, generator=g).to(device)
    rows = {}
    for label, k in (("dense", None), ("k=g/2", 16)):
        torch.manual_seed(0)
        model = ResidualGNN(8, 64, 1, depth, conv="sage", dropout=0.1).to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GSRPrecisionWarning)  # measured below instead
            gsr = gsr_compile(model, example_inputs=(x, edge_index), sparse_k=k)
            reference = store_everything(gsr.graph_module)
            grads = []
            for module in (gsr.graph_module, reference):
                torch.manual_seed(5)
                leaf = x.clone().requires_grad_()
                ((module(leaf, edge_index) - target) ** 2).mean().backward()
                grads.append((leaf.grad, {n_: p.grad for n_, p in module.named_parameters()}))
        (gx, gp), (rx, rp) = grads
        first = [n_ for n_ in rp if ".blocks.0." in n_]
        first_error = float(torch.cat([(gp[n_] - rp[n_]).flatten() for n_ in first]).norm()
                            / torch.cat([rp[n_].flatten() for n_ in first]).norm())
        chain = next(m for m in gsr.modules() if isinstance(m, ReversibleChain))
        input_error = float((gx - rx).norm() / rx.norm())
        rows[label] = {"first_block": first_error, "input": input_error,
                       "within_tolerance": max(first_error, input_error) <= TOLERANCE,
                       "precision": chain.last_precision.summary(),
                       "backend": gsr.report.backend.runs}
        del gsr, reference, grads
    return {"nodes": n, "depth": depth, "width": 64, "results": rows}


# -- 4. kernels ----------------------------------------------------------------------------

def kernels(args) -> dict:
    import bench_kernels

    path = os.path.join(args.out, "kernels.json")
    argv = ["--json", path] + (["--dry-run"] if args.dry_run else [])
    code = bench_kernels.main(argv)
    if code:
        raise RuntimeError(f"bench_kernels exited with {code}")
    with open(path) as f:
        return json.load(f)


# -- 5. training steps ---------------------------------------------------------------------

def _workload(args):
    from gsr_compiler.bench.workloads import circuit_workload, random_workload

    if args.dry_run:
        return random_workload(64, 128)
    return circuit_workload(args.circuit)


def _step_figures(model, inputs, target, steps: int, device: torch.device) -> dict:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        ((model(*inputs) - target) ** 2).mean().backward()
        optimizer.step()

    one_step()  # warm-up: Triton compiles, torch.compile traces, the arena is planned
    if device.type != "cuda":
        began = time.perf_counter()
        one_step()
        return {"step_ms": (time.perf_counter() - began) * 1e3}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        one_step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    return {"step_ms": statistics.median(times), "all_ms": times,
            "max_allocated": allocated, "max_reserved": reserved,
            "reserved_over_allocated": reserved / allocated if allocated else None}


def training_steps(args, check: Check) -> dict:
    from gsr_compiler.bench.baselines import BASELINES, ModelSpec

    device = torch.device("cpu" if args.dry_run else "cuda")
    work = _workload(args)
    inputs = tuple(t.to(device) for t in work.inputs)
    target = work.target.to(device)
    width = 16 if args.dry_run else args.width
    depths = [2, 4] if args.dry_run else [int(d) for d in args.depths.split(",")]
    rows = []
    for depth in depths:
        spec = ModelSpec(in_channels=inputs[0].shape[1], width=width, depth=depth,
                         sparse_k=width // 4)  # k = g/2, as gsr demo and gsr train --gsr
        for name in STEP_MODELS:
            row = {"model": name, "depth": depth}
            if check.elapsed() > args.budget_s:
                row["status"] = "not run: time budget"
                rows.append(row)
                continue
            began = time.perf_counter()
            try:
                torch.manual_seed(0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = BASELINES[name].build(spec, inputs).to(device)
                    row.update(_step_figures(model, inputs, target, args.steps, device))
                row["status"] = "ok"
            except torch.cuda.OutOfMemoryError:
                row["status"] = "out of memory"
            except Exception as e:
                row["status"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
            row["seconds"] = time.perf_counter() - began
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps({k: v for k, v in row.items() if k != "all_ms"}), flush=True)
            rows.append(row)
    return {"workload": work.describe(), "width": width, "rows": rows}


# -- output --------------------------------------------------------------------------------

def _gib(n) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.2f} GiB"


def markdown(results: dict) -> str:
    steps = results["steps"]
    env = steps.get("env", {})
    lines = ["# GPU check", "",
             f"Device: {env.get('device')} (capability {env.get('capability')}, driver "
             f"{env.get('driver')}); torch {env.get('torch')}, triton {env.get('triton')}, "
             f"torch_geometric {env.get('torch_geometric')}, Python {env.get('python')}; "
             f"commit {env.get('git_commit')}." + (" DRY RUN: no figures." if results["dry_run"]
                                                   else ""), "",
             "| step | status | seconds |", "|---|---|--:|"]
    for name, step in steps.items():
        lines.append(f"| {name} | {step['status']} | {step['seconds']:.1f} |")
    tests = steps.get("tests", {})
    if tests.get("counts"):
        c = tests["counts"]
        lines += ["", f"CUDA tests: {c['collected']} collected, not run (dry run)"
                  if tests.get("collected_only") else
                  f"CUDA tests: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"]
        lines += [f"- failed: {t}" for t, v in tests["tests"].items() if v == "failed"]
    ex = steps.get("exactness", {})
    if ex.get("results"):
        lines += ["", f"Exactness on the device ({ex['depth']} blocks, {ex['nodes']} nodes, width "
                      f"{ex['width']}), gradient error against storing everything:", "",
                  "| config | kernels | first block | input | what the guard kept |",
                  "|---|---|--:|--:|---|"]
        for label, r in ex["results"].items():
            lines.append(f"| {label} | {r['backend']} | {r['first_block']:.1e} | "
                         f"{r['input']:.1e} | {r['precision']} |")
    kern = steps.get("kernels", {})
    if kern.get("kernels"):
        lines += ["", f"Kernels (copy bandwidth {kern['copy_gbps']:.0f} GB/s):", "",
                  "| kernel | ms | GB/s | of copy | torch ms | speedup |", "|---|--:|--:|--:|--:|--:|"]
        for r in kern["kernels"]:
            lines.append(f"| {r['kernel']} | {r['ms']:.4f} | {r['gbps']:.0f} | "
                         f"{r['of_copy']:.0%} | {r['torch_ms']:.4f} | {r['speedup']:.1f}x |")
    tr = steps.get("training_steps", {})
    if tr.get("rows"):
        lines += ["", f"One training step on {tr['workload']}, width {tr['width']}:", "",
                  "| blocks | model | status | step ms | max allocated | max reserved | "
                  "reserved / allocated |", "|--:|---|---|--:|--:|--:|--:|"]
        for r in tr["rows"]:
            ratio = r.get("reserved_over_allocated")
            lines.append(f"| {r['depth']} | {r['model']} | {r['status']} | "
                         f"{r.get('step_ms', float('nan')):.1f} | {_gib(r.get('max_allocated'))} "
                         f"| {_gib(r.get('max_reserved'))} | "
                         f"{'-' if ratio is None else f'{ratio:.3f}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run to check the script on a CPU.")
        return 2
    os.makedirs(args.out, exist_ok=True)
    check = Check(args)
    check.step("env", lambda: environment(args))
    check.step("tests", lambda: cuda_tests(args))
    check.step("exactness", lambda: exactness(args))
    check.step("kernels", lambda: kernels(args))
    check.step("training_steps", lambda: training_steps(args, check))
    check.results["seconds"] = check.elapsed()
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(check.results, f, indent=1, default=str)
    text = markdown(check.results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    failed = [n for n, s in check.results["steps"].items() if s["status"] != "ok"]
    failed += [t for t, v in check.results["steps"]["tests"].get("tests", {}).items()
               if v == "failed"]
    failed += [f"exactness {label}" for label, row in
               check.results["steps"]["exactness"].get("results", {}).items()
               if not row["within_tolerance"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
