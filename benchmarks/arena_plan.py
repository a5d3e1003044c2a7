"""Planned arena against the live-bytes lower bound, for compiled ResidualGNN models.

Compiles each model with a small example graph (tracing does not depend on the size), then
evaluates the plan of one training step (and of one forward) at the requested node and edge
counts without running it. Prints, per model: live intervals, planned bytes, lower bound (peak
of live bytes), gap, and the coupling scratch the runtime keeps in the arena.

    python benchmarks/arena_plan.py                               # the core issue's models
    python benchmarks/arena_plan.py --depths 64 256 --convs sage gat --groups 2 4
    python benchmarks/arena_plan.py --json plan.json
    python benchmarks/arena_plan.py --measure --nodes 3001 --edges 12007 --width 64 --depths 6

``--measure`` also runs one training step on CPU (after two warm-up steps) with and without
``plan_memory`` and reports the peak of the bytes PyTorch's CPU allocator handed out during it
(profiler memory events), plus the arena allocated before it: a check of the liveness model
against what the step really allocates. Use small sizes: it runs the model.

Defaults: 128 channels, N=64554 and E=110452 (the graph of the core issue's measurements).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from gsr_compiler import gsr_compile
from gsr_compiler.models import ResidualGNN
from gsr_compiler.passes.layer_internals import allocation_peak


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=64_554)
    ap.add_argument("--edges", type=int, default=110_452)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depths", type=int, nargs="+", default=[64])
    ap.add_argument("--convs", nargs="+", default=["sage", "gcn", "gat", "gin"])
    ap.add_argument("--groups", type=int, nargs="+", default=[2])
    ap.add_argument("--sparse-k", type=int, default=None, help="also plan with sparse_k=K")
    ap.add_argument("--json", type=str, default=None, help="write the rows to this file")
    ap.add_argument("--measure", action="store_true",
                    help="also run one CPU training step and measure its allocation peak")
    return ap.parse_args(argv)


def measured_peak(conv: str, depth: int, groups: int, width: int, nodes: int, edges: int,
                  sparse_k: int | None, plan_memory: bool) -> tuple[int, int]:
    """(peak bytes allocated during one training step, arena bytes allocated before it)."""
    torch.manual_seed(0)
    model = ResidualGNN(16, width, 1, depth=depth, conv=conv)
    x, edge_index = torch.randn(nodes, 16), torch.randint(0, nodes, (2, edges))
    gsr = gsr_compile(model, example_inputs=(x, edge_index), groups=groups, sparse_k=sparse_k,
                      plan_memory=plan_memory)
    for _ in range(2):  # the arena and the gradients exist before the measured step
        gsr(x, edge_index).sum().backward()
    _, peak = allocation_peak(lambda: gsr(x, edge_index).sum().backward())
    arena = gsr.coupling_arena.reserved_bytes if gsr.coupling_arena is not None else 0
    return peak, arena


def plan_rows(conv: str, depth: int, groups: int, width: int, nodes: int, edges: int,
              sparse_k: int | None) -> list[dict]:
    torch.manual_seed(0)
    model = ResidualGNN(16, width, 1, depth=depth, conv=conv)
    example = (torch.randn(997, 16), torch.randint(0, 997, (2, 3001)))  # sizes unlike any width
    rows = []
    for mode in ("train", "eval"):
        model.train(mode == "train")
        start = time.perf_counter()
        gsr = gsr_compile(model, example_inputs=example, groups=groups, sparse_k=sparse_k)
        compile_s = time.perf_counter() - start
        plan = gsr.memory_plan(nodes, edges)
        placed = gsr.liveness.plan_placed(nodes)
        rows.append({
            "conv": conv, "depth": depth, "groups": groups, "width": width, "sparse_k": sparse_k,
            "step": "training step" if mode == "train" else "forward", "nodes": nodes,
            "edges": edges, "intervals": len(plan), "planned_bytes": plan.total_bytes,
            "lower_bound": plan.lower_bound, "gap_percent": round(plan.gap_percent, 3),
            "without_reuse_bytes": plan.unplanned_bytes, "ordering": plan.ordering,
            "arena_bytes": placed.total_bytes, "arena_lower_bound": placed.lower_bound,
            "compile_seconds": round(compile_s, 2),
        })
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    print(f"N={args.nodes}, E={args.edges}, width {args.width}")
    print(f"{'model':<22} {'step':<14} {'intervals':>9} {'planned MiB':>12} {'bound MiB':>10} "
          f"{'gap':>6} {'arena MiB':>10}")
    for depth in args.depths:
        for conv in args.convs:
            for groups in args.groups:
                for k in [None] + ([args.sparse_k] if args.sparse_k else []):
                    for row in plan_rows(conv, depth, groups, args.width, args.nodes,
                                         args.edges, k):
                        rows.append(row)
                        name = f"{conv} L{depth} G{groups}" + (f" k={k}" if k else "")
                        print(f"{name:<22} {row['step']:<14} {row['intervals']:>9} "
                              f"{row['planned_bytes'] / 2**20:>12.2f} "
                              f"{row['lower_bound'] / 2**20:>10.2f} "
                              f"{row['gap_percent']:>5.2f}% {row['arena_bytes'] / 2**20:>10.2f}")
                    if args.measure:
                        row = rows[-2]  # the training step
                        for on in (False, True):
                            peak, arena = measured_peak(conv, depth, groups, args.width,
                                                        args.nodes, args.edges, k, on)
                            row[f"measured_peak_bytes_plan_memory_{on}"] = peak
                            row[f"arena_bytes_plan_memory_{on}"] = arena
                            print(f"{'':<22} measured, plan_memory={on!s:<5}: step peak "
                                  f"{peak / 2**20:.2f} MiB + arena {arena / 2**20:.2f} MiB = "
                                  f"{(peak + arena) / 2**20:.2f} MiB "
                                  f"({(peak + arena) / row['lower_bound']:.2f}x the bound)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    worst = max(r["gap_percent"] for r in rows)
    print(f"largest gap: {worst:.2f}% (target: 5%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
