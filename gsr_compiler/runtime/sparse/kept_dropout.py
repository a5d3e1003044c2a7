"""Dropout of the kept values of a group top-k, inside the top-k where the kernel runs.

A branch ``linear(dropout(relu(x)))`` drops kept values only: the others are zero either way.
Where the top-k runs as the Triton kernel (CUDA), the kernel drops them as it writes the
compressed form, with a counter-based mask (``tl.rand(seed, offset + i)``): nothing is kept for
backward, whose kernel draws the same mask again from the same seed. The seed comes from the
global CPU generator (:func:`~gsr_compiler.runtime.replay.draw_seed`), which a reversible block's
recompute reseeds, so the recompute replays the forward's mask.

On the torch path (CPU) the values are dropped after the top-k by
:func:`~gsr_compiler.runtime.dropout.branch_dropout`, which draws a CPU mask several times faster
than the torch re-implementation of ``tl.rand`` and keeps it as one byte per kept value. The two
paths draw different masks with the same distribution.
"""
from __future__ import annotations

import numbers

from torch import Tensor

from ..dropout import branch_dropout
from ..replay import draw_seed

__all__ = ["check_dropout_p", "kernel_dropout_args", "drop_kept_values"]


def check_dropout_p(p: object, op: str) -> float:
    """``p`` as a float, or a ``ValueError`` naming ``op`` unless ``0 <= p <= 1``."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{op}: dropout_p must be a probability in [0, 1], got {p!r}")
    return float(p)


def kernel_dropout_args(p: float) -> dict:
    """Keyword arguments of :func:`~gsr_compiler.runtime.kernels.group_topk` that drop kept
    values with probability ``p`` in the kernel (none for ``p`` 0 or 1: see
    :func:`drop_kept_values`)."""
    return {"dropout_p": p, "seed": draw_seed()} if 0.0 < p < 1.0 else {}


def drop_kept_values(values: Tensor, p: float, in_kernel: bool) -> Tensor:
    """``values`` after dropout with probability ``p``, unless the kernel already applied it
    (``in_kernel``: the top-k ran as the kernel with :func:`kernel_dropout_args`)."""
    if p == 0.0 or (in_kernel and p < 1.0):
        return values
    return branch_dropout(values, p)
