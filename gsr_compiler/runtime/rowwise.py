"""Row-wise layers run in row chunks and recomputed in backward, keeping only their input.

A model head such as ``decoder(relu(norm(h)))`` after a reversible chain works row by row:
row ``i`` of its output depends on row ``i`` of ``h`` alone. Run as usual, autograd keeps its
intermediates (the normalized and the rectified ``[N, D]`` tensors) and its backward holds
several ``[N, D]`` gradients at once: on a deep GNN whose chain keeps almost nothing, that is
the step's peak. :class:`RowwiseRecompute` runs such layers over blocks of rows, keeps only
their input for backward (the chain output, which the chain keeps anyway) and in backward
recomputes each block of rows with grad and differentiates it there, so that no ``[N, D]``
intermediate or gradient other than the input's exists at any time.

The layers are passed in at call time (the compiled graph reads them with ``get_attr``), so
they stay where the user's model put them: same objects, same ``state_dict`` keys.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .autocast_state import capture_autocast, restored_autocast
from .first_order import first_order_only
from .slicing import slices

__all__ = ["RowwiseRecompute", "RowwiseStep"]

# Rows per block: the block's [rows, D] tensors stay near 2**20 elements each.
_CHUNK_ELEMENTS = 1 << 20


class RowwiseStep:
    """One layer of the row-wise run: ``kind`` is ``"module"`` (the ``index``-th layer passed
    to the call), ``"function"`` (``target`` a callable) or ``"method"`` (``target`` a tensor
    method name); ``args`` and ``kwargs`` follow the tensor argument and hold no tensors."""

    __slots__ = ("kind", "target", "index", "args", "kwargs")

    def __init__(self, kind: str, target=None, index: int = -1, args: tuple = (),
                 kwargs: dict | None = None) -> None:
        if kind not in ("module", "function", "method"):
            raise ValueError(f"unknown step kind {kind!r}")
        self.kind, self.target, self.index = kind, target, index
        self.args, self.kwargs = tuple(args), dict(kwargs or {})

    def __call__(self, h: Tensor, layers: Sequence[nn.Module]) -> Tensor:
        if self.kind == "module":
            return layers[self.index](h, *self.args, **self.kwargs)
        if self.kind == "function":
            return self.target(h, *self.args, **self.kwargs)
        return getattr(h, self.target)(*self.args, **self.kwargs)

    def describe(self, names: Sequence[str]) -> str:
        if self.kind == "module":
            return names[self.index]
        if self.kind == "function":
            return getattr(self.target, "__name__", str(self.target))
        return f".{self.target}()"


class RowwiseRecompute(nn.Module):
    """Runs ``steps`` over the rows of its input in blocks; keeps only the input for backward.

    Called as ``module(x, *layers)``, ``layers`` being the modules the ``"module"`` steps use.
    Every step must be row-wise along dim 0 for inputs of at least ``min_ndim`` dimensions; an
    input with fewer runs whole (the same function, without blocks).

    Args:
        steps: the layers in the order they run.
        names: a name for each layer passed in (for ``extra_repr`` and ``explain()``).
        min_ndim: the fewest input dimensions for which dim 0 indexes independent rows.
    """

    def __init__(self, steps: Sequence[RowwiseStep], names: Sequence[str], min_ndim: int = 2
                 ) -> None:
        super().__init__()
        if len(steps) == 0:
            raise ValueError("a row-wise recompute needs at least one step")
        self.steps = list(steps)
        self.names = list(names)
        self.min_ndim = int(min_ndim)

    def extra_repr(self) -> str:
        return " -> ".join(s.describe(self.names) for s in self.steps)

    def forward(self, x: Tensor, *layers: nn.Module) -> Tensor:
        if len(layers) != len(self.names):
            raise ValueError(f"expected {len(self.names)} layer(s) ({', '.join(self.names)}), "
                             f"got {len(layers)}")
        run = _Run(self.steps, layers)
        if x.dim() < self.min_ndim:
            return run(x)
        # Once each: a Function handed one tensor twice would get its gradient twice.
        params = list({id(p): p for layer in layers for p in layer.parameters()}.values())
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return _RowwiseRecomputeFunction.apply(run, x, *params)
        return _forward_in_chunks(run, x)


class _Run:
    """The steps bound to this call's layers: ``h -> h`` for one block of rows."""

    def __init__(self, steps: Sequence[RowwiseStep], layers: Sequence[nn.Module]) -> None:
        self.steps, self.layers = steps, layers

    def __call__(self, h: Tensor) -> Tensor:
        for step in self.steps:
            h = step(h, self.layers)
        return h


def _row_chunks(x: Tensor) -> Iterator[slice]:
    if x.shape[0] == 0:
        return iter([slice(0, 0)])  # one empty block gives the output its shape and dtype
    return slices(x.shape[0], x[0].numel(), _CHUNK_ELEMENTS)


def _forward_in_chunks(run: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    out = None
    for rows in _row_chunks(x):
        part = run(x[rows])
        if out is None:
            out = part.new_empty((x.shape[0], *part.shape[1:]))
        out[rows] = part
    return out


class _RowwiseRecomputeFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, run: _Run, x: Tensor, *params: Tensor) -> Tensor:
        with torch.no_grad():
            out = _forward_in_chunks(run, x)
        ctx.run = run
        ctx.params = params
        ctx.autocast = capture_autocast(x.device)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    @first_order_only("the recomputed row-wise head")
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        needs_x = ctx.needs_input_grad[1]
        wanted = [p for p, needs in zip(ctx.params, ctx.needs_input_grad[2:]) if needs]
        grad_x = torch.empty_like(x) if needs_x else None
        param_grads: list[Tensor | None] = [None] * len(wanted)
        for rows in _row_chunks(x):
            xs = x[rows].detach().requires_grad_(needs_x)
            with torch.enable_grad(), restored_autocast(ctx.autocast):
                out = ctx.run(xs)
            wrt = ([xs] if needs_x else []) + wanted
            grads = torch.autograd.grad(out, wrt, grad_out[rows].to(out.dtype),
                                        allow_unused=True)
            if needs_x:
                grad_x[rows] = grads[0] if grads[0] is not None else 0
                grads = grads[1:]
            for i, g in enumerate(grads):
                if g is not None:
                    param_grads[i] = g if param_grads[i] is None else param_grads[i].add_(g)
            del out, grads
        by_param = iter(param_grads)
        result = [next(by_param) if needs else None
                  for needs in ctx.needs_input_grad[2:]]
        return (None, grad_x, *result)
