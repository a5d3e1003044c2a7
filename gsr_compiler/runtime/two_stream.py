r"""Two-stream reversible chains: the user's own residual branches, at full width.

A chain of L residual blocks :math:`h_{i+1} = h_i + f_i(h_i)` (:math:`i = 1 \dots L`) becomes
two streams a, b of the full width D, both starting from the chain input h, whose blocks take
turns (RevNet's additive coupling, each block a half-step):

.. math::
    a_0 = b_0 = h, \qquad a_k = a_{k-1} + f_{2k-1}(b_{k-1}), \qquad
    b_k = b_{k-1} + f_{2k}(a_k), \qquad \text{out} = a_K + (b_K - h),

with :math:`K = \lceil L/2 \rceil` (an odd L leaves the last b update out). Each stream collects
every other branch output, and the output adds both collections to h once, so that every branch
contributes exactly once, as in the residual chain: :math:`\text{out} = h + \sum_i f_i(\cdot)`.
What differs is what each branch reads: :math:`f_i` reads h plus the outputs of
:math:`f_{i-2}, f_{i-4}, \dots` (the other stream's branches), where the residual chain's reads
h plus all earlier outputs. For L <= 2 the two are the same function (up to rounding); for longer
chains they differ. No reversible form computes the residual chain itself: rebuilding
:math:`h_i` from :math:`h_{i+1} = h_i + f_i(h_i)` means inverting :math:`x \mapsto x + f(x)`,
which need not be one-to-one.

The coupling is :class:`~gsr_compiler.runtime.reversible.ReversibleChain`'s with two groups of
width D each: the state is ``[a, b]`` (2D channels), coupling block k runs
:math:`f_{2k-1}` as its first group's branch and :math:`f_{2k}` as its second (with G = 2,
:math:`y_0 = x_2` and :math:`y_2 = x_2 + f_2(y_1)`: exactly the update above). So the backward,
dropout replay, frozen BatchNorm statistics, autocast restore, discrete-choice replay, anchors
and drift checks are that chain's, unchanged. This module only duplicates the input into the
two streams, merges them at the end and keeps the user's layers under their own names.

The branches run the user's own layers (the same objects, not copies), so the parameters,
their ``state_dict`` keys and their values are the user's: the layers stay registered in the
model under their own names, and the chain leaves its own names for the same tensors out of
``state_dict`` and does not miss them in ``load_state_dict`` (:meth:`TwoStreamChain.alias_keys`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, fx, nn

from .drift import AnchorSetting
from .reversible import ReversibleChain
from .shared_layers import alias_pairs, register_alias_hooks

__all__ = ["TwoStreamChain", "ZeroBranch"]


class Zeros(nn.Module):
    """``zeros_like(h)``; with grad, a leaf that takes part in autograd without depending on
    ``h``: the recompute differentiates it like any branch output and gets no gradient."""

    def forward(self, h: Tensor) -> Tensor:
        z = torch.zeros_like(h)
        return z.requires_grad_() if torch.is_grad_enabled() and h.requires_grad else z


class ZeroBranch(fx.GraphModule):
    """The partner of the last block of an odd chain: adds nothing to its stream."""

    def __init__(self, n_side: int) -> None:
        graph = fx.Graph()
        h = graph.placeholder("h")
        for k in range(n_side):
            graph.placeholder(f"side_{k}")
        graph.output(graph.call_module("zeros", (h,)))
        root = nn.Module()
        root.zeros = Zeros()
        super().__init__(root, graph, class_name="ZeroBranch")


class TwoStreamChain(ReversibleChain):
    """L residual blocks as two full-width streams that take turns (see the module docstring).

    Args:
        branches: ``branches[i]`` is the branch :math:`f_{i+1}` of residual block ``i``, called as
            ``f(h, *side_inputs_of_its_pair)``: blocks ``2k`` and ``2k + 1`` form coupling block
            ``k`` and both receive the side inputs listed in ``side_index[k]``.
        side_index: for each pair of blocks, the positions of its side inputs among the chain's.
        shared: for each branch, ``{name in the branch: path of the same module in the model
            that holds this chain}``: the layers the branch shares with the user's model. Their
            state belongs to the model under those paths (:meth:`alias_keys`), where the model
            must keep them registered.
        replay_margin, anchors, drift_tolerance, verify: as for
            :class:`~gsr_compiler.runtime.reversible.ReversibleChain`.
    """

    coupling = "two-stream"

    def __init__(self, branches: Sequence[nn.Module], side_index: Sequence[Sequence[int]],
                 shared: Optional[Sequence[dict[str, str]]] = None,
                 replay_margin: Optional[float] = None, anchors: AnchorSetting = None,
                 drift_tolerance: float = 1e-3, verify: bool = False) -> None:
        if len(branches) == 0:
            raise ValueError("a two-stream chain needs at least one block")
        pairs = (len(branches) + 1) // 2
        if len(side_index) != pairs:
            raise ValueError(f"side_index needs one entry per pair of blocks ({pairs}), "
                             f"got {len(side_index)}")
        shared = [dict(s) for s in shared] if shared is not None else [{} for _ in branches]
        if len(shared) != len(branches):
            raise ValueError("shared needs one entry per branch")
        blocks = []
        for k in range(pairs):
            second = branches[2 * k + 1] if 2 * k + 1 < len(branches) \
                else ZeroBranch(len(side_index[k]))
            blocks.append([branches[2 * k], second])
        super().__init__(blocks, side_index, replay_margin=replay_margin, anchors=anchors,
                         drift_tolerance=drift_tolerance, verify=verify)
        self.residual_blocks = len(branches)
        self.shared = shared
        register_alias_hooks(self)

    def group_width(self, input_width: int) -> int:
        return input_width  # each stream is as wide as the chain input

    def extra_repr(self) -> str:
        return f"residual_blocks={self.residual_blocks}, " + super().extra_repr().replace(
            "groups=2", "streams=2")

    def forward(self, x: Tensor, *side_inputs: object) -> Tensor:
        y = super().forward(torch.cat([x, x], dim=-1), *side_inputs)
        return _merge(y, x)

    def forward_storing_everything(self, x: Tensor, *side_inputs: object,
                                   seeds: Optional[list] = None) -> Tensor:
        y = super().forward_storing_everything(torch.cat([x, x], dim=-1), *side_inputs,
                                               seeds=seeds)
        return _merge(y, x)

    @torch.no_grad()
    def inverse_streams(self, y: Tensor, *side_inputs: object, seeds=None) -> Tensor:
        """The streams ``[a_0, b_0]`` rebuilt from the final streams ``y = [a_K, b_K]`` (both
        halves equal the chain input up to rounding). The merged output alone cannot be
        inverted: the backward keeps both streams."""
        return super().inverse(y, *side_inputs, seeds=seeds)

    def inverse(self, y: Tensor, *side_inputs: object, seeds=None) -> Tensor:
        raise NotImplementedError(
            "a two-stream chain's merged output a + (b - h) cannot be inverted on its own; "
            "inverse_streams() rebuilds the input streams from the final ones")

    def alias_keys(self) -> list[tuple[str, str]]:
        """``(key under this chain, key under the model holding it)`` for every parameter and
        buffer the branches share with the user's model: the same tensor under two names."""
        pairs = []
        for i, shared in enumerate(self.shared):
            pairs += alias_pairs(self.blocks[i // 2][i % 2], f"blocks.{i // 2}.{i % 2}.", shared)
        return pairs


def _merge(y: Tensor, x: Tensor) -> Tensor:
    """``a + (b - h)``: each stream's branch outputs added to h once. For one block b = h and
    the output is ``a`` itself, bit for bit."""
    a, b = y.chunk(2, dim=-1)
    return a + (b - x.to(b.dtype))

