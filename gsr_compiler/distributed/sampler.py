"""Which batch each rank trains on: a distributed sampler over the training cones.

All ranks walk one stream of batches, identical on every rank; rank ``r`` of ``N`` trains at
step ``s`` on global batch ``g = s * N + r`` (as ``torch.utils.data.DistributedSampler`` deals
indices out). Batch ``g`` is a pure function of ``(seed, g)``, so a run is reproducible and a
resumed run needs only the step.

Cone batches (the default): epoch ``e`` visits every node of every training circuit in the
order of a permutation seeded by ``(seed, e)``. A node already inside a batch of this epoch is
passed over (it has been scored); otherwise its whole cone (fan-in, or fan-out for
``reverse_level``) joins the current batch if it fits in ``batch_nodes``, else the batch is
closed and a new one starts with that cone. A node whose cone alone is bigger than
``batch_nodes`` is never a sink at that budget (as ``ConeSampler``'s ``oversize="skip"``).
So every node whose cone fits is the sink of exactly one batch per epoch and is scored in at
least one; a union of cones is closed, so every node of a batch keeps its exact label.

``--full-graphs`` batches are the fixed bins of whole circuits of the single-process
schedule, shuffled per epoch: an epoch of the stream covers each circuit once.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..train import LABEL_TARGETS, TrainConfig, _Batch, _BatchSchedule, _pack

__all__ = ["DistributedBatchSchedule"]


class DistributedBatchSchedule:
    """Batch of rank ``rank`` at step ``step`` for a run of ``world_size`` ranks."""

    def __init__(self, datas: list, cfg: TrainConfig, world_size: int) -> None:
        self.datas, self.seed, self.budget = datas, cfg.seed, cfg.batch_nodes
        self.world_size = world_size
        self.target, direction = LABEL_TARGETS[cfg.label]
        self.full_graphs = cfg.full_graphs
        if cfg.full_graphs:
            self._bins = _BatchSchedule(datas, cfg)  # bins, shuffled per epoch
            return
        from ..circuits import ConeSampler

        # only its per-circuit CSR and breadth-first cone search are used
        self._cones = ConeSampler(datas, cfg.batch_nodes, direction=direction, shuffle=False)
        self._sizes = [int(d.num_nodes) for d in datas]
        self._offsets = np.cumsum([0] + self._sizes)
        self._epochs: dict[int, list[list[tuple[int, np.ndarray]]]] = {}
        self._counts: list[int] = []  # batches in epochs 0, 1, ...
        # cone sizes never change: a cone found too big is not searched again
        self._too_big = [np.zeros(n, bool) for n in self._sizes]

    # ------------------------------------------------------------------ the stream

    def batches_per_epoch(self, epoch: int = 0) -> int:
        if self.full_graphs:
            return len(self._bins.bins)
        return len(self._epoch(epoch))

    def global_index(self, step: int, rank: int) -> int:
        return step * self.world_size + rank

    def __call__(self, step: int, rank: int) -> _Batch:
        return self.batch(self.global_index(step, rank))

    def batch(self, g: int) -> _Batch:
        """Global batch ``g`` of the stream."""
        if self.full_graphs:
            return self._bins(g)
        epoch, i = self._locate(g)
        return self._materialize(self._epoch(epoch)[i])

    def covered_nodes(self, epoch: int) -> list[np.ndarray]:
        """Per training circuit, how many times each node is scored in ``epoch``."""
        counts = [np.zeros(n, np.int64) for n in self._sizes]
        for parts in self._epoch(epoch):
            for c, nodes in parts:
                counts[c][nodes] += 1
        return counts

    # ------------------------------------------------------------------ packing

    def _locate(self, g: int) -> tuple[int, int]:
        epoch = 0
        while True:
            if epoch == len(self._counts):
                self._counts.append(len(self._epoch(epoch)))
            if g < self._counts[epoch]:
                return epoch, g
            g -= self._counts[epoch]
            epoch += 1

    def _epoch(self, epoch: int) -> list[list[tuple[int, np.ndarray]]]:
        """The batches of ``epoch``: per batch, (circuit, sorted node indices) parts."""
        if epoch in self._epochs:
            return self._epochs[epoch]
        order = np.random.default_rng([self.seed, epoch, 2]).permutation(int(self._offsets[-1]))
        scored = [np.zeros(n, bool) for n in self._sizes]  # in some batch of this epoch
        batches: list[list[tuple[int, np.ndarray]]] = []
        current: dict[int, np.ndarray] = {}  # circuit -> bool mask of the open batch
        used = 0

        def close() -> None:
            nonlocal current, used
            if current:
                batches.append([(c, np.flatnonzero(m)) for c, m in sorted(current.items())])
            current, used = {}, 0

        circuits = np.searchsorted(self._offsets, order, side="right") - 1
        nodes = order - self._offsets[circuits]
        for c, node in zip(circuits.tolist(), nodes.tolist()):
            if scored[c][node] or self._too_big[c][node]:
                continue
            cone = self._cones.cone(node, c)
            if cone.size > self.budget:
                self._too_big[c][node] = True  # never fits: not a sink at this budget
                continue
            mask = current.get(c)
            new = cone if mask is None else cone[~mask[cone]]
            if used + new.size > self.budget:
                close()
                mask, new = None, cone
            if mask is None:
                mask = current[c] = np.zeros(self._sizes[c], bool)
            mask[new] = True
            scored[c][cone] = True
            used += new.size
        close()
        if len(self._epochs) > 4:  # a long run walks forward; keep the recent epochs only
            self._epochs.pop(min(self._epochs))
        self._epochs[epoch] = batches
        return batches

    def _materialize(self, parts: list[tuple[int, np.ndarray]]) -> _Batch:
        from torch_geometric.utils import subgraph

        graphs = []
        for c, nodes in parts:
            data = self.datas[c]
            index = torch.from_numpy(nodes)
            edge_index, _ = subgraph(index, data.edge_index, relabel_nodes=True,
                                     num_nodes=self._sizes[c])
            graphs.append((data.x[index].float(), edge_index,
                           getattr(data, self.target)[index].float(),
                           torch.ones(nodes.size, dtype=torch.bool)))
        return _pack(graphs)


def check_world_size(schedule: DistributedBatchSchedule, world_size: int,
                     batch_nodes: Optional[int] = None) -> None:
    """Raises ``ValueError`` when an epoch has fewer batches than ranks: ranks would train on
    the same data in the same step."""
    count = schedule.batches_per_epoch(0)
    if count < world_size:
        what = ("circuit bins (--full-graphs packs whole circuits into batches of --batch-nodes)"
                if schedule.full_graphs else
                f"batches of cones (--batch-nodes {batch_nodes or schedule.budget})")
        raise ValueError(
            f"{world_size} ranks need at least {world_size} different batches per epoch, but "
            f"the training circuits make {count} {what}; use at most {count} ranks, add "
            "training circuits, or lower --batch-nodes")
