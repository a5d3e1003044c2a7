"""Dropout mask draws on CPU: torch's ``F.dropout`` against ``BranchDropout``'s draw.

Each reversible branch draws its dropout mask twice per training step (forward and backward
recompute), so a 64-block, 2-group model draws 256 masks of N x D/2 per step. The two are timed
side by side, interleaved, on a tensor of that shape (default: b18_Cg's 64,554 nodes, 64
channels), forward alone and forward plus backward:

    python benchmarks/bench_dropout.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gsr_compiler.runtime.dropout import branch_dropout


def seconds(fn, x: torch.Tensor, grad: torch.Tensor | None) -> float:
    start = time.perf_counter()
    out = fn(x)
    if grad is not None:
        out.backward(grad)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=64554)
    p.add_argument("--cols", type=int, default=64)
    p.add_argument("--p", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    print(f"{args.rows} x {args.cols}, p = {args.p}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}, interleaved")
    ways = {"F.dropout": lambda t: F.dropout(t, args.p, True),
            "BranchDropout": lambda t: branch_dropout(t, args.p)}
    for backward in (False, True):
        x = torch.randn(args.rows, args.cols, requires_grad=backward)
        grad = torch.randn(args.rows, args.cols) if backward else None
        times = {name: [] for name in ways}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, fn in ways.items():
                times[name].append(seconds(fn, x, grad))
        median = {name: statistics.median(t[1:]) for name, t in times.items()}
        what = "forward + backward" if backward else "forward"
        print(f"{what}: " + ", ".join(f"{name} {1e3 * m:.1f} ms" for name, m in median.items())
              + f"; BranchDropout / F.dropout {median['BranchDropout'] / median['F.dropout']:.2f}")


if __name__ == "__main__":
    main()
