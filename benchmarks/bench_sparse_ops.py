"""Dense ReLU + Linear vs group-wise top-k + compressed consumers: step time and saved bytes.

    python benchmarks/bench_sparse_ops.py                 # N=65536, D=128, G in (2, 16), k=g/8
    python benchmarks/bench_sparse_ops.py --nodes 4096 --repeats 3

For each variant it times forward + backward of one op pair (median and best of ``--repeats``,
variants interleaved so background load hits them alike) and counts the bytes autograd saves for
the backward (``saved_tensors_hooks``, each storage once, parameters and graph inputs excluded).

Rows:
  relu+linear        F.linear(F.relu(x), W, b)                          (dense baseline)
  topk+linear        F.linear(group_topk(x, k, g), W, b)                (dense consumer)
  topk_c+c_linear    compressed_linear(group_topk_compress(x, k, g), W, b)
  relu+sum_aggr      scatter-add of relu(x)[src] into dst (PyG 'sum' message passing, E = 2N)
  topk_c+c_aggr      compressed_aggregate(group_topk_compress(x, k, g), edge_index, N, 'sum')
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from gsr_compiler.runtime.sparse import (compressed_aggregate, compressed_linear, group_topk,
                                         group_topk_compress)


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: Tuple[torch.Tensor, ...]) -> int:
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=65536)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--groups", type=int, nargs="+", default=[2, 16])
    p.add_argument("--k-div", type=int, default=8, help="k = g / K_DIV (default 8)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-aggregate", action="store_true", help="skip the message-passing rows")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, d = args.nodes, args.width
    x = torch.randn(n, d, requires_grad=True)
    lin = torch.nn.Linear(d, d)
    params = tuple(lin.parameters())
    go = torch.randn(n, d)
    edge_index = torch.randint(0, n, (2, 2 * n))

    def relu_aggr() -> torch.Tensor:
        h = F.relu(x)
        return torch.zeros(n, d).index_add_(0, edge_index[1], h[edge_index[0]])

    print(f"N={n} D={d} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"repeats={args.repeats} (times: fwd+bwd, ms)")
    header = f"{'G':>3} {'g':>4} {'k':>3}  {'variant':<16} {'median':>8} {'best':>8} {'vs dense':>9} " \
             f"{'saved MB':>9} {'saved x':>8}"
    print(header)
    print("-" * len(header))
    for num_groups in args.groups:
        g = d // num_groups
        k = max(1, g // args.k_div)
        variants: List[Tuple[str, str, Callable[[], torch.Tensor]]] = [
            ("relu+linear", "lin", lambda: lin(F.relu(x))),
            ("topk+linear", "lin", lambda: lin(group_topk(x, k, g))),
            ("topk_c+c_linear", "lin",
             lambda: compressed_linear(group_topk_compress(x, k, g), lin.weight, lin.bias)),
        ]
        if not args.no_aggregate:
            variants += [
                ("relu+sum_aggr", "agg", relu_aggr),
                ("topk_c+c_aggr", "agg",
                 lambda: compressed_aggregate(group_topk_compress(x, k, g), edge_index, n, "sum")),
            ]
        times: Dict[str, List[float]] = {name: [] for name, _, _ in variants}
        for rep in range(args.repeats + 1):            # first round is warm-up
            for name, _, fn in variants:
                x.grad = None
                lin.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                fn().backward(go)
                dt = time.perf_counter() - t0
                if rep:
                    times[name].append(dt * 1e3)
        base = {"lin": "relu+linear", "agg": "relu+sum_aggr"}
        saved = {name: saved_bytes(fn, params + (x, edge_index)) for name, _, fn in variants}
        for name, kind, _ in variants:
            med = statistics.median(times[name])
            ref = statistics.median(times[base[kind]])
            print(f"{num_groups:>3} {g:>4} {k:>3}  {name:<16} {med:>8.1f} {min(times[name]):>8.1f} "
                  f"{med / ref:>8.2f}x {saved[name] / 2**20:>9.2f} "
                  f"{saved[base[kind]] / max(saved[name], 1):>7.1f}x")


if __name__ == "__main__":
    main()
