r"""Reversible chains of grouped additive coupling blocks.

A chain of L blocks, each splitting the D channels of its input into G groups
:math:`x_1, \dots, x_G` and computing

.. math::
    y_0 = \sum_{i=2}^{G} x_i, \qquad y_i = x_i + f_i(y_{i-1}), \quad i = 1, \dots, G,

with each :math:`f_i` a copy of the residual branch at width D/G. The chain keeps only
its output for backward. Backward walks the blocks from last to first; for each group
(last to first) it runs :math:`f_i(y_{i-1})` once with grad, and that one result both
rebuilds the input, :math:`x_i = y_i - f_i(y_{i-1})`, and is differentiated. This costs
one extra forward per block, where PyG's ``GroupAddRev`` spends two (an inverse without
grad, then a recompute with grad).

Nothing here frees or resizes a tensor the caller can see.

With a :class:`~gsr_compiler.runtime.arena.CouplingArena` attached (``coupling_arena``, set by
the compiler under ``GSRConfig.plan_memory``), each call keeps the groups in the arena's scratch
and updates them in place; otherwise every update is a fresh tensor. Both paths run the same
operations on operands of the same layout, so they agree bit for bit; the output and the input
gradient are fresh tensors either way.

``kernel_backend`` (set by the compiler from ``GSRConfig.backend``) picks who runs the coupling
update and inverse: the Triton kernel ``coupling_add_``/``coupling_sub_`` (into the scratch, or
into a fresh tensor without an arena) or torch's ``add``/``sub``. Each output element is one
IEEE addition or subtraction of the same two operands either way, so the backends agree bit for
bit as well.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .arena.coupling_arena import CouplingScratch
from .gradient_slots import GradientSlots
from .kernels import coupling_add_, coupling_sub_, use_triton
from .replay import draw_seed, frozen_running_stats, seeded


class ReversibleChain(nn.Module):
    """L grouped coupling blocks that store only the chain output for backward.

    Args:
        blocks: ``blocks[i][j]`` is the branch :math:`f_j` of block ``i``, called as
            ``f(h, *side_inputs_of_block_i)``.
        side_index: ``side_index[i]`` lists, for block ``i``, the positions of its side
            inputs (``edge_index``, ``edge_attr``, ``batch``, ...) among the chain's.

    Attributes:
        kernel_backend: ``"auto"``, ``"torch"`` or ``"triton"``: who runs the coupling update
            and inverse (see :func:`~gsr_compiler.runtime.kernels.use_triton`).
    """

    def __init__(
        self,
        blocks: Sequence[Sequence[nn.Module]],
        side_index: Sequence[Sequence[int]],
    ) -> None:
        super().__init__()
        if len(blocks) == 0:
            raise ValueError("a reversible chain needs at least one block")
        groups = {len(b) for b in blocks}
        if len(groups) != 1 or min(groups) < 2:
            raise ValueError(f"every block needs the same number (>= 2) of groups, got {sorted(groups)}")
        if len(side_index) != len(blocks):
            raise ValueError("side_index needs one entry per block")
        self.blocks = nn.ModuleList(nn.ModuleList(b) for b in blocks)
        self.side_index = [tuple(int(i) for i in s) for s in side_index]
        self.groups = groups.pop()
        # The arena of the compiled model (GSRConfig.plan_memory), or None: fresh tensors.
        self.coupling_arena = None
        self.kernel_backend = "auto"

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, groups={self.groups}"

    def forward(self, x: Tensor, *side_inputs: object) -> Tensor:
        if x.shape[-1] % self.groups:
            raise ValueError(
                f"chain input has {x.shape[-1]} channels, not divisible by groups={self.groups}"
            )
        params = [p for p in self._all_parameters() if p.requires_grad]
        side_tensors = [s for s in side_inputs if isinstance(s, Tensor)]
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params)
            or any(t.requires_grad for t in side_tensors)
        )
        if not needs_grad:
            seeds = self._draw_seeds()
            with self._scratch("forward", x) as scratch:
                return self._run_forward(x, side_inputs, seeds, scratch)
        return _ReversibleChainFunction.apply(self, len(side_inputs), x, *side_inputs, *params)

    @torch.no_grad()
    def inverse(self, y: Tensor, *side_inputs: object, seeds=None) -> Tensor:
        """The chain input that produced ``y`` (``seeds`` as drawn by the forward, or
        None in eval mode). Used to measure reconstruction error over depth."""
        if seeds is None:
            if self.training:
                raise ValueError("inverse() in training mode needs the seeds the forward drew")
            seeds = [[None] * self.groups for _ in self.blocks]
        G, devices = self.groups, [y.device]
        kernels = self._use_kernels(y)
        for i in range(self.depth - 1, -1, -1):
            extra = self._block_inputs(i, side_inputs)
            ys = y.chunk(G, dim=-1)
            xs: list[Tensor | None] = [None] * G
            for j in range(G - 1, -1, -1):
                inp = ys[j - 1] if j > 0 else _sum(xs[1:], kernels=kernels)
                with seeded(seeds[i][j], devices):
                    xs[j] = _sub(ys[j], self.blocks[i][j](inp, *extra), kernels=kernels)
            y = torch.cat(xs, dim=-1)
        return y

    # -- pieces shared by the autograd function ------------------------------------

    def _draw_seeds(self) -> list[list[int | None]]:
        # In training mode every branch call gets its own seed, so the backward
        # recompute draws exactly the forward's dropout masks.
        random = self.training
        return [[draw_seed() if random else None for _ in block] for block in self.blocks]

    def _all_parameters(self) -> list[nn.Parameter]:
        # The structure is fixed once built; walking thousands of modules per call is not.
        cached = self.__dict__.get("_parameter_cache")
        if cached is None:
            cached = list(self.parameters())
            self.__dict__["_parameter_cache"] = cached
        return cached

    def _block_inputs(self, i: int, side_inputs: Sequence[object]) -> list[object]:
        return [side_inputs[k] for k in self.side_index[i]]

    def _use_kernels(self, like: Tensor) -> bool:
        """Whether this call's coupling runs as Triton kernels (decided once per call)."""
        # Absent in modules pickled before the option existed: they ran the torch path.
        return use_triton(getattr(self, "kernel_backend", "torch"), like)

    @contextlib.contextmanager
    def _scratch(self, phase: str, like: Tensor) -> Iterator[Optional[CouplingScratch]]:
        """The arena's scratch for one call shaped after ``like`` (the chain input or
        output), or None without an arena."""
        arena = getattr(self, "coupling_arena", None)  # absent in modules pickled before it
        if arena is None:
            yield None
            return
        width = like.shape[-1] // self.groups
        rows = like.numel() // like.shape[-1] if like.shape[-1] else 0
        with arena.scratch(getattr(self, "gsr_name", ""), phase, rows, width, like.dtype,
                           like.device) as scratch:
            yield scratch

    def _run_forward(self, x: Tensor, side_inputs: Sequence[object], seeds,
                     scratch: Optional[CouplingScratch] = None) -> Tensor:
        devices = [x.device]
        kernels = self._use_kernels(x)
        # Blocks pass their G groups along as a list: no concatenation between blocks. With
        # scratch, group j lives in scratch.state[j] from block 0 on and is updated in place.
        xs = list(x.chunk(self.groups, dim=-1))
        state = _groups_shaped(scratch.state, xs[0]) if scratch is not None else None
        y0 = _group_shaped(scratch.y0, xs[0]) if scratch is not None else None
        for i, block in enumerate(self.blocks):
            extra = self._block_inputs(i, side_inputs)
            prev = _sum(xs[1:], into=y0, kernels=kernels)
            ys = []
            for j, f in enumerate(block):
                with seeded(seeds[i][j], devices):
                    out = f(prev, *extra)
                prev = _add(xs[j], out, into=None if state is None else state[j], kernels=kernels)
                ys.append(prev)
            xs = ys
        # A fresh tensor: the output is saved for backward and handed on; it must outlive
        # this call's scratch.
        return torch.cat(xs, dim=-1)


def _group_shaped(view: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """The arena's ``[rows, width]`` view reshaped to a group's shape (``[..., width]``)."""
    return None if view is None else view.view(like.shape)


def _groups_shaped(views: Sequence[Tensor], like: Tensor) -> list[Tensor]:
    return [v.view(like.shape) for v in views]


def _check_into(into: Tensor, a: Tensor, b: Tensor) -> None:
    # Type promotion must not be narrowed by the arena's dtype: that would change results.
    if torch.result_type(a, b) != into.dtype:
        raise RuntimeError(
            f"a reversible coupling update produces {torch.result_type(a, b)}, but the chain's "
            f"arena holds {into.dtype} (the chain input's dtype); the branch returns a dtype "
            "other than its input's. Compile with plan_memory=False, or make the branch keep "
            "the dtype.")


def _add(a: Tensor, b: Tensor, into: Optional[Tensor] = None, kernels: bool = False) -> Tensor:
    """``a + b``, written into ``into`` when given (``into`` may be ``a``); with ``kernels``
    by the Triton coupling kernel."""
    return _coupling(a, b, into, kernels, subtract=False)


def _sub(a: Tensor, b: Tensor, into: Optional[Tensor] = None, kernels: bool = False) -> Tensor:
    """``a - b``, written into ``into`` when given (``into`` may be ``a``); with ``kernels``
    by the Triton coupling kernel."""
    return _coupling(a, b, into, kernels, subtract=True)


def _coupling(a: Tensor, b: Tensor, into: Optional[Tensor], kernels: bool,
              subtract: bool) -> Tensor:
    if into is not None:
        _check_into(into, a, b)
    # The kernel writes through raw pointers, which autograd cannot record, and does not
    # broadcast: anything but equal shapes outside autograd takes torch's path.
    if kernels and a.shape == b.shape and not (torch.is_grad_enabled()
                                               and (a.requires_grad or b.requires_grad)):
        if into is None:
            into = torch.empty(a.shape, dtype=torch.result_type(a, b), device=a.device)
        update = coupling_sub_ if subtract else coupling_add_
        return update(into, a, b, backend="triton")
    op = torch.sub if subtract else torch.add
    return op(a, b) if into is None else op(a, b, out=into)


def _sum(tensors: Sequence[Tensor], into: Optional[Tensor] = None, kernels: bool = False
         ) -> Tensor:
    """y0 = x2 + ... + xG: with G = 2 that is x2 itself; with G > 2 a fresh tensor, or
    ``into``. The additions are the same, left to right, either way."""
    total = tensors[0]
    for t in tensors[1:]:
        total = _add(total, t, into=into, kernels=kernels)
    return total


class _ReversibleChainFunction(torch.autograd.Function):
    """Forward without grad keeping only the output; backward inverts block by block."""

    @staticmethod
    def forward(ctx, chain: ReversibleChain, n_side: int, x: Tensor, *rest):
        side_inputs = rest[:n_side]
        seeds = chain._draw_seeds()
        with torch.no_grad(), chain._scratch("forward", x) as scratch:
            y = chain._run_forward(x, side_inputs, seeds, scratch)
        ctx.chain = chain
        ctx.params = rest[n_side:]
        ctx.seeds = seeds
        ctx.n_side = n_side
        ctx.side_is_tensor = [isinstance(s, Tensor) for s in side_inputs]
        ctx.side_constants = [None if isinstance(s, Tensor) else s for s in side_inputs]
        ctx.save_for_backward(y, *[s for s in side_inputs if isinstance(s, Tensor)])
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        chain: ReversibleChain = ctx.chain
        saved = ctx.saved_tensors
        y = saved[0].detach()
        tensors = iter(saved[1:])
        side_inputs = [next(tensors) if is_t else c
                       for is_t, c in zip(ctx.side_is_tensor, ctx.side_constants)]
        # Side tensors that need grad are differentiated through every block.
        side_leaves = [
            s.detach().requires_grad_() if isinstance(s, Tensor) and s.requires_grad else s
            for s in side_inputs
        ]
        params = ctx.params
        # Before the walk, so that they sit apart from each block's short-lived tensors.
        slots = GradientSlots([p for p in params if p.requires_grad]
                              + [s for s in side_leaves if isinstance(s, Tensor)
                                 and s.requires_grad])
        with chain._scratch("backward", y) as scratch:
            grad_x = _chain_backward(ctx, chain, y, grad_y, side_leaves, slots, scratch)
        side_grads = [slots.get(s) if isinstance(s, Tensor) else None for s in side_leaves]
        return (None, None, grad_x, *side_grads, *[slots.get(p) for p in params])


def _chain_backward(ctx, chain: ReversibleChain, y: Tensor, grad_y: Tensor, side_leaves: list,
                    grads_out: GradientSlots, scratch: Optional[CouplingScratch]) -> Tensor:
    """Walks the blocks last to first; accumulates the gradients of the side inputs and
    parameters in ``grads_out``; returns the gradient of the chain input. With ``scratch``,
    the rebuilt inputs go to ``scratch.state`` and the group gradients to ``scratch.grad``,
    updated in place."""
    G = chain.groups
    devices = [y.device]
    kernels = chain._use_kernels(y)
    ys = list(y.chunk(G, dim=-1))
    gys = list(grad_y.chunk(G, dim=-1))
    state = grad = y0 = None
    if scratch is not None:
        state = _groups_shaped(scratch.state, ys[0])
        grad = _groups_shaped(scratch.grad, ys[0])
        y0 = _group_shaped(scratch.y0, ys[0])
        arena_storage = scratch.state[0].untyped_storage().data_ptr()
        # The last block reads the chain output's groups from the arena: a column chunk of y is
        # strided, and layers such as LayerNorm copy a strided input (one more [N, D/G]
        # tensor at the step's peak). The inverse then overwrites them in place, as it does
        # for every earlier block.
        for j in range(G):
            state[j].copy_(ys[j])
        ys = list(state)
    with frozen_running_stats(chain):
        for i in range(chain.depth - 1, -1, -1):
            block = chain.blocks[i]
            extra = chain._block_inputs(i, side_leaves)
            extra_grad = [(k, s) for k, s in zip(chain.side_index[i], extra)
                          if isinstance(s, Tensor) and s.requires_grad]
            xs: list[Tensor | None] = [None] * G
            for j in range(G - 1, -1, -1):
                f = block[j]
                f_params = [p for p in f.parameters() if p.requires_grad]
                inp = (ys[j - 1] if j > 0 else _sum(xs[1:], into=y0, kernels=kernels)
                       ).detach().requires_grad_()
                with torch.enable_grad(), seeded(ctx.seeds[i][j], devices):
                    out = f(inp, *extra)
                wrt = [inp] + [s for _, s in extra_grad] + f_params
                grads = list(torch.autograd.grad(out, wrt, gys[j], allow_unused=True))
                if scratch is not None:
                    # A branch that passes its gradient through (out = inp + s) returns the
                    # arena's own view; what leaves this call must not alias the arena.
                    grads[1:] = [g.clone() if g is not None
                                 and g.untyped_storage().data_ptr() == arena_storage else g
                                 for g in grads[1:]]
                # The inverse, after the gradient: an in-place write into the arena before it
                # would bump the version of `inp`, which the branch saved.
                xs[j] = _sub(ys[j], out.detach(), into=None if state is None else state[j],
                             kernels=kernels)
                g_inp = grads[0]
                if g_inp is not None:
                    if j > 0:
                        gys[j - 1] = _add(gys[j - 1], g_inp,
                                          into=None if grad is None else grad[j - 1],
                                          kernels=kernels)
                    else:  # y0 = x2 + ... + xG feeds the first group
                        for k in range(1, G):
                            gys[k] = _add(gys[k], g_inp, into=None if grad is None else grad[k],
                                          kernels=kernels)
                for (_, s), g in zip(extra_grad, grads[1:1 + len(extra_grad)]):
                    if g is not None:
                        grads_out.accumulate(s, g)
                for p, g in zip(f_params, grads[1 + len(extra_grad):]):
                    if g is not None:
                        grads_out.accumulate(p, g)
                # g_inp too: else it pins an [N, D/G] gradient through the next recompute.
                del out, grads, g_inp
            ys = xs  # this block's input is the previous block's output
    # A fresh tensor, like the forward's output.
    return torch.cat(gys, dim=-1)
