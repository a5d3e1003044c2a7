r"""Message-passing sum over compressed (group top-k) embeddings, and its backward.

With the graph stored as CSR by destination (``rowptr``, ``col`` = source of each edge, edges of
one destination contiguous) and an optional weight per edge, the forward computes

.. math::
    \mathrm{out}_{v} = \sum_{e = (u \to v)} w_e \, \mathrm{dense}(u),
    \qquad \mathrm{dense}(u)_{jg + \mathrm{idx}_{u,j,i}} = \mathrm{val}_{u,j,i}

without ever materializing ``dense``: one program owns one destination row (and a chunk of its
channel groups), walks that row's incoming edges in CSR order and accumulates in registers. No two
programs write the same output, so there are no atomics and the sum order is fixed: results are
bit-for-bit reproducible from run to run.

The backward needs the gradient only where values exist:

.. math::
    \frac{\partial L}{\partial \mathrm{val}_{u,j,i}} = \sum_{e = (u \to v)} w_e \,
        \frac{\partial L}{\partial \mathrm{out}_{v,\, jg + \mathrm{idx}_{u,j,i}}}

one program per source row over the transposed CSR (by source), gathering ``k`` entries per group
from the incoming gradient rows: the ``g - k`` dropped positions are never touched. Edge weights
are treated as constants (no gradient).
"""
import warnings
from typing import NamedTuple, Optional

import torch

from ._dispatch import HAS_TRITON, LazyKernel, next_power_of_2, tl, use_triton
from .topk import densify_group_topk

__all__ = [
    "CSR",
    "csr_from_edge_index",
    "sparse_aggregate",
    "sparse_aggregate_reference",
    "sparse_aggregate_backward_reference",
    "sparse_aggregate_forward_triton",
    "sparse_aggregate_backward_triton",
]


class CSR(NamedTuple):
    """Compressed sparse rows of a ``[num_rows, num_cols]`` adjacency.

    For aggregation by destination, rows are destinations and ``col`` holds sources; the
    transpose (rows = sources) drives the backward.
    """

    rowptr: torch.Tensor                # [num_rows + 1], int32 or int64
    col: torch.Tensor                   # [E], column of each entry, grouped by row
    weight: Optional[torch.Tensor]      # [E] or None (all ones)
    num_cols: int

    @property
    def num_rows(self) -> int:
        return self.rowptr.numel() - 1

    @property
    def num_edges(self) -> int:
        return self.col.numel()

    def transpose(self) -> "CSR":
        """The CSR of the transposed matrix; within a row, entries keep their original order."""
        rows = torch.repeat_interleave(
            torch.arange(self.num_rows, device=self.col.device, dtype=torch.int64),
            (self.rowptr[1:] - self.rowptr[:-1]).long())
        perm = torch.sort(self.col.long(), stable=True).indices
        counts = torch.bincount(self.col.long(), minlength=self.num_cols)
        rowptr_t = torch.zeros(self.num_cols + 1, dtype=torch.int64, device=self.col.device)
        rowptr_t[1:] = torch.cumsum(counts, 0)
        weight_t = None if self.weight is None else self.weight[perm]
        return CSR(rowptr_t.to(self.rowptr.dtype), rows[perm].to(self.col.dtype), weight_t,
                   self.num_rows)


def csr_from_edge_index(edge_index: torch.Tensor, num_nodes: int,
                        edge_weight: Optional[torch.Tensor] = None,
                        num_dst: Optional[int] = None) -> CSR:
    """CSR by destination of a PyG ``edge_index`` (row 0 sources, row 1 destinations).

    Edges into one destination keep their order in ``edge_index`` (stable sort), so the
    summation order, and hence the result, is determined by the input.
    """
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index must be [2, E], got {tuple(edge_index.shape)}")
    num_dst = num_nodes if num_dst is None else num_dst
    src, dst = edge_index[0].long(), edge_index[1].long()
    perm = torch.sort(dst, stable=True).indices
    counts = torch.bincount(dst, minlength=num_dst)
    rowptr = torch.zeros(num_dst + 1, dtype=torch.int64, device=edge_index.device)
    rowptr[1:] = torch.cumsum(counts, 0)
    weight = None if edge_weight is None else edge_weight[perm]
    return CSR(rowptr, src[perm], weight, num_nodes)


def _check(values: torch.Tensor, indices: torch.Tensor, csr: CSR, group_size: int) -> None:
    if values.dim() != 3 or indices.shape != values.shape:
        raise ValueError(f"values and indices must both be [N, G, k], got {tuple(values.shape)} "
                         f"and {tuple(indices.shape)}")
    if indices.dtype != torch.uint8:
        raise ValueError(f"indices must be uint8, got {indices.dtype}")
    if values.size(0) != csr.num_cols:
        raise ValueError(f"values have {values.size(0)} rows but the graph has {csr.num_cols} "
                         "source nodes")
    if not 1 <= values.size(2) <= group_size <= 256 or group_size & (group_size - 1):
        raise ValueError(f"need 1 <= k={values.size(2)} <= group_size={group_size} <= 256 and "
                         "group_size a power of two")
    if csr.weight is not None and csr.weight.requires_grad:
        raise ValueError("edge weights are constants here: pass edge_weight.detach()")


def _csr_matmul(csr: CSR, dense: torch.Tensor) -> torch.Tensor:
    weight = csr.weight
    if weight is None:
        weight = torch.ones(csr.num_edges, dtype=dense.dtype, device=dense.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta" and invariant checks
        adj = torch.sparse_csr_tensor(csr.rowptr.long(), csr.col.long(), weight.to(dense.dtype),
                                      size=(csr.num_rows, csr.num_cols))
        return torch.sparse.mm(adj, dense)


def sparse_aggregate_reference(values: torch.Tensor, indices: torch.Tensor, csr: CSR,
                               group_size: int) -> torch.Tensor:
    """Torch implementation (densify, then CSR @ dense); differentiable in ``values``."""
    _check(values, indices, csr, group_size)
    dense = densify_group_topk(values.float(), indices, group_size)
    return _csr_matmul(csr, dense).to(values.dtype)


def sparse_aggregate_backward_reference(grad_out: torch.Tensor, indices: torch.Tensor,
                                        csr_t: CSR, group_size: int) -> torch.Tensor:
    """Gradient w.r.t. ``values`` given the transposed CSR (rows = sources), with torch."""
    n, groups, _ = indices.shape
    grad_src = _csr_matmul(csr_t, grad_out.float())          # [N_src, D]
    grad_src = grad_src.reshape(n, groups, group_size)
    return grad_src.gather(2, indices.long()).to(grad_out.dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if HAS_TRITON:

    def _sparse_aggregate_fwd_kernel(
        vals_ptr, idx_ptr, rowptr_ptr, col_ptr, w_ptr, out_ptr,
        n_groups, stride_out,
        K: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    ):
        # Program (dst, chunk): destination row dst, groups [chunk*BLOCK_G, (chunk+1)*BLOCK_G).
        dst = tl.program_id(0).to(tl.int64)
        grps = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        grp_mask = grps < n_groups
        cols = tl.arange(0, GROUP)
        start = tl.load(rowptr_ptr + dst).to(tl.int64)
        end = tl.load(rowptr_ptr + dst + 1).to(tl.int64)
        acc = tl.zeros([BLOCK_G, GROUP], dtype=tl.float32)
        for e in range(start, end):
            src = tl.load(col_ptr + e).to(tl.int64)
            seg = (src * n_groups + grps) * K
            if HAS_WEIGHT:
                w = tl.load(w_ptr + e).to(tl.float32)
            for i in range(K):
                v = tl.load(vals_ptr + seg + i, mask=grp_mask, other=0.0).to(tl.float32)
                ix = tl.load(idx_ptr + seg + i, mask=grp_mask, other=0).to(tl.int32)
                if HAS_WEIGHT:
                    v = v * w
                # Indices within a group are distinct: exactly one column receives v.
                acc += tl.where(cols[None, :] == ix[:, None], v[:, None], 0.0)
        out = out_ptr + dst * stride_out + grps[:, None] * GROUP + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty),
                 mask=grp_mask[:, None] & (cols[None, :] < GROUP))

    def _sparse_aggregate_bwd_kernel(
        gout_ptr, idx_ptr, rowptr_ptr, col_ptr, w_ptr, gvals_ptr,
        n_groups, stride_gout,
        K: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
    ):
        # Program (src, chunk) over the transposed CSR: source row src, its outgoing edges.
        src = tl.program_id(0).to(tl.int64)
        grps = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        ks = tl.arange(0, BLOCK_K)
        mask = (grps[:, None] < n_groups) & (ks[None, :] < K)
        seg = (src * n_groups + grps[:, None]) * K + ks[None, :]
        ix = tl.load(idx_ptr + seg, mask=mask, other=0).to(tl.int64)
        col_in_row = grps[:, None].to(tl.int64) * GROUP + ix  # channel of each kept entry
        start = tl.load(rowptr_ptr + src).to(tl.int64)
        end = tl.load(rowptr_ptr + src + 1).to(tl.int64)
        acc = tl.zeros([BLOCK_G, BLOCK_K], dtype=tl.float32)
        for e in range(start, end):
            dst = tl.load(col_ptr + e).to(tl.int64)
            g = tl.load(gout_ptr + dst * stride_gout + col_in_row, mask=mask, other=0.0)
            g = g.to(tl.float32)
            if HAS_WEIGHT:
                g = g * tl.load(w_ptr + e).to(tl.float32)
            acc += g
        tl.store(gvals_ptr + seg, acc.to(gvals_ptr.dtype.element_ty), mask=mask)

    _sparse_aggregate_fwd = LazyKernel(_sparse_aggregate_fwd_kernel)
    _sparse_aggregate_bwd = LazyKernel(_sparse_aggregate_bwd_kernel)


def _block_groups(n_groups: int, elems_per_group: int, budget: int = 1024) -> int:
    return max(1, min(next_power_of_2(n_groups), budget // max(1, elems_per_group)))


def sparse_aggregate_forward_triton(values: torch.Tensor, indices: torch.Tensor, csr: CSR,
                                    group_size: int,
                                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the forward kernel; ``out`` may be a preallocated ``[num_dst, D]`` tensor."""
    _check(values, indices, csr, group_size)
    values, indices = values.contiguous(), indices.contiguous()
    _, groups, k = values.shape
    g = int(group_size)
    n_dst = csr.num_rows
    if out is None:
        out = torch.empty(n_dst, groups * g, dtype=values.dtype, device=values.device)
    elif tuple(out.shape) != (n_dst, groups * g) or out.stride(1) != 1:
        raise ValueError(f"out must be [{n_dst}, {groups * g}] with unit column stride")
    if n_dst == 0 or groups == 0:
        return out
    block_g = _block_groups(groups, g)
    grid = (n_dst, -(-groups // block_g))
    weight = csr.weight
    _sparse_aggregate_fwd[grid](
        values, indices, csr.rowptr, csr.col, values if weight is None else weight, out,
        groups, out.stride(0),
        K=k, GROUP=g, BLOCK_G=block_g, HAS_WEIGHT=weight is not None,
    )
    return out


def sparse_aggregate_backward_triton(grad_out: torch.Tensor, indices: torch.Tensor, csr_t: CSR,
                                     group_size: int,
                                     grad_values: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the backward kernel over the transposed CSR; returns ``grad_values [N, G, k]``."""
    indices = indices.contiguous()
    n_src, groups, k = indices.shape
    g = int(group_size)
    if grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    if csr_t.num_rows != n_src:
        raise ValueError(f"transposed CSR has {csr_t.num_rows} rows, indices {n_src}")
    if grad_values is None:
        grad_values = torch.empty(n_src, groups, k, dtype=grad_out.dtype, device=grad_out.device)
    elif tuple(grad_values.shape) != (n_src, groups, k) or not grad_values.is_contiguous():
        raise ValueError(f"grad_values must be a contiguous [{n_src}, {groups}, {k}] tensor")
    if n_src == 0 or groups == 0:
        return grad_values
    block_k = next_power_of_2(k)
    block_g = _block_groups(groups, block_k)
    grid = (n_src, -(-groups // block_g))
    weight = csr_t.weight
    _sparse_aggregate_bwd[grid](
        grad_out, indices, csr_t.rowptr, csr_t.col, grad_out if weight is None else weight,
        grad_values, groups, grad_out.stride(0),
        K=k, BLOCK_K=block_k, GROUP=g, BLOCK_G=block_g, HAS_WEIGHT=weight is not None,
    )
    return grad_values


class _SparseAggregateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, csr, csr_t, group_size):
        out = sparse_aggregate_forward_triton(values, indices, csr, group_size)
        ctx.save_for_backward(indices)
        ctx.csr, ctx.csr_t, ctx.group_size = csr, csr_t, group_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        csr_t = ctx.csr_t if ctx.csr_t is not None else ctx.csr.transpose()
        grad_values = sparse_aggregate_backward_triton(grad_out, indices, csr_t, ctx.group_size)
        return grad_values, None, None, None, None


def sparse_aggregate(values: torch.Tensor, indices: torch.Tensor, csr: CSR, group_size: int, *,
                     csr_t: Optional[CSR] = None, backend: str = "auto") -> torch.Tensor:
    """Sum over incoming edges of (weighted) compressed source embeddings, as a dense tensor.

    Args:
        values, indices: ``[N_src, G, k]`` compressed embeddings (from :func:`group_topk`).
        csr: the graph by destination (:func:`csr_from_edge_index`), ``csr.num_cols == N_src``.
        group_size: channels per group ``g``; the output has ``D = G * g`` channels.
        csr_t: ``csr.transpose()``, if already built (the backward needs it; built on demand).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``[csr.num_rows, D]`` dense aggregate, dtype of ``values``; differentiable in ``values``.
    """
    _check(values, indices, csr, group_size)
    if use_triton(backend, values, indices, csr.rowptr, csr.col, csr.weight):
        return _SparseAggregateFunction.apply(values, indices, csr, csr_t, group_size)
    return sparse_aggregate_reference(values, indices, csr, group_size)
