"""A fast reader for flat gate-level Verilog, with circuitgraph's semantics.

circuitgraph's Verilog parser (Lark, LALR) reads about 0.5 MB/s: b19_Cg takes
15-20 s. Nearly every real netlist uses a tiny subset of Verilog, one statement
per ``;``::

    module m (a, b, y);
    input a, b;   output y;   wire t;
    nand g1 (t, a, b);                      // primitive gate, positional ports
    ff r1 (.CK(clk), .D(t), .Q(q));         // flip-flop cell, named ports
    assign y = q;   assign z = 1'b0;        // plain copies and constants
    endmodule

:func:`read_gate_level_verilog` reads exactly that subset with regular
expressions (about 10x faster) and builds the same graph circuitgraph's parser
builds. On anything else (operator expressions, a net driven twice, a port-list
mismatch, an unknown cell, ...) it returns ``None`` and the caller falls back to
circuitgraph's full parser, which accepts the richer syntax and reports errors
with line numbers. The two readers are checked to agree in the tests.
"""

from __future__ import annotations

import re
from typing import Sequence

import networkx as nx

__all__ = ["read_gate_level_verilog"]

_IDENT = r"(?:[A-Za-z_][A-Za-z0-9_]*|\\\S+)"
_CONST = r"1'[bh][01x]"
_HEADER = re.compile(rf"\s*module\s+({_IDENT})\s*(?:\((.*?)\))?\s*;", re.DOTALL)
_DECL = re.compile(r"(input|output|wire)\s+(.*)", re.DOTALL)
_ASSIGN = re.compile(rf"assign\s+({_IDENT})\s*=\s*({_IDENT}|{_CONST})", re.DOTALL)
_INSTANCE = re.compile(rf"({_IDENT})\s+({_IDENT})\s*\((.*)\)", re.DOTALL)
_NAMED = re.compile(rf"\s*\.\s*({_IDENT})\s*\(\s*({_IDENT}|{_CONST})\s*\)\s*", re.DOTALL)
_IDENT_ONLY = re.compile(rf"\s*({_IDENT})\s*", re.DOTALL)
_NET = re.compile(rf"\s*({_IDENT}|{_CONST})\s*", re.DOTALL)
_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)
# An escaped identifier swallows punctuation up to the next blank; leave such
# files to the full parser rather than guess.
_ESCAPED_WITH_PUNCTUATION = re.compile(r"\\\S*[,;()=]")
_TIES = {"0": "tie_0", "1": "tie_1", "x": "tie_x"}  # circuitgraph's constant drivers
_PRIMITIVES = frozenset({"buf", "and", "or", "xor", "not", "nand", "nor", "xnor"})


class _Unsupported(Exception):
    """Outside the subset: use the full parser."""


def _names(text: str) -> list[str]:
    names = []
    for part in text.split(","):
        m = _IDENT_ONLY.fullmatch(part)
        if m is None:
            raise _Unsupported(part)
        names.append(m.group(1))
    return names


def _net(token: str) -> str:
    return _TIES[token[-1]] if token.startswith("1'") else token


def read_gate_level_verilog(module_text: str, blackboxes: Sequence):
    """Read one module of flat gate-level Verilog.

    Args:
        module_text: the text from ``module`` to ``endmodule``.
        blackboxes: circuitgraph ``BlackBox`` cells that may be instantiated.

    Returns:
        a ``circuitgraph.Circuit`` equal to what circuitgraph's parser returns,
        or ``None`` if the text is outside the supported subset.
    """
    try:
        return _read(module_text, {bb.name: bb for bb in blackboxes})
    except _Unsupported:
        return None


def _read(text: str, cells: dict):
    from circuitgraph import Circuit

    if _ESCAPED_WITH_PUNCTUATION.search(text):
        raise _Unsupported("escaped identifier with punctuation")
    text = _COMMENTS.sub(" ", text)
    header = _HEADER.match(text)
    if header is None or not text.rstrip().endswith("endmodule"):
        raise _Unsupported("module header")
    name = header.group(1)
    ports = set(_names(header.group(2))) if header.group(2) is not None else set()
    body = text[header.end() : text.rstrip().rfind("endmodule")]
    if body.strip() and not body.rstrip().endswith(";"):
        raise _Unsupported("last statement without ';'")  # the full parser names the line

    inputs: list[str] = []
    outputs: list[str] = []
    gate_type: dict[str, str] = {}  # net -> driving gate type
    edges: list[tuple[str, str]] = []
    instances: dict = {}
    for statement in body.split(";"):
        statement = statement.strip()
        if not statement:
            continue
        if m := _DECL.fullmatch(statement):
            kind, names = m.group(1), _names(m.group(2))
            if kind == "input":
                inputs.extend(names)
            elif kind == "output":
                outputs.extend(names)
            continue
        if m := _ASSIGN.fullmatch(statement):
            lhs, rhs = m.group(1), _net(m.group(2))
            _define(gate_type, lhs, "buf")
            edges.append((rhs, lhs))
            continue
        m = _INSTANCE.fullmatch(statement)
        if m is None:
            raise _Unsupported(statement[:40])
        cell, instance, connections = m.group(1), m.group(2), m.group(3)
        if cell in _PRIMITIVES:
            nets = []
            for part in connections.split(","):
                n = _NET.fullmatch(part)
                if n is None:
                    raise _Unsupported(part)
                nets.append(_net(n.group(1)))
            if len(nets) < 2:
                raise _Unsupported("gate without inputs")
            _define(gate_type, nets[0], cell)
            edges.extend((i, nets[0]) for i in nets[1:])
        elif cell in cells:
            bb = cells[cell]
            if instance in instances:
                raise _Unsupported("instance name reused")
            instances[instance] = bb
            pins = {}
            for part in connections.split(","):
                n = _NAMED.fullmatch(part)
                if n is None:
                    raise _Unsupported(part)
                pins[n.group(1)] = _net(n.group(2))
            for pin in bb.inputs():
                gate_type[f"{instance}.{pin}"] = "bb_input"
            for pin in bb.outputs():
                gate_type[f"{instance}.{pin}"] = "bb_output"
            for pin, net in pins.items():
                if pin in bb.inputs():
                    edges.append((net, f"{instance}.{pin}"))
                elif pin in bb.outputs():
                    _define(gate_type, net, "buf")  # the net a flip-flop drives
                    edges.append((f"{instance}.{pin}", net))
                else:
                    raise _Unsupported(f"pin {pin}")
        else:
            raise _Unsupported(f"cell {cell}")

    # circuitgraph's own checks on the port list
    if not (set(inputs) <= ports and set(outputs) <= ports and ports <= set(inputs) | set(outputs)):
        raise _Unsupported("port list")
    for net in inputs:
        if net in gate_type:
            raise _Unsupported("input driven by a gate")
        gate_type[net] = "input"
    if set(_TIES.values()) & set(gate_type):
        raise _Unsupported("a net named like a constant driver")

    graph = nx.DiGraph()
    graph.add_nodes_from(gate_type)
    graph.add_edges_from(edges)  # nets never driven appear here: circuitgraph makes them buffers
    for net in graph.nodes:
        if net[0].isdigit():
            raise _Unsupported("name starting with a digit")
    ties = {"tie_0": "0", "tie_1": "1", "tie_x": "x"}
    types = {n: gate_type.get(n, ties.get(n, "buf")) for n in graph.nodes}
    nx.set_node_attributes(graph, types, "type")
    nx.set_node_attributes(graph, False, "output")
    for net in outputs:
        if net not in graph:
            raise _Unsupported("undriven output")
        graph.nodes[net]["output"] = True
    return Circuit(name=name, graph=graph, blackboxes=instances)


def _define(gate_type: dict, net: str, kind: str) -> None:
    if net in gate_type:
        raise _Unsupported(f"{net} driven twice")
    gate_type[net] = kind
