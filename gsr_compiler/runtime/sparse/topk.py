r"""Group-wise top-k: the sparse nonlinearity of GSR blocks (MaxK-style, replaces ReLU).

For node features :math:`\mathbf{X} \in \mathbb{R}^{N \times D}` split into :math:`G = D / g`
channel groups of width :math:`g`, and :math:`\mathcal{K}_{i,c}` the positions of the :math:`k`
largest entries of row :math:`i` inside group :math:`c`:

.. math::
    \mathrm{topk}(\mathbf{X})_{i,\, cg + p} =
    \begin{cases} x_{i,\, cg + p} & p \in \mathcal{K}_{i,c} \\ 0 & \text{otherwise} \end{cases}

and its exact gradient is
:math:`\partial L / \partial x_{i,cg+p} = [p \in \mathcal{K}_{i,c}]\; \partial L / \partial y_{i,cg+p}`.

Ties are broken towards the lower position: among equal values the one with the smaller index is
kept (the order of a stable descending sort). ``-0.0`` and ``0.0`` are equal; NaN counts as larger
than every number.

What autograd keeps for the backward is only the ``uint8`` (``g <= 256``) positions of the kept
values, never a dense tensor or a dense mask.

On CPU, float32 selections run in native code (:mod:`gsr_compiler.runtime.native`, compiled on
first use; ``torch.topk`` spends most of its time per row on rows this short). It keeps the same
set as :func:`select_group_topk`, which runs where there is no C++ compiler or ``GSR_NATIVE=0``.

:func:`group_topk_compress` runs as the Triton kernel
:func:`gsr_compiler.runtime.kernels.group_topk` (without its LayerNorm) when
``backend`` resolves to Triton and the kernel covers the input: float32/float16/bfloat16 and ``g``
a power of two up to 256. The kernel keeps the same set (lower position among equals, NaN first)
and copies the same values, so both paths give equal results.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..choices import SelectionReplay, selection_margin

from ..kernels import KERNEL_DTYPES, check_backend, kernel_covers_group, use_triton
from ..kernels import group_topk as fused_group_topk
from ..native import native_group_topk, native_topk_covers
from .compressed import (CompressedActivation, check_k_and_group, check_topk_input,
                         index_dtype_for_group)
from .kept_dropout import check_dropout_p, drop_kept_values, kernel_dropout_args

__all__ = ["group_topk", "group_topk_compress", "GroupTopK", "select_group_topk"]


def select_group_topk(xg: Tensor, k: int, following: bool = False
                      ) -> Tensor | tuple[Tensor, Tensor]:
    """Positions (int64, ascending) of the ``k`` largest values along the last dim of ``xg``.

    ``xg`` is ``[N, G, g]``; the result is ``[N, G, k]``. Ties go to the lower position. With
    ``following``, also the largest value not kept, ``[N, G]`` (``-inf`` where ``k == g``).

    ``torch.topk`` is about 3x faster than a full stable sort here, but its order among equal values
    is unspecified. So: take the ``k + 1`` largest (unsorted, cheaper than sorted) and drop the
    smallest of them, the ``(k+1)``-th largest. Where it is strictly below the other ``k`` the kept
    *set* is unique and topk's indices are right whatever its tie order; only the (rare)
    ``(node, group)`` pairs with a tie at the boundary are redone with a stable sort.
    """
    g = xg.shape[-1]
    if k == g:
        idx = torch.arange(g, device=xg.device).expand(xg.shape).contiguous()
        return (idx, xg.new_full(xg.shape[:-1], -math.inf)) if following else idx
    if k == 1 and not following:
        # torch.max(dim) documents that it returns the first maximal index.
        return xg.max(dim=-1, keepdim=True).indices
    top_vals, top_idx = torch.topk(xg, k + 1, dim=-1, largest=True, sorted=False)
    lowest, lowest_at = top_vals.min(dim=-1, keepdim=True)
    # Exactly one of the k + 1 equals their minimum, unless there is a tie at the boundary; a
    # NaN minimum equals nothing and so takes the exact path too.
    ambiguous = (top_vals == lowest).sum(dim=-1) != 1
    # The dropped position sorts last (g is past every position), the kept k first.
    idx = top_idx.scatter(-1, lowest_at, g).sort(dim=-1).values[..., :k]
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero(as_tuple=True)
        order = torch.sort(xg[rows], dim=-1, descending=True, stable=True).indices
        idx[rows] = order[..., :k].sort(dim=-1).values
    # The (k+1)-th largest is the smallest of the k + 1, the one dropped (a tie changes only
    # which position it sits at, not its value; a NaN there makes the margin NaN: recorded).
    return (idx, lowest.squeeze(-1)) if following else idx


def _select(xg: Tensor, k: int, following: bool = False
            ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Positions (int64, ascending) and values of the ``k`` largest of each ``xg[..., :]``, and
    with ``following`` the largest value not kept: the native CPU selection where it runs (same
    set, several times faster than ``torch.topk`` on short rows), else :func:`select_group_topk`."""
    if 1 < k < xg.shape[-1] and native_topk_covers(xg):
        if following:
            return native_group_topk(xg, k, following=True)
        return (*native_group_topk(xg, k), None)
    if following:
        idx, nxt = select_group_topk(xg, k, following=True)
        return idx, xg.gather(-1, idx), nxt
    idx = select_group_topk(xg, k)
    return idx, xg.gather(-1, idx), None


def select_replayed(xg: Tensor, k: int, row_start: int = 0,
                    replay: SelectionReplay | None = None) -> tuple[Tensor, Tensor]:
    """:func:`_select` inside a reversible branch: records or replays the selection of the
    ``(row, group)`` pairs whose margin is small (:mod:`~gsr_compiler.runtime.choices`).
    ``replay`` is the op's :class:`SelectionReplay` (rows from ``row_start``), or None."""
    if replay is None:
        idx, values, _ = _select(xg, k)
        return idx, values
    idx, values, nxt = _select(xg, k, following=True)
    flat = xg.reshape(-1, xg.shape[-1])
    return replay.apply(idx, values, selection_margin(values, nxt),
                        lambda pairs, positions: flat[pairs].gather(-1, positions), row_start)


def _grouped(x: Tensor, group: int) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1] // group, group)


class _GroupTopK(torch.autograd.Function):
    """Dense in, dense out; saves only the compressed indices."""

    @staticmethod
    def forward(ctx, x: Tensor, k: int, group: int) -> Tensor:  # type: ignore[override]
        xg = _grouped(x, group)
        replay = SelectionReplay.begin(tuple(xg.shape), k)
        idx, values = select_replayed(xg, k, replay=replay)
        if replay is not None:
            replay.close()
        out = torch.zeros_like(xg).scatter_(-1, idx.long(), values)
        ctx.save_for_backward(idx.to(index_dtype_for_group(group)))
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        idx = indices.long()
        grad_g = grad_out.reshape(idx.shape[0], idx.shape[1], -1)
        grad_x = torch.zeros_like(grad_g).scatter_(-1, idx, grad_g.gather(-1, idx))
        return grad_x.view(grad_out.shape), None, None


class _GroupTopKCompress(torch.autograd.Function):
    """Dense in, ``(values, indices)`` out; saves only the indices."""

    @staticmethod
    def forward(ctx, x: Tensor, k: int, group: int):  # type: ignore[override]
        xg = _grouped(x, group)
        replay = SelectionReplay.begin(tuple(xg.shape), k)
        idx, values = select_replayed(xg, k, replay=replay)
        if replay is not None:
            replay.close()
        indices = idx.to(index_dtype_for_group(group))
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.x_shape = x.shape
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: Tensor, _grad_indices):  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        n, num_groups, _ = indices.shape
        grad_x = grad_values.new_zeros(n, num_groups, ctx.x_shape[1] // num_groups)
        grad_x.scatter_(-1, indices.long(), grad_values)
        return grad_x.view(ctx.x_shape), None, None


def group_topk(x: Tensor, k: int, group: int) -> Tensor:
    r"""Keep the ``k`` largest values of each row within each channel group of width ``group``.

    .. math::
        \mathbf{Y}_{i,\, cg+p} = x_{i,\, cg+p}\,[p \in \mathcal{K}_{i,c}]

    where :math:`\mathcal{K}_{i,c}` are the positions of the ``k`` largest entries of row ``i`` in
    group ``c`` (ties to the lower position). Gradient flows through the kept positions only.

    Args:
        x: node features ``[N, D]``, floating point, ``D`` a multiple of ``group``.
        k: values kept per node and group, ``1 <= k <= group``.
        group: channel-group width ``g``.

    Returns:
        ``[N, D]`` tensor, zeros except the kept values. Autograd saves only ``[N, D/g, k]`` indices
        (``uint8`` for ``g <= 256``).

    Raises:
        ValueError: bad ``k``/``group``, ``group`` not dividing ``D``, ``x`` not 2-d or not float;
            checked before any computation.
    """
    check_topk_input(x, k, group, op="group_topk")
    return _GroupTopK.apply(x, int(k), int(group))


def _kernel_covers(x: Tensor, group: int) -> bool:
    return x.dtype in KERNEL_DTYPES and kernel_covers_group(group)


def group_topk_compress(x: Tensor, k: int, group: int, backend: str = "auto", *,
                        dropout_p: float = 0.0) -> CompressedActivation:
    r"""Group-wise top-k of ``x`` (as :func:`group_topk`), returned in compressed form.

    Returns a :class:`CompressedActivation` with ``values[i, c, j] = x[i, c*g + indices[i, c, j]]``,
    ``indices`` ascending within each ``(i, c)``. ``values`` is differentiable w.r.t. ``x`` (the
    gradient lands on the kept positions); autograd saves only ``indices``.
    Consumers (:func:`compressed_linear`, :func:`compressed_aggregate`) take it directly.

    ``backend``: ``"auto"`` (the Triton kernel on CUDA tensors when triton is importable),
    ``"torch"`` or ``"triton"``; inputs the kernel does not cover (float64, ``g`` not a power
    of two or above 256) take the torch path under any backend.

    ``dropout_p``: drop kept values with this probability, scaling the rest by ``1 / (1 - p)``
    (training-mode dropout; pass 0 in eval mode). The kernel drops them as it writes them
    (see :mod:`.kept_dropout`).

    Raises:
        ValueError: as :func:`group_topk`, an unknown ``backend`` or ``dropout_p`` outside
            ``[0, 1]``, before any computation.
    """
    check_topk_input(x, k, group, op="group_topk_compress")
    check_backend(backend)
    dropout_p = check_dropout_p(dropout_p, "group_topk_compress")
    in_kernel = _kernel_covers(x, int(group)) and use_triton(backend, x)
    if in_kernel:
        values, indices = fused_group_topk(x, int(k), int(group), backend="triton",
                                           **kernel_dropout_args(dropout_p))
    else:
        values, indices = _GroupTopKCompress.apply(x, int(k), int(group))
    values = drop_kept_values(values, dropout_p, in_kernel)
    return CompressedActivation(values=values, indices=indices, width=x.shape[1], group=int(group))


class GroupTopK(nn.Module):
    r"""Module form of :func:`group_topk`: keeps the ``k`` largest values per node and group of
    ``group`` channels and zeros the rest (a drop-in replacement for ``nn.ReLU`` inside a block).

    Args:
        k: values kept per node and group (``1 <= k <= group``).
        group: channel-group width ``g``; must divide the feature width seen in ``forward``.

    Shape:
        - input: ``[N, D]`` with ``D % group == 0``
        - output: ``[N, D]``
    """

    def __init__(self, k: int, group: int) -> None:
        super().__init__()
        check_k_and_group(k, group)
        self.k = int(k)
        self.group = int(group)

    def forward(self, x: Tensor) -> Tensor:
        return group_topk(x, self.k, self.group)

    def extra_repr(self) -> str:
        return f"k={self.k}, group={self.group}"
