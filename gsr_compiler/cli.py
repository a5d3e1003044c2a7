"""The ``gsr`` command line."""
from __future__ import annotations

import argparse
import os
import sys
import time


def _sparse_k(args: argparse.Namespace, gsr: bool) -> int | None:
    """``--sparse-k``: unset means the default (half of each group) when compiling, 0 means
    dense ReLU."""
    from .config import default_sparse_k

    if args.sparse_k is None:
        return default_sparse_k(args.width, args.groups) if gsr else None
    return args.sparse_k or None


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(circuit=args.circuit, depth=args.depth, width=args.width, steps=args.steps,
             groups=args.groups, sparse_k=_sparse_k(args, gsr=True), out_dir=args.out,
             measure=not args.no_memory)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import json

    from . import gsr_compile
    from .models import ResidualGNN
    from .synthetic import random_graph
    from .sweep import depth_sweep, plot_depth_sweep

    depths = [int(d) for d in args.depths.split(",")]
    x, edge_index, target = random_graph(args.nodes, args.edges, in_channels=16, seed=0)
    rows = depth_sweep(
        lambda d: ResidualGNN(16, args.width, 1, d, conv=args.conv),
        lambda m: gsr_compile(m, groups=args.groups), depths, (x, edge_index), target,
        subprocess=not args.in_process,
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "depth_sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    path = plot_depth_sweep(rows, os.path.join(args.out, "depth_sweep.png"),
                            f"{args.conv}, width {args.width}, {args.nodes} nodes, {args.edges} edges")
    for r in rows:
        print(f"depth {r['depth']:5d}: saved eager {r['eager_saved_bytes'] / 2**20:9.1f} MiB, "
              f"gsr {r['gsr_saved_bytes'] / 2**20:7.1f} MiB")
    print(f"plot: {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.graph_parallel is not None:  # one circuit, full graph, split over N ranks
        from .distributed.train_graph_parallel import run_from_cli

        return run_from_cli(args)
    from .train import TrainConfig, train

    names = lambda text: None if text is None else [n for n in text.split(",") if n]  # noqa: E731
    cfg = TrainConfig(
        label=args.label, conv=args.conv, depth=args.depth, width=args.width, groups=args.groups,
        gsr=args.gsr, sparse_k=_sparse_k(args, args.gsr), dropout=args.dropout, steps=args.steps, lr=args.lr,
        weight_decay=args.weight_decay, clip=args.clip, batch_nodes=args.batch_nodes,
        full_graphs=args.full_graphs, train=names(args.train), val=names(args.val),
        test=names(args.test), eval_every=args.eval_every, eval_max_nodes=args.eval_max_nodes,
        checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device, out=args.out,
        resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
        memory_budget=args.memory_budget,
    )
    if args.nproc is None and args.dist_timeout is None \
            and "TORCHELASTIC_RUN_ID" not in os.environ:  # not under torchrun
        train(cfg)  # one process
        return 0
    from .distributed.launch import launch_data_parallel, launched_by_torchrun, torchrun_rank

    if launched_by_torchrun():
        if args.nproc is not None:
            raise ValueError("--nproc starts its own ranks; under torchrun leave it out "
                             "(torchrun --nproc-per-node sets the number of ranks)")
        torchrun_rank(cfg, args.dist_timeout)
    elif args.nproc is not None:
        launch_data_parallel(cfg, args.nproc, args.dist_timeout)
    else:
        raise ValueError("--dist-timeout applies to data-parallel runs (--nproc N or torchrun)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .budget import parse_budget
    from .step_plan import format_plan, plan_training_step

    memory = parse_budget(args.device_memory, "--device-memory")
    rows, info = plan_training_step(args.depth, args.width, args.circuit, memory, conv=args.conv,
                                    groups=args.groups, sparse_k=args.sparse_k or None,
                                    optimizer=args.optimizer, device=args.device)
    print(format_plan(rows, info))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import shlex

    from .bench import BenchOptions, run_bench

    def names(text):
        return None if text is None else [n.strip() for n in text.split(",") if n.strip()]

    def ints(flag, text):
        if text is None:
            return None
        try:
            return [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None

    run_bench(BenchOptions(
        out=args.out, quick=args.quick, device=args.device, baselines=names(args.baselines),
        sweeps=names(args.sweeps), conv=args.conv, groups=args.groups, sparse_k=args.sparse_k,
        dropout=args.dropout, circuit=args.circuit, depths=ints("--depths", args.depths),
        width=args.width, widths=ints("--widths", args.widths), width_depth=args.width_depth,
        circuits=names(args.circuits), size_depth=args.size_depth, cone_nodes=args.cone_nodes,
        timing_steps=args.timing_steps,
        quality_depths=ints("--quality-depths", args.quality_depths),
        quality_baselines=names(args.quality_baselines), quality_steps=args.quality_steps,
        label=args.label, batch_nodes=args.batch_nodes, lr=args.lr, train=names(args.train),
        test=names(args.test), eval_max_nodes=args.eval_max_nodes,
        memory_budget_gib=args.memory_budget, time_budget=args.time_budget,
        step_budget_gib=args.step_budget, budget_depth=args.budget_depth,
        budget_train=names(args.budget_train), budget_test=names(args.budget_test),
        train_seconds=args.train_seconds, budget_evals=args.budget_evals,
        threads=args.threads, seed=args.seed, progress=not args.no_progress,
    ), command=shlex.join(["gsr", *args.argv]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsr", description="Grouped-Sparse-Reversible GNN compiler")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compile a deep residual GNN for a real circuit, "
                                       "compare memory and train a few steps")
    demo.add_argument("--circuit", default="c6288", help="bundled circuit name or .v/.bench path")
    demo.add_argument("--depth", type=int, default=128)
    demo.add_argument("--width", type=int, default=32)
    demo.add_argument("--groups", type=int, default=2)
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--sparse-k", type=int, default=None,
                      help="values kept per node and group of width/groups channels by the "
                           "group top-k (default: half the group; 0: dense ReLU)")
    demo.add_argument("--out", default="gsr-demo", help="folder for the graph picture and tables")
    demo.add_argument("--no-memory", action="store_true", help="skip the memory comparison")
    demo.set_defaults(run=_demo)

    sweep = sub.add_parser("sweep", help="memory against depth, eager vs compiled, with a PNG plot")
    sweep.add_argument("--depths", default="8,16,32,64,128,256,512")
    sweep.add_argument("--nodes", type=int, default=8192)
    sweep.add_argument("--edges", type=int, default=16384)
    sweep.add_argument("--width", type=int, default=64)
    sweep.add_argument("--conv", default="sage")
    sweep.add_argument("--groups", type=int, default=2)
    sweep.add_argument("--in-process", action="store_true",
                       help="measure in this process (faster; RSS figures less clean)")
    sweep.add_argument("--out", default="gsr-sweep")
    sweep.set_defaults(run=_sweep)

    tr = sub.add_parser("train", help="train a residual GNN on circuit labels, evaluate on "
                                      "held-out circuits (metrics JSON, scatter PNG, checkpoints)")
    tr.add_argument("--label", default="level", choices=["level", "reverse_level", "prob", "toggle"],
                    help="per-node target (level and reverse_level are regressed normalized)")
    tr.add_argument("--conv", default="sage", help="sage, gcn, graph, gin, gat or gen")
    tr.add_argument("--depth", type=int, default=16, help="residual blocks")
    tr.add_argument("--width", type=int, default=32, help="channels")
    tr.add_argument("--gsr", action="store_true", help="compile with gsr_compile (reversible)")
    tr.add_argument("--groups", type=int, default=2, help="channel groups with --gsr")
    tr.add_argument("--sparse-k", type=int, default=None,
                    help="with --gsr: keep the k largest values per node and group of "
                         "width/groups channels instead of ReLU (default: half the group; "
                         "0: dense ReLU)")
    tr.add_argument("--dropout", type=float, default=0.0)
    tr.add_argument("--steps", type=int, default=200, help="total optimizer steps")
    tr.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    tr.add_argument("--weight-decay", type=float, default=0.0)
    tr.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    tr.add_argument("--batch-nodes", type=int, default=4096,
                    help="node budget of a batch (cone samples packed together)")
    tr.add_argument("--full-graphs", action="store_true",
                    help="batches of whole circuits instead of cone samples")
    tr.add_argument("--train", help="comma-separated training circuits (default: family split)")
    tr.add_argument("--val", help="comma-separated validation circuits")
    tr.add_argument("--test", help="comma-separated test circuits")
    tr.add_argument("--eval-every", type=int, default=50,
                    help="validate every N steps (0: only at the end)")
    tr.add_argument("--eval-max-nodes", type=int, default=None,
                    help="evaluate circuits bigger than this on cone samples (default: full graphs)")
    tr.add_argument("--checkpoint-every", type=int, default=None,
                    help="write the checkpoint every N steps (default: --eval-every)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    tr.add_argument("--out", default="gsr-train", help="folder for checkpoint, metrics, plot")
    tr.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                    help="continue from CHECKPOINT (default: <out>/checkpoint.pt)")
    tr.add_argument("--overwrite", action="store_true", help="start over in a used --out folder")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--memory-budget", metavar="SIZE",
                    help="bytes a training step may use, e.g. 6GiB: sizes the batches to the "
                         "largest that is predicted to fit (whole circuits when they do) and "
                         "refuses a step predicted to exceed it")
    tr.add_argument("--nproc", type=int, default=None, metavar="N",
                    help="data-parallel training on N ranks of this machine, started by torch's "
                         "elastic launcher (under torchrun, leave it out); docs/distributed.md")
    tr.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                    help="data-parallel runs: a rank waiting longer than this for the others "
                         "stops with an error (default: 300)")
    tr.add_argument("--graph-parallel", type=int, metavar="N", default=None,
                    help="train the one --train circuit full-graph, its nodes split over N gloo "
                         "ranks (docs/distributed.md)")
    tr.add_argument("--partition", default="auto",
                    help="with --graph-parallel: auto, metis (needs pymetis), bfs, level")
    tr.set_defaults(run=_train)

    pl = sub.add_parser("plan", help="predicted peak memory of a training step on a circuit, "
                                     "plain vs GSR, with the largest depth and batch that fit "
                                     "a device; runs nothing")
    pl.add_argument("--depth", type=int, default=256, help="residual blocks")
    pl.add_argument("--width", type=int, default=128, help="channels")
    pl.add_argument("--conv", default="sage", help="sage, gcn, graph, gin, gat or gen")
    pl.add_argument("--groups", type=int, default=2, help="channel groups of the GSR form")
    pl.add_argument("--sparse-k", type=int, default=0,
                    help="values kept per node and group by the GSR form (0: dense ReLU)")
    pl.add_argument("--circuit", default="b19_Cg", help="bundled circuit name or .v/.bench path")
    pl.add_argument("--device-memory", default="80GiB", metavar="SIZE",
                    help="memory of the device, e.g. 80GiB, 512MiB, 1.5GB")
    pl.add_argument("--optimizer", default="adam", help="adam, adamw, sgd, sgd-momentum, none")
    pl.add_argument("--device", default="cuda", help="cuda (allocator blocks counted) or cpu")
    pl.set_defaults(run=_plan)

    # listed here rather than imported: building the parser must not import torch
    baselines = ("plain, checkpoint, deepgcn, groupaddrev, torch.compile, gsr-rev, gsr-sparse, "
                 "gsr-full")
    be = sub.add_parser(
        "bench", help="benchmark GSR against plain, checkpointing, DeepGCN, GroupAddRev and "
                      "torch.compile: memory, time and quality, with tables and plots",
        description="Measures every baseline in a fresh process per configuration over depth, "
                    "width and circuit-size sweeps, plus test quality after a fixed number of "
                    "steps. Options left out take the preset's value (full run, or --quick).")
    be.add_argument("--quick", action="store_true",
                    help="small circuit, few depths, few steps (a few minutes on a small CPU)")
    be.add_argument("--out", default="gsr-bench", help="results folder (results.md, .json, PNGs)")
    be.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    be.add_argument("--baselines", help=f"comma-separated, of: {baselines} (default: all)")
    be.add_argument("--sweeps",
                    help="comma-separated, of: depth, width, size, quality, budget (default: all "
                         "but budget)")
    be.add_argument("--conv", default="sage", help="message-passing layer of every block")
    be.add_argument("--groups", type=int, default=2, help="channel groups of the grouped forms")
    be.add_argument("--sparse-k", type=int, default=None,
                    help="values kept per node and group by the sparse GSR forms (default: g/8 "
                         "of the group width g = width/groups)")
    be.add_argument("--dropout", type=float, default=0.1)
    be.add_argument("--circuit", help="graph of the depth and width sweeps (full: multiplier, "
                                      "quick: c6288)")
    be.add_argument("--depths", help="depth sweep, comma-separated (full: 8,16,...,1024)")
    be.add_argument("--width", type=int, help="channels in the depth, size and quality sweeps")
    be.add_argument("--widths", help="width sweep, comma-separated")
    be.add_argument("--width-depth", type=int, help="depth of the width sweep")
    be.add_argument("--circuits", help="size sweep, comma-separated (full: c6288 up to b19_Cg)")
    be.add_argument("--size-depth", type=int, help="depth of the size sweep (full: 256)")
    be.add_argument("--cone-nodes", type=int,
                    help="circuits bigger than this are measured on one cone sample of this "
                         "many nodes (0: full graphs)")
    be.add_argument("--timing-steps", type=int, help="timed steps per configuration (median)")
    be.add_argument("--quality-depths", help="depths trained for quality, comma-separated")
    be.add_argument("--quality-baselines",
                    help="baselines trained for quality (default: those whose function differs "
                         "from plain's)")
    be.add_argument("--quality-steps", type=int, help="optimizer steps per quality run")
    be.add_argument("--label", default="level", help="label learned in the quality sweep")
    be.add_argument("--batch-nodes", type=int, help="node budget of a training batch")
    be.add_argument("--lr", type=float, default=1e-3)
    be.add_argument("--train", help="training circuits, comma-separated (full: family split)")
    be.add_argument("--test", help="test circuits, comma-separated (full: family split)")
    be.add_argument("--eval-max-nodes", type=int,
                    help="score test circuits bigger than this on cone samples")
    be.add_argument("--memory-budget", type=float, metavar="GIB",
                    help="stop a configuration whose resident memory passes this many GiB "
                         "(default: 80%% of the memory available at start; CUDA: the device)")
    be.add_argument("--time-budget", type=float, metavar="SECONDS",
                    help="stop a configuration that runs longer (full: 1800, quick: 120)")
    be.add_argument("--step-budget", type=float, metavar="GIB",
                    help="budget sweep: the memory a training step may use, in GiB (what is "
                         "resident plus the step's measured RSS rise; full: 1, quick: 1/256)")
    be.add_argument("--budget-depth", type=int, help="budget sweep: depth (full: 256)")
    be.add_argument("--budget-train", help="budget sweep: training circuits (full: the ITC99 "
                                           "circuits of the family split)")
    be.add_argument("--budget-test", help="budget sweep: test circuits (full: family split)")
    be.add_argument("--train-seconds", type=float,
                    help="budget sweep: wall-clock seconds of training per baseline (full: 600)")
    be.add_argument("--budget-evals", type=int,
                    help="budget sweep: test scorings over the training clock (full: 4)")
    be.add_argument("--threads", type=int, help="torch threads per measuring process")
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--no-progress", action="store_true", help="no progress bars")
    be.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from .errors import GSRCompileError

    start = time.perf_counter()
    try:
        code = args.run(args)
    except (GSRCompileError, ValueError, LookupError, OSError) as e:
        print(f"gsr {args.command}: error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # once, not once per data-parallel rank
        print(f"[gsr {args.command} finished in {time.perf_counter() - start:.1f} s]")
    return code


if __name__ == "__main__":
    sys.exit(main())
