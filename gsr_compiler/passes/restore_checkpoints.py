"""Pass: keep the user's ``torch.utils.checkpoint`` calls that no chain converted.

The tracer records ``checkpoint(module, *args)`` as a call of ``module`` marked
``node.meta["gsr_checkpoint"]``, so that chain finding sees the module itself. A block whose
call became part of a reversible chain needs no checkpoint (the chain rebuilds its
activations); every other marked call is turned back into
``torch.utils.checkpoint.checkpoint(module, *args, **options)`` with the user's own options,
so the compiled model never keeps more for backward than the model as written.

Runs last: the passes before it see ordinary ``call_module`` nodes.
"""
from __future__ import annotations

import torch.utils.checkpoint
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..tracer import CheckpointRecord


class RestoreCheckpoints(PassBase):
    def __init__(self) -> None:
        super().__init__()
        self.kept: list[CheckpointRecord] = []
        self.notes: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        for node in list(gm.graph.nodes):
            record = node.meta.get("gsr_checkpoint")
            if node.op != "call_module" or record is None:
                continue
            with gm.graph.inserting_before(node):
                module = gm.graph.get_attr(node.target)
                call = gm.graph.call_function(
                    torch.utils.checkpoint.checkpoint, (module, *node.args),
                    {**node.kwargs, **dict(record.options)})
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
            self.kept.append(record)
        if self.kept:
            gm.recompile()
            self.notes.append(f"{len(self.kept)} checkpointed call(s) kept as written")
        return PassResult(gm, bool(self.kept))
