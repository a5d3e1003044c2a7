"""The graph a measured training step runs on: a real circuit, a cone sample of a big one,
or a random graph.

The target of a circuit is its normalised logic level (``level_norm``), the label deep
models are for; a step's loss is the mean squared error against it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Workload:
    """Inputs and target of one training step, and what they are."""

    name: str  # the circuit, or "random"
    x: Tensor
    edge_index: Tensor
    target: Tensor
    circuit_nodes: int  # of the whole circuit (the graph itself for full graphs)
    sampled: bool = False  # a cone sample of a bigger circuit

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @property
    def inputs(self) -> tuple[Tensor, Tensor]:
        return self.x, self.edge_index

    @property
    def key(self) -> tuple:
        """Identifies the graph: equal keys are the same measurement input."""
        return (self.name, self.num_nodes, self.num_edges, self.sampled)

    def describe(self) -> str:
        sizes = f"{self.num_nodes:,} nodes, {self.num_edges:,} edges"
        if self.sampled:
            return (f"{self.name}: cone sample of {sizes} (of {self.circuit_nodes:,} nodes; "
                    "every node keeps its exact label)")
        return f"{self.name}: {sizes}"

    def as_dict(self) -> dict:
        return {"name": self.name, "nodes": self.num_nodes, "edges": self.num_edges,
                "circuit_nodes": self.circuit_nodes, "sampled": self.sampled}


def circuit_workload(name: str, max_nodes: int | None = None, seed: int = 0,
                     cache_dir: str | None = None, loaded: dict | None = None) -> Workload:
    """A bundled circuit (or netlist path) as a step's input; circuits with more than
    ``max_nodes`` nodes are replaced by one fan-in cone sample of at most that many nodes
    (:class:`~gsr_compiler.circuits.ConeSampler`), the batch ``gsr train`` would use."""
    from ..circuits import ConeSampler, load_circuit

    data = None if loaded is None else loaded.get((name, "level"))
    if data is None:
        data = load_circuit(name, labels=("level",), cache_dir=cache_dir)
        if loaded is not None:
            loaded[(name, "level")] = data
    total = int(data.num_nodes)
    sampled = max_nodes is not None and total > max_nodes
    if sampled:
        data = ConeSampler(data, max_nodes, direction="fanin", shuffle=False, seed=seed).sample(0)
    return Workload(name, data.x.float(), data.edge_index, data.level_norm.float().unsqueeze(1),
                    total, sampled)


def random_workload(num_nodes: int, num_edges: int, seed: int = 0) -> Workload:
    """A random graph with 16 input features and a random regression target."""
    from ..synthetic import random_graph

    x, edge_index, target = random_graph(num_nodes, num_edges, in_channels=16, seed=seed)
    return Workload("random", x, edge_index, target, num_nodes)
