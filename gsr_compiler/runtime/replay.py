"""Replaying randomness and freezing running statistics for backward recomputes.

A reversible block is run twice: once in the forward pass (without grad) and once in
the backward pass (with grad, to rebuild its input and differentiate it). Both runs
must see the same dropout masks, and only the first may update BatchNorm statistics.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def draw_seed() -> int:
    """A seed from the global generator, so runs stay reproducible under manual_seed."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


@contextlib.contextmanager
def seeded(seed: int | None, devices: Sequence[torch.device]) -> Iterator[None]:
    """Runs the body with all generators seeded by ``seed`` and restores them after.

    ``seed=None`` runs the body as is (no randomness to replay).
    """
    if seed is None:
        yield
        return
    cuda = sorted({d.index if d.index is not None else torch.cuda.current_device()
                   for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        # Seed only the generators in use: torch.manual_seed also queues lazy seeding of
        # every accelerator backend, recording a stack trace each time (milliseconds).
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode use batch statistics but do not update their
    running estimates (nor ``num_batches_tracked``) inside the body."""
    norms = module.__dict__.get("_batch_norm_cache")
    if norms is None:  # modules are fixed once compiled; find them once
        norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
        module.__dict__["_batch_norm_cache"] = norms
    frozen = [m for m in norms if m.training and m.track_running_stats]
    for m in frozen:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in frozen:
            m.track_running_stats = True
