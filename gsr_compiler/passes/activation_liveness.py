r"""Liveness of the activations of one step of a compiled graph, symbolic in N and E.

Walks the rewritten graph in the order it runs and numbers the steps:

* **forward**: every node of the top-level graph; a ``ReversibleChain`` call expands into its
  blocks: per block and group, the branch's nodes (run without grad) and the coupling update
  :math:`y_i = x_i + f_i(y_{i-1})`;
* **backward** (graphs traced in training mode): the nodes in reverse; a chain expands into what
  its backward runs, one block at a time: per group (last to first) the branch recomputed with
  grad, the branch's backward, the inverse :math:`x_i = y_i - f_i` and the gradient sums.

Every tensor becomes a :class:`~gsr_compiler.runtime.arena.LiveInterval` from the step that
writes it to the last step that reads it, inclusive; a tensor autograd keeps is read again at
the backward step of the op that keeps it. Gradients live from the step that produces them to
the step of their producer's backward. The coupling scratch of the chains (the groups and their
gradients, updated in place: ``runtime/arena/coupling_arena.py``) is marked *placed*: that is
what the runtime keeps in the arena under ``GSRConfig.plan_memory``.

What each op keeps for backward follows autograd's rules for the common cases: additions and
views keep nothing; ReLU, sigmoid, tanh, the group top-k and a reversible chain keep their
output (a chain also its side inputs); dropout keeps a one-byte mask per element; anything
else keeps its tensor inputs. A message-passing layer also materializes its messages
(``[E, C]``) while it runs (twice over for GCN/GAT/GEN, which scale them per edge), and those
layers keep one copy for backward. What the ops inside a message-passing layer keep (``SAGEConv``'s
aggregated neighbourhood, ``GINConv``'s hidden layer) is measured by running the layer on small
inputs of the traced shapes (``passes/layer_internals.py``), and so are the high points of the
bytes its forward and its backward allocate (messages, index tensors, the gradients of what it
kept); for such a layer these replace the message rules above. Other op-internal scratch,
parameters, their gradients
and optimizer state are not counted. The sizes are exact for what the graph shows and estimates
for the inside of layers.

Sizes are symbolic: the first dimension of a shape that equals the traced node count N (else
the edge count E) scales with it; other dimensions are constants. N is the first dimension of
the first chain's input (else of the first floating-point input), E the last dimension of the
first integer input of shape ``[2, E]`` (``edge_index``), else the number of stored entries of
the first sparse adjacency input (``adj_t``, ``node.meta["gsr_num_edges"]`` from
``PropagateShapes``). A layer that aggregates over a sparse adjacency with its own fused
``message_and_aggregate`` (a sparse matrix product: GCN, SAGE, GIN, GraphConv) materializes no
``[E, C]`` messages; one without it (GAT, GEN) still does. Inside a chain's branches the layers
are narrowed to 1/G of the width, so the last dimension of a traced shape is divided by G.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..runtime.arena import ArenaPlan, LiveInterval, SymbolicSize, plan_arena
from ..runtime.arena.coupling_arena import scratch_buffer_names
from ..runtime.replayed_relu import ReplayedReLU
from ..runtime.reversible import ReversibleChain
from ..runtime.sparse import CompressedDropout, GroupTopK, GroupTopKCompress
from ..runtime.sparse.compressed import compressed_nbytes_per_row
from ..runtime.sparse.conv import _CompressedMessagePassing
from ..runtime.sparse.norm_topk import LayerNormGroupTopKCompress
from .layer_internals import LayerMemory, internal_saved_bytes

try:
    from torch_geometric.nn.conv import MessagePassing

    _MESSAGE_PASSING: tuple = (MessagePassing, _CompressedMessagePassing)
except ImportError:  # pragma: no cover
    _MESSAGE_PASSING = (_CompressedMessagePassing,)

__all__ = ["ActivationLiveness", "activation_liveness", "graph_size"]

# Ops whose output aliases their (first) input: no new bytes, and uses extend the input's life.
_ALIAS_FUNCTIONS = {operator.getitem, torch.reshape, torch.flatten, torch.squeeze,
                    torch.unsqueeze, torch.transpose, torch.narrow, torch.chunk, torch.split,
                    operator.iadd, operator.isub, operator.imul, F.relu_, torch.relu_}
_ALIAS_METHODS = {"view", "view_as", "reshape", "flatten", "squeeze", "unsqueeze", "transpose",
                  "permute", "expand", "expand_as", "narrow", "chunk", "split", "contiguous",
                  "detach", "t"}
# Ops that keep nothing for backward.
_KEEP_NOTHING_FUNCTIONS = {operator.add, operator.sub, operator.neg, torch.add, torch.sub,
                           torch.neg, torch.cat, torch.stack}
_KEEP_NOTHING_METHODS = {"add", "sub", "neg", "clone", "to", "float", "double", "half", "sum",
                         "mean"}
# Ops that keep their output (their backward reads the result, not the input).
_KEEP_OUTPUT_FUNCTIONS = {F.relu, torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh}
_KEEP_OUTPUT_METHODS = {"relu", "sigmoid", "tanh"}
_KEEP_OUTPUT_MODULES = (nn.ReLU, ReplayedReLU, nn.Sigmoid, nn.Tanh, GroupTopK, GroupTopKCompress,
                        ReversibleChain)
# Message-passing layers whose messages are scaled per edge, so autograd keeps them.
_KEEPS_MESSAGES = {"GCNConv", "GATConv", "GATv2Conv", "GENConv"}


def _fuses_messages(module) -> bool:
    """Whether a message-passing layer has its own ``message_and_aggregate``, which PyG runs
    for a sparse adjacency instead of building the messages."""
    try:
        from torch_geometric.nn import MessagePassing
    except ImportError:  # pragma: no cover
        return False
    own = getattr(type(module), "message_and_aggregate", None)
    return isinstance(module, MessagePassing) and own is not MessagePassing.message_and_aggregate


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------
# What a value is: its shape (or compressed form) and dtype, and its symbolic size
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    """A value's shape and dtype; ``compressed=(k, group)`` for a compressed activation of
    dense shape ``shape`` (``k`` values kept per group of ``group`` channels)."""

    shape: tuple
    dtype: torch.dtype
    compressed: Optional[tuple] = None


class _Sizes:
    """Turns shapes into sizes symbolic in N and E."""

    def __init__(self, num_nodes: int, num_edges: int) -> None:
        self.N, self.E = int(num_nodes), int(num_edges)

    def _rows(self, shape: tuple) -> tuple[str, int]:
        """('N' | 'E' | 'const', the product of the other dimensions)."""
        for i, d in enumerate(shape):
            if d == self.N or (self.E and d == self.E):
                rest = 1
                for k, other in enumerate(shape):
                    if k != i:
                        rest *= int(other)
                return ("N" if d == self.N else "E"), rest
        total = 1
        for d in shape:
            total *= int(d)
        return "const", total

    def size(self, t: Optional[_Tensor]) -> SymbolicSize:
        if t is None:
            return SymbolicSize()
        kind, rest = self._rows(t.shape)
        if t.compressed is not None:
            k, group = t.compressed
            rest = compressed_nbytes_per_row(int(t.shape[-1]), k, group, t.dtype) * \
                (rest // int(t.shape[-1]) if t.shape[-1] else 0)
        else:
            rest *= _itemsize(t.dtype)
        return self._scaled(kind, rest)

    def per_element(self, t: _Tensor, nbytes: int) -> SymbolicSize:
        """``nbytes`` per element of ``t`` (per kept value when compressed)."""
        kind, rest = self._rows(t.shape)
        if t.compressed is not None:
            k, group = t.compressed
            rest = rest // int(t.shape[-1]) * (int(t.shape[-1]) // group) * k
        return self._scaled(kind, rest * nbytes)

    @staticmethod
    def _scaled(kind: str, nbytes: int) -> SymbolicSize:
        if kind == "N":
            return SymbolicSize(per_node=nbytes)
        if kind == "E":
            return SymbolicSize(per_edge=nbytes)
        return SymbolicSize(const=nbytes)


def _traced(node: fx.Node, narrow: int = 1) -> Optional[_Tensor]:
    """The traced shape of ``node``; the last dimension divided by ``narrow`` (branch layers
    are 1/G of the traced width)."""
    meta = node.meta.get("tensor_meta")
    shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
    if shape is None or dtype is None:
        return None
    shape = tuple(int(s) for s in shape)
    if narrow > 1 and len(shape) >= 2 and shape[-1] % narrow == 0:
        shape = shape[:-1] + (shape[-1] // narrow,)
    return _Tensor(shape, dtype)


def graph_size(gm: fx.GraphModule) -> tuple[int, int]:
    """``(N, E)`` of the inputs ``gm`` was traced with (see the module docstring)."""
    N = E = None
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ReversibleChain):
            t = _traced(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            if t is not None and t.shape:
                N = t.shape[0]
                break
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        t = _traced(node)
        if t is None:
            continue
        if N is None and t.dtype.is_floating_point and t.shape:
            N = t.shape[0]
        if E is None and not t.dtype.is_floating_point and len(t.shape) == 2 and t.shape[0] == 2:
            E = t.shape[1]
    if E is None:
        E = next((n.meta["gsr_num_edges"] for n in gm.graph.nodes
                  if n.op == "placeholder" and "gsr_num_edges" in n.meta), None)
    return int(N or 0), int(E or 0)


def _sparse_adjacency_only(gm: fx.GraphModule) -> bool:
    """Whether the graph's edges come from a sparse adjacency, with no ``[2, E]`` edge_index."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not any("gsr_num_edges" in n.meta for n in placeholders):
        return False
    for n in placeholders:
        t = _traced(n)
        if t is not None and not t.dtype.is_floating_point and len(t.shape) == 2 and t.shape[0] == 2:
            return False
    return True


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


@dataclass
class ActivationLiveness:
    """The live intervals of one step (sizes symbolic in N and E) and what they mean.

    ``kinds[name]`` is ``value`` (an op's output), ``saved`` (kept for backward beyond the
    outputs: dropout masks, messages), ``message`` (messages while a layer runs), ``grad``, or
    ``scratch`` (the chains' coupling buffers, ``placed`` in the arena at run time).
    """

    intervals: list[LiveInterval]
    kinds: dict[str, str]
    placed: list[str]
    num_nodes: int
    num_edges: int
    training: bool
    steps: int
    notes: list[str] = field(default_factory=list)

    def placed_intervals(self) -> list[LiveInterval]:
        placed = set(self.placed)
        return [b for b in self.intervals if b.name in placed]

    def plan(self, num_nodes: Optional[int] = None, num_edges: Optional[int] = None,
             alignment: int = 64) -> ArenaPlan:
        """The whole step planned in one arena, at the traced size unless given."""
        return plan_arena(self.intervals, alignment,
                          num_nodes=self.num_nodes if num_nodes is None else num_nodes,
                          num_edges=self.num_edges if num_edges is None else num_edges)

    def plan_placed(self, num_nodes: Optional[int] = None, alignment: int = 64) -> ArenaPlan:
        """Only the coupling scratch, as the runtime plans it (it does not depend on E)."""
        return plan_arena(self.placed_intervals(), alignment,
                          num_nodes=self.num_nodes if num_nodes is None else num_nodes,
                          num_edges=0)


# --------------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------------


class _Timeline:
    """Steps and the live range of every named value."""

    def __init__(self) -> None:
        self.step = -1
        self.size: dict[str, SymbolicSize] = {}
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.kind: dict[str, str] = {}

    def tick(self) -> None:
        self.step += 1

    def define(self, name: str, size: SymbolicSize, kind: str) -> None:
        if name in self.size:
            raise ValueError(f"value {name!r} defined twice in the liveness walk")
        self.size[name] = size
        self.first[name] = self.last[name] = self.step
        self.kind[name] = kind

    def touch(self, name: Optional[str]) -> None:
        if name is not None and name in self.last:
            self.last[name] = max(self.last[name], self.step)

    def has(self, name: str) -> bool:
        return name in self.size


@dataclass
class _Segment:
    """One graph walked as a unit: the top-level graph, or one run of a branch.

    ``env`` maps nodes to the names of their values (None: not an activation, e.g. a user
    input or a parameter); ``grad_names`` overrides the gradient name of a node (the branch
    output's gradient is the chain's group gradient; a branch input's is the chain's sum).
    """

    module: fx.GraphModule
    prefix: str
    narrow: int
    grad: bool
    env: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    requires_grad: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)
    grad_names: dict = field(default_factory=dict)
    order: list = field(default_factory=list)

    def grad_name(self, node: fx.Node) -> Optional[str]:
        if node in self.grad_names:
            return self.grad_names[node]
        value = self.env.get(node)
        return None if value is None else f"{value}.grad"


class _LivenessWalk:
    def __init__(self, gm: fx.GraphModule, training: bool) -> None:
        self.gm = gm
        self.training = training
        self.N, self.E = graph_size(gm)
        self.fused_sparse = _sparse_adjacency_only(gm)
        self.sizes = _Sizes(self.N, self.E)
        self.tl = _Timeline()
        self.placed: list[str] = []
        self.unsized: set[str] = set()
        self._chain_info: dict[fx.Node, dict] = {}
        self._probes: dict[str, object] = {}

    # -- op rules ------------------------------------------------------------------------

    @staticmethod
    def _module(seg: _Segment, node: fx.Node) -> Optional[nn.Module]:
        return seg.module.get_submodule(node.target) if node.op == "call_module" else None

    def _aliases(self, seg: _Segment, node: fx.Node) -> bool:
        if node.op == "call_function":
            if node.target is operator.getitem:
                # Indexing a tuple of outputs picks a real tensor; indexing a tensor is a view.
                return isinstance(node.args[0], fx.Node) and seg.info.get(node.args[0]) is not None
            return node.target in _ALIAS_FUNCTIONS
        if node.op == "call_method":
            return node.target in _ALIAS_METHODS or str(node.target).endswith("_")
        m = self._module(seg, node)
        return isinstance(m, (nn.Identity, nn.Dropout)) and not (
            isinstance(m, nn.Dropout) and m.training and m.p > 0)

    def _keeps(self, seg: _Segment, node: fx.Node) -> str:
        """'nothing', 'output' or 'inputs' (see the module docstring)."""
        if node.op == "call_function":
            if node.target in _KEEP_NOTHING_FUNCTIONS:
                return "nothing"
            if node.target in _KEEP_OUTPUT_FUNCTIONS:
                return "output"
            if node.target is F.dropout:
                return "nothing"  # its mask is counted separately
            return "inputs"
        if node.op == "call_method":
            if node.target in _KEEP_NOTHING_METHODS:
                return "nothing"
            return "output" if node.target in _KEEP_OUTPUT_METHODS else "inputs"
        m = self._module(seg, node)
        if isinstance(m, (nn.Dropout, CompressedDropout)):
            return "nothing"
        if isinstance(m, LayerNormGroupTopKCompress):
            return "inputs"  # the LayerNorm's input; the top-k's indices are small beside it
        return "output" if isinstance(m, _KEEP_OUTPUT_MODULES) else "inputs"

    def _mask(self, seg: _Segment, node: fx.Node) -> Optional[SymbolicSize]:
        """The one-byte-per-element mask a training-mode dropout keeps, or None."""
        m = self._module(seg, node)
        if isinstance(m, (nn.Dropout, CompressedDropout)):
            training = m.training if not isinstance(m, CompressedDropout) or \
                m.fixed_training is None else m.fixed_training
            active = training and m.p > 0
        elif isinstance(m, GroupTopKCompress):
            # A folded dropout: the torch path keeps its mask (the kernel path keeps none).
            active = m.active_dropout() > 0
        elif node.op == "call_function" and node.target is F.dropout:
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            active = bool(node.kwargs.get("training", node.args[2] if len(node.args) > 2
                                          else True)) and p > 0
        else:
            return None
        t = seg.info.get(node)
        return self.sizes.per_element(t, 1) if active and t is not None else None

    def _messages(self, seg: _Segment, node: fx.Node) -> Optional[SymbolicSize]:
        """The messages of a message-passing layer while it runs, or None: ``[E, C_in]``
        gathered, and as much again for the per-edge product of layers that scale them."""
        m = self._module(seg, node)
        if not isinstance(m, _MESSAGE_PASSING) or not self.E or not node.args:
            return None
        if self.fused_sparse and _fuses_messages(m):
            return None  # a sparse matrix product: no [E, C] messages
        x = node.args[0]
        t = seg.info.get(x) if isinstance(x, fx.Node) else None
        if t is None or not t.shape:
            return None
        copies = 2 if type(m).__name__ in _KEEPS_MESSAGES else 1
        return SymbolicSize(per_edge=copies * int(t.shape[-1]) * _itemsize(t.dtype))

    def _internal(self, seg: _Segment, node: fx.Node, module: nn.Module
                  ) -> Optional[LayerMemory]:
        """What a message-passing layer keeps and allocates inside itself, measured on small
        inputs of the traced shapes (``passes/layer_internals.py``), or None."""
        N, E = self.N, self.E

        def symbolic(shape: tuple) -> tuple:
            return tuple("N" if d == N else "E" if E and d == E else d for d in shape)

        def info(a) -> Optional[_Tensor]:
            if not isinstance(a, fx.Node):
                return None
            return seg.info[a] if seg.info.get(a) is not None else _traced(a)  # user inputs

        signature = []
        for a in list(node.args) + list(node.kwargs.values()):
            t = info(a)
            if isinstance(a, fx.Node) and t is None and seg.env.get(a) is not None:
                return None  # an activation of unknown shape: cannot be made up
            signature.append(None if t is None else (symbolic(t.shape), t.dtype, t.compressed,
                                                       bool(seg.requires_grad.get(a))))
        key = (type(module), repr(module), module.training, tuple(signature))

        def make(value, t, n: int, e: int, grad: bool):
            if t is None:
                return value if not isinstance(value, fx.Node) else None
            shape = tuple(n if d == "N" else e if d == "E" else d for d in symbolic(t.shape))
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            if t.dtype.is_floating_point:
                x = torch.randn(shape, dtype=t.dtype, device=device)
                if t.compressed is not None:
                    from ..runtime.sparse import group_topk_compress

                    x = group_topk_compress(x, t.compressed[0], t.compressed[1], backend="torch")
                    return x
                return x.requires_grad_(grad)
            if len(shape) == 2 and shape[0] == 2:  # edges without self-loops, which some
                # layers remove and add back: their count must not depend on the draw
                src = torch.randint(0, n, shape[1:], device=device)
                dst = (src + torch.randint(1, max(n, 2), shape[1:], device=device)) % max(n, 2)
                return torch.stack([src, dst]).to(t.dtype)
            return torch.zeros(shape, dtype=t.dtype, device=device)

        def make_args(n: int, e: int) -> tuple[list, dict]:
            args = [make(a, info(a), n, e, bool(seg.requires_grad.get(a))) for a in node.args]
            kwargs = {k: make(a, info(a), n, e, bool(seg.requires_grad.get(a)))
                      for k, a in node.kwargs.items()}
            return args, kwargs

        return internal_saved_bytes(module, key, make_args)

    def _info(self, seg: _Segment, node: fx.Node) -> Optional[_Tensor]:
        t = _traced(node, seg.narrow)
        if t is not None:
            return t
        # Nodes the sparse pass added carry no traced shape: derive it from the input.
        m = self._module(seg, node)
        x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        src = seg.info.get(x) if x is not None else None
        if src is None:
            return None
        if isinstance(m, GroupTopKCompress):
            return _Tensor(src.shape, src.dtype, (m.k, m.group))
        if isinstance(m, CompressedDropout):
            return src
        if node.op == "call_method" and node.target == "to_dense":
            return _Tensor(src.shape, src.dtype)
        return None

    # -- walking one graph ---------------------------------------------------------------

    def _forward(self, seg: _Segment, on_chain: Optional[Callable] = None) -> Optional[fx.Node]:
        """Walks ``seg``'s nodes forward; returns the node its output reads (if one)."""
        tl = self.tl
        result = None
        for node in seg.module.graph.nodes:
            if node.op == "placeholder":
                seg.requires_grad.setdefault(node, False)
                continue
            if node.op == "get_attr":
                attr = attribute_or_none(seg.module, str(node.target))
                seg.env[node] = None
                seg.requires_grad[node] = isinstance(attr, nn.Parameter) and attr.requires_grad
                continue
            if node.op == "output":
                out = node.args[0]
                result = out if isinstance(out, fx.Node) else None
                continue
            inputs = node.all_input_nodes
            module = self._module(seg, node)
            seg.requires_grad[node] = any(seg.requires_grad.get(a, False) for a in inputs) or (
                module is not None and any(p.requires_grad for p in module.parameters()))
            seg.info[node] = self._info(seg, node)
            seg.order.append(node)
            if isinstance(module, ReversibleChain) and on_chain is not None:
                on_chain(seg, node, module)
                continue
            tl.tick()
            for a in inputs:
                tl.touch(seg.env.get(a))
            if self._aliases(seg, node) and inputs:
                seg.env[node] = seg.env.get(inputs[0])
                continue
            messages = self._messages(seg, node)
            name = seg.prefix + node.name
            # a message-passing layer that takes gradients is measured (layer_internals.py)
            probe = self._internal(seg, node, module) if (
                seg.grad and seg.requires_grad[node]
                and isinstance(module, _MESSAGE_PASSING)) else None
            self._probes[name] = probe
            if probe is not None:
                if probe.forward != SymbolicSize():
                    tl.define(name + ".messages", probe.forward, "message")
            elif messages is not None:
                tl.define(name + ".messages", messages, "message")
            if seg.info[node] is None:
                self.unsized.add(name)
            tl.define(name, self.sizes.size(seg.info[node]), "value")
            seg.env[node] = name
            if not (seg.grad and seg.requires_grad[node]):
                continue
            keeps = self._keeps(seg, node)
            kept = [name] if keeps == "output" else \
                [seg.env.get(a) for a in inputs if seg.env.get(a) is not None] \
                if keeps == "inputs" else []
            mask = self._mask(seg, node)
            if mask is not None:
                tl.define(name + ".mask", mask, "saved")
                kept.append(name + ".mask")
            if probe is not None:
                # what the layer's own ops keep, measured; it includes the kept messages, so
                # they are not counted again below
                if probe.kept != SymbolicSize():
                    tl.define(name + ".internal", probe.kept, "saved")
                    kept.append(name + ".internal")
                if probe.keeps_output and name not in kept:
                    kept.append(name)
            elif messages is not None and type(module).__name__ in _KEEPS_MESSAGES:
                # one of the two copies (the gathered inputs of the product) stays
                tl.define(name + ".messages.kept", SymbolicSize(per_edge=messages.per_edge // 2),
                          "saved")
                kept.append(name + ".messages.kept")
            seg.kept[node] = kept
        return result

    def _backward(self, seg: _Segment, on_chain: Optional[Callable] = None) -> None:
        """Walks ``seg``'s nodes in reverse: each reads its gradient and what it kept, and
        produces (or adds to) its inputs' gradients."""
        tl = self.tl
        for node in reversed(seg.order):
            g = seg.grad_name(node)
            if not seg.requires_grad.get(node) or g is None or not tl.has(g):
                continue
            module = self._module(seg, node)
            if isinstance(module, ReversibleChain) and on_chain is not None:
                on_chain(seg, node, module)
                continue
            tl.tick()
            tl.touch(g)
            for k in seg.kept.get(node, []):
                tl.touch(k)
            probe = self._probes.get(seg.prefix + node.name)
            messages = probe.backward if probe is not None else self._messages(seg, node)
            if messages is not None and messages != SymbolicSize():
                # what the layer's backward holds at its high point besides its inputs' grads
                tl.define(seg.prefix + node.name + ".messages.grad", messages, "message")
            self._produce_input_grads(seg, node)

    def _produce_input_grads(self, seg: _Segment, node: fx.Node) -> None:
        own = seg.grad_name(node)
        passes = own is not None and self.tl.has(own) and (
            (node.op == "call_function" and node.target in (operator.add, torch.add))
            or (node.op == "call_method" and node.target == "add"))
        for a in node.all_input_nodes:
            if not seg.requires_grad.get(a):
                continue
            g = seg.grad_name(a)
            if g is None:
                continue
            size = self.sizes.size(self._value_info(seg, a))
            if self.tl.has(g):
                self.tl.touch(g)  # accumulated into the existing gradient
            elif passes and a not in seg.grad_names and size == self.tl.size[own]:
                # an addition hands its output's gradient to its inputs as it is: the same
                # tensor, not a copy per input
                seg.grad_names[a] = own
                self.tl.touch(own)
            else:
                self.tl.define(g, size, "grad")

    @staticmethod
    def _value_info(seg: _Segment, node: fx.Node) -> Optional[_Tensor]:
        t = seg.info.get(node)
        if t is not None and t.compressed is not None:  # gradients are dense
            return _Tensor(t.shape, t.dtype)
        return t

    # -- the top-level graph -------------------------------------------------------------

    def run(self) -> ActivationLiveness:
        top = _Segment(self.gm, "", 1, grad=self.training)
        self._forward(top, on_chain=self._chain_forward)
        tl = self.tl
        tl.tick()  # the loss (or the caller) reads the output
        outputs = _output_nodes(self.gm)
        for n in outputs:
            tl.touch(top.env.get(n))
        if self.training:
            for n in outputs:
                g = top.grad_name(n)
                if g is not None and top.requires_grad.get(n) and not tl.has(g):
                    tl.define(g, self.sizes.size(self._value_info(top, n)), "grad")
            self._backward(top, on_chain=self._chain_backward)
        intervals = [LiveInterval(name, tl.size[name], tl.first[name], tl.last[name])
                     for name in tl.size]
        notes = []
        if self.unsized:
            notes.append(f"{len(self.unsized)} value(s) without a traced shape are counted as "
                         "0 bytes")
        if self.N and self.N == self.E:
            notes.append(f"N = E = {self.N} in the traced inputs: dimensions of that length "
                         "were taken as N")
        return ActivationLiveness(intervals=intervals, kinds=dict(tl.kind),
                                  placed=list(self.placed), num_nodes=self.N, num_edges=self.E,
                                  training=self.training, steps=tl.step + 1, notes=notes)

    # -- a chain -------------------------------------------------------------------------

    def _chain_context(self, top: _Segment, node: fx.Node, chain: ReversibleChain) -> dict:
        ctx = self._chain_info.get(node)
        if ctx is None:
            x = node.args[0]
            xt = top.info.get(x) if isinstance(x, fx.Node) else None
            if xt is None:
                xt = top.info.get(node)
            G = chain.groups
            group = _Tensor(xt.shape[:-1] + (chain.group_width(xt.shape[-1]),), xt.dtype) \
                if xt else None
            ctx = {"x": x, "side": list(node.args[1:]), "G": G, "group": group,
                   "name": node.name}  # per call: a graph may call one chain twice
            self._chain_info[node] = ctx
        return ctx

    def _scratch(self, ctx: dict, phase: str) -> dict:
        names = scratch_buffer_names(ctx["name"], phase, ctx["G"])
        size = self.sizes.size(ctx["group"])
        for role in names.values():
            for n in role:
                self.tl.define(n, size, "scratch")
                self.placed.append(n)
        return names

    def _branch(self, top: _Segment, ctx: dict, chain: ReversibleChain, i: int, j: int,
                inp: Optional[str], grad: bool, tag: str) -> _Segment:
        branch = chain.blocks[i][j]
        seg = _Segment(branch, f"{ctx['name']}.b{i}.g{j}.{tag}.", ctx["G"], grad=grad)
        placeholders = [n for n in branch.graph.nodes if n.op == "placeholder"]
        sides = [ctx["side"][k] for k in chain.side_index[i]]
        seg.env[placeholders[0]] = inp
        seg.info[placeholders[0]] = ctx["group"]
        seg.requires_grad[placeholders[0]] = grad
        for p, s in zip(placeholders[1:], sides):
            is_node = isinstance(s, fx.Node)
            seg.env[p] = top.env.get(s) if is_node else None
            seg.info[p] = (top.info.get(s) or _traced(s)) if is_node else None  # user inputs too
            seg.requires_grad[p] = grad and is_node and top.requires_grad.get(s, False)
            if is_node:
                seg.grad_names[p] = top.grad_name(s)
        return seg

    def _chain_forward(self, top: _Segment, node: fx.Node, chain: ReversibleChain) -> None:
        tl, ctx = self.tl, self._chain_context(top, node, chain)
        G, x = ctx["G"], top.env.get(ctx["x"])
        tl.tick()
        tl.touch(x)
        for s in ctx["side"]:
            tl.touch(top.env.get(s) if isinstance(s, fx.Node) else None)
        names = self._scratch(ctx, "forward")
        state, y0 = names["state"], (names["y0"] or [None])[0]
        for i in range(chain.depth):
            for j in range(G):
                if j > 0:
                    inp = state[j - 1]
                elif G > 2:
                    inp = y0
                else:
                    inp = x if i == 0 else state[1]
                seg = self._branch(top, ctx, chain, i, j, inp, grad=False, tag="forward")
                out = self._forward(seg)
                tl.tick()  # the coupling update, in place into state[j]
                tl.touch(seg.env.get(out))
                tl.touch(state[j])
                if i == 0:
                    tl.touch(x)
        tl.tick()  # the output: a fresh tensor, the groups concatenated
        for n in state + ([y0] if y0 else []):
            tl.touch(n)
        name = node.name
        tl.define(name, self.sizes.size(top.info.get(node)), "value")
        top.env[node] = name
        if top.grad and top.requires_grad.get(node):
            # The chain keeps its output (and side inputs); not its input.
            top.kept[node] = [name] + [top.env[s] for s in ctx["side"]
                                       if isinstance(s, fx.Node) and top.env.get(s)]

    def _chain_backward(self, top: _Segment, node: fx.Node, chain: ReversibleChain) -> None:
        tl, ctx = self.tl, self._chain_context(top, node, chain)
        G, L = ctx["G"], chain.depth
        y, grad_y = top.env[node], top.grad_name(node)
        tl.tick()
        tl.touch(grad_y)
        tl.touch(y)
        names = self._scratch(ctx, "backward")
        state, grads, y0 = names["state"], names["grad"], (names["y0"] or [None])[0]
        for i in range(L - 1, -1, -1):
            for j in range(G - 1, -1, -1):
                if j > 0:
                    inp = y if i == L - 1 else state[j - 1]
                else:
                    inp = y0 if G > 2 else state[1]
                seg = self._branch(top, ctx, chain, i, j, inp, grad=True, tag="recompute")
                g_inp = f"{seg.prefix}input.grad"
                placeholder = next(n for n in chain.blocks[i][j].graph.nodes
                                   if n.op == "placeholder")
                seg.grad_names[placeholder] = g_inp
                out = self._forward(seg)
                if out is not None:
                    seg.grad_names[out] = grad_y if (i == L - 1 and j == G - 1) else grads[j]
                    self._backward(seg)
                tl.tick()  # the inverse, in place into state[j]
                tl.touch(seg.env.get(out) if out is not None else None)
                tl.touch(state[j])
                if i == L - 1:
                    tl.touch(y)
                tl.tick()  # the gradient of y(j-1) (of every other group when j == 0)
                tl.touch(g_inp)
                for k in ([j - 1] if j > 0 else range(1, G)):
                    tl.touch(grads[k])
        tl.tick()  # the input gradient: a fresh tensor, the groups concatenated
        for n in state + grads + ([y0] if y0 else []):
            tl.touch(n)
        tl.touch(y)
        tl.touch(grad_y)
        self._produce_input_grads(top, node)


def _output_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    found: list[fx.Node] = []
    fx.node.map_arg(out.args, lambda n: found.append(n) or n)
    return found


def attribute_or_none(root: nn.Module, target: str):
    """``root.a.b.c`` for ``target`` ``"a.b.c"``, or None where a step is missing."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def activation_liveness(gm: fx.GraphModule, training: Optional[bool] = None) -> ActivationLiveness:
    """Live intervals of one step of ``gm`` (a compiled graph with traced shapes): a
    training step (forward and backward) when ``training`` (default: ``gm.training``), else
    one forward."""
    return _LivenessWalk(gm, gm.training if training is None else training).run()
