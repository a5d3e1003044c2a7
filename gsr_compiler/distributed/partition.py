"""Partitioning a graph's nodes across ranks, and each rank's local view of the graph.

Each rank owns a set of nodes: their feature rows, and every edge that *ends* in one of them
(messages flow from ``edge_index[0]`` to ``edge_index[1]``). The sources of those edges that
another rank owns are the rank's **halo**: their rows are fetched from their owners before each
message-passing layer (:mod:`.halo`).

Partitioners (``method=``):

* ``"metis"``: METIS k-way partitioning of the undirected graph (minimum edge cut, balanced
  parts) through the optional ``pymetis`` package (``pip install pymetis``). The edge cut is
  what the halo exchange pays for, so this is the default when it is installed.
* ``"bfs"``: breadth-first regions of the undirected graph, grown one part at a time to a
  balanced size; what ``"auto"`` uses without ``pymetis``. Connected regions cut far fewer edges
  than runs of ids or levels, but far more than METIS: on b19_Cg at 4 ranks, 11k halo rows
  against METIS's 427 (docs/distributed.md).
* ``"level"``: nodes sorted by logic level (longest path from an input; given as ``levels=`` or
  computed from the DAG) and cut into balanced contiguous runs of levels. Cheap and
  deterministic, but every edge that crosses a cut level becomes halo.
* ``"contiguous"``: balanced runs of node ids (for tests and as a baseline).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["GraphPartitionError", "GraphPartition", "LocalGraph", "partition_graph",
           "check_partitionable", "check_num_parts", "METHODS", "metis_available"]

METHODS = ("auto", "metis", "bfs", "level", "contiguous")


class GraphPartitionError(ValueError):
    """A graph cannot be partitioned as asked; the message says why and what to do."""


def metis_available() -> bool:
    """Whether the optional ``pymetis`` package can be imported."""
    try:
        import pymetis  # noqa: F401
    except ImportError:
        return False
    return True


def check_num_parts(num_parts: int) -> None:
    """Raises :class:`GraphPartitionError` unless ``num_parts`` is a positive integer."""
    if isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 1:
        raise GraphPartitionError(
            f"number of ranks must be a positive integer, got {num_parts!r}.")


def check_partitionable(num_nodes: int, num_parts: int) -> None:
    """Raises :class:`GraphPartitionError` unless ``num_parts`` ranks can each own a node."""
    check_num_parts(num_parts)
    if num_nodes < num_parts:
        raise GraphPartitionError(
            f"the graph has {num_nodes} node(s), fewer than the {num_parts} ranks asked for: "
            f"every rank must own at least one node. Use at most {num_nodes} rank(s), or train "
            "this graph in one process.")


def _check_edge_index(edge_index: Tensor, num_nodes: int) -> None:
    if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.shape[0] != 2 \
            or edge_index.dtype not in (torch.int64, torch.int32):
        raise GraphPartitionError(
            "edge_index must be an integer tensor of shape [2, E] "
            f"(got {getattr(edge_index, 'shape', type(edge_index).__name__)}).")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise GraphPartitionError(
            f"edge_index holds node ids outside 0..{num_nodes - 1} (num_nodes={num_nodes}).")


def _balanced_sizes(num_nodes: int, num_parts: int) -> list[int]:
    base, extra = divmod(num_nodes, num_parts)
    return [base + (r < extra) for r in range(num_parts)]


def _undirected_csr(edge_index: Tensor, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of the symmetric graph without self loops or repeated edges (what METIS wants)."""
    src, dst = edge_index.cpu().numpy().astype(np.int64)
    a = np.concatenate([src, dst])
    b = np.concatenate([dst, src])
    keep = a != b
    key = np.unique(a[keep] * num_nodes + b[keep])
    rows, cols = key // num_nodes, key % num_nodes
    xadj = np.zeros(num_nodes + 1, dtype=np.int64)
    np.add.at(xadj, rows + 1, 1)
    return np.cumsum(xadj), cols


def _metis(edge_index: Tensor, num_nodes: int, num_parts: int, seed: int) -> np.ndarray:
    try:
        import pymetis
    except ImportError:
        raise GraphPartitionError(
            "method='metis' needs the optional package pymetis (pip install pymetis); "
            "or use method='bfs' or 'level'.") from None
    xadj, adjncy = _undirected_csr(edge_index, num_nodes)
    options = pymetis.Options(seed=seed)
    if hasattr(pymetis, "CSRAdjacency"):  # pymetis >= 2025
        graph = {"adjacency": pymetis.CSRAdjacency(xadj, adjncy)}
    else:
        graph = {"xadj": xadj, "adjncy": adjncy}
    _, membership = pymetis.part_graph(num_parts, **graph, options=options)
    return np.asarray(membership, dtype=np.int64)


def _bfs(edge_index: Tensor, num_nodes: int, num_parts: int) -> np.ndarray:
    xadj, adjncy = _undirected_csr(edge_index, num_nodes)
    parts = np.full(num_nodes, -1, dtype=np.int64)
    sizes = _balanced_sizes(num_nodes, num_parts)
    next_start = 0
    for rank, size in enumerate(sizes):
        taken, queue = 0, collections.deque()
        while taken < size:
            if not queue:  # region exhausted (or first node): restart at the lowest free id
                while parts[next_start] != -1:
                    next_start += 1
                parts[next_start] = rank
                taken += 1
                queue.append(next_start)
                continue
            node = queue.popleft()
            for nb in adjncy[xadj[node]:xadj[node + 1]]:
                if taken == size:
                    break
                if parts[nb] == -1:
                    parts[nb] = rank
                    taken += 1
                    queue.append(nb)
    return parts


def _logic_levels(edge_index: Tensor, num_nodes: int) -> np.ndarray:
    """Longest-path level of each node of a DAG (inputs at 0), by Kahn's algorithm."""
    src, dst = edge_index.cpu().numpy().astype(np.int64)
    order = np.argsort(src, kind="stable")
    xadj = np.zeros(num_nodes + 1, dtype=np.int64)
    np.add.at(xadj, src + 1, 1)
    xadj, succ = np.cumsum(xadj), dst[order]
    indegree = np.bincount(dst, minlength=num_nodes)
    level = np.zeros(num_nodes, dtype=np.int64)
    frontier = np.flatnonzero(indegree == 0)
    seen = 0
    while frontier.size:
        seen += frontier.size
        nxt = []
        for node in frontier:
            for s in succ[xadj[node]:xadj[node + 1]]:
                level[s] = max(level[s], level[node] + 1)
                indegree[s] -= 1
                if indegree[s] == 0:
                    nxt.append(s)
        frontier = np.asarray(nxt, dtype=np.int64)
    if seen != num_nodes:
        raise GraphPartitionError(
            "method='level' needs a DAG (a combinational circuit); this graph has a cycle. "
            "Pass levels= yourself, or use method='metis' or 'bfs'.")
    return level


def _by_levels(edge_index: Tensor, num_nodes: int, num_parts: int,
               levels: Optional[Tensor]) -> np.ndarray:
    if levels is None:
        level = _logic_levels(edge_index, num_nodes)
    else:
        level = torch.as_tensor(levels).cpu().numpy().astype(np.int64)
        if level.shape != (num_nodes,):
            raise GraphPartitionError(
                f"levels must hold one integer per node ({num_nodes}), got shape {level.shape}.")
    order = np.lexsort((np.arange(num_nodes), level))
    return _contiguous_assignment(order, num_nodes, num_parts)


def _contiguous_assignment(order: np.ndarray, num_nodes: int, num_parts: int) -> np.ndarray:
    parts = np.empty(num_nodes, dtype=np.int64)
    bounds = np.cumsum([0] + _balanced_sizes(num_nodes, num_parts))
    for rank in range(num_parts):
        parts[order[bounds[rank]:bounds[rank + 1]]] = rank
    return parts


def partition_graph(edge_index: Tensor, num_nodes: int, num_parts: int, method: str = "auto",
                    *, levels: Optional[Tensor] = None, seed: int = 0) -> "GraphPartition":
    """Assigns every node of a graph to one of ``num_parts`` ranks.

    Args:
        edge_index: ``[2, E]`` integer edges, messages flowing from row 0 to row 1.
        num_nodes: number of nodes ``N``.
        num_parts: number of ranks; at most ``N`` (each rank owns at least one node).
        method: ``"auto"`` (METIS when ``pymetis`` is installed, else ``"bfs"``), ``"metis"``,
            ``"bfs"``, ``"level"`` or ``"contiguous"`` (see the module docstring).
        levels: logic level per node for ``"level"`` (computed from the DAG when None).
        seed: METIS's random seed (the other methods are deterministic).

    Raises:
        GraphPartitionError: bad arguments, a graph with fewer nodes than ranks, or a
            partitioner that left a rank without nodes; before anything is computed where it
            can be told up front.
    """
    check_partitionable(num_nodes, num_parts)
    _check_edge_index(edge_index, num_nodes)
    if method not in METHODS:
        raise GraphPartitionError(
            f"method={method!r}: must be one of {', '.join(repr(m) for m in METHODS)}.")
    if method == "auto":
        method = "metis" if metis_available() else "bfs"
    if num_parts == 1:
        parts = np.zeros(num_nodes, dtype=np.int64)
    elif method == "metis":
        parts = _metis(edge_index, num_nodes, num_parts, seed)
    elif method == "bfs":
        parts = _bfs(edge_index, num_nodes, num_parts)
    elif method == "level":
        parts = _by_levels(edge_index, num_nodes, num_parts, levels)
    else:
        parts = _contiguous_assignment(np.arange(num_nodes), num_nodes, num_parts)
    counts = np.bincount(parts, minlength=num_parts)
    if (counts == 0).any():
        raise GraphPartitionError(
            f"the {method} partitioner left rank(s) {np.flatnonzero(counts == 0).tolist()} "
            f"without nodes ({num_nodes} nodes, {num_parts} ranks); use fewer ranks or "
            "method='bfs'.")
    return GraphPartition(torch.from_numpy(parts), num_parts, method)


@dataclass(frozen=True)
class GraphPartition:
    """Which rank owns each node.

    Attributes:
        parts: ``[N]`` int64, the rank owning each node.
        num_parts: number of ranks.
        method: the partitioner that made it.
    """

    parts: Tensor
    num_parts: int
    method: str

    @property
    def num_nodes(self) -> int:
        return int(self.parts.numel())

    def sizes(self) -> list[int]:
        """Nodes owned by each rank."""
        return torch.bincount(self.parts, minlength=self.num_parts).tolist()

    def local(self, edge_index: Tensor, rank: int) -> "LocalGraph":
        """Rank ``rank``'s view: its nodes, halo, edges in local ids, and exchange plan."""
        if not 0 <= rank < self.num_parts:
            raise GraphPartitionError(f"rank {rank} is not in 0..{self.num_parts - 1}.")
        _check_edge_index(edge_index, self.num_nodes)
        parts = self.parts.to(edge_index.device)
        src, dst = edge_index.long()
        mine = parts[dst] == rank
        owned = torch.nonzero(parts == rank).flatten()
        foreign = src[mine & (parts[src] != rank)].unique()
        owner = parts[foreign]
        # Halo rows grouped by owner (the order all_to_all delivers them), by id within one.
        halo = foreign[torch.argsort(owner * self.num_nodes + foreign)]
        recv_counts = torch.bincount(parts[halo], minlength=self.num_parts).tolist()
        local_of = torch.full((self.num_nodes,), -1, dtype=torch.long, device=parts.device)
        local_of[owned] = torch.arange(owned.numel(), device=parts.device)
        local_of[halo] = owned.numel() + torch.arange(halo.numel(), device=parts.device)
        edge_ids = torch.nonzero(mine).flatten()
        local_edges = local_of[edge_index[:, edge_ids].long()]
        internal = local_edges[:, local_edges[0] < owned.numel()]
        # What each other rank q needs from me: my nodes that feed an edge ending at q,
        # in q's halo order (by global id).
        sends, send_counts = [], []
        src_mine = parts[src] == rank
        for q in range(self.num_parts):
            if q == rank:
                send_counts.append(0)
                continue
            needed = src[src_mine & (parts[dst] == q)].unique()
            sends.append(local_of[needed])
            send_counts.append(int(needed.numel()))
        send_index = torch.cat(sends) if sends else torch.zeros(0, dtype=torch.long)
        # Whole-graph in-degrees of the local nodes: a symmetric normalization (GCN's) needs
        # them for halo sources, whose incoming edges other ranks hold.
        ids = torch.cat([owned, halo])
        in_degree = torch.bincount(dst, minlength=self.num_nodes)[ids]
        in_degree_no_loops = torch.bincount(dst[src != dst], minlength=self.num_nodes)[ids]
        return LocalGraph(rank=rank, num_parts=self.num_parts, num_nodes=self.num_nodes,
                          owned=owned, halo=halo, edge_index=local_edges, edge_ids=edge_ids,
                          internal_edge_index=internal, send_index=send_index,
                          send_counts=send_counts, recv_counts=recv_counts,
                          in_degree=in_degree, in_degree_no_loops=in_degree_no_loops)

    def summary(self, edge_index: Tensor) -> list[dict]:
        """Per rank: owned nodes, halo rows received and sent, local edges (no exchange)."""
        out = []
        for rank in range(self.num_parts):
            g = self.local(edge_index, rank)
            out.append({"rank": rank, "owned": g.num_owned, "halo": g.num_halo,
                        "sent": int(g.send_index.numel()), "edges": int(g.edge_index.shape[1])})
        return out


@dataclass
class LocalGraph:
    """One rank's part of a graph.

    Local node ids are ``[owned rows | halo rows]``: ``owned[i]`` is the global id of local
    row ``i``, ``halo[j]`` that of local row ``num_owned + j`` (grouped by owner rank).

    Attributes:
        edge_index: ``[2, E_local]`` the edges ending in owned nodes, in local ids (targets
            ``< num_owned``), in the order they have in the global ``edge_index``.
        edge_ids: positions of those edges in the global ``edge_index`` (to slice edge data).
        internal_edge_index: the local edges whose source is owned too (a graph that runs
            without exchange; used to trace the model).
        send_index: local rows sent to the other ranks, concatenated by destination rank.
        send_counts, recv_counts: rows sent to / received from each rank.
        in_degree, in_degree_no_loops: in-degree in the whole graph of each local node
            (``[owned | halo]``), with and without self loops.
    """

    rank: int
    num_parts: int
    num_nodes: int
    owned: Tensor
    halo: Tensor
    edge_index: Tensor
    edge_ids: Tensor
    internal_edge_index: Tensor
    send_index: Tensor
    send_counts: list[int]
    recv_counts: list[int]
    in_degree: Optional[Tensor] = None
    in_degree_no_loops: Optional[Tensor] = None

    @property
    def num_owned(self) -> int:
        return int(self.owned.numel())

    @property
    def num_halo(self) -> int:
        return int(self.halo.numel())

    def rows(self, node_tensor: Tensor) -> Tensor:
        """The owned rows of a node-level tensor of the whole graph (``x``, labels, masks)."""
        if node_tensor.shape[0] != self.num_nodes:
            raise GraphPartitionError(
                f"expected a node-level tensor with {self.num_nodes} rows (the whole graph), "
                f"got {tuple(node_tensor.shape)}.")
        return node_tensor[self.owned.to(node_tensor.device)]
