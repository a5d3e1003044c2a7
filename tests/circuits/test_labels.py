"""Labels against independent computations: networkx longest paths, exhaustive truth tables."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

from gsr_compiler.circuits import (
    FEATURE_NAMES,
    GATE_TYPES,
    load_circuit,
    parse_netlist,
    read_netlist,
    signal_probability,
    toggle_rate,
)
from gsr_compiler.circuits import labels as labels_module
from gsr_compiler.circuits.library import bundled_path

from .reference import (
    ALL_GATES,
    ALL_GATES_INPUTS,
    ALL_GATES_OUTPUTS,
    exact_toggle,
    longest_paths,
    truth_tables,
    write_bench,
    write_verilog,
)

N = 65536


def prob_tolerance(p: np.ndarray, n: int = N) -> np.ndarray:
    # 5 standard errors of a binomial proportion, plus float slack.
    return 5 * np.sqrt(p * (1 - p) / n) + 1e-6


def by_name(data) -> dict[str, int]:
    return {name: i for i, name in enumerate(data.node_names)}


@pytest.mark.parametrize("name", ["c17", "c432", "s27", "c6288"])
def test_levels_match_networkx_longest_paths(name, shared_cache):
    data = load_circuit(name, labels=("level", "reverse_level"), cache_dir=shared_cache)
    graph = parse_netlist(bundled_path(name))
    level, rlevel = longest_paths(graph)
    index = by_name(data)
    assert set(index) == set(graph.nodes)
    for node in graph.nodes:
        assert data.level[index[node]] == level[node], node
        assert data.reverse_level[index[node]] == rlevel[node], node
    depth = max(level.values())
    assert torch.allclose(data.level_norm, data.level.float() / depth)
    assert data.level_norm.max() == 1.0


def test_edges_match_parsed_graph(shared_cache):
    data = load_circuit("c432", labels=(), cache_dir=shared_cache)
    graph = parse_netlist(bundled_path("c432"))
    names = data.node_names
    edges = {(names[u], names[v]) for u, v in data.edge_index.t().tolist()}
    assert edges == set(graph.edges)
    assert data.edge_index.dtype == torch.int64
    # nodes are topologically ordered: every edge goes forward
    assert bool((data.edge_index[0] < data.edge_index[1]).all())


def test_features_are_type_one_hot_and_io_flags(shared_cache):
    data = load_circuit("s27", cache_dir=shared_cache)
    assert data.x.shape == (data.num_nodes, len(FEATURE_NAMES))
    graph = parse_netlist(bundled_path("s27"))
    col = {name: k for k, name in enumerate(FEATURE_NAMES)}
    for i, node in enumerate(data.node_names):
        attrs = graph.nodes[node]
        row = data.x[i]
        assert row[: len(GATE_TYPES)].sum() == 1
        assert row[col[f"type_{attrs['type']}"]] == 1
        pseudo = attrs["pseudo"]
        assert row[col["is_pseudo_input"]] == (pseudo == "input")
        assert row[col["is_pseudo_output"]] == (pseudo == "output")
        assert row[col["is_primary_input"]] == (attrs["type"] == "input" and pseudo is None)
        assert row[col["is_primary_output"]] == (attrs["output"] and pseudo is None)
    # features do not depend on label settings
    other = load_circuit("s27", num_patterns=128, seed=3, cache_dir=shared_cache)
    assert torch.equal(other.x, data.x)


def test_c17_probability_matches_truth_table(shared_cache):
    data = load_circuit("c17", labels=("prob",), cache_dir=shared_cache)
    inputs = ["N1", "N2", "N3", "N6", "N7"]
    gates = [
        ("N10", "nand", ["N1", "N3"]),
        ("N11", "nand", ["N3", "N6"]),
        ("N16", "nand", ["N2", "N11"]),
        ("N19", "nand", ["N11", "N7"]),
        ("N22", "nand", ["N10", "N16"]),
        ("N23", "nand", ["N16", "N19"]),
    ]
    exact = {k: v.mean() for k, v in truth_tables(inputs, gates).items()}
    got = data.prob.double().numpy()
    want = np.array([exact[n] for n in data.node_names])
    assert np.all(np.abs(got - want) <= prob_tolerance(want))
    assert exact["N22"] == pytest.approx(0.5625)  # the reference itself is right


@pytest.mark.parametrize("fmt", ["bench", "v"])
def test_all_gate_types_probability_exhaustive(tmp_path, cache_dir, fmt):
    writer = write_bench if fmt == "bench" else write_verilog
    path = writer(tmp_path / f"allgates.{fmt}", ALL_GATES_INPUTS, ALL_GATES_OUTPUTS, ALL_GATES)
    data = load_circuit(path, labels=("prob",), cache_dir=cache_dir)
    exact = {k: v.mean() for k, v in truth_tables(ALL_GATES_INPUTS, ALL_GATES).items()}
    assert set(data.node_names) == set(exact)
    want = np.array([exact[n] for n in data.node_names])
    got = data.prob.double().numpy()
    assert np.all(np.abs(got - want) <= prob_tolerance(want)), list(zip(data.node_names, got, want))
    # a sanity check of the tolerance: constants would be exact, others are not
    assert np.abs(got - want).max() > 0


def test_constants_in_verilog(tmp_path, cache_dir):
    path = tmp_path / "consts.v"
    path.write_text(
        "module consts (a, b, y, z, w);\n"
        "  input a, b;\n  output y, z, w;\n  wire k0, k1;\n"
        "  assign k0 = 1'b0;\n  assign k1 = 1'b1;\n"
        "  and g1 (y, a, k1);\n  or g2 (z, b, k0);\n  nor g3 (w, a, k1);\n"
        "endmodule\n"
    )
    data = load_circuit(path, cache_dir=cache_dir)
    p = dict(zip(data.node_names, data.prob.tolist()))
    t = dict(zip(data.node_names, data.toggle.tolist()))
    assert p["k0"] == 0.0 and p["k1"] == 1.0 and p["w"] == 0.0
    assert t["k0"] == 0.0 and t["w"] == 0.0
    assert abs(p["y"] - 0.5) < 0.01 and abs(p["z"] - 0.5) < 0.01
    types = {n: GATE_TYPES[g] for n, g in zip(data.node_names, data.gate_type.tolist())}
    assert sorted(t for t in types.values() if t in "01") == ["0", "1"]
    lv = dict(zip(data.node_names, data.level.tolist()))
    assert lv["k1"] == 1 and lv["y"] == 2  # constant driver at 0, buffer at 1


def test_toggle_matches_exact_markov_computation(tmp_path, cache_dir):
    path = write_bench(tmp_path / "allgates.bench", ALL_GATES_INPUTS, ALL_GATES_OUTPUTS, ALL_GATES)
    flip = 0.1
    data = load_circuit(path, labels=("toggle",), flip_prob=flip, cache_dir=cache_dir)
    tables = truth_tables(ALL_GATES_INPUTS, ALL_GATES)
    want = np.array([exact_toggle(tables[n], len(ALL_GATES_INPUTS), flip) for n in data.node_names])
    got = data.toggle.double().numpy()
    # consecutive pairs are correlated, so allow 8 binomial standard errors
    tol = 8 * np.sqrt(want * (1 - want) / N) + 1e-6
    assert np.all(np.abs(got - want) <= tol), list(zip(data.node_names, got, want))
    inputs = [i for i, n in enumerate(data.node_names) if n in ALL_GATES_INPUTS]
    assert np.allclose(got[inputs], flip, atol=0.005)


def test_toggle_definition_on_explicit_sequence(tmp_path):
    # The counting of changes across bits and words, checked on a known sequence.
    path = write_bench(tmp_path / "one.bench", ["a"], ["y"], [("y", "not", ["a"])])
    netlist = read_netlist(path)
    rng = np.random.default_rng(0)
    words = labels_module._random_walk_words(rng, 1, 256, 0.3)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(int)
    expected = np.mean(bits[1:] != bits[:-1])
    got = toggle_rate(netlist, num_patterns=256, seed=0, flip_prob=0.3)
    assert got[0] == pytest.approx(expected) and got[1] == pytest.approx(expected)


def test_simulation_does_not_depend_on_chunking(monkeypatch, shared_cache):
    netlist = read_netlist(bundled_path("c432"))
    prob = signal_probability(netlist, num_patterns=4096, seed=7)
    toggle = toggle_rate(netlist, num_patterns=4096, seed=7)
    # one 64-pattern word per chunk
    monkeypatch.setattr(labels_module, "_SIM_MEMORY_BYTES", 8 * netlist.num_nodes)
    assert np.array_equal(signal_probability(netlist, num_patterns=4096, seed=7), prob)
    assert np.array_equal(toggle_rate(netlist, num_patterns=4096, seed=7), toggle)
    # and the seed does matter
    assert not np.array_equal(signal_probability(netlist, num_patterns=4096, seed=8), prob)


def test_num_patterns_rounds_up_to_words(tmp_path):
    path = write_bench(tmp_path / "and.bench", ["a", "b"], ["y"], [("y", "and", ["a", "b"])])
    prob = signal_probability(read_netlist(path), num_patterns=100)
    assert np.allclose(prob * 128, np.round(prob * 128))  # 100 -> 128 patterns
    with pytest.raises(ValueError):
        signal_probability(read_netlist(path), num_patterns=1)


def test_level_on_cycle_is_rejected():
    with pytest.raises(ValueError, match="cycle"):
        labels_module.logic_level(np.array([[0, 1], [1, 0]]), 2)


def test_default_labels_are_attached(shared_cache):
    data = load_circuit("c17", cache_dir=shared_cache)
    for key in ("level", "level_norm", "reverse_level", "reverse_level_norm", "prob", "toggle"):
        assert data[key].shape == (data.num_nodes,), key
    assert data.prob.dtype == torch.float32 and data.level.dtype == torch.int64
    assert data.name == "c17" and data.family == "c17"
    with pytest.raises(ValueError, match="unknown label"):
        load_circuit("c17", labels=("delay",), cache_dir=shared_cache)


def test_reverse_level_counts_dangling_nets_as_sinks(tmp_path, cache_dir):
    gates = [("n1", "and", ["a", "b"]), ("dangle", "not", ["n1"]), ("y", "or", ["n1", "a"])]
    path = write_bench(tmp_path / "dangle.bench", ["a", "b"], ["y"], gates)
    data = load_circuit(path, labels=("reverse_level",), cache_dir=cache_dir)
    graph = nx.DiGraph([(i, g[0]) for g in gates for i in g[2]])
    _, rlevel = longest_paths(graph)
    assert dict(zip(data.node_names, data.reverse_level.tolist())) == rlevel
