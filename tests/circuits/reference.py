"""Hand-built netlists and reference computations that share no code with the package.

Each hand-built circuit is written three ways: as a gate list (for the exhaustive
reference simulator below), and as ``.bench`` / ``.v`` text for the parser.
"""

from __future__ import annotations

from itertools import product
from pathlib import Path

import networkx as nx
import numpy as np

# (output net, gate type, fanin nets), in an order where fanins come first.
GateList = list[tuple[str, str, list[str]]]

# Every combinational gate type, with 1- to 4-input gates; 6 inputs -> 64 assignments.
ALL_GATES_INPUTS = ["a", "b", "c", "d", "e", "f"]
ALL_GATES: GateList = [
    ("n1", "and", ["a", "b"]),
    ("n2", "nand", ["b", "c", "d"]),
    ("n3", "or", ["c", "d"]),
    ("n4", "nor", ["a", "e", "f"]),
    ("n5", "xor", ["n1", "n3", "e"]),
    ("n6", "xnor", ["n2", "f"]),
    ("n7", "not", ["n5"]),
    ("n8", "buf", ["n6"]),
    ("n9", "and", ["n7", "n8", "n4", "a"]),
    ("n10", "or", ["n9", "n2"]),
    ("n11", "xor", ["n10", "n10b"]),
    ("n10b", "nand", ["n1", "n4"]),
    ("n12", "nor", ["n11", "n5"]),
    ("n13", "xnor", ["n12", "a", "b", "c"]),
    # one-input forms of the multi-input gates
    ("n14", "nand", ["n13"]),
    ("n15", "or", ["n14"]),
    ("n16", "xor", ["n12"]),
    ("n17", "nor", ["n16"]),
]
ALL_GATES_OUTPUTS = ["n9", "n13", "n7", "n15", "n17"]


def ordered(gates: GateList, inputs: list[str]) -> GateList:
    """Gates in an order where every fanin is defined first."""
    known, out, todo = set(inputs), [], list(gates)
    while todo:
        for g in todo:
            if all(i in known for i in g[2]):
                out.append(g)
                known.add(g[0])
                todo.remove(g)
                break
        else:
            raise ValueError("cycle")
    return out


def write_bench(path: Path, inputs, outputs, gates: GateList, flops=()) -> Path:
    lines = ["# hand-built test circuit"]
    lines += [f"INPUT({i})" for i in inputs]
    lines += [f"OUTPUT({o})" for o in outputs]
    lines += [f"{q} = DFF({d})" for q, d in flops]
    lines += [f"{o} = {t.upper()}({', '.join(ins)})" for o, t, ins in gates]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_verilog(path: Path, inputs, outputs, gates: GateList, module: str | None = None) -> Path:
    module = module or path.stem
    wires = [g[0] for g in gates if g[0] not in outputs]
    lines = [f"module {module} ({', '.join(inputs + outputs)});"]
    lines.append(f"  input {', '.join(inputs)};")
    lines.append(f"  output {', '.join(outputs)};")
    if wires:
        lines.append(f"  wire {', '.join(wires)};")
    for k, (o, t, ins) in enumerate(gates):
        lines.append(f"  {t} g{k} ({o}, {', '.join(ins)});")
    lines.append("endmodule")
    path.write_text("\n".join(lines) + "\n")
    return path


_EVAL = {
    "and": lambda v: np.logical_and.reduce(v),
    "nand": lambda v: ~np.logical_and.reduce(v),
    "or": lambda v: np.logical_or.reduce(v),
    "nor": lambda v: ~np.logical_or.reduce(v),
    "xor": lambda v: np.logical_xor.reduce(v),
    "xnor": lambda v: ~np.logical_xor.reduce(v),
    "not": lambda v: ~v[0],
    "buf": lambda v: v[0],
}


def truth_tables(inputs: list[str], gates: GateList, constants=None) -> dict[str, np.ndarray]:
    """Value of every net under each of the 2**n input assignments (row-major)."""
    n = len(inputs)
    assignments = np.array(list(product([False, True], repeat=n)), dtype=bool).reshape(-1, n)
    values = {name: assignments[:, k] for k, name in enumerate(inputs)}
    for name, value in (constants or {}).items():
        values[name] = np.full(len(assignments), bool(value))
    for out, gate, ins in ordered(gates, list(values)):
        values[out] = _EVAL[gate](np.stack([values[i] for i in ins]))
    return values


def exact_toggle(table: np.ndarray, num_inputs: int, flip_prob: float) -> float:
    """P(f(x) != f(x xor m)), x uniform, each bit of m set with prob ``flip_prob``."""
    idx = np.arange(2**num_inputs)
    total = 0.0
    for mask in range(2**num_inputs):
        k = bin(mask).count("1")
        weight = flip_prob**k * (1 - flip_prob) ** (num_inputs - k)
        total += weight * np.mean(table != table[idx ^ mask])
    return total


def longest_paths(graph: nx.DiGraph) -> tuple[dict, dict]:
    """(level, reverse level) by dynamic programming over a networkx topological sort."""
    level, rlevel = {}, {}
    order = list(nx.topological_sort(graph))
    for v in order:
        level[v] = max((level[u] + 1 for u in graph.predecessors(v)), default=0)
    for v in reversed(order):
        rlevel[v] = max((rlevel[w] + 1 for w in graph.successors(v)), default=0)
    return level, rlevel
