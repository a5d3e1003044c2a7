"""The call's inputs: what to say when a layer of the model fails on them while the
compiler runs the traced graph. Likely causes are recognized from the tensors, as hints
under the failing layer's own error.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import fx

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
