"""Training-step time of gsr-rev, gsr-sparse and gsr-full (``gsr bench``'s baselines) at equal batch.

The three models are built by ``gsr_compiler.bench.baselines`` (ResidualGNN, SAGEConv, width 64,
groups 2, k = g/8 unless ``--k``), trained on one bundled circuit. Steps are interleaved
(rev, sparse, full, rev, ...) so that load from other jobs on a shared machine falls on all three
alike; each row is the median over ``--steps`` steps, and the ratio is to gsr-rev's median.

    python benchmarks/bench_sparse_step.py --depths 64,256 --steps 5
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from gsr_compiler.bench.baselines import BASELINES, ModelSpec
from gsr_compiler.circuits import load_circuit

NAMES = ("gsr-rev", "gsr-sparse", "gsr-full")


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, x, edge_index, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.mse_loss(model(x, edge_index).squeeze(-1), y).backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--circuit", default="b22_Cg")
    ap.add_argument("--depths", default="64,256")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--k", type=int, default=None, help="kept per group (default g/8)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_circuit(args.circuit)
    x, edge_index, y = data.x.float(), data.edge_index, data.level_norm.float()
    print(f"circuit {args.circuit}: {x.shape[0]} nodes, {edge_index.shape[1]} edges; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print("| depth | baseline | step (median) | / gsr-rev | steps |")
    print("| --- | --- | --- | --- | --- |")
    for depth in (int(d) for d in args.depths.split(",")):
        spec = ModelSpec(x.shape[1], args.width, depth, groups=args.groups, sparse_k=args.k)
        models, opts, times = {}, {}, {}
        for name in NAMES:
            torch.manual_seed(0)
            models[name] = BASELINES[name].build(spec, (x, edge_index))
            opts[name] = torch.optim.SGD(models[name].parameters(), lr=1e-4)
            step(models[name], opts[name], x, edge_index, y)  # warm-up: first-use builds
            times[name] = []
        for _ in range(args.steps):
            for name in NAMES:
                start = time.perf_counter()
                step(models[name], opts[name], x, edge_index, y)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["gsr-rev"])
        for name in NAMES:
            med = statistics.median(times[name])
            print(f"| {depth} | `{name}` | {med * 1e3:.0f} ms | {med / base:.3f} | {args.steps} |",
                  flush=True)


if __name__ == "__main__":
    main()
