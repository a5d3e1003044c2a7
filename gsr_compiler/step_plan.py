"""``gsr plan``: the predicted peak of a training step on a circuit, plain vs GSR, without running.

The model (``ResidualGNN``: encoder, ``depth`` pre-norm residual blocks, head) is traced and
compiled on a small random graph; every size in its liveness is affine in the node and edge
counts, so the step peak is then evaluated at the circuit's size (:mod:`gsr_compiler.peak`).
The step peak grows linearly with depth once the blocks repeat (a plain model keeps each block's
activations; a reversible chain only its parameters' share), so the largest depth that fits
comes from the peaks at two small depths; the largest batch at the asked depth from
``max_nodes`` at the circuit's degree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .report import format_bytes

__all__ = ["StepPlanRow", "plan_training_step", "circuit_size"]

# small, and unlike any channel count, so that the traced N and E are recognized
_TRACE_NODES, _TRACE_EDGES = 211, 359


@dataclass
class StepPlanRow:
    form: str
    peak: int
    fits: bool
    max_depth: Optional[int]  # None: no bound below 1 << 20 blocks
    max_nodes: int


def circuit_size(circuit: str) -> tuple[int, int, str]:
    """``(nodes, edges, name)`` of a bundled circuit or a netlist file (parsed, not labelled)."""
    from .circuits.loading import load_netlist

    netlist, _ = load_netlist(circuit)
    return len(netlist.node_names), int(netlist.edge_index.shape[1]), netlist.name


def _predictors(depth: int, width: int, conv: str, groups: int, sparse_k: Optional[int]):
    from . import gsr_compile
    from .circuits import FEATURE_NAMES
    from .models import ResidualGNN
    from .peak import plain_predictor
    from .synthetic import random_graph

    x, edge_index, _ = random_graph(_TRACE_NODES, _TRACE_EDGES, len(FEATURE_NAMES), seed=0)
    torch.manual_seed(0)
    model = ResidualGNN(len(FEATURE_NAMES), width, 1, depth, conv=conv, dropout=0.0)
    plain = plain_predictor(model, (x, edge_index))
    gsr = gsr_compile(model, groups=groups, sparse_k=sparse_k, example_inputs=(x, edge_index))
    return plain, gsr._peak_predictor()


def _max_depth(peak_at: dict, budget: int) -> Optional[int]:
    """Largest depth whose peak fits, from the peaks at two depths (linear in depth)."""
    (d1, p1), (d2, p2) = sorted(peak_at.items())
    slope = (p2 - p1) / (d2 - d1)
    if p1 > budget and slope >= 0:
        return 0
    if slope <= 0:
        return None
    return max(0, int(d1 + (budget - p1) // slope))


def plan_training_step(depth: int, width: int, circuit: str, device_memory: int, *,
                       conv: str = "sage", groups: int = 2, sparse_k: Optional[int] = None,
                       optimizer: str = "adam", device: str = "cuda",
                       num_nodes: Optional[int] = None, num_edges: Optional[int] = None
                       ) -> tuple[list[StepPlanRow], dict]:
    """Rows for plain and GSR, and what they were computed for."""
    for name, value in (("depth", depth), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value!r}")
    if num_nodes is None:
        num_nodes, num_edges, name = circuit_size(circuit)
    else:
        name = circuit or "given size"
    degree = num_edges / max(num_nodes, 1)
    rows = []
    small = {}
    for d in (2, 4):
        small[d] = _predictors(d, width, conv, groups, sparse_k)
    plain, gsr = _predictors(depth, width, conv, groups, sparse_k)
    for form, predictor, index in (("plain", plain, 0), ("gsr", gsr, 1)):
        peak = predictor.predict(num_nodes, num_edges, optimizer, device).total
        peaks = {d: small[d][index].predict(num_nodes, num_edges, optimizer, device).total
                 for d in small}
        rows.append(StepPlanRow(form, peak, peak <= device_memory,
                                _max_depth(peaks, device_memory),
                                predictor.max_nodes(device_memory, degree, optimizer, device)))
    return rows, {"circuit": name, "nodes": num_nodes, "edges": num_edges, "depth": depth,
                  "width": width, "conv": conv, "groups": groups, "sparse_k": sparse_k,
                  "device_memory": device_memory, "optimizer": optimizer, "device": device}


def format_plan(rows: list[StepPlanRow], info: dict) -> str:
    head = (f"training step of {info['depth']} x {info['conv']} blocks, width {info['width']}, "
            f"on {info['circuit']} ({info['nodes']:,} nodes, {info['edges']:,} edges), "
            f"{info['optimizer']}, {info['device']} device of {format_bytes(info['device_memory'])}"
            f" (predicted, nothing run)")
    table = [("", "step peak", "fits", "largest depth (whole circuit)",
              f"largest batch at depth {info['depth']}")]
    for r in rows:
        depth = "unbounded" if r.max_depth is None else f"{r.max_depth:,}"
        table.append((r.form + (f" (groups={info['groups']}, sparse_k={info['sparse_k']})"
                                if r.form == "gsr" else ""),
                      format_bytes(r.peak), "yes" if r.fits else "no", depth,
                      f"{r.max_nodes:,} nodes"))
    widths = [max(len(t[i]) for t in table) for i in range(5)]
    lines = [head] + ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(t, widths))) for t in table]
    lines.insert(2, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
