"""Graph-parallel full-graph training: one graph's nodes split across ranks.

>>> import torch.distributed as dist
>>> from gsr_compiler import gsr_compile
>>> from gsr_compiler.distributed.partition import partition_graph
>>> from gsr_compiler.distributed.graph_parallel import GraphParallelModel
>>> dist.init_process_group("gloo")                       # under torchrun
>>> part = partition_graph(data.edge_index, data.num_nodes, dist.get_world_size())
>>> local = part.local(data.edge_index, dist.get_rank())
>>> model = GraphParallelModel(gsr_compile(ResidualGNN(...)), local)
>>> out = model(local.rows(data.x))                       # [owned nodes, C]
>>> loss = F.mse_loss(out, local.rows(data.y), reduction="sum") / data.num_nodes
>>> loss.backward(); model.all_reduce_gradients(); opt.step()

Each rank runs the same compiled model on its own rows. Every message-passing layer first
fetches its halo rows from their owners (:mod:`.halo`), forward and in the reversible chains'
backward recompute, and sends the halo gradients back. Summing the ranks' losses and parameter
gradients gives the single-process model's, to rounding: the same function, computed in pieces.
Dropout masks are keyed by global node id (:mod:`.row_dropout`).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import GSRCompileError
from .halo import HaloPlan, attach_halo_exchange, message_passing_layers
from .partition import LocalGraph
from .row_dropout import use_row_keyed_dropout

__all__ = ["GraphParallelModel", "check_graph_parallel_model"]

# Functions that reduce over the whole graph or size their output from index values.
_GRAPH_WIDE_FUNCTIONS = {"global_add_pool", "global_mean_pool", "global_max_pool", "scatter",
                         "to_dense_batch", "kl_loss"}


def _graph_wide_norm(m: nn.Module) -> Optional[str]:
    """Why ``m`` mixes rows of different nodes (so that a rank alone cannot compute it)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    if isinstance(m, (_BatchNorm, _InstanceNorm)):
        return "its statistics are taken over all nodes"
    module = type(m).__module__
    if module.startswith("torch_geometric.nn.norm"):
        if type(m).__name__ == "LayerNorm" and getattr(m, "mode", "graph") == "node":
            return None
        if type(m).__name__ in ("MessageNorm",):
            return None
        return "it normalizes over the whole graph"
    return None


# Layers that propagate more than one hop per call (the halo holds one), read a second node
# input (x_0) or normalize by the degrees of source nodes in ways the halo does not carry.
_REFUSED_LAYERS = {
    "APPNP": "it propagates K hops in one call",
    "SGConv": "it propagates K hops in one call",
    "SSGConv": "it propagates K hops in one call",
    "TAGConv": "it propagates K hops in one call",
    "ChebConv": "it propagates K hops in one call",
    "ARMAConv": "it propagates several hops in one call",
    "MixHopConv": "it propagates several hops in one call",
    "GatedGraphConv": "it propagates several hops in one call",
    "DNAConv": "it reads the node features of all earlier layers",
    "GCN2Conv": "it reads a second node-feature input (x_0) and normalizes by source degrees",
    "FAConv": "it reads a second node-feature input (x_0) and normalizes by source degrees",
    "LGConv": "it normalizes by the degrees of source nodes",
    "EGConv": "its 'symnorm' aggregation normalizes by the degrees of source nodes",
}


def check_graph_parallel_model(model: nn.Module) -> None:
    """Raises :class:`GSRCompileError` naming the first layer a rank cannot run on its own part
    of the graph: norms over all nodes, multi-hop layers and others in ``_REFUSED_LAYERS``,
    message-passing layers with ``flow="target_to_source"`` or dropout inside them (on edges).
    ``GCNConv(normalize=True)`` is run with the whole graph's degrees (:mod:`.halo`)."""
    for name, m in model.named_modules():
        why = _graph_wide_norm(m)
        if why:
            raise GSRCompileError(
                f"graph-parallel training cannot run '{name}' ({type(m).__name__}): {why}, and "
                "each rank holds only its own nodes. Use a per-node norm (nn.LayerNorm) or train "
                "in one process.")
    for name, m in message_passing_layers(model):
        kind = type(m).__name__
        if type(m).__module__.startswith("torch_geometric") and kind in _REFUSED_LAYERS:
            raise GSRCompileError(
                f"graph-parallel training cannot run '{name}' ({kind}): "
                f"{_REFUSED_LAYERS[kind]}, and each rank holds its nodes' one-hop halo only. "
                "Use a one-hop layer (SAGEConv, GCNConv, GraphConv, GINConv, GATConv, GENConv).")
        if getattr(m, "flow", "source_to_target") != "source_to_target":
            raise GSRCompileError(
                f"graph-parallel training cannot run '{name}' ({kind}, flow={m.flow!r}): ranks "
                "own the edges that end in their nodes (flow='source_to_target').")
        p = getattr(m, "dropout", 0.0)
        if isinstance(p, (int, float)) and p > 0:
            raise GSRCompileError(
                f"graph-parallel training cannot run '{name}' ({kind}(dropout={p})): dropout on "
                "edges inside a message-passing layer is drawn per rank. Set its dropout to 0 "
                "(dropout on node features is supported).")


def _check_graph(gm: Any) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "") in \
                _GRAPH_WIDE_FUNCTIONS:
            raise GSRCompileError(
                f"graph-parallel training cannot run '{node.name}' "
                f"({node.target.__name__}): it reduces over all nodes of the graph; the model's "
                "output must be node-level.")


class GraphParallelModel(nn.Module):
    """A compiled model run on one rank's part of a graph (see the module docstring).

    Args:
        gsr_model: the model, as ``gsr_compile`` returned it (compiled or not yet).
        local: this rank's :class:`~gsr_compiler.distributed.partition.LocalGraph`.
        group: the process group (None: the default group, which must be initialized).
        broadcast_state: after each trace, copy parameters and buffers from the group's first
            rank to the others (tracing initializes the grouped branches' fresh weights on each
            rank; this makes them one model).

    The model is called as ``model(x, edge_index)``; here ``forward(x)`` takes this rank's owned
    rows (``local.rows(x)``) and uses ``local.edge_index``. Outputs are the owned rows.
    """

    def __init__(self, gsr_model: nn.Module, local: LocalGraph, group: Optional[Any] = None,
                 broadcast_state: bool = True) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "GraphParallelModel needs an initialized torch.distributed process group "
                "(dist.init_process_group('gloo') under torchrun, or 'nccl' on GPUs).")
        size = dist.get_world_size(group)
        if size != local.num_parts:
            raise ValueError(f"the partition has {local.num_parts} parts but the process group "
                             f"has {size} ranks; partition with num_parts={size}.")
        if dist.get_rank(group) != local.rank:
            raise ValueError(f"this process is rank {dist.get_rank(group)} but was given rank "
                             f"{local.rank}'s part of the graph.")
        source = getattr(gsr_model, "_source_model", gsr_model)
        check_graph_parallel_model(source)
        self.module = gsr_model
        self.local = local
        self.group = group
        self.broadcast_state = broadcast_state
        self.plan = HaloPlan.from_local_graph(local, group)
        self.__dict__["_traces_seen"] = -1

    # -- running ----------------------------------------------------------------------------

    def prepare(self, x: Tensor) -> None:
        """Traces the model for the current mode if needed (on this rank's own edges, no
        exchange), then hooks the exchange and the row-keyed dropout into every layer and
        broadcasts the state from the first rank. Collective when it traces."""
        graphs = getattr(self.module, "_graphs", None)
        with self.plan.disabled():
            if graphs is not None:
                self.module._graph_for((x, self.local.internal_edge_index), {})
        seen = len(graphs) if graphs is not None else 0
        if seen == self.__dict__["_traces_seen"]:
            return
        self.__dict__["_traces_seen"] = seen
        roots = [self.module, *(graphs.values() if graphs is not None else [])]
        for root in roots:
            check_graph_parallel_model(root)
            if hasattr(root, "graph"):
                _check_graph(root)
            attach_halo_exchange(root, self.plan)
            use_row_keyed_dropout(root, self.local.owned)
        if self.broadcast_state:
            self._broadcast_state()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] != self.local.num_owned:
            raise ValueError(
                f"x has {x.shape[0]} rows; rank {self.local.rank} owns {self.local.num_owned} "
                "nodes. Pass its rows only: local.rows(x).")
        self.prepare(x)
        out = self.module(x, self.local.edge_index.to(x.device))
        if not isinstance(out, Tensor) or out.shape[0] != self.local.num_owned:
            raise GSRCompileError(
                f"the model returned {getattr(out, 'shape', type(out).__name__)}; graph-parallel "
                f"training needs node-level outputs ({self.local.num_owned} owned rows).")
        return out

    # -- after backward -----------------------------------------------------------------------

    def all_reduce_gradients(self) -> None:
        """Sums every parameter's gradient over the ranks (one all-reduce per dtype): the
        gradient of the sum of the ranks' losses. A parameter without a gradient counts as 0."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def _broadcast_state(self) -> None:
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with torch.no_grad():
            for t in self.module.state_dict(keep_vars=True).values():
                if isinstance(t, Tensor):
                    dist.broadcast(t.data, src=src, group=self.group)

    # -- reporting ------------------------------------------------------------------------------

    def local_stats(self) -> dict:
        """This rank's node counts and what its exchanges moved since the last reset."""
        return {"rank": self.local.rank, "owned": self.local.num_owned,
                "halo": self.local.num_halo, "sent_rows": int(self.local.send_index.numel()),
                "edges": int(self.local.edge_index.shape[1]), **self.plan.stats.as_dict()}

    def reset_stats(self) -> None:
        self.plan.stats.reset()

    def explain(self) -> str:
        """The compiled model's ``explain()`` followed by this rank's part of the graph and what
        its exchanges moved since the last :meth:`reset_stats` (not collective)."""
        inner = self.module.explain() if hasattr(self.module, "explain") else ""
        s = self.local_stats()
        layers = len(message_passing_layers(self.module))
        part = (f"graph-parallel rank {s['rank']} of {self.local.num_parts}: {s['owned']} of "
                f"{self.local.num_nodes} nodes owned, {s['halo']} halo rows received and "
                f"{s['sent_rows']} rows sent per exchange, {s['edges']} edges; exchange before "
                f"{layers} message-passing layer(s); since the last reset: "
                f"{s['forward_calls']} forward and {s['backward_calls']} gradient exchanges, "
                f"{s['bytes_received']} bytes received, {s['bytes_sent']} sent")
        return f"{inner}\n{part}" if inner else part

    def describe(self) -> str:
        """Per rank: owned nodes, halo rows, rows sent, local edges and the bytes exchanged
        since the last :meth:`reset_stats` (call it after one step to get bytes per step).
        Collective: every rank must call it."""
        rows: list[Optional[dict]] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(rows, self.local_stats(), group=self.group)
        lines = [f"graph-parallel: {self.local.num_nodes} nodes on {len(rows)} ranks",
                 "  rank   owned    halo  halo %   sent rows   edges   exchanges   MiB recv   MiB sent"]
        for r in rows:
            lines.append(
                f"  {r['rank']:>4} {r['owned']:>7} {r['halo']:>7} "
                f"{100.0 * r['halo'] / max(1, r['owned']):>6.1f}% {r['sent_rows']:>11} "
                f"{r['edges']:>7} {r['forward_calls'] + r['backward_calls']:>11} "
                f"{r['bytes_received'] / 2**20:>10.2f} {r['bytes_sent'] / 2**20:>10.2f}")
        return "\n".join(lines)
