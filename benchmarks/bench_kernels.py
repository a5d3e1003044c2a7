"""Achieved memory bandwidth of the runtime's Triton kernels against a device-to-device copy.

Each kernel is memory bound, so the figure of merit is bytes moved per second, compared with
what ``torch.Tensor.copy_`` of a large tensor achieves on the same GPU (read + write). Bytes are
the compulsory traffic: every input read once, every output written once (re-reads that a kernel
makes, e.g. the LayerNorm passes over x, count against it). Times are medians of
``triton.testing.do_bench``. The torch reference of each kernel is timed beside it.

    python benchmarks/bench_kernels.py                    # needs CUDA; prints a table
    python benchmarks/bench_kernels.py --json out.json    # also writes the numbers
    python benchmarks/bench_kernels.py --dry-run          # CPU + TRITON_INTERPRET, tiny sizes:
                                                          # checks the script, measures nothing

Default sizes are those of the largest bundled circuit (b19_Cg: about 124k nodes, 212k edges)
at 128 channels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List

import torch


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=124_000)
    ap.add_argument("--edges", type=int, default=212_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--copy-mib", type=int, default=1024, help="size of the copy reference")
    ap.add_argument("--json", type=str, default=None, help="write results to this file")
    ap.add_argument("--dry-run", action="store_true",
                    help="run on CPU under TRITON_INTERPRET=1 at tiny sizes (plumbing check)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        args.nodes, args.edges, args.dim, args.copy_mib = 64, 128, 64, 1
    elif not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (Triton kernels are timed on the device); "
              "nothing to measure on CPU.")
        return 0

    from gsr_compiler.runtime.kernels import HAS_TRITON
    if not HAS_TRITON:
        print("bench_kernels: triton is not importable; install gsr-compiler[triton].")
        return 0

    from gsr_compiler.runtime.kernels import (coupling_update_reference, csr_from_edge_index,
                                              group_topk_reference, sparse_aggregate_reference,
                                              sparse_aggregate_backward_reference)
    from gsr_compiler.runtime.kernels.aggregate import (sparse_aggregate_backward_triton,
                                                        sparse_aggregate_forward_triton)
    from gsr_compiler.runtime.kernels.coupling import coupling_update_triton
    from gsr_compiler.runtime.kernels.topk import (group_topk_backward_triton,
                                                   group_topk_forward_triton)

    device = torch.device("cpu" if args.dry_run else "cuda")
    bench = _timer(args.dry_run)
    gen = torch.Generator(device="cpu").manual_seed(0)
    n, e, d, g, k = args.nodes, args.edges, args.dim, args.group_size, args.k
    groups = d // g
    f32 = 4

    # Reference: device-to-device copy of a large buffer (read + write).
    copy_bytes = args.copy_mib * 2 ** 20
    copy_bw = 2 * copy_bytes / (_copy_ms(bench, copy_bytes, device) * 1e-3)

    rows: List[Dict] = []

    def record(name: str, nbytes: int, fn: Callable, ref: Callable) -> None:
        ms = bench(fn)
        ref_ms = bench(ref)
        bw = nbytes / (ms * 1e-3)
        rows.append(dict(kernel=name, bytes=nbytes, ms=ms, gbps=bw / 1e9,
                         of_copy=bw / copy_bw, torch_ms=ref_ms, speedup=ref_ms / ms))

    x = torch.randn(n, d, generator=gen).to(device)
    f = torch.randn(n, d, generator=gen).to(device)
    y = torch.empty_like(x)
    record("coupling y = x + f", 3 * n * d * f32,
           lambda: coupling_update_triton(y, x, f), lambda: coupling_update_reference(y, x, f))
    record("coupling x -= f (in place)", 3 * n * d * f32,
           lambda: coupling_update_triton(x, x, f, subtract=True),
           lambda: coupling_update_reference(x, x, f, subtract=True))

    w = torch.randn(d, generator=gen).to(device)
    b = torch.randn(d, generator=gen).to(device)
    compressed = n * groups * k * (f32 + 1)
    record("group_topk fwd", n * d * f32 + compressed,
           lambda: group_topk_forward_triton(x, k, g),
           lambda: group_topk_reference(x, k, g))
    record("group_topk fwd + LN + dropout", n * d * f32 + compressed,
           lambda: group_topk_forward_triton(x, k, g, w, b, 1e-5, True, 0.1, 1, 0),
           lambda: group_topk_reference(x, k, g, w, b, 1e-5, True, 0.1, 1, 0))
    values, indices, mean, rstd = group_topk_forward_triton(x, k, g, w, b, 1e-5, True, 0.1, 1, 0)
    grad_values = torch.randn(n, groups, k, generator=gen).to(device)
    record("group_topk bwd + LN + dropout", compressed + 2 * n * d * f32,
           lambda: group_topk_backward_triton(grad_values, indices, g, x, w, mean, rstd, True,
                                              0.1, 1, 0),
           lambda: _topk_reference_backward(group_topk_reference, x, w, b, k, g, grad_values))

    edge_index = torch.randint(0, n, (2, e), generator=gen)
    csr = csr_from_edge_index(edge_index, n, torch.rand(e, generator=gen))
    csr = type(csr)(csr.rowptr.to(device), csr.col.to(device), csr.weight.to(device), n)
    csr_t = csr.transpose()
    graph_bytes = (n + 1) * 8 + e * (8 + f32)
    record("sparse_aggregate fwd", graph_bytes + e * groups * k * (f32 + 1) + n * d * f32,
           lambda: sparse_aggregate_forward_triton(values, indices, csr, g),
           lambda: sparse_aggregate_reference(values, indices, csr, g))
    grad_out = torch.randn(n, d, generator=gen).to(device)
    record("sparse_aggregate bwd", graph_bytes + n * groups * k * (1 + f32)
           + e * groups * k * f32,
           lambda: sparse_aggregate_backward_triton(grad_out, indices, csr_t, g),
           lambda: sparse_aggregate_backward_reference(grad_out, indices, csr_t, g))

    name = "CPU (dry run, TRITON_INTERPRET=1)" if args.dry_run else torch.cuda.get_device_name()
    import triton
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}")
    print(f"sizes: N={n}, E={e}, D={d}, group_size={g}, k={k}")
    print(f"copy bandwidth (tensor.copy_, {args.copy_mib} MiB): {copy_bw / 1e9:.1f} GB/s")
    header = f"{'kernel':<32} {'ms':>9} {'GB/s':>9} {'of copy':>8} {'torch ms':>9} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['kernel']:<32} {r['ms']:>9.4f} {r['gbps']:>9.1f} {r['of_copy']:>7.0%} "
              f"{r['torch_ms']:>9.4f} {r['speedup']:>7.1f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=name, torch=torch.__version__, triton=triton.__version__,
                           sizes=dict(N=n, E=e, D=d, group_size=g, k=k),
                           copy_gbps=copy_bw / 1e9, kernels=rows), fh, indent=2)
    return 0


def _copy_ms(bench: Callable, nbytes: int, device: torch.device) -> float:
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src))


def _topk_reference_backward(reference, x, w, b, k, g, grad_values):
    xr = x.detach().requires_grad_()
    values, _ = reference(xr, k, g, w, b, 1e-5, True, 0.1, 1, 0)
    values.backward(grad_values)


def _timer(dry_run: bool) -> Callable[[Callable], float]:
    if dry_run:
        def once(fn):
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return once
    from triton.testing import do_bench

    def median(fn):
        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    return median


if __name__ == "__main__":
    sys.exit(main())
