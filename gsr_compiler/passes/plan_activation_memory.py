"""Pass: plan the activations of one step in one arena, and hand the chains their arena.

Runs last. It computes the live intervals of one step of the rewritten graph
(``activation_liveness``: forward, and in training mode what the backward and the reversible
recompute need), plans them with ``plan_arena`` at the traced input size, and keeps the result
for ``explain()``. With ``GSRConfig.plan_memory`` it registers every ``ReversibleChain``'s
coupling scratch in the model's ``CouplingArena`` and attaches the arena to the chain, so the
runtime runs the coupling in place inside it; without, it detaches it. The graph itself is not
changed.
"""
from __future__ import annotations

from typing import Optional

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..runtime.arena import ArenaPlan
from ..runtime.arena.coupling_arena import CouplingArena
from ..runtime.reversible import ReversibleChain
from .activation_liveness import ActivationLiveness, activation_liveness


class PlanActivationMemory(PassBase):
    """Args:
        training: plan a training step (forward and backward) or one forward.
        arena: the model's arena when ``plan_memory`` is on, else None.
    """

    def __init__(self, training: bool, arena: Optional[CouplingArena]) -> None:
        super().__init__()
        self.training = training
        self.arena = arena
        self.liveness: Optional[ActivationLiveness] = None
        self.plan: Optional[ArenaPlan] = None
        self.placed_plan: Optional[ArenaPlan] = None
        self.notes: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        chains = _chains(gm)
        for name, chain, width in chains:
            if self.arena is not None:
                self.arena.add_chain(name, chain.groups, chain.group_width(width))
            chain.coupling_arena = self.arena
        self.liveness = activation_liveness(gm, self.training)
        self.plan = self.liveness.plan()
        self.placed_plan = self.liveness.plan_placed()
        what = "training step" if self.training else "forward"
        note = f"{len(self.plan)} live intervals of one {what} planned"
        if chains:
            where = "in the arena" if self.arena is not None else "as separate tensors (plan_memory=False)"
            note += f"; coupling of {len(chains)} chain(s) runs {where}"
        self.notes.append(note)
        return PassResult(gm, False)


def _chains(gm: fx.GraphModule) -> list[tuple[str, ReversibleChain, int]]:
    """(name, module, channel width) of every chain the graph calls, once each."""
    seen: dict[str, tuple[str, ReversibleChain, int]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, ReversibleChain):
            continue
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if shape is None or not len(shape):
            continue  # no traced width: the chain runs without the arena
        if getattr(module, "gsr_name", None) is None:  # the runtime finds its scratch by it
            module.gsr_name = str(node.target)
        name = module.gsr_name
        seen[node.target] = (name, module, int(shape[-1]))
    return list(seen.values())
