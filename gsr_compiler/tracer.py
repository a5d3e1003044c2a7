"""PyG-aware torch.fx tracing with the real inputs of the first call.

``torch.fx.symbolic_trace`` cannot trace into PyG's ``MessagePassing.propagate`` (it
inspects ``edge_index`` types), so message-passing layers, aggregations, PyG norms and
PyG's MLP/Linear are kept as leaf modules. Non-tensor arguments of the call (``None``,
ints, flags) are made concrete, so ``if batch is None`` traces; the compiled module
re-traces when they change.
"""
from __future__ import annotations

import inspect
import os
import traceback
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .data_inputs import stand_in_arguments
from .errors import GSRCompileError

try:  # PyG is a dependency, but keep tracing usable for plain torch models without it.
    from torch_geometric.nn import MLP as PyGMLP
    from torch_geometric.nn.aggr import Aggregation
    from torch_geometric.nn.conv import MessagePassing
    from torch_geometric.nn.dense.linear import Linear as PyGLinear

    _PYG_LEAVES: tuple[type, ...] = (MessagePassing, Aggregation, PyGLinear, PyGMLP)
except ImportError:  # pragma: no cover - exercised only without PyG
    _PYG_LEAVES = ()


def _is_pyg_norm(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch_geometric.nn.norm")


class GSRTracer(fx.Tracer):
    """An ``fx.Tracer`` that keeps PyG layers whole, as ``call_module`` nodes, and traces
    PyG ``Data`` arguments (``data_args``, name -> the call's value) as their tensors."""

    def __init__(self, data_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.data_args = data_args or {}

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        root_fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        if self.data_args:
            args = stand_in_arguments(self, args, self.data_args)
        return root_fn, args

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _PYG_LEAVES) or _is_pyg_norm(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def split_call_arguments(
    model: nn.Module, args: tuple, kwargs: dict
) -> tuple[list[str], dict[str, Any], list[torch.Tensor]]:
    """Binds a call to ``model.forward``'s signature.

    Returns the names of the tensor parameters (in call order), the concrete values of
    the others, and the tensors themselves.
    """
    signature = inspect.signature(model.forward)
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise GSRCompileError(
                f"{type(model).__name__}.forward takes *{p.name}; gsr_compile needs named "
                "parameters to trace. Give forward explicit arguments (x, edge_index, ...)."
            )
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise GSRCompileError(f"the call does not match {type(model).__name__}.forward: {e}") from None
    bound.apply_defaults()
    tensor_names, concrete, tensors = [], {}, []
    for name, value in bound.arguments.items():
        if isinstance(value, torch.Tensor):
            tensor_names.append(name)
            tensors.append(value)
        else:
            concrete[name] = value
    return tensor_names, concrete, tensors


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame that is the user's code, as 'file:line: source'."""
    skip = (
        os.path.dirname(torch.__file__),
        os.path.dirname(os.path.abspath(__file__)),
    )
    try:
        import torch_geometric

        skip += (os.path.dirname(torch_geometric.__file__),)
    except ImportError:  # pragma: no cover
        pass
    user = None
    for frame in traceback.extract_tb(exc.__traceback__):
        path = os.path.abspath(frame.filename)
        if not path.startswith(skip):
            user = frame
    if user is None:
        return None
    return f"{user.filename}:{user.lineno}: {(user.line or '').strip()}"


def trace(model: nn.Module, concrete_args: dict[str, Any],
          data_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Traces ``model`` with the given non-tensor arguments fixed, and each PyG ``Data``
    argument in ``data_args`` as its tensors (see :mod:`gsr_compiler.data_inputs`).

    Raises :class:`GSRCompileError` naming the user's source line when the model has
    data-dependent control flow or other untraceable code.
    """
    tracer = GSRTracer(data_args)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args or None)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError, ...
        where = _user_frame(e)
        hint = (
            "Data-dependent Python control flow (if/while on tensor values) cannot be traced; "
            "rewrite it with tensor ops or move it out of forward."
            if isinstance(e, fx.proxy.TraceError)
            else "Make this code traceable by torch.fx, or wrap it in a submodule."
        )
        raise GSRCompileError(
            f"cannot trace {type(model).__name__}: {e}"
            + (f"\n  at {where}" if where else "")
            + f"\n  {hint}"
        ) from e
    _drop_specialization_asserts(graph)
    for node in graph.nodes:
        if isinstance(node.type, str):  # postponed annotations: GraphModules would not pickle
            node.type = None
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def _drop_specialization_asserts(graph: fx.Graph) -> None:
    """Removes fx's checks that concrete arguments keep their traced values.

    The compiled module dispatches on those values itself (one graph per value), and
    the checks' helper does not survive pickling of the GraphModule.
    """
    checks = {fx._symbolic_trace._assert_is_none, torch._assert}
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target in checks:
            inputs = node.all_input_nodes
            graph.erase_node(node)
            for i in inputs:  # the comparison feeding torch._assert
                if i.op == "call_function" and not i.users:
                    graph.erase_node(i)
