"""``gsr train --memory-budget``: batches sized to the largest that fits, and steps that would not
fit refused before they run.

The model is built first (for ``--gsr`` compiled on the first batch); its step peak is then
predicted at any batch size (:mod:`gsr_compiler.peak`: parameters, gradients, Adam's state,
inputs, arena and activations). The batch node budget becomes the largest node count that fits
at a quarter above the densest training circuit's degree (a cone sample
can be denser than its circuit); when every training circuit fits whole, batches are
whole circuits packed up to that size, otherwise cone samples of that size. Every batch is
checked against the budget at its real node and edge counts before its step runs.

Batches are sized to a tenth under the budget (``HEADROOM``): the prediction does not count
allocator fragmentation, and the same step measured again in fresh processes rises up to 14%
above its predicted activations on CPU (``tests/budget/test_budget.py``), so sizing to the
last byte would let a step pass its budget.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from torch import nn

from .report import format_bytes

__all__ = ["BudgetGuard", "fit_batches_to_budget"]

_MIN_BATCH = 32  # the schedule's smallest useful batch
HEADROOM = 0.10  # the share of the budget left for what the prediction does not count


class BudgetGuard:
    """Refuses a batch whose predicted step peak exceeds the budget less its headroom."""

    def __init__(self, predictor, budget: int, device: str) -> None:
        self.predictor, self.budget, self.device = predictor, budget, device
        self.limit = int(budget * (1 - HEADROOM))
        self.largest = 0  # the highest predicted peak of a batch let through

    def __call__(self, step: int, batch) -> int:
        N, E = int(batch.x.shape[0]), int(batch.edge_index.shape[1])
        peak = self.predictor.predict(N, E, "adam", self.device).total
        if peak > self.limit:
            raise ValueError(
                f"step {step + 1}: a batch of {N:,} nodes and {E:,} edges is predicted to need "
                f"{format_bytes(peak)} per training step, over {format_bytes(self.limit)} "
                f"(--memory-budget {format_bytes(self.budget)} less {HEADROOM:.0%} headroom); "
                "refused before running it. Lower --batch-nodes or raise the budget.")
        self.largest = max(self.largest, peak)
        return peak


def validate_budget(value) -> Optional[int]:
    """``--memory-budget`` in bytes (None when unset); a clear ``ValueError`` otherwise."""
    if value is None:
        return None
    from .budget import parse_budget

    return parse_budget(value, "--memory-budget")


def fit_batches_to_budget(model: nn.Module, cfg, example, train_data: list,
                          log: Callable[[str], None]):
    """``(cfg with batch_nodes/full_graphs chosen, guard)`` for ``cfg.memory_budget``."""
    from .peak import plain_predictor

    budget = validate_budget(cfg.memory_budget)
    if hasattr(model, "_peak_predictor"):
        predictor = model._peak_predictor()
    else:
        predictor = plain_predictor(model, (example.x, example.edge_index))
    # a cone sample can be denser than its circuit: size for a quarter more edges per node
    degree = 1.25 * max(int(d.edge_index.shape[1]) / max(d.num_nodes, 1) for d in train_data)
    limit = int(budget * (1 - HEADROOM))
    nodes = predictor.max_nodes(limit, degree, "adam", cfg.device)
    if nodes < _MIN_BATCH:
        floor = predictor.predict(_MIN_BATCH, int(degree * _MIN_BATCH), "adam", cfg.device).total
        raise ValueError(
            f"--memory-budget {format_bytes(budget)}: not even a batch of {_MIN_BATCH} nodes fits "
            f"with {HEADROOM:.0%} headroom (predicted {format_bytes(floor)} per step: parameters, gradients and Adam's state "
            f"{format_bytes(predictor.predict(0, 0, 'adam', cfg.device).total)}); use a smaller "
            "--width or --depth, --gsr, or a larger budget")
    largest = max(d.num_nodes for d in train_data)
    whole = nodes >= largest
    if cfg.full_graphs and not whole:
        raise ValueError(
            f"--full-graphs with --memory-budget {format_bytes(budget)}: the largest training "
            f"circuit has {largest:,} nodes, but at most {nodes:,} fit a step; drop --full-graphs "
            "to train on cone samples")
    chosen = dataclasses.replace(cfg, batch_nodes=int(nodes), full_graphs=whole)
    peak = predictor.predict(nodes, int(degree * nodes), "adam", cfg.device)
    log(f"memory budget {format_bytes(budget)}: batches of up to {nodes:,} nodes "
        f"({'whole circuits, every training circuit fits' if whole else 'cone samples'}); "
        f"predicted step peak {format_bytes(peak.total)} (activations "
        f"{format_bytes(peak.activations)}) at degree {degree:.2f}, {HEADROOM:.0%} of the budget "
        "left as headroom")
    return chosen, BudgetGuard(predictor, budget, cfg.device)
