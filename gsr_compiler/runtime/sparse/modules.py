r"""Module forms of the compressed path, as the compiler inserts them into reversible branches.

A branch ``linear(dropout(relu(x)))`` becomes

.. math::
    \mathbf{c} = \mathrm{topk}_{k,g}(\mathbf{x}) \;\text{(compressed)}, \qquad
    \mathbf{c}' = \mathrm{dropout}(\mathbf{c}.\mathrm{values}), \qquad
    \mathbf{y} = \mathbf{c}' \mathbf{W}^\top + \mathbf{b}

with :class:`GroupTopKCompress`, :class:`CompressedDropout` and :class:`CompressedLinear`; the
message-passing layers are in :mod:`.conv`. Dropout on the kept values is dropout on the dense
tensor restricted to the positions that can be non-zero (the others are zero either way). Where
the dropout alone reads the ReLU the compiler folds it into the top-k
(``GroupTopKCompress(dropout=p)``, :mod:`.kept_dropout`), so the kernel draws it.

The consumer modules *share* the parameters of the layer they replace (the same ``Parameter``
objects, registered under the same names), so ``state_dict`` keys, optimizers and ``.to()`` see
exactly what they saw before the rewrite.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..dropout import branch_dropout
from .compressed import CompressedActivation, check_k_and_group
from .kept_dropout import check_dropout_p
from .linear import compressed_linear
from .topk import group_topk_compress

__all__ = ["GroupTopKCompress", "CompressedDropout", "CompressedLinear", "share_state"]


def share_state(new: nn.Module, old: nn.Module) -> None:
    """Registers ``old``'s children, parameters and buffers on ``new`` under the same names
    (the same objects, not copies), so both have the same ``state_dict`` keys and tensors."""
    for name, child in old._modules.items():
        new.add_module(name, child)
    for name, p in old._parameters.items():
        new.register_parameter(name, p)
    for name, b in old._buffers.items():
        new.register_buffer(name, b, persistent=name not in old._non_persistent_buffers_set)
    new.train(old.training)


class GroupTopKCompress(nn.Module):
    r"""Group-wise top-k of ``x`` in compressed form (:func:`group_topk_compress`): a drop-in
    for ``ReLU`` whose consumer reads a :class:`CompressedActivation`.

    Args:
        k: values kept per node and group (``1 <= k <= group``).
        group: channel-group width ``g``.
        dropout: probability of dropping a kept value, in training mode (the compiler folds a
            dropout that only this top-k feeds into it: the kernel draws the mask as it writes
            the values, :mod:`.kept_dropout`).
        dropout_training: ``None`` follows ``train()``/``eval()``; a bool fixes whether the
            dropout is active (a functional dropout written with a constant flag).

    Attributes:
        kernel_backend: ``"auto"``, ``"torch"`` or ``"triton"`` (set by the compiler from
            ``GSRConfig.backend``); see :func:`group_topk_compress`.
    """

    # Defaults for modules pickled before dropout could be folded in (no instance attributes).
    dropout: float = 0.0
    dropout_training: Optional[bool] = None

    def __init__(self, k: int, group: int, dropout: float = 0.0,
                 dropout_training: Optional[bool] = None) -> None:
        super().__init__()
        check_k_and_group(k, group)
        self.k = int(k)
        self.group = int(group)
        self.dropout = check_dropout_p(dropout, type(self).__name__)
        self.dropout_training = dropout_training
        self.kernel_backend = "auto"

    def active_dropout(self) -> float:
        """The dropout probability this call applies: 0 unless dropout is active."""
        fixed = self.dropout_training
        return self.dropout if (self.training if fixed is None else fixed) else 0.0

    def forward(self, x: Tensor) -> CompressedActivation:
        # Absent in modules pickled before the option existed: they ran the torch path.
        return group_topk_compress(x, self.k, self.group,
                                   backend=getattr(self, "kernel_backend", "torch"),
                                   dropout_p=self.active_dropout())

    def extra_repr(self) -> str:
        return f"k={self.k}, group={self.group}{self._dropout_repr()}"

    def _dropout_repr(self) -> str:
        if not self.dropout:
            return ""
        fixed = self.dropout_training
        return f", dropout={self.dropout}" + ("" if fixed is None else f", dropout_training={fixed}")


class CompressedDropout(nn.Module):
    """Dropout of the kept values of a :class:`CompressedActivation`.

    Args:
        p: drop probability.
        training: ``None`` follows ``train()``/``eval()``; a bool fixes it (a functional dropout
            written with a constant flag, e.g. Monte-Carlo dropout).
    """

    def __init__(self, p: float = 0.5, training: Optional[bool] = None) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = float(p)
        self.fixed_training = training

    def forward(self, c: CompressedActivation) -> CompressedActivation:
        training = self.training if self.fixed_training is None else self.fixed_training
        if not training or self.p == 0.0:
            return c
        values = branch_dropout(c.values, self.p)
        return CompressedActivation(values, c.indices, c.width, c.group)

    def extra_repr(self) -> str:
        fixed = "" if self.fixed_training is None else f", training={self.fixed_training}"
        return f"p={self.p}{fixed}"


class CompressedLinear(nn.Module):
    r""":math:`\mathbf{y} = \mathbf{X}\mathbf{W}^\top + \mathbf{b}` for ``X`` given compressed
    (:func:`compressed_linear`), with the ``weight``/``bias`` of ``linear`` (an ``nn.Linear`` or
    PyG ``Linear``), shared, not copied."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        share_state(self, linear)
        self.in_features = int(linear.weight.shape[1])
        self.out_features = int(linear.weight.shape[0])

    def forward(self, c: CompressedActivation) -> Tensor:
        return compressed_linear(c, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"
