"""What each rank runs in tests/distributed/test_graph_parallel.py (started with
torch.multiprocessing.spawn); each case's results go to a file that the test compares with a
single process."""
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
    # A sum over nodes: the ranks' parts of it add up to the whole.
    return ((out - y) ** 2).sum() / num_nodes + out.sin().sum() / num_nodes


def sgd_step(model: torch.nn.Module, lr: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def run_case(rank: int, world: int, case: dict) -> dict:
    data = {k: v.to(case["dtype"]) if v.is_floating_point() else v
            for k, v in case["data"].items()}
    local = GraphPartition(case["parts"], world, "given").local(data["edge_index"], rank)
    gsr_model = build(case)
    gp = GraphParallelModel(gsr_model, local)
    x = local.rows(data["x"])
    gp.prepare(x)
    gsr_model.load_state_dict(case["state"])
    results = {"owned": local.owned, "halo": local.num_halo,
               "sent_rows": int(local.send_index.numel()), "outputs": [], "grads": [],
               "stats": []}
    for step in range(case["steps"]):
        torch.manual_seed(case["step_seed"] + step)
        gp.reset_stats()
        out = gp(x)
        loss = loss_of(out, local.rows(data["y"]), data["x"].shape[0])
        gsr_model.zero_grad(set_to_none=True)
        loss.backward()
        gp.all_reduce_gradients()
        results["outputs"].append(out.detach().clone())
        results["grads"].append({n: p.grad.clone() for n, p in gsr_model.named_parameters()})
        results["stats"].append(gp.local_stats())
        sgd_step(gsr_model, case["lr"])
    results["describe"] = gp.describe()
    results["explain"] = gp.explain()
    return results


def run_rank(rank: int, world: int, store: str, workdir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for name in names:
            case = torch.load(os.path.join(workdir, f"{name}.pt"), weights_only=False)
            torch.save(run_case(rank, world, case), os.path.join(workdir, f"{name}.rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
