"""Pass: drop operations that do nothing, so they do not split residual chains.

PyG's ``DeepGCNLayer(block='res')`` ends with ``F.dropout(x + h, p=0.0)`` by default,
and models often hold ``nn.Identity`` placeholders; both sit between residual blocks.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .unused_submodules import delete_unused_submodules


def _is_no_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, nn.Identity) or (
            type(module) in (nn.Dropout, nn.AlphaDropout) and module.p == 0
        )
    if node.op == "call_function" and node.target in (F.dropout, F.alpha_dropout):
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        return p == 0
    return False


class RemoveNoOps(PassBase):
    def __init__(self) -> None:
        super().__init__()
        self.notes: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        removed = 0
        for node in list(gm.graph.nodes):
            if _is_no_op(gm, node) and node.args and isinstance(node.args[0], fx.Node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                removed += 1
        if removed:
            delete_unused_submodules(gm)
            gm.recompile()
            self.notes.append(f"{removed} identity / zero-rate dropout op(s) removed")
        return PassResult(gm, removed > 0)
