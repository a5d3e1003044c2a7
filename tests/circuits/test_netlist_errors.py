"""Bad input gives clear errors (file, line, names) and never leaves a cache entry."""

from __future__ import annotations

import pytest

from gsr_compiler.circuits import (
    CombinationalLoopError,
    NetlistError,
    NetlistSyntaxError,
    UnknownCircuitError,
    load_circuit,
)

from .conftest import cache_entries
from .reference import write_bench, write_verilog

GOOD_VERILOG = """\
// a comment header, so that the module does not start on line 1
// (line numbers must count from the top of the file)

module tiny (a, b, y);
  input a, b;
  output y;
  wire t;
  and g1 (t, a, b);
  not g2 (y, t);
endmodule
"""


# p -> q -> r -> p; y reads the loop
LOOP = [("p", "and", ["a", "r"]), ("q", "not", ["p"]), ("r", "or", ["q", "b"]), ("y", "buf", ["r"])]


def load_fails(path_or_name, cache_dir, error, match=None):
    with pytest.raises(error, match=match) as info:
        load_circuit(path_or_name, cache_dir=cache_dir)
    assert cache_entries(cache_dir) == [], "a failed load must not write the cache"
    return info.value


def test_good_verilog_loads(tmp_path, cache_dir):
    path = tmp_path / "tiny.v"
    path.write_text(GOOD_VERILOG)
    assert load_circuit(path, cache_dir=cache_dir).num_nodes == 4


def test_missing_file(tmp_path, cache_dir):
    err = load_fails(tmp_path / "nope.v", cache_dir, FileNotFoundError)
    assert "nope.v" in str(err)
    load_fails(str(tmp_path / "nope.bench"), cache_dir, FileNotFoundError)


def test_verilog_syntax_error_names_file_and_line(tmp_path, cache_dir):
    path = tmp_path / "tiny.v"
    path.write_text(GOOD_VERILOG.replace("and g1 (t, a, b);", "and g1 (t, a b);"))
    err = load_fails(path, cache_dir, NetlistSyntaxError)
    assert err.line == 8 and err.path == str(path)
    assert f"{path}:8:" in str(err) and "g1" in str(err)


def test_verilog_unknown_cell_names_line(tmp_path, cache_dir):
    path = tmp_path / "tiny.v"
    path.write_text(GOOD_VERILOG.replace("not g2 (y, t);", "INVX1 g2 (.A(t), .Y(y));"))
    err = load_fails(path, cache_dir, NetlistSyntaxError, match="INVX1")
    assert err.line == 9


def test_verilog_without_module(tmp_path, cache_dir):
    path = tmp_path / "empty.v"
    path.write_text("// nothing here\n")
    load_fails(path, cache_dir, NetlistSyntaxError, match="no complete module")


def test_bench_syntax_error_names_file_and_line(tmp_path, cache_dir):
    path = tmp_path / "bad.bench"
    path.write_text("INPUT(a)\nINPUT(b)\nOUTPUT(y)\n\ny = AND(a, b\n")
    err = load_fails(path, cache_dir, NetlistSyntaxError)
    assert err.line == 5 and f"{path}:5:" in str(err)
    path.write_text("INPUT(a)\nOUTPUT(y)\ny = MAJ(a, a, a)\n")
    err = load_fails(path, cache_dir, NetlistSyntaxError, match="unknown gate 'MAJ'")
    assert err.line == 3
    path.write_text("INPUT(a)\nOUTPUT(y)\ny = NOT(a)\ny = BUF(a)\n")
    err = load_fails(path, cache_dir, NetlistSyntaxError, match="driven twice")
    assert err.line == 4


@pytest.mark.parametrize("gate", ["NOT", "BUF"])
def test_bench_one_input_gate_with_two_inputs_names_file_and_line(tmp_path, cache_dir, gate):
    path = tmp_path / "fanin.bench"
    path.write_text(f"INPUT(a)\nINPUT(b)\nOUTPUT(y)\n\ny = {gate}(a, b)\n")
    err = load_fails(path, cache_dir, NetlistError, match=f"{gate} takes one input, got 2")
    assert err.line == 5 and f"{path}:5:" in str(err)


@pytest.mark.parametrize(
    "and_g1", ["and g1 (t, a, b);", "assign t = a & b;"], ids=["fast reader", "full parser"]
)
def test_verilog_not_with_two_inputs_names_file_and_line(tmp_path, cache_dir, and_g1):
    path = tmp_path / "tiny.v"
    text = GOOD_VERILOG.replace("not g2 (y, t);", "not g2 (y, t, a);")
    path.write_text(text.replace("and g1 (t, a, b);", and_g1))
    err = load_fails(path, cache_dir, NetlistError, match="not.*(2 inputs|one input, got 2)")
    assert err.line == 9 and f"{path}:9:" in str(err)


@pytest.mark.parametrize("end", ["not g2 (y, t)", "assign y = t"])
def test_verilog_missing_semicolon_before_endmodule_names_the_line(tmp_path, cache_dir, end):
    path = tmp_path / "tiny.v"
    path.write_text(GOOD_VERILOG.replace("not g2 (y, t);", end))
    err = load_fails(path, cache_dir, NetlistSyntaxError, match="missing ';'")
    assert err.line == 9 and f"{path}:9:" in str(err) and end in str(err)


def test_verilog_missing_semicolon_mid_module_names_the_line(tmp_path, cache_dir):
    path = tmp_path / "tiny.v"
    path.write_text(GOOD_VERILOG.replace("and g1 (t, a, b);", "and g1 (t, a, b)"))
    err = load_fails(path, cache_dir, NetlistSyntaxError, match="missing ';'")
    assert err.line == 8


NO_GATES = {
    "empty bench": ("empty.bench", "", "declares nothing"),
    "comments only": ("notes.bench", "# nothing yet\n\n", "declares nothing"),
    "inputs only": ("wires.bench", "INPUT(a)\nOUTPUT(a)\n", "only inputs"),
    "verilog without gates": ("ports.v", "module ports (a);\ninput a;\nendmodule\n", "only inputs"),
}


@pytest.mark.parametrize("name, text, what", NO_GATES.values(), ids=NO_GATES.keys())
def test_netlist_without_gates_is_an_error(tmp_path, cache_dir, name, text, what):
    path = tmp_path / name
    path.write_text(text)
    err = load_fails(path, cache_dir, NetlistError, match=f"has no gates \\(.*{what}")
    assert err.path == str(path) and str(path) in str(err)


def test_undriven_net(tmp_path, cache_dir):
    path = write_bench(tmp_path / "undriven.bench", ["a"], ["y"], [("y", "and", ["a", "ghost"])])
    err = load_fails(path, cache_dir, NetlistError, match="'ghost' is used but never driven")
    assert err.line is not None


@pytest.mark.parametrize("fmt", ["bench", "v"])
def test_combinational_loop(tmp_path, cache_dir, fmt):
    gates = LOOP
    writer = write_bench if fmt == "bench" else write_verilog
    path = writer(tmp_path / f"loopy.{fmt}", ["a", "b"], ["y"], gates)
    err = load_fails(path, cache_dir, CombinationalLoopError)
    assert err.circuit == "loopy"
    assert set(err.cycle) == {"p", "q", "r"}
    assert "loopy" in str(err) and f"'{err.cycle[0]}'" in str(err) and str(path) in str(err)


def test_flip_flop_breaks_a_loop(tmp_path, cache_dir):
    # the same loop through a DFF is sequential, not combinational: it is cut
    gates = [("p", "and", ["a", "s"])] + LOOP[1:]
    path = write_bench(tmp_path / "seq.bench", ["a", "b"], ["y"], gates, flops=[("s", "r")])
    data = load_circuit(path, cache_dir=cache_dir)
    assert "s_dff_Q" in data.node_names and "s_dff_D" in data.node_names


@pytest.mark.parametrize(
    "name, expected", [("c4320", "c432"), ("b19", "b19_Cg"), ("multipler", "multiplier")]
)
def test_unknown_name_lists_near_matches(cache_dir, name, expected):
    err = load_fails(name, cache_dir, UnknownCircuitError)
    assert expected in err.suggestions and expected in str(err)


def test_unsupported_suffix(tmp_path, cache_dir):
    path = tmp_path / "x.blif"
    path.write_text(".model x\n")
    load_fails(path, cache_dir, NetlistError, match="unsupported netlist suffix")
