"""Loading bundled circuits: the catalogue, flip-flop cutting, odd module names."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

import circuitgraph as cg

from gsr_compiler.circuits import CircuitInfo, list_circuits, load_circuit, parse_netlist
from gsr_compiler.circuits import loading
from gsr_compiler.circuits.library import bundled_path

from .reference import longest_paths


def test_catalogue_names_all_65_netlists():
    infos = list_circuits(stats=False)
    assert len(infos) == 65
    assert all(isinstance(i, CircuitInfo) and i.path.is_file() for i in infos)
    suites = {i.suite for i in infos}
    assert suites == {"ISCAS85", "ISCAS89", "ITC99", "EPFL", "other"}
    by_name = {i.name: i for i in infos}
    assert by_name["c432g"].family == "c432" and by_name["b17_Cg"].family == "b17"
    assert by_name["div"].suite == "EPFL" and by_name["s27"].suite == "ISCAS89"


def test_catalogue_stats(monkeypatch, shared_cache):
    monkeypatch.setattr(loading, "bundled_names", lambda: ["c17", "s27"])
    c17, s27 = list_circuits(cache_dir=shared_cache)
    assert (c17.nodes, c17.edges, c17.depth, c17.inputs, c17.outputs) == (11, 12, 3, 5, 2)
    assert (s27.nodes, s27.flip_flops, s27.inputs, s27.outputs) == (29, 3, 4, 1)


def test_s27_flip_flops_are_cut_into_a_dag(shared_cache):
    data = load_circuit("s27", cache_dir=shared_cache)
    graph = parse_netlist(bundled_path("s27"))
    assert nx.is_directed_acyclic_graph(graph)
    assert "clk" not in data.node_names  # the clock drove only flip-flops
    pseudo_in = [n for n, p in zip(data.node_names, data.x[:, -2].tolist()) if p]
    pseudo_out = [n for n, p in zip(data.node_names, data.x[:, -1].tolist()) if p]
    assert sorted(pseudo_in) == [f"DFF_{k}_Q_reg_Q" for k in range(3)]
    assert sorted(pseudo_out) == [f"DFF_{k}_Q_reg_D" for k in range(3)]
    # pseudo-inputs are sources, pseudo-outputs are driven
    index = {n: i for i, n in enumerate(data.node_names)}
    assert all(data.level[index[n]] == 0 for n in pseudo_in)
    assert all(data.reverse_level[index[n]] == 0 for n in pseudo_out)
    # same graph as circuitgraph's own cutting of the same file
    reference = cg.tx.strip_blackboxes(cg.from_lib("s27"), ignore_pins=["CK"]).graph
    reference.remove_node("clk")
    assert set(reference.nodes) == set(data.node_names)
    names = data.node_names
    assert {(names[u], names[v]) for u, v in data.edge_index.t().tolist()} == set(reference.edges)
    level, _ = longest_paths(reference)
    assert all(data.level[index[n]] == level[n] for n in reference.nodes)


def test_mux_4_whose_module_is_named_differently(shared_cache):
    data = load_circuit("mux_4", cache_dir=shared_cache)
    assert data.num_nodes == 17 and data.num_edges == 22
    assert data.name == "mux_4" and data.family == "mux"


def test_user_file_by_path(tmp_path, cache_dir):
    source = bundled_path("c17").read_text()
    path = tmp_path / "my_c17g.v"
    path.write_text(source)  # module is still named c17: first module is used
    data = load_circuit(str(path), cache_dir=cache_dir)
    assert data.num_nodes == 11 and data.name == "my_c17g"
    with pytest.raises(Exception, match="module 'other' not found"):
        load_circuit(path, module="other", cache_dir=cache_dir)


def test_bench_file_with_numeric_net_names(tmp_path, cache_dir):
    path = tmp_path / "c17.bench"
    path.write_text(
        "# c17\nINPUT(1)\nINPUT(2)\nINPUT(3)\nINPUT(6)\nINPUT(7)\nOUTPUT(22)\nOUTPUT(23)\n"
        "10 = NAND(1, 3)\n11 = NAND(3, 6)\n16 = NAND(2, 11)\n19 = NAND(11, 7)\n"
        "22 = NAND(10, 16)\n23 = NAND(16, 19)\n"
    )
    data = load_circuit(path, cache_dir=cache_dir)
    reference = load_circuit("c17", cache_dir=cache_dir)
    # same names as the ISCAS Verilog version, same labels
    assert sorted(data.node_names) == sorted(reference.node_names)
    assert data.node_names == reference.node_names
    assert torch.equal(data.edge_index, reference.edge_index)
    assert torch.equal(data.level, reference.level)
    assert torch.equal(data.prob, reference.prob)


def test_command_line_table_and_load(monkeypatch, capsys, cache_dir):
    from gsr_compiler.circuits.__main__ import main

    monkeypatch.setattr(loading, "bundled_names", lambda: ["c17", "s27"])
    main(["--cache-dir", str(cache_dir)])
    table = capsys.readouterr().out
    assert "| c17 | ISCAS85 | c17 | 11 | 12 | 3 | 5 | 2 | 0 |" in table
    main(["--cache-dir", str(cache_dir), "--load", "--fresh"])
    assert "loaded 2 circuits" in capsys.readouterr().out
