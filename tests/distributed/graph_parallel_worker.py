"""What each rank runs in tests/distributed/test_graph_parallel.py (started with
torch.multiprocessing.spawn; results go to files the test compares)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from gsr_compiler import GSRConfig, gsr_compile
from gsr_compiler.distributed.graph_parallel import GraphParallelModel
from gsr_compiler.distributed.partition import GraphPartition
from gsr_compiler.models import ResidualGNN


def build(case: dict) -> torch.nn.Module:
    torch.manual_seed(case["model_seed"])
    model = ResidualGNN(case["in_channels"], case["width"], case["out_channels"], case["depth"],
                        conv=case["conv"], dropout=case["dropout"]).to(case["dtype"])
    return gsr_compile(model, GSRConfig(**case["config"]))


def loss_of(out: torch.Tensor, y: torch.Tensor, num_nodes: int) -> torch.Tensor:
    # A sum over nodes: each rank's part of it, summed over ranks, is the whole.
    return ((out - y) ** 2).sum() / num_nodes + out.sin().sum() / num_nodes


def run_rank(rank: int, world: int, store: str, workdir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        case = torch.load(os.path.join(workdir, "case.pt"), weights_only=False)
        data = case["data"]
        part = GraphPartition(case["parts"], world, "given")
        local = part.local(data["edge_index"], rank)
        gsr_model = build(case)
        gp = GraphParallelModel(gsr_model, local)
        x = local.rows(data["x"])
        gp.prepare(x)
        gsr_model.load_state_dict(case["state"])
        results = {"owned": local.owned, "outputs": [], "grads": []}
        for step in range(case["steps"]):
            torch.manual_seed(case["step_seed"] + step)
            gp.reset_stats()
            out = gp(x)
            loss = loss_of(out, local.rows(data["y"]), data["x"].shape[0])
            gsr_model.zero_grad(set_to_none=True)
            loss.backward()
            gp.all_reduce_gradients()
            results["outputs"].append(out.detach())
            results["grads"].append({n: p.grad.clone() for n, p in gsr_model.named_parameters()})
            results.setdefault("stats", []).append(gp.local_stats())
            with torch.no_grad():
                for p in gsr_model.parameters():
                    p -= case["lr"] * p.grad
        results["describe"] = gp.describe()
        torch.save(results, os.path.join(workdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
