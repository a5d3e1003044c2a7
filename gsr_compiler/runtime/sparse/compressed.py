"""The compressed form of a group-wise top-k activation.

A node-feature matrix ``x`` of shape ``[N, D]`` is split into ``G = D / g`` channel groups of width
``g``. After :func:`~gsr_compiler.runtime.sparse.group_topk_compress` each row keeps, in each group,
only its ``k`` largest values. :class:`CompressedActivation` stores exactly those:

* ``values``  ``[N, G, k]``, the kept values, in the dtype of ``x``;
* ``indices`` ``[N, G, k]``, their positions inside the group (``0 <= p < g``), ascending within each
  ``(node, group)``, in the smallest integer dtype that holds ``g - 1`` (:func:`index_dtype_for_group`).

So a row costs ``G * k * (itemsize + index itemsize)`` bytes instead of ``D * itemsize``: with
float32, ``D = 128``, ``k = g / 8`` and ``g <= 256`` that is 6.4x smaller.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CompressedActivation",
    "index_dtype_for_group",
    "compressed_nbytes_per_row",
    "compression_ratio",
    "check_k_and_group",
]


def index_dtype_for_group(group: int) -> torch.dtype:
    """The integer dtype used for within-group positions of a group of width ``group``.

    ``torch.uint8`` for ``group <= 256``, ``torch.int16`` for ``group <= 32767``, else ``torch.int32``.
    """
    if group <= 256:
        return torch.uint8
    if group <= 32767:
        return torch.int16
    return torch.int32


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def compressed_nbytes_per_row(width: int, k: int, group: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one node row takes in compressed form: ``G * k`` values plus ``G * k`` indices."""
    check_k_and_group(k, group)
    _check_width(width, group)
    num_groups = width // group
    return num_groups * k * (_itemsize(dtype) + _itemsize(index_dtype_for_group(group)))


def compression_ratio(width: int, k: int, group: int, dtype: torch.dtype = torch.float32) -> float:
    """Dense bytes per row divided by compressed bytes per row (e.g. 6.4 for fp32, D=128, k=g/8)."""
    return width * _itemsize(dtype) / compressed_nbytes_per_row(width, k, group, dtype)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_k_and_group(k: Any, group: Any) -> None:
    """Raise ``ValueError`` unless ``group >= 1`` and ``1 <= k <= group`` are integers."""
    if not _is_int(group) or group < 1:
        raise ValueError(
            f"sparse group size must be a positive integer, got group={group!r}; "
            f"pass the channel-group width g (a divisor of the feature width D)")
    if not _is_int(k) or not 1 <= k <= group:
        raise ValueError(
            f"sparse k must be an integer in 1..g={group} (values kept per node and group), "
            f"got k={k!r}; pick e.g. k={max(1, group // 8)} (g/8) or k={max(1, group // 2)} (g/2)")


def _check_width(width: int, group: int) -> None:
    if width % group != 0:
        divisors = [d for d in range(1, width + 1) if width % d == 0]
        raise ValueError(
            f"sparse group size g={group} does not divide the feature width D={width}; "
            f"choose g among the divisors of {width}: {divisors}")


def check_topk_input(x: Any, k: Any, group: Any, *, op: str) -> None:
    """All argument checks of the top-k operators, done before any computation."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op} expects a torch.Tensor of node features, got {type(x).__name__}")
    check_k_and_group(k, group)
    if x.dim() != 2:
        raise ValueError(
            f"{op} expects node features of shape [N, D], got a {x.dim()}-d tensor of shape "
            f"{tuple(x.shape)}; reshape it first, e.g. x.reshape(-1, x.shape[-1])")
    if not x.is_floating_point():
        raise ValueError(f"{op} expects a floating-point tensor, got dtype {x.dtype}; cast it with x.float()")
    _check_width(x.shape[1], group)


def group_offsets(num_groups: int, group: int, device: torch.device) -> Tensor:
    """``[1, G, 1]`` start column of each group, to turn within-group positions into columns."""
    return (torch.arange(num_groups, device=device) * group).view(1, num_groups, 1)


class _ToDense(torch.autograd.Function):
    """Scatter ``values`` into zeros at ``indices``; saves only the (small) indices."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, group: int) -> Tensor:  # type: ignore[override]
        n, num_groups, _ = values.shape
        idx = indices.long()
        out = values.new_zeros(n, num_groups, group).scatter_(-1, idx, values)
        ctx.save_for_backward(indices)
        return out.view(n, num_groups * group)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        n, num_groups, _ = indices.shape
        grad_values = grad_out.reshape(n, num_groups, -1).gather(-1, indices.long())
        return grad_values, None, None


@dataclass
class CompressedActivation:
    """Group-wise top-k node features in compressed form (see the module docstring).

    Attributes:
        values: ``[N, G, k]`` kept values (dtype of the original activation).
        indices: ``[N, G, k]`` within-group positions of the kept values, ascending within each
            ``(node, group)``; dtype from :func:`index_dtype_for_group` (``uint8`` for ``g <= 256``).
        width: the dense width ``D = G * g``.
        group: the group width ``g``.

    ``to_dense()`` rebuilds the ``[N, D]`` tensor (zeros except the kept values); it is
    differentiable w.r.t. ``values`` and keeps only ``indices`` for its backward.
    """

    values: Tensor
    indices: Tensor
    width: int
    group: int

    def __post_init__(self) -> None:
        if self.values.dim() != 3 or self.indices.shape != self.values.shape:
            raise ValueError(
                f"CompressedActivation needs values and indices of the same shape [N, G, k], got "
                f"{tuple(self.values.shape)} and {tuple(self.indices.shape)}")
        if self.values.shape[1] * self.group != self.width:
            raise ValueError(
                f"CompressedActivation: G={self.values.shape[1]} groups of width g={self.group} "
                f"do not make width D={self.width}")
        if self.indices.dtype != index_dtype_for_group(self.group):
            raise ValueError(
                f"CompressedActivation: indices for g={self.group} must be "
                f"{index_dtype_for_group(self.group)}, got {self.indices.dtype}")

    @property
    def num_nodes(self) -> int:
        return self.values.shape[0]

    @property
    def num_groups(self) -> int:
        return self.values.shape[1]

    @property
    def k(self) -> int:
        return self.values.shape[2]

    @property
    def shape(self) -> torch.Size:
        """Shape of the dense tensor this stands for, ``[N, D]``."""
        return torch.Size((self.num_nodes, self.width))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes held by ``values`` and ``indices``."""
        return (self.values.numel() * self.values.element_size()
                + self.indices.numel() * self.indices.element_size())

    @property
    def dense_nbytes(self) -> int:
        """Bytes the dense ``[N, D]`` tensor would take."""
        return self.num_nodes * self.width * self.values.element_size()

    def columns(self) -> Tensor:
        """``[N, G * k]`` int64 column of each kept value in the dense ``[N, D]`` tensor."""
        idx = self.indices.long() + group_offsets(self.num_groups, self.group, self.indices.device)
        return idx.view(self.num_nodes, self.num_groups * self.k)

    def to_dense(self) -> Tensor:
        """The dense ``[N, D]`` tensor: zeros except the kept values (differentiable)."""
        return _ToDense.apply(self.values, self.indices, self.group)

    def detach(self) -> "CompressedActivation":
        return CompressedActivation(self.values.detach(), self.indices, self.width, self.group)

    def __repr__(self) -> str:
        return (f"CompressedActivation(N={self.num_nodes}, D={self.width}, G={self.num_groups}, "
                f"g={self.group}, k={self.k}, dtype={self.dtype}, index_dtype={self.indices.dtype})")
