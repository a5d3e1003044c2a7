r"""The fused entry of a sparse block: LayerNorm, group-wise top-k, dropout, compressed output.

For ``x`` of shape ``[N, D]`` split into ``G = D / g`` channel groups of ``g`` channels:

.. math::
    h &= \mathrm{LayerNorm}(x) = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \odot w + b
         \quad\text{(optional, over the whole row)} \\
    S_{n,j} &= \text{the } k \text{ largest entries of } h_{n, jg:(j+1)g}
         \quad\text{(ties: lower position first)} \\
    \mathrm{values}_{n,j,:} &= h_{n, jg + S_{n,j}} \odot m_{n,j,:} / (1 - p),
    \qquad \mathrm{indices}_{n,j,:} = S_{n,j} \text{ ascending (uint8)}

where ``m`` is the dropout keep-mask (applied after top-k, to the kept entries only). Entry
``(n, j, i)`` of the compressed output draws ``u = tl.rand(seed, offset + (n * G + j) * k + i)``
and is kept when ``u > p``: the same ``(seed, offset)`` replays the same mask, which is how a
reversible block's recompute reproduces its forward without storing the mask.

The torch reference computes the mask with :func:`~.philox.dropout_keep_mask`, a torch
re-implementation of ``tl.rand`` that gives bit-identical numbers, so both backends drop the same
entries (tested against the kernel under ``TRITON_INTERPRET=1``).

What autograd keeps is ``indices`` (1 byte per kept entry) plus, for LayerNorm, ``x`` and two
floats per row; the backward scatters the incoming gradient to the kept positions (re-drawing the
mask) and runs the LayerNorm backward on it. Gradients reach ``x`` only through kept entries.

Order among special values follows a stable descending ``torch.sort``: NaN ranks above
everything, ``-0.0 == 0.0``, equal values go to the lower position (the same kept set as
:mod:`gsr_compiler.runtime.sparse`).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..choices import SelectionReplay
from ._dispatch import HAS_TRITON, LazyKernel, next_power_of_2, tl, use_triton
from .philox import dropout_keep_mask, philox_uniform

__all__ = [
    "group_topk",
    "group_topk_reference",
    "group_topk_forward_triton",
    "group_topk_backward_triton",
    "densify_group_topk",
    "MAX_GROUP_SIZE",
    "KERNEL_DTYPES",
    "kernel_covers_group",
]

#: Indices are stored as uint8, so a group has at most 256 channels.
MAX_GROUP_SIZE = 256

#: Value dtypes the sparse kernels take and reproduce exactly (they compute in float32).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_covers_group(group: int) -> bool:
    """Whether the sparse kernels handle channel groups of width ``group``: a power of two
    up to :data:`MAX_GROUP_SIZE`."""
    return 1 <= group <= MAX_GROUP_SIZE and group & (group - 1) == 0


def _check_args(x: torch.Tensor, k: int, group_size: int, dropout_p: float) -> Tuple[int, int, int]:
    if x.dim() != 2:
        raise ValueError(f"group_topk expects x of shape [N, D], got {tuple(x.shape)}")
    n, d = x.shape
    g = int(group_size)
    if not kernel_covers_group(g):
        raise ValueError(f"group_size must be a power of two in [1, {MAX_GROUP_SIZE}], got {g}")
    if d % g:
        raise ValueError(f"D={d} is not a multiple of group_size={g}")
    if not 1 <= k <= g:
        raise ValueError(f"k must be in [1, group_size={g}], got {k}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return n, d // g, g


def densify_group_topk(values: torch.Tensor, indices: torch.Tensor,
                       group_size: int) -> torch.Tensor:
    """Dense ``[N, G * g]`` tensor with ``values`` at ``indices`` and zeros elsewhere."""
    n, groups, _ = values.shape
    dense = values.new_zeros(n, groups, group_size)
    dense = dense.scatter(2, indices.long(), values)
    return dense.reshape(n, groups * group_size)


def group_topk_reference(x: torch.Tensor, k: int, group_size: int,
                         weight: Optional[torch.Tensor] = None,
                         bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
                         layer_norm: bool = False, dropout_p: float = 0.0, seed: int = 0,
                         offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Torch implementation of :func:`group_topk`; differentiable in ``x``, ``weight``, ``bias``."""
    n, groups, g = _check_args(x, k, group_size, dropout_p)
    h = x.float()
    if layer_norm:
        h = F.layer_norm(h, (x.shape[1],), None if weight is None else weight.float(),
                         None if bias is None else bias.float(), eps)
    segments = h.reshape(n, groups, g)
    # A stable descending sort keeps equal values in position order: ties go to lower positions.
    order = torch.sort(segments.detach(), dim=-1, descending=True, stable=True).indices
    indices = order[..., :k].sort(dim=-1).values
    values = segments.gather(-1, indices)
    if dropout_p > 0:
        keep = dropout_keep_mask(seed, offset, (n, groups, k), dropout_p, device=x.device)
        scale = torch.tensor(1.0 / (1.0 - dropout_p), dtype=torch.float32, device=x.device)
        values = torch.where(keep, values * scale, torch.zeros((), device=x.device))
    return values.to(x.dtype), indices.to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if HAS_TRITON:

    def _group_topk_fwd_kernel(
        x_ptr, w_ptr, b_ptr, vals_ptr, idx_ptr, mean_ptr, rstd_ptr, margin_ptr,
        n_rows, n_groups, stride_x, eps, p, scale, seed, rng_offset,
        K: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
        LAYER_NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        DROPOUT: tl.constexpr, MARGIN: tl.constexpr,
    ):
        # One program per BLOCK_R rows; it walks the row's groups one [BLOCK_R, GROUP] tile at a
        # time, so D can be any multiple of GROUP.
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        rows64 = rows.to(tl.int64)
        cols = tl.arange(0, GROUP)
        tile_mask = row_mask[:, None] & (cols[None, :] < GROUP)
        x_rows = x_ptr + rows64[:, None] * stride_x + cols[None, :]
        n_cols = n_groups * GROUP

        if LAYER_NORM:
            # Two passes (mean, then centred second moment) for accuracy.
            acc = tl.zeros([BLOCK_R], dtype=tl.float32)
            for grp in range(n_groups):
                xt = tl.load(x_rows + grp * GROUP, mask=tile_mask, other=0.0).to(tl.float32)
                acc += tl.sum(xt, axis=1)
            mean = acc / n_cols
            acc2 = tl.zeros([BLOCK_R], dtype=tl.float32)
            for grp in range(n_groups):
                xt = tl.load(x_rows + grp * GROUP, mask=tile_mask, other=0.0).to(tl.float32)
                xc = tl.where(tile_mask, xt - mean[:, None], 0.0)
                acc2 += tl.sum(xc * xc, axis=1)
            rstd = 1.0 / tl.sqrt(acc2 / n_cols + eps)
            tl.store(mean_ptr + rows64, mean, mask=row_mask)
            tl.store(rstd_ptr + rows64, rstd, mask=row_mask)

        for grp in range(n_groups):
            h = tl.load(x_rows + grp * GROUP, mask=tile_mask, other=0.0).to(tl.float32)
            if LAYER_NORM:
                h = (h - mean[:, None]) * rstd[:, None]
                if HAS_WEIGHT:
                    w = tl.load(w_ptr + grp * GROUP + cols).to(tl.float32)
                    h = h * w[None, :]
                if HAS_BIAS:
                    b = tl.load(b_ptr + grp * GROUP + cols).to(tl.float32)
                    h = h + b[None, :]
            # Select k times the largest not yet taken entry, lowest position among equals.
            # NaN ranks above everything (as in a descending torch.sort); it is picked first
            # explicitly because max-reductions may ignore or propagate it.
            taken = tl.zeros([BLOCK_R, GROUP], dtype=tl.int32)
            is_nan = h != h
            for _ in range(K):
                free = taken == 0
                cur = tl.where(free & (is_nan == 0), h, float("-inf"))
                top = tl.max(cur, axis=1)
                cand = (cur == top[:, None]) & free & (is_nan == 0)
                first = tl.min(tl.where(cand, cols[None, :], GROUP), axis=1)
                first_nan = tl.min(tl.where(free & is_nan, cols[None, :], GROUP), axis=1)
                first = tl.where(first_nan < GROUP, first_nan, first)
                taken = tl.where(cols[None, :] == first[:, None], 1, taken)
            if MARGIN:
                # Relative gap between the smallest kept and the largest dropped value, for
                # the replay of near-tied selections in a reversible recompute (0 with a NaN).
                finite = is_nan == 0
                top1 = tl.max(tl.where(finite, h, float("-inf")), axis=1)
                kth = tl.min(tl.where((taken != 0) & finite, h, float("inf")), axis=1)
                nxt = tl.max(tl.where((taken == 0) & finite, h, float("-inf")), axis=1)
                gap_scale = tl.maximum(tl.abs(top1), tl.abs(nxt))
                safe_scale = tl.where(gap_scale > 0, gap_scale, 1.0)
                rel = tl.where(gap_scale > 0, (kth - nxt) / safe_scale, 0.0)
                rel = tl.where(nxt == float("-inf"), float("inf"), rel)
                any_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
                rel = tl.where(any_nan, 0.0, rel)
                tl.store(margin_ptr + rows64 * n_groups + grp, rel, mask=row_mask)
            # Slot of each kept entry in the ascending output: kept entries before it.
            slot = tl.cumsum(taken, axis=1) - 1
            out_off = (rows64[:, None] * n_groups + grp) * K + slot.to(tl.int64)
            keep = (taken != 0) & row_mask[:, None]
            if DROPOUT:
                u = tl.rand(seed, rng_offset + out_off)
                h = tl.where(u > p, h * scale, 0.0)
            tl.store(vals_ptr + out_off, h.to(vals_ptr.dtype.element_ty), mask=keep)
            pos = tl.zeros([BLOCK_R, GROUP], dtype=tl.int32) + cols[None, :]
            tl.store(idx_ptr + out_off, pos.to(tl.uint8), mask=keep)

    def _group_topk_bwd_kernel(
        gv_ptr, idx_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr,
        n_rows, n_groups, stride_x, stride_dx, p, scale, seed, rng_offset,
        K: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
        LAYER_NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEED_AFFINE_GRAD: tl.constexpr,
        DROPOUT: tl.constexpr,
    ):
        # Gradient of the compressed output w.r.t. the (normalized) dense activation is a scatter
        # of grad_values to the kept positions; the LayerNorm backward then needs two row
        # reductions, so the dense tile of a group is built twice (cheap: K compares per entry)
        # rather than stored and re-read.
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        rows64 = rows.to(tl.int64)
        cols = tl.arange(0, GROUP)
        tile_mask = row_mask[:, None] & (cols[None, :] < GROUP)
        n_cols = n_groups * GROUP

        if LAYER_NORM:
            mean = tl.load(mean_ptr + rows64, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows64, mask=row_mask, other=0.0)
            c1 = tl.zeros([BLOCK_R], dtype=tl.float32)
            c2 = tl.zeros([BLOCK_R], dtype=tl.float32)
            for grp in range(n_groups):
                seg = rows64 * n_groups + grp
                dh = tl.zeros([BLOCK_R, GROUP], dtype=tl.float32)
                for i in range(K):
                    gv = tl.load(gv_ptr + seg * K + i, mask=row_mask, other=0.0).to(tl.float32)
                    ix = tl.load(idx_ptr + seg * K + i, mask=row_mask, other=0).to(tl.int32)
                    if DROPOUT:
                        u = tl.rand(seed, rng_offset + seg * K + i)
                        gv = tl.where(u > p, gv * scale, 0.0)
                    dh += tl.where(cols[None, :] == ix[:, None], gv[:, None], 0.0)
                xt = tl.load(x_ptr + rows64[:, None] * stride_x + grp * GROUP + cols[None, :],
                             mask=tile_mask, other=0.0).to(tl.float32)
                xhat = (xt - mean[:, None]) * rstd[:, None]
                wdy = dh
                if HAS_WEIGHT:
                    w = tl.load(w_ptr + grp * GROUP + cols).to(tl.float32)
                    wdy = dh * w[None, :]
                c1 += tl.sum(xhat * wdy, axis=1)
                c2 += tl.sum(wdy, axis=1)
            c1 = c1 / n_cols
            c2 = c2 / n_cols

        for grp in range(n_groups):
            seg = rows64 * n_groups + grp
            dh = tl.zeros([BLOCK_R, GROUP], dtype=tl.float32)
            for i in range(K):
                gv = tl.load(gv_ptr + seg * K + i, mask=row_mask, other=0.0).to(tl.float32)
                ix = tl.load(idx_ptr + seg * K + i, mask=row_mask, other=0).to(tl.int32)
                if DROPOUT:
                    u = tl.rand(seed, rng_offset + seg * K + i)
                    gv = tl.where(u > p, gv * scale, 0.0)
                dh += tl.where(cols[None, :] == ix[:, None], gv[:, None], 0.0)
            dx = dh
            if LAYER_NORM:
                xt = tl.load(x_ptr + rows64[:, None] * stride_x + grp * GROUP + cols[None, :],
                             mask=tile_mask, other=0.0).to(tl.float32)
                xhat = (xt - mean[:, None]) * rstd[:, None]
                wdy = dh
                if HAS_WEIGHT:
                    w = tl.load(w_ptr + grp * GROUP + cols).to(tl.float32)
                    wdy = dh * w[None, :]
                dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
                if NEED_AFFINE_GRAD:
                    # Per-program partial sums over its rows; the host adds the programs' rows in
                    # a fixed order (deterministic, no atomics). Masked rows contribute zeros.
                    part = pid.to(tl.int64) * n_cols + grp * GROUP + cols
                    tl.store(dw_ptr + part, tl.sum(dh * xhat, axis=0))
                    tl.store(db_ptr + part, tl.sum(dh, axis=0))
            tl.store(dx_ptr + rows64[:, None] * stride_dx + grp * GROUP + cols[None, :],
                     dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)

    _group_topk_fwd = LazyKernel(_group_topk_fwd_kernel)
    _group_topk_bwd = LazyKernel(_group_topk_bwd_kernel)


def _block_rows(n_rows: int, group_size: int) -> int:
    # About 4096 elements per tile, at most 64 rows, never more rows than there are.
    return max(1, min(64, 4096 // group_size, next_power_of_2(max(n_rows, 1))))


def group_topk_forward_triton(
    x: torch.Tensor, k: int, group_size: int, weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None, eps: float = 1e-5, layer_norm: bool = False,
    dropout_p: float = 0.0, seed: int = 0, offset: int = 0,
    values: Optional[torch.Tensor] = None, indices: Optional[torch.Tensor] = None,
    margin: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the forward kernel; returns ``values, indices, mean, rstd`` (the last two for LN).

    ``values``/``indices`` may be preallocated ``[N, G, k]`` contiguous outputs (e.g. arena views).
    ``margin``: a contiguous ``[N, G]`` float32 tensor that receives each selection's relative
    margin (:func:`~gsr_compiler.runtime.choices.selection_margin`), or None.
    """
    n, groups, g = _check_args(x, k, group_size, dropout_p)
    if x.stride(1) != 1:
        x = x.contiguous()
    if values is None:
        values = torch.empty(n, groups, k, dtype=x.dtype, device=x.device)
    if indices is None:
        indices = torch.empty(n, groups, k, dtype=torch.uint8, device=x.device)
    for name, t, dt in (("values", values, x.dtype), ("indices", indices, torch.uint8)):
        if tuple(t.shape) != (n, groups, k) or t.dtype != dt or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [{n}, {groups}, {k}] {dt} tensor")
    if margin is not None and (tuple(margin.shape) != (n, groups) or margin.dtype != torch.float32
                               or not margin.is_contiguous()):
        raise ValueError(f"margin must be a contiguous [{n}, {groups}] float32 tensor")
    mean = rstd = None
    if layer_norm:
        mean = torch.empty(n, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return values, indices, mean, rstd
    block_r = _block_rows(n, g)
    grid = (-(-n // block_r),)
    dummy = values  # placeholder pointer for absent optional tensors (never read)
    _group_topk_fwd[grid](
        x, dummy if weight is None else weight, dummy if bias is None else bias, values, indices,
        dummy if mean is None else mean, dummy if rstd is None else rstd,
        dummy if margin is None else margin,
        n, groups, x.stride(0), float(eps), float(dropout_p),
        1.0 / (1.0 - dropout_p), int(seed), int(offset),
        K=k, GROUP=g, BLOCK_R=block_r, LAYER_NORM=layer_norm,
        HAS_WEIGHT=layer_norm and weight is not None, HAS_BIAS=layer_norm and bias is not None,
        DROPOUT=dropout_p > 0, MARGIN=margin is not None,
    )
    return values, indices, mean, rstd


def group_topk_backward_triton(
    grad_values: torch.Tensor, indices: torch.Tensor, group_size: int,
    x: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
    mean: Optional[torch.Tensor] = None, rstd: Optional[torch.Tensor] = None,
    layer_norm: bool = False, dropout_p: float = 0.0, seed: int = 0, offset: int = 0,
    need_affine_grad: bool = True, grad_dtype: Optional[torch.dtype] = None,
    grad_x: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernel; returns ``grad_x, grad_weight, grad_bias``.

    ``x``, ``mean`` and ``rstd`` (from the forward) are needed only with ``layer_norm``; the
    affine gradients are None unless ``layer_norm and need_affine_grad``. ``grad_x`` has dtype
    ``grad_dtype`` (default: that of ``x``, else of ``grad_values``); pass ``grad_x`` to write
    into a preallocated ``[N, D]`` tensor with unit column stride.
    """
    n, groups, k = indices.shape
    g = int(group_size)
    if layer_norm and (x is None or mean is None or rstd is None):
        raise ValueError("the LayerNorm backward needs x, mean and rstd")
    grad_values = grad_values.contiguous()
    indices = indices.contiguous()
    if x is not None and x.stride(1) != 1:
        x = x.contiguous()
    if grad_dtype is None:
        grad_dtype = x.dtype if x is not None else grad_values.dtype
    if grad_x is None:
        grad_x = torch.empty(n, groups * g, dtype=grad_dtype, device=indices.device)
    elif tuple(grad_x.shape) != (n, groups * g) or grad_x.stride(1) != 1:
        raise ValueError(f"grad_x must be [{n}, {groups * g}] with unit column stride")
    affine = layer_norm and need_affine_grad
    if n == 0:
        zeros = torch.zeros(groups * g, dtype=torch.float32, device=indices.device)
        return grad_x, (zeros if affine else None), (zeros.clone() if affine else None)
    block_r = _block_rows(n, g)
    n_prog = -(-n // block_r)
    dw_part = db_part = None
    if affine:
        dw_part = torch.empty(n_prog, groups * g, dtype=torch.float32, device=x.device)
        db_part = torch.empty(n_prog, groups * g, dtype=torch.float32, device=x.device)
    dummy = grad_x
    _group_topk_bwd[(n_prog,)](
        grad_values, indices, dummy if x is None else x, dummy if weight is None else weight,
        dummy if mean is None else mean, dummy if rstd is None else rstd, grad_x,
        dummy if dw_part is None else dw_part, dummy if db_part is None else db_part,
        n, groups, grad_x.stride(0) if x is None else x.stride(0), grad_x.stride(0),
        float(dropout_p), 1.0 / (1.0 - dropout_p),
        int(seed), int(offset),
        K=k, GROUP=g, BLOCK_R=block_r, LAYER_NORM=layer_norm,
        HAS_WEIGHT=layer_norm and weight is not None, NEED_AFFINE_GRAD=affine,
        DROPOUT=dropout_p > 0,
    )
    grad_w = grad_b = None
    if affine:
        grad_w, grad_b = dw_part.sum(0), db_part.sum(0)
    return grad_x, grad_w, grad_b


def _kernel_values_at(x, weight, bias, eps, layer_norm, group_size, k, dropout_p, seed, offset):
    """``values_at`` of :class:`~gsr_compiler.runtime.choices.SelectionReplay` for the kernel:
    the values the kernel writes for ``(row, group)`` pairs had it kept ``positions``, computed
    with torch for those rows only (LayerNorm, gather, the kernel's dropout mask)."""
    groups = x.shape[1] // group_size

    def values_at(pairs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows, grp = pairs // groups, pairs % groups
        h = x[rows].float()
        if layer_norm:
            h = F.layer_norm(h, (x.shape[1],), None if weight is None else weight.float(),
                             None if bias is None else bias.float(), eps)
        h = h.view(-1, groups, group_size)[torch.arange(rows.numel(), device=x.device), grp]
        kept = h.gather(-1, positions)
        if dropout_p > 0:
            slots = pairs[:, None] * k + torch.arange(k, device=x.device)
            keep = philox_uniform(seed, offset + slots) > dropout_p
            kept = torch.where(keep, kept * (1.0 / (1.0 - dropout_p)), torch.zeros((), device=x.device))
        return kept.to(x.dtype)

    return values_at


class _GroupTopKFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, k, group_size, eps, layer_norm, dropout_p, seed, offset):
        n, groups = x.shape[0], x.shape[1] // group_size
        replay = SelectionReplay.begin((n, groups, group_size), k)
        margin = (None if replay is None
                  else torch.empty(n, groups, dtype=torch.float32, device=x.device))
        values, indices, mean, rstd = group_topk_forward_triton(
            x, k, group_size, weight, bias, eps, layer_norm, dropout_p, seed, offset,
            margin=margin)
        if replay is not None:
            # Rows whose selection the forward recorded keep it in the recompute.
            indices, values = replay.apply(indices, values, margin, _kernel_values_at(
                x, weight, bias, eps, layer_norm, group_size, k, dropout_p, seed, offset))
            replay.close()
        ctx.mark_non_differentiable(indices)
        # Without LayerNorm the backward needs only the indices, not x.
        saved_x = x if layer_norm else None
        ctx.save_for_backward(indices, saved_x, weight, mean, rstd)
        ctx.args = (group_size, layer_norm, dropout_p, seed, offset, x.shape, x.dtype,
                    bias is not None)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        indices, x, weight, mean, rstd = ctx.saved_tensors
        group_size, layer_norm, dropout_p, seed, offset, shape, dtype, has_bias = ctx.args
        need_affine = layer_norm and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        grad_x, grad_w, grad_b = group_topk_backward_triton(
            grad_values, indices, group_size, x, weight, mean, rstd, layer_norm, dropout_p,
            seed, offset, need_affine_grad=need_affine, grad_dtype=dtype)
        if weight is None or not ctx.needs_input_grad[1]:
            grad_w = None
        elif grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if not has_bias or not ctx.needs_input_grad[2]:
            grad_b = None
        elif grad_b is not None:
            grad_b = grad_b.to(dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def group_topk(x: torch.Tensor, k: int, group_size: int, *,
               weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5, layer_norm: bool = False, dropout_p: float = 0.0,
               seed: int = 0, offset: int = 0,
               backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` largest of every ``group_size`` channels, in compressed form.

    Args:
        x: ``[N, D]`` activations, ``D`` a multiple of ``group_size``.
        k: entries kept per (row, group), ``1 <= k <= group_size``.
        group_size: channels per group, a power of two up to 256.
        weight, bias, eps, layer_norm: apply ``LayerNorm(D)`` to each row first.
        dropout_p: dropout probability applied to the kept values (pass 0 in eval mode).
        seed, offset: counter-based RNG state for dropout; reuse them to replay the mask.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`._dispatch`).

    Returns:
        ``values [N, G, k]`` (dtype of ``x``, differentiable) and ``indices [N, G, k]`` (uint8,
        positions within the group, ascending).
    """
    _check_args(x, k, group_size, dropout_p)
    if use_triton(backend, x, weight, bias):
        return _GroupTopKFunction.apply(x, weight, bias, k, group_size, eps, layer_norm,
                                        dropout_p, seed, offset)
    return group_topk_reference(x, k, group_size, weight, bias, eps, layer_norm, dropout_p,
                                seed, offset)
