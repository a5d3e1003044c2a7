r"""A Linear layer that reads a :class:`CompressedActivation` directly.

.. math::
    \mathbf{y}_i = \sum_{c=1}^{G} \sum_{j=1}^{k} v_{i,c,j}\, \mathbf{W}_{:,\, c g + p_{i,c,j}} + \mathbf{b}

which equals ``F.linear(c.to_dense(), weight, bias)``: only the ``G k`` kept values of each row are
multiplied, by the weight columns they select.

How (measured on the shared 2-core CPU, N=65536, D=O=128, k=g/8 so 16 kept values per row,
variants interleaved, median of 5-7; other jobs were running, so read ratios, not milliseconds):

* forward: ``F.embedding_bag(columns, W^T, per_sample_weights=values, mode='sum')``, a fused gather
  of the selected weight columns: about 0.6x the time of densify + ``F.linear`` and of a CSR
  ``torch.sparse`` matmul, so it is used. ``W^T`` must be contiguous (strided: 4x slower).
* backward, input gradient: ``grad_out @ W`` (dense) then a gather at the kept positions; running
  embedding_bag's own backward was 5-10x slower.
* backward, weight gradient: ``grad_out^T @ dense`` on a *temporary* dense reconstruction. It was as
  fast as a COO ``torch.sparse.mm`` and 5-10x faster than CSR/CSC matmuls or a chunked
  ``index_add_``, so the backward densifies transiently (freed on return). What autograd *saves*
  is still only ``values``, ``indices`` (and the weight).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..slicing import slices
from .compressed import CompressedActivation, group_offsets

__all__ = ["compressed_linear"]


_ROW_CHUNK_ELEMENTS = 1 << 20


class _CompressedLinear(torch.autograd.Function):

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, weight: Tensor,  # type: ignore[override]
                bias: Optional[Tensor], group: int) -> Tensor:
        n, num_groups, k = values.shape
        cols = (indices.long() + group_offsets(num_groups, group, indices.device)).view(n, num_groups * k)
        # embedding_bag gathers rows of its table: W^T must be contiguous (a strided table was
        # measured 4x slower); the copy is O x D, small next to N x D.
        out = F.embedding_bag(cols, weight.t().contiguous(),
                              per_sample_weights=values.reshape(n, num_groups * k), mode="sum")
        if bias is not None:
            out.add_(bias)
        ctx.save_for_backward(values, indices, weight)
        ctx.group = group
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        values, indices, weight = ctx.saved_tensors
        n, num_groups, _ = values.shape
        group = ctx.group
        grad_values = grad_weight = grad_bias = None
        idx = indices.long()
        width = num_groups * group
        # In row chunks: the [rows, D] products and reconstructions stay near 2**20 elements
        # instead of a full [N, D] transient each.
        row_slices = list(slices(n, max(width, grad_out.shape[1]), _ROW_CHUNK_ELEMENTS))
        if ctx.needs_input_grad[0]:
            grad_values = values.new_empty(values.shape)
            for rs in row_slices:
                grad_values[rs] = (grad_out[rs] @ weight).view(-1, num_groups, group).gather(-1, idx[rs])
        if ctx.needs_input_grad[2]:
            grad_weight = None
            for rs in row_slices:
                dense = values.new_zeros(rs.stop - rs.start, num_groups, group).scatter_(
                    -1, idx[rs], values[rs]).view(-1, width)
                part = grad_out[rs].t() @ dense
                grad_weight = part if grad_weight is None else grad_weight.add_(part)
                del dense
            if grad_weight is None:
                grad_weight = weight.new_zeros(weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.sum(0)
        return grad_values, None, grad_weight, grad_bias, None


def compressed_linear(c: CompressedActivation, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    r"""``F.linear(c.to_dense(), weight, bias)`` computed from the compressed form.

    .. math::
        \mathbf{y}_i = \sum_{c,j} v_{i,c,j}\, \mathbf{W}_{:,\, c g + p_{i,c,j}} + \mathbf{b}

    Args:
        c: compressed activation ``[N, D]`` (from :func:`group_topk_compress`).
        weight: ``[O, D]``.
        bias: optional ``[O]``.

    Returns:
        ``[N, O]``. Differentiable w.r.t. ``c.values`` (hence the input of the top-k), ``weight``
        and ``bias``; autograd saves only ``c.values``, ``c.indices`` and ``weight``.
    """
    if not isinstance(c, CompressedActivation):
        raise TypeError(f"compressed_linear expects a CompressedActivation, got {type(c).__name__}; "
                        f"use F.linear for dense tensors")
    if weight.dim() != 2 or weight.shape[1] != c.width:
        raise ValueError(f"compressed_linear: weight must be [out_features, {c.width}] to match the "
                         f"compressed width D={c.width}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"compressed_linear: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if weight.dtype != c.dtype or (bias is not None and bias.dtype != c.dtype):
        raise ValueError(f"compressed_linear: weight/bias dtype must match the activation dtype {c.dtype}, "
                         f"got {weight.dtype}" + (f"/{bias.dtype}" if bias is not None else ""))
    values = c.values
    device_type = values.device.type
    if torch.is_autocast_enabled(device_type) and values.is_floating_point():
        # As F.linear under autocast, which has no rule for this op: the product runs in the
        # autocast dtype (the casts are differentiable; gradients come back in each dtype).
        dtype = torch.get_autocast_dtype(device_type)
        values, weight = values.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return _CompressedLinear.apply(values, c.indices, weight, bias, c.group)
