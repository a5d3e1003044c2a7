"""What auto anchors cost a pre-norm SAGE chain at a given drift tolerance: anchors kept (in
[N, D] states), the step time and the float64 gradient check, side by side in one process.

    OMP_NUM_THREADS=1 python benchmarks/anchor_cost.py --depth 256 --drift-tolerance 1e-3,1e-5
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gsr_compiler import gsr_compile  # noqa: E402
from gsr_compiler.models import ResidualGNN  # noqa: E402
from gsr_compiler.runtime.reversible import ReversibleChain  # noqa: E402
from gsr_compiler.synthetic import random_graph  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=256)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--sparse-k", type=int, default=None)
    ap.add_argument("--drift-tolerance", default="1e-3,1e-5")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    x, edge_index, y = random_graph(2000, 8000, in_channels=16, seed=0)
    for tolerance in (float(v) for v in args.drift_tolerance.split(",")):
        torch.manual_seed(0)
        model = ResidualGNN(16, args.width, 1, args.depth, conv="sage", dropout=0.0)
        gsr = gsr_compile(model, example_inputs=(x, edge_index), drift_tolerance=tolerance,
                          sparse_k=args.sparse_k)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            ((gsr(x, edge_index) - y.view(-1, 1)) ** 2).mean().backward()
            times.append(time.perf_counter() - start)
        chain = next(m for m in gsr.modules() if isinstance(m, ReversibleChain))
        p = chain.last_precision
        state = x.shape[0] * args.width * 4
        check = gsr.verify_gradients((x, edge_index), against="float64")
        print(f"depth {args.depth} drift_tolerance {tolerance:g}: {len(p.anchors)} anchors "
              f"({p.anchor_bytes / state:.1f} states), step {times[-1]:.2f} s, rebuild error "
              f"{p.worst_error:.1e}, float64 check {'OK' if check.ok else 'FAILED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
