"""Real deep GNNs, as written (the corpus in tests/corpus/), compiled against eager: what
autograd keeps for one training step and the step time, side by side in one run.

    python benchmarks/bench_corpus.py --depth 64 --out docs/bench/corpus

For every corpus model at ``--depth`` blocks and ``--width`` channels on its own random inputs
(the corpus's small graphs): saved bytes of one step (``saved_bytes_of_step``: each storage
once, parameters excluded) of the model as written and of ``gsr_compile(model)``, their ratio,
the coupling of each chain, and the median step time (forward, backward, SGD) of
``--steps`` steps after a warm-up, eager and compiled interleaved. ``--scale`` makes every graph
that many times larger (200 nodes and 800 edges, or 8 molecules, at 1): small graphs time the
per-call overhead of Python and autograd more than the arithmetic.
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
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gsr_compiler import GSRConfig, gsr_compile  # noqa: E402
from gsr_compiler.memory import saved_bytes_of_step  # noqa: E402
from tests.corpus.corpus import CORPUS, build, scalar_loss  # noqa: E402
from tests.corpus.graphs import graph_scale  # noqa: E402


def step_time(model, inputs) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    began = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    scalar_loss(model(*inputs)).backward()
    optimizer.step()
    return time.perf_counter() - began


def measure(name: str, depth: int, width: int, steps: int, coupling: str = "auto") -> dict:
    model, inputs = build(name, depth=depth, width=width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsr = gsr_compile(model, GSRConfig(coupling=coupling), example_inputs=inputs)
        eager_saved = saved_bytes_of_step(model, inputs, loss_fn=lambda out, _: scalar_loss(out))
        gsr_saved = saved_bytes_of_step(gsr, inputs, loss_fn=lambda out, _: scalar_loss(out))
        times = {"eager": [], "gsr": []}
        for m in (model, gsr):
            step_time(m, inputs)  # warm-up
        for _ in range(steps):
            times["eager"].append(step_time(model, inputs))
            times["gsr"].append(step_time(gsr, inputs))
    chains = gsr.report.chains
    eager_ms = statistics.median(times["eager"]) * 1e3
    gsr_ms = statistics.median(times["gsr"]) * 1e3
    return {"model": name, "chains": len(chains),
            "blocks": sum(c.depth for c in chains),
            "couplings": sorted({c.coupling for c in chains}),
            "eager_saved": eager_saved, "gsr_saved": gsr_saved,
            "saved_ratio": gsr_saved / eager_saved if eager_saved else None,
            "eager_ms": eager_ms, "gsr_ms": gsr_ms, "time_ratio": gsr_ms / eager_ms}


def markdown(rows: list[dict], args, meta: dict) -> str:
    lines = [f"# The corpus at {args.depth} blocks, width {args.width}, graphs x{args.scale}, "
             f"coupling {args.coupling}", "",
             f"`python benchmarks/bench_corpus.py --depth {args.depth} --width {args.width} "
             f"--steps {args.steps} --scale {args.scale} --coupling {args.coupling}` at commit {meta['commit']}, on {meta['machine']}, torch "
             f"{meta['torch']}, {meta['threads']} torch thread(s).", "",
             "| model | chains (blocks) | coupling | saved, eager | saved, compiled | ratio | "
             "step, eager | step, compiled | ratio |", "|---|--:|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} | | | | | | | |")
            continue
        ratio = "-" if r["saved_ratio"] is None else f"{r['saved_ratio']:.3f}"
        lines.append(
            f"| {r['model']} | {r['chains']} ({r['blocks']}) | {', '.join(r['couplings']) or '-'} "
            f"| {r['eager_saved'] / 2**20:.2f} MiB | {r['gsr_saved'] / 2**20:.2f} MiB | {ratio} "
            f"| {r['eager_ms']:.0f} ms | {r['gsr_ms']:.0f} ms | {r['time_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=64)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--scale", type=int, default=1,
                    help="graphs this many times larger than the tests' (200 nodes, or 8 "
                         "molecules, at 1)")
    ap.add_argument("--models", default=",".join(CORPUS))
    ap.add_argument("--coupling", default="auto", choices=["auto", "grouped", "two-stream"],
                    help="GSRConfig.coupling of every compiled model")
    ap.add_argument("--out", default=None, help="folder for results.json and results.md")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        try:
            with graph_scale(args.scale):
                rows.append(measure(name, args.depth, args.width, args.steps, args.coupling))
        except Exception as e:  # recorded: the table says which model failed and why
            rows.append({"model": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                     capture_output=True, text=True).stdout.strip(),
            "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    text = markdown(rows, args, meta)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
