"""Pass: replace each residual chain by one ``ReversibleChain`` module (or, for a chain of one
block that cannot be split into groups, a ``RecomputedBlock``).

A chain with grouped coupling: for every block of the chain and every channel group, the
branch ``f`` is copied into its own small GraphModule whose layers are fresh modules at 1/G
of the width (see ``narrow_width``). A two-stream chain (``TwoStreamChain``): each block's
branch becomes one GraphModule that calls the user's own layers (the same objects) at full
width; those layers stay registered in the model under their own names, which keeps the
model's ``state_dict`` keys (``TwoStreamChain.alias_keys``). Either way the chain's nodes are then
replaced by a single ``call_module`` node taking the chain input and the side inputs the
branches read (``edge_index``, ``edge_attr``, ``x0``, ``batch``, ...).

The rewrite changes the function: grouped coupling is a different (reversible)
architecture with fresh weights; two-stream coupling keeps the weights but lets each branch
read another sum of the earlier branches (docs/runtime.md). ``explain()`` says so. A
recomputed block is the block as written.
"""
from __future__ import annotations

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..runtime.recomputed_block import RecomputedBlock
from ..runtime.reversible import ReversibleChain
from ..runtime.two_stream import TwoStreamChain
from .find_residual_chains import ResidualBlock, ResidualChain
from .narrow_width import narrow_module
from .unused_submodules import delete_unused_submodules


def extract_branch(gm: fx.GraphModule, block: ResidualBlock, groups: int) -> fx.GraphModule:
    """The branch ``f`` of ``block`` as a GraphModule ``f(h, *side_inputs)`` at 1/groups
    of the width, with freshly initialized layers."""
    branch, _ = _copy_branch(gm, block, block.side_inputs,
                             lambda m, n: narrow_module(  # gsr_edge_width: set by FindResidualChains
                                 m, groups, edge_width=n.meta.get("gsr_edge_width")),
                             "GroupBranch")
    return branch


def extract_full_branch(gm: fx.GraphModule, block: ResidualBlock, side: list[fx.Node]
                        ) -> tuple[fx.GraphModule, dict[str, str]]:
    """The branch ``f`` of ``block`` as a GraphModule ``f(h, *side)`` calling the model's own
    layers (the same objects), and ``{name in the branch: path in gm}`` of those layers.
    ``side`` lists the side inputs of the block's pair; the block reads its own among them."""
    return _copy_branch(gm, block, side, lambda m, n: m, "StreamBranch")


def _copy_branch(gm, block, side, make, class_name):
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {block.skip: graph.placeholder("h")}
    for s in side:
        env[s] = graph.placeholder(s.name)
    root = nn.Module()
    shared: dict[str, str] = {}
    for n in block.body:
        new = graph.node_copy(n, env.__getitem__)
        if n.op == "call_module":
            local = str(n.target).replace(".", "_")
            if not hasattr(root, local):
                root.add_module(local, make(gm.get_submodule(n.target), n))
                shared[local] = str(n.target)
            new.target = local
        env[n] = new
    graph.output(env[block.branch])
    return fx.GraphModule(root, graph, class_name=class_name), shared


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
            # A two-stream chain's layers stay registered under their own names: kept, as
            # modules a used module reaches.
            delete_unused_submodules(gm)
            gm.graph.lint()
            gm.recompile()
            grouped = sum(len(c.blocks) for c in chains if c.coupling == "grouped")
            if grouped:
                self.notes.append(f"{grouped} residual block(s) -> grouped reversible coupling "
                                  f"with {self.groups} groups")
            for name, chain in zip(self.chain_names, chains):
                why = f" (grouped impossible: {chain.reason})" if chain.reason else ""
                if chain.coupling == "recompute":
                    self.notes.append(
                        f"{name}: 1 residual block -> recomputed in the backward, keeping only "
                        f"its input (two streams would keep twice that){why}")
                elif chain.coupling == "two-stream":
                    self.notes.append(
                        f"{name}: {len(chain.blocks)} residual block(s) -> two-stream reversible "
                        f"coupling with the model's own layers at full width{why}")
        return PassResult(gm, bool(chains))

    def _rewrite(self, gm: fx.GraphModule, chain: ResidualChain) -> str:
        side: list[fx.Node] = []
        for block in chain.blocks:
            for s in block.side_inputs:
                if s not in side:
                    side.append(s)
        if chain.coupling in ("two-stream", "recompute"):
            key = (chain.coupling, tuple(b.signature for b in chain.blocks))
        else:
            key = (self.groups, tuple(b.signature for b in chain.blocks))
        module = self.registry.get(key)
        if module is None and chain.coupling == "two-stream":
            module = self._two_stream(gm, chain, side)
        elif module is None and chain.coupling == "recompute":
            branch, shared = extract_full_branch(gm, chain.blocks[0], side)
            module = RecomputedBlock(branch, shared)
        elif module is None:
            side_index = [[side.index(s) for s in b.side_inputs] for b in chain.blocks]
            blocks = [[extract_branch(gm, b, self.groups) for _ in range(self.groups)]
                      for b in chain.blocks]
            module = ReversibleChain(blocks, side_index, **self.guard)
        if key not in self.registry:
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

    def _two_stream(self, gm: fx.GraphModule, chain: ResidualChain, side: list[fx.Node]
                    ) -> TwoStreamChain:
        """Blocks 2k and 2k + 1 share coupling block k; both read the pair's side inputs."""
        branches, shared, side_index = [], [], []
        for k in range(0, len(chain.blocks), 2):
            pair = chain.blocks[k:k + 2]
            pair_side: list[fx.Node] = []
            for b in pair:
                pair_side += [s for s in b.side_inputs if s not in pair_side]
            side_index.append([side.index(s) for s in pair_side])
            for b in pair:
                branch, names = extract_full_branch(gm, b, pair_side)
                branches.append(branch)
                shared.append(names)
        return TwoStreamChain(branches, side_index, shared, **self.guard)
