"""Pass: make the ReLUs of reversible branches replay their sign choices in the backward.

Runs after the sparse pass (whose top-k modules replay their selections themselves). In every
branch GraphModule of every ``ReversibleChain``, each ReLU or LeakyReLU (``F.relu``,
``torch.relu``, ``x.relu()``, ``F.leaky_relu``, their in-place forms, ``nn.ReLU``,
``nn.LeakyReLU``, also the ``nn.ReLU``/``nn.LeakyReLU`` children of layers the trace keeps whole,
such as ``GINConv``'s MLP or PyG's ``MLP``) becomes a
:class:`~gsr_compiler.runtime.replayed_relu.ReplayedReLU`: the same function, whose elements
near 0 take the forward's side in the backward recompute
(:mod:`gsr_compiler.runtime.choices`).

Some discrete choices live inside a layer's own code, where no rewrite reaches: the LeakyReLU of
GAT attention logits, GENConv's ReLU of messages, max/min aggregation. They are not replayed;
the pass lists them (``node.meta["gsr_unreplayed"]`` on the chain's node, and ``explain()``), and
the chain's recompute check counts what they cost only through the replayed ones.

Each rewritten node of a branch carries ``meta["gsr_replay"]`` (``"sign"``). Rewriting is
idempotent: a chain reused by a retrace already holds ``ReplayedReLU`` and is left as it is.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..runtime.replayed_relu import ReplayedReLU
from ..runtime.sparse import GroupTopK, GroupTopKCompress
from .chain_nodes import chain_nodes
from .unused_submodules import delete_unused_submodules

__all__ = ["ReplayDiscreteChoices", "unreplayed_choices"]

# target -> (default negative slope, index of the slope argument or None)
_SIGN_FUNCTIONS = {F.relu: (0.0, None), torch.relu: (0.0, None), F.relu_: (0.0, None),
                   torch.relu_: (0.0, None), F.leaky_relu: (0.01, 1),
                   F.leaky_relu_: (0.01, 1)}
_SIGN_METHODS = {"relu": 0.0, "relu_": 0.0}
_IN_PLACE_FUNCTIONS = {F.relu_, torch.relu_, F.leaky_relu_}

# Layers whose own code makes a discrete choice that no rewrite reaches.
_INNER_CHOICES = {
    "GATConv": "LeakyReLU of attention logits",
    "GATv2Conv": "LeakyReLU of attention logits",
    "GENConv": "ReLU of messages",
}
_KINKED_AGGREGATIONS = {"max", "min"}


def unreplayed_choices(module: nn.Module) -> list[str]:
    """Discrete choices inside ``module`` (a layer the trace keeps whole) that are not replayed."""
    found = []
    for m in module.modules():
        what = _INNER_CHOICES.get(type(m).__name__)
        if what:
            found.append(f"{what} in {type(m).__name__}")
        aggr = getattr(m, "aggr", None)
        if isinstance(aggr, str) and aggr in _KINKED_AGGREGATIONS:
            found.append(f"{aggr} aggregation in {type(m).__name__}")
    return found


def _slope(node: fx.Node) -> float | None:
    """The negative slope of a ReLU-like node (0 for ReLU), or None for anything else."""
    if node.op == "call_function" and node.target in _SIGN_FUNCTIONS:
        default, at = _SIGN_FUNCTIONS[node.target]
        if at is None:
            return default
        slope = node.kwargs.get("negative_slope", node.args[at] if len(node.args) > at else default)
        return float(slope) if isinstance(slope, (int, float)) else None
    if node.op == "call_method" and node.target in _SIGN_METHODS:
        return _SIGN_METHODS[node.target]
    return None


def _in_place(node: fx.Node, module: nn.Module | None) -> bool:
    if node.op == "call_function":
        return node.target in _IN_PLACE_FUNCTIONS or bool(node.kwargs.get("inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    return bool(getattr(module, "inplace", False))


class ReplayDiscreteChoices(PassBase):
    """Swaps the ReLUs of reversible branches for :class:`ReplayedReLU`."""

    def __init__(self) -> None:
        super().__init__()
        self.notes: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node, chain in chain_nodes(gm):
            swapped, unreplayed = Counter(), Counter()
            for block in chain.blocks:
                for branch in block:
                    modified |= _rewrite_branch(branch, swapped, unreplayed)
            node.meta["gsr_unreplayed"] = dict(unreplayed)
            replayed = sum(1 for m in chain.modules() if isinstance(m, ReplayedReLU))
            selections = sum(1 for m in chain.modules()
                             if isinstance(m, (GroupTopK, GroupTopKCompress)))
            self.notes.append(
                f"{node.target}: {replayed} ReLU(s) replay their signs, {selections} top-k(s) "
                "their selections, in the backward recompute")
            for what, n in sorted(unreplayed.items()):
                self.notes.append(f"{node.target}: not replayed: {what} x{n} (inside the layer's "
                                  "own code); verify_gradients() measures its effect")
        return PassResult(gm, modified)


def _rewrite_branch(branch: fx.GraphModule, swapped: Counter, unreplayed: Counter) -> bool:
    graph, modified = branch.graph, False
    for node in list(graph.nodes):
        module = branch.get_submodule(node.target) if node.op == "call_module" else None
        if module is not None and not isinstance(module, ReplayedReLU):
            if type(module) in (nn.ReLU, nn.LeakyReLU):
                slope = getattr(module, "negative_slope", 0.0)
            else:
                modified |= _swap_children(module, swapped)
                for what in unreplayed_choices(module):
                    unreplayed[what] += 1
                continue
        elif module is None:
            slope = _slope(node)
        else:
            continue
        if slope is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        x = node.args[0]
        name = _free_name(branch, "replayed_relu")
        branch.add_module(name, ReplayedReLU(slope))
        with graph.inserting_after(node):
            new = graph.call_module(name, (x,))
        new.meta = dict(node.meta)
        new.meta["gsr_replay"] = "sign"
        if _in_place(node, module):
            # Later readers of x saw the in-place result: they read the new node instead.
            order = {n: i for i, n in enumerate(graph.nodes)}
            for user in list(x.users):
                if user is not new and user is not node and order[user] > order[node]:
                    user.replace_input_with(x, new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        swapped["ReLU" if slope == 0.0 else "LeakyReLU"] += 1
        modified = True
    if modified:
        graph.lint()
        delete_unused_submodules(branch)
        branch.recompile()
    return modified


def _swap_children(module: nn.Module, swapped: Counter) -> bool:
    """Swaps the ``nn.ReLU``/``nn.LeakyReLU`` modules inside a layer kept whole."""
    modified = False
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (nn.ReLU, nn.LeakyReLU):
                setattr(parent, name, ReplayedReLU(getattr(child, "negative_slope", 0.0)))
                swapped[type(child).__name__] += 1
                modified = True
    return modified


def _free_name(module: nn.Module, stem: str) -> str:
    i = 0
    while hasattr(module, f"{stem}_{i}"):
        i += 1
    return f"{stem}_{i}"
