"""Pass: find chains of residual blocks ``h = h + f(h)``.

A residual block is an addition whose one operand ``h`` is an ancestor of the other,
``f(h)``, where the branch ``f`` (every node between them) is used by nothing outside
the block, and has the width of ``h``. Consecutive blocks form a chain when each block's
output is consumed only by the next block. The pass only analyses; ``ReversibleRewrite``
changes the graph.

Each chain gets a coupling (``GSRConfig.coupling``): ``"grouped"`` needs every layer and
operation of its branches to have a group-wise form (a width rule, ``narrow_width``) and raises,
naming the layer, where one has none; ``"two-stream"`` runs the branches as they are, whatever
they hold; ``"auto"`` picks grouped for a chain whose every block can be split and two-stream
otherwise, except that a chain of one block that cannot be split is recomputed instead
(``"recompute"``: ``RecomputedBlock`` keeps the block's input, where two streams would keep
twice that). The choice and its reason are recorded on each block's addition node
(``node.meta["gsr_coupling"]``), which the chain's call node inherits.

A layer of a grouped branch that reads edge features (a floating ``[E, edge_dim]`` tensor
from outside the branch, bound to the argument ``EDGE_FEATURE_ARGUMENT`` names) gets
``node.meta["gsr_edge_width"] = edge_dim``, which the width rewrite needs; any other floating
feature tensor a layer reads from outside the branch makes the block ungroupable.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import GSRCompileError
from .layer_types import EDGE_FEATURE_ARGUMENT, qualified_name
from .narrow_width import NarrowingError, narrow_module, supported_module_names
from .propagate_shapes import node_bytes, node_shape

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}

# Functions and tensor methods that act channel-wise and so survive splitting into groups.
ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.gelu, F.elu, F.selu, F.celu,
    F.leaky_relu, F.silu, F.mish, F.softplus, F.hardtanh, F.hardswish, F.sigmoid, F.tanh,
    torch.tanh, torch.sigmoid, F.dropout, F.alpha_dropout,
    operator.add, operator.iadd, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.neg,
}
ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "add", "add_", "sub", "mul", "mul_", "div", "neg",
    "clone", "contiguous",
}


@dataclass
class ResidualBlock:
    """One ``h + f(h)``: its input, the branch's nodes, and what else the branch reads."""

    skip: fx.Node
    add: fx.Node
    branch: fx.Node
    body: list[fx.Node]
    side_inputs: list[fx.Node]
    width: int
    # Why the branch cannot be split into groups (None: it can).
    grouped_refusal: str | None = None

    @property
    def module_names(self) -> list[str]:
        return [n.target for n in self.body if n.op == "call_module"]

    @property
    def signature(self) -> tuple:
        return tuple(str(n.target) for n in self.body)

    def describe(self) -> str:
        names = self.module_names
        return names[0] if names else self.add.name


@dataclass
class ResidualChain:
    blocks: list[ResidualBlock] = field(default_factory=list)
    coupling: str = "grouped"  # or "two-stream", "recompute"
    # Why grouped was not chosen ("" when two-stream was asked for, or for grouped chains).
    reason: str = ""

    @property
    def width(self) -> int:
        return self.blocks[0].width

    @property
    def first_module(self) -> str:
        return self.blocks[0].describe()

    @property
    def last_module(self) -> str:
        names = self.blocks[-1].module_names
        return names[-1] if names else self.blocks[-1].add.name

    def stored_bytes_plain(self) -> int:
        """Upper estimate of what eager autograd keeps for this chain: every
        intermediate of every block."""
        return sum(node_bytes(n) for b in self.blocks for n in b.body + [b.add])

    def stored_bytes_reversible(self) -> int:
        # A two-stream chain keeps both streams; a recomputed block its input.
        return node_bytes(self.blocks[-1].add) * (2 if self.coupling == "two-stream" else 1)


def residual_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of a plain addition (no ``alpha``), else None."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        pass
    else:
        return None
    if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return None
    return a, b


def _bound_arguments(node: fx.Node, module) -> list[tuple[str | None, object]]:
    """``(parameter name, value)`` of each argument of a ``call_module`` node, the name
    ``None`` where ``forward``'s signature does not tell."""
    try:
        bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return [(None, a) for a in node.args] + list(node.kwargs.items())
    named = []
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            named += [(None, v) for v in value]
        elif kind == inspect.Parameter.VAR_KEYWORD:
            named += list(value.items())
        else:
            named.append((name, value))
    return named


def edge_features_of(node: fx.Node, module, skip: fx.Node, in_body: set
                     ) -> tuple[int | None, str | None]:
    """The width of the edge features a layer of a branch reads (``None`` if it reads
    none), or why the layer cannot be split: it reads a floating feature tensor from outside
    the branch that is not its edge features."""
    edge_argument = EDGE_FEATURE_ARGUMENT.get(type(module))
    width = None
    found: list[tuple[str | None, fx.Node]] = []
    for name, value in _bound_arguments(node, module):
        # Tuples such as PyG's bipartite ``(x_src, x_dst)`` hold nodes too.
        fx.node.map_arg(value, lambda v, name=name: found.append((name, v)))
    for name, value in found:
        if value is skip or value in in_body:
            continue
        meta = value.meta.get("tensor_meta")
        shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
        if shape is None or dtype is None or not dtype.is_floating_point or len(shape) < 2:
            continue  # edge_index, batch, edge weights [E], scalars: not split
        if name is not None and name == edge_argument:
            width = int(shape[-1])
            continue
        what = f"argument '{name}'" if name else "an argument"
        return None, (f"{qualified_name(type(module))} reads {what} '{value.name}' of shape "
                      f"{tuple(shape)} from outside the branch; only the edge features of "
                      f"{', '.join(sorted(t.__name__ for t in EDGE_FEATURE_ARGUMENT))} "
                      "have a group-wise form")
    return width, None


class FindResidualChains(PassBase):
    """Finds residual chains; results in ``self.chains``, refusals in ``self.rejected``."""

    def __init__(self, groups: int, min_chain_blocks: int = 1, coupling: str = "grouped") -> None:
        super().__init__()
        self.groups = groups
        self.coupling = coupling
        self.min_chain_blocks = min_chain_blocks
        self.chains: list[ResidualChain] = []
        self.rejected: list[tuple[str, str]] = []
        self.notes: list[str] = []
        self._narrowable: dict[tuple, str | None] = {}

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = list(gm.graph.nodes)
        self._order = {n: i for i, n in enumerate(nodes)}
        self._gm = gm
        claimed: set[fx.Node] = set()
        blocks: list[ResidualBlock] = []
        for node in nodes:
            operands = residual_operands(node)
            if operands is None:
                continue
            block = self._block_at(node, operands, claimed)
            if block is not None:
                blocks.append(block)
                claimed.update(block.body)
                claimed.add(block.add)
        self.chains = self._link(blocks)
        self.notes.append(
            f"{sum(len(c.blocks) for c in self.chains)} residual block(s) in "
            f"{len(self.chains)} chain(s)"
        )
        return PassResult(gm, False)

    # -- one block -------------------------------------------------------------------

    def _block_at(self, add, operands, claimed) -> ResidualBlock | None:
        a, b = operands
        candidates = [(a, b), (b, a)] if self._order[a] <= self._order[b] else [(b, a), (a, b)]
        for skip, branch in candidates:
            body, side = self._collect_body(skip, branch)
            if body is None:
                continue
            reason = self._refusal(skip, add, branch, body, claimed)
            if reason is None:
                grouped = self._grouped_refusal(skip, body)
                if grouped is not None and self.coupling == "grouped":
                    raise GSRCompileError(
                        f"coupling='grouped': the {self._location(body, add)} cannot be split "
                        f"into {self.groups} groups: {grouped}. Use coupling='two-stream' (runs "
                        "the block's own layers at full width, with their own weights) or "
                        "coupling='auto' (grouped where every layer has a width rule, "
                        "two-stream elsewhere)." + (
                            f" Layers with a width rule: {', '.join(supported_module_names())}."
                            if "no width rule" in grouped else ""))
                return ResidualBlock(skip, add, branch, body, side, node_shape(add)[-1],
                                     grouped)
            if reason:  # an empty reason marks an addition that is not a residual block
                self.rejected.append((self._location(body, add), reason))
            return None
        return None

    @staticmethod
    def _location(body: list[fx.Node], add: fx.Node) -> str:
        """The block's first user module, for messages."""
        for n in body:
            if n.op == "call_module" and not str(n.target).startswith("gsr_"):
                return f"block at '{n.target}'"
        return f"block ending at '{add.name}'"

    def _collect_body(self, skip: fx.Node, branch: fx.Node):
        """Nodes that descend from ``skip`` and lead to ``branch``, in graph order, and
        the nodes outside the block that they read. ``(None, None)`` if ``skip`` does not
        lead to ``branch``."""
        start = self._order[skip]
        seen, stack = set(), [branch]
        while stack:
            n = stack.pop()
            if n in seen or n is skip or self._order[n] <= start:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        body: list[fx.Node] = []
        in_body: set[fx.Node] = set()
        for n in sorted(seen, key=self._order.__getitem__):
            if any(i is skip or i in in_body for i in n.all_input_nodes):
                body.append(n)
                in_body.add(n)
        if branch not in in_body:
            return None, None
        side: list[fx.Node] = []
        for n in body:
            for i in n.all_input_nodes:
                if i is not skip and i not in in_body and i not in side:
                    side.append(i)
        return body, side

    def _refusal(self, skip, add, branch, body, claimed) -> str | None:
        in_body = set(body)
        if any(n in claimed for n in body):
            return ""  # a residual connection around blocks already found
        shape_h, shape_f, shape_y = node_shape(skip), node_shape(branch), node_shape(add)
        if shape_h is None or shape_h != shape_f or shape_h != shape_y or len(shape_h) < 2:
            return ""  # not a width-preserving residual addition of node features
        for n in body:
            outside = [u for u in n.users if u not in in_body and not (n is branch and u is add)]
            if outside:
                return f"intermediate '{n.name}' of the block is also used by '{outside[0].name}'"
        return None

    def _grouped_refusal(self, skip, body) -> str | None:
        """Why the branch cannot be split into groups (None: it can)."""
        if self.coupling == "two-stream":
            return None  # not asked: the branch runs as it is
        in_body = set(body)
        width = node_shape(skip)[-1]
        if width % self.groups:
            return (f"its width {width} is not divisible by groups={self.groups} (choose groups "
                    f"dividing {width})")
        # Layers first: a missing width rule is the most useful thing to report.
        for n in sorted(body, key=lambda n: n.op != "call_module"):
            reason = self._unsupported(n, skip, in_body)
            if reason:
                return reason
        return None

    def _unsupported(self, n: fx.Node, skip: fx.Node, in_body: set) -> str | None:
        if n.op == "call_module":
            module = self._gm.get_submodule(n.target)
            edge_width, reason = edge_features_of(n, module, skip, in_body)
            # A layer without any width rule says so first: the most useful thing to report.
            error = self._narrowing_error(module, None if reason else edge_width)
            if error is None and reason is None and edge_width is not None:
                n.meta["gsr_edge_width"] = edge_width
            error = error or reason
            return None if error is None else f"'{n.target}': {error}"
        if n.op == "call_function" and n.target in ELEMENTWISE_FUNCTIONS or (
            n.op == "call_method" and n.target in ELEMENTWISE_METHODS
        ):
            for a in n.all_input_nodes:
                if a is not skip and a not in in_body and node_shape(a) not in ((), (1,)):
                    return f"'{n.name}' combines the branch with '{a.name}', which is not split into groups"
            return None
        what = getattr(n.target, "__name__", str(n.target))
        return f"operation '{what}' ({n.op}) has no group-wise form"

    def _narrowing_error(self, module, edge_width: int | None) -> str | None:
        """Why ``module`` cannot be narrowed (called with edge features of ``edge_width``),
        or None. Deep models repeat one block: each distinct configuration is tried once."""
        key = (type(module), repr(module), edge_width,
               tuple((k, tuple(v.shape)) for k, v in module.state_dict().items()))
        if key not in self._narrowable:
            try:
                narrow_module(module, self.groups, edge_width=edge_width)
                self._narrowable[key] = None
            except NarrowingError as e:
                self._narrowable[key] = str(e)
        return self._narrowable[key]

    # -- chains ----------------------------------------------------------------------

    def _link(self, blocks: list[ResidualBlock]) -> list[ResidualChain]:
        chains: list[ResidualChain] = []
        current = ResidualChain()
        for block in blocks:
            prev = current.blocks[-1] if current.blocks else None
            follows = (
                prev is not None
                and block.skip is prev.add
                and block.width == prev.width
                and all(u in set(block.body) or u is block.add for u in prev.add.users)
            )
            if not follows and current.blocks:
                chains.append(current)
                current = ResidualChain()
            current.blocks.append(block)
        if current.blocks:
            chains.append(current)
        for chain in chains:
            refused = [b for b in chain.blocks if b.grouped_refusal is not None]
            if self.coupling == "two-stream":
                chain.coupling = "two-stream"
            elif refused:  # "auto"; "grouped" raised at the block already
                # One block in two streams keeps twice what its recompute keeps: its input.
                chain.coupling = "two-stream" if len(chain.blocks) > 1 else "recompute"
                why = refused[0].grouped_refusal
                chain.reason = why if why.startswith("'") else f"'{refused[0].describe()}': {why}"
            for b in chain.blocks:
                b.add.meta["gsr_coupling"] = {"coupling": chain.coupling, "reason": chain.reason}
        kept = []
        for chain in chains:
            if len(chain.blocks) >= self.min_chain_blocks:
                kept.append(chain)
            else:
                self.rejected.append(
                    (chain.first_module, f"chain of {len(chain.blocks)} block(s) is shorter than "
                     f"min_chain_blocks={self.min_chain_blocks}")
                )
        return kept
