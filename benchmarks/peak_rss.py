"""Peak RSS of a GSR training step on a real circuit, as the allocator in use leaves it.

One compiled model per process (run it once per depth), two steps, then the bytes autograd
saved for backward. Compare the default glibc allocator with a fixed mmap threshold:

    python benchmarks/peak_rss.py --depth 64
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/peak_rss.py --depth 64
    for d in 16 64 256; do python benchmarks/peak_rss.py --depth $d; done
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from gsr_compiler import gsr_compile
from gsr_compiler.circuits import load_circuit
from gsr_compiler.memory import saved_bytes_of_step
from gsr_compiler.models import ResidualGNN
from gsr_compiler.report import format_bytes


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--circuit", default="b18_Cg")
    p.add_argument("--depth", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--no-plan-memory", action="store_true")
    args = p.parse_args()
    data = load_circuit(args.circuit)
    x, edge_index = data.x.float(), data.edge_index
    level = data.level.float()
    target = (level / level.max()).unsqueeze(1)
    torch.manual_seed(0)
    model = ResidualGNN(x.shape[1], args.width, 1, args.depth, conv="sage", dropout=0.1)
    gsr = gsr_compile(model, example_inputs=(x, edge_index), plan_memory=not args.no_plan_memory)
    print(f"{args.circuit}, {args.depth} blocks x {args.width}: peak RSS after compiling "
          f"{format_bytes(max_rss())}", flush=True)
    for step in range(2):
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(gsr(x, edge_index), target)
        loss.backward()
        for param in gsr.parameters():
            param.grad = None
        print(f"step {step}: {time.perf_counter() - start:.1f} s, peak RSS {format_bytes(max_rss())}",
              flush=True)
    print(f"saved for backward: {format_bytes(saved_bytes_of_step(gsr, (x, edge_index), target))}")


if __name__ == "__main__":
    main()
