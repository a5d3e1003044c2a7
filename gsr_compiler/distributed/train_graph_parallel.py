"""``gsr train --graph-parallel N``: one circuit trained full-graph, its nodes split over N ranks.

The command checks everything it can in this process (flags, the circuit, a graph with at least
N nodes, layers a rank can run alone, the output folder) before it starts any process or writes
any file, then starts N processes with torch's elastic launcher
(``python -m torch.distributed.run --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint
localhost:0``), each running :func:`worker` on gloo with one thread. Rank 0 partitions the
circuit and broadcasts the assignment; every step is one full-graph forward and backward
(:class:`~gsr_compiler.distributed.graph_parallel.GraphParallelModel`), gradients summed over the
ranks, one Adam step per rank on identical gradients. Rank 0 logs, and writes ``metrics.json``
and ``model.pt`` (the compiled model's ``state_dict``) atomically at the end.

Under an existing ``torchrun`` (several machines), run ``python -m
gsr_compiler.distributed.train_graph_parallel --config run.json`` as the training script.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import GSRCompileError
from .partition import METHODS, GraphPartitionError, check_num_parts, check_partitionable

__all__ = ["GraphParallelTrainConfig", "validate", "launch", "worker", "run_from_cli"]

_TARGETS = {"level": "level_norm", "reverse_level": "reverse_level_norm", "prob": "prob",
            "toggle": "toggle"}


@dataclass
class GraphParallelTrainConfig:
    """Options of a graph-parallel training run (the ``gsr train`` flags it uses)."""

    circuit: str
    nproc: int
    label: str = "level"
    conv: str = "sage"
    depth: int = 16
    width: int = 32
    groups: int = 2
    gsr: bool = True
    sparse_k: Optional[int] = None
    dropout: float = 0.0
    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip: Optional[float] = 1.0
    seed: int = 0
    method: str = "auto"
    log_every: int = 50
    out: str = "gsr-train"
    overwrite: bool = False
    cache_dir: Optional[str] = None


def _build(cfg: GraphParallelTrainConfig, in_channels: int) -> torch.nn.Module:
    from .. import GSRConfig, gsr_compile
    from ..models import ResidualGNN

    torch.manual_seed(cfg.seed)
    model = ResidualGNN(in_channels, cfg.width, 1, cfg.depth, conv=cfg.conv, dropout=cfg.dropout)
    if not cfg.gsr:
        return model
    return gsr_compile(model, GSRConfig(groups=cfg.groups, sparse_k=cfg.sparse_k))


def _load(cfg: GraphParallelTrainConfig):
    from ..circuits import load_circuit

    return load_circuit(cfg.circuit, labels=(cfg.label,), cache_dir=cfg.cache_dir)


def validate(cfg: GraphParallelTrainConfig) -> None:
    """Raises ``ValueError`` (or :class:`GSRCompileError`) for anything that would make the run
    fail, before any process starts or any file is written."""
    check_num_parts(cfg.nproc)
    if cfg.label not in _TARGETS:
        raise ValueError(f"label {cfg.label!r}: choose one of {', '.join(_TARGETS)}.")
    if cfg.method not in METHODS:
        raise GraphPartitionError(f"partition method {cfg.method!r}: choose one of "
                                  f"{', '.join(METHODS)}.")
    for name in ("steps", "depth", "width"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(cfg, name)!r}.")
    if not cfg.gsr and cfg.dropout:
        raise ValueError("graph-parallel training of the plain model draws dropout per rank; "
                         "use --gsr (node-id-keyed masks) or --dropout 0.")
    data = _load(cfg)  # an unknown circuit raises here, with close names
    check_partitionable(data.num_nodes, cfg.nproc)
    from .graph_parallel import check_graph_parallel_model

    check_graph_parallel_model(_build(cfg, data.x.shape[1]))
    out = os.path.abspath(cfg.out)
    if os.path.exists(os.path.join(out, "metrics.json")) and not cfg.overwrite:
        raise ValueError(f"{out} already holds a run (metrics.json); choose another --out or "
                         "pass --overwrite.")
    parent = out if os.path.isdir(out) else os.path.dirname(out)
    if not os.access(parent, os.W_OK):
        raise OSError(f"cannot write to {parent}.")


def launch(cfg: GraphParallelTrainConfig) -> int:
    """Validates ``cfg``, then runs :func:`worker` on ``cfg.nproc`` local processes through
    ``torch.distributed.run``; returns the launcher's exit code."""
    validate(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    config_path = os.path.join(cfg.out, "graph_parallel_run.json")
    _atomic_json(dataclasses.asdict(cfg), config_path)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cfg.nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
           "-m", "gsr_compiler.distributed.train_graph_parallel", "--config", config_path]
    return subprocess.run(cmd, env=env).returncode


def _atomic_json(obj: Any, path: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".partial")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def worker(cfg: GraphParallelTrainConfig) -> None:
    """One rank of a run (started by :func:`launch` or by ``torchrun``)."""
    import torch.distributed as dist

    from ..circuits import regression_metrics
    from .graph_parallel import GraphParallelModel
    from .partition import GraphPartition, partition_graph

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    log = print if rank == 0 else (lambda *a, **k: None)
    data = _load(cfg)
    n = data.num_nodes
    y = data[_TARGETS[cfg.label]].float().view(-1, 1)
    parts, method = torch.empty(n, dtype=torch.long), [cfg.method]
    if rank == 0:  # one partition for all ranks, made once
        part = partition_graph(data.edge_index, n, world, cfg.method, seed=cfg.seed)
        parts, method = part.parts, [part.method]
    dist.broadcast(parts, 0)
    dist.broadcast_object_list(method, 0)
    local = GraphPartition(parts, world, method[0]).local(data.edge_index, rank)
    model = _build(cfg, data.x.shape[1])
    gp = GraphParallelModel(model, local)
    x, y_local = local.rows(data.x), local.rows(y)
    gp.prepare(x)  # traces, so that the optimizer sees the compiled parameters
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    log(f"graph-parallel training: {cfg.circuit} ({n} nodes) on {world} gloo ranks, "
        f"partition {method[0]}; {'gsr_compile' if cfg.gsr else 'plain'} ResidualGNN "
        f"{cfg.conv} width {cfg.width}, {cfg.depth} blocks")
    start = time.perf_counter()
    losses = []
    for step in range(1, cfg.steps + 1):
        model.train()
        gp.reset_stats()
        opt.zero_grad(set_to_none=True)
        loss = ((gp(x) - y_local) ** 2).sum() / n
        loss.backward()
        gp.all_reduce_gradients()
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total))
        if step == 1:
            log(gp.describe() + "  (bytes: one training step)")
        if step % cfg.log_every == 0 or step == cfg.steps:
            log(f"step {step}/{cfg.steps}: loss {losses[-1]:.5f} "
                f"({time.perf_counter() - start:.1f} s)")
    model.eval()
    with torch.no_grad():
        pred = gp(x).view(-1)
    gathered = [None] * world if rank == 0 else None
    dist.gather_object((local.owned, pred), gathered, dst=0)
    if rank == 0:
        full = torch.empty(n)
        for owned, p in gathered:
            full[owned] = p
        metrics = {"circuit": cfg.circuit, "nodes": n, "ranks": world, "label": cfg.label,
                   "final_loss": losses[-1], "losses": losses,
                   "train_metrics": dataclasses.asdict(regression_metrics(full, y.view(-1))),
                   "seconds": time.perf_counter() - start, "partition": method[0]}
        state = getattr(model, "compiled", None) or model
        fd, tmp = tempfile.mkstemp(dir=cfg.out, suffix=".partial")
        os.close(fd)
        torch.save(state.state_dict(), tmp)
        os.replace(tmp, os.path.join(cfg.out, "model.pt"))
        _atomic_json(metrics, os.path.join(cfg.out, "metrics.json"))
        log(f"metrics on {cfg.circuit}: {metrics['train_metrics']}")
        log(f"wrote {os.path.join(cfg.out, 'metrics.json')} and model.pt")
    dist.destroy_process_group()


def run_from_cli(args: argparse.Namespace) -> int:
    """``gsr train --graph-parallel N``: refuses flags that have no meaning here, then
    :func:`launch`."""
    from ..config import default_sparse_k

    refused = [flag for flag, value in (("--resume", args.resume), ("--val", args.val),
                                        ("--test", args.test))
               if value is not None]
    if args.device != "cpu":
        refused.append("--device " + args.device)
    # Data-parallel flags (another mode of gsr train), where this parser has them.
    refused += [flag for flag, name in (("--nproc", "nproc"), ("--dist-timeout", "dist_timeout"))
                if getattr(args, name, None) is not None]
    if refused:
        raise ValueError(
            f"--graph-parallel does not support {', '.join(refused)} yet: it trains one circuit "
            "(--train NAME) full-graph on CPU gloo ranks and reports metrics on it.")
    names = [n for n in (args.train or "").split(",") if n]
    if len(names) != 1:
        raise ValueError("--graph-parallel trains one circuit full-graph: give it as "
                         "--train NAME (e.g. --train b19_Cg).")
    if args.sparse_k is None:
        sparse_k = default_sparse_k(args.width, args.groups) if args.gsr else None
    else:
        sparse_k = args.sparse_k or None
    cfg = GraphParallelTrainConfig(
        circuit=names[0], nproc=args.graph_parallel, label=args.label, conv=args.conv,
        depth=args.depth, width=args.width, groups=args.groups, gsr=args.gsr, sparse_k=sparse_k,
        dropout=args.dropout, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
        clip=args.clip or None, seed=args.seed, method=args.partition,
        log_every=args.eval_every or args.steps, out=args.out, overwrite=args.overwrite)
    code = launch(cfg)
    if code != 0:
        print(f"gsr train: graph-parallel training failed (launcher exit code {code}); the "
              "ranks' errors are printed above.", file=sys.stderr)
    return code


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="one rank of graph-parallel training")
    p.add_argument("--config", required=True, help="the JSON launch() writes")
    args = p.parse_args(argv)
    with open(args.config) as f:
        cfg = GraphParallelTrainConfig(**json.load(f))
    worker(cfg)


if __name__ == "__main__":
    main()
