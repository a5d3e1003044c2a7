r"""PyG message-passing layers that read a :class:`CompressedActivation` as their node features.

Each takes the layer it replaces and shares its parameters and buffers (same objects, same
``state_dict`` keys). With :math:`\mathbf{X}` = ``c.to_dense()`` (never formed), :math:`\mathbf{A}`
the (weighted, for ``mean`` degree-normalized) adjacency and :func:`compressed_linear` computing
:math:`\mathbf{X}\mathbf{W}^\top` from the kept values only:

* :class:`CompressedGCNConv`:
  :math:`\mathbf{X}' = \hat{\mathbf{A}}\,(\mathbf{X}\mathbf{W}^\top) + \mathbf{b}` (PyG's order,
  ``gcn_norm``'s edges and weights).
* :class:`CompressedSAGEConv`:
  :math:`\mathbf{X}' = \mathbf{A}(\mathbf{X}\mathbf{W}_l^\top) + \mathbf{b}_l + \mathbf{X}\mathbf{W}_r^\top`,
  then ``F.normalize`` when ``normalize``.
* :class:`CompressedGraphConv`:
  :math:`\mathbf{X}' = \mathbf{A}(\mathbf{X}\mathbf{W}_{rel}^\top) + \mathbf{b}_{rel} + \mathbf{X}\mathbf{W}_{root}^\top`.
* :class:`CompressedGINConv`:
  :math:`\mathbf{X}' = h_\Theta\big(\mathbf{A}\mathbf{X} + (1+\epsilon)\mathbf{X}\big)`; when
  :math:`h_\Theta` is an ``nn.Sequential`` starting with a Linear :math:`(\mathbf{W}_1, \mathbf{b}_1)`,
  its first layer is applied first:
  :math:`\mathbf{A}(\mathbf{X}\mathbf{W}_1^\top) + ((1+\epsilon)\mathbf{X})\mathbf{W}_1^\top + \mathbf{b}_1`.

**Why the linear map goes first.** ``sum`` and ``mean`` aggregation commute with the linear map,
and applying :func:`compressed_linear` first means autograd keeps only the compressed values,
their indices and the weight: the dense aggregation after it saves edge indices (and the
no-grad edge weights), never an ``[N, D]`` tensor. Aggregating first would leave the following
Linear to save the dense ``[N, D]`` aggregate. Aggregating first is used where it is required:

* ``max`` aggregation (does not commute with the linear map): :func:`compressed_aggregate`, which
  moves only the kept values along edges, then the Linear;
* edge weights that require grad: :func:`compressed_aggregate` (its edge-weight gradient needs no
  saved ``[E, D]`` messages, where ``w * (XW)_j`` would save them);
* ``GINConv`` whose ``nn`` is not a Sequential starting with a Linear (e.g. PyG's ``MLP``).

Supported aggregations: ``sum``/``add``, ``mean``, ``max`` (given as strings). The compiler
checks this, and the other layer options, before it swaps a layer for one of these.

``kernel_backend`` (set by the compiler from ``GSRConfig.backend``) is handed to
:func:`compressed_aggregate`, whose ``sum``/``mean`` then run as a Triton kernel; the
linear-first path aggregates a dense tensor and is the same on every backend.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .aggregate import compressed_aggregate, dense_propagate
from .compressed import CompressedActivation
from .linear import compressed_linear
from .modules import share_state

__all__ = ["CompressedGCNConv", "CompressedSAGEConv", "CompressedGraphConv", "CompressedGINConv",
           "COMPRESSED_AGGREGATIONS"]

COMPRESSED_AGGREGATIONS = ("sum", "add", "mean", "max")


def _no_size(size, layer: str) -> None:
    if size is not None:
        raise ValueError(f"{layer}: size= (bipartite message passing) is not supported on "
                         f"compressed node features")


def _scaled(c: CompressedActivation, factor: Tensor) -> CompressedActivation:
    return CompressedActivation(c.values * factor, c.indices, c.width, c.group)


class _CompressedMessagePassing(nn.Module):
    """Shares ``conv``'s state and keeps its aggregation and flow.

    Attributes:
        kernel_backend: ``"auto"``, ``"torch"`` or ``"triton"``, for :func:`compressed_aggregate`.
    """

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        share_state(self, conv)
        if conv.aggr not in COMPRESSED_AGGREGATIONS:
            raise ValueError(f"{type(conv).__name__}(aggr={conv.aggr!r}): compressed aggregation "
                             f"supports {', '.join(COMPRESSED_AGGREGATIONS)}")
        self.aggr = conv.aggr
        self.flow = conv.flow
        self.in_channels = getattr(conv, "in_channels", None)
        self.out_channels = getattr(conv, "out_channels", None)
        self.kernel_backend = "auto"

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, aggr={self.aggr!r}"

    def _source_to_target(self, edge_index: Tensor) -> Tensor:
        """``edge_index`` as ``[source, target]`` rows, whatever the layer's ``flow``."""
        return edge_index if self.flow == "source_to_target" else edge_index.flip(0)

    @property
    def aggregates_compressed_sum(self) -> bool:
        """Whether ``forward`` aggregates the compressed form itself with ``sum``/``mean`` (the
        case the aggregation kernel covers) for edge weights that take no gradient. False
        when it aggregates the dense output of its linear map instead (linear first), or
        aggregates with ``max``."""
        return False

    def _linear_first(self, edge_weight: Optional[Tensor]) -> bool:
        return self.aggr != "max" and not (edge_weight is not None and edge_weight.requires_grad
                                           and torch.is_grad_enabled())

    def _aggregate(self, c: CompressedActivation, edge_index: Tensor,
                   edge_weight: Optional[Tensor] = None) -> Tensor:
        """:math:`\\mathbf{A}\\mathbf{X}` from the kept values (``[N, D]``)."""
        # Absent in modules pickled before the option existed: they ran the torch path.
        return compressed_aggregate(c, self._source_to_target(edge_index), c.num_nodes, self.aggr,
                                    edge_weight, backend=getattr(self, "kernel_backend", "torch"))

    def _propagate(self, x: Tensor, edge_index: Tensor, edge_weight: Optional[Tensor] = None) -> Tensor:
        """:math:`\\mathbf{A}\\mathbf{x}` for dense ``x`` with ``sum``/``mean``: autograd keeps the
        edge indices (and ``edge_weight``), not ``x`` or the messages; forward and backward move
        the edges in chunks, never forming an ``[E, D]`` tensor. ``edge_weight`` is a constant
        here (one that needs a gradient takes :meth:`_aggregate`)."""
        src, dst = self._source_to_target(edge_index)
        w = None if edge_weight is None else edge_weight.detach()
        return dense_propagate(x, src, dst, w, self.aggr == "mean")


class CompressedGCNConv(_CompressedMessagePassing):
    """``GCNConv`` on compressed node features (shares ``lin`` and ``bias``)."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__(conv)
        self.improved = conv.improved
        self.cached = conv.cached
        self.add_self_loops = conv.add_self_loops
        self.normalize = conv.normalize
        self._cached_edge_index = conv._cached_edge_index

    def forward(self, c: CompressedActivation, edge_index: Tensor,
                edge_weight: Optional[Tensor] = None) -> Tensor:
        if self.normalize:
            if self._cached_edge_index is None:
                from torch_geometric.nn.conv.gcn_conv import gcn_norm

                edge_index, edge_weight = gcn_norm(edge_index, edge_weight, c.num_nodes, self.improved,
                                                   self.add_self_loops, self.flow, c.dtype)
                if self.cached:
                    self._cached_edge_index = (edge_index, edge_weight)
            else:
                edge_index, edge_weight = self._cached_edge_index
        if self._linear_first(edge_weight):
            out = self._propagate(compressed_linear(c, self.lin.weight), edge_index, edge_weight)
        else:
            out = self.lin(self._aggregate(c, edge_index, edge_weight))
        if self.bias is not None:
            out = out + self.bias
        return out


class CompressedSAGEConv(_CompressedMessagePassing):
    """``SAGEConv`` (without ``project``) on compressed node features (shares ``lin_l``, ``lin_r``)."""

    def __init__(self, conv: nn.Module) -> None:
        if conv.project:
            raise ValueError("SAGEConv(project=True) applies a dense Linear+ReLU to x first; "
                             "it has no compressed form")
        super().__init__(conv)
        self.root_weight = conv.root_weight
        self.normalize = conv.normalize

    def forward(self, c: CompressedActivation, edge_index: Tensor, size=None) -> Tensor:
        _no_size(size, "CompressedSAGEConv")
        if self._linear_first(None):
            # out is a fresh tensor nothing saved: the bias and root term go in in place, so
            # no more than two [N, out] tensors live at once.
            out = self._propagate(compressed_linear(c, self.lin_l.weight), edge_index)
            if self.lin_l.bias is not None:
                out.add_(self.lin_l.bias)
        else:
            out = self.lin_l(self._aggregate(c, edge_index))
        if self.root_weight:
            out = out.add_(compressed_linear(c, self.lin_r.weight, self.lin_r.bias))
        if self.normalize:
            out = F.normalize(out, p=2.0, dim=-1)
        return out


class CompressedGraphConv(_CompressedMessagePassing):
    """``GraphConv`` on compressed node features (shares ``lin_rel``, ``lin_root``)."""

    def forward(self, c: CompressedActivation, edge_index: Tensor,
                edge_weight: Optional[Tensor] = None, size=None) -> Tensor:
        _no_size(size, "CompressedGraphConv")
        if self._linear_first(edge_weight):
            out = self._propagate(compressed_linear(c, self.lin_rel.weight), edge_index, edge_weight)
            if self.lin_rel.bias is not None:
                out = out + self.lin_rel.bias
        else:
            out = self.lin_rel(self._aggregate(c, edge_index, edge_weight))
        return out + compressed_linear(c, self.lin_root.weight, self.lin_root.bias)


def _linear_types() -> tuple[type, ...]:
    try:
        from torch_geometric.nn.dense.linear import Linear
    except ImportError:  # pragma: no cover
        return (nn.Linear,)
    return (nn.Linear, Linear)


_LINEARS = _linear_types()


def _leading_linear(module: nn.Module) -> bool:
    """``module`` is an ``nn.Sequential`` whose first layer is a Linear."""
    return isinstance(module, nn.Sequential) and len(module) > 0 and isinstance(module[0], _LINEARS)


class CompressedGINConv(_CompressedMessagePassing):
    """``GINConv`` on compressed node features (shares ``nn`` and ``eps``)."""

    @property
    def aggregates_compressed_sum(self) -> bool:
        return self.aggr != "max" and not _leading_linear(self.nn)

    def forward(self, c: CompressedActivation, edge_index: Tensor, size=None) -> Tensor:
        _no_size(size, "CompressedGINConv")
        # (1 + eps) x_i on the kept values only: autograd keeps values, not a dense x.
        root = _scaled(c, 1 + self.eps)
        if self._linear_first(None) and _leading_linear(self.nn):
            first = self.nn[0]
            out = self._propagate(compressed_linear(c, first.weight), edge_index)
            out = out + compressed_linear(root, first.weight, first.bias)
            for layer in list(self.nn)[1:]:
                out = layer(out)
            return out
        return self.nn(self._aggregate(c, edge_index) + root.to_dense())
