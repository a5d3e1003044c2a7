"""Cone sampling: scored nodes keep their whole cone, budgets hold, edges are relabelled."""

from __future__ import annotations

import time

import networkx as nx
import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from gsr_compiler.circuits import ConeSampler, load_circuit, logic_level, reverse_level


def random_dag(num_nodes: int, num_edges: int, seed: int = 0, window: int = 50) -> Data:
    """A random DAG (edges go from lower to higher index) with level labels."""
    rng = np.random.default_rng(seed)
    dst = rng.integers(1, num_nodes, num_edges)
    src = np.maximum(0, dst - rng.integers(1, window, num_edges))
    edges = np.unique(np.stack([src, dst]), axis=1)
    data = Data(
        x=torch.randn(num_nodes, 3),
        edge_index=torch.from_numpy(edges),
        num_nodes=num_nodes,
    )
    data.level = torch.from_numpy(logic_level(edges, num_nodes))
    data.reverse_level = torch.from_numpy(reverse_level(edges, num_nodes))
    data.node_names = [f"n{i}" for i in range(num_nodes)]
    data.name = "random"
    return data


def to_nx(data: Data) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(range(data.num_nodes))
    g.add_edges_from(data.edge_index.t().tolist())
    return g


def check_sample(sample: Data, data: Data, graph: nx.DiGraph, max_nodes: int, direction="fanin"):
    n_id = sample.n_id.tolist()
    nodes = set(n_id)
    assert sample.num_nodes == len(n_id) <= max_nodes
    assert n_id == sorted(n_id) and len(nodes) == len(n_id)
    # edge_index is the induced subgraph, relabelled
    got = {(n_id[u], n_id[v]) for u, v in sample.edge_index.t().tolist()}
    want = {(u, v) for u, v in graph.subgraph(nodes).edges}
    assert got == want
    assert sample.edge_index.dtype == torch.int64
    # node attributes follow their node
    assert torch.equal(sample.x, data.x[sample.n_id])
    assert torch.equal(sample.level, data.level[sample.n_id])
    assert sample.node_names == [data.node_names[i] for i in n_id]
    # every scored node has its whole cone inside the sample
    cone = nx.ancestors if direction == "fanin" else nx.descendants
    scored = [n_id[i] for i in torch.nonzero(sample.score_mask).flatten().tolist()]
    assert scored, "a sample must score something"
    for v in scored:
        assert cone(graph, v) <= nodes, v
    # ... so its label is recomputable from the sample alone
    if direction == "fanin":
        local = logic_level(sample.edge_index.numpy(), sample.num_nodes)
        scored_mask = sample.score_mask.numpy()
        assert np.array_equal(local[scored_mask], sample.level.numpy()[scored_mask])
    else:
        local = reverse_level(sample.edge_index.numpy(), sample.num_nodes)
        assert np.array_equal(
            local[sample.score_mask.numpy()], sample.reverse_level[sample.score_mask].numpy()
        )
    # sinks are scored
    assert bool(sample.score_mask[sample.sink_mask].all())
    return scored


def test_skip_mode_scores_every_node_and_respects_budget():
    data = random_dag(3000, 6000, seed=1)
    graph = to_nx(data)
    sampler = ConeSampler(data, max_nodes=400, seed=0)
    assert len(sampler) == 8  # ceil(3000 / 400)
    samples = list(sampler)
    assert len(samples) == 8
    for sample in samples:
        check_sample(sample, data, graph, 400)
        assert bool(sample.score_mask.all())  # unions of fan-in cones are closed
        assert sample.num_nodes > 200  # the budget is actually used
    # different samples each time
    assert len({tuple(s.n_id.tolist()) for s in samples}) == len(samples)


def test_truncate_mode_only_scores_complete_cones():
    data = random_dag(3000, 6000, seed=2)
    graph = to_nx(data)
    sampler = ConeSampler(data, max_nodes=300, oversize="truncate", sinks="all", seed=1)
    partial = 0
    for sample in (sampler.sample() for _ in range(10)):
        check_sample(sample, data, graph, 300)
        partial += int((~sample.score_mask).sum())
    assert partial > 0  # truncation did happen and was not scored


def test_fanout_cones_for_reverse_level():
    data = random_dag(2000, 4000, seed=3)
    graph = to_nx(data)
    for oversize in ("skip", "truncate"):
        sampler = ConeSampler(data, max_nodes=250, direction="fanout", oversize=oversize, seed=2)
        for _ in range(5):
            check_sample(sampler.sample(), data, graph, 250, direction="fanout")


def test_real_circuit_samples(shared_cache):
    data = load_circuit("c6288", cache_dir=shared_cache)
    graph = to_nx(data)
    sampler = ConeSampler(data, max_nodes=500, seed=3)
    for sample in sampler:
        check_sample(sample, data, graph, 500)
        assert torch.equal(sample.prob, data.prob[sample.n_id])
        assert sample.name == "c6288"


def test_output_sinks_and_explicit_sinks(shared_cache):
    data = load_circuit("c432", cache_dir=shared_cache)
    graph = to_nx(data)
    sampler = ConeSampler(data, max_nodes=150, sinks="outputs", seed=0)
    sample = sampler.sample()
    check_sample(sample, data, graph, 150)
    outputs = set(torch.nonzero(data.x[:, -3] + data.x[:, -1]).flatten().tolist())
    assert set(sample.n_id[sample.sink_mask].tolist()) <= outputs
    fits = [v for v in graph if len(nx.ancestors(graph, v)) < 150]
    sink = max(fits, key=lambda v: int(data.level[v]))
    sampler = ConeSampler(data, max_nodes=150, sinks=[sink])
    sample = sampler.sample()
    assert sample.n_id[sample.sink_mask].tolist() == [sink]
    assert set(sample.n_id.tolist()) == nx.ancestors(graph, sink) | {sink}


def test_small_circuit_is_returned_whole(shared_cache):
    data = load_circuit("c17", cache_dir=shared_cache)
    (sample,) = list(ConeSampler(data, max_nodes=100))
    assert sample.num_nodes == data.num_nodes
    assert torch.equal(sample.edge_index, data.edge_index)
    assert bool(sample.score_mask.all())


def test_several_circuits():
    circuits = [random_dag(500, 900, seed=s) for s in range(3)]
    for k, c in enumerate(circuits):
        c.name = f"r{k}"
    sampler = ConeSampler(circuits, max_nodes=200, samples_per_circuit=2, seed=0)
    names = [s.name for s in sampler]
    assert sorted(names) == ["r0", "r0", "r1", "r1", "r2", "r2"]


def test_no_fitting_sink_is_a_clear_error():
    data = random_dag(1000, 3000, seed=4)
    deepest = int(data.level.argmax())
    sampler = ConeSampler(data, max_nodes=5, sinks=[deepest])
    with pytest.raises(ValueError, match="max_nodes=5"):
        sampler.sample()
    with pytest.raises(ValueError):
        ConeSampler(data, max_nodes=0)


def test_large_graph_is_fast():
    # b19_Cg size (124k nodes, 212k edges); must not go through networkx per sample.
    data = random_dag(124_000, 212_000, seed=5, window=400)
    start = time.perf_counter()
    sampler = ConeSampler(data, max_nodes=20_000, seed=0)
    samples = [sampler.sample() for _ in range(10)]
    elapsed = time.perf_counter() - start
    assert all(s.num_nodes <= 20_000 for s in samples)
    assert sum(s.num_nodes for s in samples) > 10 * 15_000
    assert elapsed < 15, elapsed  # about 1 s on a 2-core CPU
