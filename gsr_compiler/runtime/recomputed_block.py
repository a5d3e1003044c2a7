r"""One residual block recomputed in the backward: :math:`y = h + f(h)`, keeping only its inputs.

A chain of one block gains nothing from a reversible form that needs no width rule: the
two-stream coupling of one block keeps both streams (:math:`2 N \times D`) for its backward.
Keeping the block's input :math:`h` and running :math:`f(h)` again in the backward, with grad,
costs the same extra forward and keeps half of that: what a chain of blocks separated by a
non-invertible op (``x = relu(x + conv(x))``, GCNII) needs, where each block is a chain of its
own. It is also the same function as the block as written, bit for bit: the recompute runs the
same layers on the same saved input, with the random generators' states of the forward restored
(dropout draws the forward's masks, as eager draws them) and BatchNorm running statistics
frozen (:func:`~gsr_compiler.runtime.replay.frozen_running_stats`).

The branch runs the user's own layers (the same objects), which stay registered in the model
under their own names, as in :class:`~gsr_compiler.runtime.two_stream.TwoStreamChain`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from .autocast_state import capture_autocast, restored_autocast
from .first_order import first_order_only
from .replay import frozen_running_stats
from .shared_layers import alias_pairs, register_alias_hooks

__all__ = ["RecomputedBlock"]


class RecomputedBlock(nn.Module):
    """``h + branch(h, *side_inputs)``, keeping for backward only ``h`` and the side inputs.

    Args:
        branch: the residual branch, called as ``branch(h, *side_inputs)``.
        shared: ``{name in the branch: path of the same module in the model}``: the layers the
            branch shares with the user's model, listed in ``state_dict`` under the model's keys
            only (:meth:`alias_keys`).
    """

    coupling = "recompute"

    def __init__(self, branch: nn.Module, shared: Optional[dict[str, str]] = None) -> None:
        super().__init__()
        self.branch = branch
        self.shared = dict(shared or {})
        register_alias_hooks(self)

    @property
    def depth(self) -> int:
        return 1

    def alias_keys(self) -> list[tuple[str, str]]:
        return alias_pairs(self.branch, "branch.", self.shared)

    def forward(self, h: Tensor, *side_inputs: object) -> Tensor:
        params = self._trainable_parameters()
        side_tensors = [s for s in side_inputs if isinstance(s, Tensor)]
        needs_grad = torch.is_grad_enabled() and (
            h.requires_grad or bool(params) or any(t.requires_grad for t in side_tensors))
        if not needs_grad:
            return h + self.branch(h, *side_inputs)
        return _RecomputeFunction.apply(self, len(side_inputs), h, *side_inputs, *params)

    def forward_storing_everything(self, h: Tensor, *side_inputs: object) -> Tensor:
        """The same function with ordinary autograd: the reference of the recompute."""
        return h + self.branch(h, *side_inputs)

    def _trainable_parameters(self) -> list[nn.Parameter]:
        # The structure is fixed once built; walking the branch per call is not needed.
        cached = self.__dict__.get("_parameter_cache")
        if cached is None:
            cached = list(self.branch.parameters())
            self.__dict__["_parameter_cache"] = cached
        return [p for p in cached if p.requires_grad]


def _cuda_indices(tensors: list[Tensor]) -> list[int]:
    return sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                   for t in tensors if t.device.type == "cuda"})


def _rng_states(cuda: list[int]) -> tuple[Tensor, list[Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(i) for i in cuda]


@contextlib.contextmanager
def _restored_rng(states: tuple[Tensor, list[Tensor]], cuda: list[int]) -> Iterator[None]:
    """The body draws what the forward drew; the caller's generators are left as they were."""
    cpu, devices = states
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.set_rng_state(cpu)
        for index, state in zip(cuda, devices):
            torch.cuda.set_rng_state(state, index)
        yield


class _RecomputeFunction(torch.autograd.Function):
    """Forward without grad keeping the inputs; backward runs the branch again with grad."""

    @staticmethod
    def forward(ctx, block: RecomputedBlock, n_side: int, h: Tensor, *rest):
        side_inputs = rest[:n_side]
        side_tensors = [s for s in side_inputs if isinstance(s, Tensor)]
        ctx.cuda = _cuda_indices([h, *side_tensors])
        ctx.rng = _rng_states(ctx.cuda) if block.training else None
        ctx.autocast = capture_autocast(h.device)
        ctx.block = block
        ctx.params = rest[n_side:]
        ctx.side_is_tensor = [isinstance(s, Tensor) for s in side_inputs]
        ctx.side_constants = [None if isinstance(s, Tensor) else s for s in side_inputs]
        ctx.save_for_backward(h, *side_tensors)
        with torch.no_grad():
            return h + block.branch(h, *side_inputs)

    @staticmethod
    @first_order_only("a recomputed residual block")
    def backward(ctx, grad_y: Tensor):
        block: RecomputedBlock = ctx.block
        saved = ctx.saved_tensors
        h = saved[0].detach().requires_grad_()
        tensors = iter(saved[1:])
        side = [next(tensors) if is_t else c
                for is_t, c in zip(ctx.side_is_tensor, ctx.side_constants)]
        side = [s.detach().requires_grad_() if isinstance(s, Tensor) and s.requires_grad else s
                for s in side]
        wanted_side = [s for s in side if isinstance(s, Tensor) and s.requires_grad]
        params = [p for p in ctx.params if p.requires_grad]
        rng = _restored_rng(ctx.rng, ctx.cuda) if ctx.rng is not None else contextlib.nullcontext()
        with torch.enable_grad(), rng, frozen_running_stats(block), \
                restored_autocast(ctx.autocast):
            out = block.branch(h, *side)
        grads = iter(torch.autograd.grad(out, [h, *wanted_side, *params],
                                         grad_y.to(out.dtype), allow_unused=True))
        g_h = next(grads)
        grad_h = grad_y if g_h is None else grad_y + g_h
        side_grads = {id(s): next(grads) for s in wanted_side}
        param_grads = {id(p): next(grads) for p in params}
        return (None, None, grad_h,
                *[side_grads.get(id(s)) if isinstance(s, Tensor) else None for s in side],
                *[param_grads.get(id(p)) for p in ctx.params])
