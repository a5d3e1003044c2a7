"""Backward passes that are not themselves differentiable, and say so.

The runtime's custom backward passes (the reversible chain, which rebuilds activations instead of
keeping them; the fused sparse ops; the recomputed head) compute gradients without recording how,
so the gradients they return cannot be differentiated again. ``torch.autograd``'s own
``once_differentiable`` reports a second differentiation only when it happens, with a generic
message; :func:`first_order_only` refuses ``create_graph=True`` as soon as such a backward runs,
naming the op and what to do.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

__all__ = ["first_order_only", "DOUBLE_BACKWARD_HELP"]

DOUBLE_BACKWARD_HELP = (
    "double backward (backward or autograd.grad with create_graph=True, e.g. a gradient "
    "penalty or Hessian-vector products) is not supported through a model compiled by "
    "gsr_compile: its reversible chains rebuild activations in the backward instead of keeping "
    "them, so their gradients are not differentiable. Differentiate the uncompiled model for "
    "that, or leave out create_graph=True.")


def first_order_only(what: str) -> Callable:
    """Decorates an ``autograd.Function.backward``: runs it without grad, and raises a
    ``RuntimeError`` naming ``what`` when autograd asks for a differentiable gradient."""

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(f"{what}: {DOUBLE_BACKWARD_HELP}")
            with torch.no_grad():
                return backward(ctx, *grads)

        return wrapper

    return decorate
