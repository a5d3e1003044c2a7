"""Quality after a fixed budget of steps: train a baseline on real circuits, score it on
held-out ones (test Pearson and Kendall).

The same recipe as ``gsr train`` (:mod:`gsr_compiler.train`): the batch of step ``s`` is a
pure function of ``(seed, s)`` (cone samples packed up to ``batch_nodes`` nodes), Adam,
gradient-norm clipping at 1, MSE on the nodes whose label is exact; test circuits are
scored on their full graphs, or on cone samples beyond ``eval_max_nodes``. It trains any
baseline (``gsr train`` builds only the plain and the GSR models) and writes nothing:
every baseline at every depth sees the same batches in the same order.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .baselines import Baseline, ModelSpec


@dataclass
class QualityJob:
    """One training run: a baseline, the architecture, the data and the step budget."""

    baseline: Baseline
    spec: ModelSpec
    train: list[str]  # circuit names (loaded from the circuit cache in the process)
    test: list[str]
    label: str = "level"
    steps: int = 200
    batch_nodes: int = 4096
    lr: float = 1e-3
    eval_max_nodes: int | None = None
    seed: int = 0
    device: str = "cpu"
    cache_dir: str | None = None


def train_and_score(job: QualityJob) -> dict:
    """Trains ``job.steps`` steps and returns the test metrics (runs in a fresh process)."""
    from ..circuits import load_circuit
    from ..train import TrainConfig, _BatchSchedule, evaluate, train_step

    train = [load_circuit(n, labels=(job.label,), cache_dir=job.cache_dir) for n in job.train]
    test = [load_circuit(n, labels=(job.label,), cache_dir=job.cache_dir) for n in job.test]
    cfg = TrainConfig(label=job.label, depth=job.spec.depth, width=job.spec.width,
                      steps=job.steps, lr=job.lr, batch_nodes=job.batch_nodes,
                      eval_max_nodes=job.eval_max_nodes, seed=job.seed, device=job.device)
    device = torch.device(job.device)
    schedule = _BatchSchedule(train, cfg)
    example = schedule(0).to(device)
    torch.manual_seed(job.seed)
    model = job.baseline.build(job.spec, (example.x, example.edge_index)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=job.lr)
    torch.manual_seed(job.seed + 1)  # the stream dropout draws from, as in gsr train
    losses = []
    start = time.perf_counter()
    for step in range(job.steps):
        batch = schedule(step).to(device)
        losses.append(train_step(model, optimizer, batch, clip=1.0))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"loss is {losses[-1]} at step {step + 1}")
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    test, _ = evaluate(model, test, cfg, device)
    average = test["average"]
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "pearson": float(average["pearson"]),
        "kendall": float(average["kendall"]),
        "per_circuit": {name: m.as_dict() for name, m in test["per_circuit"].items()},
        "final_loss": sum(tail) / len(tail),
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start,
        "steps": job.steps,
    }
