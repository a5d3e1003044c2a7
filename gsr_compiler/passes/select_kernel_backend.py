"""Pass: tell the runtime modules of the rewritten graph which backend runs their kernels.

Runs after the rewrite (and the sparse pass). Every runtime module that has a Triton kernel
beside its torch path reads a ``kernel_backend`` attribute; this pass sets it to
``GSRConfig.backend`` on all of them, inside the chains' branches too:

* ``ReversibleChain``: the coupling update ``y = x + f`` and its inverse ``x = y - f``;
* ``GroupTopKCompress``: the group top-k writing the compressed form (``g`` a power of two up
  to 256; float64 inputs run torch);
* the compressed message-passing layers: their compressed ``sum``/``mean`` aggregation, which
  runs where a layer aggregates the compressed form itself (a ``GINConv`` whose ``nn`` does not
  start with a Linear). The others apply their linear map first and aggregate its dense output,
  or aggregate with ``max``: the same torch code on every backend.

The backend itself is resolved per call from the tensors' device (``"auto"`` can follow the model
from CPU to CUDA); ``choice`` is the resolution for the traced inputs, checked by the compiler
before any pass runs, and reported by ``explain()``. The graph is not changed.
"""
from __future__ import annotations

from collections import Counter

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..runtime.kernels import BackendChoice, kernel_covers_group
from ..runtime.reversible import ReversibleChain
from ..runtime.sparse import GroupTopKCompress
from ..runtime.sparse.conv import _CompressedMessagePassing

# The runtime modules with a kernel beside their torch path.
_WITH_KERNELS = (ReversibleChain, GroupTopKCompress, _CompressedMessagePassing)

# What each kind of runtime module routes through the kernels, for explain().
_CHAIN = "coupling update and inverse"
_TOPK = "group top-k"
_AGGREGATE = "compressed sum/mean aggregation"
# ... and the ones that run torch on any backend.
_DENSE_AGGREGATE = "compressed layer(s) aggregate densely (linear first, or max)"
_TOPK_UNCOVERED = "group top-k layer(s) with g not a power of two up to 256"


def _role(module) -> str:
    if isinstance(module, ReversibleChain):
        return _CHAIN
    if isinstance(module, GroupTopKCompress):
        return _TOPK if kernel_covers_group(module.group) else _TOPK_UNCOVERED
    return _AGGREGATE if module.aggregates_compressed_sum else _DENSE_AGGREGATE


class SelectKernelBackend(PassBase):
    """Args:
        choice: ``GSRConfig.backend`` resolved for the traced inputs
            (:func:`~gsr_compiler.runtime.kernels.choose_backend`).
    """

    def __init__(self, choice: BackendChoice) -> None:
        super().__init__()
        self.choice = choice
        self.routed: Counter[str] = Counter()
        self.notes: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        for module in gm.modules():  # each module once, inside the chains' branches too
            if not isinstance(module, _WITH_KERNELS):
                continue
            module.kernel_backend = self.choice.requested
            self.routed[_role(module)] += 1
        self.notes.append(f"backend={self.choice.requested!r} -> {self.choice.name} for the "
                          "traced inputs")
        return PassResult(gm, False)


def describe_routed(routed: Counter) -> str:
    """E.g. ``"kernels for: coupling update and inverse of 2 chain(s), group top-k in 8
    layer(s); torch on any backend: 8 compressed layer(s) aggregate densely (linear first, or
    max)"``."""
    parts = []
    if routed[_CHAIN]:
        parts.append(f"{_CHAIN} of {routed[_CHAIN]} chain(s)")
    for role in (_TOPK, _AGGREGATE):
        if routed[role]:
            parts.append(f"{role} in {routed[role]} layer(s)")
    text = "kernels for: " + ", ".join(parts) if parts else "no op of this graph has a kernel"
    torch_only = [f"{routed[role]} {role}" for role in (_DENSE_AGGREGATE, _TOPK_UNCOVERED)
                  if routed[role]]
    if torch_only:
        text += "; torch on any backend: " + ", ".join(torch_only)
    return text
