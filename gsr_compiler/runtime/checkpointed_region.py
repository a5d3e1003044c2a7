"""The code a user checkpointed as a function, ``checkpoint(fn, *args)``, as one module.

The tracer follows ``fn`` (what it reads is then part of the graph, closures included) and the
nodes it ran become this module's ``body``, a GraphModule of their own, so that the model keeps
the checkpoint as written (``passes/restore_checkpoints.py``) or a chain takes the call as a
block's branch. The body calls the user's own layers (the same objects), which stay registered
in the model under their own names; ``state_dict`` lists them there only
(:mod:`~gsr_compiler.runtime.shared_layers`).
"""
from __future__ import annotations

import hashlib
from typing import Any

from torch import fx, nn

from .shared_layers import alias_pairs, register_alias_hooks

__all__ = ["CheckpointedRegion", "code_digest"]


def code_digest(body: fx.GraphModule) -> str:
    """A short digest of the Python code ``body`` runs."""
    return hashlib.sha1(body.code.encode()).hexdigest()[:8]


class CheckpointedRegion(nn.Module):
    """Runs ``body(*args)``, the traced nodes of a checkpointed function.

    Args:
        body: the function's nodes, taking the values it read from the rest of the graph.
        function: the function's qualified name, for ``repr`` and ``explain()``.
        shared: ``{name in body: path of the same module in the model}``.
    """

    def __init__(self, body: fx.GraphModule, function: str, shared: dict[str, str]) -> None:
        super().__init__()
        self.body = body
        self.function = function
        self.shared = dict(shared)
        register_alias_hooks(self)

    def alias_keys(self) -> list[tuple[str, str]]:
        return alias_pairs(self.body, "body.", self.shared)

    def extra_repr(self) -> str:
        # Two traces (train and eval) may run different code for one function: the code is
        # part of what makes two regions the same.
        return f"function={self.function}, code={code_digest(self.body)}"

    def forward(self, *args: Any) -> Any:
        return self.body(*args)
