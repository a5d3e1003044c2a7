r"""The additive coupling update of a reversible block, in place.

Forward and inverse of one group of grouped additive coupling:

.. math::
    y_i = x_i + f_i(y_{i-1}) \qquad\qquad x_i = y_i - f_i(y_{i-1})

``coupling_add_(out, x, f)`` writes ``x + f`` into ``out`` and ``coupling_sub_(out, y, f)``
writes ``y - f``; ``out`` may be the first operand itself (the in-place update that lets a chain
overwrite its input group with its output group inside the arena). The operands are typically
column slices of an ``[N, D]`` activation, so 2-D tensors with unit column stride and any row
stride are handled without copies; other layouts fall back to the torch reference.

The kernel is memory bound: per element it reads two values and writes one.
"""
from typing import Optional

import torch

from ._dispatch import HAS_TRITON, LazyKernel, cdiv, tl, use_triton

__all__ = ["coupling_add_", "coupling_sub_", "coupling_update_reference", "coupling_update_triton"]


def coupling_update_reference(out: torch.Tensor, a: torch.Tensor, f: torch.Tensor,
                              subtract: bool = False) -> torch.Tensor:
    """``out = a - f`` if ``subtract`` else ``a + f``, with torch (``out`` may alias ``a``)."""
    if subtract:
        return torch.sub(a, f, out=out)
    return torch.add(a, f, out=out)


if HAS_TRITON:

    def _coupling_kernel(out_ptr, a_ptr, f_ptr, n_rows, n_cols,
                         stride_out, stride_a, stride_f,
                         SUBTRACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # One program per [BLOCK_R, BLOCK_C] tile; each element is read and written by the same
        # program at the same index, so out may alias a (or f).
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        a = tl.load(a_ptr + rows[:, None] * stride_a + cols[None, :], mask=mask)
        f = tl.load(f_ptr + rows[:, None] * stride_f + cols[None, :], mask=mask)
        if SUBTRACT:
            y = a - f
        else:
            y = a + f
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y, mask=mask)

    _coupling = LazyKernel(_coupling_kernel)


def _as_rows(t: torch.Tensor) -> Optional[torch.Tensor]:
    """View ``t`` as a 2-D ``[rows, cols]`` tensor with unit column stride, or None."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.unsqueeze(0) if t.stride(0) == 1 else None
    if t.dim() == 2:
        return t if (t.stride(1) == 1 or t.size(1) == 1) else None
    if t.is_contiguous():
        return t.reshape(-1, t.size(-1))
    return None


def coupling_update_triton(out: torch.Tensor, a: torch.Tensor, f: torch.Tensor,
                           subtract: bool = False, block_r: int = 16,
                           block_c: int = 128) -> torch.Tensor:
    """Launch the Triton kernel; falls back to the reference for layouts it does not cover."""
    out2, a2, f2 = _as_rows(out), _as_rows(a), _as_rows(f)
    if out2 is None or a2 is None or f2 is None or a.dtype != f.dtype or out.dtype != a.dtype:
        return coupling_update_reference(out, a, f, subtract)
    n_rows, n_cols = a2.shape
    if n_rows == 0 or n_cols == 0:
        return out
    grid = (cdiv(n_rows, block_r), cdiv(n_cols, block_c))
    _coupling[grid](out2, a2, f2, n_rows, n_cols, out2.stride(0), a2.stride(0), f2.stride(0),
                    SUBTRACT=subtract, BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def _check(out: torch.Tensor, a: torch.Tensor, f: torch.Tensor) -> None:
    if out.shape != a.shape or f.shape != a.shape:
        raise ValueError(f"coupling update needs equal shapes, got out {tuple(out.shape)}, "
                         f"{tuple(a.shape)} and f {tuple(f.shape)}")
    if out.device != a.device or f.device != a.device:
        raise ValueError("coupling update operands must be on one device")


def coupling_add_(y_out: torch.Tensor, x: torch.Tensor, f: torch.Tensor,
                  backend: str = "auto") -> torch.Tensor:
    """Write ``x + f`` into ``y_out`` and return it; ``y_out`` may be ``x`` itself.

    Not differentiable (it writes in place); reversible chains call it inside their own
    ``autograd.Function``. Partial overlaps between operands (other than ``y_out is x`` or
    ``y_out is f``) are not supported.
    """
    _check(y_out, x, f)
    if use_triton(backend, y_out, x, f):
        return coupling_update_triton(y_out, x, f, subtract=False)
    return coupling_update_reference(y_out, x, f, subtract=False)


def coupling_sub_(x_out: torch.Tensor, y: torch.Tensor, f: torch.Tensor,
                  backend: str = "auto") -> torch.Tensor:
    """Write ``y - f`` into ``x_out`` and return it (the inverse); ``x_out`` may be ``y``."""
    _check(x_out, y, f)
    if use_triton(backend, x_out, y, f):
        return coupling_update_triton(x_out, y, f, subtract=True)
    return coupling_update_reference(x_out, y, f, subtract=True)
