"""Pass: the ``nn.Dropout`` layers of reversible branches become ``BranchDropout``.

Each branch draws its dropout masks twice per training step (forward, and the recompute in
backward). ``BranchDropout`` draws the same Bernoulli masks more cheaply on CPU and keeps a
one-byte mask for backward (see :mod:`gsr_compiler.runtime.dropout`); elsewhere it is torch's
dropout. Only exact ``nn.Dropout`` instances are swapped (``AlphaDropout`` and other subclasses
draw differently); the graph itself is not changed. Runs after the sparse pass, which turns a
dropout right after the group top-k into a dropout of the kept values.
"""
from __future__ import annotations

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..runtime.dropout import BranchDropout
from ..runtime.reversible import ReversibleChain


class BranchDropoutPass(PassBase):
    def __init__(self) -> None:
        super().__init__()
        self.notes: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        swapped = present = 0
        for chain in gm.modules():
            if not isinstance(chain, ReversibleChain):
                continue
            for parent in list(chain.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Dropout:
                        replacement = BranchDropout(child.p, child.inplace)
                        replacement.train(child.training)
                        setattr(parent, name, replacement)
                        swapped += 1
                    elif isinstance(child, BranchDropout):
                        present += 1  # swapped when an earlier trace built this chain
        if swapped or present:
            self.notes.append(f"{swapped + present} dropout layer(s) in reversible branches draw "
                              "their masks from 32 random bits per element on CPU (BranchDropout)")
        return PassResult(gm, swapped > 0)
