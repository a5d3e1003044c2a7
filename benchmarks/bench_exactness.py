"""Exactness at depth: gradients of compiled models against storing everything, what the guard
keeps, and what it costs in step time.

Parts (``--parts``, comma-separated; all by default):

* ``depth``: float32, a 2,000-node random graph (8,000 edges), width 32, pre-norm SAGE
  ``ResidualGNN`` at 128, 512 and 1000 blocks, dense ReLU and ``sparse_k`` = g/2 and g/8 (g = 16);
  and ``h = h + GINConv(MLP)(h)`` without a norm at 24 and 64 blocks (3,400 edges). Each with the
  guard (default options) and without (``replay_margin=None, anchors=None``): relative error of the
  first block's parameter gradients and of the input gradient against
  ``gsr_compiler.reference.store_everything`` (same weights, same dropout seeds).
* ``memory``: one training step of a 256-block, 128-wide SAGE ``ResidualGNN`` on b18_Cg with
  default options (dense) and ``sparse_k`` = g/2: the bytes the guard keeps (replay records,
  anchors, probe rows) against what the chain keeps without it (its output and side inputs).
* ``time``: step time with and without the guard at 256 blocks (width 64, a circuit of ~15k
  nodes), alternating, median of ``--steps`` steps each, in one process.
* ``autocast``: the chain input's rebuild error, measured by the chain, in float32 and under CPU
  bfloat16 autocast, at the ``--depths`` of ``depth``.

Parts run into a folder that holds an earlier ``results.json`` replace only their own section.

    python benchmarks/bench_exactness.py --out docs/bench/exactness
    python benchmarks/bench_exactness.py --parts depth --depths 128 --out /tmp/exactness
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
import warnings

import torch

from gsr_compiler import gsr_compile
from gsr_compiler.errors import GSRPrecisionWarning
from gsr_compiler.models import ResidualGNN, UnnormalizedGIN
from gsr_compiler.reference import store_everything
from gsr_compiler.report import format_bytes
from gsr_compiler.runtime.reversible import ReversibleChain

UNGUARDED = {"replay_margin": None, "anchors": None}


def random_graph(n: int, edges: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 8, generator=g), torch.randint(0, n, (2, edges), generator=g),
            torch.randn(n, 1, generator=g))


def chain_of(module):
    return next(m for m in module.modules() if isinstance(m, ReversibleChain))


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def gradient_errors(model, x, edge_index, target, **options) -> dict:
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GSRPrecisionWarning)  # reported below instead
        gsr = gsr_compile(model, example_inputs=(x, edge_index), **options)
        ref = store_everything(gsr.graph_module)
        grads, seconds = [], []
        for module in (gsr.graph_module, ref):
            torch.manual_seed(5)
            leaf = x.clone().requires_grad_()
            module.zero_grad(set_to_none=True)
            start = time.perf_counter()
            ((module(leaf, edge_index) - target) ** 2).mean().backward()
            seconds.append(time.perf_counter() - start)
            grads.append((leaf.grad, {n: p.grad for n, p in module.named_parameters()}))
    (gx, gp), (rx, rp) = grads
    first = [n for n in rp if ".blocks.0." in n]
    first_error = float(torch.cat([(gp[n] - rp[n]).flatten() for n in first]).norm()
                        / torch.cat([rp[n].flatten() for n in first]).norm())
    row = {"first_block": first_error, "input": _relative(gx, rx),
           "worst_parameter": max(_relative(gp[n], rp[n]) for n in rp if rp[n].norm() > 0),
           "step_seconds": seconds[0], "reference_seconds": seconds[1]}
    precision = chain_of(gsr).last_precision
    if precision is not None:
        row.update(anchors=len(precision.anchors), anchor_bytes=precision.anchor_bytes,
                   replay_bytes=precision.replay.nbytes if precision.replay else 0,
                   flips_prevented=precision.replay.forced if precision.replay else 0,
                   unsafe=precision.replay.unsafe if precision.replay else 0,
                   rebuild_error=precision.worst_error)
    return row


def part_depth(args) -> list[dict]:
    rows = []
    x, edge_index, target = random_graph(2000, 8000)
    for depth in args.depths:
        for label, k in (("dense", None), ("k=g/2", 8), ("k=g/8", 2)):
            torch.manual_seed(0)
            model = ResidualGNN(8, 32, 1, depth, conv="sage", dropout=0.1)
            for guard, options in (("on", {}), ("off", UNGUARDED)):
                row = {"model": "pre-norm SAGE", "depth": depth, "config": label, "guard": guard,
                       **gradient_errors(model, x, edge_index, target, sparse_k=k, **options)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    x, edge_index, target = random_graph(2000, 3400)
    for depth in (24, 64):
        torch.manual_seed(0)
        model = UnnormalizedGIN(8, 32, 1, depth)
        for guard, options in (("on", {}), ("off", UNGUARDED)):
            row = {"model": "GIN, no norm", "depth": depth, "config": "dense", "guard": guard,
                   **gradient_errors(model, x, edge_index, target, **options)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def part_autocast(args) -> list[dict]:
    """The rebuilt chain input's error in float32 and under CPU bfloat16 autocast (no reference
    needed: the chain measures it on its kept probe rows)."""
    rows = []
    x, edge_index, target = random_graph(2000, 8000)
    for depth in args.depths:
        for label, k in (("dense", None), ("k=g/2", 8)):
            for precision in ("float32", "bfloat16 autocast"):
                torch.manual_seed(0)
                model = ResidualGNN(8, 32, 1, depth, conv="sage", dropout=0.1)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", GSRPrecisionWarning)
                    gsr = gsr_compile(model, example_inputs=(x, edge_index), sparse_k=k)
                    with torch.autocast("cpu", dtype=torch.bfloat16,
                                        enabled=precision != "float32"):
                        out = gsr(x, edge_index)
                    ((out.float() - target) ** 2).mean().backward()
                p = chain_of(gsr).last_precision
                row = {"depth": depth, "config": label, "precision": precision,
                       "rebuild_error": p.errors.get(0), "predicted": p.predicted.get(0),
                       "anchors": len(p.anchors), "unsafe": p.replay.unsafe}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def _circuit(name: str):
    from gsr_compiler.circuits import load_circuit

    data = load_circuit(name)
    level = data.level.float()
    return data.x.float(), data.edge_index, (level / level.max()).unsqueeze(1)


def part_memory(args) -> list[dict]:
    rows = []
    x, edge_index, target = _circuit(args.circuit)
    for label, k in (("dense (default)", None), ("k=g/2", 32)):
        torch.manual_seed(0)
        model = ResidualGNN(x.shape[1], 128, 1, args.memory_depth, conv="sage", dropout=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GSRPrecisionWarning)
            gsr = gsr_compile(model, example_inputs=(x, edge_index), sparse_k=k)
            start = time.perf_counter()
            ((gsr(x, edge_index) - target) ** 2).mean().backward()
            seconds = time.perf_counter() - start
        chain = chain_of(gsr)
        p = chain.last_precision
        kept_today = x.shape[0] * 128 * 4 + edge_index.numel() * edge_index.element_size()
        probe = min(x.shape[0], 64) * (128 * 4 + 8)
        row = {"circuit": args.circuit, "nodes": x.shape[0], "depth": args.memory_depth,
               "config": label, "chain_kept_without_guard": kept_today,
               "replay_bytes": p.replay.nbytes, "anchor_bytes": p.anchor_bytes,
               "anchors": p.anchors, "probe_bytes": probe,
               "guard_share": (p.replay.nbytes + p.anchor_bytes + probe) / kept_today,
               "replay_share": p.replay.nbytes / kept_today,
               "choices": p.replay.choices, "recorded": p.replay.recorded,
               "flips_prevented": p.replay.forced, "unsafe": p.replay.unsafe,
               "rebuild_errors": {str(b): e for b, e in p.errors.items()},
               "warnings": [str(w.message) for w in caught], "step_seconds": seconds}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def part_time(args) -> list[dict]:
    x, edge_index, target = _circuit(args.time_circuit)
    torch.manual_seed(0)
    model = ResidualGNN(x.shape[1], 64, 1, args.time_depth, conv="sage", dropout=0.1)
    models = {}
    for guard, options in (("on", {}), ("off", UNGUARDED)):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GSRPrecisionWarning)
            models[guard] = gsr_compile(model, example_inputs=(x, edge_index), **options)
    times = {"on": [], "off": []}
    for step in range(args.steps + 1):  # the first round warms both up
        for guard in ("on", "off") if step % 2 else ("off", "on"):
            m = models[guard]
            m.zero_grad(set_to_none=True)
            start = time.perf_counter()
            ((m(x, edge_index) - target) ** 2).mean().backward()
            if step:
                times[guard].append(time.perf_counter() - start)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    row = {"circuit": args.time_circuit, "nodes": x.shape[0], "depth": args.time_depth,
           "width": 64, "steps": args.steps, "guard_on_s": on, "guard_off_s": off,
           "ratio": on / off, "all_on": times["on"], "all_off": times["off"]}
    print(json.dumps(row), flush=True)
    return [row]


def _machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": commit}


def _ran(results: dict, part: str) -> str:
    m = results.get(f"machine_{part}") or results.get("machine", {})
    return (f"`python benchmarks/bench_exactness.py --parts {part}` at commit {m.get('commit')}, "
            f"on {m.get('cores')} CPU cores ({m.get('cpu')}), torch {m.get('torch')}, "
            f"{m.get('threads')} torch thread(s).\n")


def _markdown(results: dict) -> str:
    lines = ["# Exactness at depth: measured\n"]
    if results.get("depth"):
        lines += ["## Gradients against storing everything (float32)\n", _ran(results, "depth"),
                  "Relative error of the first block's parameter gradients and of the input "
                  "gradient; guard = `replay_margin` 1e-4 and `anchors=\"auto\"` (default) or "
                  "both off.\n",
                  "| model | blocks | config | guard | first block | input | anchors | "
                  "replay bytes | flips prevented | unsafe |",
                  "|---|--:|---|---|--:|--:|--:|--:|--:|--:|"]
        for r in results["depth"]:
            lines.append(
                f"| {r['model']} | {r['depth']} | {r['config']} | {r['guard']} | "
                f"{r['first_block']:.1e} | {r['input']:.1e} | {r.get('anchors', '')} | "
                f"{format_bytes(r['replay_bytes']) if 'replay_bytes' in r else ''} | "
                f"{r.get('flips_prevented', '')} | {r.get('unsafe', '')} |")
        lines.append("")
    if results.get("memory"):
        lines += ["## What the guard keeps (one training step)\n", _ran(results, "memory"),
                  "| circuit | blocks | config | chain keeps without guard | replay | anchors | "
                  "probe rows | guard / chain | flips prevented | unsafe |",
                  "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
        for r in results["memory"]:
            lines.append(
                f"| {r['circuit']} ({r['nodes']} nodes) | {r['depth']} | {r['config']} | "
                f"{format_bytes(r['chain_kept_without_guard'])} | {format_bytes(r['replay_bytes'])}"
                f" | {len(r['anchors'])}: {format_bytes(r['anchor_bytes'])} | "
                f"{format_bytes(r['probe_bytes'])} | {100 * r['guard_share']:.1f}% | "
                f"{r['flips_prevented']} | {r['unsafe']} |")
        lines.append("")
    if results.get("time"):
        r = results["time"][0]
        lines += ["## Step time of the guard\n", _ran(results, "time"),
                  f"{r['circuit']} ({r['nodes']} nodes), {r['depth']} blocks, width {r['width']}, "
                  f"median of {r['steps']} alternating steps each: guard on {r['guard_on_s']:.2f} s,"
                  f" off {r['guard_off_s']:.2f} s, ratio **{r['ratio']:.3f}**.\n"]
    if results.get("autocast"):
        lines += ["## Rebuilt chain input, float32 and bfloat16 autocast\n",
                  _ran(results, "autocast"),
                  "`rms(rebuilt - exact) / rms(exact)` of the chain input at the end of the "
                  "backward (64 probe rows), default options.\n",
                  "| blocks | config | precision | rebuilt input error | predicted | anchors | "
                  "unsafe |", "|--:|---|---|--:|--:|--:|--:|"]
        for r in results["autocast"]:
            lines.append(f"| {r['depth']} | {r['config']} | {r['precision']} | "
                         f"{r['rebuild_error']:.1e} | {r['predicted']:.1e} | {r['anchors']} | "
                         f"{r['unsafe']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="depth,memory,time,autocast")
    parser.add_argument("--depths", default="128,512,1000")
    parser.add_argument("--circuit", default="b18_Cg")
    parser.add_argument("--memory-depth", type=int, default=256)
    parser.add_argument("--time-circuit", default="b22_Cg")
    parser.add_argument("--time-depth", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.depths = [int(d) for d in args.depths.split(",")]
    parts = args.parts.split(",")
    # Parts not run now keep what an earlier run into the same folder measured.
    path = os.path.join(args.out, "results.json")
    results = {}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    for name, run in (("depth", part_depth), ("memory", part_memory), ("time", part_time),
                      ("autocast", part_autocast)):
        if name in parts:
            results[name] = run(args)
            results[f"machine_{name}"] = _machine()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = _markdown(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
