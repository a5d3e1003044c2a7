"""The reversible chains a rewritten graph calls, each with the first node that calls it."""
from __future__ import annotations

from torch import fx

from ..runtime.reversible import ReversibleChain


def chain_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, ReversibleChain]]:
    """``(node, chain)`` for every ``ReversibleChain`` submodule ``gm`` calls, in graph order,
    each once (a chain called twice is one module)."""
    seen: set[str] = set()
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, ReversibleChain):
            seen.add(node.target)
            found.append((node, module))
    return found
