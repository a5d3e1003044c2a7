"""Pass: turn ``F.dropout(x, p, training=self.training)`` into an ``nn.Dropout`` module.

torch.fx evaluates ``self.training`` while tracing and bakes the result into the graph
as a constant. Dropout calls whose flag equals the mode the model was traced in are
replaced by ``nn.Dropout(p)`` submodules, which follow ``train()``/``eval()`` of the
compiled module. A call with a flag that differs from the traced mode was written that
way on purpose (e.g. Monte-Carlo dropout) and is left alone.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

_DROPOUTS = {F.dropout: nn.Dropout, F.alpha_dropout: nn.AlphaDropout}


class FunctionalDropoutToModule(PassBase):
    def __init__(self, traced_training: bool) -> None:
        super().__init__()
        self.traced_training = traced_training
        self.notes: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        count = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _DROPOUTS:
                continue
            x = node.args[0]
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            inplace = node.kwargs.get("inplace", node.args[3] if len(node.args) > 3 else False)
            if training != self.traced_training or not isinstance(p, float | int):
                continue
            name = f"gsr_dropout_{count}"
            gm.add_submodule(name, _DROPOUTS[node.target](p=float(p), inplace=bool(inplace)))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (x,))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            count += 1
        if count:
            gm.recompile()
            self.notes.append(f"{count} functional dropout call(s) now follow train()/eval()")
        return PassResult(gm, count > 0)
