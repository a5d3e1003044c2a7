"""Random graphs of the shapes the corpus models read: no dataset is downloaded.

Every helper is seeded, so two calls with the same seed give the same tensors.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import to_torch_csr_tensor

# Vocabulary sizes of OGB's molecule features (ogb.utils.features.get_atom_feature_dims /
# get_bond_feature_dims); only the sizes matter here, the values are random.
ATOM_FEATURE_DIMS = (119, 5, 12, 12, 10, 6, 6, 2, 2)
BOND_FEATURE_DIMS = (5, 6, 2)

# Every graph is this many times larger than asked (nodes, edges, molecules): 1 in the tests;
# a benchmark raises it (``graph_scale``) to time the models on graphs of realistic size.
_SCALE = [1]


@contextlib.contextmanager
def graph_scale(factor: int) -> Iterator[None]:
    """Within the body, the helpers below make graphs ``factor`` times larger."""
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"graph scale must be a positive integer, got {factor!r}")
    before = _SCALE[0]
    _SCALE[0] = factor
    try:
        yield
    finally:
        _SCALE[0] = before


def random_edge_index(num_nodes: int, num_edges: int, generator: torch.Generator) -> Tensor:
    """A directed graph without self loops, every node with at least one incoming edge."""
    ring = torch.arange(num_nodes)
    src = torch.cat([ring, torch.randint(0, num_nodes, (num_edges - num_nodes,), generator=generator)])
    dst = torch.cat([(ring + 1) % num_nodes,
                     torch.randint(0, num_nodes, (num_edges - num_nodes,), generator=generator)])
    keep = src != dst
    return torch.stack([src[keep], dst[keep]])


def node_graph(num_nodes: int = 200, num_edges: int = 800, in_channels: int = 8,
               edge_channels: int | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor | None]:
    """``x [N, in_channels]``, ``edge_index [2, E]`` and, with ``edge_channels``, float
    ``edge_attr [E, edge_channels]``."""
    g = torch.Generator().manual_seed(seed)
    num_nodes, num_edges = num_nodes * _SCALE[0], num_edges * _SCALE[0]
    edge_index = random_edge_index(num_nodes, num_edges, g)
    x = torch.randn(num_nodes, in_channels, generator=g).to(dtype)
    edge_attr = None
    if edge_channels is not None:
        edge_attr = torch.rand(edge_index.size(1), edge_channels, generator=g).to(dtype)
    return x, edge_index, edge_attr


def normalized_adj_t(edge_index: Tensor, num_nodes: int, dtype: torch.dtype) -> Tensor:
    """The GCN-normalized adjacency with self loops, transposed, as a torch sparse CSR
    tensor: what ``T.Compose([T.GCNNorm(), T.ToSparseTensor()])`` gives without torch_sparse."""
    edge_index, weight = gcn_norm(edge_index, None, num_nodes, add_self_loops=True, dtype=dtype)
    return to_torch_csr_tensor(edge_index.flip(0), weight, size=(num_nodes, num_nodes))


def molecule_batch(num_graphs: int = 8, nodes_per_graph: int = 25, seed: int = 0
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A batch of random "molecules" with OGB-style integer features: ``x [N, 9]`` and
    ``edge_attr [E, 3]`` (long, within OGB's vocabularies), ``edge_index`` (both directions,
    inside each graph) and ``batch``."""
    g = torch.Generator().manual_seed(seed)
    num_graphs *= _SCALE[0]
    edges, batch = [], []
    for i in range(num_graphs):
        e = random_edge_index(nodes_per_graph, 2 * nodes_per_graph, g) + i * nodes_per_graph
        edges.append(torch.cat([e, e.flip(0)], dim=1))
        batch.append(torch.full((nodes_per_graph,), i))
    edge_index = torch.cat(edges, dim=1)
    n = num_graphs * nodes_per_graph
    x = torch.stack([torch.randint(0, d, (n,), generator=g) for d in ATOM_FEATURE_DIMS], dim=1)
    edge_attr = torch.stack([torch.randint(0, d, (edge_index.size(1),), generator=g)
                             for d in BOND_FEATURE_DIMS], dim=1)
    return x, edge_index, edge_attr, torch.cat(batch)


def molecule_data(num_graphs: int = 8, nodes_per_graph: int = 25, seed: int = 0) -> Data:
    """:func:`molecule_batch` as one batched ``Data`` object (what a PyG DataLoader yields)."""
    x, edge_index, edge_attr, batch = molecule_batch(num_graphs, nodes_per_graph, seed)
    return Data(x=x, edge_index=edge_index, edge_attr=edge_attr, batch=batch)
