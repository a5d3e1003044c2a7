"""Random graphs of a given size, for sweeps and benchmarks that need no labels."""
from __future__ import annotations

import torch
from torch import Tensor


def random_graph(num_nodes: int, num_edges: int, in_channels: int = 16,
                 seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Node features, a random ``edge_index`` and a regression target, seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_nodes, in_channels, generator=g)
    edge_index = torch.randint(0, num_nodes, (2, num_edges), generator=g)
    target = torch.randn(num_nodes, 1, generator=g)
    return x, edge_index, target
