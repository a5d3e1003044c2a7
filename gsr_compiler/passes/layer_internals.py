"""What a message-passing layer keeps for backward *inside* itself, measured by running it.

The liveness walk sees a PyG layer as one graph node: it counts the layer's inputs (which the
layer's first ops keep) and its messages, but not what the ops inside keep: ``SAGEConv`` keeps
the aggregated neighbourhood ``[N, C]`` for ``lin_l``'s backward, ``GINConv`` the hidden layer of
its MLP, ``GATConv`` its attention coefficients ``[E, heads]`` and its projected messages. For a
deep plain model that is a third or more of what a step keeps, so a prediction without it falls
short by as much.

Rather than a table per layer class (which a user's own ``MessagePassing`` would not be in), the
layer itself is run once on small random inputs of the traced shapes at three sizes,
``(n, e)``, ``(2n, e)`` and ``(n, 2e)``, under ``saved_tensors_hooks``; the bytes it keeps beyond
its inputs, its output and its parameters are solved for ``const + per_node * N + per_edge * E``
(exact for layers whose kept tensors are affine in the sizes, which message passing is).
Layers of the same class, configuration and input shapes share one measurement.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ..runtime.arena import SymbolicSize

__all__ = ["internal_saved_bytes", "clear_cache"]

_PROBE_NODES, _PROBE_EDGES = 97, 163  # small, and unlike any channel count
_CACHE: dict[tuple, Optional[tuple[SymbolicSize, bool]]] = {}


def clear_cache() -> None:
    _CACHE.clear()


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _measure(module: nn.Module, make_args: Callable[[int, int], tuple[list, dict]],
             n: int, e: int) -> tuple[int, bool]:
    """Bytes kept beyond inputs, output and parameters at ``(n, e)``; whether the output is kept."""
    args, kwargs = make_args(n, e)
    exclude = {_storage_key(p) for p in module.parameters()}
    exclude |= {_storage_key(b) for b in module.buffers()}
    inputs = set()
    for a in list(args) + list(kwargs.values()):
        for t in _tensors(a):
            inputs.add(_storage_key(t))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.layout == torch.strided:
            ptr = _storage_key(t)
            if ptr and ptr not in exclude and ptr not in inputs:
                seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*args, **kwargs)
    outs = {_storage_key(t) for t in _tensors(out)}
    output_kept = any(p in seen for p in outs)
    return sum(b for p, b in seen.items() if p not in outs), output_kept


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif hasattr(value, "values") and hasattr(value, "indices") and \
            isinstance(getattr(value, "values"), torch.Tensor):  # a CompressedActivation
        yield value.values
        yield value.indices


def internal_saved_bytes(module: nn.Module, key: tuple,
                         make_args: Callable[[int, int], tuple[list, dict]]
                         ) -> Optional[tuple[SymbolicSize, bool]]:
    """``(bytes kept inside the layer, whether it keeps its output)``, symbolic in N and E, or
    None when the layer cannot be run on made-up inputs (then nothing is added).

    ``make_args(n, e)`` builds the layer's arguments for ``n`` nodes and ``e`` edges; ``key``
    identifies layers that keep the same (class, configuration, input shapes).
    """
    if key in _CACHE:
        return _CACHE[key]
    result = None
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda})
    n, e = _PROBE_NODES, _PROBE_EDGES
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            base, kept_out = _measure(module, make_args, n, e)
            more_nodes, _ = _measure(module, make_args, 2 * n, e)
            more_edges, _ = _measure(module, make_args, n, 2 * e)
        per_node = max(0, round((more_nodes - base) / n))
        per_edge = max(0, round((more_edges - base) / e))
        const = max(0, base - per_node * n - per_edge * e)
        result = (SymbolicSize(const=const, per_node=per_node, per_edge=per_edge), kept_out)
    except Exception:  # a layer that needs inputs we cannot make up: count as before
        result = None
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
    _CACHE[key] = result
    return result
