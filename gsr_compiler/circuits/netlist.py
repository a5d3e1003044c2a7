"""Gate-level netlists (``.v`` / ``.bench``) -> directed acyclic graphs.

Pipeline, for one file:

1. parse: flat gate-level Verilog with a fast reader (``verilog.py``), other
   Verilog with circuitgraph's parser (Lark), ``.bench`` with our line-based
   reader; parser errors become :class:`NetlistSyntaxError` naming file and line;
2. cut flip-flops (circuitgraph black boxes): each Q pin becomes a
   *pseudo-input*, each D (and set/reset) pin a *pseudo-output*; the clock pin is
   dropped, and so is a primary input that only drove clock pins;
3. check the result is a DAG of known gate types, every gate driven, with at
   least one gate;
4. order nodes topologically (by logic level, then gate type, then name), so
   every edge runs from a lower to a higher node index and the order does not
   depend on Python's hash seed.

The result is a :class:`Netlist`: plain numpy arrays, cheap to cache.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import networkx as nx
import numpy as np

from .errors import CombinationalLoopError, NetlistError, NetlistSyntaxError
from .gates import GATE_TYPES, SOURCE_TYPES, gate_type_index
from .verilog import read_gate_level_verilog

__all__ = ["Netlist", "parse_netlist", "netlist_from_graph", "read_netlist"]

#: Pins of flip-flop black boxes that carry the clock: dropped, not cut.
CLOCK_PINS = ("CK", "CP")


def _flip_flops() -> list:
    """Flip-flop cells known to the Verilog reader (those of ``circuitgraph.from_lib``)."""
    from circuitgraph import BlackBox
    from circuitgraph.io import dc_flops, genus_flops

    return [BlackBox("ff", ["CK", "D"], ["Q"]), *genus_flops, *dc_flops]


@dataclass(eq=False)
class Netlist:
    """A flattened, flip-flop-free circuit as arrays.

    Node ``i`` is the net ``node_names[i]`` driven by a gate of type
    ``GATE_TYPES[gate_type[i]]``. Nodes are in topological order.

    Attributes:
        name: circuit name (module name or file stem).
        node_names: one name per node.
        gate_type: ``int8 [N]`` index into :data:`~gsr_compiler.circuits.gates.GATE_TYPES`.
        is_output: ``bool [N]``, primary or pseudo output.
        is_pseudo_input: ``bool [N]``, a flip-flop Q pin.
        is_pseudo_output: ``bool [N]``, a flip-flop D (or set/reset) pin.
        edge_index: ``int64 [2, E]``, row 0 the fanin (driver), row 1 the fanout
            (driven gate); sorted by fanout then fanin.
    """

    name: str
    node_names: list[str]
    gate_type: np.ndarray
    is_output: np.ndarray
    is_pseudo_input: np.ndarray
    is_pseudo_output: np.ndarray
    edge_index: np.ndarray

    @property
    def num_nodes(self) -> int:
        return len(self.gate_type)

    @property
    def num_edges(self) -> int:
        return self.edge_index.shape[1]

    def type_mask(self, *types: str) -> np.ndarray:
        """Boolean mask of nodes whose gate type is one of ``types``."""
        return np.isin(self.gate_type, [gate_type_index(t) for t in types])


# ----------------------------------------------------------------------------- parsing


def parse_netlist(
    path: os.PathLike | str,
    *,
    module: Optional[str] = None,
    text: Optional[str] = None,
) -> nx.DiGraph:
    """Parse a ``.v`` or ``.bench`` netlist into a DAG with flip-flops cut.

    Args:
        path: the netlist file. Its suffix picks the reader.
        module: Verilog module to read; default the module named like the file
            stem, else the first module in the file.
        text: the file's content, if already read (it is not read again).

    Returns:
        ``networkx.DiGraph`` with edges fanin -> fanout and node attributes
        ``type`` (a circuitgraph gate type), ``output`` (bool) and ``pseudo``
        (``"input"``, ``"output"`` or ``None``); ``graph["name"]`` is the
        circuit name.

    Raises:
        FileNotFoundError: no such file.
        NetlistSyntaxError: the text does not parse (names file and line).
        CombinationalLoopError: a cycle without a flip-flop on it.
        NetlistError: other structural problems (undriven nets, unknown types,
            no gates at all).
    """
    path = Path(path)
    if text is None:
        text = _read_text(path)
    if path.suffix == ".v":
        circuit = _parse_verilog(path, text, module)
    elif path.suffix == ".bench":
        circuit = _parse_bench(path, text)
    else:
        raise NetlistError(path, f"unsupported netlist suffix '{path.suffix}' (use .v or .bench)")

    graph = _cut_flip_flops(path, circuit)
    graph.graph["name"] = circuit.name or path.stem
    _check_graph(path, text, graph)
    return graph


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"netlist file not found: {path}")
    try:
        return path.read_text()
    except UnicodeDecodeError as e:
        raise NetlistSyntaxError(path, f"not a text netlist ({e.reason})") from e


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


_ONE_INPUT_GATE = re.compile(r"\b(not|buf)\s+[^;()]*\(([^;()]*)\)\s*;")


def _parse_verilog(path: Path, text: str, module: Optional[str]):
    from circuitgraph.parsing import VerilogParsingError, parse_verilog_netlist
    from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken

    # Select one module the way circuitgraph does, but keep its offset in the
    # file so that parser line numbers can be made file-relative.
    wanted = module if module is not None else path.stem
    match = re.search(rf"module\s+{re.escape(wanted)}\s*\(.*?\);.*?endmodule", text, re.DOTALL)
    if match is None and module is None:
        match = re.search(r"module\s+\S+?\s*\(.*?\);.*?endmodule", text, re.DOTALL)
    if match is None:
        found = re.findall(r"^\s*module\s+([^\s(]+)", text, re.MULTILINE)
        what = f"module '{module}' not found" if module else "no complete module found"
        hint = f" (modules in file: {', '.join(found)})" if found else ""
        raise NetlistSyntaxError(path, f"{what}{hint}", line=None)
    offset = _line_of(text, match.start()) - 1

    # Most netlists are plain gate lists: read those ~10x faster. Anything
    # richer, or wrong, goes to circuitgraph's parser (which names the line).
    circuit = read_gate_level_verilog(match.group(0), _flip_flops())
    if circuit is not None:
        return circuit
    try:
        return parse_verilog_netlist(match.group(0), _flip_flops())
    except UnexpectedInput as e:
        line = e.line + offset if isinstance(e.line, int) and e.line > 0 else None
        before = (getattr(e, "token_history", None) or [None])[-1]
        if (
            isinstance(e, UnexpectedToken)
            and "SEMICOLON" in e.expected
            and isinstance(getattr(before, "end_line", None), int)
            and line is not None
            and before.end_line + offset < line
        ):
            # A statement ran on into the next line: point at the line that lacks its ';'.
            line = before.end_line + offset
            what = "missing ';' at the end of the statement"
        elif isinstance(e, UnexpectedToken):
            what = f"unexpected {e.token.type.lower()} '{e.token}'"
        elif isinstance(e, UnexpectedCharacters):
            what = f"unexpected character '{e.char}'"
        else:
            what = "unexpected end of input"
        source = text.splitlines()[line - 1].strip() if line else ""
        message = f"Verilog syntax error: {what}" + (f" in `{source}`" if source else "")
        raise NetlistSyntaxError(path, message, line, getattr(e, "column", None)) from e
    except VerilogParsingError as e:
        line = e.line + offset if isinstance(e.line, int) else None
        column = e.column if isinstance(e.column, int) else None
        raise NetlistSyntaxError(path, e.message, line, column) from e
    except (LarkError, ValueError, KeyError) as e:
        if "cannot have more than one fanin" in str(e):
            # circuitgraph names neither the gate nor the line; find them.
            for m in _ONE_INPUT_GATE.finditer(match.group(0)):
                if m.group(2).count(",") > 1:  # output, input, and more
                    raise NetlistSyntaxError(
                        path,
                        f"{m.group(1)} takes one input, got {m.group(2).count(',')} "
                        f"in `{' '.join(m.group(0).split())}`",
                        _line_of(match.group(0), m.start()) + offset,
                    ) from e
        raise NetlistSyntaxError(path, f"cannot read netlist: {e}") from e


_BENCH_IO = re.compile(r"(INPUT|OUTPUT)\s*\(\s*([^\s(),=]+)\s*\)", re.IGNORECASE)
_BENCH_GATE = re.compile(r"([^\s(),=]+)\s*=\s*([A-Za-z]+)\s*\(([^()]*)\)")
_BENCH_GATES = {
    "buf": "buf", "buff": "buf", "not": "not", "inv": "not",
    "and": "and", "nand": "nand", "or": "or", "nor": "nor", "xor": "xor", "xnor": "xnor",
}  # fmt: skip


def _parse_bench(path: Path, text: str):
    """Read ISCAS ``.bench``: ``INPUT(a)``, ``OUTPUT(b)``, ``b = NAND(a, c)``, ``q = DFF(d)``.

    circuitgraph's own reader skips lines it does not understand, so a typo
    silently drops a gate; this one rejects them with the line number, and
    accepts any net name without spaces. Names starting with a digit (ISCAS
    ``22``) become ``N22``, as in the ISCAS Verilog netlists.
    """
    from circuitgraph import BlackBox, Circuit

    inputs, outputs, gates, flops = [], [], [], []
    driver_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if m := _BENCH_IO.fullmatch(line):
            kind, net = m.group(1).upper(), m.group(2)
            if kind == "INPUT":
                _define(path, driver_line, net, lineno)
                inputs.append(net)
            else:
                outputs.append((net, lineno))
            continue
        m = _BENCH_GATE.fullmatch(line)
        if m is None:
            raise NetlistSyntaxError(path, f"cannot parse `{line}`", lineno)
        net, gate, args = m.group(1), m.group(2).lower(), m.group(3)
        fanin = [a.strip() for a in args.split(",")]
        if not all(fanin) or any(re.search(r"\s", a) for a in fanin):
            raise NetlistSyntaxError(path, f"bad argument list in `{line}`", lineno)
        if _BENCH_GATES.get(gate) in ("buf", "not") and len(fanin) != 1:
            raise NetlistSyntaxError(
                path, f"{m.group(2)} takes one input, got {len(fanin)} in `{line}`", lineno
            )
        _define(path, driver_line, net, lineno)
        if gate == "dff":
            if len(fanin) != 1:
                raise NetlistSyntaxError(path, f"DFF takes one input, got {len(fanin)}", lineno)
            flops.append((net, fanin[0]))
        elif gate in _BENCH_GATES:
            gates.append((net, _BENCH_GATES[gate], fanin))
        else:
            raise NetlistSyntaxError(path, f"unknown gate '{m.group(2)}' in `{line}`", lineno)

    # circuitgraph rejects names that start with a digit, which ISCAS .bench
    # files use ("22 = NAND(10, 16)"); the ISCAS Verilog files call them N22.
    rename = {n: f"N{n}" for n in driver_line if n[0].isdigit()}
    rename.update({n: f"N{n}" for _, _, fi in gates for n in fi if n[0].isdigit()})
    rename.update({d: f"N{d}" for _, d in flops if d[0].isdigit()})
    for old, new in rename.items():
        if new in driver_line:
            raise NetlistSyntaxError(
                path, f"net '{old}' would be renamed '{new}', which exists", driver_line[old]
            )
    if rename:
        name_of = lambda n: rename.get(n, n)  # noqa: E731
        inputs = [name_of(n) for n in inputs]
        outputs = [(name_of(n), line) for n, line in outputs]
        gates = [(name_of(n), g, [name_of(i) for i in fi]) for n, g, fi in gates]
        flops = [(name_of(q), name_of(d)) for q, d in flops]

    c = Circuit(name=path.stem)
    for net in inputs:
        c.add(net, "input")
    for net, gate, fanin in gates:
        c.add(net, gate, fanin=fanin, add_connected_nodes=True, allow_redefinition=True)
    dff = BlackBox("dff", ["D"], ["Q"])
    for q, d in flops:  # same modelling as circuitgraph.io.bench_to_circuit
        c.add(q, "buf", allow_redefinition=True)
        if d not in c:
            c.add(d, "buf")  # undriven; reported by _check_graph
        c.add_blackbox(dff, f"{q}_dff", connections={"D": d, "Q": q})
    for net, lineno in outputs:
        if net not in c:
            raise NetlistSyntaxError(path, f"output '{net}' is never driven", lineno)
        c.set_output(net)
    return c


def _define(path: Path, driver_line: dict[str, int], net: str, lineno: int) -> None:
    if net in driver_line:
        raise NetlistSyntaxError(
            path, f"net '{net}' is driven twice (first at line {driver_line[net]})", lineno
        )
    driver_line[net] = lineno


def _cut_flip_flops(path: Path, circuit) -> nx.DiGraph:
    """Replace flip-flops by pseudo-inputs (Q) and pseudo-outputs (D), drop clocks."""
    from circuitgraph.tx import strip_blackboxes

    graph = circuit.graph
    for n, data in graph.nodes(data=True):
        data.setdefault("output", False)
        data["pseudo"] = None
    if not circuit.blackboxes:
        return graph

    loaded_inputs = {n for n in circuit.inputs() if graph.out_degree(n) > 0}
    for n, data in graph.nodes(data=True):
        pin = n.split(".")[-1]
        if data["type"] == "bb_output" and pin not in CLOCK_PINS:
            data["pseudo"] = "input"
        elif data["type"] == "bb_input" and pin not in CLOCK_PINS:
            data["pseudo"] = "output"
    try:
        graph = strip_blackboxes(circuit, ignore_pins=list(CLOCK_PINS)).graph
    except ValueError as e:  # e.g. a pin name collides with an existing net
        raise NetlistError(path, f"cannot cut flip-flops: {e}") from e
    # An input that drove only clock pins is now unloaded: it is the clock.
    clocks = [
        n for n in loaded_inputs if graph.out_degree(n) == 0 and not graph.nodes[n]["output"]
    ]
    graph.remove_nodes_from(clocks)
    return graph


def _find_line(text: str, name: str) -> Optional[int]:
    """First line mentioning ``name`` outside declarations (for error messages)."""
    pattern = re.compile(rf"(?<![\w$\\]){re.escape(name)}(?![\w$])")
    fallback = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if pattern.search(line):
            if not re.match(r"\s*(module|input|output|wire)\b", line):
                return lineno
            fallback = fallback or lineno
    return fallback


def _check_graph(path: Path, text: str, graph: nx.DiGraph) -> None:
    name = graph.graph["name"]
    if all(data["type"] in SOURCE_TYPES for _, data in graph.nodes(data=True)):
        # Nothing to simulate or learn; later stages would fail on the empty arrays.
        found = "only inputs or constants" if graph else "the file declares nothing"
        raise NetlistError(
            path, f"circuit '{name}' has no gates ({found}); is this the right file?"
        )
    for n, data in graph.nodes(data=True):
        gate = data["type"]
        if gate not in GATE_TYPES:
            raise NetlistError(
                path, f"net '{n}' has unsupported gate type '{gate}'", _find_line(text, n)
            )
        fanin = graph.in_degree(n)
        if gate in SOURCE_TYPES:
            if fanin:
                raise NetlistError(
                    path, f"{gate} '{n}' must not be driven by a gate", _find_line(text, n)
                )
        elif fanin == 0:
            raise NetlistError(path, f"net '{n}' is used but never driven", _find_line(text, n))
        elif gate in ("buf", "not") and fanin != 1:
            raise NetlistError(
                path, f"{gate} '{n}' has {fanin} inputs, expected 1", _find_line(text, n)
            )
    if not nx.is_directed_acyclic_graph(graph):
        cycle = [u for u, _ in nx.find_cycle(graph)]
        # Start the report at the node that appears first in the file.
        lines = [_find_line(text, n) or 1 << 30 for n in cycle]
        start = int(np.argmin(lines))
        cycle = cycle[start:] + cycle[:start]
        raise CombinationalLoopError(path, name, cycle, _find_line(text, cycle[0]))


# ----------------------------------------------------------------------------- arrays


def netlist_from_graph(graph: nx.DiGraph, name: Optional[str] = None) -> Netlist:
    """Turn a checked DAG (from :func:`parse_netlist`) into a :class:`Netlist`.

    Nodes are ordered by (logic level, gate type, name): a topological order that
    is the same on every run.
    """
    order: list[str] = []
    for generation in nx.topological_generations(graph):
        order.extend(
            sorted(generation, key=lambda n: (gate_type_index(graph.nodes[n]["type"]), n))
        )
    index = {n: i for i, n in enumerate(order)}
    nodes = graph.nodes
    gate_type = np.array([gate_type_index(nodes[n]["type"]) for n in order], dtype=np.int8)
    is_output = np.array([bool(nodes[n]["output"]) for n in order], dtype=bool)
    pseudo = [nodes[n].get("pseudo") for n in order]
    is_pseudo_input = np.array([p == "input" for p in pseudo], dtype=bool)
    is_pseudo_output = np.array([p == "output" for p in pseudo], dtype=bool)

    edges = np.array([(index[u], index[v]) for u, v in graph.edges()], dtype=np.int64)
    edges = edges.reshape(-1, 2).T
    perm = np.lexsort((edges[0], edges[1]))  # by fanout, then fanin
    return Netlist(
        name=name or graph.graph.get("name", "circuit"),
        node_names=order,
        gate_type=gate_type,
        is_output=is_output,
        is_pseudo_input=is_pseudo_input,
        is_pseudo_output=is_pseudo_output,
        edge_index=np.ascontiguousarray(edges[:, perm]),
    )


def read_netlist(
    path: os.PathLike | str,
    *,
    module: Optional[str] = None,
    name: Optional[str] = None,
    text: Optional[str] = None,
) -> Netlist:
    """Parse a netlist file straight to a :class:`Netlist` (no caching, no labels)."""
    graph = parse_netlist(path, module=module, text=text)
    return netlist_from_graph(graph, name=name)
