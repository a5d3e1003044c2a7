"""Gate vocabulary and node features.

circuitgraph stores every net as a node whose ``type`` is one of
``input, buf, not, and, nand, or, nor, xor, xnor, 0, 1, x`` (plus
``bb_input`` / ``bb_output`` for black-box pins, which we cut away before this
point). The node feature matrix ``x`` is a one-hot of that type followed by four
input/output flags. It never contains anything computed from the labels.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["GATE_TYPES", "FEATURE_NAMES", "gate_type_index", "node_features"]

#: Gate types in one-hot order. ``0``/``1`` are constant drivers, ``x`` an
#: unknown constant (``1'bx``; simulated as an unbiased random bit).
GATE_TYPES: tuple[str, ...] = (
    "input", "buf", "not", "and", "nand", "or", "nor", "xor", "xnor", "0", "1", "x",
)  # fmt: skip

_FLAG_NAMES = ("is_primary_input", "is_primary_output", "is_pseudo_input", "is_pseudo_output")

#: Column names of ``Data.x``.
FEATURE_NAMES: tuple[str, ...] = tuple(f"type_{t}" for t in GATE_TYPES) + _FLAG_NAMES

_TYPE_INDEX = {t: i for i, t in enumerate(GATE_TYPES)}

# Simulation groups gates by the associative operation they reduce their fanins
# with, then inverts the output for the negated types.
SIM_OP = {
    "buf": "buf", "not": "buf",
    "and": "and", "nand": "and",
    "or": "or", "nor": "or",
    "xor": "xor", "xnor": "xor",
}  # fmt: skip
INVERTED = frozenset({"not", "nand", "nor", "xnor"})
SOURCE_TYPES = frozenset({"input", "0", "1", "x"})  # types that take no fanin


def gate_type_index(type_name: str) -> int:
    """Index of a circuitgraph type name in :data:`GATE_TYPES` (``KeyError`` if unknown)."""
    return _TYPE_INDEX[type_name]


def node_features(
    gate_type: np.ndarray,
    is_output: np.ndarray,
    is_pseudo_input: np.ndarray,
    is_pseudo_output: np.ndarray,
) -> torch.Tensor:
    """Build ``x``: gate-type one-hot + primary/pseudo input/output flags (float32)."""
    num_nodes = len(gate_type)
    x = np.zeros((num_nodes, len(FEATURE_NAMES)), dtype=np.float32)
    x[np.arange(num_nodes), gate_type] = 1.0
    is_input = gate_type == _TYPE_INDEX["input"]
    flags = len(GATE_TYPES)
    x[:, flags + 0] = is_input & ~is_pseudo_input
    x[:, flags + 1] = is_output & ~is_pseudo_output
    x[:, flags + 2] = is_pseudo_input
    x[:, flags + 3] = is_pseudo_output
    return torch.from_numpy(x)
