"""PyG-aware torch.fx tracing with the real inputs of the first call.

``torch.fx.symbolic_trace`` cannot trace into PyG's ``MessagePassing.propagate`` (it
inspects ``edge_index`` types), so message-passing layers, aggregations, PyG norms and
PyG's MLP/Linear are kept as leaf modules. Non-tensor arguments of the call (``None``,
ints, flags) are made concrete, so ``if batch is None`` traces; the compiled module
re-traces when they change.

Beyond that, tracing follows ``torch.compile``'s rules:

* Conditions on facts that are not tensor values (``x.requires_grad``, an input's shape
  or number of dimensions, ``self.training``) are decided at trace time from the real
  inputs. Each decision is a :class:`Guard`; the compiled module re-traces when one no
  longer holds for a call.
* A submodule that cannot be traced (data-dependent control flow, a loop over an
  intermediate's shape, code fx cannot follow) becomes a *graph break*: it is called as
  written, as one opaque ``call_module`` node, and the rest of the model is still traced.
  Existing reversible modules (PyG ``InvertibleModule``/``GroupAddRev``) and the modules
  named in ``GSRConfig.leaf_modules`` are kept whole the same way.
* ``torch.utils.checkpoint.checkpoint(module, ...)`` is recorded as a call of ``module``
  marked ``node.meta["gsr_checkpoint"]``, so a later pass can keep it checkpointed;
  ``checkpoint(function, ...)`` is traced through and its nodes become one marked call of a
  ``CheckpointedRegion`` (:mod:`gsr_compiler.checkpoint_regions`).

What the tracer decided is recorded in ``node.meta`` (``gsr_leaf``, ``gsr_checkpoint``)
and, for the whole trace, in ``graph_module.meta["gsr_trace"]`` (:class:`TraceFindings`).
"""
from __future__ import annotations

import builtins
import difflib
import inspect
import operator
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

from .checkpoint_regions import REGION, wrap_checkpoint_regions
from .data_inputs import stand_in_arguments
from .errors import GSRCompileError

try:  # PyG is a dependency, but keep tracing usable for plain torch models without it.
    from torch_geometric.nn import MLP as PyGMLP
    from torch_geometric.nn.aggr import Aggregation
    from torch_geometric.nn.conv import MessagePassing
    from torch_geometric.nn.dense.linear import Linear as PyGLinear
    from torch_geometric.nn.models.rev_gnn import InvertibleModule

    from torch_geometric.nn.pool import global_add_pool, global_max_pool, global_mean_pool
    from torch_geometric.utils import scatter, to_dense_batch

    _PYG_LEAVES: tuple[type, ...] = (MessagePassing, Aggregation, PyGLinear, PyGMLP)
    _ALREADY_REVERSIBLE: tuple[type, ...] = (InvertibleModule,)
    # PyG functions that read index values (a batch vector's max) to size their output: called
    # as written, one node each, wherever a traced forward names them.
    _PYG_LEAF_FUNCTIONS: tuple = (global_add_pool, global_mean_pool, global_max_pool, scatter,
                                  to_dense_batch)
    from torch_geometric.nn.pool import MemPooling

    # Static methods of PyG classes that do the same: (class, name).
    _PYG_LEAF_STATIC_METHODS: tuple = ((MemPooling, "kl_loss"),)
except ImportError:  # pragma: no cover - exercised only without PyG
    _PYG_LEAVES = ()
    _ALREADY_REVERSIBLE = ()
    _PYG_LEAF_FUNCTIONS = ()
    _PYG_LEAF_STATIC_METHODS = ()


def _is_pyg_norm(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch_geometric.nn.norm")


# -- what the tracer found -------------------------------------------------------------

@dataclass(frozen=True)
class LeafRecord:
    """A submodule kept whole (called as written, not traced into), and why.

    ``kind`` is ``"graph break"`` (tracing into it failed), ``"already reversible"`` or
    ``"leaf_modules"`` (named in ``GSRConfig.leaf_modules``).
    """

    module: str        # qualified name in the model
    type_name: str
    kind: str
    reason: str
    where: str | None = None  # the user's 'file:line: source' the reason points at

    def describe(self) -> str:
        where = f"\n      at {self.where}" if self.where else ""
        return f"'{self.module}' ({self.type_name}), {self.kind}: {self.reason}{where}"


@dataclass(frozen=True)
class CheckpointRecord:
    """A ``torch.utils.checkpoint.checkpoint(module or function, ...)`` call met while
    tracing."""

    module: str        # the module checkpointed, or the CheckpointedRegion of a function
    type_name: str     # the module's type, or the function's qualified name
    options: tuple[tuple[str, Any], ...]  # the checkpoint's own keyword arguments
    where: str | None = None
    not_kept: str | None = None  # why a checkpointed function stays traced through


@dataclass(frozen=True)
class Guard:
    """A fact the trace was specialized on: ``evaluate(expression)`` gave ``value``.

    ``expression`` is plain data (nested tuples, see :func:`evaluate`), so compiled
    modules stay picklable.
    """

    description: str
    expression: tuple
    value: Any

    def holds(self, inputs: dict[str, Any], root: nn.Module) -> bool:
        try:
            return evaluate(self.expression, inputs, root) == self.value
        except Exception:  # e.g. an input that is no longer a tensor: trace again
            return False


@dataclass
class TraceFindings:
    leaves: list[LeafRecord] = field(default_factory=list)
    checkpoints: list[CheckpointRecord] = field(default_factory=list)
    guards: list[Guard] = field(default_factory=list)


# -- facts that are not tensor values, decided from the real inputs ---------------------

class _NotConcrete(Exception):
    """The value depends on tensor data, not only on shapes, flags and grad mode."""


_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_sparse", "is_cuda", "layout"}
_SHAPE_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "is_floating_point"}
_PYTHON_FUNCTIONS = {getattr(operator, n) for n in (
    "getitem", "eq", "ne", "lt", "le", "gt", "ge", "add", "sub", "mul", "floordiv", "mod",
    "truediv", "neg", "not_", "and_", "or_", "is_", "is_not", "contains")} | {
    builtins.len, builtins.int, builtins.bool, builtins.min, builtins.max}


def evaluate(expression: tuple, inputs: dict[str, Any], root: nn.Module) -> Any:
    """The value of a guard expression for the call's ``inputs`` (by parameter name)."""
    kind = expression[0]
    if kind == "const":
        return expression[1]
    if kind == "input":
        return inputs[expression[1]]
    if kind == "param":
        return _state(root, expression[1])
    if kind == "attr":
        return getattr(evaluate(expression[1], inputs, root), expression[2])
    if kind == "method":
        target = evaluate(expression[1], inputs, root)
        return getattr(target, expression[2])(*[evaluate(a, inputs, root) for a in expression[3]])
    if kind == "call":
        return expression[1](*[evaluate(a, inputs, root) for a in expression[2]])
    if kind == "tuple":
        return tuple(evaluate(a, inputs, root) for a in expression[1])
    if kind == "requires_grad":
        # Autograd's rule: an op's output requires grad when grad mode is on and one of
        # the tensors it is computed from does.
        _, input_names, parameter_names = expression
        if not torch.is_grad_enabled():
            return False
        return any(isinstance(inputs.get(n), torch.Tensor) and inputs[n].requires_grad
                   for n in input_names) or any(
            _state(root, p).requires_grad for p in parameter_names)
    raise ValueError(f"unknown guard expression {kind!r}")


def _state(root: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer ``name`` of ``root``, read from the module dicts (while fx
    traces, attribute access on modules returns proxies)."""
    *path, leaf = name.split(".")
    module = root
    for part in path:
        module = module._modules[part]
    if leaf in module._parameters:
        return module._parameters[leaf]
    return module._buffers[leaf]


def describe(expression: tuple) -> str:
    """A guard expression as Python source (``x.shape[1]``)."""
    kind = expression[0]
    if kind == "const":
        return repr(expression[1])
    if kind in ("input", "param"):
        return expression[1]
    if kind == "attr":
        return f"{describe(expression[1])}.{expression[2]}"
    if kind == "method":
        return f"{describe(expression[1])}.{expression[2]}({', '.join(map(describe, expression[3]))})"
    if kind == "tuple":
        return f"({', '.join(map(describe, expression[1]))})"
    if kind == "call":
        fn, args = expression[1], [describe(a) for a in expression[2]]
        if fn is operator.getitem:
            return f"{args[0]}[{args[1]}]"
        return f"{getattr(fn, '__name__', fn)}({', '.join(args)})"
    if kind == "requires_grad":
        sources = list(expression[1]) + list(expression[2])
        shown = ", ".join(sources[:3]) + (", ..." if len(sources) > 3 else "")
        return f"requires_grad (grad mode and {shown})"
    return repr(expression)


def _node_source(node: fx.Node) -> str:
    """A short Python-like rendering of a traced node (``batch.max()``)."""
    def arg(a):
        return a.name if isinstance(a, fx.Node) else repr(a)
    if node.op == "call_method":
        rest = ", ".join(arg(a) for a in node.args[1:])
        return f"'{arg(node.args[0])}.{node.target}({rest})'"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"'{name}({', '.join(arg(a) for a in node.args)})'"
    return f"'{node.name}'"


class _SpecializingProxy(fx.Proxy):
    """A Proxy that Python may use as an int (``range(x.shape[1])``), decided at trace time."""

    def __index__(self) -> int:
        return self.tracer.specialize(self, int)

    def __int__(self) -> int:
        return self.tracer.specialize(self, int)


# -- the tracer ------------------------------------------------------------------------

_CHECKPOINT_OPTIONS = {"use_reentrant", "preserve_rng_state", "context_fn", "determinism_check",
                       "debug"}


class GSRTracer(fx.Tracer):
    """An ``fx.Tracer`` that keeps PyG layers whole, as ``call_module`` nodes, and traces
    PyG ``Data`` arguments as their tensors.

    Args:
        inputs: the call's tensor arguments by parameter name (real values), from which
            shapes and ``requires_grad`` are decided.
        leaf_types / leaf_names: modules the user asked to keep whole.
        breaks: modules whose tracing failed before (qualified name -> record).
        data_args: the call's ``Data`` arguments (name -> value), traced as a stand-in whose
            tensors are placeholders (:mod:`gsr_compiler.data_inputs`).
    """

    def __init__(self, inputs: dict[str, Any] | None = None,
                 leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset(),
                 breaks: dict[str, LeafRecord] | None = None,
                 data_args: dict[str, Any] | None = None) -> None:
        super().__init__(autowrap_functions=_PYG_LEAF_FUNCTIONS)
        self.data_args = data_args or {}
        self.inputs = dict(inputs or {})
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.breaks = dict(breaks or {})
        self.findings = TraceFindings()
        self._evaluated: set[fx.Node] = set()
        # Checkpointed functions traced through: region id -> record (checkpoint_regions.py).
        self.regions: dict[int, CheckpointRecord] = {}

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        root_fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        if self.data_args:
            args = stand_in_arguments(self, args, self.data_args)
        return root_fn, args

    # which modules stay whole

    def leaf_record(self, m: nn.Module, name: str) -> LeafRecord | None:
        """Why ``m`` is kept whole beyond PyG's layers, or None."""
        if name in self.breaks:
            return self.breaks[name]
        if name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return LeafRecord(name, type(m).__name__, "leaf_modules",
                              "named in GSRConfig.leaf_modules; called as written")
        if _ALREADY_REVERSIBLE and isinstance(m, _ALREADY_REVERSIBLE):
            return LeafRecord(name, type(m).__name__, "already reversible",
                              "it rebuilds its inputs in backward itself; left as written")
        return None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _PYG_LEAVES) or _is_pyg_norm(m):
            return True
        if module_qualified_name and self.leaf_record(m, module_qualified_name) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception as e:
            # Tag the exception (not the tracer): one that user code catches is no failure.
            if name and not hasattr(e, "_gsr_failed_module") and not self.is_leaf_module(m, name):
                try:
                    e._gsr_failed_module = name  # the innermost traced module: tagged first
                except AttributeError:  # pragma: no cover - exceptions without a __dict__
                    pass
            raise
        record = self.leaf_record(m, name) if name else None
        if record is not None and isinstance(out, fx.Proxy):
            out.node.meta["gsr_leaf"] = record
            if record not in self.findings.leaves:
                self.findings.leaves.append(record)
        return out

    # facts decided at trace time

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _SpecializingProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.specialize(obj, bool)

    def iter(self, obj: fx.Proxy):
        return iter(self.specialize(obj, tuple))

    def specialize(self, proxy: fx.Proxy, as_type: type) -> Any:
        """The real value of ``proxy`` when it depends on shapes, flags and grad mode only
        (recorded as a guard); raises fx's TraceError when it depends on tensor values."""
        try:
            expression = self._expression(proxy.node)
        except _NotConcrete:
            raise fx.proxy.TraceError(
                f"{_node_source(proxy.node)} depends on tensor values (not only on shapes, "
                f"flags and grad mode) and is used as a Python {as_type.__name__} (in control "
                "flow, range() or int())"
            ) from None
        value = evaluate(expression, self.inputs, self.root)
        if isinstance(value, torch.Size):
            value = tuple(value)
        guard = Guard(describe(expression), expression, value)
        if guard.expression not in [g.expression for g in self.findings.guards]:
            self.findings.guards.append(guard)
        return as_type(value)

    def _expression(self, node: Any) -> tuple:
        expression = self._build_expression(node)
        if isinstance(node, fx.Node):  # only nodes that were decided, never a layer call
            self._evaluated.add(node)
        return expression

    def _build_expression(self, node: Any) -> tuple:
        if isinstance(node, (list, tuple)):
            return ("tuple", tuple(self._expression(n) for n in node))
        if not isinstance(node, fx.Node):
            if isinstance(node, (torch.Tensor, nn.Module)):
                raise _NotConcrete
            return ("const", node)
        if node.op == "placeholder":
            if node.target not in self.inputs:
                raise _NotConcrete
            return ("input", node.target)
        if node.op == "get_attr":
            try:
                _state(self.root, node.target)
            except KeyError:  # not a parameter or buffer
                raise _NotConcrete from None
            return ("param", node.target)
        if node.op == "call_function" and node.target is builtins.getattr:
            obj, attribute = node.args[0], node.args[1]
            if attribute == "requires_grad":
                return self._requires_grad(obj)
            if attribute in _SHAPE_ATTRIBUTES:
                return ("attr", self._tensor_expression(obj), attribute)
            raise _NotConcrete
        if node.op == "call_method" and node.target in _SHAPE_METHODS and not node.kwargs:
            return ("method", self._tensor_expression(node.args[0]), node.target,
                    tuple(self._expression(a) for a in node.args[1:]))
        if node.op == "call_function" and node.target in _PYTHON_FUNCTIONS and not node.kwargs:
            return ("call", node.target, tuple(self._expression(a) for a in node.args))
        raise _NotConcrete

    def _tensor_expression(self, node: Any) -> tuple:
        """Shapes are known for the inputs and parameters only, not for intermediates."""
        if isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr"):
            return self._expression(node)
        raise _NotConcrete

    def _requires_grad(self, node: fx.Node) -> tuple:
        inputs, parameters, seen, todo = set(), set(), set(), [node]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder":
                inputs.add(n.target)
            elif n.op == "get_attr":
                try:
                    if isinstance(_state(self.root, n.target), nn.Parameter):
                        parameters.add(n.target)
                except KeyError:
                    pass
            elif n.op == "call_module":
                prefix = f"{n.target}." if n.target else ""
                parameters.update(prefix + p for p, _ in
                                  self.root.get_submodule(n.target).named_parameters())
            todo.extend(n.all_input_nodes)
        return ("requires_grad", tuple(sorted(inputs)), tuple(sorted(parameters)))

    def erase_evaluated_nodes(self, graph: fx.Graph) -> None:
        """Drops the nodes that only computed decided facts (the graph has the outcome)."""
        for node in reversed(list(graph.nodes)):
            if node in self._evaluated and not node.users and node.op != "placeholder":
                graph.erase_node(node)

    # torch.utils.checkpoint

    def checkpoint(self, function, *args, **kwargs):
        """Stands in for ``torch.utils.checkpoint.checkpoint`` while tracing."""
        proxies = [a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)]
        if not proxies or not isinstance(function, nn.Module):
            options = {k: kwargs.pop(k) for k in list(kwargs) if k in _CHECKPOINT_OPTIONS}
            if not proxies:
                return _ORIGINAL_CHECKPOINT(function, *args, **options, **kwargs)
            # A checkpointed function (not a module) is traced through; the nodes it ran are
            # marked, to become one CheckpointedRegion call (checkpoint_regions.py).
            last = next(reversed(self.graph.nodes))
            out = function(*args, **kwargs)
            record = CheckpointRecord(
                "", getattr(function, "__qualname__", type(function).__name__),
                tuple(sorted(options.items())), _user_frame_of_stack())
            rid = len(self.regions)
            self.regions[rid] = record
            node = last.next
            while node is not self.graph._root:
                inner = node.meta.get(REGION)
                if inner is not None:  # a checkpoint inside this one: this one covers it
                    self.regions.pop(inner, None)
                node.meta[REGION] = rid
                node = node.next
            return out
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in _CHECKPOINT_OPTIONS}
        name = self.path_of_module(function)
        out = self.create_proxy("call_module", name, args, kwargs)
        record = CheckpointRecord(name, type(function).__name__, tuple(sorted(options.items())),
                                  _user_frame_of_stack())
        out.node.meta["gsr_checkpoint"] = record
        self.findings.checkpoints.append(record)
        return out


_ORIGINAL_CHECKPOINT = torch_checkpoint.checkpoint


class _CheckpointPatched:
    """Replaces ``checkpoint`` in ``torch.utils.checkpoint`` and in the globals of every
    forward of ``model`` (``from torch.utils.checkpoint import checkpoint``) while tracing."""

    def __init__(self, tracer: GSRTracer, model: nn.Module) -> None:
        self.tracer, self.model, self.undo = tracer, model, []

    def __enter__(self):
        replacement = self.tracer.checkpoint
        namespaces = [vars(torch_checkpoint)]
        for m in self.model.modules():
            g = getattr(getattr(type(m), "forward", None), "__globals__", None)
            if g is not None and all(g is not n for n in namespaces):
                namespaces.append(g)
        for namespace in namespaces:
            for key, value in list(namespace.items()):
                if value is _ORIGINAL_CHECKPOINT:
                    namespace[key] = replacement
                    self.undo.append((namespace, key))
        return self

    def __exit__(self, *exc):
        for namespace, key in self.undo:
            namespace[key] = _ORIGINAL_CHECKPOINT
        self.undo.clear()


class _LeafFunctionAttributesPatched:
    """A module attribute holding a PyG leaf function (``self.pool = global_mean_pool``, as
    OGB's examples choose their pooling), or a PyG static method of the same kind
    (``MemPooling.kl_loss``), is not a global that fx's autowrap patches: while tracing,
    calling it with traced values records one ``call_function`` node."""

    def __init__(self, tracer: GSRTracer, model: nn.Module) -> None:
        self.tracer, self.model, self.undo = tracer, model, []

    def _leaf_call(self, fn):
        def call(*args, **kwargs):
            traced = []
            fx.node.map_aggregate((args, kwargs), lambda a: traced.append(
                isinstance(a, fx.Proxy)) or a)
            if any(traced):
                return self.tracer.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)
        return call

    def __enter__(self):
        for m in self.model.modules():
            for key, value in list(vars(m).items()):
                if any(value is f for f in _PYG_LEAF_FUNCTIONS):
                    m.__dict__[key] = self._leaf_call(value)
                    self.undo.append((m.__dict__, key, value))
        for owner, name in _PYG_LEAF_STATIC_METHODS:
            original = owner.__dict__[name]
            setattr(owner, name, staticmethod(self._leaf_call(original.__func__)))
            self.undo.append((owner, name, original))
        return self

    def __exit__(self, *exc):
        for target, key, value in reversed(self.undo):
            if isinstance(target, dict):
                target[key] = value
            else:
                setattr(target, key, value)
        self.undo.clear()


# -- entry points ----------------------------------------------------------------------

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


def _library_dirs() -> tuple[str, ...]:
    skip = (
        os.path.dirname(torch.__file__),
        os.path.dirname(os.path.abspath(__file__)),
    )
    try:
        import torch_geometric

        skip += (os.path.dirname(torch_geometric.__file__),)
    except ImportError:  # pragma: no cover
        pass
    return skip


def _innermost_user_frame(frames: Sequence[traceback.FrameSummary]) -> str | None:
    skip = _library_dirs()
    user = None
    for frame in frames:
        if not os.path.abspath(frame.filename).startswith(skip):
            user = frame
    if user is None:
        return None
    return f"{user.filename}:{user.lineno}: {(user.line or '').strip()}"


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame that is the user's code, as 'file:line: source'."""
    return _innermost_user_frame(traceback.extract_tb(exc.__traceback__))


def _user_frame_of_stack() -> str | None:
    return _innermost_user_frame(traceback.extract_stack())


def check_leaf_modules(model: nn.Module, leaf_modules: tuple) -> None:
    """Raises when ``GSRConfig.leaf_modules`` names a module ``model`` does not have."""
    names = [n for n, _ in model.named_modules() if n]
    for name in leaf_modules:
        if isinstance(name, str) and name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            top = ", ".join(n for n, _ in model.named_children())
            raise GSRCompileError(
                f"leaf_modules names {name!r}, which is not a submodule of "
                f"{type(model).__name__}"
                + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else "")
                + f"; give qualified names as model.named_modules() lists them (its children: "
                f"{top}), or module types.")


def trace(model: nn.Module, concrete_args: dict[str, Any],
          inputs: dict[str, Any] | None = None, leaf_modules: tuple = (),
          data_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Traces ``model`` with the given non-tensor arguments fixed, and each PyG ``Data``
    argument in ``data_args`` as its tensors (see :mod:`gsr_compiler.data_inputs`).

    ``inputs`` are the call's tensor arguments by parameter name; facts such as their
    shapes and ``requires_grad`` are decided from them (``meta["gsr_trace"].guards``).
    A submodule that cannot be traced is kept whole (a graph break, recorded in
    ``node.meta["gsr_leaf"]``). Raises :class:`GSRCompileError` naming the user's source
    line when the model's own ``forward`` cannot be traced.
    """
    leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
    leaf_names = frozenset(m for m in leaf_modules if isinstance(m, str))
    breaks: dict[str, LeafRecord] = {}
    while True:
        tracer = GSRTracer(inputs, leaf_types, leaf_names, breaks, data_args)
        try:
            with _CheckpointPatched(tracer, model), _LeafFunctionAttributesPatched(tracer, model):
                graph = tracer.trace(model, concrete_args=concrete_args or None)
            break
        except Exception as e:  # fx raises TraceError, TypeError, RuntimeError, ...
            where = _user_frame(e)
            name = getattr(e, "_gsr_failed_module", None)
            if name is not None and name not in breaks:
                module = model.get_submodule(name)
                breaks[name] = LeafRecord(name, type(module).__name__, "graph break",
                                          f"cannot be traced ({type(e).__name__}: {e}); "
                                          "called as written", where)
                continue
            raise _trace_error(model, e, where) from e
    _drop_specialization_asserts(graph)
    tracer.erase_evaluated_nodes(graph)
    for node in graph.nodes:
        if isinstance(node.type, str):  # postponed annotations: GraphModules would not pickle
            node.type = None
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    if tracer.regions:
        regions = dict(tracer.regions)
        refused = wrap_checkpoint_regions(gm, regions)
        for rid in sorted(regions):
            record = regions[rid]
            if rid in refused:
                record = CheckpointRecord("", record.type_name, record.options, record.where,
                                          refused[rid])
            tracer.findings.checkpoints.append(record)
    gm.meta["gsr_trace"] = tracer.findings
    return gm


def _trace_error(model: nn.Module, e: Exception, where: str | None) -> GSRCompileError:
    hint = (
        "Data-dependent Python control flow (if/while on tensor values) cannot be traced; "
        "rewrite it with tensor ops, or move it into a submodule, which is then called "
        "as written (a graph break)."
        if isinstance(e, fx.proxy.TraceError)
        else "Make this code traceable by torch.fx, or move it into a submodule, which is "
             "then called as written (a graph break)."
    )
    return GSRCompileError(
        f"cannot trace {type(model).__name__}: {e}"
        + (f"\n  at {where}" if where else "")
        + f"\n  {hint}"
    )


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
