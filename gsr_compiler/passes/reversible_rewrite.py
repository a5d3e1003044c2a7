"""Pass: replace each residual chain by one ``ReversibleChain`` module.

For every block of the chain and every channel group, the branch ``f`` is copied into
its own small GraphModule whose layers are fresh modules at 1/G of the width (see
``narrow_width``). The chain's nodes are then replaced by a single ``call_module`` node
taking the chain input and the side inputs the branches read (``edge_index``,
``edge_attr``, ``batch``, ...).

The rewrite changes the function: grouped coupling is a different (reversible)
architecture with fresh weights. ``explain()`` says so.
"""
from __future__ import annotations

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..runtime.reversible import ReversibleChain
from .find_residual_chains import ResidualBlock, ResidualChain
from .narrow_width import narrow_module
from .unused_submodules import delete_unused_submodules


def extract_branch(gm: fx.GraphModule, block: ResidualBlock, groups: int) -> fx.GraphModule:
    """The branch ``f`` of ``block`` as a GraphModule ``f(h, *side_inputs)`` at 1/groups
    of the width, with freshly initialized layers."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {block.skip: graph.placeholder("h")}
    for s in block.side_inputs:
        env[s] = graph.placeholder(s.name)
    root = nn.Module()
    for n in block.body:
        new = graph.node_copy(n, env.__getitem__)
        if n.op == "call_module":
            local = str(n.target).replace(".", "_")
            edge_width = n.meta.get("gsr_edge_width")  # set by FindResidualChains
            root.add_module(local, narrow_module(gm.get_submodule(n.target), groups,
                                                 edge_width=edge_width))
            new.target = local
        env[n] = new
    graph.output(env[block.branch])
    return fx.GraphModule(root, graph, class_name="GroupBranch")


class ReversibleRewrite(PassBase):
    """Rewrites the chains found by ``finder`` (a ``FindResidualChains`` run before it).

    ``registry`` maps a chain's structure to the module built for it, so that retracing
    the model (in eval mode, or for other non-tensor arguments) reuses the same
    parameters instead of making new ones.
    """

    def __init__(self, finder, groups: int, registry: dict,
                 guard: dict | None = None) -> None:
        super().__init__()
        self.finder = finder
        self.groups = groups
        # ReversibleChain's replay_margin, anchors and drift_tolerance.
        self.guard = dict(guard or {})
        self.registry = registry
        self.chain_names: list[str] = []
        self.notes: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        chains = self.finder.chains
        for chain in chains:
            self.chain_names.append(self._rewrite(gm, chain))
        if chains:
            delete_unused_submodules(gm)
            gm.graph.lint()
            gm.recompile()
            depth = sum(len(c.blocks) for c in chains)
            self.notes.append(
                f"{depth} residual block(s) -> grouped reversible coupling with {self.groups} groups"
            )
        return PassResult(gm, bool(chains))

    def _rewrite(self, gm: fx.GraphModule, chain: ResidualChain) -> str:
        side: list[fx.Node] = []
        for block in chain.blocks:
            for s in block.side_inputs:
                if s not in side:
                    side.append(s)
        side_index = [[side.index(s) for s in b.side_inputs] for b in chain.blocks]
        key = (self.groups, tuple(b.signature for b in chain.blocks))
        module = self.registry.get(key)
        if module is None:
            blocks = [[extract_branch(gm, b, self.groups) for _ in range(self.groups)]
                      for b in chain.blocks]
            module = ReversibleChain(blocks, side_index, **self.guard)
            module.train(gm.training)
            self.registry[key] = module
            module.gsr_name = f"gsr_chain_{len(self.registry) - 1}"
        name = module.gsr_name
        gm.add_submodule(name, module)

        last = chain.blocks[-1].add
        with gm.graph.inserting_before(last):
            call = gm.graph.call_module(name, (chain.blocks[0].skip, *side))
        call.meta = dict(last.meta)
        last.replace_all_uses_with(call)
        doomed = [n for b in chain.blocks for n in b.body + [b.add]]
        for n in reversed(doomed):
            gm.graph.erase_node(n)
        return name
