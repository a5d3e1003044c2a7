"""Pass: remove operations whose results nothing uses, before residual chains are searched.

A block written ``return h + f, aux`` and called ``h, _ = block(h, edge_index)`` leaves ``aux``
(computed from the branch) in the traced graph with no user. It would read an intermediate of
the branch from outside the block and so keep the block from converting, although the model
never looks at it. torch.fx's ``Graph.eliminate_dead_code`` removes such nodes; it is told
which nodes must stay although unused, since fx's own purity test knows only a few functions:

* anything fx itself counts as impure (placeholders, the output, asserts, ``setitem``);
* random operations (``F.dropout``, ``torch.rand``, ``x.bernoulli()``, ...): removing one would
  shift every later draw of the random stream;
* in-place operations (``x.relu_()``, ``operator.iadd``, ``inplace=True``, ``out=``): their
  effect is the mutation, not the result;
* calls of functions from outside torch, ``operator`` and ``math`` (a user's wrapped function
  may log, count or cache);
* modules with buffers (BatchNorm updates its running statistics), hooks, ``inplace=True``,
  random modules (dropout),
  and modules from outside ``torch.nn`` and ``torch_geometric.nn`` (opaque leaves may have
  effects of their own).

The removed nodes are listed by ``explain()``. The user's submodules are not deleted (their
parameters stay in ``state_dict``).
"""
from __future__ import annotations

import operator

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

_PURE_FUNCTION_MODULES = ("torch", "_operator", "operator", "math")
_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                       operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                       operator.imatmul, operator.setitem, operator.delitem}
_PURE_MODULE_PACKAGES = ("torch.nn.", "torch_geometric.nn.")


_RANDOM_NAME_PARTS = ("dropout", "rand", "bernoulli", "normal", "multinomial", "poisson",
                      "exponential", "geometric", "cauchy", "uniform")


def _is_in_place_name(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")


def _is_random_name(name: str) -> bool:
    """Random ops draw from the generator: removing one would shift every later draw."""
    return any(part in name.lower() for part in _RANDOM_NAME_PARTS)


def _module_must_stay(module: nn.Module) -> bool:
    if getattr(module, "_is_impure", False) or getattr(module, "inplace", False) is True:
        return True
    if isinstance(module, nn.modules.dropout._DropoutNd) or "dropout" in type(module).__name__.lower():
        return True
    if any(True for _ in module.buffers()):
        return True
    for m in module.modules():
        if (m._forward_hooks or m._forward_pre_hooks
                or not type(m).__module__.startswith(_PURE_MODULE_PACKAGES)
                and not isinstance(m, fx.GraphModule)):
            return True
    return False


def must_stay(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` has an effect besides its result (so it stays even if unused)."""
    if node.is_impure():
        return True
    if node.kwargs.get("inplace") is True or "out" in node.kwargs:
        return True
    if node.op == "call_method":
        return _is_in_place_name(str(node.target)) or _is_random_name(str(node.target))
    if node.op == "call_function":
        target = node.target
        if target in _IN_PLACE_OPERATORS:
            return True
        name = getattr(target, "__name__", "")
        if _is_in_place_name(name) or _is_random_name(name):
            return True
        if target is getattr:
            return False
        return not str(getattr(target, "__module__", None) or "").startswith(_PURE_FUNCTION_MODULES)
    if node.op == "call_module":
        return _module_must_stay(gm.get_submodule(str(node.target)))
    return False


class EliminateDeadCode(PassBase):
    """Removes unused nodes without effects (``Graph.eliminate_dead_code``)."""

    def __init__(self) -> None:
        super().__init__()
        self.notes: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        before = [n.name for n in gm.graph.nodes]
        changed = gm.graph.eliminate_dead_code(is_impure_node=lambda n: must_stay(gm, n))
        if changed:
            after = {n.name for n in gm.graph.nodes}
            removed = [name for name in before if name not in after]
            gm.recompile()
            shown = ", ".join(f"'{name}'" for name in removed[:6])
            more = f" and {len(removed) - 6} more" if len(removed) > 6 else ""
            self.notes.append(f"{len(removed)} unused op(s) removed: {shown}{more}")
        return PassResult(gm, changed)
