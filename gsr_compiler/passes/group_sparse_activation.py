"""Pass: the group-wise sparse nonlinearity (the "S" of GSR) inside reversible branches.

Runs after ``ReversibleRewrite`` when ``GSRConfig.sparse_k`` is set. In every branch
GraphModule of every ``ReversibleChain``:

1. Each **ReLU** (``F.relu``, ``torch.relu``, ``x.relu()``, their in-place forms, ``nn.ReLU``)
   becomes the group-wise top-k: per node and per group of ``g = sparse_group`` channels
   (default: the width of one reversible group), keep the ``k = sparse_k`` largest values.
   Only ReLU qualifies: the top-k is MaxK's replacement for ReLU, a sparsifying rectifier.
   GELU, LeakyReLU, ELU, SiLU, ReLU6, sigmoid, tanh and the like are other functions (negative
   outputs, saturation) and stay; ``explain()`` lists them. So do activations inside layers the
   trace keeps whole (``GINConv``'s MLP, PyG ``MLP``), and ReLUs whose input width is not a
   multiple of ``g``.
2. When the op right after it (possibly through a dropout, which then drops kept values and,
   when nothing else reads the ReLU, is folded into the top-k) is a
   ``Linear`` or a ``GCNConv`` / ``SAGEConv`` / ``GraphConv`` / ``GINConv``, the top-k produces
   a ``CompressedActivation`` and that layer is swapped for its compressed form from
   ``runtime.sparse`` (sharing its parameters: same objects, same ``state_dict`` keys). Any
   other consumer gets the dense tensor, formed just for it (``group_topk``, or ``to_dense()``
   of the compressed form when another consumer reads it compressed); ``explain()`` says which
   and why.

The top-k is deterministic (ties to the lower position), so the reversible backward's
recompute of a branch selects what its forward selected, given the same input.

Widths are checked for every chain before any branch changes. A chain rewritten once keeps a
summary (attribute ``gsr_sparse``), so retracing (eval mode, other non-tensor arguments, or after
``torch.save``/``load``), which reuses the chain module, neither rewrites it twice nor loses the
``explain()`` lines.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import GSRCompileError
from ..runtime.reversible import ReversibleChain
from ..runtime.sparse import (CompressedDropout, CompressedGCNConv, CompressedGINConv,
                              CompressedGraphConv, CompressedLinear, CompressedSAGEConv,
                              GroupTopK, GroupTopKCompress, compression_ratio)
from ..runtime.sparse.conv import COMPRESSED_AGGREGATIONS
from ..runtime.sparse.norm_topk import LayerNormGroupTopKCompress
from .chain_nodes import chain_nodes
from .layer_types import LINEAR_TYPES
from .unused_submodules import delete_unused_submodules

RELU_FUNCTIONS = {F.relu: False, torch.relu: False, F.relu_: True, torch.relu_: True}  # -> in place
RELU_METHODS = {"relu": False, "relu_": True}

# Activations that are recognized only to say why they stay.
OTHER_ACTIVATION_FUNCTIONS = {
    F.gelu: "GELU", F.elu: "ELU", F.selu: "SELU", F.celu: "CELU", F.leaky_relu: "LeakyReLU",
    F.silu: "SiLU", F.mish: "Mish", F.softplus: "Softplus", F.relu6: "ReLU6",
    F.hardtanh: "Hardtanh", F.hardswish: "Hardswish", F.prelu: "PReLU", F.sigmoid: "Sigmoid",
    torch.sigmoid: "Sigmoid", F.tanh: "Tanh", torch.tanh: "Tanh",
}
OTHER_ACTIVATION_METHODS = {"sigmoid": "Sigmoid", "tanh": "Tanh"}
OTHER_ACTIVATION_MODULES = (
    nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.PReLU,
)

NOT_RELU = "not ReLU; the group top-k (MaxK-style) replaces ReLU only"
INSIDE_LEAF = "inside a layer the trace keeps whole; its internals are not rewritten"

# Attribute of a rewritten ReversibleChain holding its ChainSparsity (a plain attribute of an
# nn.Module survives deepcopy and pickling; fx node meta does not survive pickling).
_MARK = "gsr_sparse"


@dataclass
class BranchSparsity:
    """What the pass did in one branch."""

    replaced: list[tuple[int, torch.dtype]] = field(default_factory=list)  # (width, dtype)
    compressed: list[str] = field(default_factory=list)                  # consumer types
    dropouts: int = 0                                                     # on kept values
    dense: list[tuple[str, str]] = field(default_factory=list)           # (consumer, why)
    fused_norms: int = 0                                                  # LayerNorm + top-k
    fused_dropouts: int = 0                                               # top-k + dropout
    skipped: list[tuple[str, str]] = field(default_factory=list)         # (activation, why)


@dataclass
class ChainSparsity:
    """What the pass did to one chain: its top-k group ``g`` and a summary per branch."""

    k: int
    group: int
    branches: list[BranchSparsity]


def _conv_factories() -> dict[type, Callable[[nn.Module], nn.Module]]:
    try:
        import torch_geometric.nn as pyg
    except ImportError:  # pragma: no cover
        return {}
    return {pyg.GCNConv: CompressedGCNConv, pyg.SAGEConv: CompressedSAGEConv,
            pyg.GraphConv: CompressedGraphConv, pyg.GINConv: CompressedGINConv}


_CONVS = _conv_factories()
# Arguments after (x, edge_index) each layer's compressed form accepts, by position.
_CONV_EXTRA_ARGS = {"GCNConv": ("edge_weight",), "SAGEConv": ("size",),
                    "GraphConv": ("edge_weight", "size"), "GINConv": ("size",)}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _output_width(branch: fx.GraphModule) -> int | None:
    """Full (pre-narrowing) width of the branch output, from the traced shapes."""
    out = next(n for n in branch.graph.nodes if n.op == "output")
    value = out.args[0]
    meta = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return int(shape[-1]) if shape is not None and len(shape) else None


class GroupSparseActivation(PassBase):
    """Replaces ReLUs inside reversible branches by the group-wise top-k.

    Args:
        k: values kept per node and channel group (``GSRConfig.sparse_k``).
        group: channel-group width ``g``, or ``None`` for the width of one reversible group
            (``GSRConfig.sparse_group``).
        compressed_consumers: swap the consumers for their compressed forms (default). With
            ``False`` every top-k is dense (``group_topk``): the same function, used to check
            the compressed path against the dense one.
    """

    def __init__(self, k: int, group: int | None = None, *,
                 compressed_consumers: bool = True) -> None:
        super().__init__()
        self.k = k
        self.group = group
        self.compressed_consumers = compressed_consumers
        self.notes: list[str] = []

    # -- which chains, and the checks done before anything changes ----------------------

    @staticmethod
    def _chains(gm: fx.GraphModule) -> list[tuple[str, ReversibleChain]]:
        # Two-stream chains run the model's own layers as they are: they stay dense.
        return [(str(node.target), chain) for node, chain in chain_nodes(gm)
                if chain.coupling == "grouped"]

    def _group_width(self, name: str, chain: ReversibleChain) -> tuple[int, int]:
        """(width of one reversible group, top-k group g) of ``chain``, checked."""
        full = _output_width(chain.blocks[0][0])
        if full is None or full % chain.groups:
            raise GSRCompileError(f"sparse_k: the channel width of chain '{name}' is unknown; "
                                  "cannot place the group top-k")
        width = full // chain.groups
        g = width if self.group is None else self.group
        if width % g:
            raise GSRCompileError(
                f"sparse_group={g} does not divide the width of one reversible group of chain "
                f"'{name}' ({full} channels / groups={chain.groups} = {width}); choose "
                f"sparse_group among {_divisors(width)}, or leave it None for {width}."
            )
        if not 1 <= self.k <= g:
            default = " (default: the width of one reversible group)" if self.group is None else ""
            raise GSRCompileError(
                f"sparse_k={self.k} must be in 1..g={g}, g = sparse_group{default} of chain "
                f"'{name}'; it is the number of values kept per node out of each group of g "
                f"channels, e.g. sparse_k={max(1, g // 8)} (g/8) or sparse_k={max(1, g // 2)} (g/2)."
            )
        return width, g

    def requires(self, gm: fx.GraphModule) -> None:
        for name, chain in self._chains(gm):
            if getattr(chain, _MARK, None) is None:  # else rewritten (and checked) before
                self._group_width(name, chain)

    # -- the rewrite ---------------------------------------------------------------------

    def call(self, gm: fx.GraphModule) -> PassResult:
        chains = self._chains(gm)
        modified = False
        for name, chain in chains:
            done = getattr(chain, _MARK, None)
            if done is None:
                _, g = self._group_width(name, chain)
                done = ChainSparsity(self.k, g, [
                    _BranchRewriter(branch, chain.groups, self.k, g, self.compressed_consumers).run()
                    for block in chain.blocks for branch in block])
                setattr(chain, _MARK, done)
                modified = True
            self.notes += _chain_notes(name, done.branches, done.k, done.group)
        streams = [str(node.target) for node, chain in chain_nodes(gm)
                   if chain.coupling != "grouped"]
        if streams:
            self.notes.append(f"{', '.join(streams)}: two-stream coupling runs the model's own "
                              "layers as they are; its activations stay dense")
        if not chains and not streams:
            self.notes.append("no reversible chain; nothing made sparse")
        return PassResult(gm, modified)


class _BranchRewriter:
    """Rewrites one branch GraphModule in place."""

    def __init__(self, branch: fx.GraphModule, groups: int, k: int, g: int,
                 compressed_consumers: bool) -> None:
        self.branch, self.graph = branch, branch.graph
        self.groups, self.k, self.g = groups, k, g
        self.compressed_consumers = compressed_consumers
        self.summary = BranchSparsity()
        self.erased: set[fx.Node] = set()

    def run(self) -> BranchSparsity:
        for node in self.graph.nodes:  # before any layer is swapped
            if self._activation(node)[0] is None:
                self._note_inner_activations(node)
        for node in list(self.graph.nodes):
            if node in self.erased:
                continue
            kind, inplace = self._activation(node)
            if kind is None:
                continue
            elif kind != "ReLU":
                self.summary.skipped.append((kind, NOT_RELU))
            else:
                why = self._why_not_replaceable(node, inplace)
                if why:
                    self.summary.skipped.append(("ReLU", why))
                else:
                    self._replace(node)
        self.graph.lint()
        delete_unused_submodules(self.branch)
        self.branch.recompile()
        return self.summary

    # -- recognizing things ------------------------------------------------------------

    def _module(self, node: fx.Node) -> nn.Module | None:
        return self.branch.get_submodule(node.target) if node.op == "call_module" else None

    def _activation(self, node: fx.Node) -> tuple[str | None, bool]:
        """('ReLU' | other activation name | None, in place)."""
        if node.op == "call_function":
            if node.target in RELU_FUNCTIONS:
                inplace = node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False)
                return "ReLU", bool(inplace) or RELU_FUNCTIONS[node.target]
            return OTHER_ACTIVATION_FUNCTIONS.get(node.target), False
        if node.op == "call_method":
            if node.target in RELU_METHODS:
                return "ReLU", RELU_METHODS[node.target]
            return OTHER_ACTIVATION_METHODS.get(node.target), False
        if node.op == "call_module":
            m = self._module(node)
            if type(m) is nn.ReLU:
                return "ReLU", m.inplace
            if isinstance(m, OTHER_ACTIVATION_MODULES):
                return type(m).__name__, False
        return None, False

    def _note_inner_activations(self, node: fx.Node) -> None:
        m = self._module(node)
        if m is None:
            return
        inner = Counter(type(s).__name__ for s in m.modules()
                        if s is not m and isinstance(s, (nn.ReLU, *OTHER_ACTIVATION_MODULES)))
        for kind, n in inner.items():
            self.summary.skipped += [(f"{kind} inside {type(m).__name__}", INSIDE_LEAF)] * n

    def _called_once(self, node: fx.Node) -> bool:
        """Whether ``node``'s layer runs at no other node (a swap would change those too)."""
        return sum(1 for n in self.graph.nodes
                   if n.op == "call_module" and n.target == node.target) == 1

    def _describe(self, node: fx.Node) -> str:
        """What a consumer is, without its per-branch name (notes are summed over branches)."""
        if node.op == "output":
            return "branch output"
        if node.op == "call_module":
            return type(self._module(node)).__name__
        if node.op == "call_method":
            return f".{node.target}()"
        return getattr(node.target, "__name__", str(node.target))

    def _why_not_replaceable(self, node: fx.Node, inplace: bool) -> str | None:
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node):
            return "its input is not a traced tensor"
        if inplace and len(x.users) > 1:
            return "in-place ReLU whose input is read elsewhere"
        meta = node.meta.get("tensor_meta")
        shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
        if shape is None or dtype is None:
            return "its shape is unknown"
        if len(shape) != 2 or not dtype.is_floating_point:
            return f"the top-k needs float node features [N, D], got {dtype} {tuple(shape)}"
        if shape[-1] % self.groups or (shape[-1] // self.groups) % self.g:
            return (f"its width in the branch ({shape[-1]}/{self.groups}) is not a multiple of "
                    f"sparse_group={self.g}")
        return None

    def _is_dropout(self, user: fx.Node, value: fx.Node) -> bool:
        """A dropout reading ``value`` as its only tensor input (its output may be compressed)."""
        if user.op == "call_module":
            ok = type(self._module(user)) is nn.Dropout
        elif user.op == "call_function":
            ok = user.target is F.dropout and isinstance(
                user.kwargs.get("p", user.args[1] if len(user.args) > 1 else 0.5), (int, float))
        else:
            ok = False
        return ok and self._reads_only_as_x(user, value)

    @staticmethod
    def _reads_only_as_x(user: fx.Node, value: fx.Node) -> bool:
        """``value`` is ``user``'s first argument and appears nowhere else in its arguments."""
        seen: list[fx.Node] = []
        fx.node.map_arg((user.args[1:], user.kwargs), lambda n: seen.append(n) or n)
        return bool(user.args) and user.args[0] is value and value not in seen

    def _consumer(self, user: fx.Node, value: fx.Node) -> tuple[Callable | None, str]:
        """(factory of ``user``'s compressed form, or None and the reason it reads dense)."""
        if user.op == "output":
            return None, "the coupling addition reads the dense branch output"
        if user.op != "call_module":
            return None, "no compressed form for this op"
        m = self._module(user)
        name = type(m).__name__
        if not self._reads_only_as_x(user, value):
            return None, f"{name} reads it other than as its input features"
        if not self._called_once(user):
            return None, f"{name} '{user.target}' is called more than once"
        if isinstance(m, LINEAR_TYPES):
            if len(user.args) != 1 or user.kwargs:
                return None, "Linear called with extra arguments"
            if isinstance(m.weight, nn.parameter.UninitializedParameter):
                return None, "lazy Linear not initialized"
            return CompressedLinear, ""
        factory = _CONVS.get(type(m))
        if factory is None:
            if name == "GINEConv":
                return None, "GINEConv's message relu(x_j + edge_attr) is not linear in x_j"
            return None, f"no compressed form for {name}"
        if not isinstance(m.aggr, str) or m.aggr not in COMPRESSED_AGGREGATIONS:
            return None, f"{name} aggregation {m.aggr!r} (compressed: {', '.join(COMPRESSED_AGGREGATIONS)})"
        if getattr(m, "project", False):
            return None, "SAGEConv(project=True) applies a dense Linear+ReLU to x first"
        accepted = _CONV_EXTRA_ARGS[name]
        extra = dict(zip(accepted, user.args[2:]))
        if len(user.args) > 2 + len(accepted) or set(user.kwargs) - set(accepted):
            return None, f"{name} called with arguments its compressed form does not take"
        extra.update(user.kwargs)
        if extra.get("size") is not None:
            return None, f"{name} with size= (bipartite)"
        return factory, ""

    def _reaches_compressed_consumer(self, value: fx.Node) -> bool:
        if not self.compressed_consumers:
            return False
        for user in value.users:
            if self._is_dropout(user, value):
                if self._reaches_compressed_consumer(user):
                    return True
            elif self._consumer(user, value)[0] is not None:
                return True
        return False

    def _final_consumers(self, value: fx.Node) -> list[tuple[str, str]]:
        """(consumer, why it reads dense) for the users of ``value``, through dropouts."""
        out = []
        for user in value.users:
            if self._is_dropout(user, value):
                out += self._final_consumers(user)
            else:
                why = self._consumer(user, value)[1] if self.compressed_consumers else \
                    "compressed consumers turned off"
                out.append((self._describe(user), why))
        return out

    # -- changing things -----------------------------------------------------------------

    def _fresh_name(self, base: str) -> str:
        name, i = base, 0
        while hasattr(self.branch, name):
            i += 1
            name = f"{base}_{i}"
        return name

    def _call_new_module(self, before: fx.Node, base: str, module: nn.Module, args: tuple) -> fx.Node:
        name = self._fresh_name(base)
        self.branch.add_submodule(name, module)
        with self.graph.inserting_before(before):
            return self.graph.call_module(name, args)

    def _replace(self, relu: fx.Node) -> None:
        meta = relu.meta["tensor_meta"]
        self.summary.replaced.append((int(meta.shape[-1]) // self.groups, meta.dtype))
        x = relu.args[0]
        if self._reaches_compressed_consumer(relu):
            # A dropout that alone reads the ReLU is folded into the top-k (None: there is none).
            dropout = self._foldable_dropout(relu)
            drop_args = () if dropout is None else self._dropout_args(dropout)
            norm = self._fusable_norm(x)
            if norm is not None:
                # The LayerNorm's node now yields the compressed form: its module is swapped, under
                # the same name and with the same parameters, for the fused norm and top-k.
                self.branch.add_submodule(
                    str(x.target), LayerNormGroupTopKCompress(norm, self.k, self.g, *drop_args))
                x.meta.pop("tensor_meta", None)
                self.summary.fused_norms += 1
                c = x
            else:
                c = self._call_new_module(relu, f"{relu.name}_topk",
                                          GroupTopKCompress(self.k, self.g, *drop_args), (x,))
            if dropout is None:
                self._feed_compressed(relu, c)
            else:
                self.summary.fused_dropouts += 1
                self._feed_compressed(dropout, c)
                self._erase(dropout)
        else:
            self.summary.dense += self._final_consumers(relu)
            topk = self._call_new_module(relu, f"{relu.name}_topk", GroupTopK(self.k, self.g), (x,))
            topk.meta = dict(relu.meta)
            relu.replace_all_uses_with(topk)
        self._erase(relu)

    def _fusable_norm(self, x: fx.Node) -> nn.LayerNorm | None:
        """The ``nn.LayerNorm`` (over the last dimension) computing ``x``, when nothing but the
        ReLU reads ``x`` and the layer runs once, so it can be fused into the top-k."""
        m = self._module(x) if isinstance(x, fx.Node) else None
        if type(m) is not nn.LayerNorm or len(m.normalized_shape) != 1:
            return None
        if len(x.users) != 1 or len(x.args) != 1 or x.kwargs:
            return None
        return m if self._called_once(x) else None

    def _foldable_dropout(self, relu: fx.Node) -> fx.Node | None:
        """The dropout that is the ReLU's only reader and feeds a compressed consumer, or None."""
        users = list(relu.users)
        if len(users) == 1 and self._is_dropout(users[0], relu) \
                and self._reaches_compressed_consumer(users[0]):
            return users[0]
        return None

    def _dropout_args(self, dropout: fx.Node) -> tuple[float, bool | None]:
        """(p, fixed training flag or None to follow train()/eval()) of a dropout node."""
        if dropout.op != "call_function":
            return self._module(dropout).p, None
        p = dropout.kwargs.get("p", dropout.args[1] if len(dropout.args) > 1 else 0.5)
        return p, bool(dropout.kwargs.get("training",
                                          dropout.args[2] if len(dropout.args) > 2 else True))

    def _feed_compressed(self, dense: fx.Node, compressed: fx.Node) -> None:
        """Makes the users of ``dense`` read ``compressed`` (the same values, compressed)."""
        to_dense = None
        for user in list(dense.users):
            if self._is_dropout(user, dense) and self._reaches_compressed_consumer(user):
                drop = self._call_new_module(user, f"{user.name}_kept",
                                             CompressedDropout(*self._dropout_args(user)),
                                             (compressed,))
                self.summary.dropouts += 1
                self._feed_compressed(user, drop)
                self._erase(user)
                continue
            factory, why = self._consumer(user, dense)
            if factory is not None:
                self.summary.compressed.append(type(self._module(user)).__name__)
                self.branch.add_submodule(str(user.target), factory(self._module(user)))
                user.replace_input_with(dense, compressed)
            else:
                # A dense dropout reports the consumers after it.
                self.summary.dense += (self._final_consumers(user) if self._is_dropout(user, dense)
                                       else [(self._describe(user), why)])
                if to_dense is None:
                    with self.graph.inserting_after(compressed):
                        to_dense = self.graph.call_method("to_dense", (compressed,))
                user.replace_input_with(dense, to_dense)

    def _erase(self, node: fx.Node) -> None:
        self.graph.erase_node(node)
        self.erased.add(node)


def _chain_notes(name: str, summaries: list[BranchSparsity], k: int, g: int) -> list[str]:
    """explain() lines for one chain: what was replaced (with compression), consumed, kept."""
    replaced = Counter(r for s in summaries for r in s.replaced)
    notes = []
    if replaced:
        parts = [f"width {w} {str(dt).replace('torch.', '')} x{n}: "
                 f"{compression_ratio(w, k, g, dt):.1f}x fewer bytes kept"
                 for (w, dt), n in sorted(replaced.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))]
        notes.append(f"{name}: {sum(replaced.values())} ReLU -> group top-k, k={k} of g={g} "
                     f"({'; '.join(parts)})")
    else:
        notes.append(f"{name}: no replaceable ReLU in the branches; activations unchanged")
    fused = sum(s.fused_norms for s in summaries)
    if fused:
        notes.append(f"{name}: LayerNorm fused into the top-k x{fused} (LayerNormGroupTopKCompress): "
                     "neither its normalized output nor a dense gradient of it is formed")
    folded = sum(s.fused_dropouts for s in summaries)
    if folded:
        notes.append(f"{name}: dropout folded into the top-k x{folded}: it drops kept values only; "
                     "the Triton kernel (CUDA) draws a counter-based mask as it writes them and "
                     "keeps no mask for backward")
    compressed = Counter(c for s in summaries for c in s.compressed)
    if compressed:
        drops = sum(s.dropouts for s in summaries)
        notes.append(f"{name}: compressed input read by "
                     + ", ".join(f"{t} x{n}" for t, n in sorted(compressed.items()))
                     + (f" (dropout x{drops} applied to the kept values)" if drops else ""))
    dense = Counter(d for s in summaries for d in s.dense)
    for (what, why), n in sorted(dense.items()):
        notes.append(f"{name}: dense top-k formed for {what} x{n}: {why}")
    skipped = Counter(r for s in summaries for r in s.skipped)
    for (what, why), n in sorted(skipped.items()):
        notes.append(f"{name}: not replaced: {what} x{n}: {why}")
    return notes
