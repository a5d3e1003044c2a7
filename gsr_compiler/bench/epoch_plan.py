"""One epoch over training circuits at a batch size: batches that score every node once.

A node's label (``level``, ``prob``, ``toggle``) depends on its whole fan-in cone, and so does
the prediction of a deep model, so a batch is a union of fan-in cones: closed under fan-in,
every node in it has its exact label. An epoch at a batch size of ``B`` nodes is a list of
such batches, each of at most ``B`` nodes, in which every node of every training circuit whose
cone fits in ``B`` is scored in exactly one batch (a node can appear in many batches as part
of other nodes' cones, as context; it counts in the loss once). Nodes whose cone is larger
than ``B`` cannot be scored on any batch of that size: they are counted as ``uncovered``
(with cone sampling, a small batch never trains the deep part of a circuit).

How the batches are made: a circuit of at most ``B`` nodes is one part, whole. A bigger one is
cut into parts by taking its nodes largest cone first (a large cone scores many nodes at once),
adding each unscored node's cone to the current part, and starting a new part when the cone
would overflow ``B``; the nodes a part scores are those it brought in first. Parts are then
packed into batches first-fit, largest first.

Cone sizes of all nodes are computed once per circuit (``CircuitCones.sizes``) by propagating
bit sets of ancestors in topological order, a chunk of ancestor bits at a time, so the memory
stays bounded (about 64 MiB) on circuits of 100k+ nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from scipy.sparse.csgraph import breadth_first_order

__all__ = ["CircuitCones", "EpochBatch", "EpochPlan", "plan_epoch"]

_CHUNK_BYTES = 64 * 2 ** 20  # bit-set memory per chunk of ancestor bits


def _topological_levels(toward: np.ndarray, away: np.ndarray, n: int) -> np.ndarray:
    """Longest-path level of each node along ``toward -> away`` edges (a DAG)."""
    order = np.argsort(toward, kind="stable")
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(toward, minlength=n), out=ptr[1:])
    heads = away[order]
    indegree = np.bincount(away, minlength=n)
    level = np.zeros(n, dtype=np.int64)
    frontier = np.flatnonzero(indegree == 0)
    done = 0
    depth = 0
    while frontier.size:
        level[frontier] = depth
        done += frontier.size
        counts = ptr[frontier + 1] - ptr[frontier]
        starts = np.repeat(ptr[frontier] - np.cumsum(counts) + counts, counts)
        targets = heads[starts + np.arange(int(counts.sum()))]
        np.subtract.at(indegree, targets, 1)
        frontier = np.unique(targets[indegree[targets] == 0])
        depth += 1
    if done != n:
        raise ValueError("the circuit graph has a cycle: cones are not defined")
    return level


@dataclass
class CircuitCones:
    """The cone structure of one circuit: its cone-closed subgraphs and every node's cone size."""

    data: object  # torch_geometric Data (a loaded circuit)
    direction: str = "fanin"
    _sampler: object = field(default=None, repr=False)
    _sizes: Optional[np.ndarray] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from ..circuits import ConeSampler

        # the sampler's index: the cone matrix (for searches) and the induced-subgraph builder
        self._sampler = ConeSampler(self.data, max(1, int(self.data.num_nodes)),
                                    direction=self.direction, shuffle=False, seed=0)

    @property
    def num_nodes(self) -> int:
        return int(self.data.num_nodes)

    @property
    def name(self) -> str:
        return str(getattr(self.data, "name", "?"))

    def cone(self, node: int) -> np.ndarray:
        return breadth_first_order(self._sampler.circuits[0].cone, int(node), directed=True,
                                   return_predecessors=False)

    @property
    def sizes(self) -> np.ndarray:
        """Nodes in each node's cone, itself included (exact; computed once)."""
        if self._sizes is None:
            self._sizes = self._cone_sizes()
        return self._sizes

    def _cone_sizes(self) -> np.ndarray:
        n = self.num_nodes
        src, dst = self.data.edge_index.cpu().numpy()
        toward, away = (src, dst) if self.direction == "fanin" else (dst, src)
        level = _topological_levels(toward, away, n)
        # edges grouped by the level of their head, then by head: one reduce per level
        by_head = np.lexsort((away, level[away]))
        toward, away = toward[by_head], away[by_head]
        edge_level = level[away]
        bounds = np.searchsorted(edge_level, np.arange(int(level.max()) + 2))
        words = max(1, min((n + 63) // 64, _CHUNK_BYTES // (8 * max(n, 1))))
        counts = np.zeros(n, dtype=np.int64)
        for first in range(0, n, 64 * words):
            last = min(n, first + 64 * words)
            bits = np.zeros((n, words), dtype=np.uint64)
            own = np.arange(first, last)
            offset = own - first
            bits[own, offset // 64] = np.left_shift(np.uint64(1),
                                                    (offset % 64).astype(np.uint64))
            for lv in range(1, len(bounds) - 1):
                lo, hi = bounds[lv], bounds[lv + 1]
                if lo == hi:
                    continue
                heads = away[lo:hi]
                starts = np.flatnonzero(np.r_[True, heads[1:] != heads[:-1]])
                merged = np.bitwise_or.reduceat(bits[toward[lo:hi]], starts, axis=0)
                bits[heads[starts]] |= merged
            counts += np.bitwise_count(bits).sum(axis=1, dtype=np.int64)
        return counts

    def subgraph(self, nodes: np.ndarray):
        """The induced subgraph on ``nodes`` (sorted), every node-level attribute kept."""
        return self._sampler._subgraph(self._sampler.circuits[0], nodes,
                                       np.empty(0, dtype=np.int64), complete=True)


@dataclass
class _Part:
    circuit: int
    nodes: np.ndarray  # sorted node indices of the circuit
    scored: np.ndarray  # bool per entry of ``nodes``: scored in this part


@dataclass
class EpochBatch:
    """One batch: parts of one or more circuits (a disjoint union)."""

    parts: list[_Part]

    @property
    def num_nodes(self) -> int:
        return sum(int(p.nodes.size) for p in self.parts)

    @property
    def num_scored(self) -> int:
        return sum(int(p.scored.sum()) for p in self.parts)


@dataclass
class EpochPlan:
    """The batches of one epoch at ``batch_nodes``, and what they cover."""

    batch_nodes: int
    batches: list[EpochBatch]
    circuits: list[str]
    circuit_nodes: list[int]
    uncovered: list[int]  # per circuit: nodes whose cone exceeds batch_nodes

    @property
    def total_nodes(self) -> int:
        return sum(self.circuit_nodes)

    @property
    def scored_nodes(self) -> int:
        return sum(b.num_scored for b in self.batches)

    @property
    def computed_nodes(self) -> int:
        """Nodes computed over the epoch, context included (shared cones count again)."""
        return sum(b.num_nodes for b in self.batches)

    def largest_batch(self) -> Optional[EpochBatch]:
        return max(self.batches, key=lambda b: b.num_nodes, default=None)

    def summary(self) -> dict:
        total = self.total_nodes
        return {"batch_nodes": self.batch_nodes, "batches": len(self.batches),
                "nodes": total, "scored_nodes": self.scored_nodes,
                "uncovered_nodes": sum(self.uncovered),
                "covered_share": self.scored_nodes / total if total else 0.0,
                "computed_nodes": self.computed_nodes,
                "recompute_factor": self.computed_nodes / max(self.scored_nodes, 1),
                "largest_batch_nodes": max((b.num_nodes for b in self.batches), default=0),
                "uncovered_per_circuit": dict(zip(self.circuits, self.uncovered))}


def _parts_of_circuit(index: int, cones: CircuitCones, batch_nodes: int
                      ) -> tuple[list[_Part], int]:
    n = cones.num_nodes
    if n <= batch_nodes:
        return [_Part(index, np.arange(n), np.ones(n, dtype=bool))], 0
    sizes = cones.sizes
    fits = np.flatnonzero(sizes <= batch_nodes)
    order = fits[np.argsort(-sizes[fits], kind="stable")]  # largest cone first
    owner = np.full(n, -1, dtype=np.int64)  # the part that scores each node
    current = np.zeros(n, dtype=bool)
    count = 0
    parts: list[_Part] = []

    def close() -> None:
        nodes = np.flatnonzero(current)
        parts.append(_Part(index, nodes, owner[nodes] == len(parts)))

    for v in order:
        if owner[v] >= 0:
            continue
        cone = cones.cone(int(v))
        new = cone[~current[cone]]
        if count + new.size > batch_nodes:
            close()
            current[:] = False
            count, new = 0, cone
        current[new] = True
        count += new.size
        fresh = cone[owner[cone] < 0]
        owner[fresh] = len(parts)
    if count:
        close()
    return parts, int(n - fits.size)


def plan_epoch(circuits: list[CircuitCones], batch_nodes: int) -> EpochPlan:
    """The epoch at ``batch_nodes``: see the module docstring."""
    if batch_nodes < 1:
        raise ValueError(f"batch_nodes must be positive, got {batch_nodes}")
    parts: list[_Part] = []
    uncovered = []
    for i, cones in enumerate(circuits):
        mine, missing = _parts_of_circuit(i, cones, batch_nodes)
        parts += mine
        uncovered.append(missing)
    # first-fit, largest part first
    parts.sort(key=lambda p: -int(p.nodes.size))
    bins: list[list[_Part]] = []
    room = np.zeros(0, dtype=np.int64)
    for part in parts:
        size = int(part.nodes.size)
        fitting = np.flatnonzero(room >= size)
        if fitting.size:
            j = int(fitting[0])
            bins[j].append(part)
            room[j] -= size
        else:
            bins.append([part])
            room = np.append(room, batch_nodes - size)
    return EpochPlan(batch_nodes, [EpochBatch(b) for b in bins], [c.name for c in circuits],
                     [c.num_nodes for c in circuits], uncovered)


def batch_tensors(batch: EpochBatch, circuits: list[CircuitCones], target: str):
    """The batch as ``gsr train`` steps on it (x, edge_index, target, scored mask)."""
    from ..train import _graph, _pack

    graphs = []
    for part in batch.parts:
        data = circuits[part.circuit].subgraph(part.nodes)
        graphs.append(_graph(data, target, torch.from_numpy(part.scored)))
    return _pack(graphs)
