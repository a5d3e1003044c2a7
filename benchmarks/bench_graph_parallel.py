"""Graph-parallel full-graph training: peak memory per rank, and bytes exchanged per step.

One training step of a compiled ResidualGNN (SAGE, reversible chain) on a whole circuit, in one
process, then split over 2 and 4 gloo ranks (started with torch's elastic launcher, one thread
each). Memory is the RSS rise of the step (peak during the step minus RSS before it, after a
warm-up step), with ``MALLOC_MMAP_THRESHOLD_=131072`` as ``gsr_compiler/memory.py`` measures it,
per rank; bytes are what each rank's halo exchanges moved in the step, beside the formula of
docs/distributed.md (dense, G groups of width D/G, float32):

    received_r = L * D * 4 * (2 * H_r + S_r)        sent_r = L * D * 4 * (2 * S_r + H_r)

with L blocks, H_r halo rows received and S_r rows sent per exchange; with ``--sparse-k k`` the
layers exchange compressed rows, ``2 k (4 + 1)`` bytes per block forward and ``2 k 4`` for the
gradient, in place of ``4 D``.

    python benchmarks/bench_graph_parallel.py --circuit b19_Cg --width 64 --depth 16 \\
        --ranks 2 4 --json graph_parallel.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

MMAP_THRESHOLD = 131072


def _rss_and_peak() -> tuple[int, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kb = line.split()[:2]
                values[key] = int(kb) * 1024
    return values["VmRSS:"], values["VmHWM:"]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _model(args, in_channels: int):
    from gsr_compiler import GSRConfig, gsr_compile
    from gsr_compiler.models import ResidualGNN

    torch.manual_seed(0)
    model = ResidualGNN(in_channels, args.width, 1, args.depth, conv="sage", dropout=0.0)
    return gsr_compile(model, GSRConfig(sparse_k=args.sparse_k))


def _measure(step) -> dict:
    step()  # warm-up: compiles, allocates gradients
    gc.collect()
    before, _ = _rss_and_peak()
    _reset_peak()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    _, peak = _rss_and_peak()
    return {"rss_rise": peak - before, "peak_rss": peak, "step_seconds": seconds}


def worker(args) -> None:
    from gsr_compiler.circuits import load_circuit

    torch.set_num_threads(1)
    data = load_circuit(args.circuit, labels=("level",))
    x, edge_index, y = data.x, data.edge_index, data.level_norm.unsqueeze(1)
    n = data.num_nodes
    gsr_model = _model(args, x.shape[1])
    if args.single:
        def step():
            loss = ((gsr_model(x, edge_index) - y) ** 2).sum() / n
            loss.backward()
            gsr_model.zero_grad(set_to_none=False)  # gradients stay allocated, as in training
        result = {"ranks": 1, "nodes": n, **_measure(step)}
        print("RESULT " + json.dumps([result]), flush=True)
        return

    import torch.distributed as dist

    from gsr_compiler.distributed.graph_parallel import GraphParallelModel
    from gsr_compiler.distributed.partition import GraphPartition, partition_graph

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    parts = torch.empty(n, dtype=torch.long)
    method = [None]
    if rank == 0:  # one partition, made once, for every rank
        start = time.perf_counter()
        part = partition_graph(edge_index, n, world, args.method)
        parts, method = part.parts, [f"{part.method} ({time.perf_counter() - start:.1f} s)"]
    dist.broadcast(parts, 0)
    dist.broadcast_object_list(method, 0)
    local = GraphPartition(parts, world, method[0]).local(edge_index, rank)
    gp = GraphParallelModel(gsr_model, local)
    x_local, y_local = local.rows(x), local.rows(y)

    def step():
        gp.reset_stats()
        loss = ((gp(x_local) - y_local) ** 2).sum() / n
        loss.backward()
        gp.all_reduce_gradients()
        gsr_model.zero_grad(set_to_none=False)

    measured = _measure(step)
    stats = gp.local_stats()
    h, s = stats["halo"], stats["sent_rows"]
    if args.sparse_k is None:  # G = 2 branches of width D/2 per block: D floats per row
        row = grad_row = args.width * 4
    else:  # per block, 2 branches with one top-k group each: k values + k one-byte indices
        row, grad_row = 2 * args.sparse_k * (4 + 1), 2 * args.sparse_k * 4
    formula = {"received": args.depth * (2 * h * row + s * grad_row),
               "sent": args.depth * (2 * s * row + h * grad_row)}
    mine = {"ranks": world, "rank": rank, "nodes": n, "method": method[0], **stats, **measured,
            "formula_bytes": formula}
    table = gp.describe()
    rows = [None] * world
    dist.all_gather_object(rows, mine)
    if rank == 0:
        print(table, flush=True)
        print("RESULT " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


def _launch(args, ranks: int) -> list[dict]:
    # The children import the package this script sits beside, not another installed copy.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), OMP_NUM_THREADS="1",
               PYTHONPATH=path)
    common = ["--worker", "--circuit", args.circuit, "--width", str(args.width),
              "--depth", str(args.depth), "--method", args.method]
    if args.sparse_k is not None:
        common += ["--sparse-k", str(args.sparse_k)]
    if ranks == 1:
        cmd = [sys.executable, __file__, *common, "--single"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", __file__, *common]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{ranks} rank(s) failed with exit code {proc.returncode}")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
        print(line)
    raise SystemExit(f"{ranks} rank(s) printed no result")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--circuit", default="b19_Cg")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--sparse-k", type=int, default=None)
    p.add_argument("--method", default="auto", help="partitioner: auto, metis, bfs, level")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--json", help="write all figures here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"{args.circuit}, ResidualGNN SAGE width {args.width}, {args.depth} blocks, "
          f"sparse_k={args.sparse_k}, partition {args.method}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs; RSS rise of one training step, "
          f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}")
    single = _launch(args, 1)[0]
    print(f"1 process: RSS rise {single['rss_rise'] / 2**20:.1f} MiB, "
          f"step {single['step_seconds']:.1f} s")
    results = {"single": single, "graph_parallel": {}}
    for ranks in args.ranks:
        rows = _launch(args, ranks)
        results["graph_parallel"][ranks] = rows
        print(f"{ranks} ranks ({rows[0]['method']}):")
        print("  rank   owned    halo   RSS rise  x single   step s   MiB recv (formula)   "
              "MiB sent (formula)")
        for r in rows:
            f = r["formula_bytes"]
            print(f"  {r['rank']:>4} {r['owned']:>7} {r['halo']:>7} {r['rss_rise'] / 2**20:>8.1f}M"
                  f" {r['rss_rise'] / single['rss_rise']:>8.3f}x {r['step_seconds']:>8.1f}"
                  f" {r['bytes_received'] / 2**20:>9.2f} ({f['received'] / 2**20:.2f})"
                  f" {r['bytes_sent'] / 2**20:>11.2f} ({f['sent'] / 2**20:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
