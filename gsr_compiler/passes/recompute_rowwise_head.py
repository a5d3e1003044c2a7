"""Pass: the row-wise layers that read a reversible chain's output run in row blocks and are
recomputed in backward (``GSRConfig.recompute_head``).

Once the chains keep only their output, the largest tensors of a training step often sit in the
model head, e.g. ``decoder(relu(norm(h)))``: autograd keeps the normalized and the rectified
``[N, D]`` tensors, and the head's backward holds several ``[N, D]`` gradients at once. Every
op there works row by row, and its input is the chain output, which the chain keeps anyway. So
the pass replaces each maximal run of such ops after a chain by one
:class:`~gsr_compiler.runtime.rowwise.RowwiseRecompute` call that keeps only that input and
recomputes the run block by block in backward. The function is the same (up to the order of
float sums in the layers' weight gradients).

Row-wise here means: exactly ``nn.Linear`` (or an initialized PyG ``Linear``), ``nn.LayerNorm``,
``nn.RMSNorm``, and the elementwise activations (ReLU, GELU, SiLU, ELU, LeakyReLU, SELU, CELU,
Softplus, ReLU6, Hardtanh, Hardswish, Mish, sigmoid, tanh) as modules, functions or methods,
each taking the previous op's output as its only tensor. Dropout stops a run (it draws random
numbers per element; a recompute would need its seed), and so does any op with a second tensor
argument or an in-place op on the chain output itself. A run needs at least two ops: one op
keeps nothing but its input in the first place.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..report import format_bytes
from ..runtime.reversible import ReversibleChain
from ..runtime.rowwise import RowwiseRecompute, RowwiseStep
from .layer_types import LINEAR_TYPES
from .propagate_shapes import node_bytes
from .unused_submodules import delete_unused_submodules

_ACTIVATION_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.SELU, nn.CELU,
                       nn.Softplus, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Mish, nn.Sigmoid,
                       nn.Tanh, nn.Identity)
_ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.gelu, F.silu, F.elu, F.leaky_relu, F.selu,
                         F.celu, F.softplus, F.relu6, F.hardtanh, F.hardswish, F.mish,
                         torch.sigmoid, torch.tanh, F.sigmoid, F.tanh}
_ACTIVATION_METHODS = {"relu", "sigmoid", "tanh"}


def _module_min_ndim(module: nn.Module) -> int | None:
    """The fewest input dimensions for which ``module`` is row-wise along dim 0, or None when
    it is not a row-wise layer (exact types only: a subclass may override ``forward``)."""
    kind = type(module)
    if kind in LINEAR_TYPES:
        # A lazy PyG layer (in_channels=-1) is shaped by its first call: not before the trace ends.
        initialized = not isinstance(module.weight, nn.parameter.UninitializedParameter)
        return 2 if initialized else None
    if kind is nn.LayerNorm or (hasattr(nn, "RMSNorm") and kind is nn.RMSNorm):
        return len(module.normalized_shape) + 1
    if kind in _ACTIVATION_MODULES:
        return 1
    return None


def _in_place(node: fx.Node, module: nn.Module | None) -> bool:
    if module is not None:
        return bool(getattr(module, "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    try:
        bound = inspect.signature(node.target).bind(None, *node.args[1:], **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature take no inplace flag
        return False
    return bool(bound.arguments.get("inplace", False))


class RecomputeRowwiseHead(PassBase):
    """Replaces the row-wise runs after each reversible chain by ``RowwiseRecompute`` calls.

    ``registry`` maps a run's structure to the module built for it, so that retracing the model
    (eval mode, other non-tensor arguments) reuses the same module under the same name.
    """

    def __init__(self, registry: dict) -> None:
        super().__init__()
        self.registry = registry
        self.notes: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        runs = []
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                         ReversibleChain):
                for user in list(node.users):
                    run, min_ndim = self._run_from(gm, node, user)
                    if len(run) >= 2:
                        runs.append((node, run, min_ndim))
        for chain, run, min_ndim in runs:
            self._replace(gm, chain, run, min_ndim)
        if runs:
            delete_unused_submodules(gm)
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(runs))

    # -- finding the runs ---------------------------------------------------------------

    def _row_wise(self, gm: fx.GraphModule, node: fx.Node, prev: fx.Node, first: bool
                  ) -> int | None:
        """``node``'s min_ndim when it is a row-wise op of ``prev`` alone, else None."""
        if node.all_input_nodes != [prev] or not node.args or node.args[0] is not prev:
            return None
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if node.op == "call_module":
            ndim = _module_min_ndim(module)
        elif node.op == "call_function":
            ndim = 1 if node.target in _ACTIVATION_FUNCTIONS else None
        elif node.op == "call_method":
            ndim = 1 if node.target in _ACTIVATION_METHODS else None
        else:
            ndim = None
        if ndim is None or (first and _in_place(node, module)):
            return None  # in place on the chain output would change what the chain keeps
        return ndim

    def _run_from(self, gm: fx.GraphModule, chain: fx.Node, node: fx.Node
                  ) -> tuple[list[fx.Node], int]:
        """The row-wise run starting at ``node``, and the fewest input dimensions it needs."""
        run, prev, min_ndim = [], chain, 1
        while (ndim := self._row_wise(gm, node, prev, first=not run)) is not None:
            run.append(node)
            min_ndim = max(min_ndim, ndim)
            if len(node.users) != 1:
                break  # its value is read elsewhere too: the run ends with it
            prev, node = node, next(iter(node.users))
        return run, min_ndim

    # -- the rewrite ---------------------------------------------------------------------

    def _replace(self, gm: fx.GraphModule, chain: fx.Node, run: list[fx.Node], min_ndim: int
                 ) -> None:
        targets: list[str] = []
        steps = []
        for node in run:
            extra = tuple(node.args[1:])
            if node.op == "call_module":
                if node.target not in targets:
                    targets.append(str(node.target))
                steps.append(RowwiseStep("module", index=targets.index(str(node.target)),
                                         args=extra, kwargs=node.kwargs))
            elif node.op == "call_function":
                steps.append(RowwiseStep("function", node.target, args=extra, kwargs=node.kwargs))
            else:
                steps.append(RowwiseStep("method", node.target, args=extra, kwargs=node.kwargs))
        module = RowwiseRecompute(steps, targets, min_ndim)
        key = ("rowwise", str(chain.target), repr(module))
        module = self.registry.setdefault(key, module)
        if not hasattr(module, "gsr_name"):
            module.gsr_name = f"gsr_rowwise_{sum(k[0] == 'rowwise' for k in self.registry) - 1}"
        gm.add_submodule(module.gsr_name, module)
        last = run[-1]
        with gm.graph.inserting_before(run[0]):
            layers = [gm.graph.get_attr(t) for t in targets]
        with gm.graph.inserting_before(last):
            call = gm.graph.call_module(module.gsr_name, (chain, *layers))
        call.meta = dict(last.meta)
        last.replace_all_uses_with(call)
        for node in reversed(run):
            gm.graph.erase_node(node)
        kept = sum(node_bytes(n) for n in run[:-1])
        self.notes.append(
            f"{module.extra_repr()} after {chain.target} runs in row blocks, recomputed in "
            f"backward: autograd keeps only the chain output (kept by the chain anyway), not "
            f"{len(run) - 1} intermediate(s) of {format_bytes(kept)} at the traced size")
