r"""Halo exchange: the rows a rank's message-passing layers read from other ranks.

A rank holds the rows of the nodes it owns, ``x [num_owned, ...]``. A message-passing layer
aggregates over the edges that end in those nodes, whose sources may be owned elsewhere (the
halo, :class:`~gsr_compiler.distributed.partition.LocalGraph`). :func:`halo_exchange` returns
``[x | halo rows]`` with one ``all_to_all_single``: each rank sends the rows of ``x`` listed in
``send_index`` and receives its halo, grouped by owner. Its backward runs the same collective
the other way round: the gradient of each halo row goes back to its owner and is added into the
gradient of the row it was copied from.

:func:`attach_halo_exchange` puts the exchange in front of every message-passing layer of a
model with forward hooks: the layer runs on ``[owned | halo]`` rows with the local
``edge_index`` and its output is cut back to the owned rows. Hooks run wherever the layer is
called, so the layers inside a reversible chain exchange in the chain's forward and again in its
backward recompute (which rebuilds activations instead of storing them): twice per layer and
step in the forward direction, and once more, backward, for the halo gradients.

``GCNConv(normalize=True)`` (and its compressed form) gets the edge weights ``gcn_norm`` gives on
the whole graph (:meth:`HaloPlan.gcn_edges`): the degree of a halo source counts edges that other
ranks hold.

Every rank must issue the same collectives in the same order. That holds because every rank
runs the same compiled program: a reversible chain's forward calls its blocks first to last and
its backward last to first, group after group (``runtime/reversible.py``), with no
data-dependent skips, and autograd orders the backward of identical graphs identically.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..runtime.sparse.compressed import CompressedActivation
from .partition import LocalGraph

__all__ = ["HaloPlan", "HaloStats", "halo_exchange", "attach_halo_exchange",
           "message_passing_layers"]


@dataclass
class HaloStats:
    """What this rank's exchanges moved since the last :meth:`reset`."""

    forward_calls: int = 0
    backward_calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def reset(self) -> None:
        self.forward_calls = self.backward_calls = self.bytes_sent = self.bytes_received = 0

    def as_dict(self) -> dict:
        return {"forward_calls": self.forward_calls, "backward_calls": self.backward_calls,
                "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}


@dataclass
class HaloPlan:
    """One rank's exchange: rows to send to each rank, rows to receive from each.

    Attributes:
        num_owned: rows this rank owns (the first dimension of the tensors it exchanges).
        send_index: local rows sent, concatenated by destination rank.
        send_counts, recv_counts: rows per rank.
        group: the process group (None: the default group).
        enabled: False runs layers without exchange (while the model is traced on the rank's
            own edges).
    """

    num_owned: int
    send_index: Tensor
    send_counts: list[int]
    recv_counts: list[int]
    group: Optional[Any] = None
    enabled: bool = True
    stats: HaloStats = field(default_factory=HaloStats)
    local: Optional[LocalGraph] = None
    _gcn_edges: dict = field(default_factory=dict)

    @classmethod
    def from_local_graph(cls, local: LocalGraph, group: Optional[Any] = None) -> "HaloPlan":
        return cls(local.num_owned, local.send_index, list(local.send_counts),
                   list(local.recv_counts), group, local=local)

    def gcn_edges(self, add_self_loops: bool, dtype: torch.dtype,
                  device: torch.device) -> tuple[Tensor, Tensor]:
        """The local edges and edge weights of PyG's ``gcn_norm`` (no edge weights given) on the
        whole graph: ``D^-1/2 (A [+ I]) D^-1/2`` with the whole graph's degrees, also for the
        halo sources (computed locally they would count only the edges this rank holds)."""
        key = (add_self_loops, dtype, device)
        if key not in self._gcn_edges:
            local = self.local
            edge_index = local.edge_index.to(device)
            n = local.num_owned + local.num_halo
            if add_self_loops:  # as add_remaining_self_loops: drop loops, one per node, weight 1
                edge_index = edge_index[:, edge_index[0] != edge_index[1]]
                loops = torch.arange(n, device=device)
                edge_index = torch.cat([edge_index, torch.stack([loops, loops])], dim=1)
                degree = local.in_degree_no_loops.to(device, dtype) + 1
            else:
                degree = local.in_degree.to(device, dtype)
            inv_sqrt = degree.pow(-0.5).masked_fill_(degree == 0, 0.0)
            self._gcn_edges[key] = (edge_index, inv_sqrt[edge_index[0]] * inv_sqrt[edge_index[1]])
        return self._gcn_edges[key]

    @property
    def num_halo(self) -> int:
        return sum(self.recv_counts)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    def _all_to_all(self, send: Tensor, out_rows: int, out_counts: list[int],
                    in_counts: list[int]) -> Tensor:
        out = send.new_empty((out_rows, *send.shape[1:]))
        dist.all_to_all_single(out, send.contiguous(), output_split_sizes=out_counts,
                               input_split_sizes=in_counts, group=self.group)
        return out

    def gather_halo(self, x: Tensor) -> Tensor:
        """The halo rows of ``x`` (no autograd): ``[num_halo, ...]``."""
        send = x.index_select(0, self.send_index.to(x.device))
        row = x[0].numel() * x.element_size() if x.shape[0] else 0
        self.stats.bytes_sent += send.shape[0] * row
        self.stats.bytes_received += self.num_halo * row
        return self._all_to_all(send, self.num_halo, self.recv_counts, self.send_counts)

    def return_gradients(self, grad_halo: Tensor, like: Tensor) -> Tensor:
        """The gradient of the owned rows that the other ranks' halo copies received."""
        rows = int(self.send_index.numel())
        row = like[0].numel() * like.element_size()  # a gradient row is shaped like a row of x
        self.stats.bytes_sent += grad_halo.shape[0] * row
        self.stats.bytes_received += rows * row
        back = self._all_to_all(grad_halo, rows, self.send_counts, self.recv_counts)
        return torch.zeros_like(like).index_add_(0, self.send_index.to(like.device), back)


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, plan: HaloPlan) -> Tensor:  # type: ignore[override]
        ctx.plan = plan
        plan.stats.forward_calls += 1
        return torch.cat([x, plan.gather_halo(x)], dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        plan: HaloPlan = ctx.plan
        plan.stats.backward_calls += 1
        grad = grad.contiguous()
        owned, halo = grad[:plan.num_owned], grad[plan.num_owned:]
        return owned + plan.return_gradients(halo, owned), None


def halo_exchange(x: Tensor | CompressedActivation, plan: HaloPlan) -> Tensor | CompressedActivation:
    """``[x | halo rows of x]``, differentiable; a compressed activation exchanges its kept
    values (with gradient) and their indices."""
    if isinstance(x, CompressedActivation):
        with torch.no_grad():
            indices = torch.cat([x.indices, plan.gather_halo(x.indices)], dim=0)
        values = _HaloExchange.apply(x.values, plan)
        return CompressedActivation(values, indices, x.width, x.group)
    if not isinstance(x, Tensor):
        raise TypeError(
            f"graph-parallel message passing exchanges node features given as one tensor; got "
            f"{type(x).__name__} (a bipartite (x_src, x_dst) pair is not supported).")
    if x.shape[0] != plan.num_owned:
        raise ValueError(
            f"node features with {x.shape[0]} rows reached a message-passing layer; this rank "
            f"owns {plan.num_owned} nodes. Pass the owned rows only (LocalGraph.rows(x)).")
    return _HaloExchange.apply(x, plan)


def _message_passing_types() -> tuple[type, ...]:
    from torch_geometric.nn.conv import MessagePassing

    from ..runtime.sparse.conv import _CompressedMessagePassing
    return (MessagePassing, _CompressedMessagePassing)


def message_passing_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost message-passing layers of ``model`` (each module object once): PyG
    ``MessagePassing`` and the compressed layers the sparse rewrite puts in their place."""
    kinds = _message_passing_types()
    found, seen, inside = [], set(), []
    for name, m in model.named_modules(remove_duplicate=False):
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, kinds):
            inside.append(name)
            if id(m) not in seen:
                seen.add(id(m))
                found.append((name, m))
    return found


def _normalizes_like_gcn(module: nn.Module) -> bool:
    from torch_geometric.nn import GCNConv

    from ..runtime.sparse.conv import CompressedGCNConv
    return isinstance(module, (GCNConv, CompressedGCNConv)) and bool(module.normalize)


def _gcn_arguments(module: nn.Module, plan: HaloPlan, args: tuple, kwargs: dict,
                   x: Any) -> tuple[tuple, dict]:
    """``(x, edge_index, edge_weight)`` with GCN's weights from whole-graph degrees; the layer
    runs with ``normalize`` off for this call (the post hook turns it back on)."""
    args, kwargs = list(args), dict(kwargs)
    edge_index = args[1] if len(args) > 1 else kwargs.get("edge_index")
    weight = args[2] if len(args) > 2 else kwargs.get("edge_weight")
    if weight is not None:
        raise ValueError(
            f"{type(module).__name__}(normalize=True) with edge weights: graph-parallel training "
            "computes GCN's normalization from the whole graph's degrees without edge weights. "
            "Normalize the weights yourself and use normalize=False.")
    if not isinstance(edge_index, Tensor) or edge_index.shape != plan.local.edge_index.shape:
        raise ValueError(f"{type(module).__name__}: graph-parallel GCN layers must be called with "
                         "the rank's local edge_index (LocalGraph.edge_index).")
    dtype = x.dtype
    edges, weights = plan.gcn_edges(module.add_self_loops, dtype, edge_index.device)
    module.__dict__["_gsr_normalize_off"] = True
    module.normalize = False
    rest = {k: v for k, v in kwargs.items() if k not in ("x", "c", "edge_index", "edge_weight")}
    return (x, edges, weights), rest


def _pre_hook(plan: HaloPlan):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if not plan.enabled:
            return None
        if _normalizes_like_gcn(module):
            x = args[0] if args else kwargs.get("x", kwargs.get("c"))
            return _gcn_arguments(module, plan, args, kwargs, halo_exchange(x, plan))
        if args:
            return (halo_exchange(args[0], plan), *args[1:]), kwargs
        key = next((k for k in ("x", "c") if k in kwargs), None)
        if key is None:
            raise TypeError(f"{type(module).__name__}: graph-parallel message passing needs the "
                            "node features as the first argument or as x=.")
        return args, {**kwargs, key: halo_exchange(kwargs[key], plan)}
    return hook


def _post_hook(plan: HaloPlan):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if module.__dict__.pop("_gsr_normalize_off", False):
            module.normalize = True
        if not plan.enabled:
            return None
        if isinstance(output, Tensor):
            return output[:plan.num_owned]
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (output[0][:plan.num_owned], *output[1:])
        raise TypeError(f"{type(module).__name__} returned {type(output).__name__}; "
                        "graph-parallel message passing needs a tensor output.")
    return hook


def attach_halo_exchange(model: nn.Module, plan: HaloPlan) -> int:
    """Hooks :func:`halo_exchange` in front of every message-passing layer of ``model`` not
    hooked yet, and cuts each one's output back to the owned rows. Returns how many layers it
    hooked."""
    hooked = 0
    for _, layer in message_passing_layers(model):
        if "_gsr_halo_hooks" in layer.__dict__:
            continue
        layer.__dict__["_gsr_halo_hooks"] = (
            layer.register_forward_pre_hook(_pre_hook(plan), with_kwargs=True),
            layer.register_forward_hook(_post_hook(plan), with_kwargs=True))
        hooked += 1
    return hooked


def detach_halo_exchange(model: nn.Module) -> None:
    """Removes the hooks :func:`attach_halo_exchange` installed."""
    for _, layer in message_passing_layers(model):
        for handle in layer.__dict__.pop("_gsr_halo_hooks", ()):
            handle.remove()
