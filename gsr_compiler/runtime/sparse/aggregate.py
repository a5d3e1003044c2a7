r"""Neighbourhood aggregation (the message passing of GCN/SAGE/Graph/GIN convolutions) over a
:class:`CompressedActivation`.

With :math:`\mathbf{X} = \texttt{c.to\_dense()}`, edges :math:`j \to i` given as
``edge_index = [source, target]`` (PyG's ``flow='source_to_target'``) and optional edge weights
:math:`e_{j,i}` (1 when absent):

.. math::
    \mathbf{x}'_i = \bigoplus_{j \in \mathcal{N}(i)} e_{j,i} \cdot \mathbf{x}_j,
    \qquad \bigoplus \in \{\textstyle\sum,\ \mathrm{mean},\ \max\}

(``mean`` divides the weighted sum by the number of incoming edges, as PyG's mean aggregation does;
``max`` is taken elementwise and a node without incoming edges gets zeros). What each PyG layer
needs, with ``lin`` applied densely to the aggregated result:

* ``GCNConv``:  ``sum`` with ``gcn_norm``'s self-looped edges and weights, then ``lin`` and bias
  (:math:`\hat{\mathbf{A}}\mathbf{X}\mathbf{W} = (\hat{\mathbf{A}}\mathbf{X})\mathbf{W}`).
* ``SAGEConv``: ``mean``, then ``lin_l``; the root term ``lin_r(x)`` is :func:`compressed_linear`.
* ``GraphConv``: ``sum`` / ``mean`` / ``max`` with ``edge_weight``, then ``lin_rel``; root via
  :func:`compressed_linear`.
* ``GINConv``: ``sum``, plus :math:`(1+\epsilon)\,\mathbf{x}_i` from ``c.to_dense()``, then ``nn``.

Only the kept values travel along the edges: for every edge, the ``G k`` values of its source row
are scaled and added at ``target * D + column`` (one flat ``index_add_``; deterministic on CPU), i.e.
``E * G * k`` work instead of ``E * D``. The backward gathers the output gradient at the same
positions, so the values' gradient exists at kept positions only. Autograd saves ``values``,
``indices``, ``edge_index`` and ``edge_weight``; the flat positions are rebuilt in the backward, and
``max`` recomputes its forward there rather than saving the dense output.

When ``backend`` resolves to Triton, ``sum`` and ``mean`` run as the kernel
:func:`gsr_compiler.runtime.kernels.sparse_aggregate` instead: the edges sorted by target (CSR,
stable, so each target's edges keep their order), one program per target row summing its
incoming messages in registers, no atomics; ``mean`` folds ``1/deg(i)`` into the edge weights.
It needs edge weights that take no gradient, float32/float16/bfloat16 values (it accumulates
in float32) and ``g`` a power of two up to 256; anything else (and ``max``) takes the torch path.
Results equal the torch path to float tolerance, not bit for bit: the kernel's backward sums
each source's gradient in target order where ``index_add_`` goes in edge order (and on CUDA
``index_add_`` is not even deterministic).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from ..first_order import first_order_only
from ..kernels import (KERNEL_DTYPES, check_backend, csr_from_edge_index, kernel_covers_group,
                       sparse_aggregate, use_triton)
from ..slicing import slices
from .compressed import CompressedActivation, group_offsets

__all__ = ["compressed_aggregate", "dense_propagate"]

_REDUCES = {"sum": "sum", "add": "sum", "mean": "mean", "max": "max"}

# Edges handled per step, chosen so a step's [edges, G*k] temporaries stay near 2**22 elements.
_CHUNK_ELEMENTS = 1 << 22
# The same for dense_propagate's [edges, D] messages, which it exists to keep small.
_DENSE_CHUNK_ELEMENTS = 1 << 20


def _edge_chunks(num_edges: int, nnz: int, budget: Optional[int] = None) -> Iterator[slice]:
    """Slices of at most ``budget`` (default :data:`_CHUNK_ELEMENTS`) ``/ nnz`` edges."""
    return slices(num_edges, nnz, budget or _CHUNK_ELEMENTS)


class _CompressedAggregate(torch.autograd.Function):

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, src: Tensor, dst: Tensor,  # type: ignore[override]
                edge_weight: Optional[Tensor], num_nodes: int, reduce: str, group: int) -> Tensor:
        n_src, num_groups, k = values.shape
        width = num_groups * group
        cols = (indices.long() + group_offsets(num_groups, group, indices.device)).view(n_src, -1)
        vals = values.reshape(n_src, -1)
        scale = _edge_scale(edge_weight, dst, num_nodes, reduce, vals)
        out = _aggregate(vals, cols, src, dst, scale, num_nodes, width, reduce)
        ctx.save_for_backward(values, indices, src, dst, edge_weight)
        ctx.num_nodes, ctx.reduce, ctx.group = num_nodes, reduce, group
        return out.view(num_nodes, width)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        values, indices, src, dst, edge_weight = ctx.saved_tensors
        num_nodes, reduce, group = ctx.num_nodes, ctx.reduce, ctx.group
        n_src, num_groups, k = values.shape
        width = num_groups * group
        cols = (indices.long() + group_offsets(num_groups, group, indices.device)).view(n_src, -1)
        vals = values.reshape(n_src, -1)
        scale = _edge_scale(edge_weight, dst, num_nodes, reduce, vals)
        go = grad_out.contiguous().view(-1)
        need_v, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[4]

        if reduce == "max":
            out, implicit = _aggregate_max(vals, cols, src, dst, scale, num_nodes, width)
            ties = _max_tie_counts(vals, cols, src, dst, scale, width, out, implicit)
            # dL/dm for each (edge, kept value): the output gradient split evenly over the
            # messages equal to the max (as torch.scatter_reduce 'amax' does).
            go = go / ties

        grad_vals = torch.zeros_like(vals) if need_v else None
        grad_scale = torch.empty_like(scale) if (need_w and scale is not None) else None
        for sl in _edge_chunks(src.numel(), vals.shape[1]):
            s, d = src[sl], dst[sl]
            pos = _flat_positions(cols, s, d, width)
            g = go.take(pos)                                  # [E_c, G*k]
            if reduce == "max":
                g = g * (_messages(vals, s, scale, sl) == out.take(pos))
            if need_v:
                grad_vals.index_add_(0, s, g if scale is None else g * scale[sl].unsqueeze(1))
            if grad_scale is not None:
                grad_scale[sl] = (g * vals.index_select(0, s)).sum(1)

        grad_weight = None
        if grad_scale is not None:
            grad_weight = grad_scale
            if reduce == "mean":
                grad_weight = grad_scale * _inv_in_degree(dst, num_nodes, vals)[dst]
        grad_values = grad_vals.view(values.shape) if need_v else None
        return grad_values, None, None, None, grad_weight, None, None, None


class _DensePropagate(torch.autograd.Function):
    """``out[dst] += w * x[src]`` (then ``/ deg`` for mean), in edge chunks; saves the indices."""

    @staticmethod
    def forward(ctx, x: Tensor, src: Tensor, dst: Tensor, edge_weight: Optional[Tensor],
                mean: bool) -> Tensor:
        n, d = x.shape
        out = x.new_zeros(n, d)
        for sl in _edge_chunks(src.numel(), d, _DENSE_CHUNK_ELEMENTS):
            msg = x.index_select(0, src[sl])
            if edge_weight is not None:
                msg.mul_(edge_weight[sl].view(-1, 1))
            out.scatter_add_(0, dst[sl].view(-1, 1).expand_as(msg), msg)
            del msg
        deg = None
        if mean:
            deg = torch.bincount(dst, minlength=n).clamp_(min=1).to(x.dtype)
            out.div_(deg.view(-1, 1))
        ctx.save_for_backward(src, dst, edge_weight, deg)
        return out

    @staticmethod
    @first_order_only("the compressed aggregation")
    def backward(ctx, grad_out: Tensor):
        src, dst, edge_weight, deg = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        grad_x = grad_out.new_zeros(grad_out.shape)
        for sl in _edge_chunks(src.numel(), grad_out.shape[1], _DENSE_CHUNK_ELEMENTS):
            d = dst[sl]
            g = grad_out.index_select(0, d)
            if deg is not None:
                g.div_(deg.index_select(0, d).view(-1, 1))
            if edge_weight is not None:
                g.mul_(edge_weight[sl].view(-1, 1))
            grad_x.index_add_(0, src[sl], g)
            del g
        return grad_x, None, None, None, None


def dense_propagate(x: Tensor, src: Tensor, dst: Tensor, edge_weight: Optional[Tensor],
                    mean: bool) -> Tensor:
    """``sum``/``mean`` of ``edge_weight * x[src]`` at ``dst`` for a *dense* ``x`` (the output of
    a compressed layer's linear map), in edge chunks: no ``[E, D]`` tensor is formed, and
    autograd keeps the edge indices (and degrees), not ``x``. ``edge_weight`` takes no gradient."""
    return _DensePropagate.apply(x, src, dst, edge_weight, mean)


def _flat_positions(cols: Tensor, s: Tensor, d: Tensor, width: int) -> Tensor:
    """``[E_c, G*k]`` positions ``target * D + column`` in the flat output, for the edges ``s -> d``."""
    return cols.index_select(0, s).add_(d.unsqueeze(1) * width)


def _messages(vals: Tensor, s: Tensor, scale: Optional[Tensor], sl: slice) -> Tensor:
    msg = vals.index_select(0, s)
    return msg if scale is None else msg.mul_(scale[sl].unsqueeze(1))


def _inv_in_degree(dst: Tensor, num_nodes: int, like: Tensor) -> Tensor:
    deg = torch.bincount(dst, minlength=num_nodes).to(like.dtype)
    return 1.0 / deg.clamp(min=1)


def _edge_scale(edge_weight: Optional[Tensor], dst: Tensor, num_nodes: int, reduce: str,
                like: Tensor) -> Optional[Tensor]:
    """Per-edge factor multiplying the source values: ``e_ji`` (times ``1/deg(i)`` for mean)."""
    if reduce != "mean":
        return edge_weight
    inv_deg = _inv_in_degree(dst, num_nodes, like)[dst]
    return inv_deg if edge_weight is None else edge_weight * inv_deg


def _aggregate(vals: Tensor, cols: Tensor, src: Tensor, dst: Tensor, scale: Optional[Tensor],
               num_nodes: int, width: int, reduce: str) -> Tensor:
    """Flat ``[num_nodes * width]`` aggregation of the kept values along the edges."""
    if reduce == "max":
        return _aggregate_max(vals, cols, src, dst, scale, num_nodes, width)[0]
    out = vals.new_zeros(num_nodes * width)
    for sl in _edge_chunks(src.numel(), vals.shape[1]):
        s, d = src[sl], dst[sl]
        out.index_add_(0, _flat_positions(cols, s, d, width).view(-1),
                       _messages(vals, s, scale, sl).view(-1))
    return out


def _aggregate_max(vals: Tensor, cols: Tensor, src: Tensor, dst: Tensor, scale: Optional[Tensor],
                   num_nodes: int, width: int) -> Tuple[Tensor, Tensor]:
    """Flat max aggregation, and per output position the number of implicit 0 messages (from
    in-neighbours that did not keep that channel)."""
    out = vals.new_full((num_nodes * width,), float("-inf"))
    kept = torch.zeros_like(out)
    for sl in _edge_chunks(src.numel(), vals.shape[1]):
        s, d = src[sl], dst[sl]
        pos = _flat_positions(cols, s, d, width).view(-1)
        out.scatter_reduce_(0, pos, _messages(vals, s, scale, sl).view(-1), reduce="amax",
                            include_self=True)
        kept.index_add_(0, pos, torch.ones_like(pos, dtype=out.dtype))
    deg = torch.bincount(dst, minlength=num_nodes).to(out.dtype)
    implicit = (deg.unsqueeze(1) - kept.view(num_nodes, width)).view(-1)
    out = torch.where(implicit > 0, out.clamp(min=0), out)
    out = torch.where(torch.isneginf(out), torch.zeros_like(out), out)   # no in-edges: 0
    return out, implicit


def _max_tie_counts(vals: Tensor, cols: Tensor, src: Tensor, dst: Tensor, scale: Optional[Tensor],
                    width: int, out: Tensor, implicit: Tensor) -> Tensor:
    """How many messages (kept or implicit zeros) equal the max at each output position (>= 1)."""
    ties = torch.zeros_like(out)
    for sl in _edge_chunks(src.numel(), vals.shape[1]):
        s, d = src[sl], dst[sl]
        pos = _flat_positions(cols, s, d, width)
        msg = _messages(vals, s, scale, sl)
        ties.index_add_(0, pos.view(-1), (msg == out.take(pos)).to(out.dtype).view(-1))
    ties += torch.where(out == 0, implicit, torch.zeros_like(out))
    return ties.clamp_(min=1)


def _kernel_covers(c: CompressedActivation, reduce: str, edge_weight: Optional[Tensor]) -> bool:
    # Edge weights are constants to the kernel; one that needs a gradient takes the torch path
    # in the no-grad forward too, so the reversible recompute reproduces that forward exactly.
    return (reduce in ("sum", "mean") and c.dtype in KERNEL_DTYPES
            and kernel_covers_group(c.group)
            and (edge_weight is None or not edge_weight.requires_grad))


def _kernel_aggregate(c: CompressedActivation, src: Tensor, dst: Tensor,
                      edge_weight: Optional[Tensor], num_nodes: int, reduce: str) -> Tensor:
    scale = _edge_scale(edge_weight, dst, num_nodes, reduce, c.values)
    csr = csr_from_edge_index(torch.stack([src, dst]), c.num_nodes, scale, num_dst=num_nodes)
    return sparse_aggregate(c.values, c.indices, csr, c.group, backend="triton")


def compressed_aggregate(c: CompressedActivation, edge_index: Tensor, num_nodes: int,
                         reduce: str = "sum", edge_weight: Optional[Tensor] = None,
                         backend: str = "auto") -> Tensor:
    r"""Aggregate neighbour features given in compressed form.

    .. math::
        \mathbf{x}'_i = \bigoplus_{j \in \mathcal{N}(i)} e_{j,i} \cdot \mathbf{x}_j

    with :math:`\mathbf{X} = \texttt{c.to\_dense()}`, :math:`\bigoplus` = ``reduce`` and
    :math:`e_{j,i}` = ``edge_weight`` (1 if ``None``). Equals PyG's
    ``scatter(edge_weight.view(-1, 1) * x[edge_index[0]], edge_index[1], 0, num_nodes, reduce)``
    for ``x = c.to_dense()``, without ever forming ``x``.

    Args:
        c: compressed source-node features (``c.num_nodes`` rows).
        edge_index: ``[2, E]`` int64, row 0 sources (rows of ``c``), row 1 targets (``< num_nodes``).
        num_nodes: number of output rows.
        reduce: ``"sum"`` (alias ``"add"``), ``"mean"`` (divides by the in-degree) or ``"max"``
            (elementwise; zeros for nodes without incoming edges; ties share the gradient evenly).
        edge_weight: optional ``[E]`` weights; differentiable.
        backend: ``"auto"`` (the Triton kernel on CUDA tensors when triton is importable),
            ``"torch"`` or ``"triton"``; see the module docstring for what the kernel covers.

    Returns:
        ``[num_nodes, D]`` dense tensor. Differentiable w.r.t. ``c.values`` (gradient at kept
        positions only) and ``edge_weight``.
    """
    if not isinstance(c, CompressedActivation):
        raise TypeError(f"compressed_aggregate expects a CompressedActivation, got {type(c).__name__}")
    if reduce not in _REDUCES:
        raise ValueError(f"compressed_aggregate: reduce must be one of {sorted(_REDUCES)}, got {reduce!r}")
    check_backend(backend)
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"compressed_aggregate expects edge_index as a [2, E] tensor, got "
                        f"{type(edge_index).__name__}; convert a SparseTensor/adjacency first")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2 or edge_index.is_floating_point():
        raise ValueError(f"compressed_aggregate: edge_index must be an integer [2, E] tensor, got "
                         f"{edge_index.dtype} of shape {tuple(edge_index.shape)}")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 0:
        raise ValueError(f"compressed_aggregate: num_nodes must be a non-negative int, got {num_nodes!r}")
    num_edges = edge_index.shape[1]
    if edge_weight is not None:
        if edge_weight.shape != (num_edges,):
            raise ValueError(f"compressed_aggregate: edge_weight must be [E]=[{num_edges}], got "
                             f"{tuple(edge_weight.shape)}")
        if edge_weight.dtype != c.dtype:
            raise ValueError(f"compressed_aggregate: edge_weight dtype {edge_weight.dtype} must match "
                             f"the activation dtype {c.dtype}")
    src, dst = edge_index[0].long(), edge_index[1].long()
    if num_edges > 0:
        lo, hi = (int(v) for v in torch.aminmax(src))
        if lo < 0 or hi >= c.num_nodes:
            raise ValueError(f"compressed_aggregate: source indices must lie in [0, {c.num_nodes}) "
                             f"(rows of the compressed input), got [{lo}, {hi}]")
        lo, hi = (int(v) for v in torch.aminmax(dst))
        if lo < 0 or hi >= num_nodes:
            raise ValueError(f"compressed_aggregate: target indices must lie in [0, {num_nodes}) "
                             f"(num_nodes), got [{lo}, {hi}]")
    reduce = _REDUCES[reduce]
    if _kernel_covers(c, reduce, edge_weight) and use_triton(backend, c.values, edge_index):
        return _kernel_aggregate(c, src, dst, edge_weight, num_nodes, reduce)
    return _CompressedAggregate.apply(c.values, c.indices, src, dst, edge_weight, num_nodes,
                                      reduce, c.group)
