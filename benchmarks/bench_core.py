"""Core targets: memory and time of a 64-block, 128-channel SAGE residual GNN.

Compares, one training step each (forward, loss, backward), each model in fresh
subprocesses: the plain residual model (eager), the same architecture built by hand
with PyG's GroupAddRev, and gsr_compile of the plain model. Also: saved bytes at 16 vs
256 blocks, compile time of a 1000-block model, and the reconstruction error of block
inputs after 1000 float32 blocks.

    python benchmarks/bench_core.py                 # b18_Cg (64k nodes), as in the docs
    python benchmarks/bench_core.py --nodes 4096    # random graph, quick
    python benchmarks/bench_core.py --parts models --models groupaddrev,gsr   # one ratio
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from gsr_compiler import gsr_compile
from gsr_compiler.bench.group_add_rev import GroupAddRevGNN
from gsr_compiler.memory import FIXED_MMAP_THRESHOLD, measure_step_in_subprocess
from gsr_compiler.models import ResidualGNN
from gsr_compiler.report import format_bytes
from gsr_compiler.runtime.reversible import ReversibleChain
from gsr_compiler.synthetic import random_graph


def load_graph(args):
    if args.nodes:
        x, edge_index, target = random_graph(args.nodes, args.edges or 2 * args.nodes, 16)
        return "random graph", x, edge_index, target
    from gsr_compiler.circuits import load_circuit

    data = load_circuit(args.circuit)
    level = data.level.float()
    return args.circuit, data.x.float(), data.edge_index, (level / level.max()).unsqueeze(1)


def measure(name, model, inputs, target, steps):
    m = measure_step_in_subprocess(model, inputs, target, timing_steps=steps)
    fixed = measure_step_in_subprocess(model, inputs, target, timing_steps=1,
                                       mmap_threshold=FIXED_MMAP_THRESHOLD)
    m.peak_rss_fixed, m.rss_rise_fixed = fixed.peak_rss, fixed.rss_rise
    if m.error:
        print(f"{name}: failed: {m.error}")
    else:
        print(f"{name}: saved {format_bytes(m.saved_bytes)}, peak RSS {format_bytes(m.peak_rss)}, "
              f"RSS rise {format_bytes(m.rss_rise)} (fixed threshold: peak "
              f"{format_bytes(m.peak_rss_fixed)}, rise {format_bytes(m.rss_rise_fixed)}), "
              f"step {m.step_seconds:.2f} s", flush=True)
    return m


def block_recompute_bytes(model, inputs) -> int:
    """Bytes autograd keeps while the reversible backward recomputes the first block with
    grad (all its group branches; parameters and the block input excluded)."""
    chain = next(m for m in model.modules() if isinstance(m, ReversibleChain))
    x, edge_index = inputs
    with torch.no_grad():  # the chain input of a ResidualGNN, as the first block sees it
        h = model.graph_module.get_submodule("encoder")(x)
    groups = len(chain.blocks[0])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in inputs_ptrs:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    parts = [p.detach().requires_grad_() for p in h.chunk(groups, dim=1)]
    inputs_ptrs = {p.untyped_storage().data_ptr() for p in parts} | {
        edge_index.untyped_storage().data_ptr()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for branch, part in zip(chain.blocks[0], parts):
            branch(part, edge_index)
    return sum(kept.values())


def compile_and_reconstruct(width: int) -> dict:
    """Compile time of a 1000-block model, and the relative error of the chain input rebuilt
    from its output through 1000 float32 blocks."""
    xs, eis, _ = random_graph(2048, 8192, 16, seed=1)
    torch.manual_seed(0)
    thousand = ResidualGNN(16, width, 1, 1000, conv="sage", dropout=0.1)
    start = time.perf_counter()
    compiled = gsr_compile(thousand, example_inputs=(xs, eis))
    seconds = time.perf_counter() - start
    compiled.eval()
    chain = next(m for m in compiled.modules() if isinstance(m, ReversibleChain))
    h0 = torch.randn(xs.shape[0], width)
    with torch.no_grad():
        back = chain.inverse(chain(h0, eis), eis)
    return {"compile_seconds_1000_blocks": seconds,
            "reconstruction_rel_error_1000_float32": ((back - h0).norm() / h0.norm()).item()}


MODELS = ("plain", "groupaddrev", "gsr", "gsr_sparse")


def ratio(rows: dict, key: str, top: str, bottom: str):
    """rows[top][key] / rows[bottom][key] when both models ran, else None."""
    if top not in rows or bottom not in rows:
        return None
    return rows[top][key] / rows[bottom][key]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--circuit", default="b18_Cg")
    parser.add_argument("--nodes", type=int, default=0, help="use a random graph of this size")
    parser.add_argument("--edges", type=int, default=0)
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sparse-k", type=int, default=0,
                        help="k of the gsr+sparse row (default: g/8 of g = width/2)")
    parser.add_argument("--parts", default="models,saved,compile",
                        help="models: the step of each model; saved: saved bytes at 16 vs 256 "
                             "blocks; compile: compile time and reconstruction error of 1000 blocks")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"models of the models part, of: {', '.join(MODELS)}")
    parser.add_argument("--out", default="results/bench_core.json")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    unknown = parts - {"models", "saved", "compile"}
    if unknown:
        parser.error(f"unknown --parts {', '.join(sorted(unknown))}; choose from models, saved, compile")
    models = args.models.split(",")
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"unknown --models {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")

    graph, x, edge_index, target = load_graph(args)
    print(f"{graph}: {x.shape[0]} nodes, {edge_index.shape[1]} edges; {args.depth} blocks x "
          f"{args.width} channels; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}", flush=True)
    inputs = (x, edge_index)
    results = {"graph": graph, "nodes": x.shape[0], "edges": edge_index.shape[1],
               "depth": args.depth, "width": args.width, "torch": torch.__version__}

    ratios = {}
    if "models" in parts:
        torch.manual_seed(0)
        plain = ResidualGNN(x.shape[1], args.width, 1, args.depth, conv="sage", dropout=0.1)
        gsr = gsr_compile(plain, example_inputs=inputs)
        k = args.sparse_k or max(1, args.width // 2 // 8)
        torch.manual_seed(0)
        sparse = gsr_compile(plain, sparse_k=k, example_inputs=inputs)
        by_hand = GroupAddRevGNN(x.shape[1], args.width, 1, args.depth, dropout=0.1)
        results["sparse_k"] = k
        recompute = {"gsr": block_recompute_bytes(gsr, inputs),
                     "gsr_sparse": block_recompute_bytes(sparse, inputs)}
        results["block_recompute_bytes"] = recompute
        print(f"bytes one block keeps during its recompute: dense ReLU "
              f"{format_bytes(recompute['gsr'])}, sparse_k={k} {format_bytes(recompute['gsr_sparse'])}",
              flush=True)
        rows = {}
        for name, model in (("plain", plain), ("groupaddrev", by_hand), ("gsr", gsr),
                            ("gsr_sparse", sparse)):
            if name in models:
                rows[name] = measure(name, model, inputs, target, args.steps).__dict__
        results["models"] = rows
        for key, top, bottom, label in (
                ("saved_bytes", "gsr", "plain", "saved gsr/plain"),
                ("peak_rss", "gsr", "plain", "peak rss gsr/plain"),
                ("rss_rise", "gsr", "plain", "rss rise gsr/plain"),
                ("rss_rise_fixed", "gsr", "plain", "rss rise (fixed threshold) gsr/plain"),
                ("step_seconds", "gsr", "plain", "step time gsr/plain"),
                ("step_seconds", "gsr", "groupaddrev", "step time gsr/groupaddrev"),
                ("peak_rss", "gsr_sparse", "gsr", "peak rss gsr_sparse/gsr"),
                ("rss_rise", "gsr_sparse", "gsr", "rss rise gsr_sparse/gsr"),
                ("rss_rise_fixed", "gsr_sparse", "gsr", "rss rise (fixed threshold) gsr_sparse/gsr"),
                ("step_seconds", "gsr_sparse", "gsr", "step time gsr_sparse/gsr")):
            value = ratio(rows, key, top, bottom)
            if value is not None:
                ratios[label] = value
        ratios["block recompute bytes gsr/gsr_sparse"] = recompute["gsr"] / recompute["gsr_sparse"]

    if "saved" in parts:
        # saved bytes at 16 vs 256 blocks
        saved = {}
        for depth in (16, 256):
            torch.manual_seed(0)
            deep = ResidualGNN(x.shape[1], args.width, 1, depth, conv="sage", dropout=0.1)
            # in a fresh process with the mmap threshold fixed: RSS of this one stays small
            saved[depth] = measure_step_in_subprocess(
                gsr_compile(deep, example_inputs=inputs), inputs, target, timing_steps=0,
                mmap_threshold=FIXED_MMAP_THRESHOLD).saved_bytes
            print(f"gsr saved bytes at {depth} blocks: {format_bytes(saved[depth])}", flush=True)
        ratios["saved 256/16 blocks"] = saved[256] / saved[16]

    if "compile" in parts:
        results.update(compile_and_reconstruct(args.width))
        print(f"compile 1000 blocks: {results['compile_seconds_1000_blocks']:.2f} s; relative "
              f"reconstruction error after 1000 float32 blocks: "
              f"{results['reconstruction_rel_error_1000_float32']:.2e}")
    results["ratios"] = ratios
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
