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
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .replay import draw_seed, frozen_running_stats, seeded


class ReversibleChain(nn.Module):
    """L grouped coupling blocks that store only the chain output for backward.

    Args:
        blocks: ``blocks[i][j]`` is the branch :math:`f_j` of block ``i``, called as
            ``f(h, *side_inputs_of_block_i)``.
        side_index: ``side_index[i]`` lists, for block ``i``, the positions of its side
            inputs (``edge_index``, ``edge_attr``, ``batch``, ...) among the chain's.
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
            return self._run_forward(x, side_inputs, seeds)
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
        for i in range(self.depth - 1, -1, -1):
            extra = self._block_inputs(i, side_inputs)
            ys = y.chunk(G, dim=-1)
            xs: list[Tensor | None] = [None] * G
            for j in range(G - 1, -1, -1):
                inp = ys[j - 1] if j > 0 else _sum(xs[1:])
                with seeded(seeds[i][j], devices):
                    xs[j] = ys[j] - self.blocks[i][j](inp, *extra)
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

    def _run_forward(self, x: Tensor, side_inputs: Sequence[object], seeds) -> Tensor:
        devices = [x.device]
        # Blocks pass their G groups along as a list: no concatenation between blocks.
        xs = list(x.chunk(self.groups, dim=-1))
        for i, block in enumerate(self.blocks):
            extra = self._block_inputs(i, side_inputs)
            prev = _sum(xs[1:])
            ys = []
            for j, f in enumerate(block):
                with seeded(seeds[i][j], devices):
                    prev = xs[j] + f(prev, *extra)
                ys.append(prev)
            xs = ys
        return torch.cat(xs, dim=-1)


def _sum(tensors: Sequence[Tensor]) -> Tensor:
    """y0 = x2 + ... + xG (a fresh tensor only when G > 2)."""
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


class _ReversibleChainFunction(torch.autograd.Function):
    """Forward without grad keeping only the output; backward inverts block by block."""

    @staticmethod
    def forward(ctx, chain: ReversibleChain, n_side: int, x: Tensor, *rest):
        side_inputs = rest[:n_side]
        seeds = chain._draw_seeds()
        with torch.no_grad():
            y = chain._run_forward(x, side_inputs, seeds)
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
        side_grads: list[Tensor | None] = [None] * len(side_inputs)
        params = ctx.params
        param_grads: dict[int, Tensor] = {}
        G = chain.groups
        devices = [y.device]

        ys = list(y.chunk(G, dim=-1))
        gys = list(grad_y.chunk(G, dim=-1))
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
                    inp = (ys[j - 1] if j > 0 else _sum(xs[1:])).detach().requires_grad_()
                    with torch.enable_grad(), seeded(ctx.seeds[i][j], devices):
                        out = f(inp, *extra)
                    xs[j] = ys[j] - out.detach()  # the inverse: this block's input group
                    wrt = [inp] + [s for _, s in extra_grad] + f_params
                    grads = torch.autograd.grad(out, wrt, gys[j], allow_unused=True)
                    g_inp = grads[0]
                    if g_inp is not None:
                        if j > 0:
                            gys[j - 1] = gys[j - 1] + g_inp
                        else:  # y0 = x2 + ... + xG feeds the first group
                            for k in range(1, G):
                                gys[k] = gys[k] + g_inp
                    for (k, _), g in zip(extra_grad, grads[1:1 + len(extra_grad)]):
                        if g is not None:
                            side_grads[k] = g if side_grads[k] is None else side_grads[k] + g
                    for p, g in zip(f_params, grads[1 + len(extra_grad):]):
                        if g is not None:
                            prior = param_grads.get(id(p))
                            param_grads[id(p)] = g if prior is None else prior + g
                    del out, grads
                ys = xs  # this block's input is the previous block's output
        grad_y = torch.cat(gys, dim=-1)

        return (None, None, grad_y, *side_grads, *[param_grads.get(id(p)) for p in params])
