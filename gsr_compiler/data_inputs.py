"""PyG ``Data``/``Batch`` arguments: ``forward(self, data)`` traced as the tensors it holds.

A model written ``def forward(self, data): x, edge_index = data.x, data.edge_index`` is
traced with a stand-in for ``data`` (:class:`TracedData`) whose tensor attributes are graph
inputs, one placeholder each (``data_x``, ``data_edge_index``, ...), and whose other
attributes are the values the call's ``Data`` holds, fixed in the traced graph. At call time
:func:`flatten_arguments` passes the ``Data``'s tensors to those placeholders in the same
order.

What a graph is specialized on is its :class:`DataSignature`, part of the compiled module's
retrace key: the ``Data`` class, which keys it holds and which of them are tensors, its
non-tensor values (``None``, bool, int, float, str), ``num_graphs`` of a ``Batch``, and where
``num_nodes`` comes from. A call whose ``Data`` differs in any of these is traced again, so
that a missing key reads as it does in eager (``None`` for PyG's named attributes such as
``data.batch`` or ``data.edge_attr``, ``AttributeError`` otherwise) and never as a stale value.

``num_nodes`` is not specialized on its value where the ``Data`` can say it with a shape: it
is then ``data_x.size(0)`` in the graph, as fx records ``x.size(0)``, so that graphs and
batches of other sizes reuse the trace. That holds when ``num_nodes`` is not stored (PyG
infers it from the first node-level tensor, as here) and when it is stored and equal to that
tensor's size (OGB datasets store it; a ``Batch`` sums it). Otherwise its value is part of the
signature. ``num_graphs`` of a ``Batch`` is specialized on its value: it is the batch size,
the same for every batch of a loader but the last, and code such as
``global_add_pool(x, batch, size=data.num_graphs)`` needs it as a number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .errors import GSRCompileError

try:
    from torch_geometric.data import Batch, Data
    from torch_geometric.data.storage import N_KEYS
except ImportError:  # pragma: no cover - exercised only without PyG
    Batch = Data = None
    N_KEYS = set()

_CONCRETE_TYPES = (type(None), bool, int, float, str)


def is_data(value: Any) -> bool:
    """Whether ``value`` is a PyG homogeneous ``Data`` (or a ``Batch`` of them)."""
    return Data is not None and isinstance(value, Data)


@dataclass(frozen=True)
class DataSignature:
    """What a graph traced with a ``Data`` argument is specialized on (hashable).

    Attributes:
        data_type: the ``Data`` class (a ``Batch`` of ``Data`` is its own class).
        tensor_keys: the keys holding tensors, sorted: one placeholder each, in this order.
        constants: the other keys with ``None``/bool/int/float/str values, and those values.
        opaque: the keys holding anything else (lists, dicts), with their type names; reading
            one in a traced forward is an error, so their values need not match.
        num_nodes: ``("shape", key, dim)`` when ``data.num_nodes`` is ``data[key].size(dim)``,
            else ``("value", n)``.
        num_graphs: ``data.num_graphs`` of a ``Batch``; None for a ``Data``.
    """

    data_type: type
    tensor_keys: tuple[str, ...]
    constants: tuple[tuple[str, Any], ...]
    opaque: tuple[tuple[str, str], ...]
    num_nodes: tuple
    num_graphs: int | None

    @classmethod
    def of(cls, data: Any) -> "DataSignature":
        tensors, constants, opaque = [], [], []
        for key, value in data._store.items():
            if key == "num_nodes":
                continue
            if isinstance(value, torch.Tensor):
                tensors.append(key)
            elif isinstance(value, _CONCRETE_TYPES):
                constants.append((key, value))
            else:
                opaque.append((key, type(value).__name__))
        num_graphs = data.num_graphs if isinstance(data, Batch) else None
        return cls(type(data), tuple(sorted(tensors)), tuple(sorted(constants)),
                   tuple(sorted(opaque)), _num_nodes_source(data), num_graphs)

    def placeholder_names(self, name: str) -> list[str]:
        return [f"{name}_{key}" for key in self.tensor_keys]


def _num_nodes_source(data: Any) -> tuple:
    """Where ``data.num_nodes`` comes from (see the module docstring)."""
    store = data._store
    node_key = next((k for k, v in store.items() if k in N_KEYS and isinstance(v, torch.Tensor)),
                    None)
    shape = None
    if node_key is not None:
        dim = data.__cat_dim__(node_key, store[node_key], store)
        shape = ("shape", node_key, dim)
    if "num_nodes" in store:
        stored = store["num_nodes"]
        if shape is not None and store[node_key].size(shape[2]) == stored:
            return shape
        return ("value", stored)
    return shape if shape is not None else ("value", data.num_nodes)


def split_data_arguments(concrete: dict[str, Any]) -> tuple[dict[str, Any], dict[str, DataSignature]]:
    """The non-tensor arguments of a call split into plain values and ``Data`` objects
    (by their signatures)."""
    plain = {n: v for n, v in concrete.items() if not is_data(v)}
    data = {n: DataSignature.of(v) for n, v in concrete.items() if is_data(v)}
    return plain, data


def flatten_arguments(names: list[str], values: list,
                      signatures: dict[str, DataSignature]) -> tuple[list[str], list]:
    """The call's bound arguments with each ``Data`` replaced by its tensors in signature
    order: the inputs of the traced graph, and their names."""
    flat_names, flat_values = [], []
    for name, value in zip(names, values):
        signature = signatures.get(name)
        if signature is None:
            flat_names.append(name)
            flat_values.append(value)
        else:
            flat_names += signature.placeholder_names(name)
            flat_values += [value._store[key] for key in signature.tensor_keys]
    return flat_names, flat_values


class MissingDataAttribute(AttributeError):
    """A traced forward read a key its ``Data`` does not hold: the error eager raises."""


class TracedData:
    """Stands in for a ``Data`` argument while tracing (see the module docstring).

    Supports what a forward reads of a ``Data``: attributes and ``data[key]``, ``key in data``,
    ``data.keys()``, ``num_nodes``, ``num_edges``, ``num_graphs``. Anything else of the
    ``Data`` API raises :class:`GSRCompileError` rather than being baked into the graph.
    """

    def __init__(self, name: str, data: Any, signature: DataSignature,
                 proxies: dict[str, fx.Proxy]) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_data", data)  # only for what eager says of missing keys
        object.__setattr__(self, "_signature", signature)
        object.__setattr__(self, "_proxies", proxies)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):  # protocol probes (copy, torch functions): not Data keys
            raise AttributeError(key)
        signature = self._signature
        if key in self._proxies:
            return self._proxies[key]
        if key == "num_nodes":
            source = signature.num_nodes
            return self._proxies[source[1]].size(source[2]) if source[0] == "shape" else source[1]
        if key == "num_edges" and "edge_index" in self._proxies:
            return self._proxies["edge_index"].size(1)
        if key == "num_graphs" and signature.num_graphs is not None:
            return signature.num_graphs
        constants = dict(signature.constants)
        if key in constants:
            return constants[key]
        opaque = dict(signature.opaque)
        if key in opaque:
            raise GSRCompileError(
                f"{self._name}.{key} is a {opaque[key]}; gsr_compile traces the tensors of a "
                "Data and specializes on its None, bool, int, float and str values.")
        member = getattr(type(self._data), key, None)
        if isinstance(member, property) and getattr(self._data, key) is None:
            return None  # PyG's named attributes (data.batch, data.edge_attr) when absent
        if member is not None:  # a method or property of Data that is not modelled here
            raise GSRCompileError(
                f"{self._name}.{key} is not supported in a traced forward: gsr_compile reads a "
                "Data's keys, num_nodes, num_edges and num_graphs. Read the tensors you need "
                f"from {self._name} and compute with them.")
        try:
            getattr(self._data, key)
        except AttributeError as e:
            raise MissingDataAttribute(str(e)) from None
        raise GSRCompileError(f"{self._name}.{key} is not a key of the Data; gsr_compile cannot "
                              "trace it")

    def __getitem__(self, key: str) -> Any:
        if key in self._data._store:
            return self.__getattr__(key)
        raise KeyError(key)  # as the Data's store raises

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def keys(self) -> list[str]:
        return self._data.keys()

    def __setattr__(self, key: str, value: Any) -> None:
        raise GSRCompileError(f"a traced forward cannot set {self._name}.{key}: gsr_compile "
                              "traces a Data argument as read-only. Use a local variable.")


def stand_in_arguments(tracer: fx.Tracer, args: list, data_args: dict[str, Any]) -> list:
    """``args`` (from ``Tracer.create_args_for_root``) with each ``Data`` argument's placeholder
    replaced by a :class:`TracedData` over placeholders for its tensors, made in its place."""
    out = list(args)
    for i, arg in enumerate(args):
        if not (isinstance(arg, fx.Proxy) and arg.node.op == "placeholder"
                and arg.node.target in data_args):
            continue
        name, data = arg.node.target, data_args[arg.node.target]
        signature = DataSignature.of(data)
        with tracer.graph.inserting_before(arg.node):
            proxies = {key: tracer.create_proxy("placeholder", placeholder, (), {})
                       for key, placeholder in zip(signature.tensor_keys,
                                                   signature.placeholder_names(name))}
        tracer.graph.erase_node(arg.node)
        out[i] = TracedData(name, data, signature, proxies)
    return out
