"""What a message-passing layer keeps for backward *inside* itself, measured by running it.

The liveness walk sees a PyG layer as one graph node: it counts the layer's inputs (which the
layer's first ops keep) and its messages, but not what the ops inside keep: ``SAGEConv`` keeps
the aggregated neighbourhood ``[N, C]`` for ``lin_l``'s backward, ``GINConv`` the hidden layer of
its MLP, ``GATConv`` its attention coefficients ``[E, heads]`` and its projected messages. For a
deep plain model that is a third or more of what a step keeps, so a prediction without it falls
short by as much.

Nor does it see what they allocate while they run: the gathered messages, the ``int64`` column
indices a compressed layer builds from its kept positions, the gradients of what it kept.

Rather than a table per layer class (which a user's own ``MessagePassing`` would not be in), the
layer itself is run once, forward and backward, on small random inputs of the traced shapes at
three sizes, ``(n, e)``, ``(2n, e)`` and ``(n, 2e)``: ``saved_tensors_hooks`` give the bytes it
keeps beyond its inputs, its output and its parameters; the profiler's allocation events give
the high point of what its forward allocates beyond its output and what it keeps, and of what
its backward allocates beyond its inputs' gradients. Each is solved for
``const + per_node * N + per_edge * E`` (exact for layers whose tensors are affine in the sizes,
which message passing is). Layers of the same class, configuration and input shapes share one
measurement.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..runtime.arena import SymbolicSize

__all__ = ["LayerMemory", "internal_saved_bytes", "clear_cache"]

_PROBE_NODES, _PROBE_EDGES = 97, 163  # small, and unlike any channel count
_CACHE: dict[tuple, Optional["LayerMemory"]] = {}


def clear_cache() -> None:
    _CACHE.clear()


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@dataclass(frozen=True)
class LayerMemory:
    """What one message-passing layer needs beyond its inputs, output and parameters, symbolic
    in N and E: ``kept`` (saved for backward), ``forward`` (the transient high point while its
    forward runs, on top of its output and ``kept``), ``backward`` (the high point while its
    backward runs, on top of the gradients of its inputs), and whether it keeps its output."""

    kept: SymbolicSize
    forward: SymbolicSize
    backward: SymbolicSize
    keeps_output: bool


def allocation_peak(run: Callable[[], Any]) -> tuple[Any, int]:
    """``run()``'s result and the high point of the bytes it allocated, from the profiler's
    allocation events (CPU and CUDA alike)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with _quiet_stderr(), profile(activities=activities, profile_memory=True) as prof:
        result = run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return result, peak


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's native logger writes a line to fd 2 at every start and stop; a probe is
    not something the user asked to profile."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (an embedded interpreter): leave it
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {_storage_key(t): t for t in tensors}.values())


def _measure(module: nn.Module, make_args: Callable[[int, int], tuple[list, dict]],
             n: int, e: int) -> tuple[int, bool, int, int]:
    """At ``(n, e)``: bytes kept beyond inputs, output and parameters; whether the output is
    kept; the forward's and the backward's transient high points beyond what is counted
    elsewhere (see :class:`LayerMemory`)."""
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

    def forward():
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return module(*args, **kwargs)

    out, forward_peak = allocation_peak(forward)
    outs = {_storage_key(t) for t in _tensors(out)}
    output_kept = any(p in seen for p in outs)
    kept = sum(b for p, b in seen.items() if p not in outs)
    out_bytes = _nbytes(list(_tensors(out)))
    forward_extra = max(0, forward_peak - out_bytes - kept)
    backward_extra = 0
    wants = [t for a in list(args) + list(kwargs.values()) for t in _tensors(a)
             if t.requires_grad]
    if isinstance(out, torch.Tensor) and out.requires_grad and wants:
        grad_out = torch.randn_like(out)
        grads, backward_peak = allocation_peak(
            lambda: torch.autograd.grad(out, wants, grad_out, allow_unused=True))
        produced = _nbytes([g for g in grads if g is not None])
        backward_extra = max(0, backward_peak - produced)
    return kept, output_kept, forward_extra, backward_extra


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


def _affine(base: int, more_nodes: int, more_edges: int, n: int, e: int) -> SymbolicSize:
    per_node = max(0, round((more_nodes - base) / n))
    per_edge = max(0, round((more_edges - base) / e))
    return SymbolicSize(const=max(0, base - per_node * n - per_edge * e), per_node=per_node,
                        per_edge=per_edge)


def internal_saved_bytes(module: nn.Module, key: tuple,
                         make_args: Callable[[int, int], tuple[list, dict]]
                         ) -> Optional[LayerMemory]:
    """What the layer needs inside itself (:class:`LayerMemory`), or None when it cannot be
    run on made-up inputs (then the liveness walk counts it as before).

    ``make_args(n, e)`` builds the layer's arguments for ``n`` nodes and ``e`` edges; ``key``
    identifies layers that need the same (class, configuration, input shapes).
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
            base = _measure(module, make_args, n, e)
            more_nodes = _measure(module, make_args, 2 * n, e)
            more_edges = _measure(module, make_args, n, 2 * e)
        terms = [_affine(base[i], more_nodes[i], more_edges[i], n, e) for i in (0, 2, 3)]
        result = LayerMemory(kept=terms[0], forward=terms[1], backward=terms[2],
                             keeps_output=base[1])
    except Exception:  # a layer that needs inputs we cannot make up: count as before
        result = None
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
    _CACHE[key] = result
    return result
