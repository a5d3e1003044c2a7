"""The fast gate-level Verilog reader builds exactly circuitgraph's graph, or declines."""

from __future__ import annotations

import re

import pytest
from circuitgraph.parsing import parse_verilog_netlist

from gsr_compiler.circuits.library import bundled_path
from gsr_compiler.circuits.netlist import _flip_flops
from gsr_compiler.circuits.verilog import read_gate_level_verilog

SEQUENTIAL = """\
module seq (clk, a, b, y, z);
  input clk, a, b;
  output y, z;
  wire q, n1, n2, \\odd[0] ;
  // a comment; with a semicolon
  /* a block
     comment */
  ff r0 (.CK(clk), .D(n2), .Q(q));
  flopdrs r1 (.CK(clk), .D(1'b1), .R(a), .Q(z));
  nand g1 (n1, a, q, 1'b0);
  xnor g2 (n2, n1, b, \\odd[0] );
  buf g3 (\\odd[0] , a);
  assign y = n1;
endmodule
"""


def module_text(name: str) -> str:
    text = bundled_path(name).read_text()
    match = re.search(r"module\s+\S+?\s*\(.*?\);.*?endmodule", text, re.DOTALL)
    return match.group(0)


def graph_signature(circuit):
    g = circuit.graph
    nodes = {n: (g.nodes[n]["type"], bool(g.nodes[n]["output"])) for n in g.nodes}
    return circuit.name, nodes, set(g.edges), set(circuit.blackboxes)


@pytest.mark.parametrize("name", ["c17", "c432", "c2670", "s27", "mux_4", "ctrl", "s13207"])
def test_same_graph_as_circuitgraph_on_bundled(name):
    text = module_text(name)
    fast = read_gate_level_verilog(text, _flip_flops())
    assert fast is not None
    assert graph_signature(fast) == graph_signature(parse_verilog_netlist(text, _flip_flops()))


def test_same_graph_with_flops_constants_comments_and_escaped_names():
    fast = read_gate_level_verilog(SEQUENTIAL, _flip_flops())
    assert fast is not None
    slow = parse_verilog_netlist(SEQUENTIAL, _flip_flops())
    assert graph_signature(fast) == graph_signature(slow)
    assert {"tie_0", "tie_1", "r1.S", "\\odd[0]"} <= set(fast.graph.nodes)


@pytest.mark.parametrize(
    "edit",
    [
        ("assign y = n1;", "assign y = ~n1;"),  # operator expression
        ("assign y = n1;", "assign n2 = n1;"),  # net driven twice
        ("output y, z;", "output y;"),  # port list mismatch
        ("nand g1", "nand2 g1"),  # unknown cell
        (".R(a)", ".R()"),  # empty connection
        ("buf g3 (\\odd[0] , a);", "buf g3 (\\odd[0], a);"),  # escaped name eats a comma
    ],
)
def test_declines_what_it_does_not_cover(edit):
    text = SEQUENTIAL.replace(*edit)
    assert text != SEQUENTIAL
    assert read_gate_level_verilog(text, _flip_flops()) is None


def test_declines_expressions_of_bundled_c17_assign():
    assert read_gate_level_verilog(module_text("c17_assign"), _flip_flops()) is None
