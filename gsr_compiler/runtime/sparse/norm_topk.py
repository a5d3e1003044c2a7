r"""LayerNorm and the group top-k in one op: the normalized ``[N, D]`` tensor is never formed.

A pre-norm branch starts ``topk(LayerNorm(x))``. Run as two ops, the LayerNorm writes an
``[N, D]`` output that only the top-k reads, and in backward the top-k scatters its gradient
into a dense ``[N, D]`` that only the LayerNorm backward reads; during a reversible block's
recompute those two sit beside the branch output and the input gradient at the step's peak.

:func:`layer_norm_group_topk_compress` does both over blocks of rows: per block, normalize,
select, keep the ``k`` values and their positions; in backward, per block, scatter the gradient
of the kept values and run the LayerNorm backward on it. Autograd keeps ``x`` (which the
LayerNorm kept anyway), two floats per row (mean and reciprocal deviation) and the indices.
The values, the kept set and the input gradient equal the two ops run whole bit for bit on
CPU (both are row-wise); the affine gradients sum over blocks, so they agree to rounding.

On CUDA, ``backend="auto"`` runs the fused Triton kernel (``kernels.topk.group_topk`` with
``layer_norm=True``) where it covers the group width and dtype: the whole fused block entry,
LayerNorm, top-k and the dropout of the kept values (:mod:`.kept_dropout`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..first_order import first_order_only
from ..kernels import check_backend, use_triton
from ..kernels import group_topk as fused_group_topk
from ..slicing import slices
from .compressed import CompressedActivation, check_topk_input, index_dtype_for_group
from .kept_dropout import check_dropout_p, drop_kept_values, kernel_dropout_args
from .modules import GroupTopKCompress, share_state
from ..choices import SelectionReplay
from .topk import _grouped, _kernel_covers, select_replayed

__all__ = ["LayerNormGroupTopKCompress", "layer_norm_group_topk_compress"]

# Rows per block: a block's [rows, D] temporaries stay near 2**20 elements.
_BLOCK_ELEMENTS = 1 << 20


class _LayerNormGroupTopK(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],  # type: ignore[override]
                eps: float, k: int, group: int):
        n, d = x.shape
        values = x.new_empty(n, d // group, k)
        indices = torch.empty(n, d // group, k, dtype=index_dtype_for_group(group),
                              device=x.device)
        means, rstds = [], []
        replay = SelectionReplay.begin((n, d // group, group), k)
        for rows in slices(n, d, _BLOCK_ELEMENTS):
            h, mean, rstd = torch.native_layer_norm(x[rows], (d,), weight, bias, eps)
            idx, kept = select_replayed(_grouped(h, group), k, rows.start or 0, replay)
            values[rows] = kept
            indices[rows] = idx
            means.append(mean)
            rstds.append(rstd)
            del h
        if replay is not None:
            replay.close()
        mean = torch.cat(means) if means else x.new_empty(0, 1)
        rstd = torch.cat(rstds) if rstds else x.new_empty(0, 1)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(x, weight, bias, mean, rstd, indices)
        ctx.group = group
        return values, indices

    @staticmethod
    @first_order_only("the fused LayerNorm + group top-k")
    def backward(ctx, grad_values: Tensor, _grad_indices):  # type: ignore[override]
        x, weight, bias, mean, rstd, indices = ctx.saved_tensors
        n, d = x.shape
        group = ctx.group
        needs = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                 bias is not None and ctx.needs_input_grad[2]]
        grad_x = torch.empty_like(x) if needs[0] else None
        grad_w = torch.zeros_like(weight) if needs[1] else None
        grad_b = torch.zeros_like(bias) if needs[2] else None
        for rows in slices(n, d, _BLOCK_ELEMENTS):
            part = grad_values[rows]
            dense = part.new_zeros(part.shape[0], d // group, group).scatter_(
                -1, indices[rows].long(), part).view(-1, d)
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
                dense, x[rows], [d], mean[rows], rstd[rows], weight, bias, needs)
            if needs[0]:
                grad_x[rows] = gx
            if needs[1]:
                grad_w += gw
            if needs[2]:
                grad_b += gb
            del dense, gx
        return grad_x, grad_w, grad_b, None, None, None


def layer_norm_group_topk_compress(x: Tensor, k: int, group: int, weight: Optional[Tensor] = None,
                                   bias: Optional[Tensor] = None, eps: float = 1e-5,
                                   backend: str = "auto", *,
                                   dropout_p: float = 0.0) -> CompressedActivation:
    r"""``group_topk_compress(F.layer_norm(x, (D,), weight, bias, eps), k, group)`` without
    forming the normalized tensor.

    Args:
        x: node features ``[N, D]``, ``D`` a multiple of ``group``.
        k, group: as :func:`group_topk_compress`.
        weight, bias, eps: the LayerNorm over the last dimension (``weight``/``bias`` ``[D]`` or
            None).
        backend: ``"auto"`` (the fused Triton kernel on CUDA tensors it covers), ``"torch"`` or
            ``"triton"``.
        dropout_p: dropout of the kept values, as :func:`group_topk_compress`.

    Raises:
        ValueError: as :func:`group_topk_compress`, or ``weight``/``bias`` not of shape ``[D]``,
            before any computation.
    """
    check_topk_input(x, k, group, op="layer_norm_group_topk_compress")
    check_backend(backend)
    dropout_p = check_dropout_p(dropout_p, "layer_norm_group_topk_compress")
    d = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (d,):
            raise ValueError(f"layer_norm_group_topk_compress: {name} must be [{d}] (the "
                             f"LayerNorm over the last dimension), got {tuple(t.shape)}")
    in_kernel = _kernel_covers(x, int(group)) and use_triton(backend, x)
    if in_kernel:
        values, indices = fused_group_topk(x, int(k), int(group), weight=weight, bias=bias,
                                           eps=float(eps), layer_norm=True, backend="triton",
                                           **kernel_dropout_args(dropout_p))
    else:
        values, indices = _LayerNormGroupTopK.apply(x, weight, bias, float(eps), int(k), int(group))
    values = drop_kept_values(values, dropout_p, in_kernel)
    return CompressedActivation(values=values, indices=indices, width=d, group=int(group))


class LayerNormGroupTopKCompress(GroupTopKCompress):
    """A ``LayerNorm`` over the last dimension followed by :class:`GroupTopKCompress`, fused
    (:func:`layer_norm_group_topk_compress`).

    Takes the LayerNorm's place: it registers the LayerNorm's ``weight`` and ``bias`` (the same
    objects, under the same names), so ``state_dict`` keys and optimizers do not change.
    """

    def __init__(self, norm: nn.LayerNorm, k: int, group: int, dropout: float = 0.0,
                 dropout_training: Optional[bool] = None) -> None:
        super().__init__(k, group, dropout, dropout_training)
        if type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1:
            raise ValueError("LayerNormGroupTopKCompress fuses an nn.LayerNorm over the last "
                             f"dimension only, got {norm!r}")
        share_state(self, norm)
        self.normalized_shape = tuple(norm.normalized_shape)
        self.eps = norm.eps

    def forward(self, x: Tensor) -> CompressedActivation:
        if x.dim() != 2 or x.shape[-1] != self.normalized_shape[0]:
            raise ValueError(f"LayerNormGroupTopKCompress expects [N, {self.normalized_shape[0]}] "
                             f"node features, got {tuple(x.shape)}")
        return layer_norm_group_topk_compress(x, self.k, self.group, self.weight, self.bias,
                                              self.eps, backend=self.kernel_backend,
                                              dropout_p=self.active_dropout())

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape[0]}, eps={self.eps}, k={self.k}, group={self.group}"
                f"{self._dropout_repr()}")
