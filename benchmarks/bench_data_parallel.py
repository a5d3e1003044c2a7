"""Data-parallel cost on one CPU: 2 gloo ranks with 1 thread each against 1 process with 2
threads doing the same work (both ranks' batches per step, gradients averaged).

Reports the bytes DDP all-reduces per step (counted by a communication hook around DDP's
default all-reduce, against 4 bytes x parameters) and the median step time of each side.
On a 2-core CPU this is the overhead of the data-parallel machinery, not a speed-up figure.

    OMP_NUM_THREADS=1 python benchmarks/bench_data_parallel.py --steps 20
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gsr_compiler.distributed.data_parallel import _build, rank_seed, shutdown  # noqa: E402
from gsr_compiler.distributed.sampler import DistributedBatchSchedule  # noqa: E402
from gsr_compiler.train import TrainConfig, _load_circuits, validate_config  # noqa: E402


def _config(args) -> TrainConfig:
    return validate_config(TrainConfig(
        train=args.train.split(","), val=[], test=["c17"], depth=args.depth, width=args.width,
        gsr=not args.plain, sparse_k=None if args.plain else args.width // args.groups // 2,
        groups=args.groups, dropout=0.1, batch_nodes=args.batch_nodes, seed=0, progress=False,
        out=os.path.join(tempfile.gettempdir(), "bench-data-parallel-unused"), lr=1e-3))


def _step(model, optimizer, batches, world: int) -> None:
    """Gradients of each batch's loss, averaged over ``world``, then one Adam step."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    for b in batches:
        pred = model(b.x, b.edge_index).squeeze(-1)
        loss = torch.nn.functional.mse_loss(pred[b.mask], b.target[b.mask]) / world
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def _rank(rank: int, port: int, args, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = _config(args)
    datas = _load_circuits(cfg.train, cfg, lambda _: None)
    schedule = DistributedBatchSchedule(datas, cfg, 2)
    model = _build(cfg, datas[0].x.shape[1], schedule(0, 0), torch.device("cpu"), torch.float32)
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)
    counted = {"bytes": 0, "buckets": 0}

    def counting_hook(state, bucket):
        buffer = bucket.buffer()
        counted["bytes"] += buffer.numel() * buffer.element_size()
        counted["buckets"] += 1
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(rank_seed(0, rank))
    times = []
    for step in range(args.warmup + args.steps):
        batch = schedule(step, rank)
        dist.barrier()  # both ranks start the step together
        tick = time.perf_counter()
        _step(ddp, optimizer, [batch], 1)  # DDP averages over the ranks
        loss = torch.zeros(1, dtype=torch.float64)
        dist.all_reduce(loss)  # the trainer's one-scalar loss all-reduce
        if step >= args.warmup:
            times.append(time.perf_counter() - tick)
    steps = args.warmup + args.steps
    gathered = [None, None]
    dist.all_gather_object(gathered, (times, counted["bytes"] / steps, counted["buckets"] / steps))
    if rank == 0:
        per_step = [max(a, b) for a, b in zip(gathered[0][0], gathered[1][0])]
        result.update(ddp_median=statistics.median(per_step), bytes=gathered[0][1],
                      buckets=gathered[0][2],
                      params=sum(p.numel() for p in model.parameters()))
        torch.save(dict(result), args.result)
    del ddp  # the reducer first, then the process group
    shutdown()


def _single(args, threads: int) -> float:
    torch.set_num_threads(threads)
    cfg = _config(args)
    datas = _load_circuits(cfg.train, cfg, lambda _: None)
    schedule = DistributedBatchSchedule(datas, cfg, 2)
    model = _build(cfg, datas[0].x.shape[1], schedule(0, 0), torch.device("cpu"), torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(rank_seed(0, 0))
    times = []
    for step in range(args.warmup + args.steps):
        batches = [schedule(step, 0), schedule(step, 1)]
        tick = time.perf_counter()
        _step(model, optimizer, batches, 2)
        if step >= args.warmup:
            times.append(time.perf_counter() - tick)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", default="c1355,c1908,c2670,c3540")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--batch-nodes", type=int, default=1500)
    p.add_argument("--plain", action="store_true", help="no gsr_compile")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--result", default="/tmp/bench_data_parallel.pt")
    args = p.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # one side at a time; the single process before and after the ranks (a shared machine's
    # load drifts), in a child process each so that neither inherits the other's state
    ctx = mp.get_context("spawn")

    def single(threads: int) -> float:
        with ctx.Pool(1) as pool:
            return pool.apply(_single, (args, threads))

    before = single(2)
    mp.start_processes(_rank, args=(port, args, {}), nprocs=2, start_method="spawn")
    ddp = torch.load(args.result, weights_only=True)
    after = single(2)
    serial = single(1)  # the same work on one core: what 2 ranks would halve at best
    single2 = (before + after) / 2
    kind = "plain" if args.plain else f"gsr_compile groups={args.groups}, top-k"
    print(f"machine: {_cpu_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"model: {args.depth} x sage, width {args.width}, {kind}; {ddp['params']:,} "
          f"parameters; batches of up to {args.batch_nodes} nodes from {args.train}")
    print(f"all-reduced per step: {ddp['bytes']:,.0f} bytes in {ddp['buckets']:.0f} bucket(s) "
          f"(4 bytes x {ddp['params']:,} parameters = {4 * ddp['params']:,}), "
          "plus 8 bytes of loss")
    print(f"median step, 2 batches: 1 process x 2 threads {single2 * 1e3:.1f} ms "
          f"({before * 1e3:.1f} before the ranks, {after * 1e3:.1f} after); "
          f"2 gloo ranks x 1 thread {ddp['ddp_median'] * 1e3:.1f} ms "
          f"({ddp['ddp_median'] / single2:.2f}x); 1 process x 1 thread {serial * 1e3:.1f} ms "
          f"(2 ranks: {ddp['ddp_median'] / serial:.2f}x of it, 0.50x at best)")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    main()
