"""The call's inputs: checks made before anything runs, and what to say when a layer of
the model fails on them while the compiler runs the traced graph.

Only what no model can accept is rejected up front (meta tensors, and an ``edge_index``
that a PyG layer receives as is but which is not an integer ``[2, E]`` tensor). Other
causes are recognized after the fact, as hints under the failing layer's own error.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterator

import torch
from torch import fx, nn

from .errors import GSRCompileError

try:
    from torch_geometric.nn.conv import MessagePassing
except ImportError:  # pragma: no cover - exercised only without PyG
    MessagePassing = ()

# The conversion methods users know, for hints such as "call model.double()".
_CAST = {torch.float64: "double", torch.float32: "float", torch.float16: "half",
         torch.bfloat16: "bfloat16"}


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_inputs(model: nn.Module, names: list[str], values: list) -> None:
    """Raises :class:`GSRCompileError` for meta tensors among the call's arguments or the
    model's parameters and buffers: they have shapes but no data, and compiling runs the
    model once on the real inputs."""
    meta_args = [n for n, v in zip(names, values) if any(t.is_meta for t in _tensors(v))]
    if meta_args:
        which = (f"arguments {', '.join(repr(n) for n in meta_args)} are" if len(meta_args) > 1
                 else f"argument {meta_args[0]!r} is")
        raise GSRCompileError(
            f"{which} on the meta device: meta tensors have no data and cannot be run, and "
            "gsr_compile runs the model once on the call's inputs. Pass real tensors."
        )
    meta_state = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta_state:
        shown = ", ".join(meta_state[:3]) + (", ..." if len(meta_state) > 3 else "")
        raise GSRCompileError(
            f"{type(model).__name__} has parameters or buffers on the meta device ({shown}): "
            "meta tensors have no data and cannot be run. Materialize the model first, e.g. "
            "model.to_empty(device='cpu') and load its weights."
        )


def _edge_index_argument(gm: fx.GraphModule, user: fx.Node) -> fx.Node | None:
    """The node ``user`` passes to a PyG message-passing layer as its ``edge_index``."""
    if user.op != "call_module" or not isinstance(gm.get_submodule(user.target), MessagePassing):
        return None
    try:
        bound = inspect.signature(gm.get_submodule(user.target).forward).bind(
            *user.args, **user.kwargs)
    except TypeError:
        return None
    return bound.arguments.get("edge_index")


def check_edge_index(gm: fx.GraphModule, values: list) -> None:
    """Raises :class:`GSRCompileError` when a plain ``edge_index`` tensor that the traced
    graph hands as is to a PyG layer is not an integer ``[2, E]`` tensor.

    Only such a direct use is checked: a model may take another layout and convert it
    itself, and sparse adjacency tensors are valid ``edge_index`` arguments too. Its
    values are not checked against the node count: a model may append nodes (a virtual
    node) before its first layer; a bad index shows as that layer's error.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, values):
        if node.target != "edge_index" or not isinstance(value, torch.Tensor) \
                or value.layout != torch.strided:
            continue
        layer = next((u.target for u in node.users if _edge_index_argument(gm, u) is node), None)
        if layer is None:
            continue
        kind = type(gm.get_submodule(layer)).__name__
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise GSRCompileError(
                f"argument 'edge_index' is {_dtype(value.dtype)}; layer '{layer}' ({kind}) needs "
                "an integer tensor of node indices, shape [2, E]. Cast it: edge_index.long()."
            )
        if value.dim() != 2 or value.size(0) != 2:
            transposed = value.dim() == 2 and value.size(1) == 2
            raise GSRCompileError(
                f"argument 'edge_index' has shape {list(value.shape)}; layer '{layer}' ({kind}) "
                "needs shape [2, E]: row 0 the source nodes, row 1 the targets."
                + (" It looks transposed: pass edge_index.t()." if transposed else "")
            )


def describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    """The user's layer that ``node`` runs, as "layer 'blocks.3.conv' (SAGEConv)"."""
    if node.op == "call_module":
        return f"layer '{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    op = getattr(node.target, "__name__", str(node.target))
    stack = node.meta.get("nn_module_stack")
    if stack:  # a function called inside one of the user's modules
        path, kind = list(stack.values())[-1]
        return f"layer '{path}' ({getattr(kind, '__name__', kind)}), at {op}"
    return f"{type(gm).__name__}.forward, at {op}"


def failure_hints(gm: fx.GraphModule, node: fx.Node, args: tuple,
                  inputs: dict[str, Any]) -> list[str]:
    """Likely causes of ``node`` failing on ``args``, when recognizable from the tensors."""
    hints = []
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    features = next(_tensors(args), None)
    reads = {a.target for a in node.all_input_nodes if a.op == "placeholder"}
    weight = next((p for p in module.parameters() if p.is_floating_point()), None) \
        if module is not None else None
    if features is not None and weight is not None and features.dtype != weight.dtype:
        have, want = features.dtype, weight.dtype
        cast = f"x.{_CAST[want]}()" if want in _CAST else f"x.to({want})"
        if have.is_floating_point:
            convert = f"model.{_CAST[have]}()" if have in _CAST else f"model.to({have})"
            hints.append(f"dtype mismatch: the input is {_dtype(have)}, the layer's weights "
                         f"{_dtype(want)}; call {convert} or cast the inputs ({cast})")
        else:
            hints.append(f"the input is {_dtype(have)}; node features must be floating point "
                         f"like the layer's weights ({_dtype(want)}): cast them ({cast})")
    expected = next(((a, getattr(module, a)) for a in ("in_features", "in_channels")
                     if isinstance(getattr(module, a, None), int)), None)
    if features is not None and features.dim() > 0 and expected is not None \
            and expected[1] > 0 and features.size(-1) != expected[1]:
        attr, width = expected
        source = next((f" (the width of '{n}')" for n in reads
                       if inputs.get(n) is features), "")
        hints.append(f"input width: the layer expects {attr}={width} but its input has "
                     f"{features.size(-1)} features{source}; build the model for the data's "
                     f"width or pass inputs with {width} features")
    edge_index = inputs.get("edge_index")
    if "edge_index" in reads and isinstance(edge_index, torch.Tensor) \
            and edge_index.layout == torch.strided and features is not None \
            and features is not edge_index:
        hints += _edge_index_hints(edge_index, features.size(0) if features.dim() else 0)
    return hints


def _edge_index_hints(edge_index: torch.Tensor, num_nodes: int) -> list[str]:
    rule = "edge_index must be [2, E] int64 with values in [0, N)"
    if edge_index.dtype.is_floating_point or edge_index.dim() != 2 or edge_index.size(0) != 2:
        return [f"{rule}; it is {_dtype(edge_index.dtype)} of shape {list(edge_index.shape)}"]
    if edge_index.numel() == 0:
        return []
    low, high = int(edge_index.min()), int(edge_index.max())
    if low < 0 or high >= num_nodes:
        bad = low if low < 0 else high
        return [f"{rule}; it holds {bad}, but the layer gets N = {num_nodes} nodes"]
    return []
